//! `evaluate`: measures one or several model artifacts side by side on held-out data and
//! writes `metrics.json`, `report.md` and a self-contained `report.html`.
//!
//! Data comes from the `data` input (a collect or clean artifact; its validation split, or its
//! training split when it has none): text documents feed perplexity, conversations feed exact
//! match and BLEU/chrF (the last user turn is the prompt, the assistant's answer the reference),
//! preference pairs feed preference accuracy. Multiple-choice questions (and BLEU pairs) can
//! also come from JSONL files next to the pipeline. Every result carries its signature: what
//! was measured, how, on which model and tokenizer.

mod files;
mod perplexity;
pub mod report;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{
    Dep, InputDirs, Metrics, ParamProblem, Port, Ports, Stage, StageContext, StageError,
};

use crate::metrics;
use crate::model::sample::{LoadedModel, Sampling};
use crate::params::{non_empty, non_empty_schema, Positive};
use crate::records::{shards, Record, ShardLines};
use crate::tokenize::{ChatFormat, ChatTemplate};
pub use perplexity::Window;

pub struct Evaluate;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// What to measure, in order (at least one); each is measured on every model.
    #[serde(deserialize_with = "non_empty")]
    #[schemars(schema_with = "non_empty_schema::<Metric>")]
    pub metrics: Vec<Metric>,
    /// How conversations are rendered into prompts. Default: each model's own template (the
    /// one its `tokenize` stage used, or the one its base model ships).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<ChatTemplate>,
    /// Records of each kind used at most (the first ones of the split).
    #[serde(default = "default_max_examples")]
    pub max_examples: usize,
    /// A model that is no stage's output, evaluated first (as model 0): an HF directory or a
    /// GGUF file relative to the pipeline file, or `hf://org/name[@revision]` — typically the
    /// untouched model the compared stages fine-tuned (its files are hashed into the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The longest context a model sees, in tokens: perplexity windows and prompts are cut to
    /// it. Default: each model's own, which for a Llama is its `max_position_embeddings`
    /// (often thousands of tokens: set this on a CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<NonZeroUsize>,
}

fn default_max_examples() -> usize {
    200
}

fn default_max_tokens() -> usize {
    32
}

fn default_beta() -> Positive {
    Positive::of(0.1)
}

fn default_temperature() -> f32 {
    0.8
}

/// One metric and its settings.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Metric {
    /// Token-level perplexity and bits per byte of the text documents.
    Perplexity {
        /// `disjoint` (lm-evaluation-harness) or `sliding` (Hugging Face's strided guide).
        #[serde(default)]
        window: Window,
        /// Tokens a sliding window advances; default half the context.
        #[serde(default)]
        stride: Option<NonZeroUsize>,
    },
    /// Greedy answers to the conversations' last user turn, compared with the reference answer.
    ExactMatch {
        /// A regex whose first group (or whole match) is the answer, applied to both sides;
        /// without it, answers are compared with surrounding white space stripped.
        #[serde(default)]
        pattern: Option<String>,
        #[serde(default = "default_max_tokens")]
        max_tokens: usize,
    },
    /// Accuracy of picking the right choice by summed log-likelihood (`acc`) and by
    /// log-likelihood per byte (`acc_norm`). Needs `file`: JSONL lines `{"question": …,
    /// "choices": [...], "answer": index}`.
    MultipleChoice { file: String },
    /// Corpus BLEU (sacrebleu's defaults) of greedy answers against references.
    Bleu {
        /// JSONL lines `{"prompt": …, "reference": …}`; default: the data's conversations.
        #[serde(default)]
        file: Option<String>,
        #[serde(default = "default_max_tokens")]
        max_tokens: usize,
    },
    /// Corpus chrF (sacrebleu's defaults), like `bleu`.
    Chrf {
        #[serde(default)]
        file: Option<String>,
        #[serde(default = "default_max_tokens")]
        max_tokens: usize,
    },
    /// Share of preference pairs whose chosen answer the model finds likelier, and the mean DPO
    /// implicit reward margin against the first model (`beta` × log-ratio difference).
    PreferenceAccuracy {
        #[serde(default = "default_beta")]
        beta: Positive,
    },
    /// A few sampled continuations per model, for reading.
    Samples {
        prompts: Vec<String>,
        #[serde(default = "default_max_tokens")]
        max_tokens: usize,
        #[serde(default = "default_temperature")]
        temperature: f32,
        #[serde(default)]
        seed: u64,
    },
}

impl Metric {
    fn name(&self) -> &'static str {
        match self {
            Metric::Perplexity { .. } => "perplexity",
            Metric::ExactMatch { .. } => "exact_match",
            Metric::MultipleChoice { .. } => "multiple_choice",
            Metric::Bleu { .. } => "bleu",
            Metric::Chrf { .. } => "chrf",
            Metric::PreferenceAccuracy { .. } => "preference_accuracy",
            Metric::Samples { .. } => "samples",
        }
    }

    fn file(&self) -> Option<&str> {
        match self {
            Metric::MultipleChoice { file } => Some(file),
            Metric::Bleu { file, .. } | Metric::Chrf { file, .. } => file.as_deref(),
            _ => None,
        }
    }
}

/// One measured value with its signature.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Result_ {
    pub metric: String,
    /// The model's position in `models` and its artifact id.
    pub model: usize,
    pub model_artifact: String,
    pub value: f64,
    pub unit: String,
    pub signature: serde_json::Value,
}

/// metrics.json.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub models: Vec<String>,
    pub results: Vec<Result_>,
    /// Generated texts by model, for `samples`.
    pub samples: Vec<(usize, String, String)>,
    /// Every graded answer (exact match), written to `answers.jsonl` rather than here.
    #[serde(skip)]
    pub answers: Vec<GradedAnswer>,
    /// Every scored preference pair, written to `preferences.jsonl`.
    #[serde(skip)]
    pub scored_pairs: Vec<ScoredPair>,
}

/// One line of `preferences.jsonl`: a pair's summed log-probabilities under one model.
#[derive(Debug, Serialize)]
pub struct ScoredPair {
    pub model: usize,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub chosen_log_prob: f64,
    pub rejected_log_prob: f64,
}

/// One line of `answers.jsonl`: what a model answered and whether it counted, so a score can
/// be checked by reading the answers behind it.
#[derive(Debug, Serialize)]
pub struct GradedAnswer {
    pub model: usize,
    pub prompt: String,
    pub reference: String,
    pub answer: String,
    pub correct: bool,
}

impl Stage for Evaluate {
    type Params = EvaluateParams;
    const KIND: &'static str = "evaluate";
    // 2: chat prompts encoded turn by turn as training does; answers.jsonl, preferences.jsonl.
    // 3: report.md/html name models alike in tables, signatures and samples.
    // 4: each model's own chat template by default (a model's Jinja template: whole text).
    const VERSION: u32 = 4;
    const SUMMARY: &'static str =
        "Compare models: perplexity, exact match, multiple choice, BLEU/chrF, preferences";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![
            Port {
                name: "models",
                required: true,
                many: true,
                doc: "model stages (pretrain, finetune, dpo), compared side by side",
            },
            Port {
                name: "data",
                required: false,
                many: false,
                doc: "a collect or clean stage with the evaluation records",
            },
            Port {
                name: "tokenizer",
                required: false,
                many: false,
                doc: "a tokenize stage; each model's vocabulary must match it",
            },
        ])
    }

    fn external_deps(
        &self,
        params: &EvaluateParams,
        pipeline_dir: &Path,
    ) -> Result<Vec<Dep>, String> {
        let mut files = match &params.base {
            Some(base) => crate::finetune::base_model_deps(base, pipeline_dir)?,
            None => Vec::new(),
        };
        for metric in &params.metrics {
            if let Some(file) = metric.file() {
                if !pipeline_dir.join(file).is_file() {
                    return Err(format!(
                        "`{}.file`: no file {file} next to the pipeline",
                        metric.name()
                    ));
                }
                files.push(Dep::from(PathBuf::from(file)));
            }
        }
        Ok(files)
    }

    fn check(&self, params: &EvaluateParams, _wired: &[&str]) -> Vec<ParamProblem> {
        let mut problems: Vec<ParamProblem> = params
            .chat_template
            .iter()
            .flat_map(ChatTemplate::problems)
            .collect();
        for (i, metric) in params.metrics.iter().enumerate() {
            if let Metric::ExactMatch {
                pattern: Some(pattern),
                ..
            } = metric
            {
                if let Some(message) = crate::params::regex_problem(pattern) {
                    let at = format!("metrics.{i}.exact_match.pattern");
                    problems.push(ParamProblem::new(
                        &at,
                        format!("`exact_match.pattern`: {message}"),
                    ));
                }
            }
        }
        problems
    }

    fn check_files(&self, params: &EvaluateParams, pipeline_dir: &Path) -> Vec<ParamProblem> {
        let mut problems = Vec::new();
        for (i, metric) in params.metrics.iter().enumerate() {
            let Some(file) = metric.file().filter(|f| pipeline_dir.join(f).is_file()) else {
                continue;
            };
            let read = match metric {
                Metric::MultipleChoice { .. } => {
                    files::choice_questions(pipeline_dir, file).map(|_| ())
                }
                _ => files::references(pipeline_dir, file).map(|_| ()),
            };
            if let Err(e) = read {
                problems.push(ParamProblem::new(
                    &format!("metrics.{i}.{}.file", metric.name()),
                    e,
                ));
            }
        }
        problems
    }

    fn input_checks(&self) -> Option<&'static str> {
        Some("every model was trained with the `tokenizer` input's vocabulary")
    }

    fn check_inputs(
        &self,
        _params: &EvaluateParams,
        inputs: &InputDirs,
        _pipeline_dir: &Path,
    ) -> Vec<ParamProblem> {
        let Some(tokens) = inputs.get("tokenizer").and_then(|dirs| dirs.first()) else {
            return Vec::new();
        };
        let expected = match crate::tokenize::Meta::read(tokens) {
            Ok(meta) => meta.tokenizer_hash,
            Err(e) => return vec![ParamProblem::input("tokenizer", 0, e)],
        };
        let models = inputs.get("models").into_iter().flatten();
        models
            .enumerate()
            .filter_map(|(index, dir)| {
                let problem = match tokenizer_hash(dir) {
                    Ok(hash) if hash == expected => return None,
                    Ok(_) => format!(
                        "model {index} ({}) was trained with another vocabulary than the \
                         `tokenizer` input",
                        artifact_id(dir)
                    ),
                    Err(e) => format!("model {index}: {e}"),
                };
                Some(ParamProblem::input("models", index, problem))
            })
            .collect()
    }

    fn run(&self, params: &EvaluateParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        // (name in the report, where the model is): `base` first, then the input stages.
        let mut model_dirs: Vec<(String, PathBuf)> = Vec::new();
        if let Some(base) = &params.base {
            let path = crate::finetune::base_path(base, &ctx.pipeline_dir)?;
            model_dirs.push((base.clone(), path));
        }
        for dir in ctx.inputs.get("models").into_iter().flatten() {
            model_dirs.push((artifact_id(dir), dir.clone()));
        }
        let data = match ctx.input("data") {
            Some(dir) => read_records(dir, params.max_examples)?,
            None => Records::default(),
        };
        let mut report = Report {
            models: model_dirs.iter().map(|(name, _)| name.clone()).collect(),
            results: Vec::new(),
            samples: Vec::new(),
            answers: Vec::new(),
            scored_pairs: Vec::new(),
        };
        // Per model, per pair: (log p(chosen), log p(rejected)), for reward margins against model 0.
        let mut preference_log_probs: Vec<Vec<(f64, f64)>> = Vec::new();
        for (index, (name, dir)) in model_dirs.iter().enumerate() {
            let mut model = LoadedModel::open(dir)?;
            if let Some(limit) = params.context {
                model.context = model.context.min(limit.get());
            }
            let model_hash = tokenizer_hash(dir)?;
            let chat = model.chat_format(params.chat_template.as_ref())?;
            let mut measure = Measure {
                chat,
                model: &mut model,
                index,
                artifact: name.clone(),
                tokenizer_hash: model_hash,
                data: &data,
                pipeline_dir: &ctx.pipeline_dir,
                report: &mut report,
            };
            for metric in &params.metrics {
                if let Some(pairs) = measure.metric(metric)? {
                    preference_log_probs.push(pairs);
                }
            }
            ctx.report(index as u64 + 1, Some(model_dirs.len() as u64), "models");
        }
        add_reward_margins(params, &mut report, &preference_log_probs);
        std::fs::write(
            ctx.out_dir.join("metrics.json"),
            serde_json::to_vec_pretty(&report)?,
        )?;
        let curves: Vec<(String, Vec<(f64, f64)>)> = model_dirs
            .iter()
            .enumerate()
            .map(|(i, (_, dir))| {
                (
                    format!("model {i}"),
                    crate::plot::logged_series(dir, "loss"),
                )
            })
            .collect();
        write_jsonl(&ctx.out_dir.join("answers.jsonl"), &report.answers)?;
        write_jsonl(&ctx.out_dir.join("preferences.jsonl"), &report.scored_pairs)?;
        std::fs::write(ctx.out_dir.join("report.md"), report::markdown(&report))?;
        std::fs::write(
            ctx.out_dir.join("report.html"),
            report::html(&report, &curves),
        )?;
        let mut metrics = Metrics::new();
        for result in &report.results {
            metrics.insert(
                format!("{}.{}", result.metric, result.model),
                result.value.into(),
            );
        }
        Ok(metrics)
    }
}

fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<(), StageError> {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(item)?);
        text.push('\n');
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// BLAKE3 of a model directory's tokenizer.json (what a `tokenize` artifact's meta.json
/// records as `tokenizer_hash`).
fn tokenizer_hash(dir: &Path) -> Result<String, String> {
    if crate::model::gguf::is_gguf(dir) {
        let json = crate::model::gguf::Gguf::read(dir)?.tokenizer_json()?;
        return Ok(blake3::hash(json.to_string().as_bytes())
            .to_hex()
            .to_string());
    }
    let path = dir.join("tokenizer.json");
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

fn artifact_id(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The evaluation records by kind.
#[derive(Default)]
struct Records {
    texts: Vec<String>,
    /// (conversation up to the last user turn, the reference answer)
    conversations: Vec<(Vec<crate::records::Message>, String)>,
    /// (prompt, chosen, rejected)
    preferences: Vec<(String, String, String)>,
}

fn read_records(dir: &Path, limit: usize) -> Result<Records, String> {
    let mut split = shards(dir, "validation")?;
    if split.is_empty() {
        split = shards(dir, "train")?;
    }
    let mut records = Records::default();
    for shard in split {
        let mut lines = ShardLines::open(&shard)?;
        while let Some(block) = lines.next_block()? {
            for i in 0..block.lines.len() {
                records.add(block.record(i)?, limit);
            }
        }
    }
    Ok(records)
}

impl Records {
    fn add(&mut self, record: Record, limit: usize) {
        if let Some(mut messages) = record.messages {
            if messages.last().is_some_and(|m| m.role == "assistant")
                && self.conversations.len() < limit
            {
                let answer = messages.pop().expect("a last message").content;
                self.conversations.push((messages, answer));
            }
        } else if let (Some(p), Some(c), Some(r)) = (record.prompt, record.chosen, record.rejected)
        {
            if self.preferences.len() < limit {
                self.preferences.push((p, c, r));
            }
        } else if self.texts.len() < limit && !record.text.is_empty() {
            self.texts.push(record.text);
        }
    }
}

struct Measure<'a> {
    chat: ChatFormat,
    model: &'a mut LoadedModel,
    index: usize,
    artifact: String,
    tokenizer_hash: String,
    data: &'a Records,
    pipeline_dir: &'a Path,
    report: &'a mut Report,
}

impl Measure<'_> {
    fn push(&mut self, metric: &str, value: f64, unit: &str, mut signature: serde_json::Value) {
        signature["metric"] = metric.into();
        signature["model"] = self.artifact.clone().into();
        signature["tokenizer"] = self.tokenizer_hash.clone().into();
        signature["unit"] = unit.into();
        signature["dtype"] = "f32".into();
        signature["few_shot"] = 0.into();
        if signature.get("seed").is_none() {
            signature["seed"] = serde_json::Value::Null;
        }
        self.report.results.push(Result_ {
            metric: metric.to_string(),
            model: self.index,
            model_artifact: self.artifact.clone(),
            value,
            unit: unit.to_string(),
            signature,
        });
    }

    /// Measures one metric; preference accuracy also returns the pairs' log-probabilities.
    fn metric(&mut self, metric: &Metric) -> Result<Option<Vec<(f64, f64)>>, String> {
        match metric {
            Metric::Perplexity { window, stride } => self.perplexity(*window, *stride)?,
            Metric::ExactMatch {
                pattern,
                max_tokens,
            } => self.exact_match(pattern.as_deref(), *max_tokens)?,
            Metric::MultipleChoice { file } => self.multiple_choice(file)?,
            Metric::Bleu { file, max_tokens } | Metric::Chrf { file, max_tokens } => {
                self.overlap(metric.name(), file.as_deref(), *max_tokens)?
            }
            Metric::PreferenceAccuracy { .. } => return self.preferences().map(Some),
            Metric::Samples {
                prompts,
                max_tokens,
                temperature,
                seed,
            } => {
                for prompt in prompts {
                    let sampling = Sampling {
                        max_tokens: *max_tokens,
                        temperature: *temperature,
                        top_k: None,
                        seed: *seed,
                    };
                    let text = self.model.generate(prompt, &sampling)?;
                    self.report.samples.push((self.index, prompt.clone(), text));
                }
            }
        }
        Ok(None)
    }

    fn perplexity(&mut self, window: Window, stride: Option<NonZeroUsize>) -> Result<(), String> {
        if self.data.texts.is_empty() {
            return Err("perplexity: the data has no text documents".into());
        }
        let context = self.model.context;
        let stride = stride.map_or(context / 2, NonZeroUsize::get).max(1);
        let start = self
            .model
            .eos
            .ok_or("perplexity: the model has no end-of-text token to start documents with")?;
        let (mut nll, mut bytes) = (perplexity::Nll::default(), 0u64);
        for text in &self.data.texts {
            let mut ids = vec![start];
            ids.extend(self.model.encode(text)?);
            let model = &mut *self.model;
            let doc =
                perplexity::document_nll(&ids, context, window, stride, &mut |w: &[u32]| {
                    model.log_probs(w)
                });
            nll.nats += doc.nats;
            nll.tokens += doc.tokens;
            bytes += text.len() as u64;
        }
        let signature = serde_json::json!({
            "window": window, "context": context,
            "stride": (window == Window::Sliding).then_some(stride),
            "documents": self.data.texts.len(), "tokens": nll.tokens, "bytes": bytes,
        });
        self.push(
            "perplexity",
            (nll.nats / nll.tokens.max(1) as f64).exp(),
            "token",
            signature.clone(),
        );
        self.push(
            "bits_per_byte",
            nll.nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
            "bit/byte",
            signature,
        );
        Ok(())
    }

    /// Greedy answers to `(conversation, reference)` pairs, stopping at the template's end marker.
    fn answers(
        &mut self,
        pairs: &[(Vec<crate::records::Message>, String)],
        max_tokens: usize,
    ) -> Result<Vec<String>, String> {
        let template = &self.chat;
        let stop: Vec<u32> = template
            .end_of_turn(self.model.encoder())?
            .into_iter()
            .collect();
        pairs
            .iter()
            .map(|(messages, _)| {
                let ids = template.generation_prompt(self.model.encoder(), messages)?;
                let new = self
                    .model
                    .continue_ids(&ids, &Sampling::greedy(max_tokens), &stop);
                self.model.decode(&new)
            })
            .collect()
    }

    fn exact_match(&mut self, pattern: Option<&str>, max_tokens: usize) -> Result<(), String> {
        if self.data.conversations.is_empty() {
            return Err(
                "exact_match: the data has no conversations ending in an assistant answer".into(),
            );
        }
        let regex = pattern
            .map(Regex::new)
            .transpose()
            .map_err(|e| format!("exact_match.pattern: {e}"))?;
        let extract = |text: &str| -> String {
            match &regex {
                Some(regex) => regex
                    .captures(text)
                    .and_then(|c| c.get(1).or_else(|| c.get(0)))
                    .map_or(String::new(), |m| m.as_str().trim().to_string()),
                None => text.trim().to_string(),
            }
        };
        let answers = self.answers(&self.data.conversations, max_tokens)?;
        let mut correct = 0;
        for (answer, (messages, reference)) in answers.iter().zip(&self.data.conversations) {
            let right = extract(answer) == extract(reference);
            correct += usize::from(right);
            self.report.answers.push(GradedAnswer {
                model: self.index,
                prompt: messages.last().map_or(String::new(), |m| m.content.clone()),
                reference: reference.clone(),
                answer: answer.clone(),
                correct: right,
            });
        }
        let n = answers.len();
        let signature = serde_json::json!({ "examples": n, "extract": pattern.unwrap_or("strip"), "max_tokens": max_tokens, "decoding": "greedy" });
        self.push(
            "exact_match",
            correct as f64 / n as f64,
            "fraction",
            signature,
        );
        Ok(())
    }

    fn multiple_choice(&mut self, file: &str) -> Result<(), String> {
        let questions = files::choice_questions(self.pipeline_dir, file)?;
        let (mut correct, mut correct_norm) = (0, 0);
        for item in &questions {
            let context = self.model.encode(&item.question)?;
            let mut scores = Vec::new();
            for choice in &item.choices {
                // As lm-evaluation-harness: the choice follows the question after a space.
                let continuation = self.model.encode(&format!(" {choice}"))?;
                let log_prob = self.model.continuation_log_prob(&context, &continuation);
                scores.push((log_prob, choice.len() + 1));
            }
            let (pick, pick_norm) = choose(&scores);
            correct += usize::from(pick == item.answer);
            correct_norm += usize::from(pick_norm == item.answer);
        }
        let n = questions.len();
        let signature = serde_json::json!({ "examples": n, "file": file, "delimiter": " " });
        self.push(
            "multiple_choice.acc",
            correct as f64 / n as f64,
            "fraction",
            signature.clone(),
        );
        self.push(
            "multiple_choice.acc_norm",
            correct_norm as f64 / n as f64,
            "fraction",
            signature,
        );
        Ok(())
    }

    /// BLEU or chrF of greedy answers.
    fn overlap(
        &mut self,
        metric: &str,
        file: Option<&str>,
        max_tokens: usize,
    ) -> Result<(), String> {
        let pairs: Vec<(Vec<crate::records::Message>, String)> = match file {
            Some(file) => files::references(self.pipeline_dir, file)?
                .into_iter()
                .map(|item| {
                    let user = crate::records::Message {
                        role: "user".into(),
                        content: item.prompt,
                    };
                    (vec![user], item.reference)
                })
                .collect(),
            None => self.data.conversations.clone(),
        };
        if pairs.is_empty() {
            return Err(format!(
                "{metric}: no references (give `file`, or data with conversations)"
            ));
        }
        let hypotheses = self.answers(&pairs, max_tokens)?;
        let references = vec![pairs.iter().map(|p| p.1.clone()).collect::<Vec<_>>()];
        let (value, signature) = if metric == "bleu" {
            let bleu = metrics::corpus_bleu(&hypotheses, &references)?;
            (bleu.score, bleu.signature)
        } else {
            let chrf = metrics::corpus_chrf(&hypotheses, &references, 0)?;
            (chrf.score, chrf.signature)
        };
        let signature = serde_json::json!({ "sacrebleu": signature, "examples": pairs.len(), "decoding": "greedy", "max_tokens": max_tokens });
        self.push(metric, value, "score", signature);
        Ok(())
    }

    fn preferences(&mut self) -> Result<Vec<(f64, f64)>, String> {
        if self.data.preferences.is_empty() {
            return Err("preference_accuracy: the data has no preference pairs".into());
        }
        let mut pairs = Vec::new();
        for (prompt, chosen, rejected) in &self.data.preferences {
            let mut score = |answer: &str| -> Result<f64, String> {
                let (context, continuation) =
                    self.chat
                        .scored_answer(self.model.encoder(), prompt, answer)?;
                Ok(self.model.continuation_log_prob(&context, &continuation))
            };
            let scores = (score(chosen)?, score(rejected)?);
            self.report.scored_pairs.push(ScoredPair {
                model: self.index,
                prompt: prompt.clone(),
                chosen: chosen.clone(),
                rejected: rejected.clone(),
                chosen_log_prob: scores.0,
                rejected_log_prob: scores.1,
            });
            pairs.push(scores);
        }
        let accuracy = pairs.iter().filter(|(c, r)| c > r).count() as f64 / pairs.len() as f64;
        let margin = pairs.iter().map(|(c, r)| c - r).sum::<f64>() / pairs.len() as f64;
        let signature = serde_json::json!({ "examples": pairs.len(), "score": "summed log-probability of the answer and end marker" });
        self.push(
            "preference_accuracy",
            accuracy,
            "fraction",
            signature.clone(),
        );
        self.push("log_prob_margin", margin, "nats", signature);
        Ok(pairs)
    }
}

/// The choice with the highest summed log-likelihood, and the one with the highest per byte
/// (`acc_norm`), from (log-likelihood, bytes) per choice; the first wins a tie.
fn choose(scores: &[(f64, usize)]) -> (usize, usize) {
    let best = |key: &dyn Fn(&(f64, usize)) -> f64| {
        (0..scores.len()).fold(0, |best, i| {
            if key(&scores[i]) > key(&scores[best]) {
                i
            } else {
                best
            }
        })
    };
    (best(&|s| s.0), best(&|s| s.0 / s.1 as f64))
}

/// The mean DPO implicit reward margin of each model against model 0 (the reference):
/// `beta · ((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)))`.
fn add_reward_margins(params: &EvaluateParams, report: &mut Report, log_probs: &[Vec<(f64, f64)>]) {
    let Some(beta) = params.metrics.iter().find_map(|m| match m {
        Metric::PreferenceAccuracy { beta } => Some(beta.get()),
        _ => None,
    }) else {
        return;
    };
    let Some(reference) = log_probs.first() else {
        return;
    };
    for (index, pairs) in log_probs.iter().enumerate().skip(1) {
        let margin = pairs
            .iter()
            .zip(reference)
            .map(|((c, r), (rc, rr))| beta * ((c - rc) - (r - rr)))
            .sum::<f64>()
            / pairs.len().max(1) as f64;
        report.results.push(Result_ {
            metric: "reward_margin".into(),
            model: index,
            model_artifact: report.models[index].clone(),
            value: margin,
            unit: "nats".into(),
            signature: serde_json::json!({ "metric": "reward_margin", "beta": beta, "reference_model": report.models[0], "examples": pairs.len() }),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::synthetic::{generate, Generator as Synthetic};
    use crate::pretrain::Pretrain;
    use crate::testing::{context, write_corpus};
    use crate::tokenize::Tokenize;

    /// `dir/corpus` (stories, chat, preferences), `dir/tokens`, and models trained 4 and 60 steps.
    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let corpus = p.join("corpus");
        std::fs::create_dir(&corpus).unwrap();
        let mut records: Vec<Record> = generate(Synthetic::Stories, 80, 1).collect();
        records.extend(generate(Synthetic::Chat, 30, 1));
        records.extend(generate(Synthetic::Preferences, 30, 1));
        let validation: Vec<Record> = records.iter().step_by(5).cloned().collect();
        write_corpus(&corpus, &records, &validation);
        let run = |stage: &dyn Fn(&StageContext), name: &str, inputs: &[(&str, &Path)]| {
            stage(&context(name, inputs, &p.join(name)));
        };
        let tokens: crate::tokenize::TokenizeParams =
            serde_json::from_value(serde_json::json!({ "train": { "vocab_size": 300 } })).unwrap();
        run(
            &|ctx| {
                Tokenize.run(&tokens, ctx).unwrap();
            },
            "tokens",
            &[("corpus", &corpus)],
        );
        for steps in [4, 60] {
            let params: crate::pretrain::PretrainParams =
                serde_json::from_value(serde_json::json!({
                    "model": { "layers": 1, "heads": 2, "d_model": 32, "seq_len": 32 },
                    "train": { "steps": steps, "batch_size": 8, "warmup": 2, "lr": 3e-3 },
                    "eval": { "every": 100, "batches": 1 }
                }))
                .unwrap();
            let tokens_dir = p.join("tokens");
            run(
                &|ctx| {
                    Pretrain.run(&params, ctx).unwrap();
                },
                &format!("model{steps}"),
                &[("tokens", &tokens_dir)],
            );
        }
        std::fs::write(
            p.join("mc.jsonl"),
            "{\"question\": \"The cat sat on the\", \"choices\": [\"mat\", \"zzqx\"], \"answer\": 0}\n\
             {\"question\": \"Once upon a\", \"choices\": [\"time\", \"qqq\", \"xx\"], \"answer\": 0}\n",
        )
        .unwrap();
        dir
    }

    fn evaluate(dir: &Path, params: serde_json::Value, tokenizer: bool) -> Result<Report, String> {
        let params: EvaluateParams = serde_json::from_value(params).map_err(|e| e.to_string())?;
        let p = dir;
        let mut ctx = context("eval", &[("data", &p.join("corpus"))], &p.join("eval"));
        ctx.inputs
            .insert("models".into(), vec![p.join("model4"), p.join("model60")]);
        if tokenizer {
            ctx.inputs
                .insert("tokenizer".into(), vec![p.join("tokens")]);
        }
        Evaluate.external_deps(&params, p)?;
        let params = serde_json::to_value(&params).unwrap();
        smelt_engine::DynStage::run(&Evaluate, &params, &ctx).map_err(|e| e.to_string())?;
        Ok(serde_json::from_slice(&std::fs::read(p.join("eval/metrics.json")).unwrap()).unwrap())
    }

    #[test]
    fn models_are_compared_on_every_metric() {
        let dir = setup();
        let report = evaluate(
            dir.path(),
            serde_json::json!({ "metrics": [
                { "perplexity": {} }, { "perplexity": { "window": "sliding", "stride": 8 } },
                { "exact_match": { "max_tokens": 8 } }, { "multiple_choice": { "file": "mc.jsonl" } },
                { "bleu": { "max_tokens": 8 } }, { "chrf": { "max_tokens": 8 } },
                { "preference_accuracy": {} }, { "samples": { "prompts": ["Once"], "max_tokens": 5 } }
            ] }),
            true,
        )
        .unwrap();
        let value = |metric: &str, model: usize, window: &str| {
            report
                .results
                .iter()
                .find(|r| {
                    r.metric == metric
                        && r.model == model
                        && (window.is_empty() || r.signature["window"] == window)
                })
                .unwrap_or_else(|| panic!("{metric} {model}"))
                .value
        };
        // More training, lower perplexity, in both conventions.
        assert!(value("perplexity", 1, "disjoint") < value("perplexity", 0, "disjoint"));
        assert!(value("perplexity", 1, "sliding") < value("perplexity", 0, "sliding"));
        let tokens = |window: &str| {
            let r = report
                .results
                .iter()
                .find(|r| r.metric == "perplexity" && r.signature["window"] == window)
                .unwrap();
            r.signature["tokens"].clone()
        };
        assert_eq!(
            tokens("disjoint"),
            tokens("sliding"),
            "the same tokens are scored"
        );
        for metric in [
            "exact_match",
            "multiple_choice.acc",
            "multiple_choice.acc_norm",
            "preference_accuracy",
        ] {
            for model in [0, 1] {
                assert!((0.0..=1.0).contains(&value(metric, model, "")), "{metric}");
            }
        }
        assert!(value("bleu", 1, "") >= 0.0 && value("chrf", 1, "") >= 0.0);
        assert!(report
            .results
            .iter()
            .any(|r| r.metric == "reward_margin" && r.model == 1));
        let ppl = report
            .results
            .iter()
            .find(|r| r.metric == "perplexity")
            .unwrap();
        for key in [
            "model",
            "tokenizer",
            "window",
            "context",
            "unit",
            "dtype",
            "few_shot",
        ] {
            assert!(!ppl.signature[key].is_null(), "signature lacks {key}");
        }
        assert_eq!(report.samples.len(), 2);
        let html = std::fs::read_to_string(dir.path().join("eval/report.html")).unwrap();
        assert!(
            html.contains("<svg") && html.contains("perplexity") && html.contains("Training loss")
        );
        let md = std::fs::read_to_string(dir.path().join("eval/report.md")).unwrap();
        assert!(md.contains("| perplexity |"), "{md}");
    }

    #[test]
    fn multiple_choice_scores_by_sum_and_by_byte() {
        // "a" (2 bytes with its space) at -3 nats beats "bbbbbbb" (8 bytes) at -4 by sum, but
        // loses per byte: -1.5 against -0.5.
        assert_eq!(choose(&[(-3.0, 2), (-4.0, 8)]), (0, 1));
        assert_eq!(
            choose(&[(-1.0, 4), (-1.0, 4)]),
            (0, 0),
            "ties go to the first"
        );
        assert_eq!(choose(&[(-9.0, 3), (-2.0, 3), (-5.0, 3)]), (1, 1));
    }

    #[test]
    fn bad_evaluation_input_is_a_clear_error() {
        let dir = setup();
        std::fs::write(
            dir.path().join("one.jsonl"),
            "{\"question\": \"q\", \"choices\": [\"only\"], \"answer\": 0}\n",
        )
        .unwrap();
        let err = evaluate(
            dir.path(),
            serde_json::json!({ "metrics": [ { "multiple_choice": { "file": "one.jsonl" } } ] }),
            false,
        )
        .unwrap_err();
        assert!(
            err.contains("one.jsonl:1: `choices` needs at least two strings"),
            "{err}"
        );
        let err = evaluate(
            dir.path(),
            serde_json::json!({ "metrics": [ { "multiple_choice": { "file": "nope.jsonl" } } ] }),
            false,
        )
        .unwrap_err();
        assert!(err.contains("no file nope.jsonl"), "{err}");
        let err = evaluate(dir.path(), serde_json::json!({ "metrics": [] }), false).unwrap_err();
        assert!(err.contains("the list is empty"), "{err}");
        // A tokenizer input with another vocabulary.
        let other = dir.path().join("tokens/meta.json");
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&other).unwrap()).unwrap();
        meta["tokenizer_hash"] = "0000".into();
        std::fs::write(&other, serde_json::to_vec(&meta).unwrap()).unwrap();
        let err = evaluate(
            dir.path(),
            serde_json::json!({ "metrics": [ { "perplexity": {} } ] }),
            true,
        )
        .unwrap_err();
        assert!(err.contains("another vocabulary"), "{err}");
    }
}
