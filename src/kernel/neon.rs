//! The aarch64 Advanced SIMD (NEON) kernel: tiles of [`ROWS`] rows × 16 columns (a quarter
//! panel), i.e. `ROWS × 4` q-register accumulators out of 32, filled by `rank` rounds of
//! `fmla` with a duplicated `U[i,k]`. Columns past the last multiple of 16 go through a small
//! zero-padded copy of the rows, so the tail runs the very same vector code. `W` is read in
//! the input dtype and the output written in the output dtype (the same buffer when merging
//! in place); `convert` runs the same loads and stores 16 elements at a time.
//!
//! Conversions: F16 by `fcvtl` / `fcvtn` (inline assembly, so no unstable or recent `f16`
//! intrinsics are needed) — exact / round-to-nearest-even with subnormals kept under the
//! default FPCR (RNE, FZ = FZ16 = DN = 0, which Rust code never changes); BF16 by a 16-bit
//! shift and integer RNE on the f32 bits; a NaN sum first becomes the f32 quiet NaN
//! `0x7FC00000`, which narrows to the canonical NaN.
//!
//! Tested bit for bit against the reference (`tests/kernels/`) under `qemu-aarch64` user-mode
//! emulation (`--target aarch64-unknown-linux-gnu`), not yet on aarch64 hardware; its
//! performance is unmeasured.
#![deny(unsafe_op_in_unsafe_fn)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::driver::dcode::{elem_size, BF16, F16, F32};
use super::driver::{Job, Rows};
use super::{panels_per_block, PANEL};
use crate::dtype::{DType, CANONICAL_NAN_F32};

/// f32 lanes per vector.
const LANES: usize = 4;
/// Vectors per tile row.
const VECS: usize = 4;
/// Columns per tile.
const WIDTH: usize = LANES * VECS;
/// Rows per tile: `ROWS × VECS` accumulators + `VECS` `V` registers + 1 broadcast ≤ 32.
const ROWS: usize = 6;

padded_tile_driver!("neon");
padded_convert_driver!("neon");

/// One tile: `RR` rows × `WIDTH` columns.
///
/// # Safety
/// `u` points at `RR` rows of `rank` f32 (stride `rank`), `v` at `rank` rows of `WIDTH` f32
/// (stride `PANEL`); `io.src` at `RR` rows of `WIDTH` readable elements of dtype `FROM`,
/// `io.dst` at `RR` rows of `WIDTH` writable elements of dtype `TO`, either disjoint or the
/// same bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn tile<const FROM: u8, const TO: u8, const RR: usize>(
    u: *const f32,
    rank: usize,
    v: *const f32,
    io: Rows,
) {
    let mut acc = [[vdupq_n_f32(0.0); VECS]; RR];
    for k in 0..rank {
        let mut vk = [vdupq_n_f32(0.0); VECS];
        for (c, vkc) in vk.iter_mut().enumerate() {
            // SAFETY: row `k < rank` of `v` has WIDTH floats.
            *vkc = unsafe { vld1q_f32(v.add(k * PANEL + c * LANES)) };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: row `r < RR` of `u` has `rank > k` floats.
            let uk = vdupq_n_f32(unsafe { *u.add(r * rank + k) });
            for (a, &vkc) in acc_r.iter_mut().zip(&vk) {
                // a + vkc·uk, fused: the contract's fma(U, V, acc).
                *a = vfmaq_f32(*a, vkc, uk);
            }
        }
    }
    // Every load of the tile before any of its stores: rows are often a multiple of 4 KiB
    // apart, and a load after a store to the same offset of another row would wait on a false
    // (4K-aliased) dependency.
    for (r, acc_r) in acc.iter_mut().enumerate() {
        for (c, a) in acc_r.iter_mut().enumerate() {
            // SAFETY: the LANES elements at column `c · LANES` of row `r` of `W` are readable.
            let x = unsafe {
                load::<FROM>(io.src.add(r * io.src_stride + c * LANES * elem_size(FROM)))
            };
            *a = vaddq_f32(x, *a);
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, &a) in acc_r.iter().enumerate() {
            // SAFETY: the LANES elements at column `c · LANES` of row `r` of the output are
            // writable.
            unsafe { store::<TO>(io.dst.add(r * io.dst_stride + c * LANES * elem_size(TO)), a) };
        }
    }
}

/// Convert `WIDTH` elements of dtype `FROM` at `src` into dtype `TO` at `dst`.
///
/// # Safety
/// The `WIDTH` elements at `src` must be readable, those at `dst` writable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn convert_chunk<const FROM: u8, const TO: u8>(src: *const u8, dst: *mut u8) {
    for c in 0..VECS {
        // SAFETY: the caller's contract.
        unsafe {
            let x = load::<FROM>(src.add(c * LANES * elem_size(FROM)));
            store::<TO>(dst.add(c * LANES * elem_size(TO)), x)
        }
    }
}

/// Widen 4 F16 to f32 (exact).
#[inline]
#[target_feature(enable = "neon")]
fn f16_to_f32(h: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: `fcvtl` reads and writes only the named vector registers (and may set FPSR's
    // cumulative exception flags, which is why `preserves_flags` is not claimed).
    unsafe {
        asm!(
            "fcvtl {out:v}.4s, {h:v}.4h",
            h = in(vreg) h,
            out = lateout(vreg) out,
            options(pure, nomem, nostack)
        );
    }
    out
}

/// Narrow 4 f32 to F16, round to nearest even (the default FPCR rounding mode).
#[inline]
#[target_feature(enable = "neon")]
fn f32_to_f16(x: float32x4_t) -> uint16x4_t {
    let out: uint16x4_t;
    // SAFETY: as in `f16_to_f32`.
    unsafe {
        asm!(
            "fcvtn {out:v}.4h, {x:v}.4s",
            x = in(vreg) x,
            out = lateout(vreg) out,
            options(pure, nomem, nostack)
        );
    }
    out
}

/// Load 4 elements of dtype `D` at `p`, widened exactly to f32.
///
/// # Safety
/// The 4 elements at `p` must be readable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load<const D: u8>(p: *const u8) -> float32x4_t {
    // SAFETY: the caller's contract.
    unsafe {
        match D {
            F16 => f16_to_f32(vld1_u16(p.cast())),
            BF16 => vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.cast()))),
            _ => vld1q_f32(p.cast()),
        }
    }
}

/// Round 4 f32 to dtype `D` (RNE, canonical NaN) and store them at `p`.
///
/// # Safety
/// The 4 elements at `p` must be writable.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn store<const D: u8>(p: *mut u8, x: float32x4_t) {
    let not_nan = vceqq_f32(x, x);
    let x = vbslq_f32(not_nan, x, vdupq_n_f32(f32::from_bits(CANONICAL_NAN_F32)));
    // SAFETY: the caller's contract.
    unsafe {
        match D {
            F16 => vst1_u16(p.cast(), f32_to_f16(x)),
            BF16 => {
                let bits = vreinterpretq_u32_f32(x);
                let odd = vandq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(1));
                let bias = vaddq_u32(odd, vdupq_n_u32(0x7FFF));
                vst1_u16(p.cast(), vshrn_n_u32::<16>(vaddq_u32(bits, bias)))
            }
            _ => vst1q_f32(p.cast(), x),
        }
    }
}
