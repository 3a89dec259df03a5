//! Tag once, re-threshold for free: the scores the scoring filters measured, per document in
//! corpus order, kept as a memo keyed by everything the scores depend on — the input artifact,
//! normalisation, the non-scoring filters in full, the scoring filters' kinds but not their
//! thresholds. A rerun that changes only thresholds replays the scores instead of measuring.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use smelt_engine::{Stage, StageContext};

use super::{Clean, CleanParams, DocScores};

/// One document's scores take a few hundred bytes; a larger length means a damaged file.
const MAX_ENTRY_BYTES: usize = 1 << 20;

pub enum ScoreTape {
    /// No scoring filters: nothing to keep.
    Off,
    Replay(BufReader<File>),
    Record {
        writer: BufWriter<File>,
        partial: PathBuf,
        path: PathBuf,
    },
}

impl ScoreTape {
    pub fn open(ctx: &StageContext, params: &CleanParams, input: &Path) -> Result<Self, String> {
        let filters: Vec<serde_json::Value> = params
            .filters
            .iter()
            .map(|f| {
                let full = serde_json::to_value(f).expect("filters serialise");
                let kind = full
                    .as_object()
                    .and_then(|o| o.keys().next().cloned())
                    .unwrap_or_default();
                match f.prepare().map(|p| p.is_scoring()) {
                    Ok(true) => serde_json::json!({ "scoring": kind }),
                    _ => full,
                }
            })
            .collect();
        if !filters.iter().any(|f| f.get("scoring").is_some()) {
            return Ok(ScoreTape::Off);
        }
        let key = serde_json::json!({
            "memo": "clean-scores",
            "version": Clean::VERSION,
            "input": input.file_name().map(|n| n.to_string_lossy().into_owned()),
            "normalize": params.normalize,
            "lowercase": params.lowercase,
            "strip_html": params.strip_html,
            "filter_structured": params.filter_structured,
            "filters": filters,
        });
        let path = ctx.memo_file(&key);
        if let Ok(file) = File::open(&path) {
            return Ok(ScoreTape::Replay(BufReader::new(file)));
        }
        std::fs::create_dir_all(&ctx.memo_dir)
            .map_err(|e| format!("{}: {e}", ctx.memo_dir.display()))?;
        // Unique per writer: two stages of one run may record the same memo at once.
        static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let partial = path.with_extension(format!("partial.{}.{n}", std::process::id()));
        let file = File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        Ok(ScoreTape::Record {
            writer: BufWriter::new(file),
            partial,
            path,
        })
    }

    pub fn replaying(&self) -> bool {
        matches!(self, ScoreTape::Replay(_))
    }

    /// The next `n` documents' scores, when replaying.
    pub fn replay(&mut self, n: usize) -> Result<Option<Vec<DocScores>>, String> {
        let ScoreTape::Replay(reader) = self else {
            return Ok(None);
        };
        let corrupt = |e: &dyn std::fmt::Display| {
            format!("the score memo is unreadable ({e}); `smelt gc` removes it")
        };
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut len = [0u8; 4];
            reader.read_exact(&mut len).map_err(|e| corrupt(&e))?;
            let len = u32::from_le_bytes(len) as usize;
            if len > MAX_ENTRY_BYTES {
                return Err(corrupt(&format!("an entry claims {len} bytes")));
            }
            let mut bytes = vec![0; len];
            reader.read_exact(&mut bytes).map_err(|e| corrupt(&e))?;
            out.push(postcard::from_bytes(&bytes).map_err(|e| corrupt(&e))?);
        }
        Ok(Some(out))
    }

    /// Appends documents' scores, when recording.
    pub fn record(&mut self, scores: &[DocScores]) -> Result<(), String> {
        let ScoreTape::Record {
            writer, partial, ..
        } = self
        else {
            return Ok(());
        };
        for doc in scores {
            let bytes = postcard::to_allocvec(doc).map_err(|e| e.to_string())?;
            let written = writer
                .write_all(&(bytes.len() as u32).to_le_bytes())
                .and_then(|()| writer.write_all(&bytes));
            written.map_err(|e| format!("{}: {e}", partial.display()))?;
        }
        Ok(())
    }

    /// Publishes a recorded tape (renamed into place: never seen half-written).
    pub fn finish(self) -> Result<(), String> {
        if let ScoreTape::Record {
            writer,
            partial,
            path,
        } = self
        {
            let file = writer.into_inner().map_err(|e| e.to_string())?;
            drop(file);
            // Another writer may have published the same memo first: theirs is as good.
            if let Err(e) = std::fs::rename(&partial, &path) {
                let _ = std::fs::remove_file(&partial);
                if !path.exists() {
                    return Err(format!("{}: {e}", path.display()));
                }
            }
        }
        Ok(())
    }
}
