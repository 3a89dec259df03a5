//! Corpus BLEU with sacrebleu's defaults: the `13a` tokenizer (mteval-v13a), n-grams up to 4,
//! "exp" smoothing (mteval's), brevity penalty against the closest reference length, mixed
//! case. Scores equal sacrebleu 2.6's (tests compare with fixture values it computed).

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;

use super::{py_split, Signature};

const MAX_ORDER: usize = 4;

/// A corpus BLEU score and its parts, as sacrebleu reports them.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Bleu {
    pub score: f64,
    /// n-gram precisions in percent, n = 1..4 (smoothed).
    pub precisions: [f64; MAX_ORDER],
    pub brevity_penalty: f64,
    pub hyp_len: usize,
    pub ref_len: usize,
    pub signature: String,
}

impl Bleu {
    /// sacrebleu's one-line text form.
    pub fn line(&self) -> String {
        let p = self.precisions;
        format!(
            "BLEU|{} = {:.1} {:.1}/{:.1}/{:.1}/{:.1} (BP = {:.3} ratio = {:.3} hyp_len = {} ref_len = {})",
            self.signature,
            self.score,
            p[0],
            p[1],
            p[2],
            p[3],
            self.brevity_penalty,
            self.hyp_len as f64 / self.ref_len.max(1) as f64,
            self.hyp_len,
            self.ref_len
        )
    }
}

static PUNCTUATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([\{-~\[-` -&\(-\+:-@/])").expect("valid regex"));
static PERIOD_AFTER_NON_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([^0-9])([\.,])").expect("valid regex"));
static PERIOD_BEFORE_NON_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([\.,])([^0-9])").expect("valid regex"));
static DASH_AFTER_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([0-9])(-)").expect("valid regex"));

/// The `13a` tokenizer: mteval-v13a's language-independent cleanup, then spaces around
/// punctuation and symbols (but not inside numbers), as one space-separated line.
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let line = format!(" {line} ");
    let line = PUNCTUATION.replace_all(&line, " $1 ");
    let line = PERIOD_AFTER_NON_DIGIT.replace_all(&line, "$1 $2 ");
    let line = PERIOD_BEFORE_NON_DIGIT.replace_all(&line, " $1 $2");
    let line = DASH_AFTER_DIGIT.replace_all(&line, "$1 $2 ");
    py_split(&line).collect::<Vec<_>>().join(" ")
}

/// n-grams of orders 1..=4 with their counts, and the token count.
fn ngrams(line: &str) -> (HashMap<Vec<&str>, usize>, usize) {
    let tokens: Vec<&str> = py_split(line).collect();
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        for window in tokens.windows(n) {
            *counts.entry(window.to_vec()).or_default() += 1;
        }
    }
    (counts, tokens.len())
}

/// sacrebleu's segment preprocessing: trailing whitespace off, then `13a`.
fn preprocess(segment: &str) -> String {
    tokenize_13a(segment.trim_end_matches(super::py_whitespace))
}

/// Corpus BLEU of `hypotheses` against `references` (one list of segments per reference set,
/// each as long as `hypotheses`).
pub fn corpus_bleu(hypotheses: &[String], references: &[Vec<String>]) -> Result<Bleu, String> {
    super::check_shapes(hypotheses, references)?;
    let mut correct = [0usize; MAX_ORDER];
    let mut total = [0usize; MAX_ORDER];
    let (mut hyp_len, mut ref_len) = (0, 0);
    for (i, hypothesis) in hypotheses.iter().enumerate() {
        let refs: Vec<String> = references.iter().map(|r| preprocess(&r[i])).collect();
        let mut ref_counts: HashMap<Vec<&str>, usize> = HashMap::new();
        let mut ref_lens = Vec::new();
        for reference in &refs {
            let (counts, len) = ngrams(reference);
            ref_lens.push(len);
            for (gram, count) in counts {
                let best = ref_counts.entry(gram).or_default();
                *best = (*best).max(count);
            }
        }
        let hypothesis = preprocess(hypothesis);
        let (hyp_counts, len) = ngrams(&hypothesis);
        hyp_len += len;
        // The closest reference length; the shorter one on a tie.
        ref_len += ref_lens
            .iter()
            .copied()
            .min_by_key(|&r| (r.abs_diff(len), r))
            .unwrap_or(0);
        for (gram, count) in hyp_counts {
            let n = gram.len() - 1;
            total[n] += count;
            correct[n] += count.min(ref_counts.get(&gram).copied().unwrap_or(0));
        }
    }
    let signature = Signature::bleu(references.len());
    Ok(score(correct, total, hyp_len, ref_len, signature))
}

/// BLEU from its sufficient statistics, with mteval's "exp" smoothing.
fn score(
    correct: [usize; MAX_ORDER],
    total: [usize; MAX_ORDER],
    hyp_len: usize,
    ref_len: usize,
    signature: String,
) -> Bleu {
    let brevity_penalty = if hyp_len < ref_len {
        if hyp_len > 0 {
            (1.0 - ref_len as f64 / hyp_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0; MAX_ORDER];
    let mut bleu = Bleu {
        score: 0.0,
        precisions,
        brevity_penalty,
        hyp_len,
        ref_len,
        signature,
    };
    if correct.iter().all(|&c| c == 0) {
        return bleu;
    }
    let mut smooth = 1.0;
    for n in 0..MAX_ORDER {
        if total[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    // sacrebleu's log of 0 is a large negative number, which makes the score 0.
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    let mean = precisions.iter().map(|&p| log(p)).sum::<f64>() / MAX_ORDER as f64;
    bleu.score = brevity_penalty * mean.exp();
    bleu.precisions = precisions;
    bleu
}
