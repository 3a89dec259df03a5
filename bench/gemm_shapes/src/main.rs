//! GFLOP/s of `c += a·b` on 2 threads at the training shapes of configs A and B, for both gemm
//! versions, each measured twice in turn (the machine is shared and noisy).

use std::time::Instant;

#[derive(Clone, Copy)]
enum Version {
    Dfdx,
    Fused,
}

/// GFLOP/s of `(m×k)·(k×n)` accumulated into `c`; `a_transposed`: `a` is stored `k×m`, as `xᵀ`
/// is in a weight gradient.
fn gflops(version: Version, (m, k, n): (usize, usize, usize), a_transposed: bool) -> f64 {
    let (a, b, mut c) = (
        vec![0.5f32; m * k],
        vec![0.25f32; k * n],
        vec![0.0f32; m * n],
    );
    let (a_row, a_col) = if a_transposed {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    // The two versions' `gemm` have the same signature: one call, either crate.
    macro_rules! accumulate {
        ($gemm:ident) => {
            $gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                true,
                a.as_ptr(),
                a_col,
                a_row,
                b.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                $gemm::Parallelism::Rayon(2),
            )
        };
    }
    let mut run = || unsafe {
        // SAFETY: the strides address exactly the three buffers above.
        match version {
            Version::Dfdx => accumulate!(gemm15),
            Version::Fused => accumulate!(gemm19),
        }
    };
    let flops = 2.0 * (m * k * n) as f64;
    let repeats = (2e10 / flops).max(5.0) as usize;
    (0..3).for_each(|_| run());
    let start = Instant::now();
    (0..repeats).for_each(|_| run());
    flops * repeats as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global()
        .unwrap();
    let shapes = [
        ((1024, 128, 384), false),
        ((1024, 128, 512), false),
        ((1024, 512, 128), false),
        ((128, 1024, 384), true),
        ((1024, 256, 768), false),
        ((1024, 256, 4096), false),
        ((1024, 4096, 256), false),
        ((256, 1024, 4096), true),
    ];
    println!("shape (m×k×n), a transposed: gemm 0.15 | gemm 0.19 x86-v4, GFLOP/s (two runs each)");
    for (shape, transposed) in shapes {
        let runs: Vec<f64> = [Version::Dfdx, Version::Fused, Version::Dfdx, Version::Fused]
            .into_iter()
            .map(|v| gflops(v, shape, transposed))
            .collect();
        let (m, k, n) = shape;
        println!(
            "{m}×{k}×{n} {transposed}: {:.0} {:.0} | {:.0} {:.0}",
            runs[0], runs[2], runs[1], runs[3]
        );
    }
}
