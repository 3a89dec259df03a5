//! validate → diagnostics: every problem found in a pipeline file, with the place it points at.
//!
//! Problems are collected, never thrown: validation reports all of a file's errors at once. They
//! render as miette reports for people, as JSON for tools, and as GitHub annotation lines for CI.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};

use crate::yaml::{line_col, Span};

/// One thing wrong with a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Stable identifier, e.g. `smelt::unknown-param`.
    pub code: &'static str,
    pub message: String,
    /// Where it is; `None` for problems about the file as a whole.
    pub span: Option<Span>,
    /// Short text shown under the span.
    pub label: String,
    pub help: Option<String>,
}

impl Problem {
    pub fn new(code: &'static str, message: impl Into<String>, span: Span) -> Self {
        Problem {
            code,
            message: message.into(),
            span: Some(span),
            label: "here".into(),
            help: None,
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Adds "did you mean `x`?" when one of `candidates` is close to `wrong`.
    pub fn did_you_mean<'a>(
        self,
        wrong: &str,
        candidates: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        match closest(wrong, candidates) {
            Some(best) => self.help(format!("did you mean `{best}`?")),
            None => self,
        }
    }
}

/// The candidate closest to `wrong`, if it is close enough to be a plausible typo: within a few
/// edits (swapped letters count as one), or similar by Jaro-Winkler (which misses swaps in short
/// words like `evn`/`env`).
pub fn closest<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let max_edits = (wrong.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(wrong, c),
                strsim::jaro_winkler(wrong, c),
                c,
            )
        })
        .filter(|&(edits, similarity, c)| {
            (edits <= max_edits && edits < c.chars().count().max(wrong.chars().count()))
                || similarity >= 0.8
        })
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, _, c)| c)
}

/// All problems of one file, with its text for rendering.
#[derive(Clone, Debug)]
pub struct FileReport {
    pub path: PathBuf,
    pub text: Arc<String>,
    pub problems: Vec<Problem>,
}

impl FileReport {
    pub fn new(path: &Path, text: Arc<String>) -> Self {
        FileReport {
            path: path.to_path_buf(),
            text,
            problems: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// Each problem as a miette diagnostic carrying the file's source.
    pub fn diagnostics(&self) -> impl Iterator<Item = ProblemDiagnostic> + '_ {
        let source = Arc::new(NamedSource::new(
            self.path.display().to_string(),
            self.text.clone(),
        ));
        self.problems.iter().map(move |p| ProblemDiagnostic {
            problem: p.clone(),
            source: source.clone(),
        })
    }

    /// Human-readable rendering (miette's graphical handler).
    pub fn render_human(&self, color: bool) -> String {
        let theme = if color {
            miette::GraphicalTheme::unicode()
        } else {
            miette::GraphicalTheme::unicode_nocolor()
        };
        let handler = miette::GraphicalReportHandler::new_themed(theme);
        let mut out = String::new();
        for diagnostic in self.diagnostics() {
            let _ = handler.render_report(&mut out, &diagnostic);
            out.push('\n');
        }
        out
    }

    /// One JSON object per problem: file, line, column, code, message, help.
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        self.problems
            .iter()
            .map(|p| {
                let (line, column) = self.position(p);
                serde_json::json!({
                    "file": self.path.display().to_string(),
                    "line": line,
                    "column": column,
                    "severity": "error",
                    "code": p.code,
                    "message": p.message,
                    "label": p.label,
                    "help": p.help,
                })
            })
            .collect()
    }

    /// GitHub Actions workflow-command annotations, one line per problem.
    pub fn render_github(&self) -> String {
        let mut out = String::new();
        for p in &self.problems {
            let (line, column) = self.position(p);
            let mut message = p.message.clone();
            if let Some(help) = &p.help {
                message.push_str(" — ");
                message.push_str(help);
            }
            out.push_str(&format!(
                "::error file={},line={},col={},title={}::{}\n",
                escape_property(&self.path.display().to_string()),
                line,
                column,
                escape_property(p.code),
                escape_data(&message)
            ));
        }
        out
    }

    fn position(&self, p: &Problem) -> (usize, usize) {
        p.span.map_or((1, 1), |s| line_col(&self.text, s.offset))
    }
}

fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// A [`Problem`] bound to its source text, so miette can draw it.
#[derive(Debug)]
pub struct ProblemDiagnostic {
    problem: Problem,
    source: Arc<NamedSource<Arc<String>>>,
}

impl fmt::Display for ProblemDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problem.message)
    }
}

impl std::error::Error for ProblemDiagnostic {}

impl Diagnostic for ProblemDiagnostic {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.problem.code))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.problem
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(self.source.as_ref())
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = self.problem.span?;
        let label = LabeledSpan::new_with_span(Some(self.problem.label.clone()), span);
        Some(Box::new(std::iter::once(label)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_finds_typos_only() {
        assert_eq!(closest("lrr", ["lr", "steps"]), Some("lr"));
        assert_eq!(closest("comand", ["command", "collect"]), Some("command"));
        assert_eq!(closest("zzz", ["lr", "steps"]), None);
        assert_eq!(closest("evn", ["deps", "env", "run"]), Some("env"));
        assert_eq!(closest("x", ["y", "steps"]), None);
    }

    #[test]
    fn github_format_escapes_and_points() {
        let text = Arc::new("a: 1\nb: 2\n".to_string());
        let mut report = FileReport::new(Path::new("p,1.yaml"), text);
        report.problems.push(Problem::new(
            "smelt::x",
            "bad\nvalue",
            Span { offset: 5, len: 1 },
        ));
        assert_eq!(
            report.render_github(),
            "::error file=p%2C1.yaml,line=2,col=1,title=smelt%3A%3Ax::bad%0Avalue\n"
        );
    }
}
