//! GPT-2, the way nanoGPT's model.py writes it, on dfdx tensors with sizes chosen at run time.
//!
//! dfdx's own `nn` modules have compile-time sizes and its attention has no mask, so the modules
//! here are small structs of plain tensors. Every parameter is reported to a [`ParamVisitor`]
//! under its Hugging Face GPT-2 name; the optimizer, checkpoints and export are built on that.
//! Linear weights are stored `(in, out)`, as GPT-2's Conv1D stores them.

use dfdx::prelude::*;

use super::kernels::{autocast, Dense, Epilogue, Kernels, Precision};
use super::layers::{
    add_adapters, count_trainable, fusable, quantize_frozen, Dropout, Linear, ParamVisitor, Visit,
    A2, P1, P2,
};
use super::lora::{LoraConfig, LoraTarget};
use super::quant::QuantKind;
use super::GptConfig;

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
            linear.visit(&format!("{name}.{}", target.path()), bias, v);
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

    /// Freezes every base weight and adds a LoRA adapter to each targeted linear layer.
    pub fn add_lora(&mut self, config: &LoraConfig, seed: u64) {
        let dev = self.wte.device().clone();
        self.frozen = true;
        add_adapters(&dev, self.linears(), config, seed);
    }

    /// Every block's linear layers, block by block.
    fn linears(&mut self) -> impl Iterator<Item = (LoraTarget, &mut Linear<D>)> {
        self.h.iter_mut().flat_map(|block| block.linears())
    }

    /// Stores the frozen linear weights block-quantized; returns (bytes now, bytes in f32).
    pub fn quantize_frozen(&mut self, kind: QuantKind, block: usize) -> (usize, usize) {
        quantize_frozen(self.linears().map(|(_, l)| l), kind, block)
    }

    /// Folds every adapter into its base weight: a plain, fully trainable model again.
    pub fn merge_lora(&mut self) {
        self.linears().for_each(|(_, linear)| linear.merge());
        self.frozen = false;
    }

    /// Trainable parameters.
    pub fn parameters(&mut self) -> usize {
        count_trainable(self)
    }
}

impl<D: Kernels> Visit<D> for Gpt<D> {
    fn visit<V: ParamVisitor<D>>(&mut self, v: &mut V) {
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

    /// Conv1D weights are `(in, out)` in HF's files too; only the untied head is an `nn.Linear`.
    fn hf_transposed(&self) -> fn(&str) -> bool {
        |name| name == "lm_head.weight"
    }
}
