//! The training loop `pretrain`, `finetune` and `dpo` share: learning-rate schedules, gradient
//! accumulation and clipping, periodic evaluation, metrics.jsonl, progress, checkpoints in the
//! stage's work dir and exact resume, and a stop on a non-finite loss. What is trained for is an
//! [`Objective`]: it turns a step's seed into a micro-batch and a loss.
//!
//! The loop is deterministic for a seed on CPU: micro-batch `m` of step `n` is drawn, with its
//! dropout masks, from generators seeded with (seed, n, m), so a run that resumes from a
//! checkpoint at step `n` continues exactly as if it had never stopped.

mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::Path;
use std::time::Instant;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{Metrics, ParamProblem, StageContext};

use crate::model::{io, on_compute_threads, AdamWConfig, Backend, Precision};
use crate::params::{Fraction, NonNegative, Positive};
pub use schedule::Schedule;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    #[serde(default = "default_steps")]
    pub steps: NonZeroU64,
    /// Sequences per optimizer step (per micro-batch when `grad_accum` > 1).
    #[serde(default = "default_batch")]
    pub batch_size: NonZeroUsize,
    /// Micro-batches whose gradients are summed before each step.
    #[serde(default = "one")]
    pub grad_accum: NonZeroUsize,
    #[serde(default = "default_lr")]
    pub lr: Positive,
    /// Where the schedule ends, at most `lr`; `lr / 10` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<NonNegative>,
    /// Steps of linear warmup, at most `steps`.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    #[serde(default)]
    pub schedule: Schedule,
    /// Decoupled (AdamW) weight decay, applied to matrices only.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: NonNegative,
    #[serde(default = "default_betas")]
    pub betas: [Fraction; 2],
    #[serde(default = "default_eps")]
    pub eps: Positive,
    /// Global gradient-norm clip; 0 turns clipping off.
    #[serde(default = "one_f32")]
    pub grad_clip: NonNegative<f32>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Steps between checkpoints in the work dir.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: NonZeroU64,
    /// Steps between lines of metrics.jsonl (eval steps are always logged).
    #[serde(default = "default_log_every")]
    pub log_every: NonZeroU64,
    /// What the linear layers' matrix multiplies compute in: `f32`, or `bf16` (inputs rounded
    /// to bf16, sums in f32, on AMX tiles where the CPU has them; weights, gradients and
    /// optimizer state stay f32). CPU only.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// Steps between validation losses (and after the last step).
    #[serde(default = "default_eval_every")]
    pub every: NonZeroU64,
    /// Validation batches averaged per evaluation (the same batches each time).
    #[serde(default = "default_eval_batches")]
    pub batches: NonZeroUsize,
}

fn one() -> NonZeroUsize {
    NonZeroUsize::MIN
}
fn one_f32() -> NonNegative<f32> {
    NonNegative::of(1.0)
}
/// A 2-core AVX-512 CPU at 2.6 GHz.
pub fn default_peak_flops() -> Positive {
    Positive::of(1.66e11)
}
fn default_steps() -> NonZeroU64 {
    NonZeroU64::new(1000).expect("not zero")
}
fn default_batch() -> NonZeroUsize {
    NonZeroUsize::new(12).expect("not zero")
}
fn default_lr() -> Positive {
    Positive::of(1e-3)
}
fn default_warmup() -> u64 {
    100
}
fn default_weight_decay() -> NonNegative {
    NonNegative::of(0.1)
}
fn default_betas() -> [Fraction; 2] {
    [Fraction::of(0.9), Fraction::of(0.99)]
}
fn default_eps() -> Positive {
    Positive::of(1e-8)
}
fn default_seed() -> u64 {
    1337
}
fn default_checkpoint_every() -> NonZeroU64 {
    NonZeroU64::new(250).expect("not zero")
}
fn default_log_every() -> NonZeroU64 {
    NonZeroU64::new(10).expect("not zero")
}
fn default_eval_every() -> NonZeroU64 {
    NonZeroU64::new(250).expect("not zero")
}
fn default_eval_batches() -> NonZeroUsize {
    NonZeroUsize::new(20).expect("not zero")
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

impl TrainParams {
    /// What the `train` block's params must satisfy together (each one's range is in its
    /// type), as paths from the stage's `with:` (`train.warmup`).
    pub fn problems(&self) -> Vec<ParamProblem> {
        let mut problems = Vec::new();
        let lr = self.lr.get();
        if let Some(min_lr) = self.min_lr.map(NonNegative::get).filter(|&m| m > lr) {
            problems.push(
                ParamProblem::new(
                    "train.min_lr",
                    format!(
                        "`train.min_lr` ({min_lr}) is above `train.lr` ({lr}): the schedule \
                         decays from `lr` down to `min_lr`"
                    ),
                )
                .or_at("train.lr"),
            );
        }
        if self.warmup > self.steps.get() {
            problems.push(
                ParamProblem::new(
                    "train.warmup",
                    format!(
                        "`train.warmup` ({}) is longer than `train.steps` ({}): the learning rate \
                         would never reach `train.lr`",
                        self.warmup, self.steps
                    ),
                )
                .or_at("train.steps")
                .help("lower `train.warmup` (100 steps when not given) or raise `train.steps`"),
            );
        }
        problems
    }

    pub fn min_lr(&self) -> f64 {
        self.min_lr.map_or(self.lr.get() / 10.0, NonNegative::get)
    }

    pub fn optimizer(&self) -> AdamWConfig {
        AdamWConfig {
            betas: self.betas.map(Fraction::get),
            eps: self.eps.get(),
            weight_decay: self.weight_decay.get(),
        }
    }
}

/// Values logged beside the loss (DPO's rewards), by name.
pub type Extras = BTreeMap<String, f64>;

/// What a stage trains for.
pub trait Objective: Send {
    /// Tokens in one micro-batch (for tokens/s and MFU).
    fn tokens_per_micro_batch(&self) -> f64;
    /// Forward and backward on the micro-batch drawn with `seed` (dropout masks come from
    /// `seed` too); its gradients are added times `weight`. Returns the loss and extras.
    fn accumulate(&mut self, model: &mut dyn Backend, seed: u64, weight: f32) -> (f32, Extras);
    /// The validation loss and extras (named `val_…` in the log).
    fn evaluate(&mut self, model: &mut dyn Backend) -> (f32, Extras);
}

/// One line of metrics.jsonl: what training computed at a logged step. It is content of the
/// artifact, so it holds nothing that measures the run (see [`Timing`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct LogLine {
    pub step: u64,
    pub loss: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
    pub lr: f64,
    pub grad_norm: f32,
    #[serde(flatten)]
    pub extras: Extras,
}

/// How fast a logged step ran: one line of timings.jsonl in the work dir. Measurements of the
/// run go to the run record (through the stage's metrics), never into the artifact, whose
/// content must be a function of the stage key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timing {
    pub step: u64,
    /// Over the steps since the previous logged one.
    pub tokens_per_sec: f64,
    pub mfu: f64,
    /// Seconds of training up to this step, across resumes.
    pub elapsed_s: f64,
}

/// What the loop needs besides the objective.
pub struct Settings<'a> {
    pub train: &'a TrainParams,
    pub eval: &'a EvalParams,
    /// Training FLOPs per token and the hardware's peak, for MFU.
    pub flops_per_token: f64,
    pub peak_flops: f64,
}

/// How a finished loop went.
pub struct Outcome {
    pub resumed_from_step: u64,
    pub seconds: f64,
    /// metrics.jsonl in the work dir.
    pub log_path: std::path::PathBuf,
    /// timings.jsonl in the work dir.
    pub timings_path: std::path::PathBuf,
}

/// Trains `model` for `settings.train.steps` steps, or stops after `stop_after` (tests simulate
/// an interruption with it, leaving a checkpoint).
pub fn run(
    model: &mut dyn Backend,
    objective: &mut dyn Objective,
    settings: &Settings,
    ctx: &StageContext,
    stop_after: Option<u64>,
) -> Result<Outcome, String> {
    let t = settings.train;
    model.set_precision(t.precision)?;
    let checkpoint = ctx.work_dir.join("checkpoint.safetensors");
    let log_path = ctx.work_dir.join("metrics.jsonl");
    let timings_path = ctx.work_dir.join("timings.jsonl");
    let start = resume(model, &checkpoint, &log_path, &timings_path)?;
    let earlier_s = read_jsonl::<Timing>(&timings_path)?
        .last()
        .map_or(0.0, |t| t.elapsed_s);
    let append = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let (mut log, mut timings) = (append(&log_path)?, append(&timings_path)?);
    let steps = t.steps.get();
    let grad_accum = t.grad_accum.get();
    let tokens_per_step = objective.tokens_per_micro_batch() * grad_accum as f64;
    let started = Instant::now();
    let mut window = (Instant::now(), 0u64);
    let end = stop_after.map_or(steps, |s| s.min(steps));
    for step in start..end {
        let lr = schedule::learning_rate(t.schedule, step, steps, t.warmup, t.lr.get(), t.min_lr());
        let (loss, mut extras) = on_compute_threads(model, |model| {
            let mut loss = 0.0;
            let mut extras = Extras::new();
            for micro in 0..grad_accum {
                let seed = mix(t.seed, step * grad_accum as u64 + micro as u64);
                let share = 1.0 / grad_accum as f32;
                let (micro_loss, micro_extras) = objective.accumulate(model, seed, share);
                loss += micro_loss * share;
                for (name, value) in micro_extras {
                    *extras.entry(name).or_default() += value * f64::from(share);
                }
            }
            (loss, extras)
        });
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
        let clip = Some(t.grad_clip.get()).filter(|&c| c > 0.0);
        let grad_norm = on_compute_threads(model, |model| model.step(lr, clip));
        if !grad_norm.is_finite() {
            return Err(diverged("gradient norm", grad_norm));
        }
        let done = step + 1;
        let mut val_loss = None;
        if done % settings.eval.every.get() == 0 || done == steps {
            let (value, val_extras) = on_compute_threads(model, |model| objective.evaluate(model));
            val_loss = Some(value);
            extras.extend(val_extras.into_iter().map(|(k, v)| (format!("val_{k}"), v)));
        }
        window.1 += 1;
        let tokens_per_sec =
            window.1 as f64 * tokens_per_step / window.0.elapsed().as_secs_f64().max(1e-9);
        if done % t.log_every.get() == 0 || val_loss.is_some() || done == end {
            let line = LogLine {
                step: done,
                loss,
                val_loss,
                lr,
                grad_norm,
                extras,
            };
            let timing = Timing {
                step: done,
                tokens_per_sec: tokens_per_sec.round(),
                mfu: tokens_per_sec * settings.flops_per_token / settings.peak_flops,
                elapsed_s: earlier_s + started.elapsed().as_secs_f64(),
            };
            write_line(&mut log, &line, &log_path)?;
            write_line(&mut timings, &timing, &timings_path)?;
            window = (Instant::now(), 0);
        }
        let eta = (steps - done) as f64 * tokens_per_step / tokens_per_sec.max(1e-9);
        ctx.report(
            done,
            Some(steps),
            &format!("loss {loss:.4} · {tokens_per_sec:.0} tok/s · ETA {eta:.0}s"),
        );
        if done % t.checkpoint_every.get() == 0 && done < steps {
            log.flush().map_err(|e| e.to_string())?;
            timings.flush().map_err(|e| e.to_string())?;
            save_checkpoint(model, &checkpoint, done)?;
        }
    }
    log.flush().map_err(|e| e.to_string())?;
    timings.flush().map_err(|e| e.to_string())?;
    if end < steps {
        save_checkpoint(model, &checkpoint, end)?;
        return Err(format!("stopped after step {end}"));
    }
    Ok(Outcome {
        resumed_from_step: start,
        seconds: started.elapsed().as_secs_f64(),
        log_path,
        timings_path,
    })
}

fn write_line(file: &mut std::fs::File, line: &impl Serialize, path: &Path) -> Result<(), String> {
    let text = serde_json::to_string(line).map_err(|e| e.to_string())?;
    writeln!(file, "{text}").map_err(|e| format!("{}: {e}", path.display()))
}

impl Outcome {
    /// The stage metrics every trainer reports, which the run record keeps: steps, time, resume
    /// point, the last loss and validation loss, the last logged extras, and the speed (the
    /// mean over the run, and `timings`: each logged step's).
    pub fn metrics(&self, steps: u64) -> Result<Metrics, String> {
        let log = read_log(&self.log_path)?;
        let timings = read_jsonl::<Timing>(&self.timings_path)?;
        let mut metrics = Metrics::from([
            ("steps".to_string(), steps.into()),
            ("train_seconds".to_string(), self.seconds.into()),
            (
                "resumed_from_step".to_string(),
                self.resumed_from_step.into(),
            ),
        ]);
        if let Some(mean) = mean_speed(&timings) {
            metrics.insert("tokens_per_sec".into(), mean.tokens_per_sec.round().into());
            metrics.insert("mfu".into(), mean.mfu.into());
        }
        metrics.insert(
            "timings".into(),
            serde_json::to_value(&timings).map_err(|e| e.to_string())?,
        );
        if let Some(last) = log.last() {
            metrics.insert("loss".into(), f64::from(last.loss).into());
            for (name, value) in &last.extras {
                metrics.insert(name.clone(), (*value).into());
            }
        }
        if let Some(val) = log.iter().rev().find_map(|l| l.val_loss) {
            metrics.insert("val_loss".into(), f64::from(val).into());
        }
        Ok(metrics)
    }

    /// Copies metrics.jsonl into `out` and draws the loss curves as loss.svg.
    pub fn write_log_and_curve(&self, out: &Path) -> Result<(), String> {
        std::fs::copy(&self.log_path, out.join("metrics.jsonl"))
            .map_err(|e| format!("metrics.jsonl: {e}"))?;
        let log = read_log(&self.log_path)?;
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
}

/// A seed for stream `n` of `seed` (splitmix64), so that neighbouring steps get unrelated
/// generators.
pub fn mix(seed: u64, n: u64) -> u64 {
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
fn resume(
    model: &mut dyn Backend,
    checkpoint: &Path,
    log_path: &Path,
    timings_path: &Path,
) -> Result<u64, String> {
    if !checkpoint.exists() {
        let _ = std::fs::remove_file(log_path);
        let _ = std::fs::remove_file(timings_path);
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
    cut_back(log_path, step)?;
    cut_back(timings_path, step)?;
    Ok(step)
}

/// Keeps the lines of a JSONL log up to `step`, as they were written: parsing a float and
/// printing it again may change its last digit, and the log is content of the artifact (found
/// by bench/kill-soak.py: a resumed run's `lr` differed in the 17th digit). A line cut short by
/// a kill does not parse and is dropped.
fn cut_back(path: &Path, step: u64) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Logged {
        step: u64,
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<Logged>(l).is_ok_and(|logged| logged.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(|e| format!("{}: {e}", path.display()))
}

/// The mean speed over logged steps, weighted by the steps each covers.
fn mean_speed(timings: &[Timing]) -> Option<Timing> {
    let last = timings.last()?;
    let mut previous = 0;
    let (mut tokens, mut mfu) = (0.0, 0.0);
    for t in timings {
        let steps = t.step.saturating_sub(previous) as f64;
        tokens += t.tokens_per_sec * steps;
        mfu += t.mfu * steps;
        previous = t.step;
    }
    let steps = last.step.max(1) as f64;
    Some(Timing {
        step: last.step,
        tokens_per_sec: tokens / steps,
        mfu: mfu / steps,
        elapsed_s: last.elapsed_s,
    })
}

pub fn read_log(path: &Path) -> Result<Vec<LogLine>, String> {
    read_jsonl(path)
}

/// The lines of a JSONL file in the work dir (none when it does not exist).
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, String> {
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

/// An HF model directory in `out`: config.json and model.safetensors, the tokenizer files of
/// the `tokenize` artifact in `tokens_dir`, and generation_config.json.
pub fn write_model_dir(
    model: &mut dyn Backend,
    out: &Path,
    tokens_dir: &Path,
    eos_id: u32,
) -> Result<(), String> {
    model.save_hf(out, eos_id)?;
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokens_dir.join(file), out.join(file)).map_err(|e| format!("{file}: {e}"))?;
    }
    let generation = serde_json::json!({
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "max_length": model.config().context(),
    });
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_vec_pretty(&generation).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resuming keeps the log's lines up to the checkpoint byte for byte: this `lr` is one that
    /// serde_json's parser reads an ulp off (it came back as 0.002998396213543542 in a kill
    /// soak), and a line cut short by a kill is dropped.
    #[test]
    fn a_resumed_log_keeps_its_lines_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let kept = "{\"step\":30,\"loss\":1.6939138,\"lr\":0.0029983962135435426}\n";
        let text = format!("{kept}{{\"step\":40,\"loss\":1.5}}\n{{\"step\":50,\"lo");
        std::fs::write(&path, text).unwrap();
        cut_back(&path, 30).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), kept);
    }

    #[test]
    fn the_schedule_floor_defaults_to_a_tenth_of_the_rate() {
        let low: TrainParams = serde_json::from_value(serde_json::json!({ "lr": 5e-5 })).unwrap();
        assert!(
            low.problems().is_empty(),
            "a fine-tuning rate below 1e-4 is valid"
        );
        assert!((low.min_lr() - 5e-6).abs() < 1e-15);
        let above: TrainParams =
            serde_json::from_value(serde_json::json!({ "lr": 5e-5, "min_lr": 1e-4 })).unwrap();
        let problems = above.problems();
        assert_eq!(problems[0].at, ["train.min_lr", "train.lr"]);
        assert!(
            problems[0].message.contains("is above `train.lr`"),
            "{problems:?}"
        );
    }

    #[test]
    fn zero_steps_and_a_warmup_longer_than_the_run_are_refused() {
        let zero = serde_json::from_value::<TrainParams>(serde_json::json!({ "steps": 0 }));
        assert!(zero.is_err(), "steps is a NonZeroU64");
        let negative = serde_json::from_value::<TrainParams>(serde_json::json!({ "lr": -1.0 }));
        assert!(negative.is_err());
        let short: TrainParams =
            serde_json::from_value(serde_json::json!({ "steps": 50 })).unwrap();
        let problems = short.problems();
        assert_eq!(problems[0].at, ["train.warmup", "train.steps"]);
        assert!(problems[0]
            .message
            .contains("`train.warmup` (100) is longer than `train.steps` (50)"));
    }
}
