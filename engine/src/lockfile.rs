//! store → lockfile: `<pipeline>.lock` next to the pipeline, recording what each stage produced.
//!
//! Like dvc.lock it is meant to be committed: it pins each stage's key, artifact and resolved
//! params, and it is what `plan` and `status` compare against to say why a stage would rerun.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::{sweep_temp_files, write_atomic, ArtifactId, StageKey};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Lockfile {
    pub smelt: i64,
    pub pipeline: String,
    pub stages: BTreeMap<String, LockedStage>,
}

/// One stage as it was last built.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockedStage {
    pub kind: String,
    pub version: u32,
    pub key: StageKey,
    pub artifact: ArtifactId,
    pub params: serde_json::Value,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, Vec<ArtifactId>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deps: BTreeMap<String, String>,
}

const HEADER: &str =
    "# Written by smelt: what each stage of the pipeline last produced. Commit it.\n";

impl Lockfile {
    /// `pipelines/train.yaml` → `pipelines/train.lock`.
    pub fn path_for(pipeline: &Path) -> PathBuf {
        pipeline.with_extension("lock")
    }

    pub fn read(path: &Path) -> io::Result<Lockfile> {
        let text = std::fs::read_to_string(path)?;
        serde_yaml::from_str(&text)
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
    }

    pub fn write(&self, path: &Path) -> io::Result<()> {
        let yaml = serde_yaml::to_string(self).map_err(io::Error::other)?;
        // A run killed while writing it leaves a temp file beside the pipeline: remove it.
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            sweep_temp_files(dir, name.to_str());
        }
        write_atomic(path, format!("{HEADER}{yaml}").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.lock");
        let mut lock = Lockfile {
            smelt: 1,
            pipeline: "p".into(),
            stages: BTreeMap::new(),
        };
        lock.stages.insert(
            "a".into(),
            LockedStage {
                kind: "command".into(),
                version: 1,
                key: StageKey("k".into()),
                artifact: ArtifactId("x".into()),
                params: serde_json::json!({"run": "echo", "lr": 0.001}),
                inputs: BTreeMap::new(),
                deps: BTreeMap::from([("f.txt".into(), "h".into())]),
            },
        );
        lock.write(&path).unwrap();
        assert_eq!(Lockfile::read(&path).unwrap(), lock);
        assert_eq!(
            Lockfile::path_for(Path::new("a/b.yaml")),
            Path::new("a/b.lock")
        );
    }
}
