//! `smelt bench train`: training throughput of the model layer on fixed model sizes, as one JSON
//! line that reads side by side with `../shared/bench/torch_gpt.py bench` (same sizes, random
//! tokens, AdamW with betas 0.9/0.95, weight decay 0.1 and a global-norm clip of 1.0).

use std::time::Instant;

use crate::model::{
    on_compute_threads, uses_amx, AdamWConfig, Backend, Batch, DeviceKind, GptConfig, Precision,
    Trainer,
};
use crate::training::default_peak_flops;

/// A benchmark model size and batch.
pub struct BenchConfig {
    pub name: &'static str,
    pub model: GptConfig,
    pub batch: usize,
}

/// The sizes torch_gpt.py names A and B.
pub fn config(name: &str) -> Option<BenchConfig> {
    let (name, vocab_size, seq_len, d_model, layers, heads, batch) = match name {
        "A" | "a" => ("A", 512, 64, 128, 4, 4, 16),
        "B" | "b" => ("B", 4096, 128, 256, 6, 8, 8),
        _ => return None,
    };
    Some(BenchConfig {
        name,
        model: GptConfig {
            vocab_size,
            seq_len,
            d_model,
            layers,
            heads,
            dropout: 0.0,
            bias: true,
            tied_head: true,
        },
        batch,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Trains `warmup + steps` steps on random tokens and reports medians over the last `steps`.
/// The forward time is measured by a separate forward pass without the tape (dfdx runs forward
/// and backward in one call), and the backward time is the taped call minus it.
pub fn train(
    config: &BenchConfig,
    warmup: usize,
    steps: usize,
    device: DeviceKind,
    precision: Precision,
) -> Result<serde_json::Value, String> {
    let optimizer = AdamWConfig {
        betas: [0.9, 0.95],
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut model = Trainer::new(config.model.clone(), device, 0, optimizer)?;
    model.set_precision(precision)?;
    let (b, s, v) = (config.batch, config.model.seq_len, config.model.vocab_size);
    let tokens = random_tokens(b * (s + 1), v);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for row in tokens.chunks(s + 1) {
        inputs.extend_from_slice(&row[..s]);
        targets.extend_from_slice(&row[1..]);
    }
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        mask: None,
        batch: b,
        seq: s,
    };
    let (mut step_s, mut forward_s, mut backward_s, mut optimizer_s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut loss = f32::NAN;
    for i in 0..warmup + steps.max(1) {
        let t0 = Instant::now();
        on_compute_threads(&mut model, |m| m.loss(&batch));
        let forward = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        loss = on_compute_threads(&mut model, |m| m.accumulate(&batch, 1.0, i as u64));
        let taped = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        on_compute_threads(&mut model, |m| m.step(3e-4, Some(1.0)));
        let update = t2.elapsed().as_secs_f64();
        if i >= warmup {
            step_s.push(taped + update);
            forward_s.push(forward);
            backward_s.push((taped - forward).max(0.0));
            optimizer_s.push(update);
        }
    }
    let parameters = model.parameters();
    let step = median(&mut step_s);
    let tokens_per_sec = (b * s) as f64 / step;
    let flops_per_token = config.model.flops_per_token(parameters);
    Ok(serde_json::json!({
        "impl": "smelt",
        "config": config.name,
        "params": parameters,
        "batch": b,
        "seq": s,
        "threads": rayon::current_num_threads(),
        "precision": precision,
        "amx": precision == Precision::Bf16 && uses_amx(),
        "steps": step_s.len(),
        "tokens_per_sec": (tokens_per_sec * 10.0).round() / 10.0,
        "step_ms": milliseconds(step),
        "forward_ms": milliseconds(median(&mut forward_s)),
        "backward_ms": milliseconds(median(&mut backward_s)),
        "optimizer_ms": milliseconds(median(&mut optimizer_s)),
        "mfu": (tokens_per_sec * flops_per_token / default_peak_flops().get() * 1e4).round() / 1e4,
        "peak_flops": default_peak_flops().get(),
        "last_loss": loss,
    }))
}

/// Seconds as milliseconds to the microsecond.
fn milliseconds(seconds: f64) -> f64 {
    (seconds * 1e6).round() / 1e3
}

/// Deterministic pseudo-random ids (a 64-bit LCG), so every run trains on the same batch.
fn random_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_trains_and_reports_its_split() {
        let mut config = config("A").unwrap();
        // Smaller than A, so the test is quick; the code path is the same.
        config.model.layers = 1;
        config.batch = 2;
        let report = train(&config, 1, 3, DeviceKind::Cpu, Precision::F32).unwrap();
        assert_eq!(report["config"], "A");
        assert_eq!(report["steps"], 3);
        let number = |key: &str| report[key].as_f64().unwrap();
        assert!(number("tokens_per_sec") > 0.0);
        let split = number("forward_ms") + number("backward_ms") + number("optimizer_ms");
        // Forward is measured apart from the taped call, so the parts need not sum exactly.
        assert!(split > 0.0 && number("step_ms") > 0.0);
        assert!(number("mfu") > 0.0 && number("mfu") < 1.0);
        // Random tokens over a vocabulary of 512: the loss starts near ln 512 = 6.24, and four
        // steps on the same batch lower it a little.
        let loss = number("last_loss");
        assert!(loss < 512f64.ln() && loss > 4.0, "{report}");
        assert!(config_is_known("b") && !config_is_known("C"));
    }

    fn config_is_known(name: &str) -> bool {
        config(name).is_some()
    }
}
