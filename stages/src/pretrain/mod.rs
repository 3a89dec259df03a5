//! `pretrain`: trains a GPT-2 or a Llama from scratch on a `tokenize` artifact and writes a
//! Hugging Face model directory. The loop (schedules, checkpoints, exact resume) is `training`'s; this
//! module supplies next-token prediction on random windows of the token stream.

mod data;

use std::num::NonZeroUsize;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{
    InputDirs, Metrics, ParamProblem, Port, Ports, Stage, StageContext, StageError,
};

use crate::model::{
    heads_problem, Backend, Batch, DeviceKind, GptConfig, LlamaConfig, Member, ModelConfig, Trainer,
};
use crate::params::{Fraction, Positive};
use crate::tokenize::Meta;
use crate::training::{self, mix, EvalParams, Extras, Objective, Settings, TrainParams};
use data::Tokens;

pub struct Pretrain;

/// Params of a `pretrain` stage.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PretrainParams {
    pub model: ModelParams,
    #[serde(default)]
    pub train: TrainParams,
    #[serde(default)]
    pub eval: EvalParams,
    /// `cpu`, or `cuda` in a build with the `cuda` feature.
    #[serde(default)]
    pub device: DeviceKind,
    /// The hardware's peak FLOP/s, for model FLOPs utilisation in metrics.jsonl. The default is
    /// a 2-core AVX-512 CPU at 2.6 GHz.
    #[serde(default = "crate::training::default_peak_flops")]
    pub peak_flops: Positive,
}

/// The model's sizes (the vocabulary comes from the tokenizer).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// `gpt2`, or `llama`: RMSNorm, rotary positions, a SwiGLU MLP, grouped-query attention
    /// and no biases, saved as a checkpoint transformers loads as `LlamaForCausalLM`.
    #[serde(default, skip_serializing_if = "Architecture::is_gpt2")]
    pub architecture: Architecture,
    /// Llama: key/value heads; they divide `heads`. Default: `heads` (no grouping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_heads: Option<NonZeroUsize>,
    /// Llama: the SwiGLU MLP's width. Default: 8/3 of `d_model`, rounded up to a multiple of
    /// 8 (Llama's rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<NonZeroUsize>,
    /// Llama: the rotary base. Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<Positive>,
    pub layers: NonZeroUsize,
    /// Attention heads; they divide `d_model`.
    pub heads: NonZeroUsize,
    pub d_model: NonZeroUsize,
    /// Context length in tokens.
    pub seq_len: NonZeroUsize,
    #[serde(default = "no_dropout")]
    pub dropout: Fraction<f32>,
    /// GPT-2: biases in linear layers and LayerNorms (a Llama has none).
    #[serde(default = "yes")]
    pub bias: bool,
    /// Share the token embedding with the output head.
    #[serde(default = "yes")]
    pub tied_head: bool,
}

/// The model's architecture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    #[default]
    Gpt2,
    Llama,
}

impl Architecture {
    fn is_gpt2(&self) -> bool {
        *self == Architecture::Gpt2
    }
}

fn yes() -> bool {
    true
}

fn no_dropout() -> Fraction<f32> {
    Fraction::of(0.0)
}

impl PretrainParams {
    fn config(&self, vocab_size: usize) -> ModelConfig {
        let m = &self.model;
        if m.architecture == Architecture::Llama {
            let d = m.d_model.get();
            return LlamaConfig {
                member: Member::Llama,
                vocab_size,
                hidden_size: d,
                intermediate_size: m
                    .intermediate_size
                    .map_or((8 * d).div_ceil(3).next_multiple_of(8), NonZeroUsize::get),
                layers: m.layers.get(),
                heads: m.heads.get(),
                kv_heads: m.kv_heads.unwrap_or(m.heads).get(),
                head_dim: d / m.heads.get(),
                rms_norm_eps: 1e-5,
                rope_theta: m.rope_theta.map_or(10000.0, |t| t.get()),
                rope_scaling: None,
                attention_bias: false,
                output_bias: false,
                mlp_bias: false,
                tie_word_embeddings: m.tied_head,
                max_position_embeddings: m.seq_len.get(),
                sliding_window: None,
                first_window_layer: 0,
            }
            .into();
        }
        GptConfig {
            vocab_size,
            seq_len: m.seq_len.get(),
            d_model: m.d_model.get(),
            layers: m.layers.get(),
            heads: m.heads.get(),
            dropout: m.dropout.get(),
            bias: m.bias,
            tied_head: m.tied_head,
        }
        .into()
    }
}

impl ModelParams {
    /// What the Llama-only params must satisfy, and that they are not given to a GPT-2.
    fn architecture_problems(&self) -> Vec<ParamProblem> {
        let llama_only = [
            ("model.kv_heads", self.kv_heads.is_some()),
            ("model.intermediate_size", self.intermediate_size.is_some()),
            ("model.rope_theta", self.rope_theta.is_some()),
        ];
        if self.architecture == Architecture::Gpt2 {
            return llama_only
                .iter()
                .filter(|(_, given)| *given)
                .map(|(at, _)| {
                    let name = at.trim_start_matches("model.");
                    ParamProblem::new(at, format!("`{name}` is a Llama param: a GPT-2 has none"))
                        .help("add `architecture: llama`, or leave it out")
                })
                .collect();
        }
        let mut problems = Vec::new();
        let (heads, d) = (self.heads.get(), self.d_model.get());
        if let Some(kv) = self.kv_heads.filter(|kv| !heads.is_multiple_of(kv.get())) {
            let message = format!(
                "`kv_heads` ({kv}) must divide `heads` ({heads}): each serves as many query heads"
            );
            problems.push(ParamProblem::new("model.kv_heads", message).or_at("model.heads"));
        }
        if heads > 0 && d.is_multiple_of(heads) && !(d / heads).is_multiple_of(2) {
            let message = format!(
                "a head's width, `d_model` / `heads` = {}, must be even: rotary positions turn \
                 its dimensions in pairs",
                d / heads
            );
            problems.push(ParamProblem::new("model.d_model", message).or_at("model.heads"));
        }
        if self.dropout.get() > 0.0 {
            problems.push(ParamProblem::new(
                "model.dropout",
                "the Llama architecture has no dropout: leave `dropout` out",
            ));
        }
        problems
    }
}

impl Stage for Pretrain {
    type Params = PretrainParams;
    const KIND: &'static str = "pretrain";
    // 2: no timings in metrics.jsonl (they are in the run record).
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "Train a GPT-2 or a Llama from scratch; outputs a Hugging Face model directory";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![Port {
            name: "tokens",
            required: true,
            many: false,
            doc: "a tokenize stage",
        }])
    }

    fn check(&self, params: &PretrainParams, _wired: &[&str]) -> Vec<ParamProblem> {
        let mut problems = params.train.problems();
        let m = &params.model;
        if let Some(message) = heads_problem(m.d_model.get(), m.heads.get()) {
            problems.push(ParamProblem::new("model.d_model", message).or_at("model.heads"));
        }
        problems.extend(m.architecture_problems());
        problems
    }

    fn input_checks(&self) -> Option<&'static str> {
        Some("`model.seq_len` fits in the train and validation token streams")
    }

    fn check_inputs(
        &self,
        params: &PretrainParams,
        inputs: &InputDirs,
        _pipeline_dir: &Path,
    ) -> Vec<ParamProblem> {
        let Some(tokens) = inputs.get("tokens").and_then(|dirs| dirs.first()) else {
            return Vec::new();
        };
        match Meta::read(tokens) {
            Ok(meta) => data::windows_fit(&meta, params.model.seq_len.get()),
            Err(e) => vec![ParamProblem::new("", e)],
        }
    }

    fn run(&self, params: &PretrainParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        Ok(train(params, ctx, None)?)
    }
}

/// Trains to `params.train.steps`, or stops after `stop_after` steps (tests simulate an
/// interruption with it).
fn train(
    params: &PretrainParams,
    ctx: &StageContext,
    stop_after: Option<u64>,
) -> Result<Metrics, String> {
    // `Stage::check` and `check_inputs` have passed (the engine runs them first).
    let t = &params.train;
    let tokens_dir = ctx.input("tokens").ok_or("no `tokens` input")?;
    let meta = Meta::read(tokens_dir)?;
    let config = params.config(meta.vocab_size);
    let seq = params.model.seq_len.get();
    let train = Tokens::read(tokens_dir, &meta, "train")?;
    let validation = Tokens::read(tokens_dir, &meta, "validation")?;
    let mut model = Trainer::new(config.clone(), params.device, t.seed, t.optimizer())?;
    let parameters = model.parameters();
    let batch = t.batch_size.get();
    let eval_batches = (0..params.eval.batches.get())
        .map(|i| validation.batch(batch, seq, mix(t.seed ^ 0xe7a1, i as u64)))
        .collect();
    let mut objective = NextToken {
        train,
        eval_batches,
        batch,
        seq,
    };
    let settings = Settings {
        train: t,
        eval: &params.eval,
        flops_per_token: config.flops_per_token(parameters, seq),
        peak_flops: params.peak_flops.get(),
    };
    let outcome = training::run(&mut model, &mut objective, &settings, ctx, stop_after)?;
    training::write_model_dir(&mut model, &ctx.out_dir, tokens_dir, meta.eos_id)?;
    outcome.write_log_and_curve(&ctx.out_dir)?;
    let mut metrics = outcome.metrics(t.steps.get())?;
    metrics.insert("parameters".into(), parameters.into());
    Ok(metrics)
}

/// Next-token prediction on random windows of the token stream.
struct NextToken {
    train: Tokens,
    /// Fixed validation windows, the same at every evaluation.
    eval_batches: Vec<(Vec<u32>, Vec<u32>)>,
    batch: usize,
    seq: usize,
}

impl Objective for NextToken {
    fn tokens_per_micro_batch(&self) -> f64 {
        (self.batch * self.seq) as f64
    }

    fn accumulate(&mut self, model: &mut dyn Backend, seed: u64, weight: f32) -> (f32, Extras) {
        let (inputs, targets) = self.train.batch(self.batch, self.seq, seed);
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            mask: None,
            batch: self.batch,
            seq: self.seq,
        };
        let loss = model.accumulate(&batch, weight, seed ^ 0xd20f);
        (loss, Extras::new())
    }

    fn evaluate(&mut self, model: &mut dyn Backend) -> (f32, Extras) {
        let sum: f32 = self
            .eval_batches
            .iter()
            .map(|(inputs, targets)| {
                model.loss(&Batch {
                    inputs,
                    targets,
                    mask: None,
                    batch: self.batch,
                    seq: self.seq,
                })
            })
            .sum();
        (sum / self.eval_batches.len() as f32, Extras::new())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::collect::synthetic::{generate, Generator};
    use crate::model::io;
    use crate::testing::{context, write_corpus};
    use crate::tokenize::Tokenize;

    /// A scratch dir with `tokens/`: synthetic stories, characters, 10% held out.
    fn tokens() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        std::fs::create_dir(&corpus).unwrap();
        let stories: Vec<_> = generate(Generator::Stories, 60, 5).collect();
        write_corpus(&corpus, &stories[..54], &stories[54..]);
        let params =
            serde_json::from_value(serde_json::json!({ "train": { "model": "char" } })).unwrap();
        let ctx = context("tokens", &[("corpus", &corpus)], &dir.path().join("tokens"));
        Tokenize.run(&params, &ctx).unwrap();
        dir
    }

    fn params(extra: serde_json::Value) -> PretrainParams {
        let mut value = serde_json::json!({
            "model": { "layers": 1, "heads": 2, "d_model": 16, "seq_len": 16, "dropout": 0.1 },
            "train": { "steps": 12, "batch_size": 4, "grad_accum": 2, "warmup": 2, "checkpoint_every": 4, "log_every": 2 },
            "eval": { "every": 6, "batches": 2 }
        });
        merge(&mut value, extra);
        serde_json::from_value(value).unwrap()
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (slot, value) => *slot = value,
        }
    }

    /// Runs into `dir/<out>` with the work dir `dir/<out>-work` (kept between calls).
    fn run(
        dir: &Path,
        out: &str,
        params: &PretrainParams,
        stop_after: Option<u64>,
    ) -> Result<Metrics, String> {
        let tokens = dir.join("tokens");
        let mut ctx = context("model", &[("tokens", &tokens)], &dir.join(out));
        ctx.work_dir = dir.join(format!("{out}-work"));
        std::fs::create_dir_all(&ctx.work_dir).unwrap();
        train(params, &ctx, stop_after)
    }

    fn log(dir: &Path, out: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(out).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                // Measurements of the run belong to the run record, not the artifact.
                for key in ["tokens_per_sec", "mfu", "elapsed_s"] {
                    assert!(v.get(key).is_none(), "{key} in metrics.jsonl: {v}");
                }
                v
            })
            .collect()
    }

    #[test]
    fn an_interrupted_run_resumes_exactly() {
        let dir = tokens();
        let p = params(serde_json::json!({}));
        let whole = run(dir.path(), "whole", &p, None).unwrap();
        assert_eq!(whole["resumed_from_step"], 0);
        let err = run(dir.path(), "resumed", &p, Some(6)).unwrap_err();
        assert!(err.contains("stopped after step 6"), "{err}");
        let resumed = run(dir.path(), "resumed", &p, None).unwrap();
        assert_eq!(resumed["resumed_from_step"], 6);
        let weights =
            |out: &str| std::fs::read(dir.path().join(out).join("model.safetensors")).unwrap();
        assert_eq!(
            weights("whole"),
            weights("resumed"),
            "same weights, bit for bit"
        );
        assert_eq!(log(dir.path(), "whole"), log(dir.path(), "resumed"));
        let lines = log(dir.path(), "whole");
        assert_eq!(
            lines
                .iter()
                .map(|l| l["step"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [2, 4, 6, 8, 10, 12]
        );
        assert!(lines[2]["val_loss"].is_number() && lines[5]["val_loss"].is_number());
        assert!(lines[0]["loss"].as_f64().unwrap() > lines[5]["loss"].as_f64().unwrap());
        let out = dir.path().join("whole");
        for file in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "generation_config.json",
            "loss.svg",
        ] {
            assert!(out.join(file).exists(), "{file}");
        }
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], "gpt2");
        assert_eq!(config["n_embd"], 16);
    }

    #[test]
    fn the_same_seed_trains_the_same_model() {
        let dir = tokens();
        let p = params(serde_json::json!({ "train": { "steps": 4 } }));
        run(dir.path(), "a", &p, None).unwrap();
        run(dir.path(), "b", &p, None).unwrap();
        let other = params(serde_json::json!({ "train": { "steps": 4, "seed": 9 } }));
        run(dir.path(), "c", &other, None).unwrap();
        let weights =
            |out: &str| std::fs::read(dir.path().join(out).join("model.safetensors")).unwrap();
        assert_eq!(weights("a"), weights("b"));
        assert_ne!(weights("a"), weights("c"));
    }

    #[test]
    fn bf16_trains_close_to_f32_and_resumes_exactly() {
        let dir = tokens();
        let f32 = params(serde_json::json!({ "train": { "steps": 8 } }));
        let bf16 = params(serde_json::json!({ "train": { "steps": 8, "precision": "bf16" } }));
        run(dir.path(), "f32", &f32, None).unwrap();
        run(dir.path(), "bf16", &bf16, None).unwrap();
        run(dir.path(), "resumed", &bf16, Some(4)).unwrap_err();
        run(dir.path(), "resumed", &bf16, None).unwrap();
        let weights =
            |out: &str| std::fs::read(dir.path().join(out).join("model.safetensors")).unwrap();
        assert_ne!(weights("f32"), weights("bf16"), "bf16 computes differently");
        assert_eq!(weights("bf16"), weights("resumed"), "and deterministically");
        let losses = |out: &str| -> Vec<f64> {
            let lines = log(dir.path(), out);
            lines.iter().map(|l| l["loss"].as_f64().unwrap()).collect()
        };
        for (b, f) in losses("bf16").iter().zip(losses("f32")) {
            assert!((b - f).abs() < 0.02 * f, "bf16 loss {b} against f32 {f}");
        }
        // Runs in f32 keep the cache keys they had before `precision` existed.
        let serialised = serde_json::to_value(&f32.train).unwrap();
        assert!(serialised.get("precision").is_none());
        assert_eq!(
            serde_json::to_value(&bf16.train).unwrap()["precision"],
            "bf16"
        );
    }

    #[test]
    fn bad_sizes_and_divergence_are_clear_errors() {
        let dir = tokens();
        let inputs = InputDirs::from([("tokens".to_string(), vec![dir.path().join("tokens")])]);
        let long = params(serde_json::json!({ "model": { "seq_len": 100000 } }));
        let problems = Pretrain.check_inputs(&long, &inputs, dir.path());
        assert_eq!(problems.len(), 2, "both splits: {problems:?}");
        assert_eq!(problems[0].at, ["model.seq_len"]);
        assert!(
            problems[0]
                .message
                .contains("too few for windows of `model.seq_len` 100000"),
            "{problems:?}"
        );
        let fits = params(serde_json::json!({}));
        assert!(Pretrain.check_inputs(&fits, &inputs, dir.path()).is_empty());
        let odd = params(serde_json::json!({ "model": { "heads": 3 } }));
        let problems = Pretrain.check(&odd, &["tokens"]);
        assert_eq!(problems[0].at, ["model.d_model", "model.heads"]);
        assert!(problems[0].message.contains("must be divisible by `heads`"));
        let wild = params(
            serde_json::json!({ "train": { "lr": 1.0e9, "min_lr": 1.0, "grad_clip": 0.0, "warmup": 0, "steps": 40 } }),
        );
        let err = run(dir.path(), "wild", &wild, None).unwrap_err();
        assert!(err.contains("training diverged"), "{err}");
        // Whatever checkpoint there is holds the last good (finite) weights.
        let checkpoint = dir.path().join("wild-work/checkpoint.safetensors");
        if checkpoint.exists() {
            let tensors = io::read_safetensors(&checkpoint).unwrap();
            assert!(tensors
                .values()
                .all(|(_, data)| data.iter().all(|x| x.is_finite())));
        }
    }

    #[test]
    fn an_empty_validation_split_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        std::fs::create_dir(&corpus).unwrap();
        let stories: Vec<_> = generate(Generator::Stories, 20, 5).collect();
        write_corpus(&corpus, &stories, &[]);
        let tokenize =
            serde_json::from_value(serde_json::json!({ "train": { "model": "char" } })).unwrap();
        Tokenize
            .run(
                &tokenize,
                &context("tokens", &[("corpus", &corpus)], &dir.path().join("tokens")),
            )
            .unwrap();
        let inputs = InputDirs::from([("tokens".to_string(), vec![dir.path().join("tokens")])]);
        let problems = Pretrain.check_inputs(&params(serde_json::json!({})), &inputs, dir.path());
        assert!(
            problems[0].message.contains("no validation documents"),
            "{problems:?}"
        );
    }
}
