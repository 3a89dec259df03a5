//! GPT-2, the way nanoGPT's model.py writes it, on dfdx tensors with sizes chosen at run time.
//!
//! dfdx's own `nn` modules have compile-time sizes and its attention has no mask, so the modules
//! here are small structs of plain tensors. Every parameter is reported to a [`ParamVisitor`]
//! under its Hugging Face GPT-2 name; the optimizer, checkpoints and export are built on that.
//! Linear weights are stored `(in, out)`, as GPT-2's Conv1D stores them.

use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::GptConfig;

pub type P1<D> = Tensor<(usize,), f32, D>;
pub type P2<D> = Tensor<(usize, usize), f32, D>;
/// Activations, `(tokens, features)`, carrying the tape `T`.
pub type A2<D, T> = Tensor<(usize, usize), f32, D, T>;

/// Visits every parameter with its HF name. `trainable` is false for weights held fixed (the
/// zero biases of a model without biases).
pub trait ParamVisitor<D: Device<f32>> {
    fn visit<S: Shape>(&mut self, name: &str, tensor: &mut Tensor<S, f32, D>, trainable: bool);
}

/// Dropout masks drawn from a seeded generator, so that a run resumed at step `n` draws the
/// same masks as one that never stopped (dfdx's own dropout uses the device's hidden RNG).
pub struct Dropout {
    pub p: f32,
    pub rng: Option<ChaCha8Rng>,
}

impl Dropout {
    /// No dropout (evaluation, generation, or `p = 0`).
    pub fn off() -> Self {
        Dropout { p: 0.0, rng: None }
    }

    pub fn seeded(p: f32, seed: u64) -> Self {
        Dropout {
            p,
            rng: (p > 0.0).then(|| ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    fn apply<D: Device<f32>, T: Tape<f32, D>>(&mut self, x: A2<D, T>) -> A2<D, T> {
        let Some(rng) = &mut self.rng else {
            return x;
        };
        let shape = *x.shape();
        let keep = 1.0 - self.p;
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
    pub weight: P2<D>,
    pub bias: P1<D>,
}

impl<D: Device<f32>> Linear<D> {
    fn new(dev: &D, inputs: usize, outputs: usize, std: f32) -> Self {
        Linear {
            weight: dev.sample_normal_like(&(inputs, outputs)) * std,
            bias: dev.zeros_like(&(outputs,)),
        }
    }

    fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>) -> A2<D, T> {
        let shape = (x.shape().0, self.weight.shape().1);
        let bias = self
            .bias
            .retaped::<T>()
            .broadcast_like::<_, Axis<0>>(&shape);
        x.matmul(self.weight.retaped::<T>()) + bias
    }

    fn visit<V: ParamVisitor<D>>(&mut self, name: &str, bias: bool, v: &mut V) {
        v.visit(&format!("{name}.weight"), &mut self.weight, true);
        v.visit(&format!("{name}.bias"), &mut self.bias, bias);
    }
}

pub struct LayerNorm<D: Device<f32>> {
    pub weight: P1<D>,
    pub bias: P1<D>,
}

impl<D: Device<f32>> LayerNorm<D> {
    fn new(dev: &D, d: usize) -> Self {
        LayerNorm {
            weight: dev.ones_like(&(d,)),
            bias: dev.zeros_like(&(d,)),
        }
    }

    fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>) -> A2<D, T> {
        let shape = *x.shape();
        x.normalize::<Axis<1>>(1e-5)
            * self
                .weight
                .retaped::<T>()
                .broadcast_like::<_, Axis<0>>(&shape)
            + self
                .bias
                .retaped::<T>()
                .broadcast_like::<_, Axis<0>>(&shape)
    }

    fn visit<V: ParamVisitor<D>>(&mut self, name: &str, bias: bool, v: &mut V) {
        v.visit(&format!("{name}.weight"), &mut self.weight, true);
        v.visit(&format!("{name}.bias"), &mut self.bias, bias);
    }
}

pub struct CausalSelfAttention<D: Device<f32>> {
    pub c_attn: Linear<D>,
    pub c_proj: Linear<D>,
}

impl<D: Device<f32>> CausalSelfAttention<D> {
    /// `x`: `(batch·seq, d)`; `mask`: `(seq_len, seq_len)`, −∞ above the diagonal.
    fn forward<T: Tape<f32, D>>(
        &self,
        x: A2<D, T>,
        (batch, seq, heads): (usize, usize, usize),
        mask: &P2<D>,
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        let (n, d) = *x.shape();
        let head = d / heads;
        let qkv = self.c_attn.forward(x);
        // The branches share one tape: all but the last start empty and merge back at the ops.
        let q = qkv.with_empty_tape().slice((.., 0..d));
        let k = qkv.with_empty_tape().slice((.., d..2 * d));
        let v = qkv.slice((.., 2 * d..3 * d));
        let q = q
            .reshape_like(&(batch, seq, heads, head))
            .permute::<_, Axes4<0, 2, 1, 3>>();
        let k = k
            .reshape_like(&(batch, seq, heads, head))
            .permute::<_, Axes4<0, 2, 3, 1>>();
        let v = v
            .reshape_like(&(batch, seq, heads, head))
            .permute::<_, Axes4<0, 2, 1, 3>>();
        let causal = mask
            .clone()
            .slice((0..seq, 0..seq))
            .broadcast_like::<_, Axes2<0, 1>>(&(batch, heads, seq, seq));
        let attention = (q.matmul(k) * (1.0 / (head as f32).sqrt()) + causal).softmax::<Axis<3>>();
        let y = attention
            .matmul(v)
            .permute::<_, Axes4<0, 2, 1, 3>>()
            .reshape_like(&(n, d));
        dropout.apply(self.c_proj.forward(y))
    }
}

pub struct Mlp<D: Device<f32>> {
    pub c_fc: Linear<D>,
    pub c_proj: Linear<D>,
}

impl<D: Device<f32>> Mlp<D> {
    fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>, dropout: &mut Dropout) -> A2<D, T> {
        // GPT-2's "gelu_new": the tanh approximation.
        dropout.apply(self.c_proj.forward(self.c_fc.forward(x).fast_gelu()))
    }
}

pub struct Block<D: Device<f32>> {
    pub ln_1: LayerNorm<D>,
    pub attn: CausalSelfAttention<D>,
    pub ln_2: LayerNorm<D>,
    pub mlp: Mlp<D>,
}

impl<D: Device<f32>> Block<D> {
    fn new(dev: &D, config: &GptConfig) -> Self {
        let d = config.d_model;
        // GPT-2 scales the init of the residual projections by 1/sqrt(2·layers).
        let projection = 0.02 / ((2 * config.layers) as f32).sqrt();
        Block {
            ln_1: LayerNorm::new(dev, d),
            attn: CausalSelfAttention {
                c_attn: Linear::new(dev, d, 3 * d, 0.02),
                c_proj: Linear::new(dev, d, d, projection),
            },
            ln_2: LayerNorm::new(dev, d),
            mlp: Mlp {
                c_fc: Linear::new(dev, d, 4 * d, 0.02),
                c_proj: Linear::new(dev, 4 * d, d, projection),
            },
        }
    }

    fn forward<T: Tape<f32, D>>(
        &self,
        x: A2<D, T>,
        sizes: (usize, usize, usize),
        mask: &P2<D>,
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        let attended =
            self.attn
                .forward(self.ln_1.forward(x.with_empty_tape()), sizes, mask, dropout);
        let x = x + attended;
        let mlp = self
            .mlp
            .forward(self.ln_2.forward(x.with_empty_tape()), dropout);
        x + mlp
    }

    fn visit<V: ParamVisitor<D>>(&mut self, name: &str, bias: bool, v: &mut V) {
        self.ln_1.visit(&format!("{name}.ln_1"), bias, v);
        self.attn
            .c_attn
            .visit(&format!("{name}.attn.c_attn"), bias, v);
        self.attn
            .c_proj
            .visit(&format!("{name}.attn.c_proj"), bias, v);
        self.ln_2.visit(&format!("{name}.ln_2"), bias, v);
        self.mlp.c_fc.visit(&format!("{name}.mlp.c_fc"), bias, v);
        self.mlp
            .c_proj
            .visit(&format!("{name}.mlp.c_proj"), bias, v);
    }
}

pub struct Gpt<D: Device<f32>> {
    pub config: GptConfig,
    /// Token embeddings, `(vocab, d)`; also the output head when tied.
    pub wte: P2<D>,
    /// Position embeddings, `(seq_len, d)`.
    pub wpe: P2<D>,
    pub h: Vec<Block<D>>,
    pub ln_f: LayerNorm<D>,
    /// The output head, `(d, vocab)` (HF stores `(vocab, d)`; export transposes), when untied.
    pub lm_head: Option<P2<D>>,
    /// The additive causal mask: a constant, not a parameter.
    mask: P2<D>,
}

impl<D: Device<f32>> Gpt<D> {
    pub fn new(dev: &D, config: GptConfig) -> Self {
        let (vocab, seq, d) = (config.vocab_size, config.seq_len, config.d_model);
        Gpt {
            wte: dev.sample_normal_like(&(vocab, d)) * 0.02,
            wpe: dev.sample_normal_like(&(seq, d)) * 0.01,
            h: (0..config.layers)
                .map(|_| Block::new(dev, &config))
                .collect(),
            ln_f: LayerNorm::new(dev, d),
            lm_head: (!config.tied_head).then(|| dev.sample_normal_like(&(d, vocab)) * 0.02),
            mask: dev.upper_tri_like(&(seq, seq), f32::NEG_INFINITY, 1),
            config,
        }
    }

    /// Logits `(batch·seq, vocab)` for token ids `(batch, seq)`; the tape rides on the ids.
    pub fn forward<T: Tape<f32, D>>(
        &self,
        ids: Tensor<(usize, usize), usize, D, T>,
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        let (batch, seq) = *ids.shape();
        let d = self.config.d_model;
        let (ids, tape) = ids.split_tape();
        let tokens: Tensor<(usize, usize, usize), f32, D, T> =
            self.wte.clone().put_tape(tape).gather(ids);
        let positions = self
            .wpe
            .retaped::<T>()
            .slice((0..seq, ..))
            .broadcast_like::<_, Axis<0>>(&(batch, seq, d));
        let mut x = dropout.apply((tokens + positions).reshape_like(&(batch * seq, d)));
        for block in &self.h {
            x = block.forward(x, (batch, seq, self.config.heads), &self.mask, dropout);
        }
        let x = self.ln_f.forward(x);
        match &self.lm_head {
            // Tied: the same tensor as the embedding, so both uses add to one gradient.
            None => x.matmul(self.wte.retaped::<T>().permute::<_, Axes2<1, 0>>()),
            Some(head) => x.matmul(head.retaped::<T>()),
        }
    }

    pub fn visit<V: ParamVisitor<D>>(&mut self, v: &mut V) {
        let bias = self.config.bias;
        v.visit("transformer.wte.weight", &mut self.wte, true);
        v.visit("transformer.wpe.weight", &mut self.wpe, true);
        for (i, block) in self.h.iter_mut().enumerate() {
            block.visit(&format!("transformer.h.{i}"), bias, v);
        }
        self.ln_f.visit("transformer.ln_f", bias, v);
        if let Some(head) = &mut self.lm_head {
            v.visit("lm_head.weight", head, true);
        }
    }

    /// Trainable parameters.
    pub fn parameters(&mut self) -> usize {
        struct Count(usize);
        impl<D: Device<f32>> ParamVisitor<D> for Count {
            fn visit<S: Shape>(&mut self, _: &str, t: &mut Tensor<S, f32, D>, trainable: bool) {
                if trainable {
                    self.0 += t.shape().num_elements();
                }
            }
        }
        let mut count = Count(0);
        self.visit(&mut count);
        count.0
    }
}

/// Mean cross-entropy of `logits` `(n, vocab)` against target ids `(n,)`.
pub fn cross_entropy<D: Device<f32>, T: Tape<f32, D>>(
    logits: A2<D, T>,
    targets: Tensor<(usize,), usize, D>,
) -> Tensor<Rank0, f32, D, T> {
    logits
        .log_softmax::<Axis<1>>()
        .select(targets)
        .mean::<Rank0, _>()
        .negate()
}
