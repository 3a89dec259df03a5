//! The engine with stage kinds of its own: declared ports, typed params, panics.

use std::path::Path;
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use smelt_engine::execute::update_lockfile;
use smelt_engine::hash::StatCache;
use smelt_engine::lockfile::Lockfile;
use smelt_engine::plan::StagePlan;
use smelt_engine::stage::NoProgress;
use smelt_engine::validate::check;
use smelt_engine::{
    Executor, LoadError, Metrics, Observer, Outcome, Pipeline, Planner, Port, Ports, Registry,
    Selection, Stage, StageContext, StageError, StageResult, Store,
};

struct Join;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct JoinParams {
    separator: String,
    #[serde(default = "one")]
    times: u32,
}

fn one() -> u32 {
    1
}

impl Stage for Join {
    type Params = JoinParams;
    const KIND: &'static str = "join";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Join the `text` files of its inputs";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![
            Port {
                name: "first",
                required: true,
                many: false,
                doc: "the first text",
            },
            Port {
                name: "rest",
                required: false,
                many: true,
                doc: "more texts",
            },
        ])
    }

    fn run(&self, params: &JoinParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        let mut parts = Vec::new();
        for dirs in ctx.inputs.values() {
            for dir in dirs {
                parts.push(std::fs::read_to_string(dir.join("text"))?);
            }
        }
        let text = parts.join(&params.separator).repeat(params.times as usize);
        std::fs::write(ctx.out_dir.join("text"), &text)?;
        Ok(Metrics::from([("chars".to_string(), text.len().into())]))
    }
}

struct Source;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SourceParams {
    text: String,
    #[serde(default)]
    panic: bool,
}

impl Stage for Source {
    type Params = SourceParams;
    const KIND: &'static str = "source";
    const VERSION: u32 = 3;
    const SUMMARY: &'static str = "Write a text";

    fn ports(&self) -> Ports {
        Ports::Declared(vec![])
    }

    fn run(&self, params: &SourceParams, ctx: &StageContext) -> Result<Metrics, StageError> {
        std::fs::write(ctx.out_dir.join("text"), &params.text)?;
        if params.panic {
            panic!("source asked to panic");
        }
        Ok(Metrics::new())
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Join).register(Source);
    r
}

fn load(dir: &Path, yaml: &str) -> Result<Pipeline, LoadError> {
    let path = dir.join("p.yaml");
    check(&path, &path, Arc::new(yaml.to_string()), &[], &registry())
}

fn problems(yaml: &str) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().unwrap();
    match load(dir.path(), yaml) {
        Err(LoadError::Invalid(report)) => report
            .problems
            .into_iter()
            .map(|p| (p.code.to_string(), p.help.unwrap_or(p.message)))
            .collect(),
        other => panic!("expected problems, got {:?}", other.map(|p| p.name)),
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Observer for Recorder {
    fn started(&self, plan: &StagePlan) {
        self.0.lock().unwrap().push(format!("start {}", plan.stage));
    }
    fn waiting(&self, _: &str) {}
    fn finished(&self, _: &StageResult) {}
}

fn run(dir: &Path, pipeline: &Pipeline) -> Vec<StageResult> {
    let registry = registry();
    let store = Store::open(&dir.join(".smelt")).unwrap();
    let lockfile_path = Lockfile::path_for(&pipeline.path);
    let mut lockfile = Lockfile::read(&lockfile_path).unwrap_or_default();
    let stat_cache = StatCache::in_memory();
    let planner = Planner {
        pipeline,
        registry: &registry,
        store: &store,
        lockfile: &lockfile,
        stat_cache: &stat_cache,
    };
    let plan = planner.plan(&Selection::default());
    let recorder = Recorder::default();
    let executor = Executor {
        pipeline,
        registry: &registry,
        store: &store,
        jobs: 2,
        keep_going: true,
        observer: &recorder,
        progress: Arc::new(NoProgress),
    };
    let results = executor.run(&plan);
    update_lockfile(&mut lockfile, pipeline, &registry, &results);
    lockfile.write(&lockfile_path).unwrap();
    results
}

const PIPELINE: &str = "smelt: 1\nstages:\n  a: { uses: source, with: { text: A } }\n  b: { uses: source, with: { text: B } }\n  j:\n    uses: join\n    inputs: { first: a, rest: [b, a] }\n    with: { separator: '-' }\n";

#[test]
fn defaults_are_resolved_into_params_and_ports_are_wired_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = load(dir.path(), PIPELINE).unwrap();
    assert_eq!(
        pipeline.stages["j"].params,
        serde_json::json!({"separator": "-", "times": 1})
    );
    let results = run(dir.path(), &pipeline);
    let j = results.iter().find(|r| r.stage == "j").unwrap();
    let Outcome::Ran {
        artifact, metrics, ..
    } = &j.outcome
    else {
        panic!("{:?}", j.outcome)
    };
    assert_eq!(metrics["chars"], 5);
    let text = std::fs::read_to_string(
        dir.path()
            .join(".smelt/artifacts")
            .join(&artifact.0)
            .join("text"),
    )
    .unwrap();
    assert_eq!(text, "A-B-A");
}

#[test]
fn a_panicking_stage_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = PIPELINE.replace("{ text: B }", "{ text: B, panic: true }");
    let pipeline = load(dir.path(), &yaml).unwrap();
    let results = run(dir.path(), &pipeline);
    let outcome = |s: &str| {
        results
            .iter()
            .find(|r| r.stage == s)
            .unwrap()
            .outcome
            .clone()
    };
    assert!(matches!(outcome("a"), Outcome::Ran { .. }));
    assert_eq!(
        outcome("b"),
        Outcome::Failed {
            error: "the stage panicked: source asked to panic".into()
        }
    );
    assert!(matches!(outcome("j"), Outcome::Skipped { .. }));
    assert_eq!(
        std::fs::read_dir(dir.path().join(".smelt/tmp"))
            .unwrap()
            .count(),
        0,
        "the partial output is gone"
    );
}

#[test]
fn bumping_a_kind_version_reruns_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = load(dir.path(), PIPELINE).unwrap();
    run(dir.path(), &pipeline);
    let lock_path = dir.path().join("p.lock");
    let mut lock = Lockfile::read(&lock_path).unwrap();
    lock.stages.get_mut("a").unwrap().version = 2;
    lock.stages.get_mut("a").unwrap().key.0 = "stale".into();
    lock.write(&lock_path).unwrap();
    // Pretend the record for a's current key never existed (as if version 3 were new code).
    let store = Store::open(&dir.path().join(".smelt")).unwrap();
    let registry = registry();
    let stat_cache = StatCache::in_memory();
    let records = dir.path().join(".smelt/records");
    let a_key = Lockfile::read(&lock_path).unwrap();
    let planner = Planner {
        pipeline: &pipeline,
        registry: &registry,
        store: &store,
        lockfile: &a_key,
        stat_cache: &stat_cache,
    };
    let before = planner.plan(&Selection::default());
    std::fs::remove_file(records.join(format!(
        "{}.json",
        before.get("a").unwrap().key.as_ref().unwrap().0
    )))
    .unwrap();
    let plan = planner.plan(&Selection::default());
    let reasons: Vec<String> = plan
        .get("a")
        .unwrap()
        .reasons
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(reasons, ["code version 2 → 3"]);
}

#[test]
fn declared_ports_are_checked() {
    let unknown = problems("smelt: 1\nstages:\n  a: { uses: source, with: { text: A } }\n  j: { uses: join, inputs: { frist: a }, with: { separator: x } }\n");
    assert!(
        unknown.contains(&("smelt::unknown-port".into(), "did you mean `first`?".into())),
        "{unknown:?}"
    );
    assert!(
        unknown.iter().any(|(c, _)| c == "smelt::missing-input"),
        "{unknown:?}"
    );
    let list = problems("smelt: 1\nstages:\n  a: { uses: source, with: { text: A } }\n  j: { uses: join, inputs: { first: [a, a] }, with: { separator: x } }\n");
    assert_eq!(
        list,
        [(
            "smelt::type".to_string(),
            "input `first` takes one stage, not a list".to_string()
        )]
    );
}

#[test]
fn enum_like_and_nested_param_errors_point_inside_with() {
    let wrong =
        problems("smelt: 1\nstages:\n  a: { uses: source, with: { text: A, panic: maybe } }\n");
    assert_eq!(wrong.len(), 1);
    assert_eq!(wrong[0].0, "smelt::type");
}
