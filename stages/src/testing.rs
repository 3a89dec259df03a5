//! Helpers the stage modules' unit tests share.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use smelt_engine::stage::NoProgress;
use smelt_engine::StageContext;

use crate::records::{Record, ShardWriter};

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
