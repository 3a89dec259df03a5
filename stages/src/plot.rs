//! Small self-contained SVG charts for the stages' reports: loss curves and metric bars.

use std::fmt::Write;

/// One line of the plot: label, colour and (step, loss) points.
pub type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// An SVG with one polyline per series.
pub fn loss_curve(series: &[Series]) -> String {
    let (width, height, margin) = (640.0, 360.0, 48.0);
    let points = series.iter().flat_map(|s| s.2.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_max - y_min < 1e-9 {
        y_max = y_min + 1.0;
    }
    let to_x = |x: f64| margin + x / x_max * (width - 2.0 * margin);
    let to_y = |y: f64| height - margin - (y - y_min) / (y_max - y_min) * (height - 2.0 * margin);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{margin}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\
         <line x1=\"{margin}\" y1=\"{margin}\" x2=\"{margin}\" y2=\"{b}\" stroke=\"black\"/>",
        b = height - margin,
        r = width - margin
    );
    for (value, anchor_y) in [(y_max, to_y(y_max)), (y_min, to_y(y_min))] {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{value:.3}</text>",
            margin - 4.0,
            anchor_y + 4.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">step {x_max:.0}</text>",
        width - margin,
        height - margin + 16.0
    );
    for (i, (label, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", to_x(x), to_y(y)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\
             <text x=\"{}\" y=\"{}\" fill=\"{colour}\">{label}</text>",
            path.join(" "),
            width - margin - 120.0,
            margin + 16.0 * i as f64
        );
        // Sparse series (a validation loss evaluated a few times) show their points too: a
        // single point draws no line.
        if points.len() <= 32 {
            for &(x, y) in points {
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                    to_x(x),
                    to_y(y)
                );
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Horizontal bars, one per (label, value), from a zero line: negative values extend left
/// of it, positive ones right, all on one scale.
pub fn bars(title: &str, bars: &[(String, f64)]) -> String {
    let (width, row, left) = (640.0, 28.0, 220.0);
    let height = 40.0 + row * bars.len() as f64;
    let low = bars.iter().map(|b| b.1).fold(0.0f64, f64::min);
    let high = bars.iter().map(|b| b.1).fold(0.0f64, f64::max);
    let span = (high - low).max(1e-12);
    let room = width - left - 80.0;
    let zero = left + room * -low / span;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"8\" y=\"18\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 30.0 + row * i as f64;
        let length = room * value.abs() / span;
        let start = if *value < 0.0 { zero - length } else { zero };
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
             <rect x=\"{start:.1}\" y=\"{y}\" width=\"{length:.1}\" height=\"{}\" fill=\"#1f77b4\"/>\
             <text x=\"{}\" y=\"{}\">{value:.4}</text>",
            left - 6.0,
            y + 15.0,
            escape(label),
            row - 8.0,
            zero.max(start + length) + 4.0,
            y + 15.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Text made safe for HTML and SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `(step, value)` of `field` (`loss`, `val_loss`) in the lines of a model directory's
/// metrics.jsonl that have it (empty without the file).
pub fn logged_series(dir: &std::path::Path, field: &str) -> Vec<(f64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v[field].as_f64()?)))
        .collect()
}
