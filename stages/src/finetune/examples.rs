//! Fine-tuning examples from a `tokenize` artifact's masked streams (`chat-<split>`,
//! `preference-<split>`), fitted to the model's context, and the padded batches built from them.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::tokenize::{shards::read_stream, Meta};

/// A training sequence: `inputs[i]` predicts `targets[i]`, counted in the loss where `mask[i]`
/// is 1 (answers; prompts and padding are 0).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<f32>,
}

impl Example {
    /// From token ids and their mask (1 on tokens to learn), cut to `context` inputs. `None`
    /// when no learnt token is left (the prompt fills the context).
    fn new(ids: &[u32], mask: &[u8], context: usize) -> (Option<Example>, bool) {
        let end = ids.len().min(context + 1);
        let truncated = end < ids.len();
        let example = Example {
            inputs: ids[..end - 1].to_vec(),
            targets: ids[1..end].to_vec(),
            mask: mask[1..end].iter().map(|&m| f32::from(m)).collect(),
        };
        let learnt = example.mask.iter().any(|&m| m > 0.0);
        (learnt.then_some(example), truncated)
    }

    /// Inputs (positions) the example takes.
    pub fn positions(&self) -> usize {
        self.inputs.len()
    }

    pub fn trained_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}

/// What loading left out or cut, reported in the stage's metrics.
#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct Skipped {
    /// Examples cut to the context length (kept).
    pub truncated: u64,
    /// Examples whose prompt fills the context, so nothing is left to learn.
    pub prompt_too_long: u64,
    /// Preference pairs whose chosen and rejected answers are the same tokens.
    pub identical_pair: u64,
}

/// Token ids with their loss mask.
type Masked = (Vec<u32>, Vec<u8>);

/// Why the data has no stream `name` (`chat-train`), if it has none.
pub fn missing_stream(meta: &Meta, name: &str) -> Option<String> {
    (!meta.streams.contains_key(name)).then(|| {
        format!(
            "the data input has no `{name}` stream (it has: {}); tokenize chat or preference \
             records with a `tokenize` stage",
            meta.streams.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })
}

fn stream(dir: &Path, meta: &Meta, name: &str) -> Result<Vec<Masked>, String> {
    let Some(stream) = meta.streams.get(name) else {
        return Err(missing_stream(meta, name).expect("the stream is missing"));
    };
    let sequences = read_stream(dir, stream, meta.dtype).map_err(|e| format!("{name}: {e}"))?;
    sequences
        .into_iter()
        .map(|(ids, mask)| {
            mask.map(|m| (ids, m))
                .ok_or_else(|| format!("{name}: the stream has no loss mask"))
        })
        .collect()
}

/// The conversations of `chat-<split>` that fit `context`.
pub fn conversations(
    dir: &Path,
    meta: &Meta,
    split: &str,
    context: usize,
    skipped: &mut Skipped,
) -> Result<Vec<Example>, String> {
    let mut examples = Vec::new();
    for (ids, mask) in stream(dir, meta, &format!("chat-{split}"))? {
        let (example, truncated) = Example::new(&ids, &mask, context);
        skipped.truncated += u64::from(truncated);
        match example {
            Some(example) => examples.push(example),
            None => skipped.prompt_too_long += 1,
        }
    }
    Ok(examples)
}

/// The pairs of `preference-<split>` (chosen, rejected) that fit `context` and differ.
pub fn pairs(
    dir: &Path,
    meta: &Meta,
    split: &str,
    context: usize,
    skipped: &mut Skipped,
) -> Result<Vec<(Example, Example)>, String> {
    let sequences = stream(dir, meta, &format!("preference-{split}"))?;
    let mut pairs = Vec::new();
    for pair in sequences.chunks_exact(2) {
        let ((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)) = (&pair[0], &pair[1]);
        if chosen_ids == rejected_ids {
            skipped.identical_pair += 1;
            continue;
        }
        let (chosen, cut_chosen) = Example::new(chosen_ids, chosen_mask, context);
        let (rejected, cut_rejected) = Example::new(rejected_ids, rejected_mask, context);
        skipped.truncated += u64::from(cut_chosen || cut_rejected);
        match (chosen, rejected) {
            (Some(chosen), Some(rejected)) => pairs.push((chosen, rejected)),
            _ => skipped.prompt_too_long += 1,
        }
    }
    Ok(pairs)
}

/// Packs examples end to end into rows of `context` inputs, in order, starting a new row when
/// the next example does not fit. Attention is causal, so an example sees only earlier ones in
/// its row; fewer, fuller rows train faster on short examples.
pub fn pack(examples: Vec<Example>, context: usize) -> Vec<Example> {
    let mut rows: Vec<Example> = Vec::new();
    for example in examples {
        match rows.last_mut() {
            Some(row) if row.positions() + example.positions() <= context => {
                row.inputs.extend(example.inputs);
                row.targets.extend(example.targets);
                row.mask.extend(example.mask);
            }
            _ => rows.push(example),
        }
    }
    rows
}

/// Rows of a batch padded to the longest (padding is masked out), row-major.
pub struct Padded {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<f32>,
    pub rows: usize,
    pub seq: usize,
}

impl Padded {
    pub fn new(rows: &[&Example], pad: u32) -> Padded {
        let seq = rows.iter().map(|e| e.positions()).max().unwrap_or(1);
        let mut padded = Padded {
            inputs: Vec::with_capacity(rows.len() * seq),
            targets: Vec::with_capacity(rows.len() * seq),
            mask: Vec::with_capacity(rows.len() * seq),
            rows: rows.len(),
            seq,
        };
        for row in rows {
            let fill = seq - row.positions();
            padded.inputs.extend(row.inputs.iter().copied());
            padded.inputs.extend(std::iter::repeat_n(pad, fill));
            padded.targets.extend(row.targets.iter().copied());
            padded.targets.extend(std::iter::repeat_n(pad, fill));
            padded.mask.extend(row.mask.iter().copied());
            padded.mask.extend(std::iter::repeat_n(0.0, fill));
        }
        padded
    }

    pub fn batch(&self) -> crate::model::Batch<'_> {
        crate::model::Batch {
            inputs: &self.inputs,
            targets: &self.targets,
            mask: Some(&self.mask),
            batch: self.rows,
            seq: self.seq,
        }
    }
}

/// `count` indices below `n` drawn with `seed` (with replacement, so any batch size works).
pub fn draw(n: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count).map(|_| rng.random_range(0..n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_shift_targets_and_masks_and_fit_the_context() {
        let (example, cut) = Example::new(&[1, 2, 3, 4, 5], &[0, 0, 1, 1, 1], 8);
        let example = example.unwrap();
        assert!(!cut);
        assert_eq!(example.inputs, [1, 2, 3, 4]);
        assert_eq!(example.targets, [2, 3, 4, 5]);
        assert_eq!(example.mask, [0.0, 1.0, 1.0, 1.0]);
        let (example, cut) = Example::new(&[1, 2, 3, 4, 5], &[0, 0, 1, 1, 1], 3);
        assert!(cut);
        assert_eq!(example.unwrap().targets, [2, 3, 4]);
        let (example, cut) = Example::new(&[1, 2, 3, 4, 5], &[0, 0, 0, 1, 1], 2);
        assert!(cut && example.is_none(), "the prompt fills the context");
    }

    #[test]
    fn packing_and_padding() {
        let e = |n: usize| Example {
            inputs: vec![7; n],
            targets: vec![8; n],
            mask: vec![1.0; n],
        };
        let rows = pack(vec![e(3), e(4), e(2), e(7)], 8);
        assert_eq!(
            rows.iter().map(Example::positions).collect::<Vec<_>>(),
            [7, 2, 7],
            "3+4, then 2 (7 more would overflow it), then 7"
        );
        let padded = Padded::new(&[&rows[1], &rows[2]], 0);
        assert_eq!((padded.rows, padded.seq), (2, 7));
        assert_eq!(padded.inputs[..7], [7, 7, 0, 0, 0, 0, 0]);
        assert_eq!(padded.mask[..7], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(padded.mask[7..], [1.0; 7]);
    }
}
