//! Perplexity over documents, in the two conventions people report:
//! - `disjoint` (lm-evaluation-harness's rolling log-likelihood): each document is cut into
//!   windows of the context length; every token is predicted once, from the tokens before it
//!   in its own window only;
//! - `sliding` (the Hugging Face guide's strided evaluation): windows of the context length
//!   advance by `stride`, and each window scores only the tokens the previous one did not, so
//!   most tokens see nearly a full context.
//!
//! Each document starts with the end-of-text token as context, as both tools do.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    #[default]
    Disjoint,
    Sliding,
}

/// Summed negative log-likelihood (nats) and the number of tokens predicted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Nll {
    pub nats: f64,
    pub tokens: u64,
}

/// The NLL of `ids` (the first id is context only) with windows of up to `context + 1` ids
/// (the model reads `context` of them; the last is only a target).
/// `log_probs(window)` returns `log p(window[t + 1] | window[..= t])` for each `t`.
pub fn document_nll(
    ids: &[u32],
    context: usize,
    window: Window,
    stride: usize,
    log_probs: &mut dyn FnMut(&[u32]) -> Vec<f32>,
) -> Nll {
    let mut nll = Nll::default();
    let mut add = |scores: &[f32]| {
        nll.nats -= scores.iter().map(|&x| f64::from(x)).sum::<f64>();
        nll.tokens += scores.len() as u64;
    };
    let n = ids.len();
    match window {
        Window::Disjoint => {
            let mut start = 0;
            while start + 1 < n {
                let end = (start + context + 1).min(n);
                add(&log_probs(&ids[start..end]));
                start = end - 1;
            }
        }
        Window::Sliding => {
            // Targets are ids[1..]; window [begin, end) of ids scores targets up to end - 1.
            let stride = stride.clamp(1, context);
            let mut scored_to = 1; // the first target not yet scored
            let mut begin = 0;
            while scored_to < n {
                let end = (begin + context + 1).min(n);
                let scores = log_probs(&ids[begin..end]);
                // scores[t] predicts ids[begin + t + 1]; keep those not scored before.
                let first_new = scored_to - (begin + 1);
                add(&scores[first_new..]);
                scored_to = end;
                if end == n {
                    break;
                }
                begin += stride;
                if begin + 1 > scored_to {
                    begin = scored_to - 1;
                }
            }
        }
    }
    nll
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model whose log-probability of a target depends on how much context it saw, so a
    /// window that drops or repeats a token shows.
    fn fake(window: &[u32]) -> Vec<f32> {
        (1..window.len())
            .map(|t| -(window[t] as f32) / (t as f32 + 1.0))
            .collect()
    }

    #[test]
    fn every_token_is_scored_once() {
        let ids: Vec<u32> = (1..=23).collect();
        for (window, stride) in [
            (Window::Disjoint, 0),
            (Window::Sliding, 3),
            (Window::Sliding, 8),
            (Window::Sliding, 1),
        ] {
            let mut calls = Vec::new();
            let nll = document_nll(&ids, 8, window, stride, &mut |w: &[u32]| {
                calls.push(w.to_vec());
                fake(w)
            });
            assert_eq!(nll.tokens, 22, "{window:?} {stride}");
            assert!(
                calls.iter().all(|c| c.len() <= 9),
                "{window:?}: windows fit the context"
            );
        }
        // Disjoint windows: 8 ids each, overlapping by the one id that is context only.
        let mut windows = Vec::new();
        document_nll(&ids, 7, Window::Disjoint, 0, &mut |w: &[u32]| {
            windows.push((w[0], w[w.len() - 1]));
            fake(w)
        });
        assert_eq!(windows, [(1, 8), (8, 15), (15, 22), (22, 23)]);
    }

    /// The exported fixture model's loss on each row equals transformers' (one window, as the
    /// row fits the context).
    #[test]
    fn the_loss_of_an_exported_model_equals_transformers() {
        use crate::model::{sample::log_probs, AdamWConfig, DeviceKind, Trainer};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gpt2-smelt-export");
        let adamw = AdamWConfig {
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let (mut model, _) = Trainer::load(&dir, DeviceKind::Cpu, adamw).unwrap();
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("logits.json")).unwrap()).unwrap();
        for (row, loss) in fixture["ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(fixture["losses"].as_array().unwrap())
        {
            let ids: Vec<u32> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect();
            for window in [Window::Disjoint, Window::Sliding] {
                let nll = document_nll(&ids, 8, window, 4, &mut |w: &[u32]| {
                    log_probs(&mut model, w)
                });
                let mean = nll.nats / nll.tokens as f64;
                assert!(
                    (mean - loss.as_f64().unwrap()).abs() < 1e-5,
                    "{window:?}: {mean} vs {loss}"
                );
            }
        }
    }

    #[test]
    fn sliding_with_a_full_stride_is_disjoint_and_a_short_one_sees_more_context() {
        let ids: Vec<u32> = (1..=40).collect();
        let disjoint = document_nll(&ids, 9, Window::Disjoint, 0, &mut fake);
        // A stride of the full context gives the disjoint windows.
        let full = document_nll(&ids, 9, Window::Sliding, 9, &mut fake);
        assert!((disjoint.nats - full.nats).abs() < 1e-9);
        // More context per token: the fake model's loss falls.
        let short = document_nll(&ids, 9, Window::Sliding, 2, &mut fake);
        assert!(short.nats < disjoint.nats);
        assert_eq!(short.tokens, disjoint.tokens);
    }
}
