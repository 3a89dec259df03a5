//! Text metrics shared by the `evaluate` stage and `smelt metric`: BLEU and chrF computed
//! exactly as sacrebleu computes them (same tokenizer, smoothing and signature).

pub mod bleu;
pub mod chrf;

pub use bleu::{corpus_bleu, Bleu};
pub use chrf::{corpus_chrf, Chrf};

/// The sacrebleu release whose behaviour these metrics reproduce (tests compare with it).
pub const SACREBLEU_VERSION: &str = "2.6.0";

/// Python's `str.isspace`: Unicode white space plus the ASCII information separators.
fn py_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()`: runs of white space separate, none at the ends.
fn py_split(text: &str) -> impl Iterator<Item = &str> {
    text.split(py_whitespace).filter(|w| !w.is_empty())
}

fn check_shapes(hypotheses: &[String], references: &[Vec<String>]) -> Result<(), String> {
    if references.is_empty() {
        return Err("no references given".into());
    }
    for (i, reference) in references.iter().enumerate() {
        if reference.len() != hypotheses.len() {
            return Err(format!(
                "reference set {} has {} segments, the hypotheses {}",
                i + 1,
                reference.len(),
                hypotheses.len()
            ));
        }
    }
    Ok(())
}

/// sacrebleu-style reproducibility signatures.
struct Signature;

impl Signature {
    fn bleu(references: usize) -> String {
        format!(
            "nrefs:{references}|case:mixed|eff:no|tok:13a|smooth:exp|version:{SACREBLEU_VERSION}"
        )
    }

    fn chrf(references: usize, word_order: usize) -> String {
        format!("nrefs:{references}|case:mixed|eff:yes|nc:6|nw:{word_order}|space:no|version:{SACREBLEU_VERSION}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores sacrebleu computed (tests/fixtures/make_sacrebleu_fixture.py).
    #[test]
    fn scores_equal_sacrebleus() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/sacrebleu.json");
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        for case in fixture["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let hyps = strings(&case["hyps"]);
            let refs: Vec<Vec<String>> = case["refs"]
                .as_array()
                .unwrap()
                .iter()
                .map(strings)
                .collect();
            let bleu = corpus_bleu(&hyps, &refs).unwrap();
            let expected = case["bleu"].as_f64().unwrap();
            assert!(
                (bleu.score - expected).abs() < 1e-9,
                "{name}: BLEU {} vs sacrebleu {expected}",
                bleu.score
            );
            assert_eq!(
                bleu.signature,
                case["bleu_signature"].as_str().unwrap(),
                "{name}"
            );
            for (field, value) in [
                ("bleu_hyp_len", bleu.hyp_len),
                ("bleu_ref_len", bleu.ref_len),
            ] {
                assert_eq!(
                    value as u64,
                    case[field].as_u64().unwrap(),
                    "{name}: {field}"
                );
            }
            for (word_order, key) in [(0, "chrf"), (2, "chrf_plus")] {
                let chrf = corpus_chrf(&hyps, &refs, word_order).unwrap();
                let expected = case[key].as_f64().unwrap();
                assert!(
                    (chrf.score - expected).abs() < 1e-9,
                    "{name}: {key} {} vs sacrebleu {expected}",
                    chrf.score
                );
            }
            assert_eq!(
                corpus_chrf(&hyps, &refs, 0).unwrap().signature,
                case["chrf_signature"].as_str().unwrap(),
                "{name}"
            );
        }
        for (input, expected) in fixture["tokenize_13a"].as_object().unwrap() {
            assert_eq!(
                bleu::tokenize_13a(input),
                expected.as_str().unwrap(),
                "{input:?}"
            );
        }
    }

    #[test]
    fn mismatched_references_are_an_error() {
        let hyps = vec!["a".to_string(), "b".to_string()];
        let err = corpus_bleu(&hyps, &[vec!["a".to_string()]]).unwrap_err();
        assert_eq!(err, "reference set 1 has 1 segments, the hypotheses 2");
        assert!(corpus_chrf(&hyps, &[], 0).is_err());
    }
}
