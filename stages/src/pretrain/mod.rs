//! `pretrain`: trains a GPT-2 from scratch on a `tokenize` artifact and writes a Hugging Face
//! model directory.
//!
//! The loop is deterministic for a seed on CPU: the batches of step `n` and their dropout masks
//! are drawn from generators seeded with (seed, n), so a run that resumes from a checkpoint at
//! step `n` continues exactly as if it had never stopped. Checkpoints (weights, optimizer
//! moments, step) go to the stage's work dir, which survives failures of the same stage key.

mod data;
mod schedule;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{Metrics, Port, Ports, Stage, StageContext, StageError};

use crate::model::{io, AdamWConfig, Backend, Batch, DeviceKind, GptConfig, Trainer};
use crate::tokenize::Meta;
use data::Tokens;
pub use schedule::Schedule;

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
    #[serde(default = "default_peak_flops")]
    pub peak_flops: f64,
}

/// The model's sizes (the vocabulary comes from the tokenizer).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    pub layers: usize,
    pub heads: usize,
    pub d_model: usize,
    /// Context length in tokens.
    pub seq_len: usize,
    #[serde(default)]
    pub dropout: f32,
    /// Biases in linear layers and LayerNorms.
    #[serde(default = "yes")]
    pub bias: bool,
    /// Share the token embedding with the output head.
    #[serde(default = "yes")]
    pub tied_head: bool,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Sequences per optimizer step (per micro-batch when `grad_accum` > 1).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_min_lr")]
    pub min_lr: f64,
    /// Steps of linear warmup.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    #[serde(default)]
    pub schedule: Schedule,
    /// Decoupled (AdamW) weight decay, applied to matrices only.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    #[serde(default = "one_f32")]
    pub grad_clip: f32,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Steps between checkpoints in the work dir.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Steps between lines of metrics.jsonl (eval steps are always logged).
    #[serde(default = "default_log_every")]
    pub log_every: u64,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// Steps between validation losses (and after the last step).
    #[serde(default = "default_eval_every")]
    pub every: u64,
    /// Validation batches averaged per evaluation (the same batches each time).
    #[serde(default = "default_eval_batches")]
    pub batches: usize,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn one_f32() -> f32 {
    1.0
}
fn default_peak_flops() -> f64 {
    1.66e11
}
fn default_steps() -> u64 {
    1000
}
fn default_batch() -> usize {
    12
}
fn default_lr() -> f64 {
    1e-3
}
fn default_min_lr() -> f64 {
    1e-4
}
fn default_warmup() -> u64 {
    100
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.99]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_seed() -> u64 {
    1337
}
fn default_checkpoint_every() -> u64 {
    250
}
fn default_log_every() -> u64 {
    10
}
fn default_eval_every() -> u64 {
    250
}
fn default_eval_batches() -> usize {
    20
}

impl Default for TrainParams {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

impl Default for EvalParams {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialise")
    }
}

impl PretrainParams {
    fn check(&self) -> Result<(), String> {
        let t = &self.train;
        for (name, value) in [
            ("train.steps", t.steps),
            ("train.checkpoint_every", t.checkpoint_every),
            ("train.log_every", t.log_every),
            ("eval.every", self.eval.every),
        ] {
            if value == 0 {
                return Err(format!("`{name}` must be at least 1"));
            }
        }
        if t.batch_size == 0 || t.grad_accum == 0 || self.eval.batches == 0 {
            return Err(
                "`train.batch_size`, `train.grad_accum` and `eval.batches` must be at least 1"
                    .into(),
            );
        }
        if !(t.lr > 0.0 && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return Err(format!(
                "need 0 ≤ min_lr ≤ lr and lr > 0 (lr {}, min_lr {})",
                t.lr, t.min_lr
            ));
        }
        Ok(())
    }

    fn config(&self, vocab_size: usize) -> GptConfig {
        let m = &self.model;
        GptConfig {
            vocab_size,
            seq_len: m.seq_len,
            d_model: m.d_model,
            layers: m.layers,
            heads: m.heads,
            dropout: m.dropout,
            bias: m.bias,
            tied_head: m.tied_head,
        }
    }
}

/// One line of metrics.jsonl.
#[derive(Debug, Serialize, Deserialize)]
struct LogLine {
    step: u64,
    loss: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f32>,
    lr: f64,
    grad_norm: f32,
    tokens_per_sec: f64,
    mfu: f64,
    elapsed_s: f64,
}

impl Stage for Pretrain {
    type Params = PretrainParams;
    const KIND: &'static str = "pretrain";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Train a GPT-2 from scratch; outputs a Hugging Face model directory";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![Port {
            name: "tokens",
            required: true,
            many: false,
            doc: "a tokenize stage",
        }])
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
    params.check()?;
    let tokens_dir = ctx.input("tokens").ok_or("no `tokens` input")?;
    let meta = Meta::read(tokens_dir)?;
    let config = params.config(meta.vocab_size);
    config.check()?;
    let seq = config.seq_len;
    let train_tokens = Tokens::read(tokens_dir, &meta, "train")?;
    train_tokens.check("train", seq)?;
    let validation = Tokens::read(tokens_dir, &meta, "validation").map_err(|e| {
        format!("{e}; pretraining evaluates on it, so give `collect` a validation split")
    })?;
    validation.check("validation", seq)?;
    let t = &params.train;
    let optimizer = AdamWConfig {
        betas: t.betas,
        eps: t.eps,
        weight_decay: t.weight_decay,
    };
    let mut model = Trainer::new(config.clone(), params.device, t.seed, optimizer)?;
    let parameters = model.parameters();
    let checkpoint = ctx.work_dir.join("checkpoint.safetensors");
    let log_path = ctx.work_dir.join("metrics.jsonl");
    let start = resume(&mut model, &checkpoint, &log_path)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let eval_batches: Vec<(Vec<u32>, Vec<u32>)> = (0..params.eval.batches)
        .map(|i| validation.batch(t.batch_size, seq, mix(t.seed ^ 0xe7a1, i as u64)))
        .collect();
    let tokens_per_step = (t.batch_size * t.grad_accum * seq) as f64;
    let flops_per_token = config.flops_per_token(parameters);
    let started = Instant::now();
    let mut window = (Instant::now(), 0u64);
    let end = stop_after.map_or(t.steps, |s| s.min(t.steps));
    let mut last = None;
    for step in start..end {
        let lr = schedule::learning_rate(t.schedule, step, t.steps, t.warmup, t.lr, t.min_lr);
        let mut loss = 0.0;
        for micro in 0..t.grad_accum {
            let seed = mix(t.seed, step * t.grad_accum as u64 + micro as u64);
            let (inputs, targets) = train_tokens.batch(t.batch_size, seq, seed);
            let batch = Batch {
                inputs: &inputs,
                targets: &targets,
                mask: None,
                batch: t.batch_size,
                seq,
            };
            loss += model.accumulate(&batch, 1.0 / t.grad_accum as f32, seed ^ 0xd20f)
                / t.grad_accum as f32;
        }
        let diverged = |what: &str, value: f32| {
            format!(
                "the {what} is {value} at step {}: training diverged (lower `train.lr`?); the last \
                 good checkpoint is kept and a rerun resumes from it",
                step + 1
            )
        };
        if !loss.is_finite() {
            return Err(diverged("loss", loss));
        }
        let grad_norm = model.step(lr, (t.grad_clip > 0.0).then_some(t.grad_clip));
        if !grad_norm.is_finite() {
            return Err(diverged("gradient norm", grad_norm));
        }
        let done = step + 1;
        let val_loss = (done % params.eval.every == 0 || done == t.steps).then(|| {
            let sum: f32 = eval_batches
                .iter()
                .map(|(inputs, targets)| {
                    model.loss(&Batch {
                        inputs,
                        targets,
                        mask: None,
                        batch: t.batch_size,
                        seq,
                    })
                })
                .sum();
            sum / eval_batches.len() as f32
        });
        window.1 += 1;
        let tokens_per_sec =
            window.1 as f64 * tokens_per_step / window.0.elapsed().as_secs_f64().max(1e-9);
        if done % t.log_every == 0 || val_loss.is_some() || done == end {
            let line = LogLine {
                step: done,
                loss,
                val_loss,
                lr,
                grad_norm,
                tokens_per_sec: tokens_per_sec.round(),
                mfu: tokens_per_sec * flops_per_token / params.peak_flops,
                elapsed_s: started.elapsed().as_secs_f64(),
            };
            writeln!(
                log,
                "{}",
                serde_json::to_string(&line).map_err(|e| e.to_string())?
            )
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
            window = (Instant::now(), 0);
        }
        let eta = (t.steps - done) as f64 * tokens_per_step / tokens_per_sec.max(1e-9);
        ctx.report(
            done,
            Some(t.steps),
            &format!("loss {loss:.4} · {tokens_per_sec:.0} tok/s · ETA {eta:.0}s"),
        );
        if done % t.checkpoint_every == 0 && done < t.steps {
            log.flush().map_err(|e| e.to_string())?;
            save_checkpoint(&mut model, &checkpoint, done)?;
        }
        last = Some((loss, val_loss));
    }
    log.flush().map_err(|e| e.to_string())?;
    if end < t.steps {
        save_checkpoint(&mut model, &checkpoint, end)?;
        return Err(format!("stopped after step {end}"));
    }
    write_outputs(&mut model, ctx, tokens_dir, &meta, &log_path)?;
    let final_val = read_log(&log_path)?.iter().rev().find_map(|l| l.val_loss);
    let mut metrics = Metrics::from([
        ("parameters".to_string(), parameters.into()),
        ("steps".to_string(), t.steps.into()),
        (
            "train_seconds".to_string(),
            started.elapsed().as_secs_f64().into(),
        ),
        ("resumed_from_step".to_string(), start.into()),
    ]);
    if let Some((loss, _)) = last {
        metrics.insert("loss".into(), f64::from(loss).into());
    }
    if let Some(val) = final_val {
        metrics.insert("val_loss".into(), f64::from(val).into());
    }
    Ok(metrics)
}

/// A seed for stream `n` of `seed` (splitmix64), so that neighbouring steps get unrelated
/// generators.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Weights, optimizer moments and the step, in one safetensors file written atomically.
fn save_checkpoint(model: &mut dyn Backend, path: &Path, step: u64) -> Result<(), String> {
    let (moments, t) = model.optimizer_state();
    let mut tensors = model.weights();
    tensors.extend(
        moments
            .into_iter()
            .map(|(name, shape, data)| (format!("optimizer.{name}"), shape, data)),
    );
    let metadata = HashMap::from([
        ("step".to_string(), step.to_string()),
        ("adam_t".to_string(), t.to_string()),
    ]);
    io::write_safetensors(path, &tensors, Some(metadata))
}

/// Restores the checkpoint in the work dir, if any; returns the step to start from. The metrics
/// log is cut back to that step (lines after it belong to work that is redone).
fn resume(model: &mut dyn Backend, checkpoint: &Path, log_path: &Path) -> Result<u64, String> {
    if !checkpoint.exists() {
        let _ = std::fs::remove_file(log_path);
        return Ok(0);
    }
    let bytes = std::fs::read(checkpoint).map_err(|e| format!("{}: {e}", checkpoint.display()))?;
    let (_, header) = ::safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("{}: {e:?}", checkpoint.display()))?;
    let number = |key: &str| -> Result<u64, String> {
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{}: no `{key}` in the checkpoint", checkpoint.display()))
    };
    let (step, t) = (number("step")?, number("adam_t")?);
    let tensors = io::read_safetensors(checkpoint)?;
    let (optimizer, weights): (HashMap<_, _>, HashMap<_, _>) = tensors
        .into_iter()
        .partition(|(name, _)| name.starts_with("optimizer."));
    model.set_weights(&weights)?;
    let optimizer = optimizer
        .into_iter()
        .map(|(name, value)| (name["optimizer.".len()..].to_string(), value))
        .collect();
    model.restore_optimizer(&optimizer, t as i32)?;
    let kept: Vec<String> = read_log(log_path)?
        .into_iter()
        .filter(|line| line.step <= step)
        .map(|line| serde_json::to_string(&line).expect("log lines serialise"))
        .collect();
    let text = kept.iter().map(|l| format!("{l}\n")).collect::<String>();
    std::fs::write(log_path, text).map_err(|e| format!("{}: {e}", log_path.display()))?;
    Ok(step)
}

fn read_log(path: &Path) -> Result<Vec<LogLine>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    // A line cut short by a kill is dropped; it is redone after the checkpoint.
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The HF model directory, the metrics and the loss curve.
fn write_outputs(
    model: &mut dyn Backend,
    ctx: &StageContext,
    tokens_dir: &Path,
    meta: &Meta,
    log_path: &Path,
) -> Result<(), String> {
    let out = &ctx.out_dir;
    model.save_hf(out, meta.eos_id)?;
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokens_dir.join(file), out.join(file)).map_err(|e| format!("{file}: {e}"))?;
    }
    let generation = serde_json::json!({
        "bos_token_id": meta.eos_id,
        "eos_token_id": meta.eos_id,
        "max_length": model.config().seq_len,
    });
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_vec_pretty(&generation).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    std::fs::copy(log_path, out.join("metrics.jsonl"))
        .map_err(|e| format!("metrics.jsonl: {e}"))?;
    let log = read_log(log_path)?;
    let train: Vec<(f64, f64)> = log
        .iter()
        .map(|l| (l.step as f64, f64::from(l.loss)))
        .collect();
    let val: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|l| Some((l.step as f64, f64::from(l.val_loss?))))
        .collect();
    let svg = crate::plot::loss_curve(&[
        ("train loss", "#1f77b4", train),
        ("validation loss", "#d62728", val),
    ]);
    std::fs::write(out.join("loss.svg"), svg).map_err(|e| format!("loss.svg: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::synthetic::{generate, Generator};
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
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                // Timings differ between runs.
                for key in ["tokens_per_sec", "mfu", "elapsed_s"] {
                    v.as_object_mut().unwrap().remove(key);
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
    fn bad_sizes_and_divergence_are_clear_errors() {
        let dir = tokens();
        let err = run(
            dir.path(),
            "long",
            &params(serde_json::json!({ "model": { "seq_len": 100000 } })),
            None,
        )
        .unwrap_err();
        assert!(
            err.contains("too few for windows of seq_len 100000"),
            "{err}"
        );
        let err = run(
            dir.path(),
            "odd",
            &params(serde_json::json!({ "model": { "heads": 3 } })),
            None,
        )
        .unwrap_err();
        assert!(err.contains("must be divisible by `heads`"), "{err}");
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
        let err = run(dir.path(), "out", &params(serde_json::json!({})), None).unwrap_err();
        assert!(err.contains("no validation documents"), "{err}");
    }
}
