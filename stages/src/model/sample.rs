//! A model directory ready to use: encoding, scoring (log-probabilities) and generation, for
//! `smelt generate` and the `evaluate` stage.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use super::{AdamWConfig, Backend, DecodeState, DeviceKind, ModelConfig, Trainer};
use crate::tokenize::{shipped, ChatFormat, ChatTemplate, Encoder, Shipped};

/// How to sample.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy(max_tokens: usize) -> Self {
        Sampling {
            max_tokens,
            temperature: 0.0,
            top_k: None,
            seed: 0,
        }
    }
}

/// A model directory (config.json, model.safetensors, tokenizer.json), loaded.
pub struct LoadedModel {
    pub(super) model: Trainer,
    pub tokenizer: Tokenizer,
    encoder: Encoder,
    pub config: ModelConfig,
    pub eos: Option<u32>,
    /// Where generation ends besides `eos`: generation_config.json's `eos_token_id` (a list
    /// for Llama 3: end of text and end of turn).
    pub stops: Vec<u32>,
    /// The chat template and special tokens that came with the model.
    pub shipped: Shipped,
    /// The longest context the model is run on: its own, unless a caller shortens it.
    pub context: usize,
}

impl LoadedModel {
    pub fn open(dir: &Path) -> Result<Self, String> {
        let optimizer = AdamWConfig::UNUSED;
        let (mut model, eos) = Trainer::load(dir, DeviceKind::Cpu, optimizer)?;
        let (tokenizer, shipped) = if super::gguf::is_gguf(dir) {
            let file = super::gguf::Gguf::read(dir)?;
            let json = file.tokenizer_json()?;
            let tokenizer = Tokenizer::from_bytes(json.to_string().as_bytes())
                .map_err(|e| format!("{}: its tokenizer: {e}", dir.display()))?;
            (tokenizer, shipped::from_gguf(&file))
        } else {
            let path = dir.join("tokenizer.json");
            let tokenizer =
                Tokenizer::from_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            (tokenizer, shipped::in_dir(dir)?)
        };
        let config = model.config();
        if tokenizer.get_vocab_size(true) > config.vocab_size() {
            return Err(format!(
                "{}: the tokenizer has {} tokens, the model only {}",
                dir.display(),
                tokenizer.get_vocab_size(true),
                config.vocab_size()
            ));
        }
        let encoder = Encoder::new(&tokenizer)?;
        Ok(LoadedModel {
            model,
            tokenizer,
            encoder,
            context: config.context(),
            config,
            eos,
            stops: generation_stops(dir)?,
            shipped,
        })
    }

    /// How this model renders conversations: `template` if given, else its own.
    pub fn chat_format(&self, template: Option<&ChatTemplate>) -> Result<ChatFormat, String> {
        ChatFormat::resolve(template, &self.shipped)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        self.encoder.encode(text, &mut ids)?;
        Ok(ids)
    }

    /// The tokenizer's encoder, for callers that encode piece by piece (chat templates).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| format!("cannot decode: {e}"))
    }

    /// `log p(ids[t + 1] | ids[..= t])` for every `t` (see [`log_probs`]).
    pub fn log_probs(&mut self, ids: &[u32]) -> Vec<f32> {
        log_probs(&mut self.model, ids)
    }

    /// Sum of `log p(continuation | context)` (the context is cut from the left to fit).
    pub fn continuation_log_prob(&mut self, context: &[u32], continuation: &[u32]) -> f64 {
        let ids: Vec<u32> = context.iter().chain(continuation).copied().collect();
        let ids = &ids[ids.len().saturating_sub(self.context + 1)..];
        let scored = self.log_probs(ids);
        let n = continuation.len().min(scored.len());
        scored[scored.len() - n..]
            .iter()
            .map(|&x| f64::from(x))
            .sum()
    }

    /// Continues `ids` until a token of `stop`, the end-of-text token or `max_tokens`; returns
    /// the new ids. The model runs on the prompt once, then on each new token (its keys and
    /// values cached); past the model's context it starts again on the last positions.
    pub fn continue_ids(&mut self, ids: &[u32], sampling: &Sampling, stop: &[u32]) -> Vec<u32> {
        let (context, vocab) = (self.context, self.config.vocab_size());
        let mut ids = ids.to_vec();
        let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
        let start = ids.len();
        let mut state = DecodeState::default();
        let mut logits = self
            .model
            .decode(&ids[ids.len().saturating_sub(context)..], &mut state);
        for _ in 0..sampling.max_tokens {
            let next = pick(&logits[logits.len() - vocab..], sampling, &mut rng);
            if Some(next) == self.eos || self.stops.contains(&next) || stop.contains(&next) {
                break;
            }
            ids.push(next);
            logits = if state.positions() < context {
                self.model.decode(&[next], &mut state)
            } else {
                state = DecodeState::default();
                let window = &ids[ids.len().saturating_sub(context)..];
                self.model.decode(window, &mut state)
            };
        }
        ids.split_off(start)
    }

    /// The assistant's answer to `prompt` as a user's turn, rendered with the model's own chat
    /// template; it ends at the template's end of turn.
    pub fn answer(&mut self, prompt: &str, sampling: &Sampling) -> Result<String, String> {
        let chat = self.chat_format(None)?;
        let user = crate::records::Message {
            role: "user".into(),
            content: prompt.into(),
        };
        let ids = chat.generation_prompt(&self.encoder, &[user])?;
        let stop: Vec<u32> = chat.end_of_turn(&self.encoder)?.into_iter().collect();
        let new = self.continue_ids(&ids, sampling, &stop);
        self.decode(&new)
    }

    /// The continuation of `prompt`, stopping at the end-of-text token or `max_tokens`.
    pub fn generate(&mut self, prompt: &str, sampling: &Sampling) -> Result<String, String> {
        let mut ids = self.encode(prompt)?;
        if ids.is_empty() {
            ids.extend(self.eos);
        }
        if ids.is_empty() {
            return Err(
                "the prompt is empty and the model has no end-of-text token to start from".into(),
            );
        }
        let new = self.continue_ids(&ids, sampling, &[]);
        self.decode(&new)
    }
}

/// generation_config.json's `eos_token_id`s, if the directory has one.
fn generation_stops(dir: &Path) -> Result<Vec<u32>, String> {
    let path = dir.join("generation_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(_) => return Ok(Vec::new()),
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(super::io::eos_ids(&value))
}

/// `log p(ids[t + 1] | ids[..= t])` for every `t`, in one forward pass over all but the last
/// id (so at most `seq_len + 1` ids).
pub fn log_probs(model: &mut Trainer, ids: &[u32]) -> Vec<f32> {
    if ids.len() < 2 {
        return Vec::new();
    }
    let vocab = model.config().vocab_size();
    let inputs = &ids[..ids.len() - 1];
    let logits = model.logits(inputs, 1, inputs.len());
    (0..inputs.len())
        .map(|t| {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
            row[ids[t + 1] as usize] - max - sum.ln()
        })
        .collect()
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
