//! The layers GPT-2 and the Llama family share: linear layers (with LoRA adapters and
//! quantized frozen weights), seeded dropout, the parameter visitor, and the loss.

use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::kernels::{Dense, Epilogue, Kernels};
use super::lora::{Lora, LoraConfig, LoraTarget};
use super::quant::{QuantKind, Quantized};

pub type P1<D> = Tensor<(usize,), f32, D>;
pub type P2<D> = Tensor<(usize, usize), f32, D>;
/// Activations, `(tokens, features)`, carrying the tape `T`.
pub type A2<D, T> = Tensor<(usize, usize), f32, D, T>;

/// Visits every parameter with its HF name. `trainable` is false for weights held fixed (the
/// zero biases of a model without biases).
pub trait ParamVisitor<D: Device<f32>> {
    fn visit<S: Shape>(&mut self, name: &str, tensor: &mut Tensor<S, f32, D>, trainable: bool);
}

/// A model whose parameters can be visited by HF name.
pub trait Visit<D: Device<f32>> {
    fn visit<V: ParamVisitor<D>>(&mut self, v: &mut V);

    /// Whether HF stores a tensor (by name) transposed from how the model holds it: an
    /// `nn.Linear` weight is `(out, in)`, the linear layers here hold `(in, out)`.
    fn hf_transposed(&self) -> fn(&str) -> bool;
}

/// Dropout masks drawn from a seeded generator, so that a run resumed at step `n` draws the
/// same masks as one that never stopped (dfdx's own dropout uses the device's hidden RNG).
pub struct Dropout {
    /// On embeddings and residual branches.
    pub p: f32,
    /// On the inputs of LoRA adapters.
    pub lora: f32,
    pub rng: Option<ChaCha8Rng>,
}

impl Dropout {
    /// No dropout (evaluation, generation, or `p = 0`).
    pub fn off() -> Self {
        Dropout {
            p: 0.0,
            lora: 0.0,
            rng: None,
        }
    }

    pub fn seeded(p: f32, lora: f32, seed: u64) -> Self {
        Dropout {
            p,
            lora,
            rng: (p > 0.0 || lora > 0.0).then(|| ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// Whether residual branches are dropped out (so the residual add cannot be fused).
    pub(super) fn is_active(&self) -> bool {
        self.rng.is_some() && self.p > 0.0
    }

    pub(super) fn apply<D: Device<f32>, T: Tape<f32, D>>(&mut self, x: A2<D, T>) -> A2<D, T> {
        let p = self.p;
        self.drop(x, p)
    }

    pub(super) fn apply_lora<D: Device<f32>, T: Tape<f32, D>>(&mut self, x: A2<D, T>) -> A2<D, T> {
        let p = self.lora;
        self.drop(x, p)
    }

    fn drop<D: Device<f32>, T: Tape<f32, D>>(&mut self, x: A2<D, T>, p: f32) -> A2<D, T> {
        let Some(rng) = self.rng.as_mut().filter(|_| p > 0.0) else {
            return x;
        };
        let shape = *x.shape();
        let keep = 1.0 - p;
        let mask: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                if rng.random::<f32>() < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect();
        let mask = x.device().tensor_from_vec(mask, shape);
        x * mask
    }
}

pub struct Linear<D: Device<f32>> {
    /// `(in, out)`; empty while `quantized` holds it.
    pub weight: P2<D>,
    pub bias: P1<D>,
    /// The weight and bias are held fixed (fine-tuning with adapters).
    pub frozen: bool,
    /// A low-rank update trained in place of the frozen weight.
    pub lora: Option<Lora<D>>,
    /// The frozen weight, block-quantized (QLoRA).
    pub quantized: Option<Quantized>,
    /// The layer adds its bias; without one (Llama's projections) `bias` stays empty and is
    /// neither applied nor visited.
    pub with_bias: bool,
}

impl<D: Kernels> Linear<D> {
    pub(super) fn new(dev: &D, inputs: usize, outputs: usize, std: f32) -> Self {
        Linear {
            weight: dev.sample_normal_like(&(inputs, outputs)) * std,
            bias: dev.zeros_like(&(outputs,)),
            frozen: false,
            lora: None,
            quantized: None,
            with_bias: true,
        }
    }

    /// A layer without a bias.
    pub(super) fn without_bias(dev: &D, inputs: usize, outputs: usize, std: f32) -> Self {
        Linear {
            bias: dev.zeros_like(&(0,)),
            with_bias: false,
            ..Linear::new(dev, inputs, outputs, std)
        }
    }

    /// `x·W + b` and what follows it (GELU, a residual add), fused where the kernels allow.
    pub(super) fn forward<T: Tape<f32, D>>(
        &self,
        x: A2<D, T>,
        epilogue: Epilogue<D, T>,
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        let epilogue = match epilogue {
            // Dropout acts on the branch before the residual add, so the add stays outside.
            Epilogue::AddTo(residual) if dropout.is_active() => {
                let branch = self.forward(x, Epilogue::Plain, dropout);
                return residual + dropout.apply(branch);
            }
            other => other,
        };
        let weight = self.dense_weight();
        let dense = self.dense(&weight);
        let Some(lora) = &self.lora else {
            return D::linear(x, &dense, epilogue);
        };
        let update = |dropout: &mut Dropout, x| lora.forward(dropout.apply_lora(x));
        match epilogue {
            // The adapter's output joins before the activation.
            Epilogue::Gelu => {
                let base = D::linear(x.with_empty_tape(), &dense, Epilogue::Plain);
                D::gelu(base + update(dropout, x))
            }
            other => D::linear(x.with_empty_tape(), &dense, other) + update(dropout, x),
        }
    }

    /// The layer as a kernel sees it, with `weight` from [`Linear::dense_weight`].
    pub(super) fn dense<'a>(&'a self, weight: &'a P2<D>) -> Dense<'a, D> {
        Dense {
            weight,
            transposed: false,
            bias: self.with_bias.then_some(&self.bias),
            train: !self.frozen,
        }
    }

    /// The weight as a tensor, dequantized when it is held quantized.
    pub(super) fn dense_weight(&self) -> P2<D> {
        match &self.quantized {
            Some(q) => self.bias.device().tensor_from_vec(q.dequantize(), q.shape),
            None => self.weight.clone(),
        }
    }

    /// Replaces the weight by its quantized form; returns (bytes now, bytes in f32).
    pub(super) fn quantize(&mut self, kind: QuantKind, block: usize) -> (usize, usize) {
        let shape = *self.weight.shape();
        let q = Quantized::new(&self.weight.as_vec(), shape, kind, block);
        let sizes = (q.bytes(), 4 * shape.0 * shape.1);
        self.weight = self.bias.device().zeros_like(&(0, 0));
        self.quantized = Some(q);
        sizes
    }

    /// Folds the adapter into a dense, trainable weight.
    pub(super) fn merge(&mut self) {
        let mut weight = self.dense_weight();
        if let Some(lora) = self.lora.take() {
            weight = weight + lora.delta();
        }
        self.weight = weight;
        self.quantized = None;
        self.frozen = false;
    }

    pub(super) fn visit<V: ParamVisitor<D>>(&mut self, name: &str, bias: bool, v: &mut V) {
        if self.quantized.is_none() {
            v.visit(&format!("{name}.weight"), &mut self.weight, !self.frozen);
        }
        if self.with_bias {
            v.visit(
                &format!("{name}.bias"),
                &mut self.bias,
                bias && !self.frozen,
            );
        }
        if let Some(lora) = &mut self.lora {
            v.visit(&format!("{name}.lora_A"), &mut lora.a, true);
            v.visit(&format!("{name}.lora_B"), &mut lora.b, true);
        }
    }
}

/// Whether a block's linear layers can run as one op with the block (`Kernels::mlp`,
/// `Kernels::attention_block`): no adapter joins them, no dropout acts between them.
pub(super) fn fusable<D: Device<f32>>(linears: [&Linear<D>; 2], dropout: &Dropout) -> bool {
    linears.iter().all(|linear| linear.lora.is_none()) && !dropout.is_active()
}

/// Mean negative log-likelihood of target log-probs `(n,)`, over the targets whose `mask`
/// weight is 1 when a mask is given (fine-tuning trains on answers only).
pub fn mean_nll<D: Device<f32>, T: Tape<f32, D>>(
    log_probs: Tensor<(usize,), f32, D, T>,
    mask: Option<Tensor<(usize,), f32, D>>,
) -> Tensor<Rank0, f32, D, T> {
    match mask {
        None => log_probs.mean::<Rank0, _>().negate(),
        Some(mask) => {
            let count = mask.as_vec().iter().sum::<f32>().max(1.0);
            (log_probs * mask).sum::<Rank0, _>() * (-1.0 / count)
        }
    }
}

/// Freezes every one of a model's block linear layers (listed block by block, in a fixed order)
/// and adds an adapter to those `config` targets; the `j`th layer's adapter draws its `A` from
/// `seed` and `j`, so adapters do not depend on which others exist.
pub(super) fn add_adapters<'a, D: Kernels + 'a>(
    dev: &D,
    linears: impl Iterator<Item = (LoraTarget, &'a mut Linear<D>)>,
    config: &LoraConfig,
    seed: u64,
) {
    for (j, (target, linear)) in linears.enumerate() {
        linear.frozen = true;
        if config.targets.contains(&target) {
            let (inputs, outputs) = *linear.weight.shape();
            let seed = seed.wrapping_add(((j + 1) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            linear.lora = Some(Lora::new(dev, inputs, outputs, config, seed));
        }
    }
}

/// Stores the frozen ones of `linears` block-quantized; returns (bytes now, bytes in f32).
pub(super) fn quantize_frozen<'a, D: Kernels + 'a>(
    linears: impl Iterator<Item = &'a mut Linear<D>>,
    kind: QuantKind,
    block: usize,
) -> (usize, usize) {
    let mut sizes = (0, 0);
    for linear in linears {
        if linear.frozen && linear.quantized.is_none() {
            let (now, f32_bytes) = linear.quantize(kind, block);
            sizes = (sizes.0 + now, sizes.1 + f32_bytes);
        }
    }
    sizes
}

/// The trainable parameters a visit reports.
pub(super) fn count_trainable<D: Device<f32>, M: Visit<D>>(model: &mut M) -> usize {
    struct Count(usize);
    impl<D: Device<f32>> ParamVisitor<D> for Count {
        fn visit<S: Shape>(&mut self, _: &str, t: &mut Tensor<S, f32, D>, trainable: bool) {
            if trainable {
                self.0 += t.shape().num_elements();
            }
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}
