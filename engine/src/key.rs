//! plan → stage keys: the BLAKE3 hash of everything a stage's output may depend on.
//!
//! Key = BLAKE3(canonical JSON of: cache format version, stage kind, the kind's version, resolved
//! params, each input port's upstream artifact ids, each external dependency's content hash).
//! Nothing else: no paths of the store, no timestamps, no stage names, so renaming a stage or
//! moving a checkout keeps its cache.

use std::collections::BTreeMap;

use crate::store::{ArtifactId, StageKey};

/// Bump when the key encoding or the store layout changes meaning.
pub const CACHE_FORMAT: u32 = 1;

/// What goes into a stage key.
pub struct KeyMaterial<'a> {
    pub kind: &'a str,
    pub version: u32,
    pub params: &'a serde_json::Value,
    pub inputs: &'a BTreeMap<String, Vec<ArtifactId>>,
    pub deps: &'a BTreeMap<String, String>,
}

impl KeyMaterial<'_> {
    pub fn key(&self) -> StageKey {
        let material = serde_json::json!({
            "cache_format": CACHE_FORMAT,
            "kind": self.kind,
            "version": self.version,
            "params": self.params,
            "inputs": self.inputs,
            "deps": self.deps,
        });
        let mut canonical = String::new();
        write_canonical(&material, &mut canonical);
        StageKey(blake3::hash(canonical.as_bytes()).to_hex().to_string())
    }
}

/// JSON with object keys sorted and no whitespace: equal values give equal bytes.
pub fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(params: serde_json::Value, version: u32) -> StageKey {
        let inputs = BTreeMap::new();
        let deps = BTreeMap::new();
        KeyMaterial {
            kind: "command",
            version,
            params: &params,
            inputs: &inputs,
            deps: &deps,
        }
        .key()
    }

    #[test]
    fn key_ignores_key_order_but_not_values_or_versions() {
        assert_eq!(
            key(json!({"a": 1, "b": 2}), 1),
            key(json!({"b": 2, "a": 1}), 1)
        );
        assert_ne!(key(json!({"a": 1}), 1), key(json!({"a": 2}), 1));
        assert_ne!(key(json!({"a": 1}), 1), key(json!({"a": 1}), 2));
    }

    #[test]
    fn key_depends_on_inputs_and_deps() {
        let params = json!({});
        let no_inputs = BTreeMap::new();
        let no_deps = BTreeMap::new();
        let inputs = BTreeMap::from([("x".to_string(), vec![ArtifactId("a".into())])]);
        let deps = BTreeMap::from([("f".to_string(), "h".to_string())]);
        let plain = KeyMaterial {
            kind: "k",
            version: 1,
            params: &params,
            inputs: &no_inputs,
            deps: &no_deps,
        }
        .key();
        let with_input = KeyMaterial {
            kind: "k",
            version: 1,
            params: &params,
            inputs: &inputs,
            deps: &no_deps,
        }
        .key();
        let with_dep = KeyMaterial {
            kind: "k",
            version: 1,
            params: &params,
            inputs: &no_inputs,
            deps: &deps,
        }
        .key();
        assert_ne!(plain, with_input);
        assert_ne!(plain, with_dep);
        assert_ne!(with_input, with_dep);
    }
}
