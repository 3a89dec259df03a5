//! The model's heavy operations, one implementation per device behind [`Kernels`].
//!
//! dfdx builds each of these from many small ops, most of them single-threaded on the CPU
//! (broadcasts, softmax, scalar `tanhf` in GELU), with a gradient buffer per intermediate. The
//! CPU implementation (`cpu.rs`) runs each as one fused, vectorised, multithreaded kernel with
//! its backward pass registered on dfdx's tape. `composed.rs` is the same maths as plain dfdx
//! ops: the reference the fused kernels are tested against, and the CUDA implementation until
//! fused CUDA kernels exist (they need tensors' device memory, which dfdx 0.13 keeps private).
//! The optimizer's kernels work on gradient buffers, which dfdx does lend: `adamw.rs` on the CPU,
//! `cuda.rs` on the GPU.

// `simd_fn!`, for the CPU kernels.
#[macro_use]
mod simd;

pub mod adamw;
mod bf16;
// The reference for tests, and what devices without fused kernels run.
#[cfg(any(test, feature = "cuda"))]
mod composed;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod tiles;

pub use bf16::uses_amx;
pub use cpu::forget_outputs;
pub(super) use cpu::GradBuffer;

use std::cell::Cell;
use std::marker::PhantomData;

use dfdx::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::layers::{A2, P1, P2};
use super::optim::Buffers;

/// LayerNorm's ε (GPT-2's).
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// The number format the linear layers' matrix multiplies compute in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Inputs rounded to bf16, products summed in f32 (on AMX tiles where the CPU has them);
    /// weights, gradients, optimizer state, LoRA adapters' low-rank products and every other
    /// op stay f32. CPU only.
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
}

thread_local! {
    static PRECISION: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs this thread's forward kernels in `precision` until the guard drops (as PyTorch's
/// autocast does). A kernel's backward pass computes in the precision its forward pass had.
pub fn autocast(precision: Precision) -> Autocast {
    Autocast(PRECISION.replace(precision), PhantomData)
}

/// Restores the precision from before [`autocast`] when dropped; not `Send`, since it
/// restores the setting of the thread that made it.
pub struct Autocast(Precision, PhantomData<*const ()>);

impl Drop for Autocast {
    fn drop(&mut self) {
        PRECISION.set(self.0);
    }
}

/// The precision forward kernels on this thread compute in.
fn precision() -> Precision {
    PRECISION.get()
}

/// A linear layer's parameters as a kernel sees them.
pub struct Dense<'a, D: Device<f32>> {
    /// `(in, out)`, or `(out, in)` when `transposed`.
    pub weight: &'a P2<D>,
    /// The weight is stored `(out, in)`: the tied output head reads the `(vocab, d)` embedding.
    pub transposed: bool,
    pub bias: Option<&'a P1<D>>,
    /// Whether the weight and bias get gradients (false for frozen base weights under LoRA).
    pub train: bool,
}

/// What happens to a linear layer's output inside the same kernel.
pub enum Epilogue<D: Device<f32>, T> {
    /// Nothing: `x·W + b`.
    Plain,
    /// GPT-2's tanh GELU: `gelu(x·W + b)`.
    Gelu,
    /// The residual add: `r + x·W + b`.
    AddTo(A2<D, T>),
}

/// The fused operations of the GPT forward pass; each records its own backward on the tape.
pub trait Kernels: Buffers {
    /// A linear layer on `(tokens, in)` activations, with its epilogue.
    fn linear<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        dense: &Dense<Self>,
        epilogue: Epilogue<Self, T>,
    ) -> A2<Self, T>;

    /// GPT-2's MLP with its residual add, `residual + gelu(x·W₁ + b₁)·W₂ + b₂`. By default two
    /// linear layers; a device may keep the hidden activation and its gradient inside one op.
    fn mlp<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        fc: &Dense<Self>,
        proj: &Dense<Self>,
        residual: A2<Self, T>,
    ) -> A2<Self, T> {
        let hidden = Self::linear(x, fc, Epilogue::Gelu);
        Self::linear(hidden, proj, Epilogue::AddTo(residual))
    }

    /// GPT-2's tanh GELU on its own (where an adapter's output joins before it).
    fn gelu<T: Tape<f32, Self>>(x: A2<Self, T>) -> A2<Self, T>;

    /// LayerNorm over the rows of `x` (ε = [`LAYER_NORM_EPS`]); `train`: weight and bias get
    /// gradients.
    fn layer_norm<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        weight: &P1<Self>,
        bias: &P1<Self>,
        train: bool,
    ) -> A2<Self, T>;

    /// Causal multi-head self-attention: `qkv` is `(batch·seq, 3·d)` with q, k and v side by
    /// side (GPT-2's `c_attn` output); returns the heads' outputs `(batch·seq, d)`.
    fn causal_attention<T: Tape<f32, Self>>(
        qkv: A2<Self, T>,
        batch: usize,
        heads: usize,
    ) -> A2<Self, T>;

    /// GPT-2's attention with its residual add, `residual + c_proj(attention(c_attn(x)))`. By
    /// default three ops; a device may keep q, k, v and the heads' outputs (and their
    /// gradients) inside one.
    fn attention_block<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        c_attn: &Dense<Self>,
        c_proj: &Dense<Self>,
        residual: A2<Self, T>,
        (batch, heads): (usize, usize),
    ) -> A2<Self, T> {
        let qkv = Self::linear(x, c_attn, Epilogue::Plain);
        let y = Self::causal_attention(qkv, batch, heads);
        Self::linear(y, c_proj, Epilogue::AddTo(residual))
    }

    /// The log-probability `(n,)` of each target id under the logits `x·W` of the output head
    /// (`x` `(n, d)`), without materialising the `(n, vocab)` logits as a tensor.
    fn head_log_probs<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        head: &Dense<Self>,
        targets: Tensor<(usize,), usize, Self>,
    ) -> Tensor<(usize,), f32, Self, T>;
}

/// Until fused CUDA kernels are written, the GPU runs the dfdx composition (its own CUDA
/// kernels), which is correct but unfused.
#[cfg(feature = "cuda")]
impl Kernels for Cuda {
    fn linear<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        dense: &Dense<Self>,
        epilogue: Epilogue<Self, T>,
    ) -> A2<Self, T> {
        composed::linear(x, dense, epilogue)
    }

    fn gelu<T: Tape<f32, Self>>(x: A2<Self, T>) -> A2<Self, T> {
        x.fast_gelu()
    }

    fn layer_norm<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        weight: &P1<Self>,
        bias: &P1<Self>,
        _train: bool,
    ) -> A2<Self, T> {
        composed::layer_norm(x, weight, bias)
    }

    fn causal_attention<T: Tape<f32, Self>>(
        qkv: A2<Self, T>,
        batch: usize,
        heads: usize,
    ) -> A2<Self, T> {
        composed::causal_attention(qkv, batch, heads)
    }

    fn head_log_probs<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        head: &Dense<Self>,
        targets: Tensor<(usize,), usize, Self>,
    ) -> Tensor<(usize,), f32, Self, T> {
        composed::head_log_probs(x, head, targets)
    }
}

#[cfg(test)]
mod tests;
