//! plan: for each stage, cached or run, and why — computed without running anything.
//!
//! The plan is what `smelt plan` prints and what `smelt run` executes, so it must be truthful.
//! A stage whose upstream will be rebuilt has an unknown key until that upstream finishes; it is
//! planned to run with `may_cut_off`, because an unchanged upstream output (early cutoff) may
//! still leave it cached. That is the only way a run may do less than its plan.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::graph::Dag;
use crate::hash::StatCache;
use crate::key::KeyMaterial;
use crate::lockfile::{LockedStage, Lockfile};
use crate::spec::{Pipeline, StageSpec};
use crate::stage::{InputDirs, ParamProblem, Registry};
use crate::store::{ArtifactId, Integrity, StageKey, Store};

/// Which stages a command acts on (`--only`, `--from`, `--until`) and which are forced.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub only: Vec<String>,
    pub from: Option<String>,
    pub until: Option<String>,
    pub force: Vec<String>,
    pub force_all: bool,
}

impl Selection {
    /// Checks that every named stage exists.
    pub fn check(&self, pipeline: &Pipeline) -> Result<(), String> {
        let named = self
            .only
            .iter()
            .chain(&self.from)
            .chain(&self.until)
            .chain(&self.force);
        for name in named {
            if !pipeline.stages.contains_key(name) {
                let mut msg = format!("there is no stage `{name}` in {}", pipeline.path.display());
                if let Some(best) =
                    crate::diagnostics::closest(name, pipeline.stages.keys().map(String::as_str))
                {
                    msg.push_str(&format!(" (did you mean `{best}`?)"));
                }
                return Err(msg);
            }
        }
        Ok(())
    }

    fn selected(&self, pipeline: &Pipeline, dag: &Dag) -> BTreeSet<String> {
        let mut set: BTreeSet<String> = if self.only.is_empty() {
            pipeline.stages.keys().cloned().collect()
        } else {
            self.only.iter().cloned().collect()
        };
        if let Some(from) = &self.from {
            set = set.intersection(&dag.descendants(from)).cloned().collect();
        }
        if let Some(until) = &self.until {
            set = set.intersection(&dag.ancestors(until)).cloned().collect();
        }
        set
    }

    fn forced(&self, stage: &str) -> bool {
        self.force_all || self.force.iter().any(|f| f == stage)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Its artifact is in the store and up to date.
    Cached,
    /// It will run.
    Run,
    /// Outside the selection; not run.
    Skipped,
    /// It cannot run: an input is unavailable or a dependency is missing.
    Blocked,
}

/// One reason a stage runs (or is blocked).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    NeverRun,
    Forced,
    Param {
        path: String,
        old: Option<serde_json::Value>,
        new: Option<serde_json::Value>,
    },
    InputChanged {
        port: String,
        stage: String,
    },
    InputRebuilt {
        port: String,
        stage: String,
    },
    FileChanged {
        path: String,
    },
    FileAdded {
        path: String,
    },
    FileRemoved {
        path: String,
    },
    CodeVersion {
        old: u32,
        new: u32,
    },
    KindChanged {
        old: String,
        new: String,
    },
    OutputMissing,
    OutputCorrupt {
        detail: String,
    },
    /// Cached: the key was built before (an earlier param value), its artifact is restored.
    RestoredFromRunCache,
    /// Skipped: not selected; its last output is used by selected stages.
    NotSelected,
    MissingDependency {
        path: String,
        error: String,
    },
    InputUnavailable {
        stage: String,
    },
}

/// A param value as the user wrote it: an `f32` param widened to JSON's f64 (`0.1` as
/// `0.10000000149011612`) is shown at f32 precision.
fn short(value: &serde_json::Value) -> String {
    match value.as_f64() {
        Some(x) if value.is_f64() && f64::from(x as f32) == x => (x as f32).to_string(),
        _ => value.to_string(),
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<serde_json::Value>| v.as_ref().map_or("(unset)".into(), short);
        match self {
            Reason::NeverRun => write!(f, "never run"),
            Reason::Forced => write!(f, "forced"),
            Reason::Param { path, old, new } => {
                write!(f, "params: {path} {} → {}", show(old), show(new))
            }
            Reason::InputChanged { port, stage } => {
                write!(f, "input {port} changed (stage {stage})")
            }
            Reason::InputRebuilt { port, stage } => {
                write!(f, "input {port} will be rebuilt (stage {stage})")
            }
            Reason::FileChanged { path } => write!(f, "file {path} changed"),
            Reason::FileAdded { path } => write!(f, "file {path} added to deps"),
            Reason::FileRemoved { path } => write!(f, "file {path} removed from deps"),
            Reason::CodeVersion { old, new } => write!(f, "code version {old} → {new}"),
            Reason::KindChanged { old, new } => write!(f, "kind {old} → {new}"),
            Reason::OutputMissing => write!(f, "output missing"),
            Reason::OutputCorrupt { detail } => write!(f, "output corrupt ({detail})"),
            Reason::RestoredFromRunCache => write!(f, "restored from the run cache"),
            Reason::NotSelected => write!(f, "not selected"),
            Reason::MissingDependency { path, error } if path.is_empty() => {
                write!(f, "dependencies: {error}")
            }
            Reason::MissingDependency { path, error } => write!(f, "dependency {path}: {error}"),
            Reason::InputUnavailable { stage } => {
                write!(
                    f,
                    "input stage {stage} has no up-to-date output (run it, or widen the selection)"
                )
            }
        }
    }
}

/// Reasons as one line of text.
pub fn describe(reasons: &[Reason]) -> String {
    reasons
        .iter()
        .map(Reason::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The decision for one stage.
#[derive(Clone, Debug, Serialize)]
pub struct StagePlan {
    pub stage: String,
    pub kind: String,
    pub decision: Decision,
    pub reasons: Vec<Reason>,
    /// How it differs from its lockfile entry (empty when it matches): what `status` reports.
    pub changes: Vec<Reason>,
    /// True when its key depends on an upstream stage that will be rebuilt: if that upstream
    /// produces the same artifact (or a key already in the run cache), this stage stays cached.
    pub may_cut_off: bool,
    /// Known once every input's artifact is known.
    pub key: Option<StageKey>,
    /// The artifact it has (cached) or will use (skipped).
    pub artifact: Option<ArtifactId>,
    /// Hashes of its external dependencies, taken now, before anything runs.
    #[serde(skip)]
    pub deps: BTreeMap<String, String>,
}

/// Decisions for every stage of a pipeline, in topological order.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub pipeline: String,
    pub stages: Vec<StagePlan>,
}

impl Plan {
    pub fn get(&self, stage: &str) -> Option<&StagePlan> {
        self.stages.iter().find(|s| s.stage == stage)
    }
}

/// Everything the planner reads.
pub struct Planner<'a> {
    pub pipeline: &'a Pipeline,
    pub registry: &'a Registry,
    pub store: &'a Store,
    pub lockfile: &'a Lockfile,
    pub stat_cache: &'a StatCache,
}

impl Planner<'_> {
    pub fn plan(&self, selection: &Selection) -> Plan {
        let dag = self.pipeline.dag();
        let selected = selection.selected(self.pipeline, &dag);
        let mut planned: BTreeMap<String, StagePlan> = BTreeMap::new();
        for name in &self.pipeline.order {
            let spec = &self.pipeline.stages[name];
            let plan = self.plan_stage(
                spec,
                &planned,
                selected.contains(name),
                selection.forced(name),
            );
            planned.insert(name.clone(), plan);
        }
        let stages = self
            .pipeline
            .order
            .iter()
            .map(|n| planned.remove(n).expect("planned every stage"))
            .collect();
        Plan {
            pipeline: self.pipeline.name.clone(),
            stages,
        }
    }

    fn plan_stage(
        &self,
        spec: &StageSpec,
        planned: &BTreeMap<String, StagePlan>,
        selected: bool,
        forced: bool,
    ) -> StagePlan {
        let kind = self.registry.get(&spec.kind).expect("validated kind");
        let locked = self.lockfile.stages.get(&spec.name);
        let mut plan = StagePlan {
            stage: spec.name.clone(),
            kind: spec.kind.clone(),
            decision: Decision::Run,
            reasons: Vec::new(),
            changes: Vec::new(),
            may_cut_off: false,
            key: None,
            artifact: None,
            deps: BTreeMap::new(),
        };
        match self.hash_deps(spec) {
            Ok(deps) => plan.deps = deps,
            // A missing dependency matters only to a stage that is meant to run.
            Err(reason) if selected => {
                plan.decision = Decision::Blocked;
                plan.reasons.push(*reason);
                return plan;
            }
            Err(_) => {
                plan.decision = Decision::Skipped;
                plan.reasons.push(Reason::NotSelected);
                return plan;
            }
        }
        let (inputs, rebuilt, unavailable) = input_artifacts(spec, planned);
        if let Some(stage) = unavailable {
            plan.decision = if selected {
                Decision::Blocked
            } else {
                Decision::Skipped
            };
            plan.reasons.push(if selected {
                Reason::InputUnavailable { stage }
            } else {
                Reason::NotSelected
            });
            return plan;
        }
        plan.changes =
            changes_since_lock(spec, kind.version(), locked, &inputs, &plan.deps, &rebuilt);
        if rebuilt.is_empty() {
            let material = KeyMaterial {
                kind: &spec.kind,
                version: kind.version(),
                params: &spec.params,
                inputs: &inputs,
                deps: &plan.deps,
            };
            plan.key = Some(material.key());
        }
        let cached = plan
            .key
            .as_ref()
            .and_then(|k| self.store.record(k))
            .map(|r| (self.store.verify(&r.artifact), r.artifact));
        if !selected {
            // Not selected: selected stages may read its output only if it is up to date.
            plan.decision = Decision::Skipped;
            plan.reasons.push(Reason::NotSelected);
            if let Some((Integrity::Intact, id)) = cached {
                plan.artifact = Some(id);
            }
            return plan;
        }
        if forced {
            plan.reasons.push(Reason::Forced);
            return plan;
        }
        match cached {
            Some((Integrity::Intact, id)) => {
                plan.decision = Decision::Cached;
                if locked.is_some_and(|l| Some(&l.key) != plan.key.as_ref()) {
                    plan.reasons.push(Reason::RestoredFromRunCache);
                }
                plan.artifact = Some(id);
            }
            Some((Integrity::Missing, _)) => plan.reasons.push(Reason::OutputMissing),
            Some((Integrity::Corrupt(detail), _)) => {
                plan.reasons.push(Reason::OutputCorrupt { detail })
            }
            None => {
                plan.reasons = plan.changes.clone();
                if plan.reasons.is_empty() {
                    // Same inputs as the lockfile, but the key is not in this store (a fresh
                    // clone, or after gc).
                    plan.reasons.push(Reason::OutputMissing);
                }
                // Its key is known only once the rebuilt inputs are: if they come out unchanged
                // (or the new key was built before), it stays cached.
                plan.may_cut_off = !rebuilt.is_empty();
            }
        }
        plan
    }

    /// Content hashes of the stage's external files, keyed by the path as written.
    fn hash_deps(&self, spec: &StageSpec) -> Result<BTreeMap<String, String>, Box<Reason>> {
        let kind = self.registry.get(&spec.kind).expect("validated kind");
        let found = kind
            .external_deps(&spec.params, &self.pipeline.dir)
            .map_err(|error| {
                Box::new(Reason::MissingDependency {
                    path: String::new(),
                    error,
                })
            })?;
        let mut deps = BTreeMap::new();
        for dep in found {
            let shown = dep.name;
            let hash = self
                .stat_cache
                .hash_dependency(&self.pipeline.dir.join(&dep.path))
                .map_err(|e| {
                    Box::new(Reason::MissingDependency {
                        path: shown.clone(),
                        error: e.to_string(),
                    })
                })?;
            deps.insert(shown, hash.to_hex().to_string());
        }
        Ok(deps)
    }
}

/// A stage's checks against its input artifacts ([`crate::Stage::check_inputs`]).
#[derive(Clone, Debug, PartialEq)]
pub struct InputCheck {
    pub stage: String,
    /// What its kind checks, in words.
    pub what: &'static str,
    pub outcome: Checked,
}

/// What became of an [`InputCheck`].
#[derive(Clone, Debug, PartialEq)]
pub enum Checked {
    /// It ran against the inputs in the store; what it found.
    Ran(Vec<ParamProblem>),
    /// It could not run: this upstream stage has no artifact yet (it runs first, and the check
    /// with the stage).
    NotBuilt(String),
}

/// The input checks of the planned stages that `wanted` picks and whose kind has any, in plan
/// order: run where every input's artifact is already in the store (cached, or up to date
/// outside the selection). The others run when their stage starts.
pub fn check_inputs(
    plan: &Plan,
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
    wanted: impl Fn(&StagePlan) -> bool,
) -> Vec<InputCheck> {
    let mut checks = Vec::new();
    for stage in plan.stages.iter().filter(|s| wanted(s)) {
        let spec = &pipeline.stages[&stage.stage];
        let kind = registry.get(&spec.kind).expect("validated kind");
        let Some(what) = kind.input_checks() else {
            continue;
        };
        let mut dirs = InputDirs::new();
        let mut missing = None;
        for (port, upstream) in &spec.inputs {
            let port_dirs = dirs.entry(port.clone()).or_default();
            for up in upstream {
                match plan.get(up).and_then(|p| p.artifact.as_ref()) {
                    Some(id) => port_dirs.push(store.artifact_dir(id)),
                    None => {
                        missing.get_or_insert_with(|| up.clone());
                    }
                }
            }
        }
        let outcome = match missing {
            Some(up) => Checked::NotBuilt(up),
            None => Checked::Ran(kind.check_inputs(&spec.params, &dirs, &pipeline.dir)),
        };
        checks.push(InputCheck {
            stage: stage.stage.clone(),
            what,
            outcome,
        });
    }
    checks
}

/// Input artifact ids per port, the (port, stage) pairs whose artifact is not known yet because
/// they will run, and an upstream stage that has no usable output at all.
type InputState = (
    BTreeMap<String, Vec<ArtifactId>>,
    Vec<(String, String)>,
    Option<String>,
);

fn input_artifacts(spec: &StageSpec, planned: &BTreeMap<String, StagePlan>) -> InputState {
    let mut inputs = BTreeMap::new();
    let mut rebuilt = Vec::new();
    let mut unavailable = None;
    for (port, stages) in &spec.inputs {
        let mut ids = Vec::new();
        for stage in stages {
            let up = &planned[stage];
            match (&up.artifact, up.decision) {
                (Some(id), _) => ids.push(id.clone()),
                (None, Decision::Run) => rebuilt.push((port.clone(), stage.clone())),
                (None, _) => unavailable = Some(stage.clone()),
            }
        }
        inputs.insert(port.clone(), ids);
    }
    (inputs, rebuilt, unavailable)
}

/// Why a stage whose key is not in the run cache differs from its lockfile entry.
fn changes_since_lock(
    spec: &StageSpec,
    version: u32,
    locked: Option<&LockedStage>,
    inputs: &BTreeMap<String, Vec<ArtifactId>>,
    deps: &BTreeMap<String, String>,
    rebuilt: &[(String, String)],
) -> Vec<Reason> {
    let mut reasons: Vec<Reason> = rebuilt
        .iter()
        .map(|(port, stage)| Reason::InputRebuilt {
            port: port.clone(),
            stage: stage.clone(),
        })
        .collect();
    let Some(locked) = locked else {
        reasons.insert(0, Reason::NeverRun);
        return reasons;
    };
    if locked.kind != spec.kind {
        reasons.insert(
            0,
            Reason::KindChanged {
                old: locked.kind.clone(),
                new: spec.kind.clone(),
            },
        );
        return reasons;
    }
    if locked.version != version {
        reasons.push(Reason::CodeVersion {
            old: locked.version,
            new: version,
        });
    }
    diff_params("", Some(&locked.params), Some(&spec.params), &mut reasons);
    for (port, ids) in inputs {
        let is_rebuilt = rebuilt.iter().any(|(p, _)| p == port);
        if !is_rebuilt && locked.inputs.get(port) != Some(ids) {
            let stage = spec.inputs[port].join(", ");
            reasons.push(Reason::InputChanged {
                port: port.clone(),
                stage,
            });
        }
    }
    for (path, hash) in deps {
        match locked.deps.get(path) {
            None => reasons.push(Reason::FileAdded { path: path.clone() }),
            Some(old) if old != hash => reasons.push(Reason::FileChanged { path: path.clone() }),
            Some(_) => {}
        }
    }
    for path in locked.deps.keys().filter(|p| !deps.contains_key(*p)) {
        reasons.push(Reason::FileRemoved { path: path.clone() });
    }
    reasons
}

/// Appends a `Param` reason for every leaf that differs between two param trees.
fn diff_params(
    path: &str,
    old: Option<&serde_json::Value>,
    new: Option<&serde_json::Value>,
    out: &mut Vec<Reason>,
) {
    use serde_json::Value;
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_params(&child, a.get(k), b.get(k), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff_params(&format!("{path}.{i}"), Some(x), Some(y), out);
            }
        }
        (a, b) if a != b => out.push(Reason::Param {
            path: path.to_string(),
            old: a.cloned(),
            new: b.cloned(),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn param_diffs_name_each_changed_leaf() {
        let mut out = Vec::new();
        diff_params(
            "",
            Some(&json!({"train": {"lr": 0.001, "steps": 10}, "a": 1, "l": [{"s": 1}]})),
            Some(&json!({"train": {"lr": 0.0003, "steps": 10}, "b": 2, "l": [{"s": 2}]})),
            &mut out,
        );
        let shown: Vec<String> = out.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "params: a 1 → (unset)",
                "params: b (unset) → 2",
                "params: l.0.s 1 → 2",
                "params: train.lr 0.001 → 0.0003"
            ]
        );
        // An f32 param reaches JSON widened; it is shown as written.
        let widened = Reason::Param {
            path: "beta".into(),
            old: Some(json!(f64::from(0.3f32))),
            new: Some(json!(f64::from(0.1f32))),
        };
        assert_eq!(widened.to_string(), "params: beta 0.3 → 0.1");
    }
}
