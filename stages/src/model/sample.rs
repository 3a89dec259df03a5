//! Sampling continuations from a model directory (`smelt generate`).

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use super::{AdamWConfig, DeviceKind, Trainer};

/// How to sample.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// A model directory and its tokenizer, ready to generate.
pub struct Generator {
    model: Trainer,
    tokenizer: Tokenizer,
    eos: Option<u32>,
}

impl Generator {
    pub fn open(dir: &Path) -> Result<Self, String> {
        let optimizer = AdamWConfig {
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let (model, eos) = Trainer::load(dir, DeviceKind::Cpu, optimizer)?;
        let path = dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Generator {
            model,
            tokenizer,
            eos,
        })
    }

    /// The continuation of `prompt`, stopping at the end-of-text token or `max_tokens`.
    pub fn generate(&mut self, prompt: &str, sampling: &Sampling) -> Result<String, String> {
        let encoder = crate::tokenize::Encoder::new(&self.tokenizer)?;
        let mut ids = Vec::new();
        encoder.encode(prompt, &mut ids)?;
        if ids.is_empty() {
            ids.extend(self.eos);
        }
        if ids.is_empty() {
            return Err(
                "the prompt is empty and the model has no end-of-text token to start from".into(),
            );
        }
        let config = self.model.config();
        let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
        let prompt_len = ids.len();
        for _ in 0..sampling.max_tokens {
            let window = &ids[ids.len().saturating_sub(config.seq_len)..];
            let logits = self.model.logits(window, 1, window.len());
            let last = &logits[(window.len() - 1) * config.vocab_size..];
            let next = pick(last, sampling, &mut rng);
            if Some(next) == self.eos {
                break;
            }
            ids.push(next);
        }
        self.tokenizer
            .decode(&ids[prompt_len..], true)
            .map_err(|e| format!("cannot decode: {e}"))
    }
}

/// The next token from one position's logits.
fn pick(logits: &[f32], sampling: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let greedy = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if sampling.temperature <= 0.0 {
        return greedy();
    }
    let mut candidates: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
    if let Some(k) = sampling.top_k.filter(|&k| k > 0 && k < candidates.len()) {
        candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        candidates.truncate(k);
    }
    let max = candidates
        .iter()
        .map(|c| c.1)
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = candidates
        .iter()
        .map(|c| f64::from((c.1 - max) / sampling.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (candidate, weight) in candidates.iter().zip(&weights) {
        draw -= weight;
        if draw <= 0.0 {
            return candidate.0 as u32;
        }
    }
    candidates.last().map_or_else(greedy, |c| c.0 as u32)
}
