//! Everything the CLI prints: plans, run progress and summaries, status, DAGs, gc lists,
//! verification reports.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use smelt_engine::execute::CachedBy;
use smelt_engine::graph::Dag;
use smelt_engine::lockfile::Lockfile;
use smelt_engine::plan::{describe, StagePlan};
use smelt_engine::store::{ArtifactCheck, Garbage, RunRecord};
use smelt_engine::{
    ArtifactId, Checked, Decision, Divergence, InputCheck, Observer, Outcome, Pipeline, Plan,
    Ports, Progress, Registry, StageResult,
};

use crate::commands::Verified;
use crate::DagFormat;

pub fn color_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn reasons(stage: &StagePlan) -> String {
    let mut text = describe(&stage.reasons);
    if stage.may_cut_off {
        text.push_str(" — may be cut off: decided once its rebuilt inputs are known");
    }
    text
}

fn decision_word(decision: Decision) -> &'static str {
    match decision {
        Decision::Cached => "cached",
        Decision::Run => "run",
        Decision::Skipped => "skip",
        Decision::Blocked => "blocked",
    }
}

fn name_width(plan: &Plan) -> usize {
    plan.stages.iter().map(|s| s.stage.len()).max().unwrap_or(0)
}

pub fn print_plan(plan: &Plan, pipeline: &Pipeline) {
    println!("plan for {} ({})", pipeline.name, pipeline.path.display());
    let width = name_width(plan);
    for stage in &plan.stages {
        println!(
            "  {:<7} {:<width$}  {}",
            decision_word(stage.decision),
            stage.stage,
            reasons(stage)
        );
    }
    let runs = plan
        .stages
        .iter()
        .filter(|s| s.decision == Decision::Run)
        .count();
    println!(
        "{runs} to run, {} cached",
        plan.stages
            .iter()
            .filter(|s| s.decision == Decision::Cached)
            .count()
    );
}

/// `validate --data`: which stages' input checks ran, and which wait for an input.
pub fn print_data_checks(checks: &[InputCheck]) {
    if checks.is_empty() {
        println!("  no stage checks its params against input data");
        return;
    }
    println!("  data checks:");
    for check in checks {
        match &check.outcome {
            Checked::Ran(problems) if problems.is_empty() => {
                println!("    ✓ {}: {}", check.stage, check.what)
            }
            Checked::Ran(problems) => println!(
                "    ✗ {}: {} — {} problem(s)",
                check.stage,
                check.what,
                problems.len()
            ),
            Checked::NotBuilt(up) => println!(
                "    · {}: not checked yet: input stage `{up}` is not built (checked when `{}` starts)",
                check.stage, check.stage
            ),
        }
    }
}

pub fn data_checks_json(checks: &[InputCheck]) -> serde_json::Value {
    checks
        .iter()
        .map(|check| {
            let (ran, problems, waiting) = match &check.outcome {
                Checked::Ran(problems) => (true, problems.len(), None),
                Checked::NotBuilt(up) => (false, 0, Some(up.as_str())),
            };
            serde_json::json!({
                "stage": check.stage,
                "checks": check.what,
                "ran": ran,
                "problems": problems,
                "waiting_for": waiting,
            })
        })
        .collect()
}

pub fn print_run_header(pipeline: &Pipeline, plan: &Plan) {
    let runs = plan
        .stages
        .iter()
        .filter(|s| s.decision == Decision::Run)
        .count();
    println!(
        "running {} ({}): {runs} of {} stages to run",
        pipeline.name,
        pipeline.path.display(),
        plan.stages.len()
    );
}

/// Prints each stage's decision as the run goes, and the output lines of commands.
pub struct RunPrinter {
    out: Mutex<()>,
}

impl RunPrinter {
    pub fn new() -> Self {
        RunPrinter {
            out: Mutex::new(()),
        }
    }
}

impl Observer for RunPrinter {
    fn started(&self, plan: &StagePlan) {
        let _guard = self.out.lock();
        println!("  run     {}  {}", plan.stage, reasons(plan));
    }

    fn waiting(&self, stage: &str) {
        let _guard = self.out.lock();
        println!("  wait    {stage}  its key is locked: another run is building it, or processes left by a killed run still hold it");
    }

    fn finished(&self, result: &StageResult) {
        let _guard = self.out.lock();
        let stage = &result.stage;
        match &result.outcome {
            Outcome::Ran {
                artifact,
                duration_s,
                diverged,
                ..
            } => {
                println!("  ✓ ran   {stage}  {duration_s:.2}s → {}", artifact.short());
                if let Some(diverged) = diverged {
                    println!("{}", divergence_warning(stage, artifact, diverged));
                }
            }
            Outcome::Cached { artifact, by } => {
                let why = match by {
                    CachedBy::Plan => "",
                    CachedBy::CutOff => "  (cut off: its inputs were rebuilt unchanged)",
                    CachedBy::OtherRun => "  (built by another run)",
                };
                println!("  cached  {stage}  {}{why}", artifact.short())
            }
            Outcome::Failed { error } => println!(
                "  ✗ failed {stage}: {}",
                error.replace('\n', "\n          │ ")
            ),
            Outcome::Skipped { reason, .. } => println!("  skip    {stage}  {reason}"),
        }
    }
}

/// Says that a stage rebuilt its key into another artifact, and which files differ.
fn divergence_warning(stage: &str, artifact: &ArtifactId, diverged: &Divergence) -> String {
    let files = match &diverged.files {
        Some(files) if files.len() > 8 => {
            format!("{}, … ({} files)", files[..8].join(", "), files.len())
        }
        Some(files) => files.join(", "),
        None => "unknown (the earlier artifact is gone)".into(),
    };
    format!(
        "    warning: {stage} was built from the same inputs before, into {} — now {}: its \
         output is not a function of its inputs, so stages after it rerun and no cache can \
         share it. Files that differ: {files}. Keep times, hosts, paths and random values \
         without a fixed seed out of the artifact.",
        diverged.previous.short(),
        artifact.short()
    )
}

impl Progress for RunPrinter {
    fn update(&self, stage: &str, done: u64, total: Option<u64>, message: &str) {
        let total = total.map(|t| format!("/{t}")).unwrap_or_default();
        tracing::info!("{stage}: {done}{total} {message}");
    }

    fn line(&self, stage: &str, line: &str) {
        eprintln!("  {stage} │ {line}");
    }
}

pub fn print_summary(results: &[StageResult], elapsed: Duration) {
    let count = |f: fn(&Outcome) -> bool| results.iter().filter(|r| f(&r.outcome)).count();
    println!(
        "summary: {} ran, {} cached, {} failed, {} skipped in {:.2}s",
        count(|o| matches!(o, Outcome::Ran { .. })),
        count(|o| matches!(o, Outcome::Cached { .. })),
        count(|o| matches!(o, Outcome::Failed { .. })),
        count(|o| matches!(o, Outcome::Skipped { .. })),
        elapsed.as_secs_f64()
    );
}

pub fn print_status(plan: &Plan, lockfile: &Lockfile, lockfile_path: &Path) {
    println!("status against {}", lockfile_path.display());
    let width = name_width(plan);
    let mut changed = 0;
    for stage in &plan.stages {
        let (word, detail) = if !lockfile.stages.contains_key(&stage.stage) {
            ("new", "not in the lockfile".to_string())
        } else if stage.changes.is_empty() {
            match stage.decision {
                Decision::Cached => ("ok", String::new()),
                _ => ("missing", reasons(stage)),
            }
        } else {
            ("changed", describe(&stage.changes))
        };
        if word != "ok" {
            changed += 1;
        }
        println!("  {word:<8} {:<width$}  {detail}", stage.stage);
    }
    println!(
        "{changed} of {} stages differ from the lockfile",
        plan.stages.len()
    );
}

pub fn print_show(stage: &str, dir: &Path, artifact: &ArtifactId, record: Option<&RunRecord>) {
    println!("stage:     {stage}");
    println!("artifact:  {artifact}");
    println!("directory: {}", dir.display());
    if let Some(record) = record {
        println!("kind:      {} (version {})", record.kind, record.version);
        println!("key:       {}", record.key);
        println!("duration:  {:.2}s", record.duration_s);
        if !record.host.is_empty() {
            println!("ran on:    {} ({} threads)", record.host, record.threads);
        }
        println!(
            "params:    {}",
            serde_json::to_string(&record.params).expect("json")
        );
        if !record.metrics.is_empty() {
            println!("metrics:");
            for (name, value) in &record.metrics {
                match value.as_array() {
                    // Per-step series (a trainer's `timings`): `smelt report` draws them.
                    Some(items) => println!("  {name}: {} entries", items.len()),
                    None => println!("  {name}: {value}"),
                }
            }
        }
    }
    println!("files:");
    for entry in walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .flatten()
    {
        if entry.file_type().is_file() {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
            println!("  {}  ({size} bytes)", rel.display());
        }
    }
}

pub fn render_dag(pipeline: &Pipeline, dag: &Dag, format: DagFormat) -> String {
    let mut out = String::new();
    match format {
        DagFormat::Text => {
            let width = pipeline.order.iter().map(String::len).max().unwrap_or(0);
            for name in &pipeline.order {
                let spec = &pipeline.stages[name];
                let inputs: Vec<String> = spec
                    .inputs
                    .iter()
                    .map(|(port, stages)| format!("{port}: {}", stages.join(", ")))
                    .collect();
                let arrow = if inputs.is_empty() {
                    String::new()
                } else {
                    format!("  ← {}", inputs.join("; "))
                };
                out.push_str(&format!("{name:<width$}  ({}){arrow}\n", spec.kind));
            }
        }
        DagFormat::Dot => {
            out.push_str(&format!(
                "digraph \"{}\" {{\n  rankdir=LR;\n",
                pipeline.name
            ));
            for name in &pipeline.order {
                out.push_str(&format!(
                    "  \"{name}\" [label=\"{name}\\n({})\"];\n",
                    pipeline.stages[name].kind
                ));
            }
            for (from, to) in dag.edges() {
                out.push_str(&format!("  \"{from}\" -> \"{to}\";\n"));
            }
            out.push_str("}\n");
        }
        DagFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for name in &pipeline.order {
                out.push_str(&format!(
                    "  {}[\"{name} ({})\"]\n",
                    mermaid_id(name),
                    pipeline.stages[name].kind
                ));
            }
            for (from, to) in dag.edges() {
                out.push_str(&format!(
                    "  {} --> {}\n",
                    mermaid_id(&from),
                    mermaid_id(&to)
                ));
            }
        }
    }
    out
}

/// Mermaid node ids cannot contain `-`.
fn mermaid_id(name: &str) -> String {
    format!("s_{}", name.replace('-', "_"))
}

pub fn print_garbage(garbage: &Garbage, dry_run: bool) {
    for lockfile in &garbage.lockfiles {
        println!("keeping what {} refers to", lockfile.display());
    }
    let verb = if dry_run { "would delete" } else { "deleting" };
    for path in &garbage.paths {
        println!("  {verb} {}", path.display());
    }
    println!(
        "{} {} artifact(s), {} path(s), {:.1} MB",
        if dry_run { "would free" } else { "freed" },
        garbage.artifacts.len(),
        garbage.paths.len(),
        garbage.bytes as f64 / 1e6
    );
}

/// Who built an artifact, for people: `clean 3f2a9c1b0d4e`, or the short id alone.
fn artifact_label(verified: &Verified) -> String {
    if verified.stages.is_empty() {
        verified.id.short().to_string()
    } else {
        format!("{} {}", verified.stages.join(", "), verified.id.short())
    }
}

pub fn print_verified(root: &Path, found: &[Verified], repair: bool) {
    let (mut intact, mut corrupt, mut missing) = (0, 0, 0);
    for verified in found {
        let label = artifact_label(verified);
        match &verified.checked {
            ArtifactCheck::Intact => intact += 1,
            ArtifactCheck::Missing => {
                missing += 1;
                println!("  missing  {label}: not in the store (the next run builds it)");
            }
            ArtifactCheck::Corrupt(damage) => {
                corrupt += 1;
                println!("✗ corrupt  {label}  ({})", verified.id);
                for (what, paths) in [
                    ("changed", &damage.changed),
                    ("missing", &damage.missing),
                    ("extra", &damage.extra),
                ] {
                    for path in paths {
                        println!("    {what}: {path}");
                    }
                }
                if let Some(problem) = &damage.problem {
                    println!("    {problem}");
                }
                if let Some(keys) = &verified.removed {
                    println!(
                        "    removed, with {} run record(s): the next run rebuilds it",
                        keys.len()
                    );
                }
            }
        }
    }
    let removed = found.iter().filter(|v| v.removed.is_some()).count();
    println!(
        "{}: {} artifact(s) checked: {intact} intact, {corrupt} corrupt, {missing} missing",
        root.display(),
        found.len()
    );
    if corrupt > removed {
        println!(
            "run `smelt verify --repair` to remove the corrupt ones; the next run rebuilds them"
        );
    } else if repair && removed > 0 {
        println!("removed {removed} corrupt artifact(s)");
    }
}

pub fn verified_json(root: &Path, found: &[Verified]) -> serde_json::Value {
    let artifacts: Vec<serde_json::Value> = found
        .iter()
        .map(|v| {
            let mut entry = serde_json::json!({
                "artifact": v.id,
                "stages": v.stages,
                "state": match v.checked {
                    ArtifactCheck::Intact => "intact",
                    ArtifactCheck::Missing => "missing",
                    ArtifactCheck::Corrupt(_) => "corrupt",
                },
            });
            if let ArtifactCheck::Corrupt(damage) = &v.checked {
                entry["damage"] = serde_json::to_value(damage).expect("json");
                entry["removed"] = v.removed.is_some().into();
                entry["removed_records"] = serde_json::to_value(&v.removed).expect("json");
            }
            entry
        })
        .collect();
    serde_json::json!({ "store": root.display().to_string(), "artifacts": artifacts })
}

pub fn print_stages(registry: &Registry) {
    for kind in registry.kinds() {
        println!(
            "{:<10} v{}  {}",
            kind.kind(),
            kind.version(),
            kind.summary()
        );
        match kind.ports() {
            Ports::Any => println!("{:<10}      inputs: any port names", ""),
            Ports::Declared(ports) => {
                for p in ports {
                    let required = if p.required { "required" } else { "optional" };
                    println!("{:<10}      input {} ({required}): {}", "", p.name, p.doc);
                }
            }
        }
    }
}
