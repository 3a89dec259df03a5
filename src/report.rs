//! `smelt report`: the last run of a pipeline as markdown (printed) and a self-contained HTML
//! page: every stage with its outcome (ran, cached, failed, skipped), duration and metrics, the
//! training curves of model stages, and the results of evaluate stages.
//!
//! `smelt run` leaves `runs/<lockfile name>.json` in the store; the rest comes from run
//! records and artifacts.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use smelt_engine::store::RunRecord;
use smelt_engine::{Outcome, StageResult};
use smelt_stages::evaluate;
use smelt_stages::plot::{self, escape};

/// What one `smelt run` did, kept for `smelt report`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LastRun {
    pub pipeline: String,
    /// Unix seconds.
    pub finished_at: u64,
    pub duration_s: f64,
    pub stages: Vec<StageRun>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StageRun {
    pub stage: String,
    /// `ran`, `cached`, `failed` or `skipped`.
    pub outcome: String,
    pub artifact: Option<String>,
    pub key: Option<String>,
    /// This run's time for stages that ran.
    pub duration_s: Option<f64>,
    pub detail: Option<String>,
}

pub fn path(store_root: &Path, lockfile: &Path) -> PathBuf {
    let name = lockfile
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    store_root.join("runs").join(format!("{name}.json"))
}

impl LastRun {
    pub fn new(pipeline: &str, results: &[StageResult], duration_s: f64) -> Self {
        let stages = results
            .iter()
            .map(|r| {
                let (outcome, duration_s, detail) = match &r.outcome {
                    Outcome::Ran { duration_s, .. } => ("ran", Some(*duration_s), None),
                    Outcome::Cached { .. } => ("cached", None, None),
                    Outcome::Failed { error } => ("failed", None, Some(error.clone())),
                    Outcome::Skipped { reason, .. } => ("skipped", None, Some(reason.clone())),
                };
                StageRun {
                    stage: r.stage.clone(),
                    outcome: outcome.into(),
                    artifact: r.outcome.artifact().map(|a| a.to_string()),
                    key: r.key.as_ref().map(|k| k.to_string()),
                    duration_s,
                    detail,
                }
            })
            .collect();
        LastRun {
            pipeline: pipeline.into(),
            finished_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            duration_s,
            stages,
        }
    }
}

/// A stage as the report shows it.
pub struct Row {
    pub stage: String,
    pub kind: String,
    pub run: StageRun,
    /// The run record of the artifact's key: how it was built (for cached stages too).
    pub record: Option<RunRecord>,
    pub artifact_dir: Option<PathBuf>,
}

pub fn markdown(last: &LastRun, rows: &[Row]) -> String {
    let ran = rows.iter().filter(|r| r.run.outcome == "ran").count();
    let cached = rows.iter().filter(|r| r.run.outcome == "cached").count();
    let mut md = format!(
        "# {}\n\nLast run: {} stages ran, {cached} cached, in {:.2}s.\n\n| stage | kind | outcome | this run | built in | metrics |\n|---|---|---|---|---|---|\n",
        last.pipeline,
        ran,
        last.duration_s
    );
    for row in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {}{} | {} | {} | {} |",
            row.stage,
            row.kind,
            row.run.outcome,
            row.run
                .detail
                .as_deref()
                .map(|d| format!(" ({})", d.lines().next().unwrap_or("")))
                .unwrap_or_default(),
            seconds(row.run.duration_s),
            seconds(row.built_in_s()),
            row.metrics_text(rows)
        );
    }
    let trained: Vec<&Row> = rows.iter().filter(|r| r.training().is_some()).collect();
    if !trained.is_empty() {
        md.push_str(
            "\n## Training\n\n| stage | steps | loss | validation loss | tokens/s | MFU | built on |\n|---|---|---|---|---|---|---|\n",
        );
        for row in trained {
            let t = row.training().expect("filtered");
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                row.stage, t.steps, t.loss, t.val_loss, t.tokens_per_sec, t.mfu, t.built_on
            );
        }
    }
    for row in rows.iter().filter(|r| r.kind == "evaluate") {
        if let Some((report, names)) = evaluation(row, rows) {
            let table = evaluate::report::metric_table(&report, &|i| names[i].clone());
            let _ = write!(md, "\n## {} — evaluation\n\n{table}", row.stage);
        }
    }
    md
}

/// An evaluate stage's report (its metrics.json) and its models' names: each model's stage,
/// by artifact id.
fn evaluation(row: &Row, rows: &[Row]) -> Option<(evaluate::Report, Vec<String>)> {
    if row.kind != "evaluate" {
        return None;
    }
    let text = std::fs::read(row.artifact_dir.as_ref()?.join("metrics.json")).ok()?;
    let report: evaluate::Report = serde_json::from_slice(&text).ok()?;
    let names = report
        .models
        .iter()
        .map(|id| {
            rows.iter()
                .find(|r| r.run.artifact.as_deref() == Some(id.as_str()))
                .map_or(format!("({})", evaluate::report::short_id(id)), |r| {
                    format!("`{}`", r.stage)
                })
        })
        .collect();
    Some((report, names))
}

/// What the report says of a training stage, formatted.
struct Training {
    steps: String,
    loss: String,
    val_loss: String,
    tokens_per_sec: String,
    mfu: String,
    built_on: String,
}

impl Row {
    fn built_in_s(&self) -> Option<f64> {
        self.record.as_ref().map(|r| r.duration_s)
    }

    fn metric(&self, name: &str) -> Option<&serde_json::Value> {
        self.record.as_ref()?.metrics.get(name)
    }

    /// The training summary of a stage whose record has a trainer's timings.
    fn training(&self) -> Option<Training> {
        self.metric("timings")?;
        let record = self.record.as_ref()?;
        let shown = |name: &str| self.metric(name).map_or("—".into(), short);
        Some(Training {
            steps: shown("steps"),
            loss: shown("loss"),
            val_loss: shown("val_loss"),
            tokens_per_sec: shown("tokens_per_sec"),
            mfu: self
                .metric("mfu")
                .and_then(|v| v.as_f64())
                .map_or("—".into(), |m| format!("{:.1}%", 100.0 * m)),
            built_on: if record.host.is_empty() {
                "—".into()
            } else {
                format!("{} ({} threads)", record.host, record.threads)
            },
        })
    }

    /// The scalar metrics as `name: value` pairs, numbers shortened; an evaluation's, which
    /// have a table of their own, point to it.
    fn metrics_text(&self, rows: &[Row]) -> String {
        if evaluation(self, rows).is_some() {
            return format!("the table \"{} — evaluation\"", self.stage);
        }
        let Some(record) = &self.record else {
            return String::new();
        };
        let pairs: Vec<String> = record
            .metrics
            .iter()
            .filter(|(_, v)| !v.is_array() && !v.is_object())
            .map(|(k, v)| format!("{k}: {}", short(v)))
            .collect();
        pairs.join(", ")
    }
}

fn seconds(duration: Option<f64>) -> String {
    duration.map_or("—".into(), |d| format!("{d:.2}s"))
}

fn short(value: &serde_json::Value) -> String {
    match value.as_f64() {
        Some(x) if x.fract() != 0.0 => format!("{x:.4}"),
        Some(x) => format!("{x:.0}"),
        None => value.to_string(),
    }
}

pub fn html(last: &LastRun, rows: &[Row]) -> String {
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{0}</title><style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px}}td.n{{text-align:right}}</style></head><body><h1>{0}</h1>\
         <p>Last run took {1:.2}s.</p><table><tr><th>stage</th><th>kind</th><th>outcome</th><th>this run</th><th>built in</th><th>metrics</th></tr>",
        escape(&last.pipeline),
        last.duration_s
    );
    for row in rows {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            escape(&row.stage),
            escape(&row.kind),
            escape(&row.run.outcome),
            seconds(row.run.duration_s),
            seconds(row.built_in_s()),
            escape(&row.metrics_text(rows))
        );
    }
    html.push_str("</table>");
    let durations: Vec<(String, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.stage.clone(), r.built_in_s()?)))
        .collect();
    if !durations.is_empty() {
        let _ = write!(
            html,
            "<h2>Stage durations (s)</h2>{}",
            plot::bars("seconds to build", &durations)
        );
    }
    for row in rows {
        let Some(dir) = &row.artifact_dir else {
            continue;
        };
        let train = plot::logged_series(dir, "loss");
        if !train.is_empty() {
            let val = plot::logged_series(dir, "val_loss");
            let _ = write!(
                html,
                "<h2>{} — training</h2>{}",
                escape(&row.stage),
                plot::loss_curve(&[
                    ("train loss", "#1f77b4", train),
                    ("validation loss", "#d62728", val)
                ])
            );
            if let Some(t) = row.training() {
                let _ = write!(
                    html,
                    "<p>{} steps; loss {}, validation loss {}; {} tokens/s, MFU {}; built on {}.</p>",
                    t.steps,
                    t.loss,
                    t.val_loss,
                    t.tokens_per_sec,
                    t.mfu,
                    escape(&t.built_on)
                );
            }
        }
        if let Some((report, names)) = evaluation(row, rows) {
            let names: Vec<String> = names.iter().map(|n| n.replace('`', "")).collect();
            let body = evaluate::report::html_body(&report, &|i| names[i].clone());
            let _ = write!(html, "<h2>{} — evaluation</h2>{body}", escape(&row.stage));
        }
    }
    html.push_str("</body></html>\n");
    html
}
