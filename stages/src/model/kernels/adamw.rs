//! The optimizer's CPU kernels: the gradient norm, gradient accumulation and the AdamW update
//! with the clip folded in. Each is one vectorised pass over a parameter's buffers, split across
//! rayon's threads in blocks of a fixed size, so results do not depend on the thread count.
//!
//! dfdx's own Adam kernel is a single-threaded loop, and clipping by the global norm took two
//! more single-threaded passes (the norm as a serial f64 sum, then a scale), 18 ms of config B's
//! 225 ms step.

use rayon::prelude::*;

/// Values per parallel task.
const BLOCK: usize = 16_384;

/// One AdamW update's settings: the same for every parameter but the weight decay.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// Updates so far, this one included (for the bias correction).
    pub t: i32,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Decoupled weight decay; none on biases and LayerNorm gains.
    pub weight_decay: Option<f64>,
    /// Multiplies the gradient before anything else: the global-norm clip.
    pub grad_scale: Option<f32>,
}

impl AdamStep {
    /// The same update as dfdx's Adam settings (without the clip, which dfdx does not know):
    /// what devices without a fused update run, and the tests' reference.
    #[cfg(any(test, feature = "cuda"))]
    pub fn dfdx_config(&self) -> dfdx::optim::AdamConfig {
        dfdx::optim::AdamConfig {
            lr: self.lr,
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay.map(dfdx::optim::WeightDecay::Decoupled),
        }
    }
}

/// The update's f32 constants, rounded as dfdx's Adam kernel rounds them: the fused update gives
/// the same bits as dfdx's `AdamConfig::try_update` after a separate clip.
struct Constants {
    grad_scale: Option<f32>,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    /// `1 / (1 − βᵗ)`, Adam's bias corrections.
    m_correction: f32,
    v_correction: f32,
    lr: f32,
    eps: f32,
    /// `weight_decay · lr`.
    decay: Option<f32>,
}

impl Constants {
    fn new(step: &AdamStep) -> Self {
        let [beta1, beta2] = step.betas.map(|b| b as f32);
        Constants {
            grad_scale: step.grad_scale,
            beta1,
            beta2,
            one_minus_beta1: 1.0 - beta1,
            one_minus_beta2: 1.0 - beta2,
            m_correction: (1.0 - beta1.powi(step.t)).recip(),
            v_correction: (1.0 - beta2.powi(step.t)).recip(),
            lr: step.lr as f32,
            eps: step.eps as f32,
            decay: step.weight_decay.map(|wd| (wd * step.lr) as f32),
        }
    }
}

simd_fn! {
    fn adamw_block(c: &Constants, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
            let g = match c.grad_scale {
                Some(scale) => g * scale,
                None => g,
            };
            *m = *m * c.beta1 + g * c.one_minus_beta1;
            *v = *v * c.beta2 + g * g * c.one_minus_beta2;
            let m_hat = *m * c.m_correction;
            let v_hat = *v * c.v_correction;
            let mut update = c.lr * m_hat / (v_hat.sqrt() + c.eps);
            if let Some(decay) = c.decay {
                update += decay * *w;
            }
            *w -= update;
        }
    }
}

/// One AdamW update of the weights `w` in place, with their moments `m` and `v` and gradient `g`.
pub fn adamw(step: &AdamStep, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    assert!(
        m.len() == w.len() && v.len() == w.len() && g.len() == w.len(),
        "AdamW buffers of one parameter differ in length"
    );
    let constants = Constants::new(step);
    w.par_chunks_mut(BLOCK)
        .zip(m.par_chunks_mut(BLOCK))
        .zip(v.par_chunks_mut(BLOCK))
        .zip(g.par_chunks(BLOCK))
        .for_each(|(((w, m), v), g)| adamw_block(&constants, w, m, v, g));
}

/// f64 accumulators per block: two AVX-512 vectors, so the adds do not wait on each other.
const F64_LANES: usize = 16;

simd_fn! {
    fn sum_squares_block(xs: &[f32]) -> f64 {
        let square = |x: f32| f64::from(x) * f64::from(x);
        let mut lanes = [0.0f64; F64_LANES];
        let chunks = xs.chunks_exact(F64_LANES);
        let tail: f64 = chunks.remainder().iter().map(|&x| square(x)).sum();
        for chunk in chunks {
            for (lane, &x) in lanes.iter_mut().zip(chunk) {
                *lane += square(x);
            }
        }
        lanes.iter().sum::<f64>() + tail
    }
}

/// `Σ x²`, accumulated in f64.
pub fn sum_squares(xs: &[f32]) -> f64 {
    let partials: Vec<f64> = xs.par_chunks(BLOCK).map(sum_squares_block).collect();
    partials.iter().sum()
}

simd_fn! {
    fn scale_block(xs: &mut [f32], by: f32) {
        for x in xs {
            *x *= by;
        }
    }
}

/// `xs *= by`.
pub fn scale(xs: &mut [f32], by: f32) {
    xs.par_chunks_mut(BLOCK).for_each(|xs| scale_block(xs, by));
}

simd_fn! {
    fn add_scaled_block(into: &mut [f32], from: &[f32], by: f32) {
        for (a, &b) in into.iter_mut().zip(from) {
            *a += b * by;
        }
    }
}

/// `into += from · by`.
pub fn add_scaled(into: &mut [f32], from: &[f32], by: f32) {
    assert_eq!(
        into.len(),
        from.len(),
        "adding buffers of different lengths"
    );
    into.par_chunks_mut(BLOCK)
        .zip(from.par_chunks(BLOCK))
        .for_each(|(into, from)| add_scaled_block(into, from, by));
}

#[cfg(test)]
mod tests {
    use dfdx::prelude::*;

    use super::*;

    /// Values of both signs and several magnitudes, from a fixed-seed LCG.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
                (unit - 0.5) * 10f32.powi((state % 5) as i32 - 3)
            })
            .collect()
    }

    /// dfdx's own update after a separate clip: the composition the fused kernel replaces.
    fn dfdx_update(step: &AdamStep, w: &[f32], m: &[f32], v: &[f32], g: &[f32]) -> [Vec<f32>; 3] {
        let mut p = Cpu::default().tensor_from_vec(w.to_vec(), (w.len(),));
        // dfdx's kernel takes the moments and the gradient as gradient buffers: a map each.
        let mut maps = [m, v, g].map(|values| {
            let mut map = Gradients::leaky();
            let buffer: &mut Vec<f32> = map.get_or_alloc_mut(&p).unwrap();
            buffer.copy_from_slice(values);
            map
        });
        let [m_map, v_map, g_map] = &mut maps;
        let g = g_map.get_or_alloc_mut(&p).unwrap();
        if let Some(by) = step.grad_scale {
            g.iter_mut().for_each(|x| *x *= by);
        }
        let config = step.dfdx_config();
        let m = m_map.get_or_alloc_mut(&p).unwrap();
        let v = v_map.get_or_alloc_mut(&p).unwrap();
        config.try_update(step.t, &mut p, m, v, g).unwrap();
        [p.as_vec(), m.to_vec(), v.to_vec()]
    }

    #[test]
    fn the_fused_update_gives_dfdx_bits_at_odd_sizes() {
        for (n, t, grad_scale, weight_decay) in [
            (1, 1, None, None),
            (37, 3, Some(0.25), Some(0.1)),
            (BLOCK + 129, 12, Some(0.7), None),
            (3 * BLOCK - 5, 1000, None, Some(0.01)),
        ] {
            let step = AdamStep {
                t,
                lr: 3e-4,
                betas: [0.9, 0.95],
                eps: 1e-8,
                weight_decay,
                grad_scale,
            };
            let (w, m, g) = (values(n, 1), values(n, 2), values(n, 3));
            let v: Vec<f32> = values(n, 4).iter().map(|x| x * x).collect();
            let expected = dfdx_update(&step, &w, &m, &v, &g);
            let (mut w2, mut m2, mut v2) = (w.clone(), m.clone(), v.clone());
            adamw(&step, &mut w2, &mut m2, &mut v2, &g);
            assert_eq!([w2, m2, v2], expected, "n {n}, t {t}");
            assert_ne!(expected[0], w, "the update moved nothing");
        }
    }

    #[test]
    fn norms_and_sums_match_plain_loops_and_any_thread_count() {
        let n = 5 * BLOCK + 77;
        let (a, b) = (values(n, 5), values(n, 6));
        let plain: f64 = a.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert!((sum_squares(&a) - plain).abs() <= 1e-12 * plain);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        assert_eq!(
            one.install(|| sum_squares(&a)).to_bits(),
            three.install(|| sum_squares(&a)).to_bits()
        );

        let mut sum = a.clone();
        add_scaled(&mut sum, &b, 0.5);
        let expected: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y * 0.5).collect();
        assert_eq!(sum, expected);
        scale(&mut sum, 2.0);
        let doubled: Vec<f32> = expected.iter().map(|x| x * 2.0).collect();
        assert_eq!(sum, doubled);
    }
}
