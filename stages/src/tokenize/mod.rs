//! `tokenize`: trains a vocabulary (or loads one), encodes the corpus in parallel, and writes
//! token shards, an HF `tokenizer.json` and `meta.json`.
//!
//! Records become three kinds of streams, per split:
//! - text documents → `train-*.bin` / `validation-*.bin`: documents with the end-of-text token
//!   after each (or nothing between them, with `separator: none`), for pretraining;
//! - conversations → `chat-<split>-*.bin` with a `.mask` (1 on assistant tokens) for SFT;
//! - preference pairs → `preference-<split>-*.bin` with masks: two sequences per pair, the
//!   chosen answer first, for DPO.
//!
//! Documents are encoded in parallel a block at a time and written in corpus order, so the
//! output does not depend on the thread count.

mod chat;
mod encoder;
mod jinja;
mod pretokenize;
pub mod shards;
pub mod shipped;
mod train;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::model::hub;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::{
    Dep, InputDirs, Metrics, ParamProblem, Port, Ports, Stage, StageContext, StageError,
};
use thread_local::ThreadLocal;
use tokenizers::Tokenizer;

pub use chat::{ChatFormat, ChatTemplate, Example, Markers, Shipped, ShippedTemplate};
pub use encoder::{byte_chars, Encoder};
pub use shards::{Dtype, Stream};
pub use train::{ModelKind, TrainParams};

use crate::records::{shards as record_shards, Record, ShardLines};
use shards::TokenWriter;

pub struct Tokenize;

/// Params of a `tokenize` stage. The vocabulary comes from `train` (the default), `from`, or
/// the `tokenizer` input — exactly one.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeParams {
    /// Train a vocabulary on the corpus's training split.
    #[serde(default)]
    pub train: Option<TrainParams>,
    /// An HF `tokenizer.json` to use instead, a model directory or GGUF model file (its
    /// tokenizer and chat template), relative to the pipeline file, or `hf://org/name` (a model
    /// in the Hugging Face cache); its content is part of the stage key.
    #[serde(default)]
    pub from: Option<String>,
    /// How conversations and preference pairs are rendered: `model` (the template the
    /// tokenizer's model ships), `{ jinja: ... }`, or turn markers `{ turn_start, turn_end }`.
    /// Default: the model's template when the tokenizer comes with one, else ChatML markers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<ChatTemplate>,
    /// Longest fine-tuning sequence, in tokens: longer conversations and pairs are cut (and
    /// counted in meta.json).
    #[serde(default = "default_max_length")]
    pub max_length: NonZeroUsize,
    /// The token after every pretraining document.
    #[serde(default = "default_eos")]
    pub eos_token: String,
    /// What separates pretraining documents: `eos` (the `eos_token`), or `none` for documents
    /// that are consecutive pieces of one text (collect's `split_on: chunk`).
    #[serde(default)]
    pub separator: Separator,
    /// Tokens per shard file at most.
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: NonZeroU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Separator {
    #[default]
    Eos,
    None,
}

fn default_max_length() -> NonZeroUsize {
    NonZeroUsize::new(1024).expect("not zero")
}

fn default_eos() -> String {
    "<|endoftext|>".into()
}

fn default_shard_tokens() -> NonZeroU64 {
    NonZeroU64::new(1 << 28).expect("not zero")
}

impl TokenizeParams {
    /// Why the vocabulary's source is ambiguous: `train`, `from` and a wired `tokenizer` input
    /// exclude each other.
    fn source_problem(&self, tokenizer_input: bool) -> Option<ParamProblem> {
        match (&self.train, &self.from) {
            (Some(_), Some(_)) => Some(
                ParamProblem::new("from", "give either `train` or `from`, not both").or_at("train"),
            ),
            (Some(_), None) | (None, Some(_)) if tokenizer_input => Some(ParamProblem::new(
                if self.from.is_some() { "from" } else { "train" },
                "the vocabulary comes from the `tokenizer` input here: remove `from` and \
                     `train`",
            )),
            _ => None,
        }
    }
}

/// meta.json: what the shards hold and how to read them.
#[derive(Debug, Serialize, Deserialize)]
pub struct Meta {
    pub tokenizer: String,
    /// BLAKE3 of tokenizer.json.
    pub tokenizer_hash: String,
    pub vocab_size: usize,
    pub dtype: Dtype,
    pub eos_id: u32,
    pub special_tokens: BTreeMap<String, u32>,
    /// Streams by name: `train`, `validation`, `chat-train`, `preference-validation`, …
    pub streams: BTreeMap<String, Stream>,
    pub max_length: usize,
    pub stats: Stats,
}

impl Meta {
    pub fn read(dir: &Path) -> Result<Meta, String> {
        let path = dir.join("meta.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e} (is it a tokenize stage's output?)", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Corpus statistics, in meta.json.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub documents: u64,
    /// UTF-8 bytes of text per token, over text documents (end-of-text tokens not counted).
    pub bytes_per_token: f64,
    /// Share of tokens that are the unknown token (`None` when the vocabulary has none).
    pub unknown_rate: Option<f64>,
    /// Text documents by token count: `[at_least, documents]` for each power-of-two bucket.
    pub tokens_per_document: Vec<(u64, u64)>,
    pub conversations: u64,
    pub preference_pairs: u64,
    /// Fine-tuning examples cut to `max_length`.
    pub truncated: u64,
    /// Fine-tuning examples (or pairs) with no token to train on, left out.
    pub zero_trainable: u64,
    /// Which encoder ran: a fast path or `tokenizers`.
    pub encoder: String,
}

impl Stage for Tokenize {
    type Params = TokenizeParams;
    const KIND: &'static str = "tokenize";
    // 2: chat turns keep a marker's trailing space with the content (running-text ids).
    // 3: no timings in meta.json (they are in the run record).
    // 4: the model's own chat template by default; markers recorded in tokenizer_config.json.
    const VERSION: u32 = 4;
    const SUMMARY: &'static str =
        "Train or load a tokenizer and encode the corpus into token shards";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![
            Port {
                name: "corpus",
                required: true,
                many: false,
                doc: "a collect or clean stage",
            },
            Port {
                name: "tokenizer",
                required: false,
                many: false,
                doc: "a tokenize stage whose vocabulary to reuse, or a model stage (its \
                      tokenizer and chat template)",
            },
        ])
    }

    fn external_deps(
        &self,
        params: &TokenizeParams,
        pipeline_dir: &Path,
    ) -> Result<Vec<Dep>, String> {
        let Some(from) = &params.from else {
            return Ok(Vec::new());
        };
        let path = from_path(from, pipeline_dir)?;
        if !path.is_file() {
            return Err(format!(
                "`from`: no file {} next to the pipeline",
                path.display()
            ));
        }
        // The tokenizer and the files its chat template may come from, named as written (for
        // `hf://`, not the cache's place).
        let mut deps = vec![dep(from, &path, pipeline_dir)];
        if !crate::model::gguf::is_gguf(&path) {
            for file in ["tokenizer_config.json", "chat_template.jinja"] {
                let beside = path.with_file_name(file);
                if beside.is_file() {
                    deps.push(dep(from, &beside, pipeline_dir));
                }
            }
        }
        Ok(deps)
    }

    fn check(&self, params: &TokenizeParams, wired: &[&str]) -> Vec<ParamProblem> {
        let mut problems: Vec<ParamProblem> = params
            .source_problem(wired.contains(&"tokenizer"))
            .into_iter()
            .collect();
        if params.from.is_none() && !wired.contains(&"tokenizer") {
            let train = params.train.clone().unwrap_or_default();
            problems.extend(train.problems());
            if !train.may_have(&params.eos_token) {
                let problem = ParamProblem::new(
                    "eos_token",
                    format!(
                        "`eos_token` `{}` is not one of `train.special_tokens`, so the trained \
                         vocabulary would not have it",
                        params.eos_token
                    ),
                );
                problems.push(
                    problem
                        .or_at("train.special_tokens")
                        .help("add it to `train.special_tokens`, or name one of those"),
                );
            }
        }
        problems.extend(params.chat_template.iter().flat_map(ChatTemplate::problems));
        problems
    }

    fn check_files(&self, params: &TokenizeParams, pipeline_dir: &Path) -> Vec<ParamProblem> {
        let Some(from) = params.from.as_deref() else {
            return Vec::new();
        };
        let path = match from_path(from, pipeline_dir) {
            Ok(path) => path,
            Err(e) => return vec![ParamProblem::new("from", e)],
        };
        if !path.is_file() {
            return Vec::new();
        }
        let (tokenizer, _) = match read_tokenizer(&path, Path::new(from)) {
            Ok(loaded) => loaded,
            Err(e) => return vec![ParamProblem::new("from", e)],
        };
        let mut problems: Vec<ParamProblem> = eos_problem(params, &tokenizer, "from")
            .into_iter()
            .collect();
        let format = shipped::shipped_with(&path)
            .and_then(|shipped| ChatFormat::resolve(params.chat_template.as_ref(), &shipped));
        if let Err(e) = format {
            problems.push(ParamProblem::new("chat_template", e).or_at("from"));
        }
        problems
    }

    fn input_checks(&self) -> Option<&'static str> {
        Some(
            "`train.vocab_size` holds the corpus's characters; the `tokenizer` input has the \
             `eos_token`",
        )
    }

    fn check_inputs(
        &self,
        params: &TokenizeParams,
        inputs: &InputDirs,
        _pipeline_dir: &Path,
    ) -> Vec<ParamProblem> {
        if let Some(dir) = inputs.get("tokenizer").and_then(|d| d.first()) {
            let path = dir.join("tokenizer.json");
            let loaded = std::fs::read_to_string(&path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|json| load_tokenizer(json, &path));
            return match loaded {
                Ok((tokenizer, _)) => eos_problem(params, &tokenizer, "eos_token")
                    .map(|p| ParamProblem {
                        input: Some(("tokenizer".into(), 0)),
                        ..p
                    })
                    .into_iter()
                    .collect(),
                Err(e) => vec![ParamProblem::input("tokenizer", 0, e)],
            };
        }
        let (Some(train), Some(dir)) =
            (&params.train, inputs.get("corpus").and_then(|d| d.first()))
        else {
            return Vec::new();
        };
        train.alphabet_problems(&Corpus { dir: dir.clone() })
    }

    fn run(&self, params: &TokenizeParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        let corpus = Corpus {
            dir: ctx
                .input("corpus")
                .ok_or("no `corpus` input")?
                .to_path_buf(),
        };
        let started = Instant::now();
        let (tokenizer, json, shipped) = tokenizer(params, ctx, &corpus)?;
        let train_seconds = started.elapsed().as_secs_f64();
        let encoder = Encoder::new(&tokenizer)?;
        let chat = ChatFormat::resolve(params.chat_template.as_ref(), &shipped)?;
        if let Some(problem) = eos_problem(params, &tokenizer, "eos_token") {
            return Err(problem.to_string().into());
        }
        let eos_id = tokenizer
            .token_to_id(&params.eos_token)
            .ok_or("no eos token")?;
        let vocab_size = vocab_size(&tokenizer);
        let unknown = unknown_id(&json);
        let mut encoding = Encoding {
            params,
            encoder: &encoder,
            chat: &chat,
            eos_id,
            unknown,
            dtype: Dtype::for_vocab(vocab_size),
            out: &ctx.out_dir,
            tally: Tally::default(),
        };
        let started = Instant::now();
        let mut streams = BTreeMap::new();
        for split in ["train", "validation"] {
            streams.extend(encoding.split(&corpus, split, ctx)?);
        }
        let encode_seconds = started.elapsed().as_secs_f64();
        if encoding.tally.documents == 0 {
            return Err("the corpus has no documents".into());
        }
        std::fs::write(ctx.out_dir.join("tokenizer.json"), &json)?;
        std::fs::write(
            ctx.out_dir.join("tokenizer_config.json"),
            serde_json::to_vec_pretty(&tokenizer_config(params, &tokenizer, unknown, &chat))?,
        )?;
        // Timings go to the run record (the returned metrics), not into meta.json: the artifact
        // must be a function of the stage key.
        let stats = encoding.tally.stats(&encoder, unknown.is_some());
        let tokens: u64 = streams.values().map(|s: &Stream| s.tokens).sum();
        let meta = Meta {
            tokenizer: "tokenizer.json".into(),
            tokenizer_hash: blake3::hash(json.as_bytes()).to_hex().to_string(),
            vocab_size,
            dtype: encoding.dtype,
            eos_id,
            special_tokens: special_tokens(&json),
            streams,
            max_length: params.max_length.get(),
            stats,
        };
        std::fs::write(
            ctx.out_dir.join("meta.json"),
            serde_json::to_vec_pretty(&meta)?,
        )?;
        let stream_tokens = |name: &str| meta.streams.get(name).map_or(0, |s| s.tokens);
        Ok(Metrics::from([
            ("vocab_size".to_string(), vocab_size.into()),
            ("train_tokens".to_string(), stream_tokens("train").into()),
            (
                "validation_tokens".to_string(),
                stream_tokens("validation").into(),
            ),
            (
                "bytes_per_token".to_string(),
                meta.stats.bytes_per_token.into(),
            ),
            ("train_seconds".to_string(), train_seconds.into()),
            ("encode_seconds".to_string(), encode_seconds.into()),
            (
                "encode_tokens_per_second".to_string(),
                (tokens as f64 / encode_seconds.max(1e-9)).round().into(),
            ),
        ]))
    }
}

/// The tokenizer, its JSON (written out unchanged when loaded), and what its model ships for
/// chat.
fn tokenizer(
    params: &TokenizeParams,
    ctx: &StageContext,
    corpus: &Corpus,
) -> Result<(Tokenizer, String, Shipped), String> {
    let load = |path: &Path| -> Result<_, String> {
        let (tokenizer, json) = read_tokenizer(path, path)?;
        Ok((tokenizer, json, shipped::shipped_with(path)?))
    };
    let wired = ctx.input("tokenizer");
    if let Some(problem) = params.source_problem(wired.is_some()) {
        return Err(problem.to_string());
    }
    match (&params.from, wired, &params.train) {
        (Some(from), _, _) => load(&from_path(from, &ctx.pipeline_dir)?),
        (None, Some(dir), _) => load(&dir.join("tokenizer.json")),
        (None, None, train) => {
            let tokenizer = train::train(&train.clone().unwrap_or_default(), corpus)?;
            let json = tokenizer
                .to_string(false)
                .map_err(|e| format!("cannot serialise the tokenizer: {e}"))?;
            Ok((tokenizer, json, Shipped::default()))
        }
    }
}

/// A dependency on `path`, a file `from` names: named after `from` and the file.
fn dep(from: &str, path: &Path, pipeline_dir: &Path) -> Dep {
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
    let name = match (hub::is_hub(from), file) {
        (true, Some(file)) => format!("{from}/{file}"),
        _ => path
            .strip_prefix(pipeline_dir)
            .unwrap_or(path)
            .display()
            .to_string(),
    };
    Dep {
        name,
        path: path.to_path_buf(),
    }
}

/// Why `tokenizer` cannot end documents with the `eos_token`: it has no such token. `or_at`:
/// the param pointed at when `eos_token` is not written.
fn eos_problem(
    params: &TokenizeParams,
    tokenizer: &Tokenizer,
    or_at: &str,
) -> Option<ParamProblem> {
    if tokenizer.token_to_id(&params.eos_token).is_some() {
        return None;
    }
    let mut specials: Vec<(u32, String)> = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, token)| token.special)
        .map(|(id, token)| (id, token.content))
        .collect();
    specials.sort();
    let names: Vec<String> = specials
        .iter()
        .take(8)
        .map(|(_, t)| format!("`{t}`"))
        .collect();
    let help = match names.is_empty() {
        true => "set `eos_token` to a token it has".to_string(),
        false => format!(
            "set `eos_token` to one of its special tokens: {}",
            names.join(", ")
        ),
    };
    let message = format!(
        "the tokenizer has no `{}` token to end documents with",
        params.eos_token
    );
    Some(
        ParamProblem::new("eos_token", message)
            .or_at(or_at)
            .help(help),
    )
}

/// Where `from`'s tokenizer is: a file next to the pipeline (a tokenizer.json or a GGUF
/// model), the tokenizer.json of a model directory there, or of a model in the Hugging Face
/// cache (`hf://org/name`).
fn from_path(from: &str, pipeline_dir: &Path) -> Result<PathBuf, String> {
    let path = match hub::is_hub(from) {
        true => hub::resolve(from)?,
        false => pipeline_dir.join(from),
    };
    Ok(match path.is_dir() {
        true => path.join("tokenizer.json"),
        false => path,
    })
}

/// The tokenizer of `path`: a tokenizer.json, or the one a GGUF model file carries (its
/// vocabulary and merges); `shown` names it in errors.
fn read_tokenizer(path: &Path, shown: &Path) -> Result<(Tokenizer, String), String> {
    let json = if crate::model::gguf::is_gguf(path) {
        let file = crate::model::gguf::Gguf::read(path)?;
        let json = file
            .tokenizer_json()
            .map_err(|e| format!("{}: {e}", shown.display()))?;
        json.to_string()
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", shown.display()))?
    };
    load_tokenizer(json, shown)
}

/// A user's tokenizer.json (read from `path`) as `tokenizers` loads it.
fn load_tokenizer(json: String, path: &Path) -> Result<(Tokenizer, String), String> {
    let fail = |e: String| {
        format!(
            "{}: not a tokenizer.json `tokenizers` can load: {e}",
            path.display()
        )
    };
    // Syntax first, for a plain message (and `tokenizers` panics on some syntax errors).
    serde_json::from_str::<serde::de::IgnoredAny>(&json).map_err(|e| fail(e.to_string()))?;
    // Found by fuzz/ (tokenizer_json): `tokenizers` 0.22 also panics on some valid JSON (an
    // `expect` in its normalizer and decoder deserializers).
    let tokenizer = crate::catch_panic(|| Tokenizer::from_bytes(json.as_bytes()))
        .map_err(&fail)?
        .map_err(|e| fail(e.to_string()))?;
    Ok((tokenizer, json))
}

/// What `run` does with a tokenizer.json before it reads the corpus (load it, choose the
/// encoder, find the end-of-text, unknown and special tokens, write tokenizer_config.json),
/// then `texts` encoded as the corpus would be: their ids and the vocabulary size the stage
/// records, or the stage's error.
#[doc(hidden)]
pub fn load_and_encode(
    json: String,
    eos_token: &str,
    texts: &[&str],
) -> Result<(Vec<u32>, usize), String> {
    let path = Path::new("tokenizer.json");
    let (tokenizer, json) = load_tokenizer(json, path)?;
    let encoder = Encoder::new(&tokenizer)?;
    let unknown = unknown_id(&json);
    let _ = special_tokens(&json);
    let params: TokenizeParams = serde_json::from_value(serde_json::json!({
        "from": "tokenizer.json", "eos_token": eos_token
    }))
    .map_err(|e| e.to_string())?;
    let chat = ChatFormat::resolve(None, &Shipped::default())?;
    let _ = tokenizer_config(&params, &tokenizer, unknown, &chat);
    let mut ids = Vec::new();
    for text in texts {
        encoder.encode(text, &mut ids)?;
    }
    let eos = tokenizer
        .token_to_id(eos_token)
        .ok_or_else(|| format!("no `{eos_token}` token"))?;
    ids.push(eos);
    Ok((ids, vocab_size(&tokenizer)))
}

/// The vocabulary size recorded in meta.json: what the model's embedding needs, one more than
/// the largest id. A loaded tokenizer.json may leave holes in its ids (`tokenizers` only warns),
/// and then it holds fewer tokens than that: counting them would give ids beyond the
/// embedding, and u16 token files for ids over 65535.
fn vocab_size(tokenizer: &Tokenizer) -> usize {
    let largest = tokenizer.get_vocab(true).into_values().max();
    let size = largest.map_or(0, |id| id as usize + 1);
    size.max(tokenizer.get_vocab_size(true))
}

/// The unknown token's id, if the model has one (Unigram names it by id, the others by text).
fn unknown_id(json: &str) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let model = &value["model"];
    if let Some(id) = model["unk_id"].as_u64() {
        return Some(id as u32);
    }
    model["vocab"]
        .get(model["unk_token"].as_str()?)?
        .as_u64()
        .map(|id| id as u32)
}

fn special_tokens(json: &str) -> BTreeMap<String, u32> {
    let value: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    value["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["special"] == true)
        .filter_map(|t| Some((t["content"].as_str()?.to_string(), t["id"].as_u64()? as u32)))
        .collect()
}

/// tokenizer_config.json, so that `AutoTokenizer.from_pretrained(dir)` finds the fast tokenizer,
/// its special tokens and the chat template.
fn tokenizer_config(
    params: &TokenizeParams,
    tokenizer: &Tokenizer,
    unknown: Option<u32>,
    chat: &ChatFormat,
) -> serde_json::Value {
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": params.eos_token,
        "bos_token": params.eos_token,
        "pad_token": params.eos_token,
        "clean_up_tokenization_spaces": false,
        "model_max_length": params.max_length,
    });
    chat.write_into(&mut config);
    if let Some(token) = unknown.and_then(|id| tokenizer.id_to_token(id)) {
        config["unk_token"] = token.into();
    }
    config
}

/// The input corpus.
pub struct Corpus {
    dir: PathBuf,
}

/// The texts of a record a vocabulary learns from.
fn training_texts(record: &Record) -> Vec<&str> {
    if let Some(messages) = &record.messages {
        return messages.iter().map(|m| m.content.as_str()).collect();
    }
    match (&record.prompt, &record.chosen, &record.rejected) {
        (Some(p), Some(c), Some(r)) => vec![p, c, r],
        _ => vec![&record.text],
    }
}

impl Corpus {
    /// Runs `count` over every training text in parallel, each thread into its own map, and
    /// sums the maps.
    fn count<K, F>(&self, count: F) -> Result<HashMap<K, u64>, String>
    where
        K: Hash + Eq + Send,
        F: Fn(&str, &mut HashMap<K, u64>) + Sync,
    {
        let maps: ThreadLocal<RefCell<HashMap<K, u64>>> = ThreadLocal::new();
        self.for_each_block("train", |block| {
            (0..block.lines.len()).into_par_iter().try_for_each(|i| {
                let record = block.record(i)?;
                let mut map = maps.get_or_default().borrow_mut();
                for text in training_texts(&record) {
                    count(text, &mut map);
                }
                Ok::<_, String>(())
            })
        })?;
        let mut total: HashMap<K, u64> = HashMap::new();
        for map in maps.into_iter().map(RefCell::into_inner) {
            if map.len() > total.len() {
                let smaller = std::mem::replace(&mut total, map);
                merge(&mut total, smaller);
            } else {
                merge(&mut total, map);
            }
        }
        if total.is_empty() {
            return Err("the corpus has no training text".into());
        }
        Ok(total)
    }

    /// Every training text, read lazily (for the trainers `tokenizers` feeds itself).
    fn texts(&self) -> Result<TextStream, String> {
        let shards = record_shards(&self.dir, "train")?;
        if shards.is_empty() {
            return Err("the corpus has no training text".into());
        }
        Ok(TextStream {
            shards: shards.into_iter().rev().collect(),
            current: None,
            pending: Vec::new(),
            error: Arc::new(Mutex::new(None)),
        })
    }

    /// Calls `f` with each block of a split's shards, in order.
    fn for_each_block(
        &self,
        split: &str,
        mut f: impl FnMut(&crate::records::LineBlock) -> Result<(), String>,
    ) -> Result<(), String> {
        for shard in record_shards(&self.dir, split)? {
            let mut lines = ShardLines::open(&shard)?;
            while let Some(block) = lines.next_block()? {
                f(&block)?;
            }
        }
        Ok(())
    }
}

fn merge<K: Hash + Eq>(into: &mut HashMap<K, u64>, from: HashMap<K, u64>) {
    for (key, n) in from {
        *into.entry(key).or_default() += n;
    }
}

/// Training texts one at a time; a read error ends the stream and is kept in `error`.
struct TextStream {
    shards: Vec<PathBuf>,
    current: Option<ShardLines>,
    pending: Vec<String>,
    error: Arc<Mutex<Option<String>>>,
}

impl TextStream {
    fn fail(&mut self, error: String) -> Option<String> {
        *self.error.lock().expect("not poisoned") = Some(error);
        self.shards.clear();
        self.current = None;
        None
    }
}

impl Iterator for TextStream {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(text) = self.pending.pop() {
                return Some(text);
            }
            if self.current.is_none() {
                let shard = self.shards.pop()?;
                match ShardLines::open(&shard) {
                    Ok(lines) => self.current = Some(lines),
                    Err(e) => return self.fail(e),
                }
            }
            match self.current.as_mut().expect("open").next_block() {
                Ok(Some(block)) => {
                    for i in (0..block.lines.len()).rev() {
                        match block.record(i) {
                            Ok(record) => self.pending.extend(
                                training_texts(&record).into_iter().rev().map(String::from),
                            ),
                            Err(e) => return self.fail(e),
                        }
                    }
                }
                Ok(None) => self.current = None,
                Err(e) => return self.fail(e),
            }
        }
    }
}

/// What one record became.
enum Encoded {
    Text { ids: Vec<u32>, bytes: usize },
    Chat(Example),
    Preference(Example, Example),
}

/// Running totals for meta.json's statistics.
#[derive(Default)]
struct Tally {
    documents: u64,
    text_bytes: u64,
    text_tokens: u64,
    unknown_tokens: u64,
    /// Documents per power-of-two bucket of token counts.
    buckets: BTreeMap<u32, u64>,
    conversations: u64,
    preference_pairs: u64,
    truncated: u64,
    zero_trainable: u64,
}

impl Tally {
    fn stats(&self, encoder: &Encoder, has_unknown: bool) -> Stats {
        Stats {
            documents: self.documents,
            bytes_per_token: self.text_bytes as f64 / self.text_tokens.max(1) as f64,
            unknown_rate: has_unknown
                .then(|| self.unknown_tokens as f64 / self.text_tokens.max(1) as f64),
            tokens_per_document: self
                .buckets
                .iter()
                .map(|(&bucket, &n)| (if bucket == 0 { 0 } else { 1 << (bucket - 1) }, n))
                .collect(),
            conversations: self.conversations,
            preference_pairs: self.preference_pairs,
            truncated: self.truncated,
            zero_trainable: self.zero_trainable,
            encoder: encoder.fast_path().unwrap_or("tokenizers").to_string(),
        }
    }
}

struct Encoding<'a> {
    params: &'a TokenizeParams,
    encoder: &'a Encoder,
    chat: &'a ChatFormat,
    eos_id: u32,
    unknown: Option<u32>,
    dtype: Dtype,
    out: &'a Path,
    tally: Tally,
}

/// The three streams of one split, opened on first use.
#[derive(Default)]
struct SplitWriters {
    text: Option<TokenWriter>,
    chat: Option<TokenWriter>,
    preference: Option<TokenWriter>,
}

impl Encoding<'_> {
    /// Encodes one split; returns its streams by name.
    fn split(
        &mut self,
        corpus: &Corpus,
        split: &'static str,
        ctx: &StageContext,
    ) -> Result<Vec<(String, Stream)>, String> {
        let mut writers = SplitWriters::default();
        corpus.for_each_block(split, |block| {
            let encoded: Vec<Encoded> = (0..block.lines.len())
                .into_par_iter()
                .map(|i| self.encode(&block.record(i)?))
                .collect::<Result<_, String>>()?;
            for item in encoded {
                self.write(item, split, &mut writers)
                    .map_err(|e| format!("writing token shards: {e}"))?;
            }
            ctx.report(self.tally.documents, None, "documents");
            Ok(())
        })?;
        let mut streams = Vec::new();
        for (name, writer) in [
            (split.to_string(), writers.text),
            (format!("chat-{split}"), writers.chat),
            (format!("preference-{split}"), writers.preference),
        ] {
            if let Some(writer) = writer {
                let stream = writer
                    .finish()
                    .map_err(|e| format!("writing token shards: {e}"))?;
                streams.push((name, stream));
            }
        }
        Ok(streams)
    }

    /// The parallel part: one record to ids.
    fn encode(&self, record: &Record) -> Result<Encoded, String> {
        let template = self.chat;
        if let Some(messages) = &record.messages {
            return Ok(Encoded::Chat(template.conversation(
                self.encoder,
                record,
                messages,
            )?));
        }
        if let (Some(prompt), Some(chosen), Some(rejected)) =
            (&record.prompt, &record.chosen, &record.rejected)
        {
            let (chosen, rejected) = template.preference(self.encoder, prompt, chosen, rejected)?;
            return Ok(Encoded::Preference(chosen, rejected));
        }
        let mut ids = Vec::with_capacity(record.text.len() / 3);
        self.encoder.encode(&record.text, &mut ids)?;
        Ok(Encoded::Text {
            ids,
            bytes: record.text.len(),
        })
    }

    /// The sequential part, in corpus order.
    fn write(
        &mut self,
        item: Encoded,
        split: &str,
        writers: &mut SplitWriters,
    ) -> std::io::Result<()> {
        let (out, dtype, shard_tokens) = (self.out, self.dtype, self.params.shard_tokens.get());
        let tally = &mut self.tally;
        tally.documents += 1;
        match item {
            Encoded::Text { mut ids, bytes } => {
                tally.text_bytes += bytes as u64;
                tally.text_tokens += ids.len() as u64;
                if let Some(unknown) = self.unknown {
                    tally.unknown_tokens += ids.iter().filter(|&&id| id == unknown).count() as u64;
                }
                *tally
                    .buckets
                    .entry(u64::BITS - (ids.len() as u64).leading_zeros())
                    .or_default() += 1;
                if self.params.separator == Separator::Eos {
                    ids.push(self.eos_id);
                }
                let writer = writers.text.get_or_insert_with(|| {
                    TokenWriter::new(out, split, dtype, false, shard_tokens)
                });
                writer.push(&ids, None)
            }
            Encoded::Chat(mut example) => {
                tally.conversations += 1;
                tally.truncated += u64::from(example.truncate(self.params.max_length.get()));
                if example.trainable() == 0 {
                    tally.zero_trainable += 1;
                    return Ok(());
                }
                let writer = writers.chat.get_or_insert_with(|| {
                    TokenWriter::new(out, &format!("chat-{split}"), dtype, true, shard_tokens)
                });
                writer.push(&example.ids, Some(&example.mask))
            }
            Encoded::Preference(mut chosen, mut rejected) => {
                tally.preference_pairs += 1;
                let max_length = self.params.max_length.get();
                let cut = chosen.truncate(max_length) | rejected.truncate(max_length);
                tally.truncated += u64::from(cut);
                if chosen.trainable() == 0 || rejected.trainable() == 0 {
                    tally.zero_trainable += 1;
                    return Ok(());
                }
                let writer = writers.preference.get_or_insert_with(|| {
                    TokenWriter::new(
                        out,
                        &format!("preference-{split}"),
                        dtype,
                        true,
                        shard_tokens,
                    )
                });
                writer.push(&chosen.ids, Some(&chosen.mask))?;
                writer.push(&rejected.ids, Some(&rejected.mask))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::synthetic::{generate, Generator};
    use crate::records::Message;
    use crate::testing::{context, write_corpus};

    fn records(generator: Generator, n: u64) -> Vec<Record> {
        generate(generator, n, 3).collect()
    }

    /// Runs the stage; the corpus is `dir/corpus`, the output `dir/<out>`.
    fn run(
        params: serde_json::Value,
        dir: &Path,
        out: &str,
        tokenizer: Option<&Path>,
    ) -> Result<Meta, String> {
        // Through the engine's face of the stage: its checks first, as in a pipeline.
        let _: TokenizeParams =
            serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
        let corpus = dir.join("corpus");
        let mut inputs = vec![("corpus", corpus.as_path())];
        inputs.extend(tokenizer.map(|t| ("tokenizer", t)));
        let ctx = context("tokens", &inputs, &dir.join(out));
        smelt_engine::DynStage::run(&Tokenize, &params, &ctx).map_err(|e| e.to_string())?;
        Meta::read(&dir.join(out))
    }

    fn corpus(train: &[Record], validation: &[Record]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("corpus")).unwrap();
        write_corpus(&dir.path().join("corpus"), train, validation);
        dir
    }

    fn stream(out: &Path, meta: &Meta, name: &str) -> Vec<shards::Sequence> {
        shards::read_stream(out, &meta.streams[name], meta.dtype).unwrap()
    }

    /// Texts that stress pre-tokenization and bytes: spacing, contractions, numbers, scripts,
    /// emoji, control characters, and a special token written in the text.
    const ODD_TEXTS: [&str; 6] = [
        "  Two  spaces,\ttabs\r\nand CRLF.\n\n\nThree newlines; isn't it? They'll say 'tis 3.14.",
        "naïve café — ünïcödé «quotes» 日本語のテキスト 한국어 ½ Ⅻ 🦀🦀 👩‍👩‍👧",
        "\u{0}\u{1b}[31m control \u{7f} bytes \u{a0}nbsp\u{2028}line",
        "before<|endoftext|>after <|im_start|>user\nhi<|im_end|>",
        "x",
        "",
    ];

    #[test]
    fn byte_level_bpe_round_trips_and_matches_tokenizers() {
        let mut train = records(Generator::Stories, 200);
        train.extend(
            ODD_TEXTS[..4]
                .iter()
                .enumerate()
                .map(|(i, t)| Record::text(format!("odd{i}"), t.to_string(), "t")),
        );
        let dir = corpus(&train, &records(Generator::Stories, 20)[10..]);
        let meta = run(
            serde_json::json!({ "train": { "vocab_size": 500 } }),
            dir.path(),
            "out",
            None,
        )
        .unwrap();
        assert_eq!(meta.stats.encoder, "byte_level_bpe");
        assert_eq!(meta.vocab_size, 500);
        assert_eq!(meta.dtype, Dtype::U16);
        assert_eq!(meta.special_tokens["<|endoftext|>"], meta.eos_id);
        let out = dir.path().join("out");
        let reference = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let fast = Encoder::new(&reference).unwrap();
        let texts = train.iter().map(|r| r.text.as_str()).chain(ODD_TEXTS);
        for text in texts {
            let mut ids = Vec::new();
            fast.encode(text, &mut ids).unwrap();
            let expected = reference.encode(text, false).unwrap();
            assert_eq!(ids, expected.get_ids(), "{text:?}");
            assert_eq!(reference.decode(&ids, false).unwrap(), text, "round trip");
        }
        // The shards hold every training document in order, each followed by the end token.
        let sequences = stream(&out, &meta, "train");
        assert_eq!(sequences.len(), train.len());
        assert_eq!(meta.streams["train"].sequences, train.len() as u64);
        for (record, (ids, mask)) in train.iter().zip(&sequences) {
            assert_eq!(mask, &None);
            assert_eq!(ids.last(), Some(&meta.eos_id));
            let expected = reference.encode(record.text.as_str(), false).unwrap();
            assert_eq!(&ids[..ids.len() - 1], expected.get_ids());
        }
        let total: usize = sequences.iter().map(|(ids, _)| ids.len()).sum();
        assert_eq!(meta.streams["train"].tokens, total as u64);
        assert!(meta.streams["validation"].tokens > 0);
        assert!(
            meta.stats.bytes_per_token > 1.5,
            "{}",
            meta.stats.bytes_per_token
        );
        assert_eq!(meta.stats.unknown_rate, None);
        let histogram: u64 = meta.stats.tokens_per_document.iter().map(|b| b.1).sum();
        assert_eq!(histogram, meta.stats.documents);
    }

    #[test]
    fn characters_match_tokenizers_and_unknowns_are_counted() {
        let train = records(Generator::Stories, 50);
        let validation = [Record::text("v".into(), "Zebras ~ quietly".into(), "t")];
        let dir = corpus(&train, &validation);
        let meta = run(
            serde_json::json!({ "train": { "model": "char" } }),
            dir.path(),
            "out",
            None,
        )
        .unwrap();
        assert_eq!(meta.stats.encoder, "chars");
        let out = dir.path().join("out");
        let reference = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let fast = Encoder::new(&reference).unwrap();
        for text in train
            .iter()
            .map(|r| r.text.as_str())
            .chain(ODD_TEXTS)
            .chain(["~Z"])
        {
            let mut ids = Vec::new();
            fast.encode(text, &mut ids).unwrap();
            assert_eq!(
                ids,
                reference.encode(text, false).unwrap().get_ids(),
                "{text:?}"
            );
        }
        let story = &train[0].text;
        let mut ids = Vec::new();
        fast.encode(story, &mut ids).unwrap();
        assert_eq!(ids.len(), story.chars().count(), "one token per character");
        assert_eq!(&reference.decode(&ids, false).unwrap(), story);
        assert!(meta.stats.unknown_rate.unwrap() > 0.0, "`~` was never seen");
        let alphabet = meta.vocab_size;
        let err = run(
            serde_json::json!({ "train": { "model": "char", "vocab_size": alphabet - 1 } }),
            dir.path(),
            "small",
            None,
        )
        .unwrap_err();
        assert!(
            err.contains(&format!("`train.vocab_size` {} is below", alphabet - 1)),
            "{err}"
        );
    }

    #[test]
    fn other_vocabularies_train_through_tokenizers() {
        let dir = corpus(&records(Generator::Stories, 200), &[]);
        for model in ["bpe", "wordpiece", "unigram"] {
            let meta = run(
                serde_json::json!({ "train": { "model": model, "vocab_size": 300 } }),
                dir.path(),
                model,
                None,
            )
            .unwrap_or_else(|e| panic!("{model}: {e}"));
            assert_eq!(meta.stats.encoder, "tokenizers", "{model}");
            assert!(
                meta.vocab_size <= 300 && meta.vocab_size > 50,
                "{model}: {}",
                meta.vocab_size
            );
            assert!(meta.streams["train"].tokens > 1000, "{model}");
            assert_eq!(meta.stats.unknown_rate, Some(0.0), "{model}");
        }
        let err = run(
            serde_json::json!({ "train": { "model": "byte_level_bpe", "vocab_size": 100 } }),
            dir.path(),
            "tiny",
            None,
        )
        .unwrap_err();
        assert!(err.contains("below the 256 bytes"), "{err}");
    }

    #[test]
    fn chat_masks_cover_only_what_the_assistant_says() {
        let chats = records(Generator::Chat, 30);
        let pairs = records(Generator::Preferences, 20);
        let train: Vec<Record> = chats.iter().chain(&pairs).cloned().collect();
        let dir = corpus(&train, &[]);
        let meta = run(
            serde_json::json!({ "train": { "vocab_size": 400 } }),
            dir.path(),
            "out",
            None,
        )
        .unwrap();
        let out = dir.path().join("out");
        let tokenizer = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let decode = |ids: &[u32]| tokenizer.decode(ids, false).unwrap();
        let masked = |ids: &[u32], mask: &[u8], on: u8| {
            let kept: Vec<u32> = ids
                .iter()
                .zip(mask)
                .filter(|p| *p.1 == on)
                .map(|p| *p.0)
                .collect();
            decode(&kept)
        };
        let conversations = stream(&out, &meta, "chat-train");
        assert_eq!(conversations.len(), chats.len());
        for (record, (ids, mask)) in chats.iter().zip(&conversations) {
            let messages = record.messages.as_ref().unwrap();
            let mask = mask.as_ref().unwrap();
            assert_eq!(
                masked(ids, mask, 1),
                format!("{}<|im_end|>\n", messages[1].content)
            );
            assert_eq!(
                masked(ids, mask, 0),
                format!(
                    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                    messages[0].content
                )
            );
        }
        let preferences = stream(&out, &meta, "preference-train");
        assert_eq!(
            preferences.len(),
            2 * pairs.len(),
            "chosen and rejected per pair"
        );
        for (record, pair) in pairs.iter().zip(preferences.chunks(2)) {
            let chosen = masked(&pair[0].0, pair[0].1.as_ref().unwrap(), 1);
            let rejected = masked(&pair[1].0, pair[1].1.as_ref().unwrap(), 1);
            assert_eq!(
                chosen,
                format!("{}<|im_end|>\n", record.chosen.as_ref().unwrap())
            );
            assert_eq!(
                rejected,
                format!("{}<|im_end|>\n", record.rejected.as_ref().unwrap())
            );
        }
        assert_eq!(meta.stats.conversations, 30);
        assert_eq!(meta.stats.preference_pairs, 20);
        let trainable: u64 = conversations
            .iter()
            .map(|(_, m)| m.as_ref().unwrap().iter().map(|&b| b as u64).sum::<u64>())
            .sum();
        assert_eq!(meta.streams["chat-train"].trainable_tokens, Some(trainable));
        // Cut to four tokens, nothing the assistant says is left.
        let short = run(
            serde_json::json!({ "from": "out/tokenizer.json", "max_length": 4 }),
            dir.path(),
            "short",
            None,
        )
        .unwrap();
        assert_eq!(short.stats.truncated, 50);
        assert_eq!(short.stats.zero_trainable, 50);
        assert!(!short.streams.contains_key("chat-train"));
    }

    /// Training examples, evaluation prompts and scored answers must agree id for id, and a
    /// space ending a turn marker must go with the word after it, as in running text.
    #[test]
    fn plain_chat_templates_encode_as_running_text_and_prompts_prefix_examples() {
        let chats = records(Generator::Chat, 40);
        let dir = corpus(&chats, &[]);
        run(
            serde_json::json!({ "train": { "vocab_size": 400 } }),
            dir.path(),
            "out",
            None,
        )
        .unwrap();
        let tokenizer = Tokenizer::from_file(dir.path().join("out/tokenizer.json")).unwrap();
        let encoder = Encoder::new(&tokenizer).unwrap();
        let template = ChatFormat::Markers(Markers {
            turn_start: "{role}: ".into(),
            turn_end: ".\n".into(),
        });
        for record in &chats {
            let messages = record.messages.as_ref().unwrap();
            let example = template.conversation(&encoder, record, messages).unwrap();
            let running_text = format!(
                "user: {}.\nassistant: {}.\n",
                messages[0].content, messages[1].content
            );
            let mut whole = Vec::new();
            encoder.encode(&running_text, &mut whole).unwrap();
            assert_eq!(example.ids, whole, "{running_text}");
            let prompt = template
                .generation_prompt(&encoder, &messages[..1])
                .unwrap();
            let (context, answer) = template
                .scored_answer(&encoder, &messages[0].content, &messages[1].content)
                .unwrap();
            assert_eq!(context, prompt);
            assert_eq!([prompt.clone(), answer.clone()].concat(), example.ids);
            // Exactly the answer's ids are trained.
            assert!(example.mask[..prompt.len()].iter().all(|&m| m == 0));
            assert!(example.mask[prompt.len()..].iter().all(|&m| m == 1));
        }
    }

    #[test]
    fn a_conversation_without_an_assistant_turn_is_an_error() {
        let lonely = Record::chat(
            "lonely".into(),
            vec![Message {
                role: "user".into(),
                content: "anyone?".into(),
            }],
            "t",
        );
        let mut train = records(Generator::Stories, 20);
        train.push(lonely);
        let dir = corpus(&train, &[]);
        let err = run(serde_json::json!({}), dir.path(), "out", None).unwrap_err();
        assert!(
            err.contains("record `lonely` has no assistant turn"),
            "{err}"
        );
    }

    #[test]
    fn output_does_not_depend_on_the_thread_count() {
        let mut train = records(Generator::Stories, 300);
        train.extend(records(Generator::Chat, 20));
        let dir = corpus(&train, &records(Generator::Stories, 30));
        let files = |out: &str| {
            let mut names: Vec<_> = std::fs::read_dir(dir.path().join(out))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            names
                .into_iter()
                .map(|p| {
                    (
                        p.file_name().unwrap().to_owned(),
                        std::fs::read(&p).unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut outputs = Vec::new();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let out = format!("out{threads}");
            pool.install(|| {
                run(
                    serde_json::json!({ "train": { "vocab_size": 600 } }),
                    dir.path(),
                    &out,
                    None,
                )
            })
            .unwrap();
            outputs.push(files(&out));
        }
        assert_eq!(outputs[0], outputs[1]);
    }

    /// A character-level tokenizer.json whose ids have holes: 4 tokens, ids up to 70000.
    fn vocabulary_with_holes(pre_tokenizer: serde_json::Value) -> String {
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{ "id": 0, "content": "<|endoftext|>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true }],
            "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": null,
            "decoder": null,
            "model": { "type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "vocab": { "<|endoftext|>": 0, "<unk>": 1, "a": 2,
                "b": 70000 }, "merges": [] }
        })
        .to_string()
    }

    #[test]
    fn a_vocabulary_with_holes_is_sized_by_its_largest_id() {
        // Found by fuzz/ (tokenizer_json): meta.json said 4 tokens while "b" was 70000, so the
        // ids were stored as u16 (70000 became 4464) and beyond the model's embedding.
        for pre_tokenizer in [
            serde_json::Value::Null,
            serde_json::json!({ "type": "Whitespace" }),
        ] {
            let json = vocabulary_with_holes(pre_tokenizer);
            let (ids, size) = load_and_encode(json.clone(), "<|endoftext|>", &["ab a"]).unwrap();
            assert_eq!(size, 70001);
            assert!(ids.contains(&70000), "{ids:?}");
            let dir = corpus(&[Record::text("d".into(), "ab ba".into(), "s")], &[]);
            std::fs::write(dir.path().join("holes.json"), json).unwrap();
            let meta = run(
                serde_json::json!({ "from": "holes.json" }),
                dir.path(),
                "out",
                None,
            )
            .unwrap();
            assert_eq!((meta.vocab_size, meta.dtype), (70001, Dtype::U32));
            let tokens: Vec<u32> = stream(&dir.path().join("out"), &meta, "train")
                .into_iter()
                .flat_map(|(tokens, _)| tokens)
                .collect();
            assert!(tokens.contains(&70000), "{tokens:?}");
        }
    }

    #[test]
    fn a_tokenizer_json_tokenizers_panics_on_is_an_error() {
        // Found by fuzz/ (tokenizer_json): `tokenizers` panics ("Helper", "Precompiled") on a
        // syntax error inside `decoder`, and on a `Precompiled` normalizer it cannot decode.
        let good: serde_json::Value =
            serde_json::from_str(&vocabulary_with_holes(serde_json::Value::Null)).unwrap();
        let text = good.to_string();
        let mut broken_decoder = text.replace("\"decoder\":null", "\"decoder\":{\"type\" 1}");
        assert_ne!(broken_decoder, text);
        broken_decoder.truncate(broken_decoder.len() - 1);
        let mut precompiled = good.clone();
        precompiled["normalizer"] =
            serde_json::json!({ "type": "Precompiled", "precompiled_charsmap": "!!" });
        for json in [broken_decoder, precompiled.to_string()] {
            let err = load_and_encode(json, "<|endoftext|>", &["a"]).unwrap_err();
            assert!(
                err.contains("not a tokenizer.json `tokenizers` can load"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_wired_or_loaded_tokenizer_is_reused_as_is() {
        let dir = corpus(&records(Generator::Stories, 100), &[]);
        let first = run(
            serde_json::json!({ "train": { "vocab_size": 300 } }),
            dir.path(),
            "a",
            None,
        )
        .unwrap();
        let wired = dir.path().join("a");
        let second = run(serde_json::json!({}), dir.path(), "b", Some(&wired)).unwrap();
        assert_eq!(first.tokenizer_hash, second.tokenizer_hash);
        assert_eq!(first.streams["train"], second.streams["train"]);
        let err = run(
            serde_json::json!({ "train": {} }),
            dir.path(),
            "c",
            Some(&wired),
        )
        .unwrap_err();
        assert!(err.contains("remove `from` and `train`"), "{err}");
        std::fs::write(dir.path().join("broken.json"), "{\"model\": 1}").unwrap();
        let err = run(
            serde_json::json!({ "from": "broken.json" }),
            dir.path(),
            "d",
            None,
        )
        .unwrap_err();
        assert!(err.contains("not a tokenizer.json"), "{err}");
        let err = run(
            serde_json::json!({ "from": "a/tokenizer.json", "eos_token": "</s>" }),
            dir.path(),
            "e",
            None,
        )
        .unwrap_err();
        assert!(err.contains("has no `</s>` token"), "{err}");
    }

    #[test]
    fn an_empty_corpus_is_an_error() {
        let dir = corpus(&[], &[]);
        let err = run(serde_json::json!({}), dir.path(), "out", None).unwrap_err();
        assert!(err.contains("no training text"), "{err}");
    }
}
