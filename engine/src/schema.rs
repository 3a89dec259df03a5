//! The pipeline JSON Schema, generated from the registered stage kinds' param types.
//!
//! Editors use it through the `# yaml-language-server: $schema=…` line. Each kind's params schema
//! is hoisted under `$defs` (its own definitions prefixed with the kind's name) and selected by an
//! `if uses == kind then with: …` rule, so an editor reports errors for the right kind. Numbers and
//! booleans also accept a `${vars.NAME}` string, which is resolved before validation.

use serde_json::{json, Map, Value};

use crate::stage::{Ports, Registry};

const INTERPOLATION: &str = "interpolation";

/// The whole pipeline schema.
pub fn pipeline_schema(registry: &Registry) -> Value {
    let mut defs = Map::new();
    defs.insert(
        INTERPOLATION.into(),
        json!({
            "type": "string",
            "pattern": "^\\$\\{vars\\.[^}]+\\}$",
            "description": "A reference to a variable, replaced by its value: ${vars.NAME}"
        }),
    );
    let mut rules = Vec::new();
    for kind in registry.kinds() {
        let name = kind.kind();
        let mut params = kind.params_schema();
        let own_defs = params.as_object_mut().and_then(|o| o.remove("$defs"));
        if let Some(Value::Object(own)) = own_defs {
            for (def, mut schema) in own {
                prepare(&mut schema, name);
                defs.insert(format!("{name}.{def}"), schema);
            }
        }
        if let Some(obj) = params.as_object_mut() {
            obj.remove("$schema");
            obj.insert("description".into(), Value::String(kind.summary().into()));
        }
        prepare(&mut params, name);
        defs.insert(format!("{name}.params"), params);
        let mut then =
            json!({ "properties": { "with": { "$ref": format!("#/$defs/{name}.params") } } });
        if let Ports::Declared(ports) = kind.ports() {
            let properties: Map<String, Value> = ports
                .iter()
                .map(|p| {
                    let schema = if p.many {
                        json!({"$ref": "#/$defs/stage_list"})
                    } else {
                        json!({"type": "string"})
                    };
                    let mut schema = schema;
                    schema["description"] = Value::String(p.doc.into());
                    (p.name.to_string(), schema)
                })
                .collect();
            let required: Vec<&str> = ports
                .iter()
                .filter(|p| p.required)
                .map(|p| p.name)
                .collect();
            then["properties"]["inputs"] = json!({ "type": "object", "properties": properties, "required": required, "additionalProperties": false });
        }
        rules.push(json!({
            "if": { "properties": { "uses": { "const": name } }, "required": ["uses"] },
            "then": then,
        }));
    }
    let kinds: Vec<&str> = registry.names().collect();
    defs.insert(
        "stage_list".into(),
        json!({ "type": "array", "items": { "type": "string" }, "minItems": 1 }),
    );
    defs.insert(
        "stage".into(),
        json!({
            "type": "object",
            "required": ["uses"],
            "additionalProperties": false,
            "properties": {
                "uses": { "enum": kinds, "description": "The stage kind (`smelt stages` lists them)" },
                "description": { "type": "string" },
                "inputs": {
                    "type": "object",
                    "description": "Input ports wired to other stages: `port: stage` or `port: [stage, …]`",
                    "additionalProperties": { "anyOf": [ { "type": "string" }, { "$ref": "#/$defs/stage_list" } ] }
                },
                "with": { "type": "object", "description": "The stage kind's params" }
            },
            "allOf": rules,
        }),
    );
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Smelt pipeline",
        "description": "A DAG of stages that collect, clean and tokenize data and train and evaluate language models",
        "type": "object",
        "required": ["smelt", "stages"],
        "additionalProperties": false,
        "properties": {
            "smelt": { "const": crate::spec::FORMAT_VERSION, "description": "The pipeline format version" },
            "name": { "type": "string" },
            "description": { "type": "string" },
            "vars": { "type": "object", "description": "Values referenced as ${vars.NAME}; override with --set vars.NAME=VALUE" },
            "stages": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": { "pattern": "^[A-Za-z_][A-Za-z0-9_-]*$" },
                "additionalProperties": { "$ref": "#/$defs/stage" }
            }
        },
        "$defs": defs,
    })
}

/// Rewrites a kind's schema for embedding: `$ref`s point at the prefixed definitions, and scalar
/// types other than strings also accept a `${vars.NAME}` reference.
fn prepare(schema: &mut Value, kind: &str) {
    match schema {
        Value::Object(obj) => {
            if let Some(Value::String(r)) = obj.get_mut("$ref") {
                if let Some(def) = r.strip_prefix("#/$defs/") {
                    *r = format!("#/$defs/{kind}.{def}");
                }
            }
            for value in obj.values_mut() {
                prepare(value, kind);
            }
            if accepts_only_scalars(obj.get("type")) {
                let original = Value::Object(std::mem::take(obj));
                obj.insert(
                    "anyOf".into(),
                    json!([original, { "$ref": format!("#/$defs/{INTERPOLATION}") }]),
                );
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| prepare(v, kind)),
        _ => {}
    }
}

fn accepts_only_scalars(ty: Option<&Value>) -> bool {
    let scalar = |t: &Value| matches!(t.as_str(), Some("integer" | "number" | "boolean" | "null"));
    match ty {
        Some(Value::Array(types)) => types.iter().all(scalar),
        Some(t) => scalar(t),
        None => false,
    }
}
