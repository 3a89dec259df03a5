//! The typed pipeline that validation produces, and `--set` overrides applied before it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::yaml::{self, Key, Node, Value};

/// The file format version this build reads (`smelt: 1`).
pub const FORMAT_VERSION: i64 = 1;

/// A valid pipeline: every stage's kind exists, params are resolved, inputs are wired, no cycles.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub name: String,
    /// Absolute path of the pipeline file.
    pub path: PathBuf,
    /// Its directory: relative paths in the pipeline are relative to it.
    pub dir: PathBuf,
    pub stages: BTreeMap<String, StageSpec>,
    /// Stage names in a topological order (inputs before the stages that read them).
    pub order: Vec<String>,
    /// The file's text, for reports that point into it after validation (data checks).
    pub text: Arc<String>,
}

impl Pipeline {
    /// The stage graph.
    pub fn dag(&self) -> crate::graph::Dag {
        let upstream = self
            .stages
            .iter()
            .map(|(n, s)| (n.clone(), s.upstream().map(String::from).collect()))
            .collect();
        crate::graph::Dag::new(&upstream)
    }
}

/// One stage of a valid pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    pub name: String,
    /// The stage kind (`uses:`).
    pub kind: String,
    /// Params after `${vars}`, `--set` and defaults, as the kind's serde types print them.
    pub params: serde_json::Value,
    /// Port → upstream stage names, in the order written.
    pub inputs: BTreeMap<String, Vec<String>>,
    /// The `with:` block as written (after `${vars}` and `--set`), to point at a param.
    pub with: Node,
    /// The `inputs:` block as written, to point at a port.
    pub wiring: Option<Node>,
}

impl StageSpec {
    pub fn upstream(&self) -> impl Iterator<Item = &str> {
        self.inputs.values().flatten().map(String::as_str)
    }
}

/// One `--set a.b.c=value` from the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    pub path: Vec<String>,
    pub value: Value,
    pub text: String,
}

impl std::str::FromStr for Override {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (path, value) = text
            .split_once('=')
            .ok_or_else(|| format!("`--set {text}`: expected KEY.PATH=VALUE, e.g. vars.seed=8"))?;
        let path: Vec<String> = path.trim().split('.').map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("`--set {text}`: empty segment in the key path"));
        }
        let allowed = matches!(path.as_slice(), [v, _, ..] if v == "vars")
            || matches!(path.as_slice(), [s, _, w, _, ..] if s == "stages" && w == "with")
            || matches!(path.as_slice(), [s, _, f] if s == "stages" && (f == "uses"));
        if !allowed {
            return Err(format!(
                "`--set {text}`: only vars.NAME… and stages.STAGE.with.PARAM… can be set"
            ));
        }
        Ok(Override {
            path,
            value: yaml::parse_scalar(value),
            text: text.to_string(),
        })
    }
}

/// Applies overrides to the parsed document. A `stages.S` that does not exist is an error (a typo
/// there would otherwise silently create a stage); missing keys below it are created.
pub fn apply_overrides(root: &mut Node, overrides: &[Override]) -> Result<(), String> {
    for o in overrides {
        if o.path[0] == "stages" {
            let stage_names: Vec<String> = root
                .get("stages")
                .and_then(Node::entries)
                .map(|e| e.iter().map(|(k, _)| k.name.clone()).collect())
                .unwrap_or_default();
            if !stage_names.contains(&o.path[1]) {
                let mut msg = format!("`--set {}`: there is no stage `{}`", o.text, o.path[1]);
                if let Some(best) =
                    crate::diagnostics::closest(&o.path[1], stage_names.iter().map(String::as_str))
                {
                    msg.push_str(&format!(" (did you mean `{best}`?)"));
                }
                return Err(msg);
            }
        }
        set_path(root, &o.path, o.value.clone())
            .map_err(|at| format!("`--set {}`: `{at}` is not a mapping", o.text))?;
    }
    Ok(())
}

/// Sets `path` to `value`, creating mappings on the way (list items must exist). The new node takes the span of what it
/// replaces (or of its parent) so that later diagnostics still point somewhere sensible.
fn set_path(node: &mut Node, path: &[String], value: Value) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        node.value = value;
        return Ok(());
    };
    if matches!(node.value, Value::Null) {
        node.value = Value::Map(Vec::new());
    }
    let span = node.span;
    // A list item is addressed by its index: `filters.0.gopher_quality.min_words`.
    if let Value::Seq(items) = &mut node.value {
        let item = first.parse::<usize>().ok().and_then(|i| items.get_mut(i));
        let Some(item) = item else {
            return Err(first.clone());
        };
        return set_path(item, rest, value).map_err(|at| format!("{first}.{at}"));
    }
    let Value::Map(entries) = &mut node.value else {
        return Err(first.clone());
    };
    let index = match entries.iter().position(|(k, _)| &k.name == first) {
        Some(i) => i,
        None => {
            entries.push((
                Key {
                    name: first.clone(),
                    span,
                },
                Node::new(Value::Null, span),
            ));
            entries.len() - 1
        }
    };
    set_path(&mut entries[index].1, rest, value).map_err(|at| format!("{first}.{at}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_typed_values() {
        let o: Override = "stages.train.with.train.lr=3e-4".parse().unwrap();
        assert_eq!(o.path, ["stages", "train", "with", "train", "lr"]);
        assert_eq!(o.value, Value::Float(3e-4));
        assert!("vars.seed".parse::<Override>().is_err());
        assert!("name=x".parse::<Override>().is_err());
    }

    #[test]
    fn overrides_create_nested_keys_but_not_stages() {
        let (mut root, _) = yaml::parse("stages:\n  a:\n    uses: command\n").unwrap();
        let set = |t: &str| t.parse::<Override>().unwrap();
        apply_overrides(&mut root, &[set("stages.a.with.x.y=2"), set("vars.seed=8")]).unwrap();
        let a = root.get("stages").unwrap().get("a").unwrap();
        assert_eq!(
            a.get("with")
                .unwrap()
                .get("x")
                .unwrap()
                .get("y")
                .unwrap()
                .value,
            Value::Int(2)
        );
        assert_eq!(
            root.get("vars").unwrap().get("seed").unwrap().value,
            Value::Int(8)
        );
        let (mut listed, _) =
            yaml::parse("stages:\n  a:\n    with: { f: [ { q: { n: 1 } } ] }\n").unwrap();
        apply_overrides(&mut listed, &[set("stages.a.with.f.0.q.n=5")]).unwrap();
        let n = listed
            .lookup(&["stages", "a", "with", "f", "0", "q", "n"].map(String::from))
            .unwrap();
        assert_eq!(n.value, Value::Int(5));
        assert!(apply_overrides(&mut listed, &[set("stages.a.with.f.3.q=1")]).is_err());
        let err = apply_overrides(&mut root, &[set("stages.b.with.x=1")]).unwrap_err();
        assert!(err.contains("no stage `b`"), "{err}");
    }
}
