//! Learning-rate schedules: linear warmup, then a decay to `min_lr` at the last step.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half a cosine from `lr` to `min_lr`.
    #[default]
    Cosine,
    /// A straight line from `lr` to `min_lr`.
    Linear,
    /// `lr` throughout (after warmup).
    Constant,
}

/// The learning rate at `step` (0-based) of `steps`.
pub fn learning_rate(
    schedule: Schedule,
    step: u64,
    steps: u64,
    warmup: u64,
    lr: f64,
    min_lr: f64,
) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = steps.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Cosine => {
            min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (lr - min_lr)
        }
        Schedule::Linear => lr + (min_lr - lr) * progress,
        Schedule::Constant => lr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_to_the_floor() {
        let at = |schedule, step| learning_rate(schedule, step, 1000, 100, 1e-3, 1e-4);
        assert!((at(Schedule::Cosine, 0) - 1e-5).abs() < 1e-12);
        assert!((at(Schedule::Cosine, 99) - 1e-3).abs() < 1e-12);
        assert!((at(Schedule::Cosine, 100) - 1e-3).abs() < 1e-12);
        assert!(
            (at(Schedule::Cosine, 550) - 5.5e-4).abs() < 1e-9,
            "halfway is the midpoint"
        );
        assert!((at(Schedule::Cosine, 1000) - 1e-4).abs() < 1e-12);
        assert!((at(Schedule::Linear, 550) - 5.5e-4).abs() < 1e-12);
        assert!((at(Schedule::Linear, 325) - 7.75e-4).abs() < 1e-12);
        assert_eq!(at(Schedule::Constant, 900), 1e-3);
        let cosine: Vec<f64> = (100..1000).map(|s| at(Schedule::Cosine, s)).collect();
        assert!(
            cosine.windows(2).all(|w| w[1] <= w[0]),
            "monotone after warmup"
        );
    }
}
