//! Corpus chrF with sacrebleu's defaults: character n-grams up to 6 with whitespace removed,
//! no word n-grams (chrF, not chrF++, unless `word_order` > 0), beta 2, mixed case, and
//! sacrebleu's effective-order averaging of precision and recall over the corpus statistics.

use std::collections::HashMap;

use super::{py_split, Signature};

/// A corpus chrF score.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Chrf {
    pub score: f64,
    pub signature: String,
}

impl Chrf {
    pub fn line(&self, word_order: usize) -> String {
        let name = if word_order > 0 { "chrF2++" } else { "chrF2" };
        format!("{name}|{} = {:.1}", self.signature, self.score)
    }
}

const CHAR_ORDER: usize = 6;
const BETA: f64 = 2.0;
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

type Counts = HashMap<String, usize>;

fn char_ngrams(line: &str) -> Vec<Counts> {
    let chars: Vec<char> = py_split(line).flat_map(str::chars).collect();
    (1..=CHAR_ORDER)
        .map(|n| {
            let mut counts = Counts::new();
            for window in chars.windows(n) {
                *counts.entry(window.iter().collect()).or_default() += 1;
            }
            counts
        })
        .collect()
}

/// Words with one leading or trailing punctuation mark split off (chrF++'s tokenization).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in py_split(line) {
        let chars: Vec<char> = word.chars().collect();
        let (first, last) = (chars[0], chars[chars.len() - 1]);
        if chars.len() == 1 {
            out.push(word.to_string());
        } else if PUNCTUATION.contains(last) {
            out.push(chars[..chars.len() - 1].iter().collect());
            out.push(last.to_string());
        } else if PUNCTUATION.contains(first) {
            out.push(first.to_string());
            out.push(chars[1..].iter().collect());
        } else {
            out.push(word.to_string());
        }
    }
    out
}

fn word_ngrams(words: &[String], n: usize) -> Counts {
    let mut counts = Counts::new();
    for window in words.windows(n) {
        *counts.entry(window.join(" ")).or_default() += 1;
    }
    counts
}

fn all_ngrams(line: &str, word_order: usize) -> Vec<Counts> {
    let mut grams = char_ngrams(line);
    if word_order > 0 {
        let words = words(line);
        grams.extend((1..=word_order).map(|n| word_ngrams(&words, n)));
    }
    grams
}

/// Per order: hypothesis n-grams, reference n-grams, matches.
fn statistics(hypothesis: &[Counts], reference: &[Counts]) -> Vec<[usize; 3]> {
    hypothesis
        .iter()
        .zip(reference)
        .map(|(hyp, reference)| {
            let (mut matches, mut hyp_total) = (0, 0);
            for (gram, &count) in hyp {
                hyp_total += count;
                matches += count.min(reference.get(gram).copied().unwrap_or(0));
            }
            let hyp_total = if reference.is_empty() { 0 } else { hyp_total };
            [hyp_total, reference.values().sum(), matches]
        })
        .collect()
}

/// The F-beta score of summed statistics, averaging precision and recall over the orders that
/// have both hypothesis and reference n-grams.
fn f_score(statistics: &[[usize; 3]]) -> f64 {
    let (mut precision, mut recall, mut orders) = (0.0, 0.0, 0);
    for &[hyp, reference, matches] in statistics {
        if hyp > 0 && reference > 0 {
            precision += matches as f64 / hyp as f64;
            recall += matches as f64 / reference as f64;
            orders += 1;
        }
    }
    if orders == 0 {
        return 0.0;
    }
    let (precision, recall) = (precision / orders as f64, recall / orders as f64);
    let factor = BETA * BETA;
    if precision + recall == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * precision * recall / (factor * precision + recall)
}

/// Corpus chrF (chrF++ with `word_order` 2).
pub fn corpus_chrf(
    hypotheses: &[String],
    references: &[Vec<String>],
    word_order: usize,
) -> Result<Chrf, String> {
    super::check_shapes(hypotheses, references)?;
    let orders = CHAR_ORDER + word_order;
    let mut total = vec![[0usize; 3]; orders];
    for (i, hypothesis) in hypotheses.iter().enumerate() {
        let hyp = all_ngrams(hypothesis, word_order);
        // The reference giving the best segment F-score counts (the first on a tie).
        let mut best: Option<(f64, Vec<[usize; 3]>)> = None;
        for reference in references {
            let stats = statistics(&hyp, &all_ngrams(&reference[i], word_order));
            let f = f_score(&stats);
            if best.as_ref().is_none_or(|(b, _)| f > *b) {
                best = Some((f, stats));
            }
        }
        for (sum, stats) in total.iter_mut().zip(best.map(|b| b.1).unwrap_or_default()) {
            for k in 0..3 {
                sum[k] += stats[k];
            }
        }
    }
    Ok(Chrf {
        score: f_score(&total),
        signature: Signature::chrf(references.len(), word_order),
    })
}
