//! Training windows from a `tokenize` artifact's token streams.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use smelt_engine::ParamProblem;

use crate::tokenize::{shards::read_stream, Meta};

/// Whether windows of `seq` tokens plus their next-token target fit in the train and validation
/// streams of a `tokenize` artifact (counted in its meta.json).
pub fn windows_fit(meta: &Meta, seq: usize) -> Vec<ParamProblem> {
    let mut problems = Vec::new();
    for split in ["train", "validation"] {
        let Some(stream) = meta.streams.get(split) else {
            let mut message = format!(
                "the tokens input has no {split} documents (streams: {})",
                meta.streams.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            if split == "validation" {
                message.push_str(
                    "; pretraining evaluates on it, so give `collect` a validation split",
                );
            }
            problems.push(ParamProblem::input("tokens", 0, message));
            continue;
        };
        if stream.tokens <= seq as u64 {
            problems.push(
                ParamProblem::new(
                    "model.seq_len",
                    format!(
                        "the {split} split has {} tokens, too few for windows of `model.seq_len` \
                         {seq} plus one target",
                        stream.tokens
                    ),
                )
                .help("lower `model.seq_len`, or add data"),
            );
        }
    }
    problems
}

/// One split's tokens, end to end (documents with their end-of-text tokens).
pub struct Tokens(Vec<u32>);

impl Tokens {
    /// The `train` or `validation` stream of the artifact in `dir`.
    pub fn read(dir: &Path, meta: &Meta, split: &str) -> Result<Tokens, String> {
        let Some(stream) = meta.streams.get(split) else {
            return Err(format!(
                "the tokens input has no {split} documents (streams: {})",
                meta.streams.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        };
        let sequences =
            read_stream(dir, stream, meta.dtype).map_err(|e| format!("{split} tokens: {e}"))?;
        Ok(Tokens(
            sequences.into_iter().flat_map(|(ids, _)| ids).collect(),
        ))
    }

    /// `batch` random windows of `seq` tokens and their next-token targets, drawn from a
    /// generator seeded with `seed` (so a resumed run draws what an uninterrupted one would).
    pub fn batch(&self, batch: usize, seq: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let start = rng.random_range(0..self.0.len() - seq);
            inputs.extend_from_slice(&self.0[start..start + seq]);
            targets.extend_from_slice(&self.0[start + 1..start + seq + 1]);
        }
        (inputs, targets)
    }
}
