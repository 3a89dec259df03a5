//! One function per subcommand: load, call the engine, hand the result to `output`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use smelt_engine::execute::update_lockfile;
use smelt_engine::hash::StatCache;
use smelt_engine::lockfile::Lockfile;
use smelt_engine::plan::{check_inputs, StagePlan};
use smelt_engine::store::ArtifactCheck;
use smelt_engine::validate::data_report;
use smelt_engine::{
    load_pipeline, ArtifactId, Checked, Decision, Executor, FileReport, InputCheck, LoadError,
    Outcome, Override, ParamProblem, Pipeline, Plan, Planner, Registry, Selection, StageKey, Store,
};

use crate::output;
use crate::{DagFormat, Failure, Format, Select, ValidateFormat};

fn registry() -> Registry {
    smelt_stages::registry()
}

/// Loads a pipeline; an invalid one is reported (human format) and fails.
fn load(file: &Path, overrides: &[Override], registry: &Registry) -> Result<Pipeline, Failure> {
    match load_pipeline(file, overrides, registry) {
        Ok(pipeline) => Ok(pipeline),
        Err(LoadError::Usage(message)) => Err(Failure::Usage(message)),
        Err(LoadError::Invalid(report)) => {
            eprint!("{}", report.render_human(output::color_stderr()));
            eprintln!(
                "{}: {} problem(s); nothing was run",
                file.display(),
                report.problems.len()
            );
            Err(Failure::Failed)
        }
    }
}

fn store_root(store: Option<PathBuf>, pipeline_dir: &Path) -> PathBuf {
    store.unwrap_or_else(|| pipeline_dir.join(".smelt"))
}

fn open_store(root: &Path) -> Result<Store, Failure> {
    Store::open(root)
        .map_err(|e| Failure::Usage(format!("cannot open the store {}: {e}", root.display())))
}

fn selection(select: &Select) -> Selection {
    Selection {
        only: select.only.clone(),
        from: select.from.clone(),
        until: select.until.clone(),
        force: select.force.clone(),
        force_all: select.force_all,
    }
}

/// Everything a plan needs, opened once.
struct Session {
    registry: Registry,
    pipeline: Pipeline,
    store: Store,
    lockfile_path: PathBuf,
    lockfile: Lockfile,
    stat_cache: StatCache,
}

impl Session {
    fn open(
        file: &Path,
        overrides: &[Override],
        store: Option<PathBuf>,
    ) -> Result<Session, Failure> {
        let registry = registry();
        let pipeline = load(file, overrides, &registry)?;
        let store = open_store(&store_root(store, &pipeline.dir))?;
        Ok(Session::new(registry, pipeline, store))
    }

    fn new(registry: Registry, pipeline: Pipeline, store: Store) -> Session {
        let lockfile_path = Lockfile::path_for(&pipeline.path);
        let lockfile = match Lockfile::read(&lockfile_path) {
            Ok(lock) => lock,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Lockfile::default(),
            Err(e) => {
                eprintln!("warning: ignoring the unreadable lockfile ({e}); it will be rewritten");
                Lockfile::default()
            }
        };
        let stat_cache = StatCache::new(&store.stat_cache_dir());
        Session {
            registry,
            pipeline,
            store,
            lockfile_path,
            lockfile,
            stat_cache,
        }
    }

    fn plan(&self, selection: &Selection) -> Result<Plan, Failure> {
        selection.check(&self.pipeline).map_err(Failure::Usage)?;
        let planner = Planner {
            pipeline: &self.pipeline,
            registry: &self.registry,
            store: &self.store,
            lockfile: &self.lockfile,
            stat_cache: &self.stat_cache,
        };
        Ok(planner.plan(selection))
    }

    /// The input checks of the planned stages that `wanted` picks (see
    /// [`smelt_engine::plan::check_inputs`]), and their problems as a report on `file`.
    fn check_inputs(
        &self,
        plan: &Plan,
        file: &Path,
        wanted: impl Fn(&StagePlan) -> bool,
    ) -> (Vec<InputCheck>, FileReport) {
        let checks = check_inputs(plan, &self.pipeline, &self.registry, &self.store, wanted);
        let mut problems: Vec<(String, ParamProblem)> = Vec::new();
        for check in &checks {
            if let Checked::Ran(found) = &check.outcome {
                problems.extend(found.iter().map(|p| (check.stage.clone(), p.clone())));
            }
        }
        let report = data_report(&self.pipeline, file, &problems);
        (checks, report)
    }
}

/// `data`: also run the input checks against the store (`Some(--store)`), or not (`None`).
pub fn validate(
    files: &[PathBuf],
    format: ValidateFormat,
    overrides: &[Override],
    data: Option<Option<PathBuf>>,
) -> Result<(), Failure> {
    let registry = registry();
    let mut invalid = false;
    let mut usage = None;
    let mut json = Vec::new();
    for file in files {
        let (report, checks, stages) = match load_pipeline(file, overrides, &registry) {
            Ok(pipeline) => {
                let stages = pipeline.stages.len();
                match &data {
                    Some(store) => {
                        let (checks, report) =
                            data_checks(file, registry.clone(), pipeline, store.clone())?;
                        (report, Some(checks), stages)
                    }
                    None => (FileReport::new(file, pipeline.text.clone()), None, stages),
                }
            }
            Err(LoadError::Usage(message)) => {
                eprintln!("error: {message}");
                usage = Some(message);
                continue;
            }
            Err(LoadError::Invalid(report)) => (report, None, 0),
        };
        let valid = report.is_empty();
        invalid |= !valid;
        match format {
            ValidateFormat::Human if valid => {
                println!("✓ {}: valid ({stages} stages)", file.display());
            }
            ValidateFormat::Human => eprint!("{}", report.render_human(output::color_stderr())),
            ValidateFormat::Github => print!("{}", report.render_github()),
            ValidateFormat::Json => {}
        }
        if let (ValidateFormat::Human, Some(checks)) = (format, &checks) {
            output::print_data_checks(checks);
        }
        if let (ValidateFormat::Human, false) = (format, valid) {
            eprintln!("✗ {}: {} problem(s)", file.display(), report.problems.len());
        }
        let mut entry = serde_json::json!({ "file": file.display().to_string(), "valid": valid, "problems": report.to_json() });
        if let Some(checks) = &checks {
            entry["data_checks"] = output::data_checks_json(checks);
        }
        json.push(entry);
    }
    if let ValidateFormat::Json = format {
        println!("{}", serde_json::to_string_pretty(&json).expect("json"));
    }
    match (usage, invalid) {
        (Some(_), _) => Err(Failure::Usage("some files could not be validated".into())),
        (None, true) => Err(Failure::Failed),
        (None, false) => Ok(()),
    }
}

/// `validate --data`: every stage's input checks that the store allows. Without a store yet,
/// none can run (and none is created).
fn data_checks(
    file: &Path,
    registry: Registry,
    pipeline: Pipeline,
    store: Option<PathBuf>,
) -> Result<(Vec<InputCheck>, FileReport), Failure> {
    let root = store_root(store, &pipeline.dir);
    if !root.is_dir() {
        let checks = pipeline
            .order
            .iter()
            .filter_map(|name| {
                let spec = &pipeline.stages[name];
                let what = registry.get(&spec.kind)?.input_checks()?;
                let first = spec.upstream().next().unwrap_or_default();
                Some(InputCheck {
                    stage: name.clone(),
                    what,
                    outcome: Checked::NotBuilt(first.to_string()),
                })
            })
            .collect();
        return Ok((checks, FileReport::new(file, pipeline.text.clone())));
    }
    let session = Session::new(registry, pipeline, open_store(&root)?);
    let plan = session.plan(&Selection::default())?;
    Ok(session.check_inputs(&plan, file, |_| true))
}

/// The pipeline schema as `smelt schema` prints it (and `smelt init` writes it).
fn schema_text() -> String {
    let schema = smelt_engine::schema::pipeline_schema(&registry());
    serde_json::to_string_pretty(&schema).expect("json") + "\n"
}

pub fn schema() -> Result<(), Failure> {
    print!("{}", schema_text());
    Ok(())
}

pub fn plan(
    file: &Path,
    select: &Select,
    format: Format,
    overrides: &[Override],
    store: Option<PathBuf>,
) -> Result<(), Failure> {
    let session = Session::open(file, overrides, store)?;
    let plan = session.plan(&selection(select))?;
    match format {
        Format::Text => output::print_plan(&plan, &session.pipeline),
        Format::Json => println!("{}", serde_json::to_string_pretty(&plan).expect("json")),
    }
    refuse_input_problems(&session, &plan, file, " the run would stop at")
}

/// Fails, printing them, when stages the plan runs have params that do not fit inputs already
/// built; `consequence` ends the summary line.
fn refuse_input_problems(
    session: &Session,
    plan: &Plan,
    file: &Path,
    consequence: &str,
) -> Result<(), Failure> {
    let (_, report) = session.check_inputs(plan, file, |s| s.decision == Decision::Run);
    if report.is_empty() {
        return Ok(());
    }
    eprint!("{}", report.render_human(output::color_stderr()));
    eprintln!(
        "{}: {} problem(s){consequence}",
        file.display(),
        report.problems.len()
    );
    Err(Failure::Failed)
}

pub fn run(
    file: &Path,
    select: &Select,
    jobs: Option<usize>,
    keep_going: bool,
    overrides: &[Override],
    store: Option<PathBuf>,
) -> Result<(), Failure> {
    let started = Instant::now();
    let session = Session::open(file, overrides, store)?;
    let plan = session.plan(&selection(select))?;
    // Params that do not fit inputs already built stop the run before any stage starts.
    refuse_input_problems(&session, &plan, file, "; nothing was run")?;
    let printer = Arc::new(output::RunPrinter::new());
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    output::print_run_header(&session.pipeline, &plan);
    let executor = Executor {
        pipeline: &session.pipeline,
        registry: &session.registry,
        store: &session.store,
        jobs,
        keep_going,
        observer: printer.as_ref(),
        progress: printer.clone(),
    };
    let results = executor.run(&plan);
    let saved = record_results(&session, &results);
    if let Err(e) = saved {
        eprintln!(
            "error: cannot write {}: {e}",
            session.lockfile_path.display()
        );
        return Err(Failure::Failed);
    }
    output::print_summary(&results, started.elapsed());
    let last = crate::report::LastRun::new(
        &session.pipeline.name,
        &results,
        started.elapsed().as_secs_f64(),
    );
    let last_path = crate::report::path(session.store.root(), &session.lockfile_path);
    let written = std::fs::create_dir_all(last_path.parent().expect("runs/ has a parent"))
        .and_then(|()| {
            smelt_engine::store::write_atomic(
                &last_path,
                &serde_json::to_vec_pretty(&last).expect("serialisable"),
            )
        });
    if let Err(e) = written {
        eprintln!("warning: cannot record this run for `smelt report`: {e}");
    }
    let failed = results
        .iter()
        .any(|r| matches!(r.outcome, Outcome::Failed { .. }));
    if failed {
        Err(Failure::Failed)
    } else {
        Ok(())
    }
}

/// Merges a run's results into the lockfile on disk, re-read under a lock: a concurrent run on
/// another selection of the same pipeline may have updated other stages meanwhile.
fn record_results(session: &Session, results: &[smelt_engine::StageResult]) -> std::io::Result<()> {
    let path = &session.lockfile_path;
    let _guard = session.store.lock_for_update(path)?;
    let mut lockfile = if path.exists() {
        Lockfile::read(path).unwrap_or_default()
    } else {
        Lockfile::default()
    };
    let before = lockfile.clone();
    update_lockfile(&mut lockfile, &session.pipeline, &session.registry, results);
    if lockfile != before || !path.exists() {
        lockfile.write(path)?;
    }
    session.store.register_lockfile(path)
}

pub fn status(
    file: &Path,
    format: Format,
    overrides: &[Override],
    store: Option<PathBuf>,
) -> Result<(), Failure> {
    let session = Session::open(file, overrides, store)?;
    let plan = session.plan(&Selection::default())?;
    match format {
        Format::Text => output::print_status(&plan, &session.lockfile, &session.lockfile_path),
        Format::Json => {
            let stages: Vec<_> = plan
                .stages
                .iter()
                .map(|s| serde_json::json!({ "stage": s.stage, "in_lockfile": session.lockfile.stages.contains_key(&s.stage), "changes": s.changes, "decision": s.decision }))
                .collect();
            println!("{}", serde_json::to_string_pretty(&stages).expect("json"));
        }
    }
    Ok(())
}

pub fn show(
    file: &Path,
    stage: &str,
    path_only: bool,
    overrides: &[Override],
    store: Option<PathBuf>,
) -> Result<(), Failure> {
    let session = Session::open(file, overrides, store)?;
    let select = Selection {
        only: vec![stage.to_string()],
        ..Default::default()
    };
    let plan = session.plan(&select)?;
    let stage_plan = plan.get(stage).expect("selection was checked");
    let Some(artifact) = &stage_plan.artifact else {
        let why = smelt_engine::plan::describe(&stage_plan.reasons);
        eprintln!("error: stage `{stage}` has no up-to-date artifact ({why}); run it first");
        return Err(Failure::Failed);
    };
    let dir = session.store.artifact_dir(artifact);
    if path_only {
        println!("{}", dir.display());
        return Ok(());
    }
    let record = stage_plan
        .key
        .as_ref()
        .and_then(|k| session.store.record(k));
    output::print_show(stage, &dir, artifact, record.as_ref());
    Ok(())
}

/// A model directory or GGUF file as given, or the snapshot an `hf://org/name` reference
/// names in the Hugging Face cache.
fn model_path(given: &Path) -> Result<PathBuf, Failure> {
    use smelt_stages::model::hub;
    match given.to_str().filter(|s| hub::is_hub(s)) {
        Some(reference) => hub::resolve(reference).map_err(Failure::Usage),
        None => Ok(given.to_path_buf()),
    }
}

/// `smelt export MODEL --gguf FILE`.
pub fn export(model: &Path, out: &Path, kind: crate::ExportKind) -> Result<(), Failure> {
    use smelt_stages::model::{self, gguf::ExportType, AdamWConfig, DeviceKind, Trainer};
    let optimizer = AdamWConfig::UNUSED;
    let model = &model_path(model)?;
    let (mut trainer, eos) =
        Trainer::load(model, DeviceKind::Cpu, optimizer).map_err(Failure::Usage)?;
    let path = model.join("tokenizer.json");
    let tokenizer: serde_json::Value = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
    let eos = eos.ok_or_else(|| {
        Failure::Usage(format!(
            "{}: config.json names no eos_token_id",
            model.display()
        ))
    })?;
    let kind = match kind {
        crate::ExportKind::F16 => ExportType::F16,
        crate::ExportKind::Q8_0 => ExportType::Q8_0,
    };
    // The template the model's directory carries (markers as their Jinja form).
    let template = match smelt_stages::tokenize::shipped::in_dir(model)
        .map_err(Failure::Usage)?
        .template
    {
        Some(smelt_stages::tokenize::ShippedTemplate::Jinja(source)) => Some(source),
        Some(smelt_stages::tokenize::ShippedTemplate::Markers(markers)) => Some(markers.jinja()),
        None => None,
    };
    model::export_gguf(
        &mut trainer,
        out,
        &tokenizer,
        template.as_deref(),
        eos,
        kind,
    )
    .map_err(Failure::Usage)?;
    println!("{}", out.display());
    Ok(())
}

pub fn generate(args: &crate::GenerateArgs, store: Option<PathBuf>) -> Result<(), Failure> {
    let dir = match (&args.model_dir, &args.pipeline, &args.stage) {
        (Some(dir), _, _) => model_path(dir)?,
        (None, Some(file), Some(stage)) => {
            let session = Session::open(file, &args.overrides.set, store)?;
            let select = Selection {
                only: vec![stage.clone()],
                ..Default::default()
            };
            let plan = session.plan(&select)?;
            let stage_plan = plan.get(stage).expect("selection was checked");
            let Some(artifact) = &stage_plan.artifact else {
                let why = smelt_engine::plan::describe(&stage_plan.reasons);
                return Err(Failure::Usage(format!(
                    "stage `{stage}` has no up-to-date artifact ({why}); run it first"
                )));
            };
            session.store.artifact_dir(artifact)
        }
        _ => {
            return Err(Failure::Usage(
                "give a model directory, or --pipeline and --stage".into(),
            ))
        }
    };
    let sampling = smelt_stages::model::sample::Sampling {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let text = smelt_stages::model::sample::LoadedModel::open(&dir)
        .and_then(|mut generator| match args.chat {
            true => generator.answer(&args.prompt, &sampling),
            false => generator.generate(&args.prompt, &sampling),
        })
        .map_err(Failure::Usage)?;
    println!("{text}");
    Ok(())
}

pub fn report(
    file: &Path,
    html: Option<PathBuf>,
    overrides: &[Override],
    store: Option<PathBuf>,
) -> Result<(), Failure> {
    use crate::report;
    let session = Session::open(file, overrides, store)?;
    let last_path = report::path(session.store.root(), &session.lockfile_path);
    let last: report::LastRun = std::fs::read(&last_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| {
            Failure::Usage(format!(
                "no run of {} is recorded in its store: run it first",
                file.display()
            ))
        })?;
    let rows: Vec<report::Row> = last
        .stages
        .iter()
        .map(|run| {
            let record = run
                .key
                .as_ref()
                .and_then(|k| session.store.record(&smelt_engine::StageKey(k.clone())));
            report::Row {
                stage: run.stage.clone(),
                kind: session
                    .pipeline
                    .stages
                    .get(&run.stage)
                    .map_or("?".into(), |s| s.kind.clone()),
                record,
                artifact_dir: run.artifact.as_ref().map(|a| {
                    session
                        .store
                        .artifact_dir(&smelt_engine::ArtifactId(a.clone()))
                }),
                run: report::StageRun {
                    stage: run.stage.clone(),
                    outcome: run.outcome.clone(),
                    artifact: run.artifact.clone(),
                    key: run.key.clone(),
                    duration_s: run.duration_s,
                    detail: run.detail.clone(),
                },
            }
        })
        .collect();
    print!("{}", report::markdown(&last, &rows));
    let html_path = html.unwrap_or_else(|| {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        session.pipeline.dir.join(format!("{stem}.report.html"))
    });
    std::fs::write(&html_path, report::html(&last, &rows))
        .map_err(|e| Failure::Usage(format!("{}: {e}", html_path.display())))?;
    eprintln!("wrote {}", html_path.display());
    Ok(())
}

pub fn metric(
    metric: crate::TextMetric,
    hyp: &Path,
    references: &[PathBuf],
    format: Format,
) -> Result<(), Failure> {
    use smelt_stages::metrics;
    let segments = |path: &Path| -> Result<Vec<String>, Failure> {
        std::fs::read_to_string(path)
            .map(|text| text.lines().map(String::from).collect())
            .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
    };
    let hypotheses = segments(hyp)?;
    let references = references
        .iter()
        .map(|path| segments(path))
        .collect::<Result<Vec<_>, _>>()?;
    let (line, json) = match metric {
        crate::TextMetric::Bleu => {
            let bleu = metrics::corpus_bleu(&hypotheses, &references).map_err(Failure::Usage)?;
            let mut json = serde_json::to_value(&bleu).expect("serialisable");
            json["name"] = "BLEU".into();
            (bleu.line(), json)
        }
        crate::TextMetric::Chrf | crate::TextMetric::ChrfPlus => {
            let word_order = if matches!(metric, crate::TextMetric::ChrfPlus) {
                2
            } else {
                0
            };
            let chrf = metrics::corpus_chrf(&hypotheses, &references, word_order)
                .map_err(Failure::Usage)?;
            let mut json = serde_json::to_value(&chrf).expect("serialisable");
            json["name"] = if word_order > 0 { "chrF2++" } else { "chrF2" }.into();
            (chrf.line(word_order), json)
        }
    };
    match format {
        Format::Text => println!("{line}"),
        Format::Json => println!("{json}"),
    }
    Ok(())
}

pub fn dag(file: &Path, format: DagFormat, overrides: &[Override]) -> Result<(), Failure> {
    let registry = registry();
    let pipeline = load(file, overrides, &registry)?;
    print!("{}", output::render_dag(&pipeline, &pipeline.dag(), format));
    Ok(())
}

pub fn gc(
    files: &[PathBuf],
    dry_run: bool,
    include_work: bool,
    store: Option<PathBuf>,
) -> Result<(), Failure> {
    let root = match (store, files.first()) {
        (Some(root), _) => root,
        (None, Some(file)) => {
            let dir = std::path::absolute(file)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            store_root(None, &dir.unwrap_or_default())
        }
        (None, None) => PathBuf::from(".smelt"),
    };
    if !root.join("artifacts").is_dir() {
        return Err(Failure::Usage(format!(
            "{} is not a smelt store",
            root.display()
        )));
    }
    let store = Store::open_exclusive(&root).map_err(|e| Failure::Usage(e.to_string()))?;
    let garbage = store
        .garbage(include_work)
        .map_err(|e| Failure::Usage(format!("gc stopped, nothing deleted: {e}")))?;
    output::print_garbage(&garbage, dry_run);
    if !dry_run {
        store
            .delete(&garbage)
            .map_err(|e| Failure::Usage(format!("cannot delete: {e}")))?;
    }
    Ok(())
}

/// The artifacts to check in one store, each with the stages known to have built it.
type Targets = BTreeMap<ArtifactId, BTreeSet<String>>;

/// One artifact as `smelt verify` found it.
pub struct Verified {
    pub id: ArtifactId,
    pub stages: Vec<String>,
    pub checked: ArtifactCheck,
    /// The run records removed with it (`--repair`); `None` when it was not removed.
    pub removed: Option<Vec<StageKey>>,
}

/// `smelt verify`: re-hashes artifacts against their manifests. Without files, every artifact
/// of the store; with pipeline files, those their lockfiles name and their current plans would
/// use. `repair` removes the corrupt ones (and their records) so the next run rebuilds them.
pub fn verify(
    files: &[PathBuf],
    repair: bool,
    format: Format,
    overrides: &[Override],
    store: Option<PathBuf>,
) -> Result<(), Failure> {
    let mut stores: BTreeMap<PathBuf, Option<Targets>> = BTreeMap::new();
    if files.is_empty() {
        let root = store.clone().unwrap_or_else(|| PathBuf::from(".smelt"));
        if !root.join("artifacts").is_dir() {
            return Err(Failure::Usage(format!(
                "{} is not a smelt store",
                root.display()
            )));
        }
        stores.insert(root, None);
    }
    for file in files {
        let session = Session::open(file, overrides, store.clone())?;
        let plan = session.plan(&Selection::default())?;
        let targets = stores
            .entry(session.store.root().to_path_buf())
            .or_insert_with(|| Some(Targets::new()))
            .get_or_insert_with(Targets::new);
        for (stage, locked) in &session.lockfile.stages {
            targets
                .entry(locked.artifact.clone())
                .or_default()
                .insert(stage.clone());
        }
        for stage in &plan.stages {
            let record = stage.key.as_ref().and_then(|k| session.store.record(k));
            if let Some(record) = record {
                targets
                    .entry(record.artifact)
                    .or_default()
                    .insert(stage.stage.clone());
            }
        }
    }
    let mut corrupt_left = false;
    let mut json = Vec::new();
    for (root, targets) in stores {
        let found = verify_store(&root, targets, repair)?;
        corrupt_left |= found
            .iter()
            .any(|v| matches!(v.checked, ArtifactCheck::Corrupt(_)) && v.removed.is_none());
        match format {
            Format::Text => output::print_verified(&root, &found, repair),
            Format::Json => json.push(output::verified_json(&root, &found)),
        }
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&json).expect("json"));
    }
    if corrupt_left {
        Err(Failure::Failed)
    } else {
        Ok(())
    }
}

/// Checks `targets` (every artifact when `None`) of the store at `root`, and removes the
/// corrupt ones when `repair`.
///
/// Checking holds the store shared, like a run: reading every byte may take a while, and runs
/// may go on meanwhile. Removing holds it exclusively, like gc, so that no run reads or
/// publishes an artifact while it goes; each corrupt one is checked again under that lock (a
/// run may have rebuilt it in between).
fn verify_store(
    root: &Path,
    targets: Option<Targets>,
    repair: bool,
) -> Result<Vec<Verified>, Failure> {
    let cannot = |e: std::io::Error| Failure::Usage(format!("{}: {e}", root.display()));
    let mut found = {
        let store = open_store(root)?;
        let records = store.records().map_err(cannot)?;
        let mut targets = match targets {
            Some(targets) => targets,
            None => {
                let mut all = Targets::new();
                for id in store.artifact_ids().map_err(cannot)? {
                    all.entry(id).or_default();
                }
                // Records whose artifact is gone are reported too.
                for record in &records {
                    all.entry(record.artifact.clone()).or_default();
                }
                all
            }
        };
        for record in records {
            if let Some(stages) = targets.get_mut(&record.artifact) {
                stages.insert(record.stage);
            }
        }
        targets
            .into_iter()
            .map(|(id, stages)| Verified {
                checked: store.verify_contents(&id),
                id,
                stages: stages.into_iter().collect(),
                removed: None,
            })
            .collect::<Vec<_>>()
    };
    let corrupt = found
        .iter()
        .any(|v| matches!(v.checked, ArtifactCheck::Corrupt(_)));
    if repair && corrupt {
        let store = Store::open_exclusive(root).map_err(|e| Failure::Usage(e.to_string()))?;
        for verified in &mut found {
            if matches!(verified.checked, ArtifactCheck::Corrupt(_)) {
                verified.checked = store.verify_contents(&verified.id);
                if matches!(verified.checked, ArtifactCheck::Corrupt(_)) {
                    let keys = store.remove_artifact(&verified.id).map_err(|e| {
                        Failure::Usage(format!("cannot remove {}: {e}", verified.id))
                    })?;
                    verified.removed = Some(keys);
                }
            }
        }
    }
    Ok(found)
}

pub fn stages(markdown: bool) -> Result<(), Failure> {
    if markdown {
        print!("{}", smelt_engine::reference::markdown(&registry()));
    } else {
        output::print_stages(&registry());
    }
    Ok(())
}

/// The pipeline `smelt init` writes; `{name}` is replaced.
const STARTER: &str = include_str!("templates/starter.yaml");

/// Writes `NAME.yaml` (a runnable starter pipeline) and `smelt.schema.json` (what its
/// `$schema` line points at) in the current directory.
pub fn init(name: Option<&str>, force: bool) -> Result<(), Failure> {
    let name = name.unwrap_or("smelt");
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(Failure::Usage(format!(
            "`{name}` is not a pipeline name: use letters, digits, `_` and `-`, starting with a letter"
        )));
    }
    let file = PathBuf::from(format!("{name}.yaml"));
    if file.exists() && !force {
        return Err(Failure::Usage(format!(
            "{} exists; pass --force to replace it",
            file.display()
        )));
    }
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text)
            .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", path.display())))
    };
    write(&file, &STARTER.replace("{name}", name))?;
    write(Path::new("smelt.schema.json"), &schema_text())?;
    println!(
        "wrote {} and smelt.schema.json\nnext: smelt run {}",
        file.display(),
        file.display()
    );
    Ok(())
}

/// `smelt bench train`: one JSON line on stdout.
pub fn bench_train(
    config: &str,
    steps: usize,
    warmup: usize,
    threads: Option<usize>,
    precision: smelt_stages::model::Precision,
) -> Result<(), Failure> {
    let config = smelt_stages::bench::config(config)
        .ok_or_else(|| Failure::Usage(format!("no bench config `{config}`: use A or B")))?;
    if steps == 0 {
        return Err(Failure::Usage("--steps must be at least 1".into()));
    }
    if let Some(threads) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build_global()
            .map_err(|e| Failure::Usage(format!("cannot set {threads} threads: {e}")))?;
    }
    let device = smelt_stages::model::DeviceKind::Cpu;
    let report = smelt_stages::bench::train(&config, warmup, steps, device, precision)
        .map_err(Failure::Usage)?;
    println!("{report}");
    Ok(())
}
