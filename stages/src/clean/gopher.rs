//! The Gopher quality and repetition heuristics (Rae et al. 2021, "Scaling Language Models",
//! appendix A), with the paper's thresholds as defaults. Each filter first measures a document
//! (scores), then compares the scores with its thresholds, so thresholds can change without
//! measuring again.

use std::collections::{HashMap, HashSet};

use nohash_hasher::BuildNoHashHasher;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

const STOP_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];
const BULLETS: [char; 6] = ['•', '-', '*', '‣', '◦', '·'];

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split_whitespace()
}

/// A word made only of punctuation or symbols does not count as a word.
fn is_symbol_only(word: &str) -> bool {
    word.chars().all(|c| !c.is_alphanumeric())
}

/// Thresholds of the quality filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct QualityThresholds {
    pub min_words: u64,
    pub max_words: u64,
    pub min_mean_word_length: f64,
    pub max_mean_word_length: f64,
    /// `#` per word, and ellipses per word (each is checked).
    pub max_symbol_word_ratio: f64,
    pub max_bullet_lines_ratio: f64,
    pub max_ellipsis_lines_ratio: f64,
    /// Fraction of words with at least one letter.
    pub min_alpha_words_ratio: f64,
    /// Of: the, be, to, of, and, that, have, with.
    pub min_stop_words: u64,
}

impl Default for QualityThresholds {
    fn default() -> Self {
        QualityThresholds {
            min_words: 50,
            max_words: 100_000,
            min_mean_word_length: 3.0,
            max_mean_word_length: 10.0,
            max_symbol_word_ratio: 0.1,
            max_bullet_lines_ratio: 0.9,
            max_ellipsis_lines_ratio: 0.3,
            min_alpha_words_ratio: 0.8,
            min_stop_words: 2,
        }
    }
}

/// What the quality filter measures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityScores {
    pub words: u64,
    pub mean_word_length: f64,
    pub hash_word_ratio: f64,
    pub ellipsis_word_ratio: f64,
    pub bullet_lines_ratio: f64,
    pub ellipsis_lines_ratio: f64,
    pub alpha_words_ratio: f64,
    pub stop_words: u64,
}

pub fn quality_scores(text: &str) -> QualityScores {
    let all: Vec<&str> = words(text).collect();
    let counted: Vec<&&str> = all.iter().filter(|w| !is_symbol_only(w)).collect();
    let n = counted.len().max(1) as f64;
    // The paper: "> 0.1 for either the hash symbol or the ellipsis", each over all words.
    let all_n = all.len().max(1) as f64;
    let hashes = text.matches('#').count();
    let ellipses = text.matches("...").count() + text.matches('…').count();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let lines_n = lines.len().max(1) as f64;
    let bullets = lines
        .iter()
        .filter(|l| l.trim_start().starts_with(BULLETS))
        .count();
    let ellipsis = lines.iter().filter(|l| {
        let l = l.trim_end();
        l.ends_with("...") || l.ends_with('…')
    });
    QualityScores {
        words: counted.len() as u64,
        mean_word_length: counted.iter().map(|w| w.chars().count()).sum::<usize>() as f64 / n,
        hash_word_ratio: hashes as f64 / all_n,
        ellipsis_word_ratio: ellipses as f64 / all_n,
        bullet_lines_ratio: bullets as f64 / lines_n,
        ellipsis_lines_ratio: ellipsis.count() as f64 / lines_n,
        alpha_words_ratio: all
            .iter()
            .filter(|w| w.chars().any(char::is_alphabetic))
            .count() as f64
            / all.len().max(1) as f64,
        stop_words: all
            .iter()
            .filter(|w| STOP_WORDS.contains(&w.to_lowercase().as_str()))
            .count() as u64,
    }
}

/// The first threshold a document fails, as a reason.
pub fn quality_verdict(s: &QualityScores, t: &QualityThresholds) -> Option<&'static str> {
    if s.words < t.min_words {
        Some("gopher_quality.min_words")
    } else if s.words > t.max_words {
        Some("gopher_quality.max_words")
    } else if s.mean_word_length < t.min_mean_word_length {
        Some("gopher_quality.min_mean_word_length")
    } else if s.mean_word_length > t.max_mean_word_length {
        Some("gopher_quality.max_mean_word_length")
    } else if s.hash_word_ratio.max(s.ellipsis_word_ratio) > t.max_symbol_word_ratio {
        Some("gopher_quality.max_symbol_word_ratio")
    } else if s.bullet_lines_ratio > t.max_bullet_lines_ratio {
        Some("gopher_quality.max_bullet_lines_ratio")
    } else if s.ellipsis_lines_ratio > t.max_ellipsis_lines_ratio {
        Some("gopher_quality.max_ellipsis_lines_ratio")
    } else if s.alpha_words_ratio < t.min_alpha_words_ratio {
        Some("gopher_quality.min_alpha_words_ratio")
    } else if s.stop_words < t.min_stop_words {
        Some("gopher_quality.min_stop_words")
    } else {
        None
    }
}

/// Thresholds of the repetition filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RepetitionThresholds {
    pub max_duplicate_lines: f64,
    pub max_duplicate_paragraphs: f64,
    pub max_duplicate_line_chars: f64,
    pub max_duplicate_paragraph_chars: f64,
    /// Characters in the most frequent 2-, 3- and 4-gram of words.
    pub max_top_ngram_chars: [f64; 3],
    /// Characters in repeated 5- to 10-grams of words.
    pub max_duplicate_ngram_chars: [f64; 6],
}

impl Default for RepetitionThresholds {
    fn default() -> Self {
        RepetitionThresholds {
            max_duplicate_lines: 0.3,
            max_duplicate_paragraphs: 0.3,
            max_duplicate_line_chars: 0.2,
            max_duplicate_paragraph_chars: 0.2,
            max_top_ngram_chars: [0.20, 0.18, 0.16],
            max_duplicate_ngram_chars: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
        }
    }
}

/// What the repetition filter measures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RepetitionScores {
    pub duplicate_lines: f64,
    pub duplicate_paragraphs: f64,
    pub duplicate_line_chars: f64,
    pub duplicate_paragraph_chars: f64,
    pub top_ngram_chars: [f64; 3],
    pub duplicate_ngram_chars: [f64; 6],
}

/// Sets and maps keyed by hashes that are already well mixed.
type U64Set = HashSet<u64, BuildNoHashHasher<u64>>;
type U64Map<V> = HashMap<u64, V, BuildNoHashHasher<u64>>;

fn hash(s: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(s.as_bytes())
}

/// Fraction of pieces that repeat an earlier one, and the fraction of characters they hold.
fn duplicate_fractions<'a>(pieces: impl Iterator<Item = &'a str>) -> (f64, f64) {
    let mut seen = U64Set::default();
    let (mut total, mut dups, mut chars, mut dup_chars) = (0usize, 0usize, 0usize, 0usize);
    for piece in pieces {
        total += 1;
        chars += piece.len();
        if !seen.insert(hash(piece)) {
            dups += 1;
            dup_chars += piece.len();
        }
    }
    (
        dups as f64 / total.max(1) as f64,
        dup_chars as f64 / chars.max(1) as f64,
    )
}

pub fn repetition_scores(text: &str) -> RepetitionScores {
    let paragraphs = text.split("\n\n").map(str::trim).filter(|p| !p.is_empty());
    let (duplicate_paragraphs, duplicate_paragraph_chars) = duplicate_fractions(paragraphs);
    let lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let (duplicate_lines, duplicate_line_chars) = duplicate_fractions(lines);
    let words: Vec<&str> = words(text).collect();
    let hashes: Vec<u64> = words.iter().map(|w| hash(w)).collect();
    let lengths: Vec<usize> = words.iter().map(|w| w.len()).collect();
    let chars = lengths.iter().sum::<usize>().max(1) as f64;
    let mut top_ngram_chars = [0.0; 3];
    for (i, n) in (2..=4).enumerate() {
        top_ngram_chars[i] = top_ngram_fraction(&hashes, &lengths, n, chars);
    }
    let mut duplicate_ngram_chars = [0.0; 6];
    for (i, n) in (5..=10).enumerate() {
        duplicate_ngram_chars[i] = duplicate_ngram_fraction(&hashes, &lengths, n, chars);
    }
    RepetitionScores {
        duplicate_lines,
        duplicate_paragraphs,
        duplicate_line_chars,
        duplicate_paragraph_chars,
        top_ngram_chars,
        duplicate_ngram_chars,
    }
}

/// Hash of each run of `n` words, from the words' hashes.
fn ngram_hashes(hashes: &[u64], n: usize) -> impl Iterator<Item = u64> + '_ {
    hashes.windows(n).map(|w| {
        w.iter().fold(0u64, |h, &x| {
            h.rotate_left(5).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ x
        })
    })
}

/// Characters covered by the most frequent repeated n-gram (counted once per occurrence).
fn top_ngram_fraction(hashes: &[u64], lengths: &[usize], n: usize, chars: f64) -> f64 {
    if hashes.len() < n {
        return 0.0;
    }
    // n-gram → (occurrences, first position)
    let mut counts: U64Map<(usize, usize)> = U64Map::default();
    for (i, h) in ngram_hashes(hashes, n).enumerate() {
        counts.entry(h).or_insert((0, i)).0 += 1;
    }
    let top = counts
        .values()
        .filter(|(count, _)| *count > 1)
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|&(count, first)| lengths[first..first + n].iter().sum::<usize>() * count);
    top.unwrap_or(0) as f64 / chars
}

/// Characters of words inside n-grams that occurred before (each word counted once).
fn duplicate_ngram_fraction(hashes: &[u64], lengths: &[usize], n: usize, chars: f64) -> f64 {
    if hashes.len() < n {
        return 0.0;
    }
    let mut seen = U64Set::default();
    let mut covered = vec![false; hashes.len()];
    for (i, h) in ngram_hashes(hashes, n).enumerate() {
        if !seen.insert(h) {
            covered[i..i + n].iter_mut().for_each(|c| *c = true);
        }
    }
    let dup: usize = lengths
        .iter()
        .zip(&covered)
        .filter(|(_, &c)| c)
        .map(|(l, _)| l)
        .sum();
    dup as f64 / chars
}

pub fn repetition_verdict(s: &RepetitionScores, t: &RepetitionThresholds) -> Option<&'static str> {
    const TOP: [&str; 3] = [
        "gopher_repetition.top_2gram",
        "gopher_repetition.top_3gram",
        "gopher_repetition.top_4gram",
    ];
    const DUP: [&str; 6] = [
        "gopher_repetition.duplicate_5grams",
        "gopher_repetition.duplicate_6grams",
        "gopher_repetition.duplicate_7grams",
        "gopher_repetition.duplicate_8grams",
        "gopher_repetition.duplicate_9grams",
        "gopher_repetition.duplicate_10grams",
    ];
    if s.duplicate_paragraphs > t.max_duplicate_paragraphs {
        return Some("gopher_repetition.duplicate_paragraphs");
    }
    if s.duplicate_paragraph_chars > t.max_duplicate_paragraph_chars {
        return Some("gopher_repetition.duplicate_paragraph_chars");
    }
    if s.duplicate_lines > t.max_duplicate_lines {
        return Some("gopher_repetition.duplicate_lines");
    }
    if s.duplicate_line_chars > t.max_duplicate_line_chars {
        return Some("gopher_repetition.duplicate_line_chars");
    }
    if let Some(i) = (0..3).find(|&i| s.top_ngram_chars[i] > t.max_top_ngram_chars[i]) {
        return Some(TOP[i]);
    }
    (0..6)
        .find(|&i| s.duplicate_ngram_chars[i] > t.max_duplicate_ngram_chars[i])
        .map(|i| DUP[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. \
        He had done this for thirty years, and the ships that passed the rocky coast depended on him. \
        One stormy night the wind was so strong that the windows rattled and the flame flickered. \
        Still he kept watch until morning, and when the sun rose over the grey water he went down \
        to his small kitchen, made a pot of tea, and wrote in his journal about the long night.";

    fn quality(text: &str) -> Option<&'static str> {
        quality_verdict(&quality_scores(text), &QualityThresholds::default())
    }

    fn repetition(text: &str) -> Option<&'static str> {
        repetition_verdict(&repetition_scores(text), &RepetitionThresholds::default())
    }

    #[test]
    fn ordinary_prose_passes_both() {
        assert_eq!(quality(GOOD), None);
        assert_eq!(repetition(GOOD), None);
    }

    #[test]
    fn quality_rejects_each_kind_of_bad_document() {
        assert_eq!(
            quality("too short to be a document"),
            Some("gopher_quality.min_words")
        );
        let long_words =
            "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism "
                .repeat(40);
        assert_eq!(
            quality(&format!("the and {long_words}")),
            Some("gopher_quality.max_mean_word_length")
        );
        let hashtags = GOOD
            .split(' ')
            .map(|w| format!("#{w}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            quality(&hashtags),
            Some("gopher_quality.max_symbol_word_ratio")
        );
        let ellipses = GOOD
            .split(". ")
            .map(|s| format!("{s}..."))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            quality(&ellipses),
            Some("gopher_quality.max_ellipsis_lines_ratio")
        );
        let numbers = (0..80)
            .map(|i| (i * 7919).to_string())
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            quality(&format!("the and {numbers}")),
            Some("gopher_quality.min_alpha_words_ratio")
        );
        let no_stop_words =
            "Lighthouse keeper climbed narrow stairs every evening lighting lamps. ".repeat(8);
        assert_eq!(
            quality(&no_stop_words),
            Some("gopher_quality.min_stop_words")
        );
        let bullets = GOOD
            .split(", ")
            .map(|s| format!("• {s}"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            quality(&bullets),
            Some("gopher_quality.max_bullet_lines_ratio")
        );
    }

    #[test]
    fn repetition_catches_repeated_lines_paragraphs_and_ngrams() {
        let lines = format!("{GOOD}\nbuy now\nbuy now\nbuy now\nbuy now");
        assert_eq!(
            repetition(&lines),
            Some("gopher_repetition.duplicate_lines")
        );
        let paragraphs = format!("{GOOD}\n\n{GOOD}\n\nA short closing note.");
        assert_eq!(
            repetition(&paragraphs),
            Some("gopher_repetition.duplicate_paragraphs")
        );
        let spam = format!("{GOOD} {}", "click here ".repeat(30));
        assert_eq!(repetition(&spam), Some("gopher_repetition.top_2gram"));
        let looped = format!(
            "{GOOD} {}",
            "and then the keeper went back up the stairs again and ".repeat(3)
        );
        assert!(
            repetition(&looped).is_some_and(|r| r.contains("grams")),
            "{:?}",
            repetition(&looped)
        );
    }

    #[test]
    fn scores_are_what_the_paper_defines() {
        let s = quality_scores("one two three\n\n# four...");
        assert_eq!(s.words, 4);
        assert_eq!(
            (s.hash_word_ratio, s.ellipsis_word_ratio),
            (1.0 / 5.0, 1.0 / 5.0)
        );
        assert_eq!(s.ellipsis_lines_ratio, 0.5);
        let r = repetition_scores("a b\na b\nc d");
        assert!((r.duplicate_lines - 1.0 / 3.0).abs() < 1e-9);
    }
}
