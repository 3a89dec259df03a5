//! report.md and a self-contained report.html (inline SVG) of an evaluation.
//!
//! Models are named by a function of their index: the evaluate artifact knows only their
//! artifact ids (`model 0 (b43d347a12cc)`: stage names are not part of its key), while
//! `smelt report` names them by the stages that built them.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::Report;
use crate::plot::{self, escape};

/// Names model `i` of a report.
pub type ModelNames<'a> = &'a dyn Fn(usize) -> String;

/// The artifact's own names: `model i (first 12 hex digits of its id)`, or of the `base`
/// model as the params name it.
pub fn names_by_id(report: &Report) -> impl Fn(usize) -> String + '_ {
    |i| {
        let id = report.models.get(i).map_or("", String::as_str);
        format!("model {i} ({})", short_id(id))
    }
}

/// An artifact id's first 12 hex digits; anything else (a `base` model's path) whole.
pub fn short_id(id: &str) -> &str {
    match id.bytes().all(|b| b.is_ascii_hexdigit()) {
        true => &id[..id.len().min(12)],
        false => id,
    }
}

/// Each metric's value per model index.
fn rows(report: &Report) -> BTreeMap<String, BTreeMap<usize, f64>> {
    let mut rows: BTreeMap<String, BTreeMap<usize, f64>> = BTreeMap::new();
    for result in &report.results {
        rows.entry(result.metric.clone())
            .or_default()
            .insert(result.model, result.value);
    }
    rows
}

fn cell(values: &BTreeMap<usize, f64>, i: usize) -> String {
    values.get(&i).map_or("—".into(), |v| format!("{v:.4}"))
}

/// The metrics as a Markdown table: one row per metric, one column per model.
pub fn metric_table(report: &Report, name: ModelNames) -> String {
    let count = report.models.len();
    let headers: Vec<String> = (0..count).map(name).collect();
    let mut md = format!("| metric | {} |\n", headers.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(count));
    for (metric, values) in &rows(report) {
        let cells: Vec<String> = (0..count).map(|i| cell(values, i)).collect();
        let _ = writeln!(md, "| {metric} | {} |", cells.join(" | "));
    }
    md
}

pub fn markdown(report: &Report) -> String {
    let name = names_by_id(report);
    let mut md = String::from("# Evaluation\n\n");
    md.push_str(&metric_table(report, &name));
    md.push_str("\n## Signatures\n\n");
    for result in &report.results {
        let _ = writeln!(
            md,
            "- `{}` {}: `{}`",
            result.metric,
            name(result.model),
            result.signature
        );
    }
    if !report.samples.is_empty() {
        md.push_str("\n## Samples\n\n");
        for (model, prompt, text) in &report.samples {
            let _ = writeln!(
                md,
                "- {}, `{}` → {}",
                name(*model),
                prompt.replace('`', "'"),
                text.replace('\n', " ⏎ ")
            );
        }
    }
    md
}

/// The evaluation as an HTML fragment: the metric table, a bar chart per metric and the
/// samples, models named by `name` (also what `smelt report`'s page shows).
pub fn html_body(report: &Report, name: ModelNames) -> String {
    let count = report.models.len();
    let headers: Vec<String> = (0..count).map(name).collect();
    let rows = rows(report);
    let mut html = String::from("<table><tr><th>metric</th>");
    for header in &headers {
        let _ = write!(html, "<th>{}</th>", escape(header));
    }
    html.push_str("</tr>");
    for (metric, values) in &rows {
        let _ = write!(html, "<tr><td>{}</td>", escape(metric));
        for i in 0..count {
            let _ = write!(html, "<td class=\"n\">{}</td>", cell(values, i));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    for (metric, values) in &rows {
        let bars: Vec<(String, f64)> = values
            .iter()
            .filter(|(&i, _)| i < count)
            .map(|(&i, &v)| (headers[i].clone(), v))
            .collect();
        let _ = write!(html, "<div>{}</div>", plot::bars(metric, &bars));
    }
    if !report.samples.is_empty() {
        html.push_str("<h3>Samples</h3><ul>");
        for (model, prompt, text) in &report.samples {
            let _ = write!(
                html,
                "<li>{}: <b>{}</b>{}</li>",
                escape(&name(*model)),
                escape(prompt),
                escape(text)
            );
        }
        html.push_str("</ul>");
    }
    html
}

/// The evaluate artifact's page: [`html_body`] with its own names, and the models' training
/// curves.
pub fn html(report: &Report, curves: &[(String, Vec<(f64, f64)>)]) -> String {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Evaluation</title>\
         <style>body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 8px}td.n{text-align:right}</style></head><body><h1>Evaluation</h1>",
    );
    html.push_str(&html_body(report, &names_by_id(report)));
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    let series: Vec<plot::Series> = curves
        .iter()
        .enumerate()
        .filter(|(_, (_, points))| !points.is_empty())
        .map(|(i, (name, points))| (name.as_str(), colours[i % colours.len()], points.clone()))
        .collect();
    if !series.is_empty() {
        let _ = write!(html, "<h2>Training loss</h2>{}", plot::loss_curve(&series));
    }
    html.push_str("</body></html>\n");
    html
}
