//! execute: runs a plan. Ready stages run in parallel (up to `jobs`), each under its key's lock,
//! writing into a fresh temp dir that is published into the store only when the stage succeeds.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::key::KeyMaterial;
use crate::lockfile::{LockedStage, Lockfile};
use crate::plan::{Decision, Plan, Reason, StagePlan};
use crate::spec::Pipeline;
use crate::stage::{Metrics, Progress, Registry, StageContext};
use crate::store::{ArtifactId, Integrity, RunRecord, StageKey, Store};

/// Why a stage ended up cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachedBy {
    /// The plan found it cached.
    Plan,
    /// Its upstream was rebuilt to the same artifact (early cutoff).
    CutOff,
    /// Another run built the same key while this one waited for its lock.
    OtherRun,
}

/// How one stage ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Ran {
        artifact: ArtifactId,
        duration_s: f64,
        metrics: Metrics,
        /// Set when the key had been built before into another artifact: the stage is not a
        /// function of its inputs, which defeats early cutoff and shared caches.
        diverged: Option<Divergence>,
    },
    Cached {
        artifact: ArtifactId,
        by: CachedBy,
    },
    Failed {
        error: String,
    },
    /// Not run: not selected (maybe with a usable artifact), or an upstream stage failed.
    Skipped {
        reason: String,
        artifact: Option<ArtifactId>,
    },
}

impl Outcome {
    pub fn artifact(&self) -> Option<&ArtifactId> {
        match self {
            Outcome::Ran { artifact, .. } | Outcome::Cached { artifact, .. } => Some(artifact),
            Outcome::Skipped { artifact, .. } => artifact.as_ref(),
            Outcome::Failed { .. } => None,
        }
    }
}

/// A rerun of a key that produced an artifact other than the recorded one.
#[derive(Clone, Debug, PartialEq)]
pub struct Divergence {
    pub previous: ArtifactId,
    /// The files that differ; `None` when the previous artifact's manifest is gone.
    pub files: Option<Vec<String>>,
}

/// One stage's result, with the key and inputs it was built from (for the lockfile).
#[derive(Clone, Debug)]
pub struct StageResult {
    pub stage: String,
    pub outcome: Outcome,
    pub key: Option<StageKey>,
    pub inputs: BTreeMap<String, Vec<ArtifactId>>,
    /// External dependency hashes taken before it ran.
    pub deps: BTreeMap<String, String>,
}

/// Told about each stage as the run goes (the CLI prints it).
pub trait Observer: Sync {
    fn started(&self, plan: &StagePlan);
    fn waiting(&self, stage: &str);
    fn finished(&self, result: &StageResult);
}

pub struct Executor<'a> {
    pub pipeline: &'a Pipeline,
    pub registry: &'a Registry,
    pub store: &'a Store,
    pub jobs: usize,
    pub keep_going: bool,
    pub observer: &'a dyn Observer,
    pub progress: Arc<dyn Progress>,
}

impl Executor<'_> {
    /// Runs the plan; returns every stage's result in plan order.
    pub fn run(&self, plan: &Plan) -> Vec<StageResult> {
        let mut done: BTreeMap<String, StageResult> = BTreeMap::new();
        let mut pending: Vec<&StagePlan> = plan.stages.iter().collect();
        let mut failed = false;
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<StageResult>();
            let mut running = 0;
            loop {
                let mut i = 0;
                while i < pending.len() {
                    let stage = pending[i];
                    let spec = &self.pipeline.stages[&stage.stage];
                    if !spec.upstream().all(|u| done.contains_key(u)) {
                        i += 1;
                        continue;
                    }
                    let inputs = self.inputs_of(&stage.stage, &done);
                    let immediate = match &inputs {
                        _ if stage.decision == Decision::Blocked => self.without_running(stage),
                        Err(reason) => Some(skipped(reason.clone(), None)),
                        Ok(_) if failed && !self.keep_going && stage.decision == Decision::Run => {
                            Some(skipped("not started: an earlier stage failed".into(), None))
                        }
                        Ok(_) => self.without_running(stage),
                    };
                    if let Some(outcome) = immediate {
                        let result = StageResult {
                            stage: stage.stage.clone(),
                            outcome,
                            key: stage.key.clone(),
                            inputs: inputs.unwrap_or_default(),
                            deps: stage.deps.clone(),
                        };
                        failed |= matches!(result.outcome, Outcome::Failed { .. });
                        self.observer.finished(&result);
                        done.insert(stage.stage.clone(), result);
                        pending.remove(i);
                        i = 0;
                        continue;
                    }
                    if running >= self.jobs.max(1) {
                        break;
                    }
                    pending.remove(i);
                    running += 1;
                    let tx = tx.clone();
                    let inputs = inputs.expect("checked above");
                    // Named so the binary's panic hook can tell a stage's panic from its own.
                    let worker = std::thread::Builder::new().name(format!("stage:{}", stage.stage));
                    let spawned = worker.spawn_scoped(scope, move || {
                        // Whatever happens, report back, or the scheduler would wait forever.
                        let result = catch_unwind(AssertUnwindSafe(|| self.execute(stage, inputs)))
                            .unwrap_or_else(|panic| StageResult {
                                stage: stage.stage.clone(),
                                outcome: Outcome::Failed {
                                    error: format!("internal error: {}", panic_message(&panic)),
                                },
                                key: None,
                                inputs: BTreeMap::new(),
                                deps: BTreeMap::new(),
                            });
                        let _ = tx.send(result);
                    });
                    if let Err(e) = spawned {
                        running -= 1;
                        let outcome = Outcome::Failed {
                            error: format!("cannot start a thread: {e}"),
                        };
                        let result = StageResult {
                            stage: stage.stage.clone(),
                            outcome,
                            key: None,
                            inputs: BTreeMap::new(),
                            deps: BTreeMap::new(),
                        };
                        failed = true;
                        self.observer.finished(&result);
                        done.insert(stage.stage.clone(), result);
                    }
                }
                if running == 0 {
                    break;
                }
                let result = rx.recv().expect("a worker reports");
                running -= 1;
                failed |= matches!(result.outcome, Outcome::Failed { .. });
                self.observer.finished(&result);
                done.insert(result.stage.clone(), result);
            }
        });
        plan.stages
            .iter()
            .filter_map(|s| done.remove(&s.stage))
            .collect()
    }

    /// Upstream artifacts per port, or why the stage cannot have them.
    fn inputs_of(
        &self,
        stage: &str,
        done: &BTreeMap<String, StageResult>,
    ) -> Result<BTreeMap<String, Vec<ArtifactId>>, String> {
        let spec = &self.pipeline.stages[stage];
        let mut inputs = BTreeMap::new();
        for (port, stages) in &spec.inputs {
            let ids = stages
                .iter()
                .map(|u| {
                    done[u]
                        .outcome
                        .artifact()
                        .cloned()
                        .ok_or_else(|| format!("input {port}: stage {u} has no output"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            inputs.insert(port.clone(), ids);
        }
        Ok(inputs)
    }

    /// The outcome of a stage that needs no worker: cached, skipped or blocked.
    fn without_running(&self, stage: &StagePlan) -> Option<Outcome> {
        let reasons = || crate::plan::describe(&stage.reasons);
        match stage.decision {
            Decision::Run => None,
            Decision::Cached => Some(Outcome::Cached {
                artifact: stage.artifact.clone().expect("cached has artifact"),
                by: CachedBy::Plan,
            }),
            Decision::Skipped => Some(skipped(reasons(), stage.artifact.clone())),
            Decision::Blocked => Some(Outcome::Failed { error: reasons() }),
        }
    }

    /// Builds one stage: key, lock, run into a temp dir, publish, record.
    fn execute(&self, plan: &StagePlan, inputs: BTreeMap<String, Vec<ArtifactId>>) -> StageResult {
        let spec = &self.pipeline.stages[&plan.stage];
        let kind = self.registry.get(&spec.kind).expect("validated kind");
        let key = KeyMaterial {
            kind: &spec.kind,
            version: kind.version(),
            params: &spec.params,
            inputs: &inputs,
            deps: &plan.deps,
        }
        .key();
        let result = |outcome| StageResult {
            stage: plan.stage.clone(),
            outcome,
            key: Some(key.clone()),
            inputs: inputs.clone(),
            deps: plan.deps.clone(),
        };
        let forced = plan.reasons.contains(&Reason::Forced);
        if !forced {
            if let Some(artifact) = self.cached(&key) {
                // A key unknown at planning time resolved to a cached one: early cutoff. A key
                // the plan knew was missing then: another run built it since.
                let by = if plan.key.is_some() {
                    CachedBy::OtherRun
                } else {
                    CachedBy::CutOff
                };
                return result(Outcome::Cached { artifact, by });
            }
        }
        let lock = match self.store.try_lock_key(&key) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                self.observer.waiting(&plan.stage);
                match self.store.lock_key(&key) {
                    Ok(lock) => lock,
                    Err(e) => {
                        return result(Outcome::Failed {
                            error: format!("cannot lock the store: {e}"),
                        })
                    }
                }
            }
            Err(e) => {
                return result(Outcome::Failed {
                    error: format!("cannot lock the store: {e}"),
                })
            }
        };
        // Whoever held the lock may have built this very key.
        if let Some(artifact) = self.cached(&key) {
            if !forced {
                return result(Outcome::Cached {
                    artifact,
                    by: CachedBy::OtherRun,
                });
            }
        }
        self.observer.started(plan);
        let outcome = match self.store.new_output_dir(&key, &lock) {
            Ok(out_dir) => self.build(plan, &key, &inputs, out_dir, &lock),
            Err(e) => Outcome::Failed {
                error: format!("cannot create the output directory: {e}"),
            },
        };
        drop(lock);
        result(outcome)
    }

    fn build(
        &self,
        plan: &StagePlan,
        key: &StageKey,
        inputs: &BTreeMap<String, Vec<ArtifactId>>,
        out_dir: std::path::PathBuf,
        lock: &crate::store::KeyLock,
    ) -> Outcome {
        let spec = &self.pipeline.stages[&plan.stage];
        let kind = self.registry.get(&spec.kind).expect("validated kind");
        let work_dir = self.store.work_dir(key);
        if let Err(e) = std::fs::create_dir_all(&work_dir) {
            return Outcome::Failed {
                error: format!("cannot create the work directory: {e}"),
            };
        }
        let ctx = StageContext {
            stage: plan.stage.clone(),
            pipeline_dir: self.pipeline.dir.clone(),
            out_dir: out_dir.clone(),
            work_dir: work_dir.clone(),
            inputs: inputs
                .iter()
                .map(|(port, ids)| {
                    (
                        port.clone(),
                        ids.iter().map(|id| self.store.artifact_dir(id)).collect(),
                    )
                })
                .collect(),
            threads: rayon::current_num_threads(),
            progress: self.progress.clone(),
            key_lock_fd: std::os::fd::AsRawFd::as_raw_fd(lock),
            memo_dir: self.store.memo_dir(),
        };
        let started = Instant::now();
        let ran = catch_unwind(AssertUnwindSafe(|| kind.run(&spec.params, &ctx)));
        let duration_s = started.elapsed().as_secs_f64();
        let metrics = match ran {
            Ok(Ok(metrics)) => metrics,
            Ok(Err(e)) => return self.discard(&out_dir, e.to_string()),
            Err(panic) => {
                return self.discard(
                    &out_dir,
                    format!("the stage panicked: {}", panic_message(&panic)),
                )
            }
        };
        let artifact = match self.store.publish(&out_dir) {
            Ok(id) => id,
            Err(e) => return self.discard(&out_dir, format!("cannot publish the output: {e}")),
        };
        let diverged = self
            .store
            .record(key)
            .filter(|previous| previous.artifact != artifact)
            .map(|previous| Divergence {
                files: self.store.differing_files(&previous.artifact, &artifact),
                previous: previous.artifact,
            });
        let record = RunRecord {
            key: key.clone(),
            artifact: artifact.clone(),
            kind: spec.kind.clone(),
            version: kind.version(),
            params: spec.params.clone(),
            inputs: inputs.clone(),
            deps: plan.deps.clone(),
            stage: plan.stage.clone(),
            finished_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            duration_s,
            host: host_name(),
            threads: ctx.threads,
            metrics: metrics.clone(),
        };
        if let Err(e) = self.store.save_record(&record) {
            return Outcome::Failed {
                error: format!("cannot write the run record: {e}"),
            };
        }
        // Checkpoints are only needed to resume this key; it is done.
        let _ = crate::store::remove_tree(&work_dir);
        Outcome::Ran {
            artifact,
            duration_s,
            metrics,
            diverged,
        }
    }

    fn discard(&self, out_dir: &std::path::Path, error: String) -> Outcome {
        let _ = crate::store::remove_tree(out_dir);
        Outcome::Failed { error }
    }

    /// The intact artifact recorded for a key.
    fn cached(&self, key: &StageKey) -> Option<ArtifactId> {
        let record = self.store.record(key)?;
        (self.store.verify(&record.artifact) == Integrity::Intact).then_some(record.artifact)
    }
}

/// This machine's name, for the run record (Linux keeps it in /proc).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

fn skipped(reason: String, artifact: Option<ArtifactId>) -> Outcome {
    Outcome::Skipped { reason, artifact }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Records every stage that has an up-to-date artifact; keeps the entries of the others.
pub fn update_lockfile(
    lock: &mut Lockfile,
    pipeline: &Pipeline,
    registry: &Registry,
    results: &[StageResult],
) {
    lock.smelt = crate::spec::FORMAT_VERSION;
    lock.pipeline = pipeline.name.clone();
    lock.stages
        .retain(|name, _| pipeline.stages.contains_key(name));
    for result in results {
        // Unselected stages count too when their current key is cached (their artifact).
        let (Some(key), Some(artifact)) = (&result.key, result.outcome.artifact()) else {
            continue;
        };
        let spec = &pipeline.stages[&result.stage];
        let kind = registry.get(&spec.kind).expect("validated kind");
        lock.stages.insert(
            result.stage.clone(),
            LockedStage {
                kind: spec.kind.clone(),
                version: kind.version(),
                key: key.clone(),
                artifact: artifact.clone(),
                params: spec.params.clone(),
                inputs: result.inputs.clone(),
                deps: result.deps.clone(),
            },
        );
    }
}
