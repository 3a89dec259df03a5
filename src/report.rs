//! `smelt report`: the last run of a pipeline as markdown (printed) and a self-contained HTML
//! page: every stage with its outcome (ran, cached, failed, skipped), duration and metrics, the
//! training curves of model stages, and the results of evaluate stages.
//!
//! `smelt run` leaves `runs/<lockfile name>.json` in the store; the rest comes from run
//! records and artifacts.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use smelt_engine::{Outcome, StageResult};
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
    /// The duration of the run that built the artifact (for cached stages too).
    pub built_in_s: Option<f64>,
    pub metrics: Vec<(String, serde_json::Value)>,
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
            seconds(row.built_in_s),
            row.metrics_text()
        );
    }
    for row in rows.iter().filter(|r| r.kind == "evaluate") {
        if let Some(table) = evaluation_table(row, rows) {
            let _ = write!(md, "\n## {} — evaluation\n\n{table}", row.stage);
        }
    }
    md
}

/// An evaluate stage's metric × model table (from its metrics.json), each model named by the
/// stage that built it.
fn evaluation_table(row: &Row, rows: &[Row]) -> Option<String> {
    let text = std::fs::read(row.artifact_dir.as_ref()?.join("metrics.json")).ok()?;
    let report: smelt_stages::evaluate::Report = serde_json::from_slice(&text).ok()?;
    let stage_of = |id: &str| {
        rows.iter()
            .find(|r| {
                r.artifact_dir
                    .as_ref()
                    .and_then(|d| d.file_name())
                    .is_some_and(|n| n == id)
            })
            .map_or(format!("({})", &id[..id.len().min(12)]), |r| {
                format!("`{}`", r.stage)
            })
    };
    Some(smelt_stages::evaluate::report::metric_table(
        &report, &stage_of,
    ))
}

impl Row {
    /// The metrics as `name: value` pairs, numbers shortened.
    fn metrics_text(&self) -> String {
        let pairs: Vec<String> = self
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
        _ => value.to_string(),
    }
}

pub fn html(last: &LastRun, rows: &[Row]) -> String {
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{0}</title><style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head><body><h1>{0}</h1>\
         <p>Last run took {1:.2}s.</p><table><tr><th>stage</th><th>kind</th><th>outcome</th><th>this run</th><th>built in</th><th>metrics</th></tr>",
        escape(&last.pipeline),
        last.duration_s
    );
    for row in rows {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&row.stage),
            escape(&row.kind),
            escape(&row.run.outcome),
            seconds(row.run.duration_s),
            seconds(row.built_in_s),
            escape(&row.metrics_text())
        );
    }
    html.push_str("</table>");
    let durations: Vec<(String, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.stage.clone(), r.built_in_s?)))
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
        let curve = plot::training_curve(dir);
        if !curve.is_empty() {
            let _ = write!(
                html,
                "<h2>{} — training loss</h2>{}",
                escape(&row.stage),
                plot::loss_curve(&[("loss", "#1f77b4", curve)])
            );
        }
        if let Ok(evaluation) = std::fs::read_to_string(dir.join("report.html")) {
            // The evaluate stage's own page, minus its document wrapper.
            let body = evaluation
                .split_once("<body>")
                .and_then(|(_, rest)| rest.rsplit_once("</body>"))
                .map_or(String::new(), |(body, _)| {
                    body.replace("<h1>Evaluation</h1>", "")
                });
            let _ = write!(html, "<h2>{} — evaluation</h2>{body}", escape(&row.stage));
        }
    }
    html.push_str("</body></html>\n");
    html
}
