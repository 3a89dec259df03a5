//! report.md and a self-contained report.html (inline SVG) of an evaluation.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::Report;
use crate::plot::{self, escape};

/// The metrics as a table: one row per metric, one column per model.
fn table(report: &Report) -> (Vec<String>, BTreeMap<String, BTreeMap<usize, f64>>) {
    let mut rows: BTreeMap<String, BTreeMap<usize, f64>> = BTreeMap::new();
    for result in &report.results {
        rows.entry(result.metric.clone())
            .or_default()
            .insert(result.model, result.value);
    }
    let headers = report
        .models
        .iter()
        .enumerate()
        .map(|(i, id)| format!("model {i} ({})", &id[..id.len().min(12)]))
        .collect();
    (headers, rows)
}

/// The metrics as a Markdown table, one column per model, headed `model i` and what `name`
/// makes of the model's artifact id.
pub fn metric_table(report: &Report, name: &dyn Fn(&str) -> String) -> String {
    let (_, rows) = table(report);
    let headers: Vec<String> = report
        .models
        .iter()
        .enumerate()
        .map(|(i, id)| format!("model {i} {}", name(id)))
        .collect();
    let mut md = format!("| metric | {} |\n", headers.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(headers.len()));
    for (metric, values) in &rows {
        let cells: Vec<String> = (0..headers.len())
            .map(|i| values.get(&i).map_or("—".into(), |v| format!("{v:.4}")))
            .collect();
        let _ = writeln!(md, "| {metric} | {} |", cells.join(" | "));
    }
    md
}

pub fn markdown(report: &Report) -> String {
    let mut md = String::from("# Evaluation\n\n");
    md.push_str(&metric_table(report, &|id| {
        format!("({})", &id[..id.len().min(12)])
    }));
    md.push_str("\n## Signatures\n\n");
    for result in &report.results {
        let _ = writeln!(
            md,
            "- `{}` model {}: `{}`",
            result.metric, result.model, result.signature
        );
    }
    if !report.samples.is_empty() {
        md.push_str("\n## Samples\n\n");
        for (model, prompt, text) in &report.samples {
            let _ = writeln!(
                md,
                "- model {model}, `{}` → {}",
                prompt.replace('`', "'"),
                text.replace('\n', " ⏎ ")
            );
        }
    }
    md
}

pub fn html(report: &Report, curves: &[(String, Vec<(f64, f64)>)]) -> String {
    let (headers, rows) = table(report);
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Evaluation</title>\
         <style>body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body><h1>Evaluation</h1><table><tr><th>metric</th>",
    );
    for header in &headers {
        let _ = write!(html, "<th>{}</th>", escape(header));
    }
    html.push_str("</tr>");
    for (metric, values) in &rows {
        let _ = write!(html, "<tr><td>{}</td>", escape(metric));
        for i in 0..headers.len() {
            let _ = write!(
                html,
                "<td>{}</td>",
                values.get(&i).map_or("—".into(), |v| format!("{v:.4}"))
            );
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    for (metric, values) in &rows {
        let bars: Vec<(String, f64)> = values
            .iter()
            .map(|(&i, &v)| (headers[i].clone(), v))
            .collect();
        let _ = write!(html, "<div>{}</div>", plot::bars(metric, &bars));
    }
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
    if !report.samples.is_empty() {
        html.push_str("<h2>Samples</h2><ul>");
        for (model, prompt, text) in &report.samples {
            let _ = write!(
                html,
                "<li>model {model}: <b>{}</b>{}</li>",
                escape(prompt),
                escape(text)
            );
        }
        html.push_str("</ul>");
    }
    html.push_str("</body></html>\n");
    html
}
