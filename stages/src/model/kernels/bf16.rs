//! Matrix multiply in bf16 with f32 accumulation: the `bf16` compute path's GEMM.
//!
//! Inputs are rounded to bf16 (to nearest, ties to even) and their products summed in f32, as
//! mixed-precision training does on GPUs. Where the CPU has Intel AMX, the products run on its
//! tiles (`tdpbf16ps`: a 16×16 f32 block += 16×32 · 32×16 bf16 in one instruction, 16× the
//! multiply-adds of an AVX-512 FMA); elsewhere the rounded inputs go through the f32 GEMM, which
//! gives the same products summed in another order.
//!
//! AMX works on packed copies: the left matrix as 16-row × 32-column tiles, the right one in
//! the pair-interleaved ("VNNI") layout the instruction reads, both zero-padded to whole tiles.
//! Each task computes 32×32 output blocks (2×2 tiles), loading the block from the output when
//! it accumulates. One block's whole loop over the inner dimension is one `asm!` block, so the
//! tile registers hold nothing of ours between `asm!` blocks (the compiler does not know of
//! them); each task loads the tile configuration first and releases the tiles after.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::cpu::{gemm_into_f32, Mat, Product};

/// Rounds an f32 to the nearest bf16 (ties to even), returned as its bit pattern; NaNs stay
/// NaN (quietened), infinities stay infinite, and finite values too large round to infinity.
/// The same as `half::bf16::from_f32`, written out so that it inlines into the packing loops
/// and vectorises there.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    ((bits + rounding) >> 16) as u16
}

/// The f32 that a bf16 bit pattern stands for.
fn from_bf16(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `dst (m×n) = a·b` or `+= a·b` with `a` and `b` rounded to bf16, products summed in f32.
///
/// # Safety
/// As for [`gemm_into_f32`]: `dst` must be valid for the whole product, which no other thread
/// touches during the call.
pub(super) unsafe fn gemm_into(dst: *mut f32, dst_row_stride: usize, a: Mat, b: Mat, how: Product) {
    assert_eq!(a.cols, b.rows);
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    if a.cols == 0 {
        // An empty sum: nothing to add, or zeros to write.
        if !how.accumulate {
            for i in 0..a.rows {
                std::ptr::write_bytes(dst.add(i * dst_row_stride), 0, b.cols);
            }
        }
        return;
    }
    if amx::available() {
        amx::gemm_into(dst, dst_row_stride, a, b, how);
    } else {
        let (a_rounded, b_rounded) = (rounded(a), rounded(b));
        let a = Mat::new(&a_rounded, a.rows, a.cols);
        let b = Mat::new(&b_rounded, b.rows, b.cols);
        gemm_into_f32(dst, dst_row_stride, a, b, how);
    }
}

/// `m`'s values rounded to bf16 (and back to f32), row-major.
fn rounded(m: Mat) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.rows * m.cols);
    for i in 0..m.rows {
        out.extend((0..m.cols).map(|j| from_bf16(to_bf16(m.at(i, j)))));
    }
    out
}

/// Whether `gemm_into` runs on AMX tiles here.
pub fn uses_amx() -> bool {
    amx::available()
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    use super::*;

    /// Rows of a tile, and bf16 values per tile row (64 bytes).
    const TILE_ROWS: usize = 16;
    const TILE_K: usize = 32;
    /// bf16 values in one packed tile.
    const TILE_LEN: usize = TILE_ROWS * TILE_K;
    /// An output block: 2×2 tiles.
    const BLOCK: usize = 2 * TILE_ROWS;
    /// Output blocks per task along a row: enough work to amortise loading the tile
    /// configuration, few enough to leave tasks for every thread.
    const BLOCKS_PER_TASK: usize = 4;

    /// Whether this CPU has AMX with bf16 and the kernel lets this process use its tiles.
    pub(super) fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| cpu_has_amx_bf16() && tiles_permitted())
    }

    fn cpu_has_amx_bf16() -> bool {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE. (A CPU without leaf 7 would
        // answer with its highest leaf instead.)
        if std::arch::x86_64::__get_cpuid_max(0).0 < 7 {
            return false;
        }
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0
    }

    /// Asks Linux for the tile data state (8 KiB per thread), which it grants per process on
    /// request only (since 5.16); without it the first tile instruction faults.
    fn tiles_permitted() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a syscall that only changes this process's permissions.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// Palette 1 with all eight tiles 16 rows × 64 bytes: C tiles tmm0–3 (16×16 f32), A tiles
    /// tmm4–5 (16×32 bf16), B tiles tmm6–7 (16 pairs × 16 columns of bf16).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut tile = 0;
        while tile < 8 {
            bytes[16 + 2 * tile] = 64; // bytes per row (little-endian u16)
            bytes[48 + tile] = TILE_ROWS as u8;
            tile += 1;
        }
        TileConfig(bytes)
    };

    /// A matrix packed for the tiles: `blocks` of 16 rows (or columns), each `k_tiles` tiles.
    struct Packed {
        values: Vec<TileRow>,
        k_tiles: usize,
    }

    impl Packed {
        /// Tile `(block, k)`.
        fn tile(&self, block: usize, k: usize) -> *const u16 {
            self.values[(block * self.k_tiles + k) * TILE_ROWS..]
                .as_ptr()
                .cast()
        }
    }

    /// Blocks of 16 rows (or columns) rounded up to an even number: they pair up into 32-row
    /// output blocks.
    fn paired_blocks(n: usize) -> usize {
        n.div_ceil(BLOCK) * 2
    }

    /// `a` (m×k) as row tiles: tile `(i, kt)` holds rows `16i..` and columns `32kt..`, rounded,
    /// row-major, zeros outside `a`.
    fn pack_left(a: Mat, parallel: bool, buffer: Vec<TileRow>) -> Packed {
        pack(a, parallel, left_tile, buffer)
    }

    /// `b` (k×n) as column tiles in pair-interleaved order: row `p` of tile `(j, kt)` holds, for
    /// each column `c` of `16j..16j+16`, the pair `b[32kt + 2p][c], b[32kt + 2p + 1][c]`.
    fn pack_right(b: Mat, parallel: bool, buffer: Vec<TileRow>) -> Packed {
        pack(b.t(), parallel, right_tile, buffer)
    }

    /// Packs `m` (its rows are the tiles' 16-row blocks, its columns the inner dimension) tile
    /// by tile with `tile`, into `buffer` (grown if need be; every tile is written, so what it
    /// held does not matter and it is not zeroed first).
    ///
    /// Tiles are filled in the order `m` is stored: along its rows when they are contiguous,
    /// else down its columns, so consecutive tiles read neighbouring memory. (Down a column
    /// block of a row-major matrix, each tile row is another page: no prefetch, a TLB miss.)
    fn pack(
        m: Mat,
        parallel: bool,
        tile: fn(Mat, (usize, usize), &mut [u16]),
        mut values: Vec<TileRow>,
    ) -> Packed {
        let k_tiles = m.cols.div_ceil(TILE_K);
        let blocks = paired_blocks(m.rows);
        let len = blocks * k_tiles * TILE_ROWS;
        if values.len() < len {
            values.resize(len, TileRow([0; TILE_K]));
        }
        let tiles = TilesOut(values.as_mut_ptr().cast());
        let along_rows = m.col_stride() == 1;
        let fill = |t: usize| {
            let (block, kt) = match along_rows {
                true => (t / k_tiles, t % k_tiles),
                false => (t % blocks, t / blocks),
            };
            // SAFETY: each `t` is one distinct tile inside `values`.
            let out = unsafe { tiles.tile((block * k_tiles + kt) * TILE_LEN) };
            if block * TILE_ROWS < m.rows {
                tile(m, (block * TILE_ROWS, kt * TILE_K), out);
            } else {
                // The block that pads an odd count of 16-row blocks to a pair.
                out.fill(0);
            }
        };
        if parallel {
            (0..blocks * k_tiles).into_par_iter().for_each(fill);
        } else {
            (0..blocks * k_tiles).for_each(fill);
        }
        Packed { values, k_tiles }
    }

    /// One row of a packed tile: 64 bytes, aligned to a cache line so that each row a tile
    /// load reads is one line, not two.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct TileRow([u16; TILE_K]);

    /// Packed tiles filled by parallel tasks in an order other than memory order.
    struct TilesOut(*mut u16);

    // SAFETY: tasks write disjoint tiles (see `pack`).
    unsafe impl Send for TilesOut {}
    unsafe impl Sync for TilesOut {}

    impl TilesOut {
        /// # Safety
        /// The tile at `start` must be inside the buffer and no other task's.
        #[allow(clippy::mut_from_ref)]
        unsafe fn tile(&self, start: usize) -> &mut [u16] {
            std::slice::from_raw_parts_mut(self.0.add(start), TILE_LEN)
        }
    }

    /// Whether the 16×32 tile at `(row, col)` lies wholly inside `m`.
    fn whole(m: Mat, (row, col): (usize, usize)) -> bool {
        row + TILE_ROWS <= m.rows && col + TILE_K <= m.cols
    }

    /// The tile's element `(r, kk)` of `m`, zero outside it.
    fn padded(m: Mat, (row, col): (usize, usize), (r, kk): (usize, usize)) -> f32 {
        if row + r < m.rows && col + kk < m.cols {
            m.at(row + r, col + kk)
        } else {
            0.0
        }
    }

    simd_fn! {
        /// Tile `out` (16 rows × 32, row-major) of `m` at `at`.
        fn left_tile(m: Mat, at: (usize, usize), out: &mut [u16]) {
            let (row, col) = at;
            if !whole(m, at) {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = to_bf16(padded(m, at, (i / TILE_K, i % TILE_K)));
                }
            } else if m.col_stride() == 1 {
                for (r, line) in out.chunks_exact_mut(TILE_K).enumerate() {
                    let from = m.offset(row + r, col);
                    for (o, &x) in line.iter_mut().zip(&m.data()[from..from + TILE_K]) {
                        *o = to_bf16(x);
                    }
                }
            } else {
                // Rows are strided; columns are contiguous when `m` is a transposed matrix.
                // Round down each column, then transpose the block into the tile.
                let mut columns = [[0u16; TILE_ROWS]; TILE_K];
                let stride = m.row_stride();
                for (kk, column) in columns.iter_mut().enumerate() {
                    let from = m.offset(row, col + kk);
                    let values = &m.data()[from..=from + (TILE_ROWS - 1) * stride];
                    if stride == 1 {
                        for (o, &x) in column.iter_mut().zip(values) {
                            *o = to_bf16(x);
                        }
                    } else {
                        for (r, o) in column.iter_mut().enumerate() {
                            *o = to_bf16(values[r * stride]);
                        }
                    }
                }
                for (r, line) in out.chunks_exact_mut(TILE_K).enumerate() {
                    for (o, column) in line.iter_mut().zip(&columns) {
                        *o = column[r];
                    }
                }
            }
        }
    }

    /// Two values rounded to bf16 and paired as one tile element (low half first).
    fn pair(lo: f32, hi: f32) -> u32 {
        u32::from(to_bf16(lo)) | (u32::from(to_bf16(hi)) << 16)
    }

    simd_fn! {
        /// Pair-interleaved tile `out` of `mt`, the right matrix transposed (a row of `mt` is
        /// a column of the product), at `at`. As pairs, element `(p, c)` of the tile is
        /// `mt[row + c][col + 2p]` with the value after it.
        fn right_tile(mt: Mat, at: (usize, usize), out: &mut [u16]) {
            let (row, col) = at;
            let mut pairs = [0u32; TILE_LEN / 2];
            if !whole(mt, at) {
                for (i, o) in pairs.iter_mut().enumerate() {
                    let (p, c) = (i / TILE_ROWS, i % TILE_ROWS);
                    *o = pair(padded(mt, at, (c, 2 * p)), padded(mt, at, (c, 2 * p + 1)));
                }
            } else if mt.row_stride() == 1 {
                // The right matrix is row-major: each of its rows gives a tile row's halves.
                for (p, line) in pairs.chunks_exact_mut(TILE_ROWS).enumerate() {
                    let lo = &mt.data()[mt.offset(row, col + 2 * p)..][..TILE_ROWS];
                    let hi = &mt.data()[mt.offset(row, col + 2 * p + 1)..][..TILE_ROWS];
                    for ((o, &l), &h) in line.iter_mut().zip(lo).zip(hi) {
                        *o = pair(l, h);
                    }
                }
            } else {
                let stride = mt.col_stride();
                for c in 0..TILE_ROWS {
                    let column = &mt.data()[mt.offset(row + c, col)..];
                    for p in 0..TILE_K / 2 {
                        let (l, h) = (column[2 * p * stride], column[(2 * p + 1) * stride]);
                        pairs[p * TILE_ROWS + c] = pair(l, h);
                    }
                }
            }
            for (o, p) in out.chunks_exact_mut(2).zip(pairs) {
                o[0] = p as u16;
                o[1] = (p >> 16) as u16;
            }
        }
    }

    /// `dst (m×n) = scale·a·b` or `+=` on AMX tiles.
    ///
    /// # Safety
    /// As for [`super::gemm_into`]; the CPU must have AMX and the process its permission.
    pub(super) unsafe fn gemm_into(
        dst: *mut f32,
        dst_row_stride: usize,
        a: Mat,
        b: Mat,
        how: Product,
    ) {
        // The left matrix's tiles read its rows along the inner dimension; when those are
        // strided (a transposed activation in a weight gradient) each value is gathered. If it
        // is also the larger matrix, computing `(bᵀ·aᵀ)ᵀ` gathers the smaller one instead.
        let transposed = a.col_stride() != 1 && a.rows > b.cols;
        let (a, b) = if transposed { (b.t(), a.t()) } else { (a, b) };
        let (m, n) = (a.rows, b.cols);
        let [left_buffer, right_buffer] = SCRATCH.with_borrow_mut(std::mem::take);
        let parallel = how.parallel;
        let (left, right) = if parallel {
            rayon::join(
                || pack_left(a, true, left_buffer),
                || pack_right(b, true, right_buffer),
            )
        } else {
            (
                pack_left(a, false, left_buffer),
                pack_right(b, false, right_buffer),
            )
        };
        let row_blocks = m.div_ceil(BLOCK);
        let col_groups = n.div_ceil(BLOCK * BLOCKS_PER_TASK);
        let out = Output {
            dst,
            row_stride: dst_row_stride,
            rows: m,
            cols: n,
            transposed,
        };
        let task = |t: usize| {
            let (i, group) = (t / col_groups, t % col_groups);
            let first = group * BLOCKS_PER_TASK;
            let last = n.div_ceil(BLOCK).min(first + BLOCKS_PER_TASK);
            // SAFETY: the caller checked AMX; tasks write disjoint output blocks.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
                for j in first..last {
                    out.block(&left, &right, (i, j), how);
                }
                asm!("tilerelease", options(nostack, nomem));
            }
        };
        if how.parallel {
            (0..row_blocks * col_groups).into_par_iter().for_each(task);
        } else {
            (0..row_blocks * col_groups).for_each(task);
        }
        SCRATCH.set([left.values, right.values]);
    }

    thread_local! {
        /// The packed copies' buffers, kept per calling thread for its next product: a fresh
        /// allocation would be zeroed first (a tenth of B's step in bf16). Each holds the
        /// largest operand packed so far on the thread (B: 8 MiB, the output head's gradient).
        static SCRATCH: std::cell::RefCell<[Vec<TileRow>; 2]> = const {
            std::cell::RefCell::new([Vec::new(), Vec::new()])
        };
    }

    /// The GEMM's output, written block by block from several threads.
    #[derive(Clone, Copy)]
    struct Output {
        dst: *mut f32,
        row_stride: usize,
        rows: usize,
        cols: usize,
        /// The product is written transposed: element `(r, c)` at row `c`, column `r`.
        transposed: bool,
    }

    // SAFETY: tasks write disjoint blocks (see `gemm_into`).
    unsafe impl Send for Output {}
    unsafe impl Sync for Output {}

    impl Output {
        /// Where the product's element `(r, c)` goes.
        fn at(&self, r: usize, c: usize) -> *mut f32 {
            let offset = match self.transposed {
                false => r * self.row_stride + c,
                true => c * self.row_stride + r,
            };
            // SAFETY (of the pointer arithmetic): `(r, c)` is inside the product, which the
            // caller of `gemm_into` vouched for.
            unsafe { self.dst.add(offset) }
        }

        /// Computes output block `(i, j)` (32×32 from row `32i`, column `32j`). A whole block is
        /// loaded from and stored to the output directly; one at the edges, written
        /// transposed or scaled goes through a staging block, of which only the part inside
        /// the output is copied.
        ///
        /// # Safety
        /// Tiles configured by `CONFIG`; the block is this thread's to write.
        unsafe fn block(
            &self,
            left: &Packed,
            right: &Packed,
            (i, j): (usize, usize),
            how: Product,
        ) {
            let (row, col) = (i * BLOCK, j * BLOCK);
            let (rows, cols) = (BLOCK.min(self.rows - row), BLOCK.min(self.cols - col));
            let a = [left.tile(2 * i, 0), left.tile(2 * i + 1, 0)];
            let b = [right.tile(2 * j, 0), right.tile(2 * j + 1, 0)];
            let add = how.accumulate;
            if rows == BLOCK && cols == BLOCK && !self.transposed && how.scale == 1.0 {
                tile_block(a, b, left.k_tiles, self.at(row, col), self.row_stride, add);
                return;
            }
            let mut staged = [0.0f32; BLOCK * BLOCK];
            tile_block(a, b, left.k_tiles, staged.as_mut_ptr(), BLOCK, false);
            for r in 0..rows {
                for c in 0..cols {
                    let at = self.at(row + r, col + c);
                    let product = how.scale * staged[r * BLOCK + c];
                    *at = if add { *at + product } else { product };
                }
            }
        }
    }

    /// `c (32×32, rows `c_stride` f32 apart) += or = a·b` over `k_tiles` tile pairs, where `a`
    /// are the two 16-row tiles and `b` the two 16-column tiles at the first inner tile (later
    /// ones follow 1 KiB apart).
    ///
    /// # Safety
    /// Tiles configured by `CONFIG`; `a` and `b` valid for `k_tiles` tiles; `c` for the block.
    unsafe fn tile_block(
        a: [*const u16; 2],
        b: [*const u16; 2],
        k_tiles: usize,
        c: *mut f32,
        c_stride: usize,
        add: bool,
    ) {
        // The loop below runs at least once (`super::gemm_into` handles empty sums).
        debug_assert!(k_tiles > 0);
        let c_bytes = c_stride * 4;
        let c_lower = c.add(TILE_ROWS * c_stride);
        let tile_bytes = TILE_LEN * 2;
        asm!(
            "test {add:e}, {add:e}",
            "jz 3f",
            "tileloadd tmm0, [{c0} + {cs}]",
            "tileloadd tmm1, [{c0} + {cs} + 64]",
            "tileloadd tmm2, [{c1} + {cs}]",
            "tileloadd tmm3, [{c1} + {cs} + 64]",
            "jmp 4f",
            "3:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "4:",
            "mov {s:e}, 64",
            "5:",
            "tileloadd tmm4, [{a0} + {s}]",
            "tileloadd tmm5, [{a1} + {s}]",
            "tileloadd tmm6, [{b0} + {s}]",
            "tileloadd tmm7, [{b1} + {s}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, {tb}",
            "add {a1}, {tb}",
            "add {b0}, {tb}",
            "add {b1}, {tb}",
            "dec {k}",
            "jnz 5b",
            "tilestored [{c0} + {cs}], tmm0",
            "tilestored [{c0} + {cs} + 64], tmm1",
            "tilestored [{c1} + {cs}], tmm2",
            "tilestored [{c1} + {cs} + 64], tmm3",
            add = in(reg) u32::from(add),
            c0 = in(reg) c,
            c1 = in(reg) c_lower,
            cs = in(reg) c_bytes,
            a0 = inout(reg) a[0] => _,
            a1 = inout(reg) a[1] => _,
            b0 = inout(reg) b[0] => _,
            b1 = inout(reg) b[1] => _,
            k = inout(reg) k_tiles => _,
            s = out(reg) _,
            tb = in(reg) tile_bytes,
            options(nostack),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    use super::*;

    pub(super) fn available() -> bool {
        false
    }

    pub(super) unsafe fn gemm_into(_: *mut f32, _: usize, _: Mat, _: Mat, _: Product) {
        unreachable!("AMX exists only on x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_bf16_is_to_nearest_with_ties_to_even() {
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even neighbour, 1.
        assert_eq!(from_bf16(to_bf16(1.0 + 2f32.powi(-8))), 1.0);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: the even one is 1 + 2⁻⁶.
        assert_eq!(
            from_bf16(to_bf16(1.0 + 3.0 * 2f32.powi(-8))),
            1.0 + 2f32.powi(-6)
        );
        // Just above halfway rounds up.
        assert_eq!(
            from_bf16(to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20))),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        for x in [0.1f32, -3.7, 1e-30, 12345.678] {
            let y = from_bf16(to_bf16(x));
            assert!(((y - x) / x).abs() <= 2f32.powi(-9), "{x} → {y}");
            assert_eq!(half::bf16::from_f32(x).to_f32(), y, "{x}");
        }
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed)
                    .wrapping_mul(2_654_435_761)
                    .rotate_left(13);
                (h % 20_001) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// The product of the bf16-rounded inputs in f64: what the bf16 GEMM approximates, off
    /// only by f32 sums.
    fn exact(a: Mat, b: Mat) -> Vec<f64> {
        let round = |x: f32| f64::from(from_bf16(to_bf16(x)));
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|k| round(a.at(i, k)) * round(b.at(k, j)))
                    .sum();
            }
        }
        out
    }

    fn check((m, k, n): (usize, usize, usize), transposed: (bool, bool), how: Product) {
        let (a_values, b_values) = (values(m * k, 1), values(k * n, 2));
        let a = match transposed.0 {
            false => Mat::new(&a_values, m, k),
            true => Mat::new(&a_values, k, m).t(),
        };
        let b = match transposed.1 {
            false => Mat::new(&b_values, k, n),
            true => Mat::new(&b_values, n, k).t(),
        };
        let start = values(m * n, 3);
        let accumulate = how.accumulate;
        let mut got = if accumulate {
            start.clone()
        } else {
            vec![f32::NAN; m * n]
        };
        // SAFETY: `got` holds exactly the product.
        unsafe { gemm_into(got.as_mut_ptr(), n, a, b, how) };
        let expected = exact(a, b);
        for (idx, (g, e)) in got.iter().zip(&expected).enumerate() {
            let e = how.scale as f64 * e
                + if accumulate {
                    f64::from(start[idx])
                } else {
                    0.0
                };
            // f32 sums of k terms of size ≤ 1: error well under k·2⁻²⁴ each.
            let tolerance = 1e-6 * (k as f64 + 1.0);
            assert!(
                (f64::from(*g) - e).abs() <= tolerance,
                "{m}×{k}×{n} {transposed:?} at {idx}: {g} vs {e}"
            );
        }
    }

    #[test]
    fn products_match_the_rounded_inputs_at_odd_sizes_and_layouts() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 0, 5),
            (17, 33, 15),
            (32, 32, 32),
            (70, 100, 129),
            (128, 64, 300),
            (300, 64, 17),
        ] {
            for transposed in [(false, false), (true, false), (false, true), (true, true)] {
                for (scale, accumulate, parallel) in [
                    (1.0, false, true),
                    (1.0, true, true),
                    (0.375, true, false),
                    (-2.0, false, false),
                ] {
                    let how = Product {
                        scale,
                        accumulate,
                        parallel,
                    };
                    check((m, k, n), transposed, how);
                }
            }
        }
    }

    #[test]
    fn amx_and_the_portable_path_agree_where_amx_exists() {
        if !uses_amx() {
            eprintln!("no AMX here: the portable path is what runs, checked above");
            return;
        }
        let (m, k, n) = (96, 256, 80);
        let (a_values, b_values) = (values(m * k, 4), values(k * n, 5));
        let (a, b) = (Mat::new(&a_values, m, k), Mat::new(&b_values, k, n));
        let how = Product {
            scale: 1.0,
            accumulate: false,
            parallel: false,
        };
        let mut tiles = vec![0.0; m * n];
        // SAFETY: the buffer holds the product; AMX is available.
        unsafe { amx::gemm_into(tiles.as_mut_ptr(), n, a, b, how) };
        let (ar, br) = (rounded(a), rounded(b));
        let mut portable = vec![0.0; m * n];
        // SAFETY: as above.
        unsafe {
            gemm_into_f32(
                portable.as_mut_ptr(),
                n,
                Mat::new(&ar, m, k),
                Mat::new(&br, k, n),
                how,
            )
        };
        for (t, p) in tiles.iter().zip(&portable) {
            assert!((t - p).abs() <= 1e-4, "{t} vs {p}");
        }
    }
}
