//! The Llama family — Llama 2/3, Mistral, Qwen2, SmolLM2 — as transformers' modeling_llama.py
//! computes it, on dfdx tensors with sizes from the model's config.json.
//!
//! ```text
//! h = embed_tokens[ids]
//! for each layer:
//!     a = rms_norm(h) ; q, k, v = a·Wq (+bq), a·Wk (+bk), a·Wv (+bv)
//!     q, k = rope(q), rope(k)                    # rotate_half pairs j with j + head_dim/2
//!     h = h + softmax(q·kᵀ/√head_dim + causal mask)·v ·Wo   # kv head g serves q heads g·r…g·r+r−1
//!     m = rms_norm(h) ; h = h + (silu(m·Wgate) ⊙ m·Wup)·Wdown
//! logits = rms_norm(h)·Wlm                        # Wlm = embed_tokensᵀ when tied
//! ```
//!
//! Linear weights are held `(in, out)` like GPT-2's and every other linear layer here; HF stores
//! `nn.Linear` weights `(out, in)`, so loading and saving transpose them ([`Visit::hf_transposed`]).

use dfdx::prelude::*;

use super::kernels::{autocast, Dense, Epilogue, Kernels, Precision};
use super::layers::{
    add_adapters, count_trainable, quantize_frozen, Dropout, Linear, ParamVisitor, Visit, A2, P1,
    P2,
};
use super::lora::{LoraConfig, LoraTarget};
use super::quant::QuantKind;

/// The sizes and options of a Llama-family model: transformers' `LlamaConfig` fields (Mistral's
/// and Qwen2's are the same names with other defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Which transformers class the checkpoint is (kept, so a saved model loads as the same).
    pub member: Member,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// q, k and v have biases (Llama's `attention_bias`, always in Qwen2).
    pub attention_bias: bool,
    /// o_proj has a bias (Llama's `attention_bias`; never in Qwen2).
    pub output_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Each position attends to at most this many positions, itself included (Mistral v0.1,
    /// Qwen2 with `use_sliding_window`), in the layers from `first_window_layer` on.
    pub sliding_window: Option<usize>,
    pub first_window_layer: usize,
}

/// The family members transformers has a class for; their configs share the fields above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Member {
    Llama,
    Mistral,
    Qwen2,
}

impl Member {
    /// `model_type` and the class in config.json.
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            Member::Llama => ("llama", "LlamaForCausalLM"),
            Member::Mistral => ("mistral", "MistralForCausalLM"),
            Member::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        }
    }
}

/// How the rotary frequencies are stretched for contexts longer than the pretraining one.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.1's: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl LlamaConfig {
    pub fn check(&self) -> Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.layers),
            ("num_attention_heads", self.heads),
            ("num_key_value_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, n)| *n == 0) {
            return Err(format!("`{name}` must be at least 1"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "{} attention heads, {} key/value heads and a head_dim of {}: the heads must be \
                 a multiple of the key/value heads, head_dim even",
                self.heads, self.kv_heads, self.head_dim
            ));
        }
        Ok(())
    }

    /// The weights of the embeddings and linear layers (norms and biases aside), or `None`
    /// when too many to count in a usize.
    pub fn checked_weights(&self) -> Option<usize> {
        let h = self.hidden_size;
        let q = self.heads.checked_mul(self.head_dim)?;
        let kv = self.kv_heads.checked_mul(self.head_dim)?;
        let attention = h.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        let mlp = h.checked_mul(self.intermediate_size)?.checked_mul(3)?;
        let layers = self.layers.checked_mul(attention.checked_add(mlp)?)?;
        let tables = match self.tie_word_embeddings {
            true => 1,
            false => 2,
        };
        let embeddings = self.vocab_size.checked_mul(h)?.checked_mul(tables)?;
        layers.checked_add(embeddings)
    }

    /// The rotary inverse frequencies, one per pair of a head's dimensions.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old,
            }) => base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old / high {
                        f
                    } else if wavelen > old / low {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect(),
        }
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + ε) · weight`, no centring and no bias.
pub struct RmsNorm<D: Device<f32>> {
    pub weight: P1<D>,
}

impl<D: Kernels> RmsNorm<D> {
    fn new(dev: &D, d: usize) -> Self {
        RmsNorm {
            weight: dev.ones_like(&(d,)),
        }
    }

    fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>, eps: f32) -> A2<D, T> {
        let shape = *x.shape();
        let inverse_rms = (x.with_empty_tape().square().mean::<(usize,), Axis<1>>() + eps)
            .sqrt()
            .recip()
            .broadcast_like::<_, Axis<1>>(&shape);
        x * inverse_rms
            * self
                .weight
                .retaped::<T>()
                .broadcast_like::<_, Axis<0>>(&shape)
    }
}

/// The rotary position tables of one forward pass (`seq` positions from `start`): `cos` and
/// `sin` per position and dimension of a head, and rotate_half as a signed permutation matrix.
struct Rope<D: Device<f32>> {
    cos: P2<D>,
    sin: P2<D>,
    rotate_half: P2<D>,
}

impl<D: Kernels> Rope<D> {
    fn new(dev: &D, config: &LlamaConfig, seq: usize, start: usize) -> Self {
        let d = config.head_dim;
        let inv_freq = config.inv_freq();
        let (mut cos, mut sin) = (Vec::with_capacity(seq * d), Vec::with_capacity(seq * d));
        for t in start..start + seq {
            for j in 0..d {
                // HF's `emb = cat(freqs, freqs)`: dimension j and j + d/2 share a frequency.
                let angle = t as f64 * inv_freq[j % (d / 2)];
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        // rotate_half(x) = cat(−x[d/2:], x[:d/2]) = x·R.
        let mut rotate = vec![0.0f32; d * d];
        for j in 0..d / 2 {
            rotate[(j + d / 2) * d + j] = -1.0;
            rotate[j * d + j + d / 2] = 1.0;
        }
        Rope {
            cos: dev.tensor_from_vec(cos, (seq, d)),
            sin: dev.tensor_from_vec(sin, (seq, d)),
            rotate_half: dev.tensor_from_vec(rotate, (d, d)),
        }
    }

    /// `x·cos + rotate_half(x)·sin` for `x` as `(batch, seq, heads, head_dim)`.
    fn apply<T: Tape<f32, D>>(&self, x: A4<D, T>) -> A4<D, T> {
        let shape = *x.shape();
        let (batch, seq, heads, d) = shape;
        let rotated = x
            .with_empty_tape()
            .reshape_like(&(batch * seq * heads, d))
            .matmul(self.rotate_half.clone())
            .reshape_like(&shape);
        let cos = self.cos.clone().broadcast_like::<_, Axes2<0, 2>>(&shape);
        let sin = self.sin.clone().broadcast_like::<_, Axes2<0, 2>>(&shape);
        x * cos + rotated * sin
    }
}

/// What every layer of one forward pass shares.
struct Context<'a, D: Device<f32>> {
    config: &'a LlamaConfig,
    rope: &'a Rope<D>,
    batch: usize,
    /// This layer's sliding window.
    window: Option<usize>,
}

impl<D: Device<f32>> Clone for Context<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D: Device<f32>> Copy for Context<'_, D> {}

/// The keys (after rotation) and values one layer has seen, `(batch, kv_heads, positions,
/// head_dim)` on the host, so that generating a token runs the model on that token alone.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    positions: usize,
}

/// A layer's keys and values: this pass's after the cache's, which then holds them all.
fn extend_cache<D: Kernels, T: Tape<f32, D>>(
    cache: Option<&mut LayerCache>,
    (k, v): (A4<D, T>, A4<D, T>),
) -> (A4<D, T>, A4<D, T>, usize) {
    let Some(cache) = cache else {
        return (k, v, 0);
    };
    let past = cache.positions;
    let (batch, kv_heads, seq, d) = *k.shape();
    let (k, v) = match past {
        0 => (k, v),
        _ => {
            let dev = k.device().clone();
            let shape = (batch, kv_heads, past, d);
            let keys = dev.tensor_from_vec(std::mem::take(&mut cache.keys), shape);
            let values = dev.tensor_from_vec(std::mem::take(&mut cache.values), shape);
            (
                (keys.retaped::<T>(), k).concat_along(Axis::<2>),
                (values.retaped::<T>(), v).concat_along(Axis::<2>),
            )
        }
    };
    cache.keys = k.as_vec();
    cache.values = v.as_vec();
    cache.positions = past + seq;
    (k, v, past)
}

/// Every layer's [`LayerCache`]: what generation keeps between steps.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// The positions seen so far.
    pub fn positions(&self) -> usize {
        self.layers.first().map_or(0, |l| l.positions)
    }
}

/// Activations `(batch, seq, heads, head_dim)` and the like.
type A4<D, T> = Tensor<(usize, usize, usize, usize), f32, D, T>;

pub struct Attention<D: Device<f32>> {
    pub q_proj: Linear<D>,
    pub k_proj: Linear<D>,
    pub v_proj: Linear<D>,
    pub o_proj: Linear<D>,
}

impl<D: Kernels> Attention<D> {
    fn new(dev: &D, config: &LlamaConfig) -> Self {
        let (h, d) = (config.hidden_size, config.head_dim);
        let (q, kv) = (config.heads * d, config.kv_heads * d);
        let projection = |inputs, outputs, bias: bool| match bias {
            true => Linear::new(dev, inputs, outputs, 0.02),
            false => Linear::without_bias(dev, inputs, outputs, 0.02),
        };
        Attention {
            q_proj: projection(h, q, config.attention_bias),
            k_proj: projection(h, kv, config.attention_bias),
            v_proj: projection(h, kv, config.attention_bias),
            o_proj: projection(q, h, config.output_bias),
        }
    }

    /// `residual + attention(x)`; `x` is the normalised `(batch·seq, hidden)` residual stream.
    /// With a cache, the keys and values of the positions before attend too.
    fn forward<T: Tape<f32, D>>(
        &self,
        x: A2<D, T>,
        residual: A2<D, T>,
        (context, cache): (&Context<D>, Option<&mut LayerCache>),
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        let Context {
            config,
            rope,
            batch,
            window,
        } = *context;
        let (n, _) = *x.shape();
        let seq = n / batch;
        let (heads, kv_heads, d) = (config.heads, config.kv_heads, config.head_dim);
        let q = self
            .q_proj
            .forward(x.with_empty_tape(), Epilogue::Plain, dropout);
        let k = self
            .k_proj
            .forward(x.with_empty_tape(), Epilogue::Plain, dropout);
        let v = self.v_proj.forward(x, Epilogue::Plain, dropout);
        let q = rope
            .apply(q.reshape_like(&(batch, seq, heads, d)))
            .permute::<_, Axes4<0, 2, 1, 3>>();
        let k = rope
            .apply(k.reshape_like(&(batch, seq, kv_heads, d)))
            .permute::<_, Axes4<0, 2, 1, 3>>();
        let v = v
            .reshape_like(&(batch, seq, kv_heads, d))
            .permute::<_, Axes4<0, 2, 1, 3>>();
        let (k, v, past) = extend_cache(cache, (k, v));
        let keys = past + seq;
        // Grouped-query attention: each k/v head is repeated for the `heads / kv_heads` query
        // heads it serves, as transformers' repeat_kv does.
        let repeat = |t: A4<D, T>| -> A4<D, T> {
            let groups = heads / kv_heads;
            t.broadcast_like::<_, Axis<2>>(&(batch, kv_heads, groups, keys, d))
                .reshape_like(&(batch, heads, keys, d))
        };
        let k = repeat(k).permute::<_, Axes4<0, 1, 3, 2>>();
        let v = repeat(v);
        let mask = causal_mask(q.device(), (seq, keys), window)
            .broadcast_like::<_, Axes2<0, 1>>(&(batch, heads, seq, keys));
        let scale = 1.0 / (d as f32).sqrt();
        let weights = (q.matmul(k) * scale + mask).softmax::<Axis<3>>();
        let y = weights
            .matmul(v)
            .permute::<_, Axes4<0, 2, 1, 3>>()
            .reshape_like(&(n, heads * d));
        self.o_proj.forward(y, Epilogue::AddTo(residual), dropout)
    }
}

/// `(queries, keys)`: 0 where a query may see a key, −∞ elsewhere. The queries are the last
/// positions: query i is at position p = keys − queries + i, and sees key j when j ≤ p and
/// p − j < window.
fn causal_mask<D: Kernels>(
    dev: &D,
    (queries, keys): (usize, usize),
    window: Option<usize>,
) -> P2<D> {
    let window = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (keys - queries..keys)
        .flat_map(|p| {
            (0..keys).map(move |j| match j <= p && p - j < window {
                true => 0.0,
                false => f32::NEG_INFINITY,
            })
        })
        .collect();
    dev.tensor_from_vec(mask, (queries, keys))
}

/// SwiGLU: `down(silu(gate(x)) ⊙ up(x))`.
pub struct Mlp<D: Device<f32>> {
    pub gate_proj: Linear<D>,
    pub up_proj: Linear<D>,
    pub down_proj: Linear<D>,
}

impl<D: Kernels> Mlp<D> {
    fn new(dev: &D, config: &LlamaConfig) -> Self {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let linear = |inputs, outputs| match config.mlp_bias {
            true => Linear::new(dev, inputs, outputs, 0.02),
            false => Linear::without_bias(dev, inputs, outputs, 0.02),
        };
        Mlp {
            gate_proj: linear(h, i),
            up_proj: linear(h, i),
            down_proj: linear(i, h),
        }
    }

    /// `residual + mlp(x)`.
    fn forward<T: Tape<f32, D>>(
        &self,
        x: A2<D, T>,
        residual: A2<D, T>,
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        let gate = self
            .gate_proj
            .forward(x.with_empty_tape(), Epilogue::Plain, dropout);
        let up = self.up_proj.forward(x, Epilogue::Plain, dropout);
        let silu = gate.with_empty_tape().sigmoid() * gate;
        self.down_proj
            .forward(silu * up, Epilogue::AddTo(residual), dropout)
    }
}

pub struct DecoderLayer<D: Device<f32>> {
    pub input_layernorm: RmsNorm<D>,
    pub self_attn: Attention<D>,
    pub post_attention_layernorm: RmsNorm<D>,
    pub mlp: Mlp<D>,
}

impl<D: Kernels> DecoderLayer<D> {
    fn new(dev: &D, config: &LlamaConfig) -> Self {
        DecoderLayer {
            input_layernorm: RmsNorm::new(dev, config.hidden_size),
            self_attn: Attention::new(dev, config),
            post_attention_layernorm: RmsNorm::new(dev, config.hidden_size),
            mlp: Mlp::new(dev, config),
        }
    }

    fn forward<T: Tape<f32, D>>(
        &self,
        x: A2<D, T>,
        context: (&Context<D>, Option<&mut LayerCache>),
        dropout: &mut Dropout,
    ) -> A2<D, T> {
        let eps = context.0.config.rms_norm_eps as f32;
        // Each branch starts from an empty tape and merges back into the trunk's at its add.
        let a = self.input_layernorm.forward(x.with_empty_tape(), eps);
        let x = self.self_attn.forward(a, x, context, dropout);
        let m = self
            .post_attention_layernorm
            .forward(x.with_empty_tape(), eps);
        self.mlp.forward(m, x, dropout)
    }

    /// The layer's linear layers, by the name an adapter targets.
    fn linears(&mut self) -> [(LoraTarget, &mut Linear<D>); 7] {
        let (attention, mlp) = (&mut self.self_attn, &mut self.mlp);
        [
            (LoraTarget::QProj, &mut attention.q_proj),
            (LoraTarget::KProj, &mut attention.k_proj),
            (LoraTarget::VProj, &mut attention.v_proj),
            (LoraTarget::OProj, &mut attention.o_proj),
            (LoraTarget::GateProj, &mut mlp.gate_proj),
            (LoraTarget::UpProj, &mut mlp.up_proj),
            (LoraTarget::DownProj, &mut mlp.down_proj),
        ]
    }

    fn visit<V: ParamVisitor<D>>(&mut self, name: &str, train: bool, v: &mut V) {
        v.visit(
            &format!("{name}.input_layernorm.weight"),
            &mut self.input_layernorm.weight,
            train,
        );
        v.visit(
            &format!("{name}.post_attention_layernorm.weight"),
            &mut self.post_attention_layernorm.weight,
            train,
        );
        for (target, linear) in self.linears() {
            linear.visit(&format!("{name}.{}", target.path()), true, v);
        }
    }
}

pub struct Llama<D: Device<f32>> {
    pub config: LlamaConfig,
    /// `(vocab, hidden)`; also the output head when tied.
    pub embed_tokens: P2<D>,
    pub layers: Vec<DecoderLayer<D>>,
    pub norm: RmsNorm<D>,
    /// The output head `(hidden, vocab)` when untied (HF: `lm_head.weight`, `(vocab, hidden)`).
    pub lm_head: Option<P2<D>>,
    /// Every base weight is held fixed (adapters train instead).
    pub frozen: bool,
    pub precision: Precision,
}

impl<D: Kernels> Llama<D> {
    /// A model with fresh weights (normal, σ = 0.02, as transformers initialises it).
    pub fn new(dev: &D, config: LlamaConfig) -> Self {
        let (vocab, h) = (config.vocab_size, config.hidden_size);
        Llama {
            embed_tokens: dev.sample_normal_like(&(vocab, h)) * 0.02,
            layers: (0..config.layers)
                .map(|_| DecoderLayer::new(dev, &config))
                .collect(),
            norm: RmsNorm::new(dev, h),
            lm_head: (!config.tie_word_embeddings)
                .then(|| dev.sample_normal_like(&(h, vocab)) * 0.02),
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
        D::linear(
            self.trunk(ids, dropout, None),
            &self.head(),
            Epilogue::Plain,
        )
    }

    /// The log-probability `(batch·seq,)` of each target id after `ids`.
    pub fn target_log_probs<T: Tape<f32, D>>(
        &self,
        ids: Tensor<(usize, usize), usize, D, T>,
        targets: Tensor<(usize,), usize, D>,
        dropout: &mut Dropout,
    ) -> Tensor<(usize,), f32, D, T> {
        let _precision = autocast(self.precision);
        D::head_log_probs(self.trunk(ids, dropout, None), &self.head(), targets)
    }

    /// Logits `(batch·seq, vocab)` for ids `(batch, seq)` that follow the positions `cache`
    /// holds (none at first); the cache then holds these too. Generation feeds the prompt,
    /// then one token at a time: each step runs the model on that token alone.
    pub fn decode(&self, ids: Tensor<(usize, usize), usize, D>, cache: &mut KvCache) -> P2<D> {
        let _precision = autocast(self.precision);
        let trunk = self.trunk(ids, &mut Dropout::off(), Some(cache));
        D::linear(trunk, &self.head(), Epilogue::Plain)
    }

    /// The final hidden states `(batch·seq, hidden)`, after `norm`.
    fn trunk<T: Tape<f32, D>>(
        &self,
        ids: Tensor<(usize, usize), usize, D, T>,
        dropout: &mut Dropout,
        mut cache: Option<&mut KvCache>,
    ) -> A2<D, T> {
        let (batch, seq) = *ids.shape();
        let h = self.config.hidden_size;
        let (ids, tape) = ids.split_tape();
        let tokens: Tensor<(usize, usize, usize), f32, D, T> =
            self.embed_tokens.clone().put_tape(tape).gather(ids);
        let mut x = dropout.apply(tokens.reshape_like(&(batch * seq, h)));
        if let Some(cache) = cache.as_deref_mut() {
            cache
                .layers
                .resize_with(self.layers.len(), LayerCache::default);
        }
        let start = cache.as_ref().map_or(0, |c| c.positions());
        let rope = Rope::new(x.device(), &self.config, seq, start);
        for (i, layer) in self.layers.iter().enumerate() {
            let window = self
                .config
                .sliding_window
                .filter(|_| i >= self.config.first_window_layer);
            let context = Context {
                config: &self.config,
                rope: &rope,
                batch,
                window,
            };
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, (&context, layer_cache), dropout);
        }
        self.norm.forward(x, self.config.rms_norm_eps as f32)
    }

    /// Freezes every base weight and adds a LoRA adapter to each targeted linear layer.
    pub fn add_lora(&mut self, config: &LoraConfig, seed: u64) {
        let dev = self.embed_tokens.device().clone();
        self.frozen = true;
        add_adapters(&dev, self.linears(), config, seed);
    }

    /// Every layer's linear layers, layer by layer.
    fn linears(&mut self) -> impl Iterator<Item = (LoraTarget, &mut Linear<D>)> {
        self.layers.iter_mut().flat_map(|layer| layer.linears())
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

    /// The output head: the embedding itself when tied, so both uses add to one gradient.
    fn head(&self) -> Dense<'_, D> {
        let (weight, transposed) = match &self.lm_head {
            None => (&self.embed_tokens, true),
            Some(head) => (head, false),
        };
        Dense {
            weight,
            transposed,
            bias: None,
            train: !self.frozen,
        }
    }
}

impl<D: Kernels> Visit<D> for Llama<D> {
    fn visit<V: ParamVisitor<D>>(&mut self, v: &mut V) {
        let train = !self.frozen;
        v.visit("model.embed_tokens.weight", &mut self.embed_tokens, train);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.visit(&format!("model.layers.{i}"), train, v);
        }
        v.visit("model.norm.weight", &mut self.norm.weight, train);
        if let Some(head) = &mut self.lm_head {
            v.visit("lm_head.weight", head, train);
        }
    }

    fn hf_transposed(&self) -> fn(&str) -> bool {
        |name| name == "lm_head.weight" || name.ends_with("_proj.weight")
    }
}
