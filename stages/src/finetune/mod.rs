//! `finetune`: supervised fine-tuning of a GPT-2 on conversations, the loss on answer tokens
//! only (the mask `tokenize` writes). `method: full` trains every weight; `lora` freezes the
//! base and trains adapters; `qlora` also stores the frozen base block-quantized. The output is
//! a merged HF model directory, plus the adapter in PEFT's layout (`adapter/`).
//!
//! The pieces `dpo` shares live here too: the base model, method and training params
//! (`AdaptParams`), [`load_base`], [`train_and_write`], and the examples (`examples.rs`).

pub mod examples;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{
    Dep, InputDirs, Metrics, ParamProblem, Port, Ports, Stage, StageContext, StageError,
};

use crate::model::{
    gguf, hub, peft, Backend, DeviceKind, LoraConfig, LoraTarget, ModelConfig, QuantKind, Trainer,
};
use crate::params::{non_empty_schema, some_non_empty, Fraction, Positive};
use crate::tokenize::Meta;
use crate::training::{self, EvalParams, Extras, Objective, Outcome, Settings, TrainParams};
use examples::{draw, Example, Padded, Skipped};

pub struct Finetune;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FinetuneParams {
    /// Pack short examples end to end into full rows (faster on short chats).
    #[serde(default)]
    pub packing: bool,
    #[serde(flatten)]
    pub adapt: AdaptParams,
}

/// Where the base model comes from, how it is adapted and trained (shared with `dpo`).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct AdaptParams {
    /// An HF model directory (GPT-2, or the Llama family: Llama, Mistral, Qwen2, SmolLM2) or
    /// a Llama-family GGUF file, relative to the pipeline file, or `hf://org/name[@revision]`
    /// for a model already in the Hugging Face cache; used when no `model` input is wired (its
    /// files are hashed into the stage key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub lora: LoraParams,
    /// How `qlora` stores the frozen base.
    #[serde(default)]
    pub quantize: QuantizeParams,
    #[serde(default)]
    pub train: TrainParams,
    #[serde(default)]
    pub eval: EvalParams,
    /// `cpu`, or `cuda` in a build with the `cuda` feature.
    #[serde(default)]
    pub device: DeviceKind,
    /// The hardware's peak FLOP/s, for MFU in metrics.jsonl.
    #[serde(default = "training::default_peak_flops")]
    pub peak_flops: Positive,
    /// The longest example in tokens, prompt and answer together (longer prompts are skipped
    /// and counted, longer answers cut). Default: the base model's context, which for a Llama
    /// is its `max_position_embeddings` (often thousands: set this on a CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<std::num::NonZeroUsize>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every weight trains.
    Full,
    /// The base is frozen; low-rank adapters train.
    #[default]
    Lora,
    /// LoRA over a base stored quantized.
    Qlora,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraParams {
    /// Rank of the update.
    #[serde(default = "default_r")]
    pub r: NonZeroUsize,
    /// The update is scaled by `alpha / r`.
    #[serde(default = "default_alpha")]
    pub alpha: f32,
    /// Dropout on the adapters' inputs.
    #[serde(default = "default_lora_dropout")]
    pub dropout: Fraction<f32>,
    /// Linear layers that get an adapter, in every block (at least one): GPT-2's `attn.c_attn`,
    /// `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`, or a Llama's `q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`, `gate_proj`, `up_proj`, `down_proj`. Default: the attention's (GPT-2:
    /// `attn.c_attn`, `attn.c_proj`; Llama: `q_proj`, `k_proj`, `v_proj`, `o_proj`).
    #[serde(
        default,
        deserialize_with = "some_non_empty",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "non_empty_schema::<LoraTarget>")]
    pub targets: Option<Vec<LoraTarget>>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuantizeParams {
    #[serde(default)]
    pub kind: QuantKind,
    /// Values per scale.
    #[serde(default = "default_block")]
    pub block_size: NonZeroUsize,
}

fn default_r() -> NonZeroUsize {
    NonZeroUsize::new(8).expect("not zero")
}
fn default_alpha() -> f32 {
    16.0
}
fn default_lora_dropout() -> Fraction<f32> {
    Fraction::of(0.05)
}
fn default_block() -> NonZeroUsize {
    NonZeroUsize::new(64).expect("not zero")
}

impl Default for LoraParams {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

impl Default for QuantizeParams {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

impl AdaptParams {
    /// The adapters for a base model of `config`'s architecture.
    fn lora_config(&self, config: &ModelConfig) -> LoraConfig {
        let targets = match (&self.lora.targets, config) {
            (Some(targets), _) => targets.clone(),
            (None, ModelConfig::Gpt(_)) => vec![LoraTarget::AttnCAttn, LoraTarget::AttnCProj],
            (None, ModelConfig::Llama(_)) => LoraTarget::LLAMA[..4].to_vec(),
        };
        LoraConfig {
            r: self.lora.r.get(),
            alpha: self.lora.alpha,
            dropout: self.lora.dropout.get(),
            targets,
        }
    }

    /// Why the base model (of `config`) cannot take the adapters asked for, if it cannot.
    fn target_problem(&self, config: &ModelConfig) -> Option<String> {
        let known = config.lora_targets();
        let targets = self
            .lora
            .targets
            .as_ref()
            .filter(|_| self.method != Method::Full)?;
        let wrong = targets.iter().find(|t| !known.contains(t))?;
        let names: Vec<&str> = known.iter().map(|t| t.name()).collect();
        Some(format!(
            "the base is a {} model, which has no `{}` layers to adapt: its targets are {}",
            config.family(),
            wrong.name(),
            names.join(", ")
        ))
    }

    /// The context examples are fitted to: `max_length`, at most the model's.
    pub fn context(&self, config: &ModelConfig) -> usize {
        let model = config.context();
        self.max_length.map_or(model, |n| n.get().min(model))
    }

    /// What the params must satisfy together and with the wiring (`finetune` and `dpo`).
    pub fn problems(&self, wired: &[&str]) -> Vec<ParamProblem> {
        let mut problems = self.train.problems();
        let model = wired.contains(&"model");
        if let Some(problem) = base_problem(model, self.base.is_some()) {
            problems.push(problem);
        }
        problems
    }

    /// The base model directory: the `model` input, or `base` next to the pipeline.
    pub fn base_dir(&self, inputs: &InputDirs, pipeline_dir: &Path) -> Result<PathBuf, String> {
        let model = inputs.get("model").and_then(|dirs| dirs.first());
        if let Some(problem) = base_problem(model.is_some(), self.base.is_some()) {
            return Err(problem.to_string());
        }
        match (model, &self.base) {
            (Some(dir), _) => Ok(dir.clone()),
            (None, base) => base_path(base.as_deref().unwrap_or_default(), pipeline_dir),
        }
    }

    /// The `finetune` and `dpo` input checks: the data has the `<streams>-train` and
    /// `<streams>-validation` streams (`chat`, `preference`), and the base model's vocabulary is
    /// the data's.
    pub fn input_problems(
        &self,
        inputs: &InputDirs,
        pipeline_dir: &Path,
        streams: &str,
    ) -> Vec<ParamProblem> {
        // The base model is the `base` param or the `model` input.
        let at_base = |message: String| match self.base {
            Some(_) => ParamProblem::new("base", message),
            None => ParamProblem::input("model", 0, message),
        };
        let Some(data) = inputs.get("data").and_then(|dirs| dirs.first()) else {
            return Vec::new();
        };
        let read = || -> Result<(ModelConfig, Meta), String> {
            let dir = self.base_dir(inputs, pipeline_dir)?;
            let (config, _) = ModelConfig::read(&dir)?;
            Ok((config, Meta::read(data)?))
        };
        let (config, meta) = match read() {
            Ok(read) => read,
            Err(e) => return vec![at_base(e)],
        };
        let mut problems: Vec<ParamProblem> = ["train", "validation"]
            .iter()
            .filter_map(|split| {
                let missing = examples::missing_stream(&meta, &format!("{streams}-{split}"))?;
                let why = if *split == "validation" {
                    "; the stage evaluates on it"
                } else {
                    ""
                };
                Some(ParamProblem::input("data", 0, format!("{missing}{why}")))
            })
            .collect();
        if let Some(problem) = self.target_problem(&config) {
            problems.push(ParamProblem::new("lora.targets", problem).or_at("method"));
        }
        // Llama-family embeddings are often padded past the tokenizer's last id (Qwen2's
        // 151936 rows for 151665 tokens); GPT-2's are exactly the vocabulary.
        let vocab = config.vocab_size();
        let fits = match config {
            ModelConfig::Gpt(_) => vocab == meta.vocab_size,
            ModelConfig::Llama(_) => meta.vocab_size <= vocab,
        };
        if !fits {
            let message = format!(
                "the base model has a vocabulary of {vocab} tokens but the data was tokenized \
                 with {} ({})",
                meta.vocab_size, meta.tokenizer
            );
            problems.push(at_base(message).help(
                "tokenize the data with the model's tokenizer (wire it as the `tokenizer` input)",
            ));
        }
        problems
    }

    /// The `base` directory's config.json is one this model layer loads (`finetune` and `dpo`
    /// [`smelt_engine::Stage::check_files`]).
    pub fn file_problems(&self, pipeline_dir: &Path) -> Vec<ParamProblem> {
        let Some(base) = &self.base else {
            return Vec::new();
        };
        let path = match base_path(base, pipeline_dir) {
            Ok(path) => path,
            Err(e) => return vec![ParamProblem::new("base", e)],
        };
        let read = if gguf::is_gguf(&path) || hub::is_hub(base) {
            ModelConfig::read(&path)
        } else {
            let shown = Path::new(base).join("config.json");
            let Ok(text) = std::fs::read_to_string(pipeline_dir.join(&shown)) else {
                return Vec::new();
            };
            ModelConfig::parse(&text, &shown)
        };
        match read {
            Ok((config, _)) => self
                .target_problem(&config)
                .map(|problem| ParamProblem::new("lora.targets", problem).or_at("base"))
                .into_iter()
                .collect(),
            Err(e) => vec![ParamProblem::new("base", e)],
        }
    }

    pub fn external_deps(&self, pipeline_dir: &Path) -> Result<Vec<Dep>, String> {
        match &self.base {
            Some(base) => base_model_deps(base, pipeline_dir),
            None => Ok(Vec::new()),
        }
    }
}

/// The files of a model a param names (`base`): a GGUF file, an HF directory next to the
/// pipeline, or `hf://org/name` in the Hugging Face cache; an error when it is not there.
pub fn base_model_deps(base: &str, pipeline_dir: &Path) -> Result<Vec<Dep>, String> {
    if hub::is_hub(base) {
        // Named as written: the cache's place on this machine stays out of the key.
        let path = hub::resolve(base)?;
        return Ok(vec![Dep {
            name: base.to_string(),
            path,
        }]);
    }
    let dir = pipeline_dir.join(base);
    if gguf::is_gguf(&dir) {
        return Ok(vec![Dep::from(PathBuf::from(base))]);
    }
    let weights = ["model.safetensors", "model.safetensors.index.json"];
    if !dir.join("config.json").is_file() {
        return Err(format!("`base`: no config.json in {base}"));
    }
    if !weights.iter().any(|file| dir.join(file).is_file()) {
        return Err(format!("`base`: no model.safetensors in {base}"));
    }
    // As written, relative to the pipeline: a key holds no absolute path.
    Ok(vec![Dep::from(PathBuf::from(base))])
}

/// Where `base` is: next to the pipeline, or in the Hugging Face cache (`hf://org/name`).
pub fn base_path(base: &str, pipeline_dir: &Path) -> Result<PathBuf, String> {
    match hub::is_hub(base) {
        true => hub::resolve(base),
        false => Ok(pipeline_dir.join(base)),
    }
}

/// Why the base model is missing or ambiguous: `model` says whether the `model` input is
/// wired, `base` whether the param is given.
fn base_problem(model: bool, base: bool) -> Option<ParamProblem> {
    match (model, base) {
        (true, true) => Some(ParamProblem::new(
            "base",
            "both a `model` input and `base` are given: keep one",
        )),
        (false, false) => Some(ParamProblem::new(
            "",
            "no base model: wire a `model` input (a pretrain, finetune or dpo stage) or set \
             `base` to an HF model directory",
        )),
        _ => None,
    }
}

/// The base model on its device (its vocabulary was checked against the data's, by
/// [`AdaptParams::input_problems`]) adapted by `method`; metrics gain the trainable
/// parameters and, for `qlora`, the base's memory.
pub fn load_base(
    method: &AdaptParams,
    ctx: &StageContext,
    metrics: &mut Metrics,
) -> Result<Trainer, String> {
    let dir = method.base_dir(&ctx.inputs, &ctx.pipeline_dir)?;
    let (mut model, _) = Trainer::load(&dir, method.device, method.train.optimizer())?;
    if method.method != Method::Full {
        let lora = method.lora_config(&model.config());
        model.add_lora(&lora, method.train.seed)?;
    }
    if method.method == Method::Qlora {
        let (bytes, f32_bytes) =
            model.quantize_frozen(method.quantize.kind, method.quantize.block_size.get());
        metrics.insert("frozen_linear_bytes".into(), bytes.into());
        metrics.insert("frozen_linear_f32_bytes".into(), f32_bytes.into());
    }
    metrics.insert("trainable_parameters".into(), model.parameters().into());
    Ok(model)
}

/// Trains `model` for `objective` with the loop's settings from `adapt`, then writes the
/// artifact; returns the loop's metrics. `stop_after` simulates an interruption (tests).
pub fn train_and_write(
    model: &mut Trainer,
    objective: &mut dyn Objective,
    adapt: &AdaptParams,
    ctx: &StageContext,
    (tokens_dir, meta): (&Path, &Meta),
    stop_after: Option<u64>,
) -> Result<Metrics, String> {
    let config = model.config();
    let settings = Settings {
        train: &adapt.train,
        eval: &adapt.eval,
        // Of the whole model, though frozen weights skip their gradient GEMMs.
        flops_per_token: config.flops_per_token(config.weights(), adapt.context(&config)),
        peak_flops: adapt.peak_flops.get(),
    };
    let outcome = training::run(model, objective, &settings, ctx, stop_after)?;
    write_outputs(model, adapt, ctx, tokens_dir, meta, &outcome)?;
    outcome.metrics(adapt.train.steps.get())
}

/// The output artifact: the adapter (PEFT layout) when there is one, then the merged HF model
/// directory, the log and the loss curve.
fn write_outputs(
    model: &mut Trainer,
    method: &AdaptParams,
    ctx: &StageContext,
    tokens_dir: &Path,
    meta: &Meta,
    outcome: &Outcome,
) -> Result<(), String> {
    let out = &ctx.out_dir;
    if method.method != Method::Full {
        let base = method.base.clone().unwrap_or_else(|| "model".into());
        let lora = method.lora_config(&model.config());
        peft::write_adapter(&out.join("adapter"), &lora, &model.weights(), &base)?;
        model.merge_lora();
    }
    training::write_model_dir(model, out, tokens_dir, meta.eos_id)?;
    outcome.write_log_and_curve(out)
}

impl Stage for Finetune {
    type Params = FinetuneParams;
    const KIND: &'static str = "finetune";
    // 2: no timings in metrics.jsonl (they are in the run record).
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "Supervised fine-tuning (full, LoRA, QLoRA) on chat data; a merged model and a PEFT adapter";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![
            Port {
                name: "model",
                required: false,
                many: false,
                doc: "the base model: a pretrain, finetune or dpo stage (or set `base`)",
            },
            Port {
                name: "data",
                required: true,
                many: false,
                doc: "a tokenize stage with conversations (chat-train, chat-validation)",
            },
        ])
    }

    fn external_deps(
        &self,
        params: &FinetuneParams,
        pipeline_dir: &Path,
    ) -> Result<Vec<Dep>, String> {
        params.adapt.external_deps(pipeline_dir)
    }

    fn check(&self, params: &FinetuneParams, wired: &[&str]) -> Vec<ParamProblem> {
        params.adapt.problems(wired)
    }

    fn check_files(&self, params: &FinetuneParams, pipeline_dir: &Path) -> Vec<ParamProblem> {
        params.adapt.file_problems(pipeline_dir)
    }

    fn input_checks(&self) -> Option<&'static str> {
        Some("the data has conversations to train and evaluate on, in the base model's vocabulary")
    }

    fn check_inputs(
        &self,
        params: &FinetuneParams,
        inputs: &InputDirs,
        pipeline_dir: &Path,
    ) -> Vec<ParamProblem> {
        params.adapt.input_problems(inputs, pipeline_dir, "chat")
    }

    fn run(&self, params: &FinetuneParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        Ok(finetune(params, ctx, None)?)
    }
}

fn finetune(
    params: &FinetuneParams,
    ctx: &StageContext,
    stop_after: Option<u64>,
) -> Result<Metrics, String> {
    let t = &params.adapt.train;
    let tokens_dir = ctx.input("data").ok_or("no `data` input")?;
    let meta = Meta::read(tokens_dir)?;
    let mut metrics = Metrics::new();
    let mut model = load_base(&params.adapt, ctx, &mut metrics)?;
    let context = params.adapt.context(&model.config());
    let mut skipped = Skipped::default();
    let mut train = examples::conversations(tokens_dir, &meta, "train", context, &mut skipped)?;
    let validation =
        examples::conversations(tokens_dir, &meta, "validation", context, &mut skipped)
            .map_err(|e| format!("{e}; fine-tuning evaluates on it"))?;
    if train.is_empty() || validation.is_empty() {
        return Err(format!(
            "no conversation fits a context of {} tokens ({} had prompts that fill it)",
            context, skipped.prompt_too_long
        ));
    }
    if params.packing {
        train = examples::pack(train, context);
    }
    let mean_len = train.iter().map(Example::positions).sum::<usize>() as f64 / train.len() as f64;
    let mut objective = Sft {
        train,
        validation: validation
            .into_iter()
            .take(params.adapt.eval.batches.get() * t.batch_size.get())
            .collect(),
        batch: t.batch_size.get(),
        pad: meta.eos_id,
        mean_len,
    };
    metrics.extend(train_and_write(
        &mut model,
        &mut objective,
        &params.adapt,
        ctx,
        (tokens_dir, &meta),
        stop_after,
    )?);
    metrics.insert("examples".into(), objective.train.len().into());
    add_skipped(&mut metrics, &skipped);
    Ok(metrics)
}

pub fn add_skipped(metrics: &mut Metrics, skipped: &Skipped) {
    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(skipped) {
        metrics.extend(map);
    }
}

/// Next-token loss on the answers of randomly drawn conversations.
struct Sft {
    train: Vec<Example>,
    /// Fixed held-out conversations, the same at every evaluation.
    validation: Vec<Example>,
    batch: usize,
    pad: u32,
    mean_len: f64,
}

impl Objective for Sft {
    fn tokens_per_micro_batch(&self) -> f64 {
        self.batch as f64 * self.mean_len
    }

    fn accumulate(&mut self, model: &mut dyn Backend, seed: u64, weight: f32) -> (f32, Extras) {
        let rows: Vec<&Example> = draw(self.train.len(), self.batch, seed)
            .into_iter()
            .map(|i| &self.train[i])
            .collect();
        let padded = Padded::new(&rows, self.pad);
        let loss = model.accumulate(&padded.batch(), weight, seed ^ 0xd20f);
        (loss, Extras::new())
    }

    fn evaluate(&mut self, model: &mut dyn Backend) -> (f32, Extras) {
        // Token-weighted over all held-out answers.
        let (mut sum, mut tokens) = (0.0f64, 0usize);
        for chunk in self.validation.chunks(self.batch) {
            let rows: Vec<&Example> = chunk.iter().collect();
            let padded = Padded::new(&rows, self.pad);
            let count: usize = chunk.iter().map(Example::trained_tokens).sum();
            sum += f64::from(model.loss(&padded.batch())) * count as f64;
            tokens += count;
        }
        ((sum / tokens.max(1) as f64) as f32, Extras::new())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::collect::synthetic::{generate, Generator};
    use crate::model::io;
    use crate::pretrain::Pretrain;
    use crate::records::Record;
    use crate::testing::{context, write_corpus};
    use crate::tokenize::Tokenize;

    /// `dir/tokens` (stories, chat, preferences; a fifth held out, plus `extra` records in
    /// train) and `dir/base`, a small GPT-2 pretrained on it.
    pub fn setup(extra: Vec<Record>) -> tempfile::TempDir {
        let gpt = serde_json::json!({ "layers": 1, "heads": 2, "d_model": 32, "seq_len": 96 });
        setup_with(extra, gpt)
    }

    /// [`setup`] with a base of the pretrain stage's `model` params.
    pub fn setup_with(extra: Vec<Record>, model: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let corpus = p.join("corpus");
        std::fs::create_dir(&corpus).unwrap();
        let mut records: Vec<Record> = generate(Generator::Stories, 60, 1).collect();
        records.extend(generate(Generator::Chat, 40, 1));
        records.extend(generate(Generator::Preferences, 40, 1));
        let validation: Vec<Record> = records.iter().step_by(5).cloned().collect();
        records.extend(extra);
        write_corpus(&corpus, &records, &validation);
        let tokens: crate::tokenize::TokenizeParams =
            serde_json::from_value(serde_json::json!({ "train": { "vocab_size": 300 } })).unwrap();
        Tokenize
            .run(
                &tokens,
                &context("tokens", &[("corpus", &corpus)], &p.join("tokens")),
            )
            .unwrap();
        let pretrain: crate::pretrain::PretrainParams = serde_json::from_value(serde_json::json!({
            "model": model,
            "train": { "steps": 20, "batch_size": 8, "warmup": 2, "lr": 3e-3 },
            "eval": { "every": 100, "batches": 1 }
        }))
        .unwrap();
        let tokens_dir = p.join("tokens");
        Pretrain
            .run(
                &pretrain,
                &context("base", &[("tokens", &tokens_dir)], &p.join("base")),
            )
            .unwrap();
        dir
    }

    pub fn params<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).unwrap()
    }

    /// Runs into `dir/<out>` (work dir `dir/<out>-work`, kept between calls).
    fn run(
        dir: &Path,
        out: &str,
        params: &FinetuneParams,
        stop_after: Option<u64>,
    ) -> Result<Metrics, String> {
        let (tokens, base) = (dir.join("tokens"), dir.join("base"));
        let mut ctx = context(out, &[("data", &tokens), ("model", &base)], &dir.join(out));
        ctx.work_dir = dir.join(format!("{out}-work"));
        std::fs::create_dir_all(&ctx.work_dir).unwrap();
        finetune(params, &ctx, stop_after)
    }

    fn lora_params(extra: serde_json::Value) -> FinetuneParams {
        let mut value = serde_json::json!({
            "method": "lora",
            "lora": { "r": 4, "alpha": 8, "dropout": 0.1, "targets": ["attn.c_attn", "mlp.c_fc"] },
            "train": { "steps": 8, "batch_size": 4, "warmup": 1, "lr": 3e-3, "checkpoint_every": 3, "log_every": 1 },
            "eval": { "every": 4, "batches": 2 }
        });
        for (k, v) in extra.as_object().unwrap() {
            value[k] = v.clone();
        }
        params(value)
    }

    #[test]
    fn lora_writes_a_peft_adapter_and_a_merged_model() {
        let dir = setup(Vec::new());
        let metrics = run(dir.path(), "sft", &lora_params(serde_json::json!({})), None).unwrap();
        // r·(in+out) for c_attn (32+96) and c_fc (32+128), one layer.
        assert_eq!(metrics["trainable_parameters"], 4 * (128 + 160));
        assert!(metrics["examples"].as_u64().unwrap() > 20);
        let out = dir.path().join("sft");
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["fan_in_fan_out"], true);
        assert_eq!(
            config["target_modules"],
            serde_json::json!(["attn.c_attn", "mlp.c_fc"])
        );
        let adapter = io::read_safetensors(&out.join("adapter/adapter_model.safetensors")).unwrap();
        let a = &adapter["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"];
        let b = &adapter["base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"];
        assert_eq!((a.0.clone(), b.0.clone()), (vec![4, 32], vec![128, 4]));
        assert!(b.1.iter().any(|&x| x != 0.0), "B trained away from zero");
        let merged = io::read_safetensors(&out.join("model.safetensors")).unwrap();
        let base = io::read_safetensors(&dir.path().join("base/model.safetensors")).unwrap();
        assert!(merged.keys().all(|k| !k.contains("lora")));
        let changed = |name: &str| merged[name].1 != base[name].1;
        assert!(changed("transformer.h.0.attn.c_attn.weight"));
        assert!(
            !changed("transformer.h.0.attn.c_proj.weight"),
            "not targeted"
        );
        assert!(!changed("transformer.wte.weight"), "frozen");
        for file in ["config.json", "tokenizer.json", "metrics.jsonl", "loss.svg"] {
            assert!(out.join(file).exists(), "{file}");
        }
    }

    #[test]
    fn an_interrupted_finetune_resumes_exactly() {
        let dir = setup(Vec::new());
        let p = lora_params(serde_json::json!({}));
        run(dir.path(), "whole", &p, None).unwrap();
        let err = run(dir.path(), "resumed", &p, Some(3)).unwrap_err();
        assert!(err.contains("stopped after step 3"), "{err}");
        let metrics = run(dir.path(), "resumed", &p, None).unwrap();
        assert_eq!(metrics["resumed_from_step"], 3);
        for file in ["model.safetensors", "adapter/adapter_model.safetensors"] {
            let read = |out: &str| std::fs::read(dir.path().join(out).join(file)).unwrap();
            assert_eq!(read("whole"), read("resumed"), "{file}, bit for bit");
        }
    }

    /// The same on a Llama (pretrained by smelt) with QLoRA on two of its projections.
    #[test]
    fn an_interrupted_llama_qlora_finetune_resumes_exactly() {
        let llama = serde_json::json!({ "architecture": "llama", "layers": 1, "heads": 2,
            "kv_heads": 1, "d_model": 32, "seq_len": 96 });
        let dir = setup_with(Vec::new(), llama);
        let p = lora_params(serde_json::json!({ "method": "qlora",
            "lora": { "r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "down_proj"] } }));
        let whole = run(dir.path(), "whole", &p, None).unwrap();
        assert!(
            whole["frozen_linear_bytes"].as_u64().unwrap() > 0,
            "{whole:?}"
        );
        run(dir.path(), "resumed", &p, Some(3)).unwrap_err();
        let metrics = run(dir.path(), "resumed", &p, None).unwrap();
        assert_eq!(metrics["resumed_from_step"], 3);
        for file in ["model.safetensors", "adapter/adapter_model.safetensors"] {
            let read = |out: &str| std::fs::read(dir.path().join(out).join(file)).unwrap();
            assert_eq!(read("whole"), read("resumed"), "{file}, bit for bit");
        }
        let config = io::read_safetensors(&dir.path().join("whole/model.safetensors")).unwrap();
        assert!(config.contains_key("model.layers.0.self_attn.q_proj.weight"));
    }

    #[test]
    fn full_and_qlora_fine_tunes() {
        let dir = setup(Vec::new());
        let full = run(
            dir.path(),
            "full",
            &lora_params(serde_json::json!({ "method": "full", "packing": true })),
            None,
        )
        .unwrap();
        assert!(full["trainable_parameters"].as_u64().unwrap() > 20_000);
        let conversations =
            Meta::read(&dir.path().join("tokens")).unwrap().streams["chat-train"].sequences;
        let rows = full["examples"].as_u64().unwrap();
        // Without packing every conversation is a row of its own.
        assert!(
            rows < conversations,
            "{conversations} packed into {rows} rows"
        );
        let qlora = run(
            dir.path(),
            "qlora",
            &lora_params(serde_json::json!({ "method": "qlora" })),
            None,
        )
        .unwrap();
        let (bytes, f32_bytes) = (
            qlora["frozen_linear_bytes"].as_u64().unwrap(),
            qlora["frozen_linear_f32_bytes"].as_u64().unwrap(),
        );
        assert_eq!(f32_bytes, 4 * 12 * 32 * 32);
        assert!(bytes * 7 < f32_bytes, "nf4: {bytes} of {f32_bytes}");
        assert!(dir
            .path()
            .join("qlora/adapter/adapter_model.safetensors")
            .exists());
        assert!(qlora["val_loss"].as_f64().unwrap().is_finite());
    }

    #[test]
    fn qlora_in_bf16_trains_close_to_f32() {
        let dir = setup(Vec::new());
        let train = |precision: &str| {
            serde_json::json!({
                "method": "qlora",
                "train": { "steps": 8, "batch_size": 4, "warmup": 1, "lr": 3e-3, "checkpoint_every": 3, "log_every": 1, "precision": precision }
            })
        };
        let f32 = run(dir.path(), "f32", &lora_params(train("f32")), None).unwrap();
        let bf16 = run(dir.path(), "bf16", &lora_params(train("bf16")), None).unwrap();
        let adapter = |out: &str| {
            std::fs::read(
                dir.path()
                    .join(out)
                    .join("adapter/adapter_model.safetensors"),
            )
            .unwrap()
        };
        assert_ne!(adapter("f32"), adapter("bf16"), "bf16 computes differently");
        let (a, b) = (
            f32["val_loss"].as_f64().unwrap(),
            bf16["val_loss"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 0.02 * a, "bf16 {b} against f32 {a}");
    }

    #[test]
    fn a_vocabulary_mismatch_and_a_missing_base_are_errors() {
        let dir = setup(Vec::new());
        let p = dir.path();
        let corpus = p.join("corpus");
        let chars: crate::tokenize::TokenizeParams =
            serde_json::from_value(serde_json::json!({ "train": { "model": "char" } })).unwrap();
        Tokenize
            .run(
                &chars,
                &context("chars", &[("corpus", &corpus)], &p.join("chars")),
            )
            .unwrap();
        let ctx = context(
            "x",
            &[("data", &p.join("chars")), ("model", &p.join("base"))],
            &p.join("x"),
        );
        let lora = lora_params(serde_json::json!({}));
        let problems = Finetune.check_inputs(&lora, &ctx.inputs, p);
        assert!(
            problems[0].message.contains("vocabulary of 300 tokens"),
            "{problems:?}"
        );
        let json = serde_json::to_value(&lora).unwrap();
        let err = smelt_engine::DynStage::run(&Finetune, &json, &ctx)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vocabulary of 300 tokens"),
            "the stage refuses it too: {err}"
        );
        // Data without conversations, in the model's vocabulary.
        let stories: Vec<Record> = generate(Generator::Stories, 20, 2).collect();
        std::fs::create_dir(p.join("stories")).unwrap();
        write_corpus(&p.join("stories"), &stories[..15], &stories[15..]);
        let same_vocabulary: crate::tokenize::TokenizeParams =
            serde_json::from_value(serde_json::json!({ "from": "tokens/tokenizer.json" })).unwrap();
        let ctx = context(
            "t",
            &[("corpus", &p.join("stories"))],
            &p.join("story-tokens"),
        );
        Tokenize.run(&same_vocabulary, &ctx).unwrap();
        let ctx = context(
            "w",
            &[
                ("data", &p.join("story-tokens")),
                ("model", &p.join("base")),
            ],
            &p.join("w"),
        );
        let problems = Finetune.check_inputs(&lora, &ctx.inputs, p);
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].starts_with("the data input has no `chat-train` stream"));
        assert!(messages[1].ends_with("the stage evaluates on it"));
        let problems = Finetune.check(&lora, &["data"]);
        assert!(
            problems[0].message.contains("no base model"),
            "{problems:?}"
        );
        let problems = Finetune.check(
            &lora_params(serde_json::json!({ "base": "base" })),
            &["data", "model"],
        );
        assert_eq!(problems[0].at, ["base"]);
        let err = Finetune
            .external_deps(&lora_params(serde_json::json!({ "base": "nowhere" })), p)
            .unwrap_err();
        assert!(err.contains("no config.json in nowhere"), "{err}");
        // A base given by path works like an input.
        let ctx = context("z", &[("data", &p.join("tokens"))], &p.join("z"));
        let by_path = lora_params(serde_json::json!({ "base": "base", "train": { "steps": 1 } }));
        finetune(&by_path, &ctx, None).unwrap();
    }
}
