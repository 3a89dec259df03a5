//! Text normalisation and the document filters other than Gopher's: length, C4 line rules,
//! language, PII redaction and regular expressions. A filter either keeps a document (maybe
//! rewritten) or drops it with a reason such as `c4.min_sentences`.

use std::sync::LazyLock;

use regex::Regex;

use crate::params::Share;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use unicode_normalization::{is_nfc_quick, is_nfkc_quick, IsNormalized, UnicodeNormalization};

use super::gopher::{self, QualityThresholds, RepetitionThresholds};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unicode {
    None,
    #[default]
    Nfc,
    Nfkc,
}

/// How text is normalised before filtering.
#[derive(Clone, Debug)]
pub struct Normalization {
    pub unicode: Unicode,
    pub lowercase: bool,
    pub strip_html: bool,
}

static HTML_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)<!--.*?-->|<[A-Za-z/!][^>]*>").expect("valid"));

impl Normalization {
    /// HTML tags out (if asked), Unicode normal form, control characters out, runs of spaces
    /// collapsed, lines trimmed, at most one blank line in a row, lowercase (if asked).
    #[cfg(test)]
    fn apply(&self, text: &str) -> String {
        self.rewrite(text).unwrap_or_else(|| text.to_string())
    }

    /// The normalised text, or `None` when it would be unchanged (most text already is: quick
    /// checks skip the rewrites without allocating).
    pub fn rewrite(&self, text: &str) -> Option<String> {
        let html = self.strip_html.then(|| strip_html(text));
        let text = html.as_deref().unwrap_or(text);
        let unicode = match self.unicode {
            // ASCII is in every normal form.
            _ if text.is_ascii() => None,
            Unicode::Nfc if is_nfc_quick(text.chars()) != IsNormalized::Yes => {
                Some(text.nfc().collect::<String>())
            }
            Unicode::Nfkc if is_nfkc_quick(text.chars()) != IsNormalized::Yes => {
                Some(text.nfkc().collect())
            }
            _ => None,
        };
        let text = unicode.as_deref().unwrap_or(text);
        let tidy = (!is_tidy_ascii(text)).then(|| tidy_whitespace(text));
        let text = tidy.as_deref().unwrap_or(text);
        let lower =
            (self.lowercase && text.chars().any(char::is_uppercase)).then(|| text.to_lowercase());
        let changed = html.is_some() || unicode.is_some() || tidy.is_some() || lower.is_some();
        changed.then(|| {
            lower
                .or(tidy)
                .or(unicode)
                .or(html)
                .expect("something changed")
        })
    }
}

/// Whether ASCII text is already what [`tidy_whitespace`] would make of it (the common case,
/// checked without allocating).
fn is_tidy_ascii(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.first().is_some_and(u8::is_ascii_whitespace)
        || bytes.last().is_some_and(u8::is_ascii_whitespace)
    {
        return false;
    }
    // Printable ASCII or newline; no space next to a space or newline; no third newline in a
    // row. Branch-free folds over shifted slices, which the compiler vectorises: this check runs
    // on every document, and a byte-at-a-time loop made it a third of exact dedup's time.
    let space_or_newline = |b: u8| b == b' ' || b == b'\n';
    let bad_bytes = bytes.iter().fold(false, |bad, &b| {
        bad | ((b < 0x20 && b != b'\n') | (b >= 0x7f))
    });
    let (head, tail) = (
        &bytes[..bytes.len().saturating_sub(1)],
        bytes.get(1..).unwrap_or(&[]),
    );
    let bad_pairs = head.iter().zip(tail).fold(false, |bad, (&a, &b)| {
        bad | (space_or_newline(a) & space_or_newline(b) & ((a == b' ') | (b == b' ')))
    });
    let third = bytes.get(2..).unwrap_or(&[]);
    let three_newlines = head
        .iter()
        .zip(tail)
        .zip(third)
        .fold(false, |bad, ((&a, &b), &c)| {
            bad | ((a == b'\n') & (b == b'\n') & (c == b'\n'))
        });
    !(bad_bytes | bad_pairs | three_newlines)
}

/// Control characters dropped, runs of whitespace inside a line made one space, lines trimmed,
/// blank lines between paragraphs kept as one, none at the ends. One pass, one allocation.
fn tidy_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_lines = 0;
    for line in text.lines() {
        let (mut wrote, mut space) = (false, false);
        for c in line.chars() {
            if c.is_whitespace() {
                space = wrote;
            } else if !c.is_control() && c != '\u{feff}' {
                if !wrote && !out.is_empty() {
                    out.push_str(if blank_lines > 0 { "\n\n" } else { "\n" });
                } else if space {
                    out.push(' ');
                }
                (wrote, space) = (true, false);
                out.push(c);
            }
        }
        blank_lines = if wrote { 0 } else { blank_lines + 1 };
    }
    out
}

fn strip_html(text: &str) -> String {
    let without_tags = HTML_TAG.replace_all(text, " ");
    without_tags
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// One entry of `filters:`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Filter {
    /// Words and characters within bounds.
    Length(LengthFilter),
    /// Gopher quality heuristics (word count, word length, symbols, bullets, ellipses, stop words).
    GopherQuality(QualityThresholds),
    /// Gopher repetition heuristics (duplicate lines and paragraphs, frequent n-grams).
    GopherRepetition(RepetitionThresholds),
    /// C4's line rules: drop lines without terminal punctuation or with too few words, boilerplate
    /// lines; drop documents with code braces, lorem ipsum or too few sentences.
    C4(C4Filter),
    /// Keep documents in the given languages (whatlang detection).
    Language(LanguageFilter),
    /// Replace e-mail and IPv4 addresses with placeholders.
    Pii(PiiFilter),
    /// Drop documents that match a pattern, or keep only those that do.
    Regex(RegexFilter),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LengthFilter {
    pub min_words: Option<u64>,
    pub max_words: Option<u64>,
    pub min_chars: Option<u64>,
    pub max_chars: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct C4Filter {
    pub min_words_per_line: usize,
    pub max_word_length: usize,
    pub min_sentences: usize,
    pub require_terminal_punctuation: bool,
    pub drop_javascript_lines: bool,
    pub drop_policy_lines: bool,
    pub drop_lorem_ipsum: bool,
    pub drop_curly_brackets: bool,
    pub remove_citations: bool,
}

impl Default for C4Filter {
    fn default() -> Self {
        C4Filter {
            min_words_per_line: 3,
            max_word_length: 1000,
            min_sentences: 5,
            require_terminal_punctuation: true,
            drop_javascript_lines: true,
            drop_policy_lines: true,
            drop_lorem_ipsum: true,
            drop_curly_brackets: true,
            remove_citations: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LanguageFilter {
    /// ISO 639-3 codes, e.g. `eng`, `fra`, `deu`.
    pub languages: Vec<String>,
    /// Minimum detection confidence, 0 to 1.
    #[serde(default = "default_language_threshold")]
    pub threshold: Share,
}

fn default_language_threshold() -> Share {
    Share::of(0.65)
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PiiFilter {
    pub emails: bool,
    pub ipv4: bool,
    pub email_placeholder: String,
    pub ip_placeholder: String,
}

impl Default for PiiFilter {
    fn default() -> Self {
        PiiFilter {
            emails: true,
            ipv4: true,
            email_placeholder: "<EMAIL>".into(),
            ip_placeholder: "<IP>".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegexAction {
    #[default]
    Drop,
    Keep,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegexFilter {
    pub pattern: String,
    #[serde(default)]
    pub action: RegexAction,
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}").expect("valid")
});
static IPV4: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\b")
        .expect("valid")
});
static CITATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[\d*\]|\[edit\]|\[citation needed\]").expect("valid"));
const POLICY: [&str; 6] = [
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
];

/// A filter ready to run (patterns compiled once).
pub enum Prepared {
    Length(LengthFilter),
    GopherQuality(QualityThresholds),
    GopherRepetition(RepetitionThresholds),
    C4(C4Filter),
    Language(Vec<whatlang::Lang>, f64),
    Pii(PiiFilter),
    Regex(Regex, RegexAction),
}

impl Filter {
    pub fn prepare(&self) -> Result<Prepared, String> {
        Ok(match self {
            Filter::Length(f) => Prepared::Length(f.clone()),
            Filter::GopherQuality(t) => Prepared::GopherQuality(t.clone()),
            Filter::GopherRepetition(t) => Prepared::GopherRepetition(t.clone()),
            Filter::C4(f) => Prepared::C4(f.clone()),
            Filter::Language(f) => {
                let langs = f
                    .languages
                    .iter()
                    .map(|code| {
                        whatlang::Lang::from_code(code).ok_or_else(|| {
                            format!("unknown language code `{code}` (use ISO 639-3, e.g. eng)")
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Prepared::Language(langs, f.threshold.get())
            }
            Filter::Pii(f) => Prepared::Pii(f.clone()),
            Filter::Regex(f) => {
                if let Some(problem) = crate::params::regex_problem(&f.pattern) {
                    return Err(format!("regex filter: {problem}"));
                }
                let regex = Regex::new(&f.pattern).expect("checked above");
                Prepared::Regex(regex, f.action)
            }
        })
    }
}

/// What a filter decided: the (maybe rewritten) text, or why it was dropped and the text as it
/// was then.
pub type Verdict = Result<String, (&'static str, String)>;

impl Prepared {
    /// Scoring filters measure a document, then judge the scores against thresholds; their
    /// scores can be kept and judged again under other thresholds. The others rewrite or judge
    /// text directly, and their decisions depend only on their params.
    pub fn is_scoring(&self) -> bool {
        matches!(
            self,
            Prepared::Length(_)
                | Prepared::GopherQuality(_)
                | Prepared::GopherRepetition(_)
                | Prepared::Language(..)
        )
    }

    /// What a scoring filter measures (`None` for the others).
    pub fn measure(&self, text: &str) -> Option<Scores> {
        Some(match self {
            Prepared::Length(_) => Scores::Length {
                words: text.split_whitespace().count() as u64,
                chars: text.chars().count() as u64,
            },
            Prepared::GopherQuality(_) => Scores::Quality(gopher::quality_scores(text)),
            Prepared::GopherRepetition(_) => Scores::Repetition(gopher::repetition_scores(text)),
            Prepared::Language(..) => match whatlang::detect(text) {
                Some(info) => Scores::Language {
                    code: info.lang().code().to_string(),
                    confidence: info.confidence(),
                },
                None => Scores::Language {
                    code: String::new(),
                    confidence: 0.0,
                },
            },
            _ => return None,
        })
    }

    /// A scoring filter's verdict on scores it measured.
    pub fn judge(&self, scores: &Scores) -> Option<&'static str> {
        match (self, scores) {
            (Prepared::Length(f), Scores::Length { words, chars }) => length(f, *words, *chars),
            (Prepared::GopherQuality(t), Scores::Quality(s)) => gopher::quality_verdict(s, t),
            (Prepared::GopherRepetition(t), Scores::Repetition(s)) => {
                gopher::repetition_verdict(s, t)
            }
            (Prepared::Language(langs, threshold), Scores::Language { code, confidence }) => {
                let known = whatlang::Lang::from_code(code).is_some_and(|l| langs.contains(&l));
                (!(known && confidence >= threshold)).then_some("language")
            }
            _ => Some("scores of another filter"),
        }
    }

    /// Applies a filter that is not a scoring one.
    pub fn apply(&self, text: String) -> Verdict {
        match self {
            Prepared::C4(f) => c4(f, &text).map_err(|reason| (reason, text)),
            Prepared::Pii(f) => {
                let mut text = text;
                if f.emails {
                    text = EMAIL
                        .replace_all(&text, f.email_placeholder.as_str())
                        .into_owned();
                }
                if f.ipv4 {
                    text = IPV4
                        .replace_all(&text, f.ip_placeholder.as_str())
                        .into_owned();
                }
                Ok(text)
            }
            Prepared::Regex(regex, action) => match (regex.is_match(&text), action) {
                (true, RegexAction::Drop) => Err(("regex.drop", text)),
                (false, RegexAction::Keep) => Err(("regex.keep", text)),
                _ => Ok(text),
            },
            scoring => match scoring.measure(&text).and_then(|s| scoring.judge(&s)) {
                None => Ok(text),
                Some(reason) => Err((reason, text)),
            },
        }
    }
}

/// What a scoring filter measured about one document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scores {
    Length { words: u64, chars: u64 },
    Quality(gopher::QualityScores),
    Repetition(gopher::RepetitionScores),
    Language { code: String, confidence: f64 },
}

fn length(f: &LengthFilter, words: u64, chars: u64) -> Option<&'static str> {
    if f.min_words.is_some_and(|m| words < m) {
        Some("length.min_words")
    } else if f.max_words.is_some_and(|m| words > m) {
        Some("length.max_words")
    } else if f.min_chars.is_some_and(|m| chars < m) {
        Some("length.min_chars")
    } else if f.max_chars.is_some_and(|m| chars > m) {
        Some("length.max_chars")
    } else {
        None
    }
}

/// C4's rules: the kept lines, or why the document goes.
fn c4(f: &C4Filter, text: &str) -> Result<String, &'static str> {
    let mut kept = Vec::new();
    for line in text.lines() {
        let line = if f.remove_citations {
            CITATION.replace_all(line, "").into_owned()
        } else {
            line.to_string()
        };
        let line = line.trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        let lower = line.to_lowercase();
        let drop = words.len() < f.min_words_per_line
            || words.iter().any(|w| w.chars().count() > f.max_word_length)
            || (f.require_terminal_punctuation
                && (!line.ends_with(['.', '!', '?', '"', '\''])
                    || line.ends_with("...")
                    || line.ends_with('…')))
            || (f.drop_javascript_lines && lower.contains("javascript"))
            || (f.drop_policy_lines && POLICY.iter().any(|p| lower.contains(p)));
        if drop {
            continue;
        }
        // As in C4, these end the document only when they are in a line that survived.
        if f.drop_lorem_ipsum && lower.contains("lorem ipsum") {
            return Err("c4.lorem_ipsum");
        }
        if f.drop_curly_brackets && line.contains('{') {
            return Err("c4.curly_bracket");
        }
        kept.push(line.to_string());
    }
    let text = kept.join("\n");
    // Sentences end in terminal punctuation followed by a space or the end of a line: decimal
    // points and "e.g." inside a sentence do not split it.
    let sentences = text
        .char_indices()
        .filter(|&(i, c)| {
            matches!(c, '.' | '!' | '?')
                && text[i + 1..].chars().next().is_none_or(char::is_whitespace)
        })
        .count();
    if text.is_empty() {
        Err("c4.no_lines_left")
    } else if sentences < f.min_sentences {
        Err("c4.min_sentences")
    } else {
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(filter: Filter, text: &str) -> Result<String, &'static str> {
        filter
            .prepare()
            .unwrap()
            .apply(text.to_string())
            .map_err(|(reason, _)| reason)
    }

    #[test]
    fn normalization_cleans_whitespace_controls_and_forms() {
        let n = Normalization {
            unicode: Unicode::Nfkc,
            lowercase: true,
            strip_html: true,
        };
        let text = "  <p>Ｆｕｌｌ&amp;width</p>\u{0007}  text \t here  \n\n\n\nnext<br/>line \r\n";
        assert_eq!(n.apply(text), "full&width text here\n\nnext line");
        let plain = Normalization {
            unicode: Unicode::Nfc,
            lowercase: false,
            strip_html: false,
        };
        assert_eq!(plain.apply("e\u{0301} <b>"), "é <b>");
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_tidy() {
        for text in [
            "plain text\nnext line\n\npara",
            "a  b",
            " lead",
            "trail ",
            "a \nb",
            "a\n\n\nb",
            "tab\there",
            "x\x7fy",
            "é",
        ] {
            // The fast check may say "unsure" (non-ASCII) but never "tidy" wrongly.
            let tidy = tidy_whitespace(text) == text;
            assert!(
                if text.is_ascii() {
                    is_tidy_ascii(text) == tidy
                } else {
                    !is_tidy_ascii(text)
                },
                "{text:?}"
            );
        }
    }

    #[test]
    fn length_bounds() {
        let f = || {
            Filter::Length(LengthFilter {
                min_words: Some(2),
                max_chars: Some(10),
                ..Default::default()
            })
        };
        assert_eq!(run(f(), "one"), Err("length.min_words"));
        assert_eq!(run(f(), "one two three"), Err("length.max_chars"));
        assert_eq!(run(f(), "one two"), Ok("one two".into()));
    }

    #[test]
    fn c4_keeps_sentences_and_drops_boilerplate() {
        let page = "Home | About | Contact\n\
            The river flooded the valley in the spring of that year.\n\
            Farmers moved their animals to the higher fields at once.\n\
            Please enable JavaScript to view this page properly.\n\
            The water stayed for three weeks before it went down.\n\
            Read our privacy policy for details on data use.\n\
            Most houses were repaired by the end of the summer[1].\n\
            The village built a new wall along the river bank.\n\
            ok.";
        let kept = run(Filter::C4(C4Filter::default()), page).unwrap();
        assert_eq!(kept.lines().count(), 5, "{kept}");
        assert!(!kept.contains("JavaScript") && !kept.contains("privacy") && !kept.contains("[1]"));
        let code = "We show the code below in full.\nfunction f() { return 1; } is the code here.";
        assert_eq!(
            run(Filter::C4(C4Filter::default()), code),
            Err("c4.curly_bracket")
        );
        let nav = page.replace("Home | About | Contact", "Menu {Home} and more");
        assert!(
            run(Filter::C4(C4Filter::default()), &nav).is_ok(),
            "a dropped line's brace does not count"
        );
        let decimals = "Pi is about 3.14 and e is 2.71 in value.\nThat is all we know e.g. today.";
        assert_eq!(
            run(Filter::C4(C4Filter::default()), decimals),
            Err("c4.min_sentences")
        );
        assert_eq!(
            run(
                Filter::C4(C4Filter::default()),
                "Lorem ipsum dolor sit amet."
            ),
            Err("c4.lorem_ipsum")
        );
        assert_eq!(
            run(Filter::C4(C4Filter::default()), "One short sentence here."),
            Err("c4.min_sentences")
        );
    }

    #[test]
    fn language_detection_keeps_the_listed_languages() {
        let english =
            "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.";
        let french = "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde.";
        let f = || {
            Filter::Language(LanguageFilter {
                languages: vec!["eng".into()],
                threshold: Share::of(0.5),
            })
        };
        assert!(run(f(), english).is_ok());
        assert_eq!(run(f(), french), Err("language"));
        let bad = Filter::Language(LanguageFilter {
            languages: vec!["english".into()],
            threshold: Share::of(0.5),
        });
        assert!(bad
            .prepare()
            .err()
            .unwrap()
            .contains("unknown language code"));
    }

    #[test]
    fn pii_is_replaced() {
        let text =
            "Mail jane.doe+x@mail.example.org or ping 192.168.0.12, not 999.1.1.1 or v1.2.3.";
        assert_eq!(
            run(Filter::Pii(PiiFilter::default()), text).unwrap(),
            "Mail <EMAIL> or ping <IP>, not 999.1.1.1 or v1.2.3."
        );
    }

    #[test]
    fn regex_drops_or_keeps() {
        let drop = || {
            Filter::Regex(RegexFilter {
                pattern: "(?i)casino".into(),
                action: RegexAction::Drop,
            })
        };
        assert_eq!(run(drop(), "Best CASINO bonus"), Err("regex.drop"));
        let keep = Filter::Regex(RegexFilter {
            pattern: "^Q:".into(),
            action: RegexAction::Keep,
        });
        assert_eq!(run(keep, "no question"), Err("regex.keep"));
        let bad = Filter::Regex(RegexFilter {
            pattern: "(".into(),
            action: RegexAction::Drop,
        });
        assert!(bad.prepare().is_err());
    }
}
