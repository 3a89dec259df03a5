//! `dpo`: preference optimisation of a policy against a frozen reference, the input model.
//! Losses: `sigmoid` (DPO), `ipo`, `hinge` (see `model::preference`). The reference model's
//! scores of every pair are computed once, before training, kept in a memo keyed by the model
//! and data (so a rerun with another `beta` or learning rate does not recompute them) and
//! written into the artifact (`reference_logps.json`).

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{
    Dep, InputDirs, Metrics, ParamProblem, Port, Ports, Stage, StageContext, StageError,
};

use crate::finetune::examples::{self, draw, Example, Padded, Skipped};
use crate::finetune::{add_skipped, load_base, train_and_write, AdaptParams};
use crate::model::{Backend, Precision, PreferenceLoss, PreferenceLossKind, Trainer};
use crate::params::{BelowHalf, Bounded, NonNegative, Positive};
use crate::tokenize::Meta;
use crate::training::{Extras, Objective};

pub struct Dpo;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpoParams {
    #[serde(default)]
    pub loss: PreferenceLossKind,
    /// How far the policy may move from the reference (the KL penalty's inverse weight).
    #[serde(default = "default_beta")]
    pub beta: Positive<f32>,
    /// Assumed share of flipped labels (conservative DPO), below 0.5; `sigmoid` only.
    #[serde(default = "no_smoothing")]
    pub label_smoothing: Bounded<f32, BelowHalf>,
    /// Weight of a negative log-likelihood loss on the chosen answers (per token) added to the
    /// preference loss, as TRL's `rpo_alpha` (RPO): without it DPO may lower the chosen answers'
    /// likelihood too, end markers included, and the model stops ending its answers.
    #[serde(default = "no_rpo")]
    pub rpo_alpha: NonNegative<f32>,
    #[serde(flatten)]
    pub adapt: AdaptParams,
}

fn default_beta() -> Positive<f32> {
    Positive::of(0.1)
}

fn no_smoothing() -> Bounded<f32, BelowHalf> {
    Bounded::of(0.0)
}

fn no_rpo() -> NonNegative<f32> {
    NonNegative::of(0.0)
}

/// Bump when the reference scores' meaning changes (it keys their memo).
/// 2: the memo holds the f32 bytes (serde_json's default float parsing may be off by an ulp,
/// which gave a run that read the memo other metrics than one that computed the scores).
const REFERENCE_VERSION: u32 = 2;

impl Stage for Dpo {
    type Params = DpoParams;
    const KIND: &'static str = "dpo";
    // 2: no timings in metrics.jsonl (they are in the run record).
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "Preference optimisation (DPO, IPO, hinge) against the input model as frozen reference";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![
            Port {
                name: "model",
                required: false,
                many: false,
                doc: "the policy to start from, also the reference (or set `base`)",
            },
            Port {
                name: "data",
                required: true,
                many: false,
                doc: "a tokenize stage with preference pairs (preference-train, -validation)",
            },
        ])
    }

    fn external_deps(&self, params: &DpoParams, pipeline_dir: &Path) -> Result<Vec<Dep>, String> {
        params.adapt.external_deps(pipeline_dir)
    }

    fn check(&self, params: &DpoParams, wired: &[&str]) -> Vec<ParamProblem> {
        params.adapt.problems(wired)
    }

    fn check_files(&self, params: &DpoParams, pipeline_dir: &Path) -> Vec<ParamProblem> {
        params.adapt.file_problems(pipeline_dir)
    }

    fn input_checks(&self) -> Option<&'static str> {
        Some("the data has preference pairs to train and evaluate on, in the base model's vocabulary")
    }

    fn check_inputs(
        &self,
        params: &DpoParams,
        inputs: &InputDirs,
        pipeline_dir: &Path,
    ) -> Vec<ParamProblem> {
        params
            .adapt
            .input_problems(inputs, pipeline_dir, "preference")
    }

    fn run(&self, params: &DpoParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        Ok(dpo(params, ctx, None)?)
    }
}

impl DpoParams {
    fn loss(&self) -> PreferenceLoss {
        PreferenceLoss {
            kind: self.loss,
            beta: self.beta.get(),
            label_smoothing: self.label_smoothing.get(),
            nll_weight: self.rpo_alpha.get(),
        }
    }
}

fn dpo(params: &DpoParams, ctx: &StageContext, stop_after: Option<u64>) -> Result<Metrics, String> {
    let loss = params.loss();
    let t = &params.adapt.train;
    let tokens_dir = ctx.input("data").ok_or("no `data` input")?;
    let meta = Meta::read(tokens_dir)?;
    let mut metrics = Metrics::new();
    let mut model = load_base(&params.adapt, ctx, &mut metrics)?;
    let context = params.adapt.context(&model.config());
    let mut skipped = Skipped::default();
    let train = examples::pairs(tokens_dir, &meta, "train", context, &mut skipped)?;
    let validation = examples::pairs(tokens_dir, &meta, "validation", context, &mut skipped)
        .map_err(|e| format!("{e}; DPO evaluates on it"))?;
    if train.is_empty() || validation.is_empty() {
        return Err(format!(
            "no preference pair is usable: {} identical, {} with prompts that fill the context \
             of {context}",
            skipped.identical_pair, skipped.prompt_too_long
        ));
    }
    let validation: Vec<_> = validation
        .into_iter()
        .take(params.adapt.eval.batches.get() * t.batch_size.get())
        .collect();
    let reference = reference_scores(params, ctx, &meta, &train, &validation, &loss)?;
    std::fs::write(
        ctx.out_dir.join("reference_logps.json"),
        serde_json::to_vec(&reference).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("reference_logps.json: {e}"))?;
    let mean_len = train
        .iter()
        .map(|(c, r)| c.positions() + r.positions())
        .sum::<usize>() as f64
        / train.len() as f64;
    let mut objective = Preferences {
        train,
        validation,
        reference,
        loss,
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
    metrics.insert("pairs".into(), objective.train.len().into());
    add_skipped(&mut metrics, &skipped);
    Ok(metrics)
}

/// The reference model's scores, `[chosen, rejected]` per pair, for the train and validation
/// pairs.
#[derive(Serialize, Deserialize)]
struct ReferenceScores {
    train: Vec<f32>,
    validation: Vec<f32>,
}

impl ReferenceScores {
    /// The memo's bytes: the train scores' count (u64), then every score, little-endian, so
    /// that reading them back gives the very bits a run computed.
    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = (self.train.len() as u64).to_le_bytes().to_vec();
        for score in self.train.iter().chain(&self.validation) {
            bytes.extend_from_slice(&score.to_le_bytes());
        }
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Option<ReferenceScores> {
        let (count, rest) = bytes.split_first_chunk::<8>()?;
        let train = usize::try_from(u64::from_le_bytes(*count)).ok()?;
        if rest.len() % 4 != 0 || rest.len() / 4 < train {
            return None;
        }
        let mut scores: Vec<f32> = rest
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let validation = scores.split_off(train);
        Some(ReferenceScores {
            train: scores,
            validation,
        })
    }
}

/// Scores every pair with the untrained input model (before adapters change anything: a fresh
/// adapter is the identity), from the memo when this model and data were scored before.
fn reference_scores(
    params: &DpoParams,
    ctx: &StageContext,
    meta: &Meta,
    train: &[(Example, Example)],
    validation: &[(Example, Example)],
    loss: &PreferenceLoss,
) -> Result<ReferenceScores, String> {
    let base = params.adapt.base_dir(&ctx.inputs, &ctx.pipeline_dir)?;
    let weights = std::fs::read(base.join("model.safetensors"))
        .map_err(|e| format!("{}: {e}", base.display()))?;
    let key = serde_json::json!({
        "dpo_reference": REFERENCE_VERSION,
        "model": blake3::hash(&weights).to_hex().as_str(),
        "tokenizer": meta.tokenizer_hash,
        "pairs": blake3::hash(format!("{train:?}{validation:?}").as_bytes()).to_hex().as_str(),
        "average": loss.averages(),
    });
    let precision = params.adapt.train.precision;
    let key = match precision {
        // Scores in bf16 differ a little from f32 ones.
        Precision::Bf16 => serde_json::json!({ "scores": key, "precision": precision }),
        Precision::F32 => key,
    };
    let memo = ctx.memo_file(&key);
    if let Some(scores) = std::fs::read(&memo)
        .ok()
        .and_then(|bytes| ReferenceScores::from_bytes(&bytes))
    {
        return Ok(scores);
    }
    // A plain model, never trained here: the reference.
    let t = &params.adapt.train;
    let (mut reference, _) = Trainer::load(&base, params.adapt.device, t.optimizer())?;
    // In the policy's precision, so that the policy starts with zero reward margins.
    reference.set_precision(precision)?;
    let mut score = |pairs: &[(Example, Example)]| -> Vec<f32> {
        pairs
            .chunks(t.batch_size.get())
            .flat_map(|chunk| {
                let rows: Vec<&Example> = chunk.iter().flat_map(|(c, r)| [c, r]).collect();
                let padded = Padded::new(&rows, meta.eos_id);
                reference.sequence_log_probs(&padded.batch(), loss.averages())
            })
            .collect()
    };
    ctx.report(0, None, "scoring pairs with the reference model");
    let scores = ReferenceScores {
        train: score(train),
        validation: score(validation),
    };
    std::fs::create_dir_all(&ctx.memo_dir).map_err(|e| e.to_string())?;
    let tmp = memo.with_extension("tmp");
    std::fs::write(&tmp, scores.to_bytes())
        .and_then(|()| std::fs::rename(&tmp, &memo))
        .map_err(|e| format!("{}: {e}", memo.display()))?;
    Ok(scores)
}

/// The preference loss on randomly drawn pairs.
struct Preferences {
    train: Vec<(Example, Example)>,
    validation: Vec<(Example, Example)>,
    reference: ReferenceScores,
    loss: PreferenceLoss,
    batch: usize,
    pad: u32,
    mean_len: f64,
}

impl Preferences {
    /// Rows `[chosen, rejected]` per pair and their reference scores.
    fn rows(
        pairs: &[(Example, Example)],
        reference: &[f32],
        picks: &[usize],
        pad: u32,
    ) -> (Padded, Vec<f32>) {
        let rows: Vec<&Example> = picks
            .iter()
            .flat_map(|&i| [&pairs[i].0, &pairs[i].1])
            .collect();
        let scores = picks
            .iter()
            .flat_map(|&i| [reference[2 * i], reference[2 * i + 1]])
            .collect();
        (Padded::new(&rows, pad), scores)
    }
}

fn extras(stats: &crate::model::PreferenceStats) -> Extras {
    Extras::from([
        ("rewards/chosen".to_string(), f64::from(stats.chosen_reward)),
        (
            "rewards/rejected".to_string(),
            f64::from(stats.rejected_reward),
        ),
        ("rewards/accuracy".to_string(), f64::from(stats.accuracy)),
        ("rewards/margin".to_string(), f64::from(stats.margin)),
    ])
}

impl Objective for Preferences {
    fn tokens_per_micro_batch(&self) -> f64 {
        self.batch as f64 * self.mean_len
    }

    fn accumulate(&mut self, model: &mut dyn Backend, seed: u64, weight: f32) -> (f32, Extras) {
        let picks = draw(self.train.len(), self.batch, seed);
        let (padded, reference) = Self::rows(&self.train, &self.reference.train, &picks, self.pad);
        let stats = model.accumulate_preference(
            &padded.batch(),
            &reference,
            &self.loss,
            weight,
            seed ^ 0xd20f,
        );
        (stats.loss, extras(&stats))
    }

    fn evaluate(&mut self, model: &mut dyn Backend) -> (f32, Extras) {
        let (mut policy, mut reference) = (Vec::new(), Vec::new());
        let all: Vec<usize> = (0..self.validation.len()).collect();
        for picks in all.chunks(self.batch) {
            let (padded, scores) = Self::rows(
                &self.validation,
                &self.reference.validation,
                picks,
                self.pad,
            );
            policy.extend(model.sequence_log_probs(&padded.batch(), self.loss.averages()));
            reference.extend(scores);
        }
        let margins = policy
            .chunks(2)
            .zip(reference.chunks(2))
            .map(|(p, r)| f64::from((p[0] - r[0]) - (p[1] - r[1])));
        let loss = margins.map(|h| self.loss.value(h)).sum::<f64>() / self.validation.len() as f64;
        let stats = self.loss.stats(&policy, &reference, loss as f32);
        (stats.loss, extras(&stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finetune::tests::{params, setup};
    use crate::records::Record;
    use crate::testing::context;

    fn run(dir: &Path, out: &str, params: &DpoParams) -> Result<Metrics, String> {
        run_until(dir, out, params, None)
    }

    fn run_until(
        dir: &Path,
        out: &str,
        params: &DpoParams,
        stop_after: Option<u64>,
    ) -> Result<Metrics, String> {
        let (tokens, base) = (dir.join("tokens"), dir.join("base"));
        let ctx = context(out, &[("data", &tokens), ("model", &base)], &dir.join(out));
        dpo(params, &ctx, stop_after)
    }

    /// Stopped after step 3 and run again, LoRA DPO ends with the weights and adapter of a run
    /// that never stopped (the reference scores come from the memo the first attempt wrote).
    #[test]
    fn an_interrupted_dpo_resumes_exactly() {
        let dir = setup(Vec::new());
        let p = dpo_params(serde_json::json!({ "method": "lora" }));
        run(dir.path(), "whole", &p).unwrap();
        let err = run_until(dir.path(), "resumed", &p, Some(3)).unwrap_err();
        assert!(err.contains("stopped after step 3"), "{err}");
        let metrics = run(dir.path(), "resumed", &p).unwrap();
        assert_eq!(metrics["resumed_from_step"], 3);
        for file in [
            "model.safetensors",
            "adapter/adapter_model.safetensors",
            "reference_logps.json",
        ] {
            let read = |out: &str| std::fs::read(dir.path().join(out).join(file)).unwrap();
            assert_eq!(read("whole"), read("resumed"), "{file}, bit for bit");
        }
        let log = |out: &str| {
            std::fs::read_to_string(dir.path().join(out).join("metrics.jsonl")).unwrap()
        };
        let losses = |text: String| -> Vec<String> {
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].to_string())
                .collect()
        };
        assert_eq!(losses(log("whole")), losses(log("resumed")));
    }

    fn dpo_params(extra: serde_json::Value) -> DpoParams {
        let mut value = serde_json::json!({
            "method": "full",
            "train": { "steps": 6, "batch_size": 4, "warmup": 1, "lr": 1e-3, "log_every": 1 },
            "eval": { "every": 3, "batches": 2 }
        });
        for (k, v) in extra.as_object().unwrap() {
            value[k] = v.clone();
        }
        params(value)
    }

    #[test]
    fn dpo_logs_rewards_and_widens_the_margin() {
        let twins = (0..3)
            .map(|i| {
                Record::preference(
                    format!("twin{i}"),
                    "1+1?".into(),
                    "2".into(),
                    "2".into(),
                    "test",
                )
            })
            .collect();
        let dir = setup(twins);
        let metrics = run(dir.path(), "dpo", &dpo_params(serde_json::json!({}))).unwrap();
        assert_eq!(metrics["identical_pair"], 3, "{metrics:?}");
        let log: Vec<serde_json::Value> =
            std::fs::read_to_string(dir.path().join("dpo/metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        let first = &log[0];
        // The policy starts as the reference: zero rewards, loss log 2.
        assert!(
            (first["loss"].as_f64().unwrap() - 2f64.ln()).abs() < 1e-4,
            "{first}"
        );
        assert_eq!(first["rewards/margin"], 0.0);
        let last = log.last().unwrap();
        for key in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracy",
            "val_rewards/accuracy",
        ] {
            assert!(last[key].is_number(), "{key}");
        }
        // On the fixed validation batches (one training batch of four pairs is too noisy).
        assert!(last["val_rewards/margin"].as_f64().unwrap() > 0.0, "{last}");
        assert!(last["val_loss"].as_f64().unwrap() < 2f64.ln(), "{last}");
        assert!(dir.path().join("dpo/model.safetensors").exists());
        assert!(!dir.path().join("dpo/adapter").exists(), "full: no adapter");
    }

    /// A rerun with another beta takes the reference scores from the memo: planted values
    /// come back in the artifact.
    #[test]
    fn reference_scores_are_computed_once() {
        let dir = setup(Vec::new());
        let p = dir.path();
        run(p, "a", &dpo_params(serde_json::json!({ "method": "lora" }))).unwrap();
        assert!(p.join("a/adapter/adapter_config.json").exists());
        let memos: Vec<_> = std::fs::read_dir(p.join("memo")).unwrap().collect();
        assert_eq!(memos.len(), 1);
        let memo = memos[0].as_ref().unwrap().path();
        let mut scores = ReferenceScores::from_bytes(&std::fs::read(&memo).unwrap()).unwrap();
        assert_eq!(
            ReferenceScores::from_bytes(&scores.to_bytes())
                .unwrap()
                .train,
            scores.train
        );
        scores.train[0] = -1234.5;
        std::fs::write(&memo, scores.to_bytes()).unwrap();
        run(
            p,
            "b",
            &dpo_params(serde_json::json!({ "method": "lora", "beta": 0.5 })),
        )
        .unwrap();
        let stored: ReferenceScores =
            serde_json::from_slice(&std::fs::read(p.join("b/reference_logps.json")).unwrap())
                .unwrap();
        assert_eq!(stored.train[0], -1234.5);
        // IPO scores by mean log-prob: a different memo.
        run(p, "c", &dpo_params(serde_json::json!({ "loss": "ipo" }))).unwrap();
        assert_eq!(std::fs::read_dir(p.join("memo")).unwrap().count(), 2);
    }

    #[test]
    fn bad_settings_are_refused_by_their_types() {
        let refused = |extra: serde_json::Value| {
            let mut value = serde_json::json!({ "train": { "steps": 6, "warmup": 1 } });
            for (k, v) in extra.as_object().unwrap() {
                value[k] = v.clone();
            }
            serde_json::from_value::<DpoParams>(value)
                .unwrap_err()
                .to_string()
        };
        let err = refused(serde_json::json!({ "beta": 0.0 }));
        assert!(err.contains("0 is not above 0"), "{err}");
        let err = refused(serde_json::json!({ "label_smoothing": 0.7 }));
        assert!(err.contains("0.7 is not at least 0 and below 0.5"), "{err}");
        let err = refused(serde_json::json!({ "rpo_alpha": -1.0 }));
        assert!(err.contains("-1 is not at least 0"), "{err}");
    }
}
