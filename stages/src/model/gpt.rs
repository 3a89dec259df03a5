//! GPT-2, the way nanoGPT's model.py writes it, on dfdx tensors with sizes chosen at run time.
//!
//! dfdx's own `nn` modules have compile-time sizes and its attention has no mask, so the modules
//! here are small structs of plain tensors. Every parameter is reported to a [`ParamVisitor`]
//! under its Hugging Face GPT-2 name; the optimizer, checkpoints and export are built on that.
//! Linear weights are stored `(in, out)`, as GPT-2's Conv1D stores them.

use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::kernels::{autocast, Dense, Epilogue, Kernels, Precision};
use super::lora::{Lora, LoraConfig, LoraTarget};
use super::quant::{QuantKind, Quantized};
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
    fn is_active(&self) -> bool {
        self.rng.is_some() && self.p > 0.0
    }

    fn apply<D: Device<f32>, T: Tape<f32, D>>(&mut self, x: A2<D, T>) -> A2<D, T> {
        let p = self.p;
        self.drop(x, p)
    }

    fn apply_lora<D: Device<f32>, T: Tape<f32, D>>(&mut self, x: A2<D, T>) -> A2<D, T> {
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
}

impl<D: Kernels> Linear<D> {
    fn new(dev: &D, inputs: usize, outputs: usize, std: f32) -> Self {
        Linear {
            weight: dev.sample_normal_like(&(inputs, outputs)) * std,
            bias: dev.zeros_like(&(outputs,)),
            frozen: false,
            lora: None,
            quantized: None,
        }
    }

    /// `x·W + b` and what follows it (GELU, a residual add), fused where the kernels allow.
    fn forward<T: Tape<f32, D>>(
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
    fn dense<'a>(&'a self, weight: &'a P2<D>) -> Dense<'a, D> {
        Dense {
            weight,
            transposed: false,
            bias: Some(&self.bias),
            train: !self.frozen,
        }
    }

    /// The weight as a tensor, dequantized when it is held quantized.
    fn dense_weight(&self) -> P2<D> {
        match &self.quantized {
            Some(q) => self.bias.device().tensor_from_vec(q.dequantize(), q.shape),
            None => self.weight.clone(),
        }
    }

    /// Replaces the weight by its quantized form; returns (bytes now, bytes in f32).
    fn quantize(&mut self, kind: QuantKind, block: usize) -> (usize, usize) {
        let shape = *self.weight.shape();
        let q = Quantized::new(&self.weight.as_vec(), shape, kind, block);
        let sizes = (q.bytes(), 4 * shape.0 * shape.1);
        self.weight = self.bias.device().zeros_like(&(0, 0));
        self.quantized = Some(q);
        sizes
    }

    /// Folds the adapter into a dense, trainable weight.
    fn merge(&mut self) {
        let mut weight = self.dense_weight();
        if let Some(lora) = self.lora.take() {
            weight = weight + lora.delta();
        }
        self.weight = weight;
        self.quantized = None;
        self.frozen = false;
    }

    fn visit<V: ParamVisitor<D>>(&mut self, name: &str, bias: bool, v: &mut V) {
        if self.quantized.is_none() {
            v.visit(&format!("{name}.weight"), &mut self.weight, !self.frozen);
        }
        v.visit(
            &format!("{name}.bias"),
            &mut self.bias,
            bias && !self.frozen,
        );
        if let Some(lora) = &mut self.lora {
            v.visit(&format!("{name}.lora_A"), &mut lora.a, true);
            v.visit(&format!("{name}.lora_B"), &mut lora.b, true);
        }
    }
}

pub struct LayerNorm<D: Device<f32>> {
    pub weight: P1<D>,
    pub bias: P1<D>,
}

impl<D: Kernels> LayerNorm<D> {
    fn new(dev: &D, d: usize) -> Self {
        LayerNorm {
            weight: dev.ones_like(&(d,)),
            bias: dev.zeros_like(&(d,)),
        }
    }

    /// `train`: the weight and bias get gradients.
    fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>, train: bool) -> A2<D, T> {
        D::layer_norm(x, &self.weight, &self.bias, train)
    }

    fn visit<V: ParamVisitor<D>>(&mut self, name: &str, bias: bool, train: bool, v: &mut V) {
        v.visit(&format!("{name}.weight"), &mut self.weight, train);
        v.visit(&format!("{name}.bias"), &mut self.bias, bias && train);
    }
}

pub struct CausalSelfAttention<D: Device<f32>> {
    pub c_attn: Linear<D>,
    pub c_proj: Linear<D>,
}

impl<D: Kernels> CausalSelfAttention<D> {
    /// `residual + attention(x)`; `x` is the normalised `(batch·seq, d)` residual stream.
    fn forward<T: Tape<f32, D>>(
        &self,
        x: A2<D, T>,
        residual: A2<D, T>,
        (batch, heads): (usize, usize),
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        if fusable([&self.c_attn, &self.c_proj], dropout) {
            let (attn, proj) = (self.c_attn.dense_weight(), self.c_proj.dense_weight());
            let (attn, proj) = (self.c_attn.dense(&attn), self.c_proj.dense(&proj));
            return D::attention_block(x, &attn, &proj, residual, (batch, heads));
        }
        let qkv = self.c_attn.forward(x, Epilogue::Plain, dropout);
        let y = D::causal_attention(qkv, batch, heads);
        self.c_proj.forward(y, Epilogue::AddTo(residual), dropout)
    }
}

/// Whether a block's linear layers can run as one op with the block (`Kernels::mlp`,
/// `Kernels::attention_block`): no adapter joins them, no dropout acts between them.
fn fusable<D: Device<f32>>(linears: [&Linear<D>; 2], dropout: &Dropout) -> bool {
    linears.iter().all(|linear| linear.lora.is_none()) && !dropout.is_active()
}

pub struct Mlp<D: Device<f32>> {
    pub c_fc: Linear<D>,
    pub c_proj: Linear<D>,
}

impl<D: Kernels> Mlp<D> {
    /// `residual + mlp(x)`, with GPT-2's "gelu_new" (the tanh approximation).
    fn forward<T: Tape<f32, D>>(
        &self,
        x: A2<D, T>,
        residual: A2<D, T>,
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        if fusable([&self.c_fc, &self.c_proj], dropout) {
            let (fc, proj) = (self.c_fc.dense_weight(), self.c_proj.dense_weight());
            return D::mlp(
                x,
                &self.c_fc.dense(&fc),
                &self.c_proj.dense(&proj),
                residual,
            );
        }
        let h = self.c_fc.forward(x, Epilogue::Gelu, dropout);
        self.c_proj.forward(h, Epilogue::AddTo(residual), dropout)
    }
}

pub struct Block<D: Device<f32>> {
    pub ln_1: LayerNorm<D>,
    pub attn: CausalSelfAttention<D>,
    pub ln_2: LayerNorm<D>,
    pub mlp: Mlp<D>,
}

impl<D: Kernels> Block<D> {
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

    /// `train`: the LayerNorms get gradients.
    fn forward<T: Tape<f32, D>>(
        &self,
        x: A2<D, T>,
        sizes: (usize, usize),
        train: bool,
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        // Each branch starts from an empty tape and merges back into the trunk's at its add.
        let ln_1 = self.ln_1.forward(x.with_empty_tape(), train);
        let x = self.attn.forward(ln_1, x, sizes, dropout);
        let ln_2 = self.ln_2.forward(x.with_empty_tape(), train);
        self.mlp.forward(ln_2, x, dropout)
    }

    /// The block's linear layers, by the name an adapter targets.
    fn linears(&mut self) -> [(LoraTarget, &mut Linear<D>); 4] {
        [
            (LoraTarget::AttnCAttn, &mut self.attn.c_attn),
            (LoraTarget::AttnCProj, &mut self.attn.c_proj),
            (LoraTarget::MlpCFc, &mut self.mlp.c_fc),
            (LoraTarget::MlpCProj, &mut self.mlp.c_proj),
        ]
    }

    fn visit<V: ParamVisitor<D>>(&mut self, name: &str, bias: bool, train: bool, v: &mut V) {
        self.ln_1.visit(&format!("{name}.ln_1"), bias, train, v);
        self.ln_2.visit(&format!("{name}.ln_2"), bias, train, v);
        for (target, linear) in self.linears() {
            linear.visit(&format!("{name}.{}", target.name()), bias, v);
        }
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
    /// Every base weight is held fixed (adapters train instead).
    frozen: bool,
    /// What the linear layers' matrix multiplies compute in.
    pub precision: Precision,
}

impl<D: Kernels> Gpt<D> {
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
            frozen: false,
            precision: Precision::F32,
            config,
        }
    }

    /// Logits `(batch·seq, vocab)` for token ids `(batch, seq)`; the tape rides on the ids.
    pub fn forward<T: Tape<f32, D>>(
        &self,
        ids: Tensor<(usize, usize), usize, D, T>,
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        let _precision = autocast(self.precision);
        D::linear(self.trunk(ids, dropout), &self.head(), Epilogue::Plain)
    }

    /// The log-probability `(batch·seq,)` of each target id after `ids`: the output head and
    /// the log-softmax in one kernel, without the `(batch·seq, vocab)` logits as a tensor.
    pub fn target_log_probs<T: Tape<f32, D>>(
        &self,
        ids: Tensor<(usize, usize), usize, D, T>,
        targets: Tensor<(usize,), usize, D>,
        dropout: &mut Dropout,
    ) -> Tensor<(usize,), f32, D, T> {
        let _precision = autocast(self.precision);
        D::head_log_probs(self.trunk(ids, dropout), &self.head(), targets)
    }

    /// The final hidden states `(batch·seq, d)`, after `ln_f`.
    fn trunk<T: Tape<f32, D>>(
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
        let train = !self.frozen;
        for block in &self.h {
            x = block.forward(x, (batch, self.config.heads), train, dropout);
        }
        self.ln_f.forward(x, train)
    }

    /// The output head: the embedding itself when tied, so both uses add to one gradient.
    fn head(&self) -> Dense<'_, D> {
        let (weight, transposed) = match &self.lm_head {
            None => (&self.wte, true),
            Some(head) => (head, false),
        };
        Dense {
            weight,
            transposed,
            bias: None,
            train: !self.frozen,
        }
    }

    pub fn visit<V: ParamVisitor<D>>(&mut self, v: &mut V) {
        let (bias, train) = (self.config.bias, !self.frozen);
        v.visit("transformer.wte.weight", &mut self.wte, train);
        v.visit("transformer.wpe.weight", &mut self.wpe, train);
        for (i, block) in self.h.iter_mut().enumerate() {
            block.visit(&format!("transformer.h.{i}"), bias, train, v);
        }
        self.ln_f.visit("transformer.ln_f", bias, train, v);
        if let Some(head) = &mut self.lm_head {
            v.visit("lm_head.weight", head, train);
        }
    }

    /// Freezes every base weight and adds a LoRA adapter to each targeted linear layer.
    pub fn add_lora(&mut self, config: &LoraConfig, seed: u64) {
        let dev = self.wte.device().clone();
        self.frozen = true;
        for (i, block) in self.h.iter_mut().enumerate() {
            for (k, (target, linear)) in block.linears().into_iter().enumerate() {
                linear.frozen = true;
                if config.targets.contains(&target) {
                    let (inputs, outputs) = *linear.weight.shape();
                    let seed = seed
                        .wrapping_add(((4 * i + k + 1) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    linear.lora = Some(Lora::new(&dev, inputs, outputs, config, seed));
                }
            }
        }
    }

    /// Stores the frozen linear weights block-quantized; returns (bytes now, bytes in f32).
    pub fn quantize_frozen(&mut self, kind: QuantKind, block: usize) -> (usize, usize) {
        let mut sizes = (0, 0);
        for layer in &mut self.h {
            for (_, linear) in layer.linears() {
                if linear.frozen && linear.quantized.is_none() {
                    let (now, f32_bytes) = linear.quantize(kind, block);
                    sizes = (sizes.0 + now, sizes.1 + f32_bytes);
                }
            }
        }
        sizes
    }

    /// Folds every adapter into its base weight: a plain, fully trainable model again.
    pub fn merge_lora(&mut self) {
        for layer in &mut self.h {
            for (_, linear) in layer.linears() {
                linear.merge();
            }
        }
        self.frozen = false;
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
