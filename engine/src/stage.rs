//! The `Stage` trait every stage kind implements, and the registry the binary fills with them.
//!
//! A kind declares typed params (which generate the JSON Schema), a version constant (bumped when
//! its output semantics change, which invalidates cached artifacts), its input ports and the
//! external files it reads (hashed into the stage key), and a `run` that writes its output
//! directory through a [`StageContext`].
//!
//! What a value may be on its own belongs in the params' types (and so in the schema). What
//! params must satisfy together, or against the input artifacts, a kind states in
//! [`Stage::check`] and [`Stage::check_inputs`]: `smelt validate`, `plan` and `run` report their
//! [`ParamProblem`]s at the offending values before anything runs, and [`DynStage::run`] runs
//! them again before the stage's own `run`, so the early report and the stage cannot disagree.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Numbers and facts a stage reports about its run (loss, documents kept, …).
pub type Metrics = BTreeMap<String, serde_json::Value>;

/// Why a stage failed, in words for the person running it.
pub type StageError = Box<dyn std::error::Error + Send + Sync>;

/// One named input of a stage kind.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: &'static str,
    pub required: bool,
    /// Whether the port takes a list of stages (`models: [base, sft]`).
    pub many: bool,
    pub doc: &'static str,
}

/// The inputs a stage kind accepts.
#[derive(Clone, Debug)]
pub enum Ports {
    /// Exactly these ports.
    Declared(Vec<Port>),
    /// Any port names, each taking one stage or a list (the `command` kind).
    Any,
}

/// Receives progress from a running stage (the CLI draws it).
pub trait Progress: Send + Sync {
    fn update(&self, stage: &str, done: u64, total: Option<u64>, message: &str);
    /// A line of output from the stage (a command's stdout/stderr).
    fn line(&self, stage: &str, line: &str);
}

/// Progress that goes nowhere (tests, quiet mode).
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _: &str, _: u64, _: Option<u64>, _: &str) {}
    fn line(&self, _: &str, _: &str) {}
}

/// What a running stage can see and where it writes.
pub struct StageContext {
    /// The stage's name in the pipeline (for messages only: it is not part of the key).
    pub stage: String,
    /// Directory of the pipeline file; relative paths in params are relative to it.
    pub pipeline_dir: PathBuf,
    /// Empty directory the stage writes its artifact into.
    pub out_dir: PathBuf,
    /// Directory that survives failures of this exact stage key: checkpoints go here.
    pub work_dir: PathBuf,
    /// Each input port's upstream artifact directories, in the order wired.
    pub inputs: BTreeMap<String, Vec<PathBuf>>,
    /// Worker threads the stage may use.
    pub threads: usize,
    pub progress: Arc<dyn Progress>,
    /// The descriptor holding this stage key's lock. Processes the stage starts should inherit
    /// it (clear its close-on-exec flag in the child): the key then stays locked while any of
    /// them lives, so a rerun after smelt is killed waits for orphans instead of resuming from
    /// a work dir they are still writing.
    pub key_lock_fd: std::os::fd::RawFd,
    /// Where [`StageContext::memo_file`] keeps its files.
    pub memo_dir: PathBuf,
}

impl StageContext {
    /// The single artifact wired to `port`.
    pub fn input(&self, port: &str) -> Option<&Path> {
        self.inputs
            .get(port)
            .and_then(|dirs| dirs.first())
            .map(PathBuf::as_path)
    }

    /// A file for an intermediate result that depends on only part of what the stage key
    /// covers (per-document scores that do not depend on thresholds), named by a hash of `key`:
    /// a later run with the same `key` finds it. The stage must put in `key` everything the
    /// content depends on (input artifacts, its version, the params that matter), and must
    /// write the file atomically (a temp file renamed into place). gc deletes memos.
    pub fn memo_file(&self, key: &serde_json::Value) -> PathBuf {
        let mut canonical = String::new();
        crate::key::write_canonical(key, &mut canonical);
        self.memo_dir
            .join(blake3::hash(canonical.as_bytes()).to_hex().as_str())
    }

    pub fn report(&self, done: u64, total: Option<u64>, message: &str) {
        self.progress.update(&self.stage, done, total, message);
    }
}

/// A param a stage kind refuses, found by its own checks: why, in the user's words, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamProblem {
    /// Dotted paths into the `with:` block (`train.warmup`, `sources.0.synthetic.tasks`): the
    /// value to point at, then the others involved, used in turn when a value is not written
    /// in the file (a default).
    pub at: Vec<String>,
    /// The input it is about, pointed at before `at`: a port and the position of the upstream
    /// stage in it (`models: [base, sft]`: 1 is `sft`).
    pub input: Option<(String, usize)>,
    /// What is wrong, naming the params (`` `train.warmup` (200) is longer than … ``).
    pub message: String,
    pub help: Option<String>,
}

impl ParamProblem {
    pub fn new(at: &str, message: impl Into<String>) -> Self {
        ParamProblem {
            at: vec![at.to_string()],
            input: None,
            message: message.into(),
            help: None,
        }
    }

    /// A problem with what is wired to `port` (the `index`th stage listed there), rather than
    /// with a param.
    pub fn input(port: &str, index: usize, message: impl Into<String>) -> Self {
        ParamProblem {
            at: Vec::new(),
            input: Some((port.to_string(), index)),
            message: message.into(),
            help: None,
        }
    }

    /// Whether the value at `path` (in `with:`) is one of those involved, or inside one, or
    /// holds one. A problem about no value in particular involves them all.
    pub fn involves(&self, path: &[String]) -> bool {
        self.at.iter().any(|at| {
            let at: Vec<&str> = at.split('.').filter(|s| !s.is_empty()).collect();
            at.iter().zip(path).all(|(a, p)| a == p)
        })
    }

    /// Another value involved, pointed at when the first is not written in the file.
    pub fn or_at(mut self, at: &str) -> Self {
        self.at.push(at.to_string());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// The problems as one error, for a stage that was about to run anyway.
    pub fn refuse(problems: &[ParamProblem]) -> Result<(), String> {
        if problems.is_empty() {
            return Ok(());
        }
        Err(problems
            .iter()
            .map(ParamProblem::to_string)
            .collect::<Vec<_>>()
            .join("; "))
    }
}

impl fmt::Display for ParamProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        match &self.help {
            Some(help) => write!(f, " ({help})"),
            None => Ok(()),
        }
    }
}

/// A file or directory outside the store that a stage reads. Its content hash goes into the
/// stage key under `name`: the path as the pipeline writes it, relative to the pipeline file,
/// or another name that holds no path of this machine (`hf://org/model` for a model in the
/// Hugging Face cache), so keys do not depend on where things are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dep {
    pub name: String,
    /// Where it is: relative to the pipeline file, or absolute.
    pub path: PathBuf,
}

impl From<PathBuf> for Dep {
    /// A path as the pipeline writes it, which is also its name.
    fn from(path: PathBuf) -> Self {
        Dep {
            name: path.display().to_string(),
            path,
        }
    }
}

/// Input artifact directories by port, as [`StageContext::inputs`] holds them.
pub type InputDirs = BTreeMap<String, Vec<PathBuf>>;

/// A stage kind.
pub trait Stage: Send + Sync + 'static {
    /// Typed params of the `with:` block.
    type Params: DeserializeOwned + Serialize + JsonSchema;
    /// The name used in `uses:`.
    const KIND: &'static str;
    /// Bump when the output for the same params and inputs changes.
    const VERSION: u32;
    /// One line for `smelt stages`.
    const SUMMARY: &'static str;

    fn ports(&self) -> Ports;

    /// Files and directories outside the store that the stage reads; their content hashes go
    /// into the stage key under their names. An error (a glob that matches nothing) blocks the
    /// stage before anything runs.
    fn external_deps(
        &self,
        _params: &Self::Params,
        _pipeline_dir: &Path,
    ) -> Result<Vec<Dep>, String> {
        Ok(Vec::new())
    }

    /// What params must satisfy together, or with the input ports that are wired (`wired`,
    /// by port name), that their types cannot say (`d_model` divisible by `heads`). Cheap and
    /// free of I/O: `smelt validate` calls it on every stage.
    fn check(&self, _params: &Self::Params, _wired: &[&str]) -> Vec<ParamProblem> {
        Vec::new()
    }

    /// Checks of the files next to the pipeline that the params name (a question file, a
    /// tokenizer.json, a base model's config): they need nothing built, so `smelt validate`
    /// runs them on every valid stage. A file that is not there is left to the plan, which
    /// blocks the stage with the reason.
    fn check_files(&self, _params: &Self::Params, _pipeline_dir: &Path) -> Vec<ParamProblem> {
        Vec::new()
    }

    /// What [`Stage::check_inputs`] checks, in a few words, for `smelt validate --data`; `None`
    /// for a kind that checks nothing against its inputs.
    fn input_checks(&self) -> Option<&'static str> {
        None
    }

    /// Checks of the params against the input artifacts (`seq_len` against the tokens of a
    /// split), given every wired input's directories. Called before anything runs when all
    /// inputs are already in the store (`smelt plan`, `validate --data`, the start of `run`),
    /// and otherwise when the stage starts. Reads only what it needs (a manifest, a config):
    /// it may run on every plan.
    fn check_inputs(
        &self,
        _params: &Self::Params,
        _inputs: &InputDirs,
        _pipeline_dir: &Path,
    ) -> Vec<ParamProblem> {
        Vec::new()
    }

    fn run(&self, params: &Self::Params, ctx: &StageContext) -> Result<Metrics, StageError>;
}

/// The object-safe face of a [`Stage`], used by the engine.
pub trait DynStage: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn summary(&self) -> &'static str;
    fn ports(&self) -> Ports;
    /// JSON Schema of the params.
    fn params_schema(&self) -> serde_json::Value;
    /// Params with defaults filled in, as canonical JSON; an error when they do not deserialize.
    fn resolve_params(&self, with: &serde_json::Value) -> Result<serde_json::Value, String>;
    fn external_deps(
        &self,
        params: &serde_json::Value,
        pipeline_dir: &Path,
    ) -> Result<Vec<Dep>, String>;
    /// [`Stage::check`] on resolved params.
    fn check(&self, params: &serde_json::Value, wired: &[&str]) -> Vec<ParamProblem>;
    /// [`Stage::check_files`] on resolved params.
    fn check_files(&self, params: &serde_json::Value, pipeline_dir: &Path) -> Vec<ParamProblem>;
    fn input_checks(&self) -> Option<&'static str>;
    /// [`Stage::check_inputs`] on resolved params.
    fn check_inputs(
        &self,
        params: &serde_json::Value,
        inputs: &InputDirs,
        pipeline_dir: &Path,
    ) -> Vec<ParamProblem>;
    /// Runs both checks, then the stage: a problem is the stage's error.
    fn run(&self, params: &serde_json::Value, ctx: &StageContext) -> Result<Metrics, StageError>;
}

impl<S: Stage> DynStage for S {
    fn kind(&self) -> &'static str {
        S::KIND
    }

    fn version(&self) -> u32 {
        S::VERSION
    }

    fn summary(&self) -> &'static str {
        S::SUMMARY
    }

    fn ports(&self) -> Ports {
        Stage::ports(self)
    }

    fn params_schema(&self) -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(S::Params)).expect("schemas serialize")
    }

    fn resolve_params(&self, with: &serde_json::Value) -> Result<serde_json::Value, String> {
        let params = typed::<S>(with)?;
        serde_json::to_value(&params).map_err(|e| e.to_string())
    }

    fn external_deps(
        &self,
        params: &serde_json::Value,
        pipeline_dir: &Path,
    ) -> Result<Vec<Dep>, String> {
        Stage::external_deps(self, &typed::<S>(params)?, pipeline_dir)
    }

    fn check(&self, params: &serde_json::Value, wired: &[&str]) -> Vec<ParamProblem> {
        match typed::<S>(params) {
            Ok(params) => Stage::check(self, &params, wired),
            Err(e) => vec![ParamProblem::new("", e)],
        }
    }

    fn check_files(&self, params: &serde_json::Value, pipeline_dir: &Path) -> Vec<ParamProblem> {
        match typed::<S>(params) {
            Ok(params) => Stage::check_files(self, &params, pipeline_dir),
            Err(e) => vec![ParamProblem::new("", e)],
        }
    }

    fn input_checks(&self) -> Option<&'static str> {
        Stage::input_checks(self)
    }

    fn check_inputs(
        &self,
        params: &serde_json::Value,
        inputs: &InputDirs,
        pipeline_dir: &Path,
    ) -> Vec<ParamProblem> {
        match typed::<S>(params) {
            Ok(params) => Stage::check_inputs(self, &params, inputs, pipeline_dir),
            Err(e) => vec![ParamProblem::new("", e)],
        }
    }

    fn run(&self, params: &serde_json::Value, ctx: &StageContext) -> Result<Metrics, StageError> {
        let params = typed::<S>(params)?;
        let wired: Vec<&str> = ctx.inputs.keys().map(String::as_str).collect();
        let mut problems = Stage::check(self, &params, &wired);
        if problems.is_empty() {
            problems = Stage::check_inputs(self, &params, &ctx.inputs, &ctx.pipeline_dir);
        }
        ParamProblem::refuse(&problems)?;
        Stage::run(self, &params, ctx)
    }
}

fn typed<S: Stage>(value: &serde_json::Value) -> Result<S::Params, String> {
    serde_json::from_value(value.clone()).map_err(|e| e.to_string())
}

/// The stage kinds a pipeline may use, by name.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn DynStage>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register<S: Stage>(&mut self, stage: S) -> &mut Self {
        self.kinds.insert(S::KIND, Arc::new(stage));
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn DynStage>> {
        self.kinds.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn DynStage>> {
        self.kinds.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
}
