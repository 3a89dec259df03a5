//! The model layer: GPT-2 on dfdx behind a small interface. Stages use [`Backend`] (forward,
//! backward, optimizer step, evaluation, save and load; [`Trainer`] implements it on dfdx) and
//! [`GptConfig`]; no dfdx type leaves
//! this module, so the backend can change without touching them.
//!
//! - `gpt.rs`: the model, nanoGPT-style, with a visitor naming every tensor by its HF name;
//! - `optim.rs`: AdamW with clipping and accumulation;
//! - `io.rs`: HF model directories (config.json, model.safetensors);
//! - `kernels/`: the fused kernels (linear with GELU or residual, LayerNorm, causal attention,
//!   the output head with the targets' log-softmax) behind one trait, per device;
//! - `lora.rs`: LoRA adapters; `quant.rs`: quantized frozen
//!   weights (QLoRA); `peft.rs`: adapters in PEFT's layout;
//! - `preference.rs`: DPO, IPO and hinge losses;
//! - `sample.rs`: generation.

mod architecture;
pub mod gguf;
mod gpt;
pub mod hub;
pub mod io;
mod kernels;
mod layers;
mod llama;
mod lora;
mod optim;
pub mod peft;
mod preference;
mod quant;
pub mod sample;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use dfdx::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use architecture::Model;
pub use architecture::ModelConfig;
use kernels::Kernels;
pub use kernels::{uses_amx, Precision};
use layers::{mean_nll, Dropout};
pub use llama::{LlamaConfig, Member};
pub use lora::{LoraConfig, LoraTarget};
use optim::AdamW;
pub use optim::AdamWConfig;
pub use preference::{PreferenceLoss, PreferenceLossKind, PreferenceStats};
pub use quant::QuantKind;

/// Runs `work` on `model` on one of rayon's threads, when the model is on the CPU, and waits
/// for it, with rayon's other threads kept awake for it (`keep_taking_work`). The kernels'
/// parallel loops then start inside the pool: no helper is woken and no caller put to sleep
/// around every op, which pays on small models (bench/training-speed.md, attempts 4 and 12).
/// A CUDA model runs `work` on the calling thread.
pub fn on_compute_threads<R: Send>(
    model: &mut dyn Backend,
    work: impl FnOnce(&mut dyn Backend) -> R + Send,
) -> R {
    if !model.on_cpu() {
        return work(model);
    }
    /// A CPU model on its way to a rayon thread.
    struct Crossing<'a>(&'a mut dyn Backend);
    // SAFETY: `Trainer` is the only `Backend`, and on the CPU it holds an `Engine<Cpu>`, which
    // is `Send` (asserted below); only dfdx's CUDA device is not (its stream handle), and a
    // CUDA model does not cross (checked above).
    unsafe impl Send for Crossing<'_> {}
    impl<'a> Crossing<'a> {
        fn into_model(self) -> &'a mut dyn Backend {
            self.0
        }
    }
    let crossing = Crossing(model);
    let done = &AtomicBool::new(false);
    rayon::scope(|scope| {
        let caller = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(move |_| keep_taking_work(done, caller));
        }
        // Set on the way out, a panic included, or the scope would wait for the helpers forever.
        // The step's thread also drops the kernel outputs it remembered (`kernels::cpu`).
        struct Finish<'a>(&'a AtomicBool);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
                kernels::forget_outputs();
            }
        }
        let _finish = Finish(done);
        work(crossing.into_model())
    })
}

/// Keeps one of rayon's threads taking the step's parallel work as it appears, until `done`.
/// A thread that finds no work parks after a moment, and waking it costs a system call on each
/// side; a step's kernels open a parallel region every few dozen microseconds, so the other
/// threads stay awake through it (config A: ~9% of samples were wake-ups and task switches).
fn keep_taking_work(done: &AtomicBool, caller: Option<usize>) {
    // The step's own thread may pick this job up while it waits for a join: it must not spin
    // under the step it is part of.
    if rayon::current_thread_index() == caller {
        return;
    }
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle = 0;
        } else if idle < 1_000 {
            idle += 1;
            std::hint::spin_loop();
        } else {
            // Idle a while (a serial stretch of the step): let other processes' threads in.
            std::thread::yield_now();
        }
    }
}

const _: () = {
    fn assert_send<T: Send>() {}
    let _ = assert_send::<Engine<Cpu>>;
};

/// The sizes of a GPT-2 model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Context length (positions).
    pub seq_len: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub dropout: f32,
    /// Biases in linear layers and LayerNorms (without, they stay zero and untrained).
    pub bias: bool,
    /// The output head shares the token embedding.
    pub tied_head: bool,
}

impl GptConfig {
    pub fn check(&self) -> Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("seq_len", self.seq_len),
            ("d_model", self.d_model),
            ("layers", self.layers),
            ("heads", self.heads),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, n)| *n == 0) {
            return Err(format!("`{name}` must be at least 1"));
        }
        if let Some(problem) = heads_problem(self.d_model, self.heads) {
            return Err(problem);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("`dropout` must be in [0, 1), not {}", self.dropout));
        }
        Ok(())
    }

    /// The weights of the model, biases and LayerNorms aside: what FLOP counts are based on
    /// when only some of them train.
    pub fn weights(&self) -> usize {
        let d = self.d_model;
        12 * self.layers * d * d + (self.vocab_size + self.seq_len) * d
    }

    /// [`weights`](Self::weights), or `None` when the sizes are too large to count in a
    /// `usize`.
    pub fn checked_weights(&self) -> Option<usize> {
        let d = self.d_model;
        let blocks = self
            .layers
            .checked_mul(d)?
            .checked_mul(d)?
            .checked_mul(12)?;
        let tables = self.vocab_size.checked_add(self.seq_len)?.checked_mul(d)?;
        blocks.checked_add(tables)
    }

    /// Training FLOPs per token: 6 per parameter (forward and backward) plus attention's
    /// scores and weighted sums over the full context, as nanoGPT and PaLM count them.
    pub fn flops_per_token(&self, parameters: usize) -> f64 {
        6.0 * parameters as f64 + 12.0 * (self.layers * self.seq_len * self.d_model) as f64
    }
}

/// Why `heads` attention heads cannot split a width of `d_model` (each head takes an equal
/// share), if they cannot.
pub fn heads_problem(d_model: usize, heads: usize) -> Option<String> {
    (heads > 0 && !d_model.is_multiple_of(heads)).then(|| {
        format!("`d_model` ({d_model}) must be divisible by `heads` ({heads}): each head takes an equal share of it")
    })
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// NVIDIA GPUs through cudarc; needs a build with the `cuda` feature.
    Cuda,
}

/// Writes a Llama-family `model` as a GGUF file llama.cpp runs, with `tokenizer` (a byte-level
/// BPE tokenizer.json), its chat template (Jinja) and end-of-text id `eos`: matrices as F16
/// or Q8_0, norms as F32.
pub fn export_gguf(
    model: &mut dyn Backend,
    path: &Path,
    tokenizer: &serde_json::Value,
    chat_template: Option<&str>,
    eos: u32,
    kind: gguf::ExportType,
) -> Result<(), String> {
    let ModelConfig::Llama(config) = model.config() else {
        return Err("GGUF export is for Llama-family models; this is a GPT-2".into());
    };
    let tensors: io::Tensors = model
        .weights()
        .into_iter()
        .map(|(name, shape, values)| (name, (shape, values)))
        .collect();
    gguf::write(path, &config, &tensors, tokenizer, chat_template, eos, kind)
}

/// What generation keeps between steps of one sequence: a Llama's keys and values (each step
/// then runs on the new token alone); for GPT-2, whose kernels have no cache yet, the ids so
/// far (each step runs on them all).
#[derive(Default)]
pub struct DecodeState {
    cache: llama::KvCache,
    ids: Vec<u32>,
}

impl DecodeState {
    /// The positions seen so far.
    pub fn positions(&self) -> usize {
        self.cache.positions().max(self.ids.len())
    }
}

/// A batch of token ids, `batch × seq`, row-major, with next-token targets of the same shape.
pub struct Batch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [u32],
    /// Per target: 1 to train on it, 0 to skip it (prompts, padding). `None`: all count.
    pub mask: Option<&'a [f32]>,
    pub batch: usize,
    pub seq: usize,
}

/// A GPT with its optimizer on a device: what the training stages use.
pub struct Trainer {
    session: Session,
}

enum Session {
    Cpu(Box<Engine<Cpu>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<Engine<Cuda>>),
}

/// Runs `$body` with `$engine` bound to the session's engine, whatever its device.
macro_rules! on_device {
    ($trainer:expr, $engine:ident => $body:expr) => {
        match &mut $trainer.session {
            Session::Cpu($engine) => $body,
            #[cfg(feature = "cuda")]
            Session::Cuda($engine) => $body,
        }
    };
}

impl Trainer {
    /// A freshly initialised model (deterministic for `seed`).
    pub fn new(
        config: impl Into<ModelConfig>,
        device: DeviceKind,
        seed: u64,
        optimizer: AdamWConfig,
    ) -> Result<Self, String> {
        let config = config.into();
        config.check()?;
        let session = match device {
            DeviceKind::Cpu => Session::Cpu(Box::new(Engine::new(
                Cpu::seed_from_u64(seed),
                config,
                optimizer,
            ))),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => Session::Cuda(Box::new(Engine::new(
                Cuda::seed_from_u64(seed),
                config,
                optimizer,
            ))),
            #[cfg(not(feature = "cuda"))]
            DeviceKind::Cuda => {
                return Err("`device: cuda` needs smelt built with `--features cuda`".into());
            }
        };
        Ok(Trainer { session })
    }

    /// A model read from an HF model directory — config.json (GPT-2 or the Llama family) and
    /// model.safetensors, or the shards a model.safetensors.index.json lists — or from a GGUF
    /// file (`*.gguf`).
    pub fn load(
        dir: &Path,
        device: DeviceKind,
        optimizer: AdamWConfig,
    ) -> Result<(Self, Option<u32>), String> {
        if gguf::is_gguf(dir) {
            let file = gguf::Gguf::read(dir)?;
            let config = file
                .llama_config()
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            let tensors = file
                .hf_tensors(&config)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            let eos = file.eos_id();
            return Self::from_tensors(config, &tensors, device, optimizer)
                .map(|trainer| (trainer, eos))
                .map_err(|e| format!("{}: {e}", dir.display()));
        }
        let (config, eos) = ModelConfig::read(dir)?;
        let tensors = io::read_model_weights(dir)?;
        Self::from_tensors(config, &tensors, device, optimizer)
            .map(|trainer| (trainer, eos))
            .map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// A model of `config`'s sizes holding `tensors` (by HF name).
    ///
    /// The sizes come from a user's config.json, and the model is allocated before its
    /// weights are checked one by one: so they are first checked against the number of values
    /// the tensors hold, which bounds what a wrong (or hostile) config can make it allocate by
    /// the size of the weights file.
    pub fn from_tensors(
        config: impl Into<ModelConfig>,
        tensors: &io::Tensors,
        device: DeviceKind,
        optimizer: AdamWConfig,
    ) -> Result<Self, String> {
        let config = config.into();
        config.check()?;
        let held: usize = tensors.values().map(|(_, values)| values.len()).sum();
        match config.checked_weights() {
            Some(needed) if needed <= held => {}
            needed => {
                let needed = needed.map_or_else(|| "more".into(), |n| n.to_string());
                return Err(format!(
                    "config.json describes a model of {needed} weights, but the file holds \
                     {held} values"
                ));
            }
        }
        let mut trainer = Trainer::new(config, device, 0, optimizer)?;
        trainer.set_weights(tensors)?;
        Ok(trainer)
    }
}

/// What training and evaluation stages need from a model backend. [`Trainer`] implements it on
/// dfdx; stages hold a `Trainer` or a `&mut dyn Backend` and never see dfdx types.
pub trait Backend {
    fn config(&mut self) -> ModelConfig;
    /// The model is on the CPU (its kernels run on rayon's pool).
    fn on_cpu(&self) -> bool;
    /// Trainable parameters.
    fn parameters(&mut self) -> usize;
    /// Forward and backward on one micro-batch; its gradients, times `weight`, are added to
    /// those of the step. `dropout_seed` draws the dropout masks. Returns the loss.
    fn accumulate(&mut self, batch: &Batch, weight: f32, dropout_seed: u64) -> f32;
    /// Clips the accumulated gradients to `max_norm` and applies AdamW with `lr`; returns the
    /// gradient norm before clipping.
    fn step(&mut self, lr: f64, max_norm: Option<f32>) -> f32;
    /// Mean loss without gradients (evaluation).
    fn loss(&mut self, batch: &Batch) -> f32;
    /// Logits `(batch·seq, vocab)` for ids `(batch, seq)`, row-major.
    fn logits(&mut self, ids: &[u32], batch: usize, seq: usize) -> Vec<f32>;
    /// Logits `(ids.len(), vocab)` of `ids` following those `state` has seen (one sequence),
    /// which it then holds too: generation feeds the prompt, then each new token.
    fn decode(&mut self, ids: &[u32], state: &mut DecodeState) -> Vec<f32>;
    /// Every weight by HF name (trainable or not).
    fn weights(&mut self) -> io::Named;
    fn set_weights(&mut self, tensors: &io::Tensors) -> Result<(), String>;
    /// The optimizer's moments by parameter name (`<name>.m`, `<name>.v`) and its step count.
    fn optimizer_state(&mut self) -> (io::Named, i32);
    fn restore_optimizer(&mut self, tensors: &io::Tensors, t: i32) -> Result<(), String>;
    /// What the linear layers' matrix multiplies compute in from now on; bf16 is CPU only.
    fn set_precision(&mut self, precision: Precision) -> Result<(), String>;

    /// Freezes the model and adds LoRA adapters (they start as the identity update); an error
    /// for a target the architecture does not have.
    fn add_lora(&mut self, config: &LoraConfig, seed: u64) -> Result<(), String>;
    /// Stores the frozen linear weights quantized; returns (bytes now, bytes in f32).
    fn quantize_frozen(&mut self, kind: QuantKind, block: usize) -> (usize, usize);
    /// Folds the adapters into the weights.
    fn merge_lora(&mut self);
    /// Per row: the sum (or, with `average`, the mean) of the masked targets' log-probs.
    fn sequence_log_probs(&mut self, batch: &Batch, average: bool) -> Vec<f32>;
    /// Forward and backward of a preference loss on rows `[chosen, rejected]` per pair, given
    /// the reference model's scores of the same rows; gradients are added times `weight`.
    fn accumulate_preference(
        &mut self,
        batch: &Batch,
        reference: &[f32],
        loss: &PreferenceLoss,
        weight: f32,
        dropout_seed: u64,
    ) -> PreferenceStats;

    /// Writes `config.json` and `model.safetensors` in HF layout (GPT-2 or the model's member
    /// of the Llama family).
    fn save_hf(&mut self, dir: &Path, eos_id: u32) -> Result<(), String> {
        let config = self.config().hf_config(eos_id);
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{}: {e}", dir.display()))?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        io::write_safetensors(
            &dir.join("model.safetensors"),
            &self.weights(),
            Some(metadata),
        )
    }
}

impl Backend for Trainer {
    fn config(&mut self) -> ModelConfig {
        on_device!(self, e => e.model.config())
    }

    fn on_cpu(&self) -> bool {
        matches!(self.session, Session::Cpu(_))
    }

    fn parameters(&mut self) -> usize {
        on_device!(self, e => e.model.parameters())
    }

    fn accumulate(&mut self, batch: &Batch, weight: f32, dropout_seed: u64) -> f32 {
        on_device!(self, e => e.accumulate(batch, weight, dropout_seed))
    }

    fn step(&mut self, lr: f64, max_norm: Option<f32>) -> f32 {
        on_device!(self, e => e.step(lr, max_norm))
    }

    fn loss(&mut self, batch: &Batch) -> f32 {
        on_device!(self, e => e.loss(batch))
    }

    fn logits(&mut self, ids: &[u32], batch: usize, seq: usize) -> Vec<f32> {
        on_device!(self, e => e.logits(ids, batch, seq))
    }

    fn set_precision(&mut self, precision: Precision) -> Result<(), String> {
        match &mut self.session {
            Session::Cpu(e) => {
                if precision == Precision::Bf16 && !uses_amx() {
                    tracing::warn!(
                        "this CPU (or its kernel) offers no AMX tiles: bf16 products round their \
                         inputs and run on the f32 GEMM, slower than f32 itself"
                    );
                }
                e.model.set_precision(precision);
            }
            #[cfg(feature = "cuda")]
            Session::Cuda(_) if precision == Precision::Bf16 => {
                return Err(
                    "`train.precision: bf16` runs on the CPU only; use f32 with `device: cuda`"
                        .into(),
                );
            }
            #[cfg(feature = "cuda")]
            Session::Cuda(_) => {}
        }
        Ok(())
    }

    fn decode(&mut self, ids: &[u32], state: &mut DecodeState) -> Vec<f32> {
        on_device!(self, e => e.decode(ids, state))
    }

    fn weights(&mut self) -> io::Named {
        on_device!(self, e => io::weights(&mut e.model))
    }

    fn set_weights(&mut self, tensors: &io::Tensors) -> Result<(), String> {
        on_device!(self, e => {
            e.weights_changed();
            io::set_weights(&mut e.model, tensors)
        })
    }

    fn optimizer_state(&mut self) -> (io::Named, i32) {
        on_device!(self, e => (e.optimizer.moments(&mut e.model), e.optimizer.t))
    }

    fn restore_optimizer(&mut self, tensors: &io::Tensors, t: i32) -> Result<(), String> {
        let find = |name: &str| tensors.get(name).map(|(_, data)| data.clone());
        on_device!(self, e => e.optimizer.restore(&mut e.model, t, &find))
    }

    fn add_lora(&mut self, config: &LoraConfig, seed: u64) -> Result<(), String> {
        on_device!(self, e => {
            e.weights_changed();
            e.model.add_lora(config, seed)?;
            e.lora_dropout = config.dropout;
            Ok(())
        })
    }

    fn quantize_frozen(&mut self, kind: QuantKind, block: usize) -> (usize, usize) {
        on_device!(self, e => {
            e.weights_changed();
            e.model.quantize_frozen(kind, block)
        })
    }

    fn merge_lora(&mut self) {
        on_device!(self, e => {
            e.weights_changed();
            e.model.merge_lora()
        })
    }

    fn sequence_log_probs(&mut self, batch: &Batch, average: bool) -> Vec<f32> {
        on_device!(self, e => e.sequence_log_probs(batch, average))
    }

    fn accumulate_preference(
        &mut self,
        batch: &Batch,
        reference: &[f32],
        loss: &PreferenceLoss,
        weight: f32,
        dropout_seed: u64,
    ) -> PreferenceStats {
        on_device!(self, e => e.accumulate_preference(batch, reference, loss, weight, dropout_seed))
    }
}

/// Tokens the loss counts in the chosen rows (even rows) of a preference batch.
fn chosen_tokens(batch: &Batch) -> f32 {
    let rows = (0..batch.batch).step_by(2);
    match batch.mask {
        Some(mask) => rows
            .map(|r| mask[r * batch.seq..(r + 1) * batch.seq].iter().sum::<f32>())
            .sum(),
        None => (rows.count() * batch.seq) as f32,
    }
}

/// The device-generic part of [`Trainer`].
struct Engine<D: Kernels> {
    device: D,
    model: Model<D>,
    optimizer: AdamW<D>,
    /// The step's gradients so far; between steps, empty entries for the parameters (see
    /// `step`).
    gradients: Gradients<f32, D>,
    /// Whether a micro-batch has added to `gradients` since the last step.
    accumulated: bool,
    /// Dropout on adapter inputs.
    lora_dropout: f32,
}

impl<D: Kernels> Engine<D> {
    fn new(device: D, config: ModelConfig, optimizer: AdamWConfig) -> Self {
        Engine {
            model: Model::new(&device, config),
            optimizer: AdamW::new(optimizer),
            gradients: Gradients::leaky(),
            accumulated: false,
            lora_dropout: 0.0,
            device,
        }
    }

    fn ids(&self, ids: &[u32], batch: usize, seq: usize) -> Tensor<(usize, usize), usize, D> {
        self.device
            .tensor_from_vec(ids.iter().map(|&i| i as usize).collect(), (batch, seq))
    }

    fn targets(&self, batch: &Batch) -> Tensor<(usize,), usize, D> {
        self.device.tensor_from_vec(
            batch.targets.iter().map(|&i| i as usize).collect(),
            (batch.batch * batch.seq,),
        )
    }

    fn mask(&self, batch: &Batch) -> Option<Tensor<(usize,), f32, D>> {
        batch
            .mask
            .map(|m| self.device.tensor_from_vec(m.to_vec(), (m.len(),)))
    }

    fn dropout(&self, seed: u64) -> Dropout {
        Dropout::seeded(self.model.config().dropout(), self.lora_dropout, seed)
    }

    fn accumulate(&mut self, batch: &Batch, weight: f32, dropout_seed: u64) -> f32 {
        let ids = self
            .ids(batch.inputs, batch.batch, batch.seq)
            .traced(Gradients::leaky());
        let mut dropout = self.dropout(dropout_seed);
        let log_probs = self
            .model
            .target_log_probs(ids, self.targets(batch), &mut dropout);
        let loss = mean_nll(log_probs, self.mask(batch));
        let value = loss.as_vec()[0];
        self.add_gradients(loss.backward(), weight);
        value
    }

    /// Per-row masked log-prob sums `(batch,)` (means with `average`), on the ids' tape.
    fn row_log_probs<T: Tape<f32, D>>(
        &self,
        ids: Tensor<(usize, usize), usize, D, T>,
        batch: &Batch,
        average: bool,
        dropout: &mut Dropout,
    ) -> Tensor<(usize,), f32, D, T> {
        let ones = vec![1.0; batch.targets.len()];
        let mask = batch.mask.unwrap_or(&ones);
        let masked = self
            .model
            .target_log_probs(ids, self.targets(batch), dropout)
            * self.device.tensor_from_vec(mask.to_vec(), (mask.len(),));
        let sums = masked
            .reshape_like(&(batch.batch, batch.seq))
            .sum::<(usize,), Axis<1>>();
        let scale: Vec<f32> = mask
            .chunks(batch.seq)
            .map(|row| {
                if average {
                    1.0 / row.iter().sum::<f32>().max(1.0)
                } else {
                    1.0
                }
            })
            .collect();
        sums * self.device.tensor_from_vec(scale, (batch.batch,))
    }

    fn sequence_log_probs(&mut self, batch: &Batch, average: bool) -> Vec<f32> {
        let ids = self.ids(batch.inputs, batch.batch, batch.seq);
        self.row_log_probs(ids, batch, average, &mut Dropout::off())
            .as_vec()
    }

    fn accumulate_preference(
        &mut self,
        batch: &Batch,
        reference: &[f32],
        loss: &PreferenceLoss,
        weight: f32,
        dropout_seed: u64,
    ) -> PreferenceStats {
        let pairs = batch.batch / 2;
        let ids = self.ids(batch.inputs, batch.batch, batch.seq);
        let mut dropout = self.dropout(dropout_seed);
        let scores = self.row_log_probs(
            ids.traced(Gradients::leaky()),
            batch,
            loss.averages(),
            &mut dropout,
        );
        let policy = scores.as_vec();
        // Per pair, [chosen − rejected, chosen]: the margin and, for RPO, the chosen score,
        // taken from one tensor so that each feeds the tape once.
        let columns = self
            .device
            .tensor_from_vec(vec![1.0, 1.0, -1.0, 0.0], (2, 2));
        let by_pair = scores.reshape_like(&(pairs, 2)).matmul(columns);
        let difference = by_pair
            .with_empty_tape()
            .slice((.., 0..1))
            .reshape_like(&(pairs,));
        let chosen = by_pair.slice((.., 1..2)).reshape_like(&(pairs,));
        let reference_margin: Vec<f32> = reference.chunks(2).map(|r| r[0] - r[1]).collect();
        let margin = difference - self.device.tensor_from_vec(reference_margin, (pairs,));
        // Per token: a mean score is already per token; a summed one is divided by the chosen
        // answers' tokens in the batch, as cross-entropy averages.
        let per_token = if loss.averages() {
            pairs as f32
        } else {
            chosen_tokens(batch).max(1.0)
        };
        let nll = chosen.sum::<Rank0, _>() * (-loss.nll_weight / per_token);
        let value = loss.mean(margin) + nll;
        let stats = loss.stats(&policy, reference, value.as_vec()[0]);
        self.add_gradients(value.backward(), weight);
        stats
    }

    /// Adds a micro-batch's gradients times `weight` to the step's. The step's first takes
    /// over the buffers instead: no zero fill, no pass over them at all when `weight` is 1.
    fn add_gradients(&mut self, mut gradients: Gradients<f32, D>, weight: f32) {
        let how = match self.accumulated {
            false => optim::Join::Take,
            true => optim::Join::Add,
        };
        optim::join(
            &mut self.model,
            &mut self.gradients,
            &mut gradients,
            weight,
            how,
        );
        self.accumulated = true;
    }

    fn step(&mut self, lr: f64, max_norm: Option<f32>) -> f32 {
        if !self.accumulated {
            // Nothing added since the last step: the gradients are zero, not the last ones.
            self.gradients = Gradients::leaky();
        }
        let norm = self
            .optimizer
            .step(&mut self.model, &mut self.gradients, lr, max_norm);
        // Nothing parameter-sized stays allocated until the next step: the entries stay, empty,
        // for the next step's first micro-batch to swap its buffers into.
        if !optim::release(&mut self.model, &mut self.gradients) {
            self.gradients = Gradients::leaky();
        }
        self.accumulated = false;
        norm
    }

    /// After the parameters were replaced or changed outside training: the optimizer restarts
    /// from them, and the (empty) entries kept for parameters that may no longer exist go.
    fn weights_changed(&mut self) {
        self.optimizer.weights_changed();
        if !self.accumulated {
            self.gradients = Gradients::leaky();
        }
    }

    fn loss(&mut self, batch: &Batch) -> f32 {
        let ids = self.ids(batch.inputs, batch.batch, batch.seq);
        let log_probs = self
            .model
            .target_log_probs(ids, self.targets(batch), &mut Dropout::off());
        mean_nll(log_probs, self.mask(batch)).as_vec()[0]
    }

    fn logits(&mut self, ids: &[u32], batch: usize, seq: usize) -> Vec<f32> {
        let ids = self.ids(ids, batch, seq);
        self.model.forward(ids, &mut Dropout::off()).as_vec()
    }

    fn decode(&mut self, ids: &[u32], state: &mut DecodeState) -> Vec<f32> {
        if let Model::Llama(model) = &self.model {
            let ids = self.ids(ids, 1, ids.len());
            return model.decode(ids, &mut state.cache).as_vec();
        }
        state.ids.extend_from_slice(ids);
        let context = self.model.config().context();
        let window = &state.ids[state.ids.len().saturating_sub(context)..];
        let logits = self.logits(window, 1, window.len());
        let new = ids.len().min(window.len()) * self.model.config().vocab_size();
        logits[logits.len() - new..].to_vec()
    }
}

#[cfg(test)]
mod llama_tests;
#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(tied_head: bool) -> GptConfig {
        GptConfig {
            vocab_size: 11,
            seq_len: 6,
            d_model: 8,
            layers: 2,
            heads: 2,
            dropout: 0.0,
            bias: true,
            tied_head,
        }
    }

    pub(super) fn adamw() -> AdamWConfig {
        AdamWConfig {
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    pub(super) fn batch_ids() -> (Vec<u32>, Vec<u32>) {
        let inputs = vec![1, 4, 2, 9, 3, 7, 0, 5, 5, 10, 2, 8];
        let targets = vec![4, 2, 9, 3, 7, 1, 5, 5, 10, 2, 8, 6];
        (inputs, targets)
    }

    pub(super) type Pick = fn(&mut Model<Cpu>) -> &mut Tensor<(usize, usize), f32, Cpu>;

    /// Checks the step's gradient of each picked matrix against central finite differences of
    /// the loss, at its `top` largest elements (elsewhere f32 noise dominates), the largest
    /// being above `floor`.
    pub(super) fn check_against_finite_differences(
        engine: &mut Engine<Cpu>,
        batch: &Batch,
        matrices: &[(&str, Pick)],
        (top, floor): (usize, f32),
        case: &str,
    ) {
        let mut grads = std::mem::replace(&mut engine.gradients, Gradients::leaky());
        engine.accumulated = false;
        for &(name, pick) in matrices {
            let analytic = grads
                .get_or_alloc_mut(pick(&mut engine.model))
                .unwrap()
                .to_vec();
            let mut order: Vec<usize> = (0..analytic.len()).collect();
            order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
            assert!(analytic[order[0]].abs() > floor, "{name}: no gradient");
            for &i in &order[..top] {
                let original = pick(&mut engine.model).as_vec();
                let mut at = |delta: f32| {
                    let mut changed = original.clone();
                    changed[i] += delta;
                    pick(&mut engine.model).copy_from(&changed);
                    engine.loss(batch)
                };
                let h = 1e-3;
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                pick(&mut engine.model).copy_from(&original);
                // f32 rounding of the loss puts a floor of about 1e-4 under the difference.
                let allowed = 1e-2 * analytic[i].abs() + 2e-4;
                assert!(
                    (numeric - analytic[i]).abs() < allowed,
                    "{name}[{i}] ({case}): numeric {numeric}, analytic {}",
                    analytic[i]
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for tied in [true, false] {
            let mut engine = Engine::new(Cpu::seed_from_u64(3), tiny(tied).into(), adamw());
            let (inputs, targets) = batch_ids();
            let batch = Batch {
                inputs: &inputs,
                targets: &targets,
                mask: None,
                batch: 2,
                seq: 6,
            };
            engine.accumulate(&batch, 1.0, 0);
            let matrices: [(&str, Pick); 4] = [
                ("wte", |m| &mut m.gpt().wte),
                ("wpe", |m| &mut m.gpt().wpe),
                ("h.0.attn.c_attn", |m| &mut m.gpt().h[0].attn.c_attn.weight),
                ("h.1.mlp.c_proj", |m| &mut m.gpt().h[1].mlp.c_proj.weight),
            ];
            let case = format!("tied {tied}");
            check_against_finite_differences(&mut engine, &batch, &matrices, (4, 0.0), &case);
        }
    }

    /// The same check for adapters over a frozen (and here also quantized) base: the gradient
    /// reaches A and B through every frozen layer.
    #[test]
    fn adapter_gradients_match_finite_differences() {
        for quantize in [false, true] {
            let mut engine = Engine::new(Cpu::seed_from_u64(3), tiny(true).into(), adamw());
            engine.model.add_lora(&lora(&ALL_TARGETS), 5).unwrap();
            if quantize {
                engine.model.quantize_frozen(QuantKind::Int8, 16);
            }
            // B = 0 would make A's gradient zero: start from a trained-looking adapter.
            for block in &mut engine.model.gpt().h {
                let lora = block.attn.c_attn.lora.as_mut().unwrap();
                let b: Vec<f32> = (0..lora.b.shape().num_elements())
                    .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.05)
                    .collect();
                lora.b.copy_from(&b);
            }
            let (inputs, targets) = batch_ids();
            let batch = Batch {
                inputs: &inputs,
                targets: &targets,
                mask: None,
                batch: 2,
                seq: 6,
            };
            engine.accumulate(&batch, 1.0, 0);
            let matrices: [(&str, Pick); 3] = [
                ("h.0.attn.c_attn.lora_A", |m| {
                    &mut m.gpt().h[0].attn.c_attn.lora.as_mut().unwrap().a
                }),
                ("h.0.mlp.c_fc.lora_B", |m| {
                    &mut m.gpt().h[0].mlp.c_fc.lora.as_mut().unwrap().b
                }),
                ("h.1.attn.c_proj.lora_B", |m| {
                    &mut m.gpt().h[1].attn.c_proj.lora.as_mut().unwrap().b
                }),
            ];
            let case = format!("quantized {quantize}");
            check_against_finite_differences(&mut engine, &batch, &matrices, (3, 1e-3), &case);
        }
    }

    /// A CPU model's steps run on a rayon thread (so the kernels start inside the pool).
    #[test]
    fn cpu_steps_run_inside_rayon_s_pool() {
        let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 1, adamw()).unwrap();
        assert!(model.on_cpu());
        let outside = rayon::current_thread_index();
        let inside = on_compute_threads(&mut model, |_| rayon::current_thread_index());
        assert!(outside.is_none() && inside.is_some());
    }

    #[test]
    fn a_step_that_panics_releases_the_helper_threads() {
        // The helpers spin until the step ends; a panic must end it too, not hang the caller.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 1, adamw()).unwrap();
            let outcome = pool.install(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    on_compute_threads(&mut model, |_| panic!("a failing step"))
                }))
            });
            let helped = pool.install(|| on_compute_threads(&mut model, |_| (0..64).sum::<u32>()));
            sender.send((outcome.is_err(), helped)).unwrap();
        });
        let (panicked, after) = receiver
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("on_compute_threads hung after a panic");
        assert!(panicked);
        assert_eq!(after, 2016);
    }

    #[test]
    fn a_later_token_never_changes_earlier_logits() {
        let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 1, adamw()).unwrap();
        let ids = [3, 1, 4, 1, 5, 9];
        let mut changed = ids;
        changed[4] = 2;
        let before = model.logits(&ids, 1, 6);
        let after = model.logits(&changed, 1, 6);
        assert_eq!(
            before[..4 * 11],
            after[..4 * 11],
            "positions 0..4 see only the past"
        );
        assert_ne!(before[4 * 11..], after[4 * 11..]);
    }

    #[test]
    fn one_batch_is_learnt_by_heart() {
        let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 2, adamw()).unwrap();
        let (inputs, targets) = batch_ids();
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            mask: None,
            batch: 2,
            seq: 6,
        };
        let first = model.loss(&batch);
        for _ in 0..150 {
            model.accumulate(&batch, 1.0, 0);
            model.step(2e-2, Some(1.0));
        }
        let last = model.loss(&batch);
        assert!(first > 2.0 && last < 0.1, "loss {first} → {last}");
    }

    #[test]
    fn weights_written_between_steps_are_the_ones_the_next_step_updates() {
        let tensors = |named: io::Named| -> io::Tensors {
            named.into_iter().map(|(n, s, d)| (n, (s, d))).collect()
        };
        // The CPU update works on its own copy of the weights; loading others must reach it.
        let mut trained = Trainer::new(tiny(true), DeviceKind::Cpu, 2, adamw()).unwrap();
        train_steps(&mut trained, 3);
        let mut other = Trainer::new(tiny(true), DeviceKind::Cpu, 7, adamw()).unwrap();
        trained.set_weights(&tensors(other.weights())).unwrap();
        let (moments, t) = trained.optimizer_state();
        other.restore_optimizer(&tensors(moments), t).unwrap();
        train_steps(&mut trained, 1);
        train_steps(&mut other, 1);
        assert_eq!(trained.weights(), other.weights());
    }

    #[test]
    fn a_saved_model_loads_back_bit_for_bit() {
        for tied in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut model = Trainer::new(tiny(tied), DeviceKind::Cpu, 4, adamw()).unwrap();
            model.save_hf(dir.path(), 0).unwrap();
            let names: Vec<String> = io::read_safetensors(&dir.path().join("model.safetensors"))
                .unwrap()
                .into_keys()
                .collect();
            assert_eq!(names.contains(&"lm_head.weight".to_string()), !tied);
            assert!(names.contains(&"transformer.h.1.attn.c_attn.weight".to_string()));
            let (mut loaded, eos) = Trainer::load(dir.path(), DeviceKind::Cpu, adamw()).unwrap();
            assert_eq!(eos, Some(0));
            assert_eq!(loaded.config(), model.config());
            let ids = [1, 2, 3, 4, 5, 6];
            assert_eq!(loaded.logits(&ids, 1, 6), model.logits(&ids, 1, 6));
            assert_eq!(loaded.weights(), model.weights());
        }
    }

    #[test]
    fn a_missing_or_misshapen_tensor_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 4, adamw()).unwrap();
        model.save_hf(dir.path(), 0).unwrap();
        let path = dir.path().join("model.safetensors");
        let mut tensors = model.weights();
        tensors.retain(|(name, _, _)| name != "transformer.ln_f.bias");
        for (name, shape, data) in &mut tensors {
            if name == "transformer.h.0.mlp.c_fc.weight" {
                *shape = vec![32, 8];
                *data = vec![0.0; 256];
            }
        }
        io::write_safetensors(&path, &tensors, None).unwrap();
        let err = Trainer::load(dir.path(), DeviceKind::Cpu, adamw())
            .err()
            .unwrap();
        assert!(err.contains("`transformer.ln_f.bias` is missing"), "{err}");
        assert!(
            err.contains(
                "`transformer.h.0.mlp.c_fc.weight` has shape [32, 8], the model needs [8, 32]"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_config_larger_than_its_weights_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 4, adamw()).unwrap();
        model.save_hf(dir.path(), 0).unwrap();
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        // About 4 TB of weights, or more than a usize counts: refused, nothing allocated.
        for (embd, heads) in [(1u64 << 20, 1u64 << 10), (1 << 62, 1 << 10)] {
            config["n_embd"] = embd.into();
            config["n_head"] = heads.into();
            std::fs::write(&path, config.to_string()).unwrap();
            let err = Trainer::load(dir.path(), DeviceKind::Cpu, adamw())
                .err()
                .unwrap();
            assert!(err.contains("config.json describes a model of"), "{err}");
        }
    }

    /// A fixture's token ids (2 rows of 8, flattened) and the logits transformers computed.
    /// The ids and logits of a fixture's logits.json, flattened (GPT-2's are lists of rows,
    /// the Llama fixtures' nested by sequence and position).
    pub(super) fn fixture_logits(dir: &Path) -> (Vec<u32>, Vec<f32>) {
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("logits.json")).unwrap()).unwrap();
        let ids = flat(&fixture["ids"])
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let logits = flat(&fixture["logits"])
            .into_iter()
            .map(|x| x as f32)
            .collect();
        (ids, logits)
    }

    /// Every number of nested JSON lists, in order.
    pub(super) fn flat(value: &serde_json::Value) -> Vec<f64> {
        match value {
            serde_json::Value::Array(items) => items.iter().flat_map(flat).collect(),
            number => vec![number.as_f64().unwrap()],
        }
    }

    pub(super) fn worst_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Tiny models saved by transformers, with the logits it computed (tests/fixtures).
    #[test]
    fn transformers_models_give_transformers_logits() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for name in ["gpt2-tiny-tied", "gpt2-tiny-untied"] {
            let dir = fixtures.join(name);
            let (mut model, _) = Trainer::load(&dir, DeviceKind::Cpu, adamw()).unwrap();
            let (ids, reference) = fixture_logits(&dir);
            let worst = worst_difference(&model.logits(&ids, 2, 8), &reference);
            assert!(worst < 1e-5, "{name}: logits differ by up to {worst}");
        }
    }

    /// The tiny model of the export fixture: seeded, then a few optimizer steps so that biases and
    /// LayerNorm weights are not at their initial values.
    fn exported_tiny() -> Trainer {
        let config = GptConfig {
            vocab_size: 16,
            seq_len: 8,
            ..tiny(true)
        };
        let mut model = Trainer::new(config, DeviceKind::Cpu, 11, adamw()).unwrap();
        train_three_steps(&mut model, (7, 5));
        model
    }

    /// Three steps on two rows of 8 ids, input `i` being `i · a mod 16` and its target
    /// `i · b mod 16`.
    pub(super) fn train_three_steps(model: &mut Trainer, (a, b): (usize, usize)) {
        let inputs: Vec<u32> = (0..16).map(|i| (i * a % 16) as u32).collect();
        let targets: Vec<u32> = (0..16).map(|i| (i * b % 16) as u32).collect();
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            mask: None,
            batch: 2,
            seq: 8,
        };
        for _ in 0..3 {
            model.accumulate(&batch, 1.0, 0);
            model.step(5e-2, Some(1.0));
        }
    }

    /// `train_three_steps`' inputs and targets for multipliers `(a, b)`.
    fn rows(a: usize, b: usize) -> (Vec<u32>, Vec<u32>) {
        let inputs = (0..16).map(|i| (i * a % 16) as u32).collect();
        let targets = (0..16).map(|i| (i * b % 16) as u32).collect();
        (inputs, targets)
    }

    fn batch_of<'a>((inputs, targets): &'a (Vec<u32>, Vec<u32>), rows: usize) -> Batch<'a> {
        Batch {
            inputs,
            targets,
            mask: None,
            batch: rows,
            seq: inputs.len() / rows,
        }
    }

    /// A step's first micro-batch hands its gradient buffers over instead of being added to
    /// zeros: the halves of a batch, weighted ½, must still step like the whole batch, and a
    /// step with nothing accumulated must see zero gradients, not the last step's.
    #[test]
    fn micro_batches_add_up_and_a_step_starts_from_zero() {
        let config = GptConfig {
            vocab_size: 16,
            seq_len: 8,
            ..tiny(true)
        };
        let new = || Trainer::new(config.clone(), DeviceKind::Cpu, 11, adamw()).unwrap();
        let (first, second) = (rows(3, 5), rows(7, 3));
        let halves = [
            (first.0[..8].to_vec(), first.1[..8].to_vec()),
            (second.0[8..].to_vec(), second.1[8..].to_vec()),
        ];
        let both = (
            [&halves[0].0[..], &halves[1].0[..]].concat(),
            [&halves[0].1[..], &halves[1].1[..]].concat(),
        );
        let mut split = new();
        for half in &halves {
            split.accumulate(&batch_of(half, 1), 0.5, 0);
        }
        split.step(5e-2, Some(1.0));
        let mut joined = new();
        joined.accumulate(&batch_of(&both, 2), 1.0, 0);
        joined.step(5e-2, Some(1.0));
        let flat = |model: &mut Trainer| -> Vec<f32> {
            model
                .weights()
                .into_iter()
                .flat_map(|(_, _, v)| v)
                .collect()
        };
        let worst = worst_difference(&flat(&mut split), &flat(&mut joined));
        assert!(worst < 1e-4, "halves and whole differ by up to {worst}");

        // Another step with nothing accumulated, against one after a zero-weight micro-batch.
        let mut idle = new();
        let mut zeroed = new();
        for model in [&mut idle, &mut zeroed] {
            model.accumulate(&batch_of(&both, 2), 1.0, 0);
            model.step(5e-2, Some(1.0));
        }
        idle.step(5e-2, Some(1.0));
        zeroed.accumulate(&batch_of(&both, 2), 0.0, 0);
        zeroed.step(5e-2, Some(1.0));
        let worst = worst_difference(&flat(&mut idle), &flat(&mut zeroed));
        assert_eq!(
            worst, 0.0,
            "an idle step used stale gradients (off by up to {worst})"
        );
    }

    /// Writes tests/fixtures/gpt2-smelt-export (run by make_gpt2_fixture.py, which then adds the
    /// logits transformers computes for it).
    #[test]
    #[ignore]
    fn write_export_fixture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2-smelt-export");
        std::fs::create_dir_all(&dir).unwrap();
        exported_tiny().save_hf(&dir, 0).unwrap();
    }

    /// A model smelt exports gives, in transformers, the logits smelt computes.
    #[test]
    fn exported_models_give_the_logits_transformers_computes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2-smelt-export");
        let (ids, reference) = fixture_logits(&dir);
        let out = tempfile::tempdir().unwrap();
        exported_tiny().save_hf(out.path(), 0).unwrap();
        let (mut model, _) = Trainer::load(out.path(), DeviceKind::Cpu, adamw()).unwrap();
        let worst = worst_difference(&model.logits(&ids, 2, 8), &reference);
        assert!(
            worst < 1e-4,
            "logits differ from transformers' by up to {worst}"
        );
    }

    pub(super) fn lora(targets: &[LoraTarget]) -> LoraConfig {
        LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: targets.to_vec(),
        }
    }

    const ALL_TARGETS: [LoraTarget; 4] = [
        LoraTarget::AttnCAttn,
        LoraTarget::AttnCProj,
        LoraTarget::MlpCFc,
        LoraTarget::MlpCProj,
    ];

    pub(super) fn train_steps(model: &mut Trainer, steps: usize) {
        let (inputs, targets) = batch_ids();
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            mask: None,
            batch: 2,
            seq: 6,
        };
        for _ in 0..steps {
            model.accumulate(&batch, 1.0, 0);
            model.step(1e-2, Some(1.0));
        }
    }

    #[test]
    fn a_fresh_adapter_leaves_the_model_exactly_as_it_was() {
        let mut model = Trainer::new(tiny(false), DeviceKind::Cpu, 5, adamw()).unwrap();
        let ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8];
        let before = model.logits(&ids, 2, 6);
        model.add_lora(&lora(&ALL_TARGETS), 1).unwrap();
        assert_eq!(model.logits(&ids, 2, 6), before, "B = 0: the same logits");
        // r·(in + out) per adapted layer: c_attn 2·(8+24), c_proj 2·(8+8), c_fc 2·(8+32),
        // mlp.c_proj 2·(32+8); two layers.
        assert_eq!(model.parameters(), 2 * 2 * (32 + 16 + 40 + 40));
    }

    #[test]
    fn only_adapters_train_and_merging_keeps_the_function() {
        let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 6, adamw()).unwrap();
        let base = model.weights();
        model
            .add_lora(&lora(&[LoraTarget::AttnCAttn, LoraTarget::MlpCFc]), 2)
            .unwrap();
        let ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8];
        let untrained = model.logits(&ids, 2, 6);
        train_steps(&mut model, 20);
        let adapted = model.logits(&ids, 2, 6);
        assert!(
            worst_difference(&adapted, &untrained) > 1e-3,
            "adapters learnt"
        );
        let weights = model.weights();
        for (name, _, data) in &base {
            let now = weights.iter().find(|(n, _, _)| n == name).unwrap();
            assert_eq!(&now.2, data, "{name} is frozen");
        }
        model.merge_lora();
        let merged = model.weights();
        assert_eq!(merged.len(), base.len(), "no adapter tensors after merging");
        let worst = worst_difference(&model.logits(&ids, 2, 6), &adapted);
        assert!(worst < 1e-5, "merged logits differ by {worst}");
    }

    #[test]
    fn quantized_bases_stay_close_and_still_train() {
        for (kind, tolerance) in [(QuantKind::Int8, 0.01), (QuantKind::Nf4, 0.1)] {
            let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 7, adamw()).unwrap();
            let ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8];
            let dense = model.logits(&ids, 2, 6);
            model.add_lora(&lora(&ALL_TARGETS), 3).unwrap();
            let (bytes, f32_bytes) = model.quantize_frozen(kind, 16);
            assert!(
                bytes * 3 < f32_bytes,
                "{kind:?}: {bytes} of {f32_bytes} bytes"
            );
            let quantized = model.logits(&ids, 2, 6);
            let worst = worst_difference(&quantized, &dense);
            assert!(worst > 0.0 && worst < tolerance, "{kind:?}: {worst}");
            train_steps(&mut model, 5);
            let trained = model.logits(&ids, 2, 6);
            model.merge_lora();
            let worst = worst_difference(&model.logits(&ids, 2, 6), &trained);
            assert!(worst < 1e-5, "{kind:?}: merged logits differ by {worst}");
        }
    }

    /// The DPO loss on a tiny model equals the formula evaluated by hand on its sequence
    /// scores; a few steps then raise the chosen answers over the rejected ones.
    #[test]
    fn the_dpo_loss_is_the_formula_and_training_widens_the_margin() {
        let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 8, adamw()).unwrap();
        // Two pairs: rows chosen, rejected, chosen, rejected; the first two targets are prompt.
        let inputs = [
            1, 2, 3, 4, 5, 6, 1, 2, 7, 8, 9, 0, 4, 4, 2, 2, 6, 6, 4, 4, 3, 3, 0, 0,
        ];
        let targets = [
            2, 3, 4, 5, 6, 7, 2, 7, 8, 9, 0, 1, 4, 2, 2, 6, 6, 5, 4, 3, 3, 0, 0, 9,
        ];
        let mut mask = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0].repeat(4);
        mask[23] = 0.0; // padding
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            mask: Some(&mask),
            batch: 4,
            seq: 6,
        };
        let reference = [-9.0, -8.5, -10.0, -9.0];
        let loss = PreferenceLoss {
            kind: PreferenceLossKind::Sigmoid,
            beta: 0.5,
            label_smoothing: 0.0,
            nll_weight: 0.0,
        };
        let policy = model.sequence_log_probs(&batch, false);
        let by_hand: f64 = (0..2)
            .map(|i| {
                let h = f64::from(
                    (policy[2 * i] - reference[2 * i]) - (policy[2 * i + 1] - reference[2 * i + 1]),
                );
                -(1.0 / (1.0 + (-0.5 * h).exp())).ln()
            })
            .sum::<f64>()
            / 2.0;
        let stats = model.accumulate_preference(&batch, &reference, &loss, 1.0, 0);
        assert!(
            (f64::from(stats.loss) - by_hand).abs() < 1e-5,
            "{} vs {by_hand}",
            stats.loss
        );
        let margin = |p: &[f32]| (p[0] - p[1]) + (p[2] - p[3]);
        model.step(1e-2, Some(1.0));
        for _ in 0..10 {
            model.accumulate_preference(&batch, &reference, &loss, 1.0, 0);
            model.step(1e-2, Some(1.0));
        }
        let after = model.sequence_log_probs(&batch, false);
        assert!(
            margin(&after) > margin(&policy) + 1.0,
            "{policy:?} → {after:?}"
        );
    }

    /// RPO: the loss adds `nll_weight` times the chosen answers' mean negative log-likelihood
    /// per token, and training with it keeps the chosen answers likelier than plain DPO does.
    #[test]
    fn rpo_adds_the_chosen_answers_nll_and_keeps_them_likely() {
        let inputs = [1, 2, 3, 4, 5, 6, 1, 2, 7, 8, 9, 0];
        let targets = [2, 3, 4, 5, 6, 7, 2, 7, 8, 9, 0, 1];
        let mask = [0.0, 0.0, 1.0, 1.0, 1.0, 0.0].repeat(2);
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            mask: Some(&mask),
            batch: 2,
            seq: 6,
        };
        let reference = [-9.0, -8.5];
        let loss = |nll_weight: f32| PreferenceLoss {
            kind: PreferenceLossKind::Sigmoid,
            beta: 0.5,
            label_smoothing: 0.0,
            nll_weight,
        };
        let train = |nll_weight: f32| {
            let mut model = Trainer::new(tiny(true), DeviceKind::Cpu, 8, adamw()).unwrap();
            let policy = model.sequence_log_probs(&batch, false);
            let h = f64::from((policy[0] - reference[0]) - (policy[1] - reference[1]));
            let dpo = loss(0.0).value(h) as f32;
            let with = model.accumulate_preference(&batch, &reference, &loss(nll_weight), 1.0, 0);
            // Three answer tokens in the chosen row.
            let expected = dpo - nll_weight * policy[0] / 3.0;
            assert!(
                (with.loss - expected).abs() < 1e-5,
                "{} vs {expected}",
                with.loss
            );
            model.step(1e-2, Some(1.0));
            for _ in 0..15 {
                model.accumulate_preference(&batch, &reference, &loss(nll_weight), 1.0, 0);
                model.step(1e-2, Some(1.0));
            }
            model.sequence_log_probs(&batch, false)[0]
        };
        let (dpo, rpo) = (train(0.0), train(1.0));
        assert!(rpo > dpo + 0.5, "chosen log-prob: DPO {dpo}, RPO {rpo}");
    }

    /// The export fixture's model with adapters on every linear layer, trained a few steps so
    /// that B is not zero.
    fn adapted_tiny() -> (Trainer, LoraConfig) {
        let mut model = exported_tiny();
        let config = LoraConfig {
            r: 2,
            alpha: 6.0,
            dropout: 0.0,
            targets: ALL_TARGETS.to_vec(),
        };
        model.add_lora(&config, 4).unwrap();
        train_three_steps(&mut model, (3, 11));
        (model, config)
    }

    /// Writes tests/fixtures/gpt2-lora: `adapter/` in PEFT's layout and `merged/` (run by
    /// make_gpt2_fixture.py, which adds the logits peft and transformers compute; the base is
    /// gpt2-smelt-export).
    #[test]
    #[ignore]
    fn write_lora_fixture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2-lora");
        write_lora_fixture_dir(&dir, adapted_tiny(), "gpt2-smelt-export", 0);
    }

    /// `dir/adapter`, the adapter of `adapted` in PEFT's layout (on `base`), and `dir/merged`,
    /// the model with it merged (end-of-text id `eos`).
    pub(super) fn write_lora_fixture_dir(
        dir: &Path,
        (mut model, config): (Trainer, LoraConfig),
        base: &str,
        eos: u32,
    ) {
        peft::write_adapter(&dir.join("adapter"), &config, &model.weights(), base).unwrap();
        model.merge_lora();
        std::fs::create_dir_all(dir.join("merged")).unwrap();
        model.save_hf(&dir.join("merged"), eos).unwrap();
    }

    /// peft loads smelt's adapter onto the base and computes smelt's logits; transformers
    /// computes the same for the merged model.
    #[test]
    fn peft_and_transformers_agree_with_adapted_and_merged_models() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2-lora");
        check_lora_fixture(
            &dir,
            adapted_tiny(),
            "gpt2-smelt-export",
            "make_gpt2_fixture.py",
        );
    }

    /// peft loads the adapter smelt writes for `adapted` on its base (`base`, as the fixture's
    /// adapter_config names it) and computes smelt's logits; transformers computes the same for
    /// the merged model. The fixture directory `dir` holds the adapter peft loaded and the
    /// logits (made by `script`).
    pub(super) fn check_lora_fixture(
        dir: &Path,
        (mut model, config): (Trainer, LoraConfig),
        base: &str,
        script: &str,
    ) {
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("logits.json")).unwrap()).unwrap();
        let floats =
            |key: &str| -> Vec<f32> { flat(&fixture[key]).iter().map(|&x| x as f32).collect() };
        let ids: Vec<u32> = floats("ids").into_iter().map(|x| x as u32).collect();
        let out = tempfile::tempdir().unwrap();
        peft::write_adapter(out.path(), &config, &model.weights(), base).unwrap();
        // Byte for byte (not as a diff of the bytes: unreadable, and megabytes long).
        let written = std::fs::read(out.path().join("adapter_model.safetensors")).unwrap();
        let committed = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
        assert!(
            written == committed,
            "the adapter peft loaded is not the one smelt writes: after a change to the \
             numerics, rerun tests/fixtures/{script}"
        );
        let worst = worst_difference(&model.logits(&ids, 2, 8), &floats("peft"));
        assert!(worst < 1e-4, "peft's logits differ by up to {worst}");
        model.merge_lora();
        let worst = worst_difference(&model.logits(&ids, 2, 8), &floats("merged"));
        assert!(
            worst < 1e-4,
            "transformers' merged logits differ by up to {worst}"
        );
    }

    #[test]
    fn sizes_are_checked() {
        let config = GptConfig {
            d_model: 10,
            heads: 4,
            ..tiny(true)
        };
        let err = Trainer::new(config, DeviceKind::Cpu, 0, adamw())
            .err()
            .unwrap();
        assert!(
            err.contains("`d_model` (10) must be divisible by `heads` (4)"),
            "{err}"
        );
    }
}
