//! Preference losses on the log-ratio margin of a pair, as DPO (Rafailov et al., 2023), IPO
//! (Azar et al., 2023) and the hinge variant (SLiC) define them, with TRL's conventions:
//! `h = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))`.

use dfdx::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::optim::Buffers;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PreferenceLossKind {
    /// DPO: `−(1−ε)·log σ(βh) − ε·log σ(−βh)` (ε: label smoothing).
    #[default]
    Sigmoid,
    /// IPO: `(h − 1/(2β))²`, on mean (not summed) token log-probs.
    Ipo,
    /// `max(0, 1 − βh)`.
    Hinge,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PreferenceLoss {
    pub kind: PreferenceLossKind,
    pub beta: f32,
    pub label_smoothing: f32,
    /// Weight of the chosen answers' per-token negative log-likelihood, added to the loss (RPO).
    pub nll_weight: f32,
}

/// Means over the pairs of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PreferenceStats {
    pub loss: f32,
    /// `β·(log π(chosen) − log π_ref(chosen))`.
    pub chosen_reward: f32,
    pub rejected_reward: f32,
    /// Share of pairs whose chosen reward exceeds the rejected one.
    pub accuracy: f32,
    pub margin: f32,
}

impl PreferenceLoss {
    /// Whether sequences are scored by their mean token log-prob (IPO) rather than the sum.
    pub fn averages(&self) -> bool {
        self.kind == PreferenceLossKind::Ipo
    }

    /// The loss of one pair with margin `h`, in plain floats.
    pub fn value(&self, h: f64) -> f64 {
        let (beta, eps) = (f64::from(self.beta), f64::from(self.label_smoothing));
        let softplus = |z: f64| z.max(0.0) + (-z.abs()).exp().ln_1p();
        match self.kind {
            PreferenceLossKind::Sigmoid => {
                (1.0 - eps) * softplus(-beta * h) + eps * softplus(beta * h)
            }
            PreferenceLossKind::Ipo => (h - 1.0 / (2.0 * beta)).powi(2),
            PreferenceLossKind::Hinge => (1.0 - beta * h).max(0.0),
        }
    }

    /// The mean loss over margins `h` `(pairs,)`, on the tape.
    pub fn mean<D: Buffers, T: Tape<f32, D>>(
        &self,
        h: Tensor<(usize,), f32, D, T>,
    ) -> Tensor<Rank0, f32, D, T> {
        let (beta, eps) = (self.beta, self.label_smoothing);
        let losses = match self.kind {
            PreferenceLossKind::Sigmoid => {
                let z = h * beta;
                softplus(z.with_empty_tape().negate()) * (1.0 - eps) + softplus(z) * eps
            }
            PreferenceLossKind::Ipo => (h - 1.0 / (2.0 * beta)).square(),
            PreferenceLossKind::Hinge => (h * -beta + 1.0).relu(),
        };
        losses.mean::<Rank0, _>()
    }

    /// Rewards, accuracy and margins from the policy's and the reference's sequence scores,
    /// `[chosen, rejected]` per pair, and the batch's mean `loss`.
    pub fn stats(&self, policy: &[f32], reference: &[f32], loss: f32) -> PreferenceStats {
        let pairs = policy.len() / 2;
        let mut stats = PreferenceStats {
            loss,
            ..Default::default()
        };
        for i in 0..pairs {
            let chosen = self.beta * (policy[2 * i] - reference[2 * i]);
            let rejected = self.beta * (policy[2 * i + 1] - reference[2 * i + 1]);
            stats.chosen_reward += chosen / pairs as f32;
            stats.rejected_reward += rejected / pairs as f32;
            stats.accuracy += f32::from(u8::from(chosen > rejected)) / pairs as f32;
            stats.margin += (chosen - rejected) / pairs as f32;
        }
        stats
    }
}

/// `log(1 + eˣ)` as its own op: computed stably as `max(x, 0) + log(1 + e^−|x|)`, with the
/// derivative σ(x). (Composing it from dfdx's `relu` and `abs` would give a zero gradient at
/// x = 0, which is exactly where DPO starts: the policy equals the reference.)
fn softplus<D: Buffers, T: Tape<f32, D>>(
    x: Tensor<(usize,), f32, D, T>,
) -> Tensor<(usize,), f32, D, T> {
    let (x, mut tape) = x.split_tape();
    let values = x.as_vec();
    let y: Vec<f32> = values
        .iter()
        .map(|&v| v.max(0.0) + (-v.abs()).exp().ln_1p())
        .collect();
    let y = x.device().tensor_from_vec(y, *x.shape());
    let (device, x, out) = (x.device().clone(), x.ghost(), y.ghost());
    tape.add_backward_op(move |grads| {
        let grad_out = grads.get(&out).as_vec();
        let grad_x: Vec<f32> = grad_out
            .iter()
            .zip(&values)
            .map(|(g, &v)| g / (1.0 + (-v).exp()))
            .collect();
        device.add_host(grads.get_or_alloc_mut(&x)?, &grad_x);
        Ok(())
    });
    y.put_tape(tape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(kind: PreferenceLossKind, label_smoothing: f32) -> PreferenceLoss {
        PreferenceLoss {
            kind,
            beta: 0.1,
            label_smoothing,
            nll_weight: 0.0,
        }
    }

    #[test]
    fn losses_at_known_points() {
        let sigmoid = loss(PreferenceLossKind::Sigmoid, 0.0);
        assert!((sigmoid.value(0.0) - 2f64.ln()).abs() < 1e-7);
        // β·h = 2: −log σ(2) = log(1 + e⁻²).
        assert!((sigmoid.value(20.0) - (1.0 + (-2f64).exp()).ln()).abs() < 1e-7);
        assert!(
            sigmoid.value(-1e5).is_finite(),
            "no overflow for huge margins"
        );
        let smoothed = loss(PreferenceLossKind::Sigmoid, 0.2);
        let expected = 0.8 * (1.0 + (-2f64).exp()).ln() + 0.2 * (1.0 + 2f64.exp()).ln();
        assert!((smoothed.value(20.0) - expected).abs() < 1e-7);
        // β is 0.1 in f32, so 1/(2β) is 5 to about 1e-7.
        let ipo = loss(PreferenceLossKind::Ipo, 0.0);
        assert!((ipo.value(0.0) - 25.0).abs() < 1e-5);
        assert!(ipo.value(5.0).abs() < 1e-12);
        assert_eq!(loss(PreferenceLossKind::Hinge, 0.0).value(0.0), 1.0);
        assert_eq!(loss(PreferenceLossKind::Hinge, 0.0).value(15.0), 0.0);
    }

    /// The tensor form equals the plain one, and its gradient the plain derivative.
    #[test]
    fn the_tensor_loss_and_its_gradient_match_the_formula() {
        let dev = Cpu::default();
        let margins = [-30.0f32, -2.5, 0.0, 1.0, 7.5, 40.0];
        for kind in [
            PreferenceLossKind::Sigmoid,
            PreferenceLossKind::Ipo,
            PreferenceLossKind::Hinge,
        ] {
            let l = loss(kind, 0.1);
            let h: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(margins.to_vec(), (6,));
            let value = l.mean(h.leaky_trace());
            let expected: f64 = margins.iter().map(|&m| l.value(f64::from(m))).sum::<f64>() / 6.0;
            assert!(
                (f64::from(value.as_vec()[0]) - expected).abs() < 1e-5 * expected.max(1.0),
                "{kind:?}"
            );
            let grads = value.backward().get(&h).as_vec();
            for (i, &m) in margins.iter().enumerate() {
                let step = 1e-3;
                let numeric = (l.value(f64::from(m) + step) - l.value(f64::from(m) - step))
                    / (2.0 * step)
                    / 6.0;
                assert!(
                    (f64::from(grads[i]) - numeric).abs() < 1e-4,
                    "{kind:?} at {m}: {} vs {numeric}",
                    grads[i]
                );
            }
        }
    }

    #[test]
    fn rewards_accuracy_and_margins() {
        let l = loss(PreferenceLossKind::Sigmoid, 0.0);
        let stats = l.stats(&[-2.0, -6.0, -5.0, -4.0], &[-3.0, -3.0, -4.0, -4.0], 0.5);
        assert!((stats.chosen_reward - 0.5 * (0.1 - 0.1)).abs() < 1e-6);
        assert!((stats.rejected_reward - 0.5 * (-0.3 + 0.0)).abs() < 1e-6);
        assert_eq!(stats.accuracy, 0.5);
        assert!((stats.margin - 0.5 * (0.4 - 0.1)).abs() < 1e-6);
    }
}
