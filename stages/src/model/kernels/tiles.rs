//! Products of attention's small matrices (one head of one sequence), tile by tile.
//!
//! A product `c = scale·a·b` (or `+=`) is cut into tiles of 8 rows × 32 columns of `c`, and each
//! tile takes its own range of the inner dimension from the caller: a causal product skips the
//! triangle that is zero, and a tile whose range is empty is written as zeros (or left alone
//! when accumulating). At these sizes (inner dimensions of 32 to a few hundred) a general GEMM
//! spends more time packing and dispatching than multiplying; a tile here reads its operands
//! in place, keeps its 8×32 sums in sixteen AVX-512 registers and writes them once. With AVX2
//! only, the tile runs as 4×16 blocks; elsewhere as plain loops.

use std::ops::Range;

/// Rows and columns of a tile.
pub(super) const TILE_ROWS: usize = 8;
const TILE_COLS: usize = 32;

/// A matrix operand in place: element `(i, p)` at `data[i·row_stride + p·col_stride]`.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// Row-major rows `stride` apart.
    pub fn rows(data: &'a [f32], stride: usize) -> Self {
        Operand {
            data,
            row_stride: stride,
            col_stride: 1,
        }
    }

    /// The transpose of row-major rows `stride` apart.
    pub fn transposed(data: &'a [f32], stride: usize) -> Self {
        Operand {
            data,
            row_stride: 1,
            col_stride: stride,
        }
    }

    /// Checks that elements `(..rows, ..cols)` lie inside `data`.
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "operand outside its buffer");
        }
    }
}

/// Where a product goes: element `(i, j)` at `ptr + i·row_stride + j`.
#[derive(Clone, Copy)]
pub(super) struct Output {
    pub ptr: *mut f32,
    pub row_stride: usize,
}

/// `c (m×n) = scale·a·b`, or `+=` when `accumulate`, where the tile at `(first row, first
/// column)` sums over `inner(first row, first column)` only (a range of `a`'s columns and `b`'s
/// rows; an empty one makes the tile zero, or leaves it as it was when accumulating).
///
/// # Safety
/// `c` must be valid for writes at every `(i, j)` of the product (and initialised there when
/// accumulating: it is read), and no other thread may touch those elements during the call.
pub(super) unsafe fn product(
    c: Output,
    size: (usize, usize),
    a: Operand,
    b: Operand,
    inner: impl Fn(usize, usize) -> Range<usize>,
    scale: f32,
    accumulate: bool,
) {
    let store = Store { scale, accumulate };
    product_with(tile_kernel(), c, size, a, b, &inner, store)
}

/// [`product`] with a given tile kernel.
///
/// # Safety
/// As for [`product`]; the CPU must have what `kernel` needs.
unsafe fn product_with(
    kernel: TileKernel,
    c: Output,
    (m, n): (usize, usize),
    a: Operand,
    b: Operand,
    inner: &dyn Fn(usize, usize) -> Range<usize>,
    store: Store,
) {
    assert_eq!(b.col_stride, 1, "b's rows are contiguous");
    for row in (0..m).step_by(TILE_ROWS) {
        for col in (0..n).step_by(TILE_COLS) {
            let k = inner(row, col);
            let tile = Tile {
                rows: TILE_ROWS.min(m - row),
                cols: TILE_COLS.min(n - col),
            };
            if !k.is_empty() {
                a.check(row + tile.rows, k.end);
                b.check(k.end, col + tile.cols);
            } else if store.accumulate {
                continue;
            }
            // With an empty range the operands' pointers are not read, and may point past
            // them: `wrapping_add`.
            let left = Left {
                ptr: a.data.as_ptr().wrapping_add(row * a.row_stride),
                row_stride: a.row_stride,
                col_stride: a.col_stride,
            };
            let right = Right {
                ptr: b.data.as_ptr().wrapping_add(col),
                row_stride: b.row_stride,
            };
            let out = Output {
                ptr: c.ptr.add(row * c.row_stride + col),
                row_stride: c.row_stride,
            };
            kernel(tile, left, right, k, out, store);
        }
    }
}

/// A tile's size: at most 8 rows and 32 columns.
#[derive(Clone, Copy)]
struct Tile {
    rows: usize,
    cols: usize,
}

/// A tile's left operand: element `(i, p)` at `ptr + i·row_stride + p·col_stride`, `i` a row
/// of the tile, `p` in its inner range.
#[derive(Clone, Copy)]
struct Left {
    ptr: *const f32,
    row_stride: usize,
    col_stride: usize,
}

/// A tile's right operand: element `(p, j)` at `ptr + p·row_stride + j`, `j` a column of the
/// tile.
#[derive(Clone, Copy)]
struct Right {
    ptr: *const f32,
    row_stride: usize,
}

/// How a tile's sums are written: `scale·sum`, added to what is there when `accumulate`.
#[derive(Clone, Copy)]
struct Store {
    scale: f32,
    accumulate: bool,
}

/// One tile of a product (`Output` at the tile's first element).
type TileKernel = unsafe fn(Tile, Left, Right, Range<usize>, Output, Store);

/// The tile kernel for this CPU.
fn tile_kernel() -> TileKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return avx512::tile;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return avx2::tile;
        }
    }
    portable_tile
}

simd_fn! {
    /// The tile as plain loops, row by row, vectorised along the row: a whole row's 32 sums
    /// as a fixed-size array stay in registers (four AVX2 vectors).
    fn portable_loops(tile: Tile, a: Left, b: Right, k: Range<usize>, c: Output, store: Store) {
        for i in 0..tile.rows {
            let mut sums = [0.0f32; TILE_COLS];
            for p in k.clone() {
                // SAFETY: inside the operands, as `product` checked.
                let x = unsafe { *a.ptr.add(i * a.row_stride + p * a.col_stride) };
                let row = b.ptr.wrapping_add(p * b.row_stride);
                if tile.cols == TILE_COLS {
                    // SAFETY: a whole row of the tile is inside `b`, as `product` checked.
                    let row = unsafe { &*row.cast::<[f32; TILE_COLS]>() };
                    for j in 0..TILE_COLS {
                        sums[j] = x.mul_add(row[j], sums[j]);
                    }
                } else {
                    // SAFETY: as above, for the tile's columns.
                    let row = unsafe { std::slice::from_raw_parts(row, tile.cols) };
                    for (s, &y) in sums.iter_mut().zip(row) {
                        *s = x.mul_add(y, *s);
                    }
                }
            }
            // SAFETY: the tile is inside `c`, as the caller of `product` vouched.
            let out = unsafe { std::slice::from_raw_parts_mut(c.ptr.add(i * c.row_stride), tile.cols) };
            for (o, s) in out.iter_mut().zip(sums) {
                *o = if store.accumulate { *o + store.scale * s } else { store.scale * s };
            }
        }
    }
}

/// [`portable_loops`] as a [`TileKernel`].
unsafe fn portable_tile(tile: Tile, a: Left, b: Right, k: Range<usize>, c: Output, store: Store) {
    portable_loops(tile, a, b, k, c, store)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::*;

    /// The tile with its sums in registers: per step of the inner dimension, two vectors of
    /// `b`'s row and eight broadcasts of `a`'s column feed sixteen FMAs. Columns past the
    /// tile's are masked off (never read, never written: their addresses are formed with
    /// `wrapping_add`, as they may lie past the buffer); rows past it repeat its last row and
    /// are not stored.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the operands are valid over the tile and `k` (see `product`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        tile: Tile,
        a: Left,
        b: Right,
        k: Range<usize>,
        c: Output,
        store: Store,
    ) {
        let masks = [lanes(tile.cols), lanes(tile.cols.saturating_sub(16))];
        let rows: [*const f32; TILE_ROWS] =
            std::array::from_fn(|i| a.ptr.wrapping_add(i.min(tile.rows - 1) * a.row_stride));
        let mut sums = [[_mm512_setzero_ps(); 2]; TILE_ROWS];
        for p in k {
            let b_row = b.ptr.add(p * b.row_stride);
            let lo = _mm512_maskz_loadu_ps(masks[0], b_row);
            let hi = _mm512_maskz_loadu_ps(masks[1], b_row.wrapping_add(16));
            for (sum, row) in sums.iter_mut().zip(rows) {
                let x = _mm512_set1_ps(*row.add(p * a.col_stride));
                sum[0] = _mm512_fmadd_ps(x, lo, sum[0]);
                sum[1] = _mm512_fmadd_ps(x, hi, sum[1]);
            }
        }
        let scale = _mm512_set1_ps(store.scale);
        for (i, sum) in sums.iter().enumerate().take(tile.rows) {
            let out = c.ptr.add(i * c.row_stride);
            for (half, &mask) in masks.iter().enumerate() {
                let at = out.wrapping_add(16 * half);
                let mut value = _mm512_mul_ps(sum[half], scale);
                if store.accumulate {
                    value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, at));
                }
                _mm512_mask_storeu_ps(at, mask, value);
            }
        }
    }

    /// A mask of the first `n` of 16 lanes.
    fn lanes(n: usize) -> __mmask16 {
        match n {
            0 => 0,
            1..=15 => (1 << n) - 1,
            _ => u16::MAX,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// Rows and columns of the blocks a tile is cut into: AVX2's sixteen registers hold 4×16
    /// sums (eight) with two vectors of `b` and a broadcast, not the whole 8×32 tile.
    const ROWS: usize = 4;
    const COLS: usize = 16;

    /// The tile in 4×16 blocks, each like the AVX-512 tile: sums in registers, columns past
    /// the tile masked off, rows past it repeating its last row and not stored.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the operands are valid over the tile and `k` (see `product`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(
        tile: Tile,
        a: Left,
        b: Right,
        k: Range<usize>,
        c: Output,
        store: Store,
    ) {
        for col in (0..tile.cols).step_by(COLS) {
            let cols = (tile.cols - col).min(COLS);
            let masks = [lanes(cols), lanes(cols.saturating_sub(8))];
            for row in (0..tile.rows).step_by(ROWS) {
                let rows = (tile.rows - row).min(ROWS);
                let left = Left {
                    ptr: a.ptr.wrapping_add(row * a.row_stride),
                    ..a
                };
                let right = Right {
                    ptr: b.ptr.wrapping_add(col),
                    ..b
                };
                let out = Output {
                    ptr: c.ptr.add(row * c.row_stride + col),
                    ..c
                };
                block(rows, masks, left, right, k.clone(), out, store);
            }
        }
    }

    /// One block of at most 4 rows and 16 columns (`masks` say which).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block(
        rows: usize,
        masks: [__m256i; 2],
        a: Left,
        b: Right,
        k: Range<usize>,
        c: Output,
        store: Store,
    ) {
        let starts: [*const f32; ROWS] =
            std::array::from_fn(|i| a.ptr.wrapping_add(i.min(rows - 1) * a.row_stride));
        let mut sums = [[_mm256_setzero_ps(); 2]; ROWS];
        for p in k {
            let b_row = b.ptr.add(p * b.row_stride);
            let lo = _mm256_maskload_ps(b_row, masks[0]);
            let hi = _mm256_maskload_ps(b_row.wrapping_add(8), masks[1]);
            for (sum, start) in sums.iter_mut().zip(starts) {
                let x = _mm256_set1_ps(*start.add(p * a.col_stride));
                sum[0] = _mm256_fmadd_ps(x, lo, sum[0]);
                sum[1] = _mm256_fmadd_ps(x, hi, sum[1]);
            }
        }
        let scale = _mm256_set1_ps(store.scale);
        for (i, sum) in sums.iter().enumerate().take(rows) {
            let out = c.ptr.add(i * c.row_stride);
            for (half, &mask) in masks.iter().enumerate() {
                let at = out.wrapping_add(8 * half);
                let mut value = _mm256_mul_ps(sum[half], scale);
                if store.accumulate {
                    value = _mm256_add_ps(value, _mm256_maskload_ps(at, mask));
                }
                _mm256_maskstore_ps(at, mask, value);
            }
        }
    }

    /// A mask of the first `n` of 8 lanes (lanes whose sign bit is set).
    #[target_feature(enable = "avx2")]
    fn lanes(n: usize) -> __m256i {
        let n = n.min(8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }
}

/// `dst[j·dst_stride + i] = src[i·src_stride + j]` for `(rows, cols)` of `src`: whole 8×8
/// blocks in AVX registers where the CPU has AVX, the edges element by element.
pub(super) fn transpose(
    src: &[f32],
    src_stride: usize,
    (rows, cols): (usize, usize),
    dst: &mut [f32],
    dst_stride: usize,
) {
    const BLOCK: usize = 8;
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        (rows - 1) * src_stride + cols <= src.len(),
        "source outside its buffer"
    );
    assert!(
        (cols - 1) * dst_stride + rows <= dst.len(),
        "destination outside its buffer"
    );
    #[cfg(target_arch = "x86_64")]
    let whole_blocks = std::is_x86_feature_detected!("avx");
    #[cfg(not(target_arch = "x86_64"))]
    let whole_blocks = false;
    for i0 in (0..rows).step_by(BLOCK) {
        for j0 in (0..cols).step_by(BLOCK) {
            if whole_blocks && i0 + BLOCK <= rows && j0 + BLOCK <= cols {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX; the block is inside both buffers (checked above).
                unsafe {
                    let from = src.as_ptr().add(i0 * src_stride + j0);
                    let to = dst.as_mut_ptr().add(j0 * dst_stride + i0);
                    avx::transpose_block(from, src_stride, to, dst_stride);
                }
                continue;
            }
            for i in i0..(i0 + BLOCK).min(rows) {
                for j in j0..(j0 + BLOCK).min(cols) {
                    dst[j * dst_stride + i] = src[i * src_stride + j];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// Transposes the 8×8 block at `src` (rows `src_stride` apart) into `dst`: pairs of rows
    /// interleaved, then pairs of pairs, then the 128-bit halves swapped across.
    ///
    /// # Safety
    /// The CPU has AVX; both blocks are inside their buffers.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn transpose_block(
        src: *const f32,
        src_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
        // t: rows 2i and 2i+1 interleaved, within each 128-bit half.
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        // u: four rows' elements of columns c and c + 4, c = 0, 1, 2, 3 (rows 0–3, then 4–7).
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        for c in 0..4 {
            let low = _mm256_permute2f128_ps::<0x20>(u[c], u[c + 4]);
            let high = _mm256_permute2f128_ps::<0x31>(u[c], u[c + 4]);
            _mm256_storeu_ps(dst.add(c * dst_stride), low);
            _mm256_storeu_ps(dst.add((c + 4) * dst_stride), high);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 16) as f32 / 32_768.0 - 1.0)
            .collect()
    }

    /// Every tile kernel against f64 sums, at sizes with partial tiles, both layouts of `a`,
    /// ranges that vary per tile (some empty), scale and accumulation.
    #[test]
    fn tiles_match_f64_sums_over_their_ranges() {
        let mut kernels: Vec<(&str, TileKernel)> = vec![("portable", portable_tile)];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            kernels.push(("avx512", avx512::tile));
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            kernels.push(("avx2", avx2::tile));
        }
        for (name, kernel) in kernels {
            for &(m, k, n) in &[
                (1, 1, 1),
                (8, 32, 32),
                (13, 40, 70),
                (130, 33, 5),
                (17, 128, 64),
            ] {
                for a_transposed in [false, true] {
                    check(name, kernel, (m, k, n), a_transposed);
                }
            }
        }
    }

    fn check(name: &str, kernel: TileKernel, (m, k, n): (usize, usize, usize), a_transposed: bool) {
        // Strides wider than the matrices, as in attention's views.
        let (b_stride, c_stride) = (n + 7, n + 3);
        let a_data = values(m * k, 1);
        let b_data = values(k * b_stride, 2);
        let a = match a_transposed {
            false => Operand::rows(&a_data, k),
            true => Operand::transposed(&a_data, m),
        };
        let b = Operand::rows(&b_data, b_stride);
        // The tile at (row, col) sums over a band that depends on both, empty for some.
        let inner = |row: usize, col: usize| {
            let start = (row + col) % (k + 1) / 2;
            start..(start + (row / 8) * 5 + 3).min(k)
        };
        for (scale, accumulate) in [(1.0, false), (0.5, true), (-2.0, false)] {
            let start = values(m * c_stride, 3);
            let mut got = start.clone();
            let c = Output {
                ptr: got.as_mut_ptr(),
                row_stride: c_stride,
            };
            let store = Store { scale, accumulate };
            // SAFETY: `got` holds the product with rows `c_stride` apart.
            unsafe { product_with(kernel, c, (m, n), a, b, &inner, store) };
            for i in 0..m {
                for j in 0..c_stride {
                    let at = i * c_stride + j;
                    if j >= n {
                        assert_eq!(got[at], start[at], "{name}: wrote past the product");
                        continue;
                    }
                    let sum: f64 = inner(i / 8 * 8, j / 32 * 32)
                        .map(|p| {
                            let x = a.data[i * a.row_stride + p * a.col_stride];
                            f64::from(x) * f64::from(b.data[p * b_stride + j])
                        })
                        .sum();
                    let mut expected = f64::from(scale) * sum;
                    if accumulate {
                        expected += f64::from(start[at]);
                    }
                    let error = (f64::from(got[at]) - expected).abs();
                    assert!(
                        error < 1e-5 * (k as f64 + 1.0),
                        "{name} {m}×{k}×{n} a transposed {a_transposed} at ({i}, {j}): {} vs {expected}",
                        got[at]
                    );
                }
            }
        }
    }

    #[test]
    fn transpose_moves_every_element() {
        let (rows, cols) = (19, 37);
        let src = values(rows * 40, 4);
        let mut dst = vec![f32::NAN; cols * 21];
        transpose(&src, 40, (rows, cols), &mut dst, 21);
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(dst[j * 21 + i], src[i * 40 + j]);
            }
        }
    }
}
