//! The binary's allocator: the system's, with large blocks aligned to a cache line.
//!
//! The model's kernels read and write their buffers in 64-byte rows (AVX-512 vectors, AMX tile
//! rows), and a row that straddles two cache lines costs two accesses. glibc aligns blocks to
//! 16 bytes only, and to which multiple of 64 plus 16 depends on where each block lands, so the
//! same training run was fast or up to a fifth slower from one process to the next
//! (bench/training-speed.md, attempt 16).

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks from this size up are aligned to a cache line.
const ALIGN_FROM: usize = 4096;
const CACHE_LINE: usize = 64;

pub struct CacheLineAligned;

/// The layout a block of `layout` is really allocated with.
fn aligned(layout: Layout) -> Layout {
    if layout.size() >= ALIGN_FROM && layout.align() < CACHE_LINE {
        Layout::from_size_align(layout.size(), CACHE_LINE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every call forwards to the system allocator with the layout `aligned` computes from
// the caller's, so each block is freed and resized with the layout it was allocated with.
unsafe impl GlobalAlloc for CacheLineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(aligned(layout))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(aligned(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, aligned(layout))
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = aligned(layout);
        // SAFETY: the caller guarantees `new_size` is a valid size for `layout.align()`.
        let new = aligned(Layout::from_size_align_unchecked(new_size, layout.align()));
        if old.align() == new.align() {
            return System.realloc(ptr, old, new_size);
        }
        // Crossing `ALIGN_FROM` changes the alignment, which `realloc` cannot: move the block.
        let moved = System.alloc(new);
        if !moved.is_null() {
            std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
            System.dealloc(ptr, old);
        }
        moved
    }
}

/// The largest mmap threshold every glibc accepts (half its 64 MiB heap size on 64-bit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Keeps freed large blocks (up to 32 MiB) for reuse instead of returning them to the system.
/// A training step frees and allocates the same large buffers (activations, gradients) every
/// step; by default glibc gives blocks over a threshold that moves with what was freed back to
/// the kernel, and the next allocation takes page faults and fresh zeroed pages. Whether a
/// buffer crossed the moving threshold changed from run to run, and with it the speed (bf16
/// B's backward pass took 70 or 80 ms; attempt 17). Process memory stays at its peak instead.
///
/// The trim threshold is set only once the mmap threshold is: setting it alone freezes the
/// mmap threshold at its 128 KiB default, which costs a third of the speed.
pub fn keep_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: glibc's `mallopt` only changes the allocator's parameters; called before any
    // other thread exists.
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

#[global_allocator]
static ALLOCATOR: CacheLineAligned = CacheLineAligned;

#[cfg(test)]
mod tests {
    #[test]
    fn large_blocks_are_cache_line_aligned_through_growth_and_shrinking() {
        let mut v: Vec<f32> = Vec::with_capacity(8);
        v.extend((0..10_000).map(|i| i as f32));
        assert_eq!(v.as_ptr() as usize % super::CACHE_LINE, 0);
        assert!(
            v.iter().enumerate().all(|(i, &x)| x == i as f32),
            "growth kept the values"
        );
        v.truncate(100);
        v.shrink_to_fit();
        assert!(
            v.iter().enumerate().all(|(i, &x)| x == i as f32),
            "shrinking kept them"
        );
        let zeroed = vec![0u16; 1 << 20];
        assert_eq!(zeroed.as_ptr() as usize % super::CACHE_LINE, 0);
        assert!(zeroed.iter().all(|&x| x == 0));
        // Many blocks at once: glibc alone would put some of them 16, 32 or 48 bytes off.
        let blocks: Vec<Vec<f32>> = (0..32).map(|i| vec![1.0; 1100 + 37 * i]).collect();
        assert!(blocks
            .iter()
            .all(|b| (b.as_ptr() as usize).is_multiple_of(super::CACHE_LINE)));
    }
}
