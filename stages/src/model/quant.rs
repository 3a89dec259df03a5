//! Block-wise quantization of frozen weights (QLoRA): each block of values is stored as small
//! integer codes and one f32 scale, its largest magnitude. `int8` codes are linear; `nf4` codes
//! index the 16 levels of NormalFloat4 (Dettmers et al., 2023), quantiles of a normal
//! distribution, which suits weights that are roughly normal. Two nf4 codes share a byte.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QuantKind {
    /// 4-bit NormalFloat, 16 levels.
    #[default]
    Nf4,
    /// 8-bit linear, 255 levels.
    Int8,
}

/// The NF4 levels, from the QLoRA paper's definition (quantiles of N(0, 1) scaled to [-1, 1],
/// with an exact zero).
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// A matrix held as block-quantized codes.
pub struct Quantized {
    pub kind: QuantKind,
    pub shape: (usize, usize),
    pub block: usize,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

impl Quantized {
    /// Quantizes the row-major `values` of a `shape` matrix in blocks of `block` values.
    pub fn new(values: &[f32], shape: (usize, usize), kind: QuantKind, block: usize) -> Self {
        assert_eq!(values.len(), shape.0 * shape.1, "values fill the shape");
        let block = block.max(1);
        let scales: Vec<f32> = values
            .chunks(block)
            .map(|b| b.iter().fold(0.0f32, |m, x| m.max(x.abs())))
            .collect();
        let code = |i: usize| -> u8 {
            let scale = scales[i / block];
            let x = if scale > 0.0 { values[i] / scale } else { 0.0 };
            match kind {
                QuantKind::Int8 => ((x * 127.0).round() as i8) as u8,
                QuantKind::Nf4 => nearest_nf4(x),
            }
        };
        let codes = match kind {
            QuantKind::Int8 => (0..values.len()).map(code).collect(),
            QuantKind::Nf4 => (0..values.len())
                .step_by(2)
                .map(|i| {
                    let high = if i + 1 < values.len() { code(i + 1) } else { 0 };
                    code(i) | (high << 4)
                })
                .collect(),
        };
        Quantized {
            kind,
            shape,
            block,
            codes,
            scales,
        }
    }

    /// The values back, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.shape.0 * self.shape.1;
        (0..n)
            .map(|i| {
                let scale = self.scales[i / self.block];
                match self.kind {
                    QuantKind::Int8 => f32::from(self.codes[i] as i8) / 127.0 * scale,
                    QuantKind::Nf4 => {
                        let byte = self.codes[i / 2];
                        let code = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                        NF4[code as usize] * scale
                    }
                }
            })
            .collect()
    }

    /// Bytes held: codes and scales.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

fn nearest_nf4(x: f32) -> u8 {
    // The levels are sorted: the nearest is one of the two around the insertion point.
    let above = NF4.partition_point(|&level| level < x).min(15);
    let below = above.saturating_sub(1);
    if (x - NF4[below]).abs() <= (NF4[above] - x).abs() {
        below as u8
    } else {
        above as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// N(0, 0.02²) values (Box–Muller), like initialised weights.
    fn normal_values(n: usize) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                0.02 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    /// Each value lands within half a level gap of its block's scale, and the error over
    /// normal weights is what 4 and 8 bits buy.
    #[test]
    fn dequantization_error_is_bounded() {
        // 24 × 50 = 1,200 values: the last block of 64 is partial, and the count is even but
        // odd sizes are covered below.
        let values = normal_values(24 * 50);
        let widest_nf4_gap = NF4.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max);
        for (kind, half_step, relative_rms) in [
            (QuantKind::Int8, 0.5 / 127.0, 0.01),
            (QuantKind::Nf4, widest_nf4_gap / 2.0, 0.12),
        ] {
            let q = Quantized::new(&values, (24, 50), kind, 64);
            let back = q.dequantize();
            let mut squared = (0.0f64, 0.0f64);
            for (i, (x, y)) in values.iter().zip(&back).enumerate() {
                let scale = values[i / 64 * 64..((i / 64 + 1) * 64).min(values.len())]
                    .iter()
                    .fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(
                    (x - y).abs() <= scale * half_step * 1.0001,
                    "{kind:?} [{i}]: {x} → {y}"
                );
                squared.0 += f64::from(x - y).powi(2);
                squared.1 += f64::from(*x).powi(2);
            }
            let rms = (squared.0 / squared.1).sqrt();
            assert!(rms < relative_rms, "{kind:?}: relative RMS error {rms}");
            assert!(rms > 0.0, "{kind:?} is lossy");
        }
    }

    #[test]
    fn memory_is_a_quarter_or_an_eighth() {
        let values = normal_values(64 * 64);
        let f32_bytes = 4 * values.len();
        let int8 = Quantized::new(&values, (64, 64), QuantKind::Int8, 64);
        let nf4 = Quantized::new(&values, (64, 64), QuantKind::Nf4, 64);
        assert_eq!(int8.bytes(), values.len() + 4 * 64);
        assert_eq!(nf4.bytes(), values.len() / 2 + 4 * 64);
        assert!(nf4.bytes() * 7 < f32_bytes);
    }

    #[test]
    fn odd_sizes_zeros_and_extremes_round_trip() {
        let values = [0.0, 0.0, 0.0, 1.5, -3.0, 0.25, 7.0];
        for kind in [QuantKind::Int8, QuantKind::Nf4] {
            let back = Quantized::new(&values, (1, 7), kind, 3).dequantize();
            assert_eq!(back.len(), 7);
            assert_eq!(&back[..3], &[0.0, 0.0, 0.0], "an all-zero block stays zero");
            assert_eq!(back[4], -3.0, "the block's extreme is exact");
            assert_eq!(back[6], 7.0);
        }
    }
}
