//! The kernels as compositions of dfdx ops: the reference for the fused CPU kernels' tests, and
//! what devices without fused kernels run.

use dfdx::prelude::*;

use super::{Dense, Epilogue, LAYER_NORM_EPS};
use crate::model::layers::{A2, P1, P2};
use crate::model::optim::Buffers;

pub fn linear<D: Buffers, T: Tape<f32, D>>(
    x: A2<D, T>,
    dense: &Dense<D>,
    epilogue: Epilogue<D, T>,
) -> A2<D, T> {
    let weight = if dense.transposed {
        dense.weight.clone().permute::<_, Axes2<1, 0>>()
    } else {
        dense.weight.clone()
    };
    let mut y = if dense.train {
        x.matmul(weight.retaped::<T>())
    } else {
        frozen_matmul(x, weight)
    };
    if let Some(bias) = dense.bias {
        let shape = *y.shape();
        y = y + bias.retaped::<T>().broadcast_like::<_, Axis<0>>(&shape);
    }
    match epilogue {
        Epilogue::Plain => y,
        Epilogue::Gelu => y.fast_gelu(),
        Epilogue::AddTo(residual) => residual + y,
    }
}

pub fn layer_norm<D: Device<f32>, T: Tape<f32, D>>(
    x: A2<D, T>,
    weight: &P1<D>,
    bias: &P1<D>,
) -> A2<D, T> {
    let shape = *x.shape();
    x.normalize::<Axis<1>>(LAYER_NORM_EPS)
        * weight.retaped::<T>().broadcast_like::<_, Axis<0>>(&shape)
        + bias.retaped::<T>().broadcast_like::<_, Axis<0>>(&shape)
}

pub fn causal_attention<D: Device<f32>, T: Tape<f32, D>>(
    qkv: A2<D, T>,
    batch: usize,
    heads: usize,
) -> A2<D, T> {
    let (n, width) = *qkv.shape();
    let (seq, d) = (n / batch, width / 3);
    let head = d / heads;
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
    let causal = q
        .device()
        .upper_tri_like(&(seq, seq), f32::NEG_INFINITY, 1)
        .broadcast_like::<_, Axes2<0, 1>>(&(batch, heads, seq, seq));
    let attention = (q.matmul(k) * (1.0 / (head as f32).sqrt()) + causal).softmax::<Axis<3>>();
    attention
        .matmul(v)
        .permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(n, d))
}

pub fn head_log_probs<D: Buffers, T: Tape<f32, D>>(
    x: A2<D, T>,
    head: &Dense<D>,
    targets: Tensor<(usize,), usize, D>,
) -> Tensor<(usize,), f32, D, T> {
    linear(x, head, Epilogue::Plain)
        .log_softmax::<Axis<1>>()
        .select(targets)
}

/// `x·w` for a frozen `w`: the backward pass gives `x` its gradient and skips `w`'s, the
/// weight-gradient GEMM that dfdx's matmul would always run.
pub fn frozen_matmul<D: Buffers, T: Tape<f32, D>>(x: A2<D, T>, w: P2<D>) -> A2<D, T> {
    let (x, mut tape) = x.split_tape();
    let y = x.clone().matmul(w.clone());
    let (device, x, out) = (x.device().clone(), x.ghost(), y.ghost());
    tape.add_backward_op(move |grads| {
        let grad_out = grads.get(&out);
        let grad_x = grad_out.matmul(w.permute::<_, Axes2<1, 0>>()).as_vec();
        device.add_host(grads.get_or_alloc_mut(&x)?, &grad_x);
        Ok(())
    });
    y.put_tape(tape)
}
