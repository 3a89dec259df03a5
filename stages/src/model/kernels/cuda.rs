//! CUDA twins of the optimizer's CPU kernels (`adamw.rs`): the gradient norm, scaling and
//! accumulation, launched through cudarc on the gradient buffers dfdx lends (the one kind of
//! device memory its API gives out). Compiled by NVRTC on first use and cached per device.
//! Compile-checked in CI; never run here (no GPU).
//!
//! The model's fused forward kernels have no twins yet: they would read tensors' device memory,
//! which dfdx 0.13 keeps private (`Tensor::data` and `Cuda`'s device handle are `pub(crate)`).

use std::sync::Arc;

use cudarc::driver::{CudaDevice, CudaSlice, DeviceSlice, LaunchAsync, LaunchConfig};

const MODULE: &str = "smelt_optimizer";
const FUNCTIONS: [&str; 3] = ["smelt_scale", "smelt_add_scaled", "smelt_sum_squares"];

/// Threads per block, and the fixed number of blocks of the norm: the partial sums, and so the
/// norm's rounding, do not depend on the GPU.
const THREADS: u32 = 256;
const NORM_BLOCKS: u32 = 256;

const SOURCE: &str = r#"
extern "C" __global__ void smelt_scale(float *x, float by, size_t n) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        x[i] *= by;
    }
}

extern "C" __global__ void smelt_add_scaled(float *into, const float *from, float by, size_t n) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        into[i] += from[i] * by;
    }
}

// One partial sum of squares per block (blockDim.x must be 256), in double.
extern "C" __global__ void smelt_sum_squares(const float *x, size_t n, double *partials) {
    __shared__ double sums[256];
    double sum = 0.0;
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        double v = x[i];
        sum += v * v;
    }
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            sums[threadIdx.x] += sums[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = sums[0];
    }
}
"#;

/// The device's copy of a kernel, compiling and loading the module the first time.
fn function(device: &Arc<CudaDevice>, name: &str) -> cudarc::driver::CudaFunction {
    if !device.has_func(MODULE, name) {
        let ptx = cudarc::nvrtc::compile_ptx(SOURCE).expect("the optimizer's CUDA kernels compile");
        device
            .load_ptx(ptx, MODULE, &FUNCTIONS)
            .expect("the optimizer's CUDA module loads");
    }
    device.get_func(MODULE, name).expect("a loaded kernel")
}

/// Blocks for an elementwise pass over `n` values (grid-stride loops cover the rest).
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `x *= by`.
pub fn scale(x: &mut CudaSlice<f32>, by: f32) {
    let n = x.len();
    let kernel = function(&x.device(), "smelt_scale");
    // SAFETY: the kernel writes `x[0..n]`, which `x` owns, on the device's stream.
    unsafe { kernel.launch(elementwise(n), (x, by, n)) }.expect("smelt_scale launches");
}

/// `into += from · by`.
pub fn add_scaled(into: &mut CudaSlice<f32>, from: &CudaSlice<f32>, by: f32) {
    let n = into.len();
    assert_eq!(n, from.len(), "adding buffers of different lengths");
    let kernel = function(&into.device(), "smelt_add_scaled");
    // SAFETY: both buffers hold `n` values; `into` is borrowed mutably, so they are distinct.
    unsafe { kernel.launch(elementwise(n), (into, from, by, n)) }
        .expect("smelt_add_scaled launches");
}

/// `Σ x²` in f64: per-block partials on the device, added on the host in block order.
pub fn sum_squares(x: &CudaSlice<f32>) -> f64 {
    let device = x.device();
    let mut partials = device
        .alloc_zeros::<f64>(NORM_BLOCKS as usize)
        .expect("device memory for partial sums");
    let config = LaunchConfig {
        grid_dim: (NORM_BLOCKS, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let kernel = function(&device, "smelt_sum_squares");
    // SAFETY: reads `x[0..n]`, writes one partial per block into `partials` (NORM_BLOCKS long).
    unsafe { kernel.launch(config, (x, x.len(), &mut partials)) }
        .expect("smelt_sum_squares launches");
    device
        .dtoh_sync_copy(&partials)
        .expect("device to host copy")
        .iter()
        .sum()
}
