//! The architectures the model layer runs — GPT-2 and the Llama family — behind one face, so
//! that the engine (training, evaluation, adapters, checkpoints) is written once for both.

use std::path::Path;

use dfdx::prelude::*;

use super::gpt::Gpt;
use super::io;
use super::kernels::{Kernels, Precision};
use super::layers::{Dropout, ParamVisitor, Visit, A2};
use super::llama::{Llama, LlamaConfig};
use super::lora::{LoraConfig, LoraTarget};
use super::quant::QuantKind;
use super::GptConfig;

/// A model's sizes and options, whatever its architecture.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    Gpt(GptConfig),
    Llama(LlamaConfig),
}

impl From<GptConfig> for ModelConfig {
    fn from(config: GptConfig) -> Self {
        ModelConfig::Gpt(config)
    }
}

impl From<LlamaConfig> for ModelConfig {
    fn from(config: LlamaConfig) -> Self {
        ModelConfig::Llama(config)
    }
}

impl ModelConfig {
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    /// The longest context the model takes: GPT-2's position table, a Llama's
    /// `max_position_embeddings`.
    pub fn context(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.seq_len,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    /// Dropout on embeddings and residual branches (the Llama family trains without).
    pub fn dropout(&self) -> f32 {
        match self {
            ModelConfig::Gpt(c) => c.dropout,
            ModelConfig::Llama(_) => 0.0,
        }
    }

    /// The linear layers adapters can target.
    pub fn lora_targets(&self) -> &'static [LoraTarget] {
        match self {
            ModelConfig::Gpt(_) => &LoraTarget::GPT,
            ModelConfig::Llama(_) => &LoraTarget::LLAMA,
        }
    }

    /// What the model is, in a few words, for messages and model cards.
    pub fn family(&self) -> &'static str {
        match self {
            ModelConfig::Gpt(_) => "GPT-2",
            ModelConfig::Llama(_) => "Llama-family",
        }
    }

    pub fn check(&self) -> Result<(), String> {
        match self {
            ModelConfig::Gpt(c) => c.check(),
            ModelConfig::Llama(c) => c.check(),
        }
    }

    /// The weights a model of these sizes holds, or `None` when too many to count in a usize:
    /// a config.json is checked against its weights file before anything is allocated.
    pub fn checked_weights(&self) -> Option<usize> {
        match self {
            ModelConfig::Gpt(c) => c.checked_weights(),
            ModelConfig::Llama(c) => c.checked_weights(),
        }
    }

    /// The weights of the linear layers and embeddings (norms and biases aside): what FLOP
    /// counts are based on when only some of them train.
    pub fn weights(&self) -> usize {
        self.checked_weights().unwrap_or(usize::MAX)
    }

    /// Training FLOPs per token with `parameters` trainable parameters and a context of `seq`:
    /// 6 per parameter (forward and backward) plus attention's scores and weighted sums, as
    /// nanoGPT and PaLM count them.
    pub fn flops_per_token(&self, parameters: usize, seq: usize) -> f64 {
        let (layers, width) = match self {
            ModelConfig::Gpt(c) => (c.layers, c.d_model),
            ModelConfig::Llama(c) => (c.layers, c.heads * c.head_dim),
        };
        6.0 * parameters as f64 + 12.0 * (layers * seq * width) as f64
    }

    /// config.json as transformers reads it.
    pub fn hf_config(&self, eos_id: u32) -> serde_json::Value {
        match self {
            ModelConfig::Gpt(c) => io::hf_config(c, eos_id),
            ModelConfig::Llama(c) => io::llama_hf_config(c, eos_id),
        }
    }

    /// The config.json of an HF model directory — GPT-2 (`model_type` gpt2) or the Llama
    /// family (llama, mistral, qwen2) — or a GGUF file's metadata, and its end-of-text id when
    /// it names one.
    pub fn read(dir: &Path) -> Result<(ModelConfig, Option<u32>), String> {
        if super::gguf::is_gguf(dir) {
            let file = super::gguf::Gguf::read(dir)?;
            let config = file
                .llama_config()
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            return Ok((config.into(), file.eos_id()));
        }
        let path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        ModelConfig::parse(&text, &path)
    }

    /// [`ModelConfig::read`] on the text of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<(ModelConfig, Option<u32>), String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
        match value["model_type"].as_str() {
            Some("llama" | "mistral" | "qwen2") => {
                let eos = io::eos_id(&value);
                Ok((io::parse_llama_config(&value, path)?.into(), eos))
            }
            _ => io::parse_hf_config(text, path).map(|(c, eos)| (c.into(), eos)),
        }
    }
}

/// A model of either architecture on device `D`.
pub enum Model<D: Device<f32>> {
    Gpt(Gpt<D>),
    Llama(Llama<D>),
}

/// Runs `$body` with `$m` bound to the model, whatever its architecture.
macro_rules! either {
    ($model:expr, $m:ident => $body:expr) => {
        match $model {
            Model::Gpt($m) => $body,
            Model::Llama($m) => $body,
        }
    };
}

impl<D: Kernels> Model<D> {
    /// A model with fresh weights.
    pub fn new(dev: &D, config: ModelConfig) -> Self {
        match config {
            ModelConfig::Gpt(c) => Model::Gpt(Gpt::new(dev, c)),
            ModelConfig::Llama(c) => Model::Llama(Llama::new(dev, c)),
        }
    }

    pub fn config(&self) -> ModelConfig {
        match self {
            Model::Gpt(m) => m.config.clone().into(),
            Model::Llama(m) => m.config.clone().into(),
        }
    }

    /// Logits `(batch·seq, vocab)` for token ids `(batch, seq)`.
    pub fn forward<T: Tape<f32, D>>(
        &self,
        ids: Tensor<(usize, usize), usize, D, T>,
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        either!(self, m => m.forward(ids, dropout))
    }

    /// The log-probability `(batch·seq,)` of each target id after `ids`.
    pub fn target_log_probs<T: Tape<f32, D>>(
        &self,
        ids: Tensor<(usize, usize), usize, D, T>,
        targets: Tensor<(usize,), usize, D>,
        dropout: &mut Dropout,
    ) -> Tensor<(usize,), f32, D, T> {
        either!(self, m => m.target_log_probs(ids, targets, dropout))
    }

    pub fn set_precision(&mut self, precision: Precision) {
        either!(self, m => m.precision = precision)
    }

    /// Freezes the model and adds LoRA adapters; an error for a target the architecture does
    /// not have.
    pub fn add_lora(&mut self, config: &LoraConfig, seed: u64) -> Result<(), String> {
        let model = self.config();
        let known = model.lora_targets();
        if let Some(target) = config.targets.iter().find(|t| !known.contains(t)) {
            let names: Vec<&str> = known.iter().map(|t| t.name()).collect();
            return Err(format!(
                "a {} model has no `{}` layers to adapt: its targets are {}",
                model.family(),
                target.name(),
                names.join(", ")
            ));
        }
        either!(self, m => m.add_lora(config, seed));
        Ok(())
    }

    pub fn quantize_frozen(&mut self, kind: QuantKind, block: usize) -> (usize, usize) {
        either!(self, m => m.quantize_frozen(kind, block))
    }

    pub fn merge_lora(&mut self) {
        either!(self, m => m.merge_lora())
    }

    pub fn parameters(&mut self) -> usize {
        either!(self, m => m.parameters())
    }
}

#[cfg(test)]
impl<D: Device<f32>> Model<D> {
    /// The GPT-2 model (tests reach into its tensors).
    pub fn gpt(&mut self) -> &mut Gpt<D> {
        match self {
            Model::Gpt(m) => m,
            Model::Llama(_) => panic!("not a GPT-2 model"),
        }
    }

    /// The Llama model (tests reach into its tensors).
    pub fn llama(&mut self) -> &mut Llama<D> {
        match self {
            Model::Llama(m) => m,
            Model::Gpt(_) => panic!("not a Llama model"),
        }
    }
}

impl<D: Kernels> Visit<D> for Model<D> {
    fn visit<V: ParamVisitor<D>>(&mut self, v: &mut V) {
        either!(self, m => Visit::visit(m, v))
    }

    fn hf_transposed(&self) -> fn(&str) -> bool {
        either!(self, m => m.hf_transposed())
    }
}
