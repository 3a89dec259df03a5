//! Fused CPU kernels. Each op reads its inputs once, computes its output in one pass (rows in
//! parallel with rayon, loops vectorised for AVX-512 or AVX2 when the CPU has them, GEMMs from
//! the `gemm` crate) and registers one backward closure on dfdx's tape that writes straight into
//! the gradient buffers.
//!
//! Work is cut into tasks of a fixed number of rows and partial sums are added in task order,
//! so results do not depend on the number of threads: a resumed run repeats a step bit for bit.

use std::mem::MaybeUninit;

use dfdx::prelude::*;
use rayon::prelude::*;

use super::tiles::{self, Operand};
use super::{bf16, Dense, Epilogue, Kernels, Precision, LAYER_NORM_EPS};
use crate::model::layers::{A2, P1, P2};

/// A gradient buffer held by address: an op reads its output's gradient while it writes its
/// inputs', two entries of one map (and the optimizer holds a parameter's buffers from several
/// maps until its deferred update runs). The buffers' heap storage does not move while a map
/// gains entries, and every op's tensors have distinct ids, so the slices never alias.
pub(in crate::model) struct GradBuffer(*mut f32, usize);

impl GradBuffer {
    pub(in crate::model) fn new(buffer: &mut [f32]) -> Self {
        GradBuffer(buffer.as_mut_ptr(), buffer.len())
    }

    /// # Safety
    /// The entry must stay in the map, and no `&mut` to the same buffer may be alive.
    unsafe fn read<'a>(&self) -> &'a [f32] {
        std::slice::from_raw_parts(self.0, self.1)
    }

    /// # Safety
    /// As for `read`, and no other reference to the buffer may be alive.
    pub(in crate::model) unsafe fn write<'a>(&self) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0, self.1)
    }
}

/// Checks that the gradient buffers an op holds at once are distinct, i.e. that its tensors are:
/// the safety of `GradBuffer`'s slices rests on it.
fn assert_distinct(buffers: &[&GradBuffer]) {
    for (i, a) in buffers.iter().enumerate() {
        for b in &buffers[i + 1..] {
            assert!(a.1 == 0 || a.0 != b.0, "an op's tensors must be distinct");
        }
    }
}

/// The gradient buffer of a tensor (ghost), allocated zeroed when missing.
macro_rules! grad_buffer {
    ($grads:expr, $tensor:expr) => {{
        let buffer: &mut Vec<f32> = $grads.get_or_alloc_mut(&$tensor)?;
        GradBuffer::new(buffer)
    }};
}

/// The ghosts of a layer's weight and bias when it trains (`Some((weight, bias))`).
macro_rules! trained_ghosts {
    ($dense:expr) => {
        $dense
            .train
            .then(|| ($dense.weight.ghost(), $dense.bias.map(|b| b.ghost())))
    };
}

/// The gradient buffers of a layer's weight and bias, from its `trained_ghosts!`.
macro_rules! layer_grads {
    ($grads:expr, $params:expr) => {
        match &$params {
            Some((weight, bias)) => {
                let bias = match bias {
                    Some(bias) => Some(grad_buffer!($grads, *bias)),
                    None => None,
                };
                Some((grad_buffer!($grads, *weight), bias))
            }
            None => None,
        }
    };
}

/// The ghosts a two-layer block with a residual add (`first`, then `second` and the add)
/// needs for its backward pass: its input's, the residual's and its output's, and each
/// layer's weight and bias when it trains.
macro_rules! block_ghosts {
    ($x:expr, $residual:expr, $out:expr, $first:expr, $second:expr) => {{
        let ends = ($x.ghost(), $residual.ghost(), $out.ghost());
        (ends, trained_ghosts!($first), trained_ghosts!($second))
    }};
}

/// The [`BlockGrads`] for the ghosts of `block_ghosts!`, checked distinct.
macro_rules! block_grads {
    ($grads:expr, $ghosts:expr) => {{
        let ((x, residual, out), first, second) = &$ghosts;
        let grads = BlockGrads {
            out: grad_buffer!($grads, *out),
            x: grad_buffer!($grads, *x),
            residual: grad_buffer!($grads, *residual),
            first: layer_grads!($grads, *first),
            second: layer_grads!($grads, *second),
        };
        grads.check_distinct();
        grads
    }};
}

/// A two-layer block's start: its input and the residual off their tape (merged), and the
/// opening layer's saved inputs and output `x·W + b`.
struct OpenedBlock<T> {
    x: A2<Cpu, NoneTape>,
    residual: A2<Cpu, NoneTape>,
    tape: T,
    first: LinearInputs,
    first_out: Vec<f32>,
}

impl<T: Tape<f32, Cpu>> OpenedBlock<T> {
    fn new(x: A2<Cpu, T>, residual: A2<Cpu, T>, first: &Dense<Cpu>) -> Self {
        let (x, tape) = x.split_tape();
        let (residual, residual_tape) = residual.split_tape();
        let saved = LinearInputs::new(&x, first);
        let first_out = saved.forward(first.bias.map(host).as_deref(), None);
        OpenedBlock {
            x,
            residual,
            tape: tape.merge(residual_tape),
            first: saved,
            first_out,
        }
    }
}

/// The gradient buffers of a two-layer block with a residual add: its output's (read), its
/// input's and the residual's (added to), and each layer's parameters' when it trains.
struct BlockGrads {
    out: GradBuffer,
    x: GradBuffer,
    residual: GradBuffer,
    first: Option<(GradBuffer, Option<GradBuffer>)>,
    second: Option<(GradBuffer, Option<GradBuffer>)>,
}

impl BlockGrads {
    fn check_distinct(&self) {
        let mut held = vec![&self.out, &self.x, &self.residual];
        for (weight, bias) in [&self.first, &self.second].into_iter().flatten() {
            held.push(weight);
            held.extend(bias);
        }
        assert_distinct(&held);
    }

    /// The closing layer's backward pass: the residual's and the layer's parameters'
    /// gradients, and its input's in a new buffer.
    ///
    /// # Safety
    /// The buffers must be live, distinct entries (see `GradBuffer`).
    unsafe fn close(&self, layer: &LinearInputs) -> Vec<f32> {
        let grad_out = self.out.read();
        par_zip(grad_out, self.residual.write(), add_rows);
        if let Some((weight, bias)) = &self.second {
            layer.backward_params(grad_out, weight.write(), bias.as_ref().map(|b| b.write()));
        }
        layer.input_gradient(grad_out)
    }

    /// The opening layer's: its parameters' gradients and its input's, from its output's.
    ///
    /// # Safety
    /// As for [`BlockGrads::close`].
    unsafe fn open(&self, layer: &LinearInputs, grad: &[f32]) {
        if let Some((weight, bias)) = &self.first {
            layer.backward_params(grad, weight.write(), bias.as_ref().map(|b| b.write()));
        }
        layer.backward_input(grad, self.x.write());
    }
}

/// The gradient buffers of an op's input (to add to) and of its output (to read).
macro_rules! input_and_output_grads {
    ($grads:expr, $input:expr, $output:expr) => {{
        let input = grad_buffer!($grads, $input);
        let output = grad_buffer!($grads, $output);
        assert_distinct(&[&input, &output]);
        // SAFETY: distinct live entries (see `GradBuffer`).
        unsafe { (input.write(), output.read()) }
    }};
}

/// A vector parameter's values (a bias, LayerNorm's weight or bias): a 1-D tensor's buffer is
/// its values in order, unless it is a view (broadcast or sliced), which fails the length
/// check loudly. 2-D tensors go through `row_major`.
fn host(t: &P1<Cpu>) -> Vec<f32> {
    let mut values = zeros(t.shape().num_elements());
    t.copy_into(&mut values);
    values
}

// ---------------------------------------------------------------------------------------------
// Kernel outputs read in place by the next kernels.
//
// dfdx keeps a tensor's buffer private, so a kernel's input is normally a copy (`host`). But
// most inputs are the outputs of the kernel before, whose buffers these kernels allocated: each
// output's buffer is remembered with a clone of its tensor, and a later kernel whose input
// starts at the same address (its `[0, 0]` element) and has the same length reads it in place.
// The clone keeps the buffer alive, so the address cannot be reused while remembered, and
// unchanged: dfdx writes into a tensor's buffer only when no other clone holds it.

/// Outputs remembered per thread: the inputs a kernel reads are made one or two kernels before.
const REMEMBERED_OUTPUTS: usize = 8;

/// A remembered output: its tensor (keeping the buffer alive) and the buffer's extent.
struct Output {
    tensor: A2<Cpu, NoneTape>,
    data: *const f32,
    len: usize,
}

thread_local! {
    static OUTPUTS: std::cell::RefCell<std::collections::VecDeque<Output>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

/// A kernel's output tensor, remembered so the next kernels can read it in place.
fn output(device: &Cpu, values: Vec<f32>, shape: (usize, usize)) -> A2<Cpu, NoneTape> {
    let (data, len) = (values.as_ptr(), values.len());
    let tensor = device.tensor_from_vec(values, shape);
    OUTPUTS.with_borrow_mut(|outputs| {
        if outputs.len() == REMEMBERED_OUTPUTS {
            outputs.pop_front();
        }
        outputs.push_back(Output {
            tensor: tensor.clone(),
            data,
            len,
        });
    });
    tensor
}

/// Forgets this thread's remembered outputs, freeing any that nothing else holds: called when a
/// step ends, so a pool thread does not keep the last activations alive between steps.
pub fn forget_outputs() {
    OUTPUTS.with_borrow_mut(std::collections::VecDeque::clear);
}

/// A kernel's input values: in place when `x` is a remembered output, else copied.
fn input<T>(x: &A2<Cpu, T>) -> Input {
    let len = x.shape().num_elements();
    if len > 0 {
        let start: *const f32 = &x[[0, 0]];
        let found = OUTPUTS.with_borrow(|outputs| {
            outputs
                .iter()
                .find(|out| out.data == start && out.len == len)
                .map(|out| Input::InPlace {
                    _tensor: out.tensor.clone(),
                    data: out.data,
                    len,
                })
        });
        if let Some(found) = found {
            return found;
        }
    }
    Input::Copied(row_major(x))
}

/// A parameter's values: in place, kept alive and unwritten by a clone of the tensor, when its
/// buffer holds it row-major from element `[0, 0]` (every parameter the model makes does), else
/// copied. The layout is checked through element addresses, since dfdx keeps strides private.
fn parameter(w: &P2<Cpu>) -> Input {
    match row_major_start(w) {
        Some(data) => Input::InPlace {
            _tensor: w.clone(),
            data,
            len: w.shape().num_elements(),
        },
        None => Input::Copied(row_major(w)),
    }
}

/// Where a nonempty 2-D tensor's values start when its buffer holds them row-major from
/// element `[0, 0]`, checked through element addresses (dfdx keeps strides private): a
/// permuted view fails the check.
fn row_major_start<T>(x: &A2<Cpu, T>) -> Option<*const f32> {
    let (rows, cols) = *x.shape();
    if rows == 0 || cols == 0 {
        return None;
    }
    let start: *const f32 = &x[[0, 0]];
    let at = |r, c| -> *const f32 { &x[[r, c]] };
    let row_major = (cols < 2 || at(0, 1) == start.wrapping_add(1))
        && (rows < 2 || at(1, 0) == start.wrapping_add(cols))
        && at(rows - 1, cols - 1) == start.wrapping_add(rows * cols - 1);
    row_major.then_some(start)
}

/// A 2-D tensor's values in row-major order, whatever the layout of its buffer.
fn row_major<T>(x: &A2<Cpu, T>) -> Vec<f32> {
    let (rows, cols) = *x.shape();
    if row_major_start(x).is_some() {
        // The buffer is the values in order (dfdx 0.13 tensors have no offset into it).
        let mut values = zeros(rows * cols);
        x.copy_into(&mut values);
        return values;
    }
    (0..rows)
        .flat_map(|r| (0..cols).map(move |c| x[[r, c]]))
        .collect()
}

/// The values of a kernel's input, kept for its backward pass.
enum Input {
    /// A remembered output's or a parameter's buffer, alive and unchanged while its tensor
    /// clone is held.
    InPlace {
        _tensor: A2<Cpu, NoneTape>,
        data: *const f32,
        len: usize,
    },
    Copied(Vec<f32>),
}

// SAFETY: `InPlace` only reads a buffer that no one writes while the clone is held, and the
// tensor clone itself is `Send` and `Sync`.
unsafe impl Send for Input {}
unsafe impl Sync for Input {}

impl std::ops::Deref for Input {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            // SAFETY: `data` is the start of `len` initialised values of a live buffer, which the
            // held clone keeps alive and unwritten: an output's `Vec` (pointer taken from the
            // `Vec`), or a parameter's, checked to hold it contiguously. A parameter's pointer
            // comes from a reference to its first element (dfdx lends nothing wider), so
            // reading its neighbours relies on Rust's aliasing rules allowing access through
            // it to the rest of the allocation: Tree Borrows does, Stacked Borrows does not.
            Input::InPlace { data, len, .. } => unsafe { std::slice::from_raw_parts(*data, *len) },
            Input::Copied(values) => values,
        }
    }
}

/// A zeroed buffer, filled by all threads (a large `vec![0.0; n]` is one thread's memset while
/// the others wait).
fn zeros(len: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    values.par_extend(rayon::iter::repeat_n(0.0, len));
    values
}

/// Rows per parallel task for rows of `width`: about 16k values, whatever the thread count.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// Adds per-task partial vectors in task order (so the sum is the same on any thread count).
fn add_partials(into: &mut [f32], partials: &[Vec<f32>]) {
    for partial in partials {
        into.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
    }
}

// ---------------------------------------------------------------------------------------------
// Vectorisable scalar maths. `#[inline(always)]` so they compile into each `simd_fn` body.

/// `e^x` within 2 ulp for x in [−87, 88] (clamped outside), in plain arithmetic that LLVM
/// vectorises, where libm's `expf` stays scalar. Range reduction `x = n·ln2 + r`, then a
/// degree-7 Taylor polynomial on |r| ≤ ln2/2 (truncation below 6e-9, relative).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // 2ⁿ from the bits of n: adding 1.5·2²³ puts the integer n in the low mantissa bits (`as
    // i32` would do, but its saturating conversion does not vectorise).
    const SHIFTER: f32 = 12_582_912.0;
    let exponent = (n + SHIFTER)
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits())
        .wrapping_add(127);
    p * f32::from_bits(exponent << 23)
}

/// Accumulators in reductions.
const LANES: usize = 16;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// GPT-2's GELU `0.5·x·(1 + tanh(u))`, `u = √(2/π)·(x + 0.044715·x³)`, and its slope.
/// Written as `x·σ(2u)` (the same function), which keeps full relative precision where the
/// output is tiny, unlike `1 + tanh` for very negative `x`.
#[inline(always)]
fn gelu_and_slope(x: f32) -> (f32, f32) {
    let x2 = x * x;
    let u = SQRT_2_OVER_PI * x * GELU_CUBIC.mul_add(x2, 1.0);
    let e = exp(-2.0 * u);
    let s = 1.0 / (1.0 + e);
    let du = SQRT_2_OVER_PI * (3.0 * GELU_CUBIC).mul_add(x2, 1.0);
    // σ' = σ·(1 − σ), with 1 − σ as e·σ: `1.0 - s` would cancel where σ is near 1.
    (x * s, (x * s * (e * s)).mul_add(2.0 * du, s))
}

/// Sum with sixteen accumulators: an AVX-512 vector's worth, so the loop vectorises (a single
/// accumulator is a serial chain LLVM may not reorder).
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    tree(lanes, |a, b| a + b) + tail
}

/// The lanes of a vector accumulator folded by halves (8 + 8, 4 + 4, …): four vector steps,
/// where a fold from the first lane to the last is sixteen dependent scalar ones.
#[inline(always)]
fn tree(mut lanes: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] = op(lanes[i], lanes[i + width]);
        }
        width /= 2;
    }
    lanes[0]
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((lane, x), y) in lanes.iter_mut().zip(a).zip(b) {
            *lane = x.mul_add(*y, *lane);
        }
    }
    tree(lanes, |a, b| a + b) + tail
}

#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    tree(lanes, f32::max).max(tail)
}

// ---------------------------------------------------------------------------------------------
// Matrix multiply: the `gemm` crate on row-major buffers and strided views into them.

/// A matrix inside a buffer: element `(i, j)` is at `i·row_stride + j·col_stride`; row-major,
/// transposed, or one head's columns of a wider activation.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols);
        Mat::strided(data, (rows, cols), cols, 1)
    }

    /// `rows × cols` starting at `data[0]`, rows `row_stride` apart.
    fn strided(
        data: &'a [f32],
        (rows, cols): (usize, usize),
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        if rows > 0 && cols > 0 {
            assert!((rows - 1) * row_stride + (cols - 1) * col_stride < data.len());
        }
        Mat {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    pub fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `start..end`.
    fn row_range(self, start: usize, end: usize) -> Self {
        assert!(start <= end && end <= self.rows);
        let from = (start * self.row_stride).min(self.data.len());
        Mat {
            data: &self.data[from..],
            rows: end - start,
            ..self
        }
    }

    /// Where element `(i, j)` is in `data()`.
    pub fn offset(&self, i: usize, j: usize) -> usize {
        i * self.row_stride + j * self.col_stride
    }

    /// Element `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.offset(i, j)]
    }

    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    pub fn col_stride(&self) -> usize {
        self.col_stride
    }
}

/// How a product is written: `dst = scale·a·b`, or `dst += scale·a·b` when `accumulate`.
#[derive(Clone, Copy)]
pub(super) struct Product {
    pub scale: f32,
    pub accumulate: bool,
    /// Split across rayon's threads; false inside tasks that are already parallel.
    pub parallel: bool,
}

/// `dst (m×n) = scale·a·b` or `+=`, where row `i` of `dst` starts at `dst + i·dst_row_stride`.
///
/// A parallel product is split into one part per thread, each a serial GEMM on its own
/// packed copies: over B's products that is 4% faster than the `gemm` crate's own threading,
/// which packs shared copies and synchronises its threads around them.
///
/// # Safety
/// `dst` must be valid for writes at every `(i, j)` of the product, and no other thread may
/// touch those elements during the call.
pub(super) unsafe fn gemm_into_f32(
    dst: *mut f32,
    dst_row_stride: usize,
    a: Mat,
    b: Mat,
    how: Product,
) {
    assert_eq!(a.cols, b.rows);
    // Split the longer side of the output: row ranges, or column ranges.
    let by_rows = a.rows >= b.cols;
    let length = a.rows.max(b.cols);
    let parts = rayon::current_num_threads().min(length / MIN_PART);
    if !how.parallel || parts <= 1 || a.rows == 0 || b.cols == 0 {
        return serial_gemm(dst, dst_row_stride, a, b, how);
    }
    let dst = SharedBuffer(dst, (a.rows - 1) * dst_row_stride + b.cols);
    (0..parts).into_par_iter().for_each(|part| {
        // Even parts: each at least `MIN_PART` long.
        let (first, end) = (part * length / parts, (part + 1) * length / parts);
        // SAFETY: the parts write disjoint rows or columns of the caller's product.
        unsafe {
            if by_rows {
                let a = a.row_range(first, end);
                serial_gemm(dst.at(first * dst_row_stride), dst_row_stride, a, b, how);
            } else {
                let b = b.t().row_range(first, end).t();
                serial_gemm(dst.at(first), dst_row_stride, a, b, how);
            }
        }
    });
}

/// The fewest rows (or columns) a part of a split product gets. gemm 0.19 multiplies products
/// of at most 64 × 64 another way, which sums long inner dimensions in other blocks (and
/// rounds differently): with parts that small, results would depend on the thread count.
const MIN_PART: usize = 65;

/// [`gemm_into_f32`] on the calling thread.
///
/// # Safety
/// As for [`gemm_into_f32`].
unsafe fn serial_gemm(dst: *mut f32, dst_row_stride: usize, a: Mat, b: Mat, how: Product) {
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        dst,
        1,
        dst_row_stride as isize,
        how.accumulate,
        a.data.as_ptr(),
        a.col_stride as isize,
        a.row_stride as isize,
        b.data.as_ptr(),
        b.col_stride as isize,
        b.row_stride as isize,
        1.0,
        how.scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// The GEMM for `precision`.
///
/// # Safety
/// As for [`gemm_into_f32`].
unsafe fn gemm_into(
    precision: Precision,
    dst: *mut f32,
    dst_row_stride: usize,
    a: Mat,
    b: Mat,
    how: Product,
) {
    match precision {
        Precision::F32 => gemm_into_f32(dst, dst_row_stride, a, b, how),
        Precision::Bf16 => bf16::gemm_into(dst, dst_row_stride, a, b, how),
    }
}

/// `dst = a·b`, or `dst += a·b` when `accumulate`; `dst` is row-major `(a.rows, b.cols)`.
fn matmul(dst: &mut [f32], a: Mat, b: Mat, accumulate: bool, precision: Precision) {
    assert_eq!(dst.len(), a.rows * b.cols);
    let how = Product {
        scale: 1.0,
        accumulate,
        parallel: true,
    };
    // SAFETY: `dst` is exclusively borrowed and holds exactly the product.
    unsafe { gemm_into(precision, dst.as_mut_ptr(), b.cols, a, b, how) }
}

/// `a·b` in a new row-major buffer, written once by the GEMM (no zero fill first).
fn product(a: Mat, b: Mat, precision: Precision) -> Vec<f32> {
    let len = a.rows * b.cols;
    if a.cols == 0 {
        return vec![0.0; len];
    }
    let mut dst = Vec::with_capacity(len);
    let how = Product {
        scale: 1.0,
        accumulate: false,
        parallel: true,
    };
    // SAFETY: with `accumulate` false and a nonempty inner dimension the GEMM writes every
    // element of the `len` it was given room for, without reading any, before `set_len`.
    unsafe {
        gemm_into(precision, dst.as_mut_ptr(), b.cols, a, b, how);
        dst.set_len(len);
    }
    dst
}

/// What a linear layer keeps for its backward pass: its input and weight.
struct LinearInputs {
    x: Input,
    weight: Input,
    /// `(tokens, in, out)`.
    sizes: (usize, usize, usize),
    /// The weight is stored `(out, in)`.
    transposed: bool,
    /// What the products compute in, as it was when the forward pass ran.
    precision: Precision,
}

impl LinearInputs {
    fn new<T>(x: &A2<Cpu, T>, dense: &Dense<Cpu>) -> Self {
        Self::of_values(input(x), *x.shape(), dense)
    }

    /// For an input `(n, in)` that is not a tensor (a hidden activation inside an op).
    fn of_values(x: Input, (n, inputs): (usize, usize), dense: &Dense<Cpu>) -> Self {
        let (rows, cols) = *dense.weight.shape();
        let outputs = if dense.transposed { rows } else { cols };
        LinearInputs {
            x,
            weight: parameter(dense.weight),
            sizes: (n, inputs, outputs),
            transposed: dense.transposed,
            precision: super::precision(),
        }
    }

    /// `x·W + b`, or `residual + x·W + b`: the output starts as the residual or the broadcast
    /// bias, and the GEMM adds into it.
    fn forward(&self, bias: Option<&[f32]>, residual: Option<&[f32]>) -> Vec<f32> {
        let (n, _, outputs) = self.sizes;
        if let Some(bias) = bias {
            assert_eq!(bias.len(), outputs, "one bias per output");
        }
        let mut y = match (residual, bias) {
            (Some(residual), _) => rows_plus_bias(residual, bias, outputs),
            (None, Some(bias)) => repeated_rows(bias, n),
            (None, None) => return product(self.x(), self.weight(), self.precision),
        };
        matmul(&mut y, self.x(), self.weight(), true, self.precision);
        y
    }

    /// `dy·Wᵀ` in a new buffer: the gradient of an input that only this layer reads.
    fn input_gradient(&self, dy: &[f32]) -> Vec<f32> {
        let dy = Mat::new(dy, self.sizes.0, self.sizes.2);
        product(dy, self.weight().t(), self.precision)
    }

    fn x(&self) -> Mat<'_> {
        Mat::new(&self.x, self.sizes.0, self.sizes.1)
    }

    /// The weight as the `(in, out)` matrix the layer multiplies by.
    fn weight(&self) -> Mat<'_> {
        let (_, inputs, outputs) = self.sizes;
        if self.transposed {
            Mat::new(&self.weight, outputs, inputs).t()
        } else {
            Mat::new(&self.weight, inputs, outputs)
        }
    }

    /// `dx += dy·Wᵀ` for the output gradient `dy` `(tokens, out)`.
    fn backward_input(&self, dy: &[f32], grad_x: &mut [f32]) {
        let dy = Mat::new(dy, self.sizes.0, self.sizes.2);
        matmul(grad_x, dy, self.weight().t(), true, self.precision);
    }

    /// `dW += xᵀ·dy` (in the weight's stored layout) and `db += Σ dy` over tokens.
    fn backward_params(&self, dy: &[f32], grad_w: &mut [f32], grad_b: Option<&mut [f32]>) {
        let outputs = self.sizes.2;
        let dy_mat = Mat::new(dy, self.sizes.0, outputs);
        if self.transposed {
            matmul(grad_w, dy_mat.t(), self.x(), true, self.precision);
        } else {
            matmul(grad_w, self.x().t(), dy_mat, true, self.precision);
        }
        if let Some(grad_b) = grad_b {
            let step = rows_per_task(outputs);
            let partials: Vec<Vec<f32>> = dy
                .par_chunks(step * outputs)
                .map(|rows| {
                    let mut sums = vec![0.0; outputs];
                    add_column_sums(rows, &mut sums);
                    sums
                })
                .collect();
            add_partials(grad_b, &partials);
        }
    }
}

/// A buffer that parallel tasks write disjoint parts of (one attention head's columns each, a
/// product's column range), which slices cannot express: the parts interleave row by row.
#[derive(Clone, Copy)]
struct SharedBuffer(*mut f32, usize);

// SAFETY: only used by tasks that write disjoint elements (see its uses).
unsafe impl Send for SharedBuffer {}
unsafe impl Sync for SharedBuffer {}

impl SharedBuffer {
    /// The address of element `offset`.
    fn at(self, offset: usize) -> *mut f32 {
        assert!(offset < self.1);
        // SAFETY: in bounds, by the assert.
        unsafe { self.0.add(offset) }
    }
}

// ---------------------------------------------------------------------------------------------
// Row kernels.

simd_fn! {
    /// GELU of `pre` into `out`.
    fn gelu_rows(pre: &[f32], out: &mut [MaybeUninit<f32>]) {
        for (y, &x) in out.iter_mut().zip(pre) {
            y.write(gelu_and_slope(x).0);
        }
    }
}

simd_fn! {
    /// GELU of `pre_then_slope` into `out`, and GELU's slope there into `pre_then_slope`: what
    /// the backward pass needs, computed with the value (the two share their costly parts).
    fn gelu_and_slope_rows(pre_then_slope: &mut [f32], out: &mut [MaybeUninit<f32>]) {
        for (y, x) in out.iter_mut().zip(pre_then_slope) {
            let (value, slope) = gelu_and_slope(*x);
            y.write(value);
            *x = slope;
        }
    }
}

simd_fn! {
    /// `into += a·b`, element by element.
    fn add_products(a: &[f32], b: &[f32], into: &mut [f32]) {
        for ((into, a), b) in into.iter_mut().zip(a).zip(b) {
            *into = a.mul_add(*b, *into);
        }
    }
}

simd_fn! {
    /// `into *= by`, element by element.
    fn multiply_rows(by: &[f32], into: &mut [f32]) {
        for (a, b) in into.iter_mut().zip(by) {
            *a *= b;
        }
    }
}

/// GELU of `pre` in a new buffer.
fn gelu(pre: &[f32]) -> Vec<f32> {
    let chunks = pre.par_chunks(ELEMENTWISE_CHUNK);
    // SAFETY: `gelu_rows` writes its whole output chunk.
    unsafe { fresh_chunks(pre.len(), ELEMENTWISE_CHUNK, chunks, gelu_rows) }
}

/// GELU of `pre` in a new buffer, and GELU's slope in `pre`'s place.
fn gelu_keeping_slope(pre: &mut [f32]) -> Vec<f32> {
    let len = pre.len();
    let chunks = pre.par_chunks_mut(ELEMENTWISE_CHUNK);
    // SAFETY: `gelu_and_slope_rows` writes its whole output chunk.
    unsafe { fresh_chunks(len, ELEMENTWISE_CHUNK, chunks, gelu_and_slope_rows) }
}

/// A new buffer of `len` written once, in parallel (no zero fill first): its `i`th chunk of
/// `chunk` values by `kernel`, given the `i`th of `inputs`.
///
/// # Safety
/// `kernel` must write every element of the output chunk it is given.
unsafe fn fresh_chunks<I: IndexedParallelIterator>(
    len: usize,
    chunk: usize,
    inputs: I,
    kernel: impl Fn(I::Item, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    assert_eq!(inputs.len(), len.div_ceil(chunk), "one input per chunk");
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .zip(inputs)
        .for_each(|(out, input)| kernel(input, out));
    // SAFETY: every chunk was written whole (the caller's promise for `kernel`).
    out.set_len(len);
    out
}

simd_fn! {
    /// `out = rows + bias` row by row (`bias` as wide as a row), into fresh memory.
    fn rows_plus_bias_block(rows: &[f32], bias: &[f32], out: &mut [MaybeUninit<f32>]) {
        for (row, out) in rows.chunks_exact(bias.len()).zip(out.chunks_exact_mut(bias.len())) {
            for ((out, &x), &b) in out.iter_mut().zip(row).zip(bias) {
                *out = MaybeUninit::new(x + b);
            }
        }
    }
}

/// `row` repeated `n` times, written by all threads (`repeat` is one thread's copy while the
/// others wait: 4 MB before each MLP product on B).
fn repeated_rows(row: &[f32], n: usize) -> Vec<f32> {
    written_rows(n, row.len(), |_, out| {
        for copy in out.chunks_exact_mut(row.len()) {
            for (o, &x) in copy.iter_mut().zip(row) {
                *o = MaybeUninit::new(x);
            }
        }
    })
}

/// A new buffer holding `rows` (row-major, `width` wide) plus `bias` on every row, written once
/// by all threads (no zero fill, no serial copy).
fn rows_plus_bias(rows: &[f32], bias: Option<&[f32]>, width: usize) -> Vec<f32> {
    let zero_bias;
    let bias = match bias {
        Some(bias) => bias,
        None => {
            zero_bias = vec![0.0; width];
            &zero_bias
        }
    };
    assert!(width > 0 && bias.len() == width && rows.len().is_multiple_of(width));
    written_rows(rows.len() / width, width, |first, out| {
        let rows = &rows[first * width..first * width + out.len()];
        rows_plus_bias_block(rows, bias, out);
    })
}

/// A new `n × width` buffer whose blocks of rows `fill` writes in parallel, each given its
/// first row and its (uninitialised) part, which it must write whole.
fn written_rows(
    n: usize,
    width: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    if width == 0 {
        return Vec::new();
    }
    let rows = rows_per_task(width);
    let firsts = (0..n.div_ceil(rows))
        .into_par_iter()
        .map(|block| block * rows);
    // SAFETY: `fill` writes its part whole (its contract, above).
    unsafe { fresh_chunks(n * width, rows * width, firsts, fill) }
}

simd_fn! {
    /// `into += from`.
    fn add_rows(from: &[f32], into: &mut [f32]) {
        for (a, b) in into.iter_mut().zip(from) {
            *a += b;
        }
    }
}

simd_fn! {
    /// Column sums of row-major `rows` of width `sums.len()`, added to `sums`.
    fn add_column_sums(rows: &[f32], sums: &mut [f32]) {
        for row in rows.chunks_exact(sums.len()) {
            for (s, x) in sums.iter_mut().zip(row) {
                *s += x;
            }
        }
    }
}

simd_fn! {
    /// Normalises each row of `x`; writes `y` and each row's `(mean, 1/σ)`.
    fn layer_norm_rows(x: &[f32], weight: &[f32], bias: &[f32], y: &mut [f32], stats: &mut [(f32, f32)]) {
        let d = weight.len();
        for ((x, y), stat) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(stats) {
            let mean = sum(x) / d as f32;
            let mut lanes = [0.0f32; LANES];
            let chunks = x.chunks_exact(LANES);
            let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
            for chunk in chunks {
                for (lane, v) in lanes.iter_mut().zip(chunk) {
                    *lane = (v - mean).mul_add(v - mean, *lane);
                }
            }
            let variance = (lanes.iter().sum::<f32>() + tail) / d as f32;
            let rstd = 1.0 / (variance + LAYER_NORM_EPS).sqrt();
            for (((y, x), w), b) in y.iter_mut().zip(x).zip(weight).zip(bias) {
                *y = ((x - mean) * rstd).mul_add(*w, *b);
            }
            *stat = (mean, rstd);
        }
    }
}

simd_fn! {
    /// LayerNorm's backward for rows of `x`: `dx += σ⁻¹·(g − mean(g) − x̂·mean(g·x̂))` with
    /// `g = dy·w`; `dw += dy·x̂` and `db += dy` into this task's partials.
    fn layer_norm_backward_rows(
        x: &[f32],
        weight: &[f32],
        stats: &[(f32, f32)],
        dy: &[f32],
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let d = weight.len();
        let mut g = vec![0.0f32; d];
        let mut x_hat = vec![0.0f32; d];
        let rows = x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d));
        for (((x, dy), dx), &(mean, rstd)) in rows.zip(stats) {
            for ((((g, h), x), dy), w) in g.iter_mut().zip(&mut x_hat).zip(x).zip(dy).zip(weight) {
                *h = (x - mean) * rstd;
                *g = dy * w;
            }
            let mean_g = sum(&g) / d as f32;
            let mean_gh = dot(&g, &x_hat) / d as f32;
            for (((dx, g), h), (dy, (dw, db))) in dx
                .iter_mut()
                .zip(&g)
                .zip(&x_hat)
                .zip(dy.iter().zip(dw.iter_mut().zip(db.iter_mut())))
            {
                *dx += rstd * (g - mean_g - h * mean_gh);
                *dw = dy.mul_add(*h, *dw);
                *db += dy;
            }
        }
    }
}

simd_fn! {
    /// For rows of logits: each row's log-sum-exp, and the target's log-probability.
    fn log_softmax_rows(logits: &[f32], targets: &[usize], lse: &mut [f32], out: &mut [f32]) {
        let vocab = logits.len() / targets.len().max(1);
        for (((row, &target), lse), out) in logits.chunks_exact(vocab).zip(targets).zip(lse).zip(out) {
            let m = max(row);
            let mut lanes = [0.0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail: f32 = chunks.remainder().iter().map(|&x| exp(x - m)).sum();
            for chunk in chunks {
                for (lane, &x) in lanes.iter_mut().zip(chunk) {
                    *lane += exp(x - m);
                }
            }
            *lse = m + (lanes.iter().sum::<f32>() + tail).ln();
            *out = row[target] - *lse;
        }
    }
}

simd_fn! {
    /// Turns rows of logits, in place, into the gradient of their targets' log-probabilities:
    /// `g·(onehot(target) − softmax)`, with `g` each row's output gradient.
    fn log_softmax_grad_in_place(logits: &mut [f32], targets: &[usize], lse: &[f32], grad_out: &[f32]) {
        let vocab = logits.len() / targets.len().max(1);
        let rows = logits.chunks_exact_mut(vocab).zip(targets).zip(lse).zip(grad_out);
        for (((row, &target), &lse), &g) in rows {
            // Masked-out tokens (fine-tuning prompts, padding) have no gradient.
            if g == 0.0 {
                row.fill(0.0);
                continue;
            }
            for x in row.iter_mut() {
                *x = -g * exp(*x - lse);
            }
            row[target] += g;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention, one (batch, head) at a time. The products run tile by tile on the heads in place
// (`tiles.rs`), each tile over the part of the inner dimension the causal mask leaves; the
// softmax and its backward are row kernels.

/// Causal attention over a `(batch·seq, 3·d)` input, one task per (batch row, head).
struct Attention {
    batch: usize,
    heads: usize,
    layout: Heads,
    /// `1/√head`.
    scale: f32,
}

impl Attention {
    fn new((n, width): (usize, usize), batch: usize, heads: usize) -> Self {
        let (seq, d) = (n / batch, width / 3);
        let head = d / heads;
        // Each product below has an inner dimension of `head` or `seq`: with neither zero,
        // a product not accumulating writes every element of its output.
        assert!(
            head > 0 && seq > 0,
            "attention needs at least one feature per head"
        );
        // The (row, head) tasks cover the output and the input's gradient exactly, which
        // writing them without a zero fill relies on.
        assert_eq!(n, batch * seq, "rows are batch · seq");
        assert_eq!(
            width,
            3 * heads * head,
            "q, k and v of `heads` heads side by side"
        );
        Attention {
            batch,
            heads,
            layout: Heads { seq, d, head },
            scale: 1.0 / (head as f32).sqrt(),
        }
    }

    fn rows(&self) -> usize {
        self.batch * self.layout.seq
    }

    /// The heads' outputs `(batch·seq, d)`, and each task's probabilities (kept for the
    /// backward pass).
    fn forward(&self, qkv: &[f32]) -> (Vec<f32>, Vec<Vec<f32>>) {
        let Heads { seq, d, head } = self.layout;
        let mut out = Vec::with_capacity(self.rows() * d);
        let out_buffer = SharedBuffer(out.as_mut_ptr(), self.rows() * d);
        let probabilities = (0..self.batch * self.heads)
            .into_par_iter()
            .map(|task| {
                let (b, h) = (task / self.heads, task % self.heads);
                let q = self.layout.part(qkv, (b, h, 0));
                let k_t = self.layout.transposed(qkv, (b, h, 1));
                let mut p = causal_scores(q, &k_t, (seq, head), self.scale);
                causal_softmax_rows(&mut p);
                let y = tiles::Output {
                    ptr: out_buffer.at(b * seq * d + h * head),
                    row_stride: d,
                };
                let (p_rows, v) = (Operand::rows(&p, seq), self.layout.part(qkv, (b, h, 2)));
                // SAFETY: head `h` of row `b` of `out` is this task's.
                unsafe { tiles::product(y, (seq, head), p_rows, v, up_to_tile(seq), 1.0, false) };
                p
            })
            .collect();
        // SAFETY: the (row, head) tasks' products wrote every element of `out` once.
        unsafe { out.set_len(self.rows() * d) };
        (out, probabilities)
    }

    /// The input's gradient from the output's, `grad_out` `(batch·seq, d)`: added into
    /// `grad_qkv` when `accumulate`, else written to every element of it.
    ///
    /// # Safety
    /// `grad_qkv` must be valid for writes of the whole `(batch·seq, 3·d)` gradient (and
    /// initialised when accumulating), and nothing else may touch it during the call.
    unsafe fn backward(
        &self,
        qkv: &[f32],
        probabilities: &[Vec<f32>],
        grad_out: &[f32],
        grad_qkv: *mut f32,
        accumulate: bool,
    ) {
        let Heads { seq, d, head } = self.layout;
        let target = SharedBuffer(grad_qkv, self.rows() * 3 * d);
        probabilities.par_iter().enumerate().for_each(|(task, p)| {
            let (b, h) = (task / self.heads, task % self.heads);
            let (q, k) = (
                self.layout.part(qkv, (b, h, 0)),
                self.layout.part(qkv, (b, h, 1)),
            );
            let v_t = self.layout.transposed(qkv, (b, h, 2));
            let dy = Operand::rows(&grad_out[b * seq * d + h * head..], d);
            let mut ds = causal_scores(dy, &v_t, (seq, head), 1.0);
            causal_softmax_backward_rows(p, &mut ds);
            let [dq, dk, dv] = [0, 1, 2].map(|part| tiles::Output {
                ptr: target.at(self.layout.offset((b, h, part))),
                row_stride: 3 * d,
            });
            let (ds_rows, ds_t) = (Operand::rows(&ds, seq), Operand::transposed(&ds, seq));
            let p_t = Operand::transposed(p, seq);
            let (size, scale) = ((seq, head), self.scale);
            // SAFETY: head `h`'s columns of row `b` of `target` are this task's.
            unsafe {
                tiles::product(dq, size, ds_rows, k, up_to_tile(seq), scale, accumulate);
                tiles::product(dk, size, ds_t, q, from_tile(seq), scale, accumulate);
                tiles::product(dv, size, p_t, dy, from_tile(seq), 1.0, accumulate);
            }
        });
    }
}

/// Where the heads are in the `(batch·seq, 3·d)` attention input.
#[derive(Clone, Copy)]
struct Heads {
    seq: usize,
    d: usize,
    head: usize,
}

impl Heads {
    /// Where part `part` (0 q, 1 k, 2 v) of head `h` of batch row `b` starts.
    fn offset(self, (b, h, part): (usize, usize, usize)) -> usize {
        b * self.seq * 3 * self.d + part * self.d + h * self.head
    }

    /// That part: a `(seq, head)` matrix, rows `3·d` apart.
    fn part(self, data: &[f32], at: (usize, usize, usize)) -> Operand<'_> {
        Operand::rows(&data[self.offset(at)..], 3 * self.d)
    }

    /// Kᵀ or Vᵀ of a head, `(head, seq)`: the right operand of scores (`q·kᵀ`, `dy·vᵀ`).
    fn transposed(self, data: &[f32], at: (usize, usize, usize)) -> Vec<f32> {
        let mut out = vec![0.0; self.head * self.seq];
        let from = &data[self.offset(at)..];
        tiles::transpose(from, 3 * self.d, (self.seq, self.head), &mut out, self.seq);
        out
    }
}

/// `scale·a·bᵀ` for `a` `(seq, head)` and `bᵀ` `(head, seq)` at and below the diagonal, in a
/// new `(seq, seq)` buffer; tiles wholly above the diagonal are zero, the rest of the tiles
/// the diagonal crosses is computed (the softmax rows overwrite it).
fn causal_scores(a: Operand, b_t: &[f32], (seq, head): (usize, usize), scale: f32) -> Vec<f32> {
    let mut scores = Vec::with_capacity(seq * seq);
    let out = tiles::Output {
        ptr: scores.as_mut_ptr(),
        row_stride: seq,
    };
    let below = |row: usize, col: usize| {
        if col < row + tiles::TILE_ROWS {
            0..head
        } else {
            0..0
        }
    };
    // SAFETY: `scores` has room for the product, which (not accumulating) writes every element
    // of it, zeros included, before `set_len`.
    unsafe {
        tiles::product(
            out,
            (seq, seq),
            a,
            Operand::rows(b_t, seq),
            below,
            scale,
            false,
        );
        scores.set_len(seq * seq);
    }
    scores
}

/// The inner range of a tile of `m·x` for `m` `(seq, seq)` zero above the diagonal: a tile of
/// rows from `row` takes columns up to its last row.
fn up_to_tile(seq: usize) -> impl Fn(usize, usize) -> std::ops::Range<usize> {
    move |row, _| 0..(row + tiles::TILE_ROWS).min(seq)
}

/// The inner range of a tile of `mᵀ·x` for the same `m`: row `r` of the product takes rows
/// `r..` of `m`, so a tile from `row` takes `row..`.
fn from_tile(seq: usize) -> impl Fn(usize, usize) -> std::ops::Range<usize> {
    move |row, _| row..seq
}

/// How much of row `i` of a causal `(seq, seq)` matrix the softmax kernels work on: the seen
/// positions `..=i` rounded up to whole vectors (or to the row's end), so that rows do not end
/// in a scalar loop (at these lengths the tails cost more than the padding); only the last
/// rows of a `seq` that is not a multiple of 16 still do.
#[inline(always)]
fn vector_span(i: usize, seq: usize) -> usize {
    (i + 1).next_multiple_of(LANES).min(seq)
}

simd_fn! {
    /// Causal softmax of each row of `scores` (`(seq, seq)`), in place; zero above the diagonal.
    fn causal_softmax_rows(scores: &mut [f32]) {
        let seq = scores.len().isqrt();
        for (i, row) in scores.chunks_exact_mut(seq).enumerate() {
            let (span, rest) = row.split_at_mut(vector_span(i, seq));
            // The padding: out of the max, then zero.
            span[i + 1..].fill(f32::NEG_INFINITY);
            let m = max(span);
            for s in span.iter_mut() {
                *s = exp(*s - m);
            }
            span[i + 1..].fill(0.0);
            let norm = 1.0 / sum(span);
            span.iter_mut().for_each(|s| *s *= norm);
            rest.fill(0.0);
        }
    }
}

simd_fn! {
    /// Causal softmax backward in place: `dp` becomes `p·(dp − Σ p·dp)`, row by row, over the
    /// seen positions (and the padding to whole vectors, where `p` is zero); zero above them.
    fn causal_softmax_backward_rows(p: &[f32], dp: &mut [f32]) {
        let seq = p.len().isqrt();
        for (i, (p, dp)) in p.chunks_exact(seq).zip(dp.chunks_exact_mut(seq)).enumerate() {
            let (span, rest) = dp.split_at_mut(vector_span(i, seq));
            // The padding is zeroed first: where `p` is zero, a non-finite `dp` would still
            // turn the row's sum into NaN.
            span[i + 1..].fill(0.0);
            let p = &p[..span.len()];
            let centre = dot(p, span);
            for (d, p) in span.iter_mut().zip(p) {
                *d = p * (*d - centre);
            }
            rest.fill(0.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The ops.

impl Kernels for Cpu {
    fn linear<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        dense: &Dense<Self>,
        epilogue: Epilogue<Self, T>,
    ) -> A2<Self, T> {
        let (x, mut tape) = x.split_tape();
        let saved = LinearInputs::new(&x, dense);
        let (n, _, outputs) = saved.sizes;
        let (residual, gelu) = match epilogue {
            Epilogue::Plain => (None, false),
            Epilogue::Gelu => (None, true),
            Epilogue::AddTo(residual) => (Some(residual), false),
        };
        let mut residual_ghost = None;
        let bias = dense.bias.map(host);
        let mut y = match residual {
            Some(residual) => {
                let (residual, residual_tape) = residual.split_tape();
                tape = tape.merge(residual_tape);
                residual_ghost = Some(residual.ghost());
                saved.forward(bias.as_deref(), Some(&input(&residual)))
            }
            None => saved.forward(bias.as_deref(), None),
        };
        // With GELU the output is a new buffer, and for the backward pass `y` becomes GELU's
        // slope at the pre-activation.
        let mut gelu_slope = None;
        if gelu && T::OWNS_TAPE {
            let activated = gelu_keeping_slope(&mut y);
            gelu_slope = Some(std::mem::replace(&mut y, activated));
        } else if gelu {
            y = self::gelu(&y);
        }
        let out = output(x.device(), y, (n, outputs));
        let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
        let params = trained_ghosts!(dense);
        tape.add_backward_op(move |grads| {
            let grad_out = grad_buffer!(grads, out_ghost);
            let grad_x = grad_buffer!(grads, x_ghost);
            let grad_residual = match &residual_ghost {
                Some(ghost) => Some(grad_buffer!(grads, *ghost)),
                None => None,
            };
            let params = layer_grads!(grads, params);
            let mut held = vec![&grad_out, &grad_x];
            held.extend(&grad_residual);
            if let Some((weight, bias)) = &params {
                held.push(weight);
                held.extend(bias);
            }
            assert_distinct(&held);
            // SAFETY: distinct live entries (see `GradBuffer`).
            let (grad_out, grad_x) = unsafe { (grad_out.write(), grad_x.write()) };
            if let Some(grad_residual) = grad_residual {
                // SAFETY: as above.
                par_zip(grad_out, unsafe { grad_residual.write() }, add_rows);
            }
            if let Some(slope) = &gelu_slope {
                // No op reads an output's gradient after the op that made it, so GELU's
                // backward turns it into the pre-activation's gradient in place.
                par_zip(slope, grad_out, multiply_rows);
            }
            saved.backward_input(grad_out, grad_x);
            if let Some((weight, bias)) = params {
                // SAFETY: as above.
                unsafe { saved.backward_params(grad_out, weight.write(), bias.map(|b| b.write())) };
            }
            Ok(())
        });
        out.put_tape(tape)
    }

    fn gelu<T: Tape<f32, Self>>(x: A2<Self, T>) -> A2<Self, T> {
        let (x, mut tape) = x.split_tape();
        let pre = input(&x);
        if !T::OWNS_TAPE {
            return output(x.device(), self::gelu(&pre), *x.shape()).put_tape(tape);
        }
        // The slope is computed with the value, and kept instead of the input.
        let mut slope = pre.to_vec();
        let out = output(x.device(), gelu_keeping_slope(&mut slope), *x.shape());
        let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let (grad_x, grad_out) = input_and_output_grads!(grads, x_ghost, out_ghost);
            grad_x
                .par_chunks_mut(ELEMENTWISE_CHUNK)
                .zip(grad_out.par_chunks(ELEMENTWISE_CHUNK))
                .zip(slope.par_chunks(ELEMENTWISE_CHUNK))
                .for_each(|((into, grad), slope)| add_products(grad, slope, into));
            Ok(())
        });
        out.put_tape(tape)
    }

    fn mlp<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        fc: &Dense<Self>,
        proj: &Dense<Self>,
        residual: A2<Self, T>,
    ) -> A2<Self, T> {
        let OpenedBlock {
            x,
            residual,
            mut tape,
            first: fc_saved,
            first_out: mut pre,
        } = OpenedBlock::new(x, residual, fc);
        let (n, _, hidden) = fc_saved.sizes;
        // The hidden activation is no tensor: its gradient needs no zeroed buffer of dfdx's.
        // For the backward pass, `pre` becomes GELU's slope.
        let (h, slope) = match T::OWNS_TAPE {
            true => (gelu_keeping_slope(&mut pre), pre),
            false => (gelu(&pre), Vec::new()),
        };
        let proj_saved = LinearInputs::of_values(Input::Copied(h), (n, hidden), proj);
        let y = proj_saved.forward(proj.bias.map(host).as_deref(), Some(&input(&residual)));
        let out = output(x.device(), y, (n, proj_saved.sizes.2));
        let ghosts = block_ghosts!(x, residual, out, fc, proj);
        tape.add_backward_op(move |grads| {
            let grads = block_grads!(grads, ghosts);
            // SAFETY: `block_grads!` checked the buffers distinct.
            unsafe {
                let mut grad_hidden = grads.close(&proj_saved);
                par_zip(&slope, &mut grad_hidden, multiply_rows);
                grads.open(&fc_saved, &grad_hidden);
            }
            Ok(())
        });
        out.put_tape(tape)
    }

    fn layer_norm<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        weight: &P1<Self>,
        bias: &P1<Self>,
        train: bool,
    ) -> A2<Self, T> {
        let (x, mut tape) = x.split_tape();
        let (n, d) = *x.shape();
        let (xs, ws, bs) = (input(&x), host(weight), host(bias));
        let mut y = zeros(n * d);
        let mut stats = vec![(0.0, 0.0); n];
        let step = rows_per_task(d);
        y.par_chunks_mut(step * d)
            .zip(xs.par_chunks(step * d))
            .zip(stats.par_chunks_mut(step))
            .for_each(|((y, x), stats)| layer_norm_rows(x, &ws, &bs, y, stats));
        let out = output(x.device(), y, (n, d));
        let ghosts = (x.ghost(), weight.ghost(), bias.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let (x_ghost, w_ghost, b_ghost, out_ghost) = &ghosts;
            let (grad_x, grad_out) = input_and_output_grads!(grads, *x_ghost, *out_ghost);
            let partials: Vec<(Vec<f32>, Vec<f32>)> = grad_x
                .par_chunks_mut(step * d)
                .zip(xs.par_chunks(step * d))
                .zip(grad_out.par_chunks(step * d))
                .zip(stats.par_chunks(step))
                .map(|(((dx, x), dy), stats)| {
                    let (mut dw, mut db) = (vec![0.0; d], vec![0.0; d]);
                    layer_norm_backward_rows(x, &ws, stats, dy, dx, &mut dw, &mut db);
                    (dw, db)
                })
                .collect();
            if train {
                let (dw, db): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
                add_partials(grads.get_or_alloc_mut(w_ghost)?, &dw);
                add_partials(grads.get_or_alloc_mut(b_ghost)?, &db);
            }
            Ok(())
        });
        out.put_tape(tape)
    }

    fn causal_attention<T: Tape<f32, Self>>(
        qkv: A2<Self, T>,
        batch: usize,
        heads: usize,
    ) -> A2<Self, T> {
        let (qkv, mut tape) = qkv.split_tape();
        let values = input(&qkv);
        let attention = Attention::new(*qkv.shape(), batch, heads);
        let (out, probabilities) = attention.forward(&values);
        let out = output(qkv.device(), out, (attention.rows(), attention.layout.d));
        let (qkv_ghost, out_ghost) = (qkv.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let (grad_qkv, grad_out) = input_and_output_grads!(grads, qkv_ghost, out_ghost);
            // SAFETY: `grad_qkv` is the whole `(rows, 3·d)` gradient, exclusively borrowed.
            unsafe {
                attention.backward(
                    &values,
                    &probabilities,
                    grad_out,
                    grad_qkv.as_mut_ptr(),
                    true,
                )
            };
            Ok(())
        });
        out.put_tape(tape)
    }

    fn attention_block<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        c_attn: &Dense<Self>,
        c_proj: &Dense<Self>,
        residual: A2<Self, T>,
        (batch, heads): (usize, usize),
    ) -> A2<Self, T> {
        let OpenedBlock {
            x,
            residual,
            mut tape,
            first: attn_saved,
            first_out: qkv,
        } = OpenedBlock::new(x, residual, c_attn);
        let (n, _, width) = attn_saved.sizes;
        let attention = Attention::new((n, width), batch, heads);
        // q, k, v and the heads' outputs are no tensors: their gradients need no zeroed
        // buffers of dfdx's.
        let (y, probabilities) = attention.forward(&qkv);
        let d = attention.layout.d;
        let proj_saved = LinearInputs::of_values(Input::Copied(y), (n, d), c_proj);
        let out = proj_saved.forward(c_proj.bias.map(host).as_deref(), Some(&input(&residual)));
        let out = output(x.device(), out, (n, proj_saved.sizes.2));
        let ghosts = block_ghosts!(x, residual, out, c_attn, c_proj);
        tape.add_backward_op(move |grads| {
            let grads = block_grads!(grads, ghosts);
            // SAFETY: `block_grads!` checked the buffers distinct. Not accumulating, the
            // attention's backward writes every element of `grad_qkv` (see
            // `Attention::backward`) before `set_len`.
            unsafe {
                let grad_y = grads.close(&proj_saved);
                let mut grad_qkv = Vec::with_capacity(n * width);
                attention.backward(&qkv, &probabilities, &grad_y, grad_qkv.as_mut_ptr(), false);
                grad_qkv.set_len(n * width);
                grads.open(&attn_saved, &grad_qkv);
            }
            Ok(())
        });
        out.put_tape(tape)
    }

    fn head_log_probs<T: Tape<f32, Self>>(
        x: A2<Self, T>,
        head: &Dense<Self>,
        targets: Tensor<(usize,), usize, Self>,
    ) -> Tensor<(usize,), f32, Self, T> {
        let (x, mut tape) = x.split_tape();
        let saved = LinearInputs::new(&x, head);
        let (n, _, vocab) = saved.sizes;
        let targets = targets.as_vec();
        assert_eq!(targets.len(), n, "one target per row");
        if let Some(&bad) = targets.iter().find(|&&t| t >= vocab) {
            panic!("target id {bad} is outside the vocabulary of {vocab}");
        }
        // The logits live only here: the backward pass turns them into their own gradient.
        let mut logits = product(saved.x(), saved.weight(), saved.precision);
        let (mut lse, mut out) = (vec![0.0; n], vec![0.0; n]);
        let step = rows_per_task(vocab);
        logits
            .par_chunks(step * vocab)
            .zip(targets.par_chunks(step))
            .zip(lse.par_chunks_mut(step))
            .zip(out.par_chunks_mut(step))
            .for_each(|(((rows, targets), lse), out)| log_softmax_rows(rows, targets, lse, out));
        let out = x.device().tensor_from_vec(out, (n,));
        let train = head.train;
        let (x_ghost, w_ghost, out_ghost) = (x.ghost(), head.weight.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let (grad_x, grad_out) = input_and_output_grads!(grads, x_ghost, out_ghost);
            logits
                .par_chunks_mut(step * vocab)
                .zip(targets.par_chunks(step))
                .zip(lse.par_chunks(step))
                .zip(grad_out.par_chunks(step))
                .for_each(|(((rows, targets), lse), g)| {
                    log_softmax_grad_in_place(rows, targets, lse, g)
                });
            saved.backward_input(&logits, grad_x);
            if train {
                saved.backward_params(&logits, grads.get_or_alloc_mut(&w_ghost)?, None);
            }
            Ok(())
        });
        out.put_tape(tape)
    }
}

/// Elements per parallel task of an elementwise kernel.
const ELEMENTWISE_CHUNK: usize = 16_384;

/// Runs an elementwise row kernel over `input` and `output` in parallel chunks.
fn par_zip(input: &[f32], output: &mut [f32], kernel: fn(&[f32], &mut [f32])) {
    output
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(input.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(out, inp)| kernel(inp, out));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative_error(got: f32, exact: f64) -> f64 {
        (f64::from(got) - exact).abs() / exact.abs().max(f64::from(f32::MIN_POSITIVE))
    }

    #[test]
    fn exp_is_within_a_few_ulp_over_its_range() {
        let (worst, at) = (-86_900..88_000)
            .map(|i| i as f32 * 1e-3)
            .map(|x| (relative_error(exp(x), f64::from(x).exp()), x))
            .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
        assert!(
            worst < 3.0 * f64::from(f32::EPSILON),
            "worst relative error {worst:e} at {at}"
        );
        assert_eq!(exp(-1000.0), exp(-87.0), "clamped below");
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_and_its_slope_match_the_tanh_formula_in_f64() {
        for i in -8000..8000 {
            let x = i as f32 * 1e-3;
            let xf = f64::from(x);
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xf + 0.044715 * xf.powi(3));
            let (t, du) = (
                u.tanh(),
                (2.0 / std::f64::consts::PI).sqrt() * (1.0 + 3.0 * 0.044715 * xf * xf),
            );
            let value = 0.5 * xf * (1.0 + t);
            let slope = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * du;
            let (got_value, got_slope) = gelu_and_slope(x);
            // Near zero, an absolute bound: the f32 terms of the slope cancel there.
            assert!(
                (f64::from(got_value) - value).abs() <= 1e-6 * value.abs().max(1e-3),
                "gelu({x})"
            );
            assert!(
                (f64::from(got_slope) - slope).abs() <= 1e-6 * slope.abs().max(0.1),
                "gelu'({x}) = {slope} not {got_slope}"
            );
        }
    }

    #[test]
    fn kernel_outputs_are_read_in_place_and_nothing_else_is() {
        let dev = Cpu::default();
        let values: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let made = output(&dev, values.clone(), (3, 4));
        let read = input(&made);
        assert!(matches!(read, Input::InPlace { .. }));
        assert_eq!(&read[..], &values[..]);

        // A tensor no kernel made is copied.
        let plain = dev.tensor_from_vec(values.clone(), (3, 4));
        assert!(matches!(input(&plain), Input::Copied(_)));

        // Writing a remembered output gives the writer a buffer of its own (the remembered clone
        // shares the old one): the new values are copied, the old read stays as it was.
        let mut written = made.clone();
        written.copy_from(&[7.0; 12]);
        let rewritten = input(&written);
        assert!(matches!(rewritten, Input::Copied(_)));
        assert_eq!(&rewritten[..], &[7.0; 12]);
        assert_eq!(&read[..], &values[..]);

        // Only the latest outputs are remembered, and none after `forget_outputs`.
        for _ in 0..REMEMBERED_OUTPUTS {
            output(&dev, vec![0.0; 12], (3, 4));
        }
        assert!(matches!(input(&made), Input::Copied(_)));
        assert_eq!(&input(&made)[..], &values[..]);
        let last = output(&dev, values.clone(), (3, 4));
        forget_outputs();
        assert!(matches!(input(&last), Input::Copied(_)));
    }

    /// A product split across threads gives the bits of the unsplit one, on any thread count:
    /// shapes split by rows and by columns whose other side is narrow and whose inner dimension
    /// is long (where gemm's small-product path would sum in other blocks), and empty ones.
    #[test]
    fn split_products_match_the_serial_product_bit_for_bit() {
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + seed) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        for (m, k, n) in [
            (200, 600, 48),
            (48, 600, 200),
            (300, 64, 130),
            (0, 8, 200),
            (3, 0, 2),
        ] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let (a, b) = (Mat::new(&a, m, k), Mat::new(&b, k, n));
            let product_on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| product(a, b, Precision::F32))
            };
            let serial = product_on(1);
            for threads in 2..=4 {
                assert!(
                    product_on(threads) == serial,
                    "{m}×{k}×{n} on {threads} threads"
                );
            }
        }
    }

    #[test]
    fn parameters_are_read_in_place_when_row_major_and_keep_their_values_while_held() {
        let dev = Cpu::default();
        let values: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut weight: P2<Cpu> = dev.tensor_from_vec(values.clone(), (3, 4));
        let held = parameter(&weight);
        assert!(matches!(held, Input::InPlace { .. }));
        assert_eq!(&held[..], &values[..]);
        // An update while a kernel holds the weight (as the optimizer's `copy_from` does) gives
        // the tensor a buffer of its own; the held values stay those the forward pass used.
        weight.copy_from(&[5.0; 12]);
        assert_eq!(&held[..], &values[..]);
        assert_eq!(&parameter(&weight)[..], &[5.0; 12]);
        // A transposed view is not laid out row-major from `[0, 0]`: copied, in logical order.
        let transposed: P2<Cpu> = dev
            .tensor_from_vec(values.clone(), (4, 3))
            .permute::<_, dfdx::shapes::Axes2<1, 0>>();
        let read = parameter(&transposed);
        assert!(matches!(read, Input::Copied(_)));
        let logical: Vec<f32> = (0..3)
            .flat_map(|r| (0..4).map(move |c| (c * 3 + r) as f32))
            .collect();
        assert_eq!(&read[..], &logical[..]);
    }
}
