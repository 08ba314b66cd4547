//! The AVX-512 kernels: tiles of [`ROWS`] rows × one 64-column panel, i.e. `ROWS × 4` zmm
//! accumulators, filled by `rank` rounds of `vfmadd231ps` (one load of each `V` vector per
//! round serves all rows, one broadcast of `U[i,k]` all columns). Partial panels at the right
//! edge use masked loads of `W` and stores of the output; packed `V` is zero-padded there, so
//! its loads need no mask. `W` is read in the input dtype and the output written in the
//! output dtype (the same buffer when merging in place); `convert` runs the same row loads and
//! stores, 64 elements at a time.
//!
//! Two builds of the same code (the `kernel!` macro): `base` needs AVX-512 F/BW/VL/DQ, `bf16`
//! also AVX512_BF16, whose `vcvtne2ps2bf16` narrows 32 values in one instruction.
//!
//! # Conversions (each checked bit for bit against [`crate::dtype`] by `tests/kernels/`)
//! * Widening: F16 by `vcvtph2ps`, BF16 by a 16-bit shift; both exact.
//! * NaN: a NaN sum is replaced by the f32 quiet NaN `0x7FC00000`, which both narrowings
//!   below turn into the canonical `0x7E00` / `0x7FC0` (and F32 stores as is).
//! * F16: `vcvtps2ph` with an explicit round-to-nearest-even immediate — RNE, subnormals kept
//!   (MXCSR.FTZ does not apply to it; DAZ is never set by Rust code), overflow to ±inf.
//! * BF16, `base` build: integer RNE on the bits, `(x + 0x7FFF + ((x >> 16) & 1)) >> 16`,
//!   which keeps subnormals and overflows to ±inf.
//! * BF16, `bf16` build: `vcvtne2ps2bf16` is RNE with overflow to ±inf but flushes subnormal
//!   inputs and outputs to zero and keeps NaN payloads. So each tile row is first classified
//!   with `vfpclassps` (NaN or subnormal sums); rows with any take the integer path above.
//!   Both kernels appear in [`super::Kernel::available`], so both are tested here.
//!
//! Rust 1.89 stabilised the AVX-512 intrinsics, hence the crate's `rust-version`.
#![deny(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::driver::dcode::{elem_size, BF16, F16, F32};
use super::driver::{Job, Rows};
use super::{panels_per_block, PANEL};
use crate::dtype::{DType, CANONICAL_NAN_F32};

/// f32 lanes per vector.
const LANES: usize = 16;
/// Vectors per tile row: one panel.
const VECS: usize = PANEL / LANES;
/// Rows per tile: `ROWS × VECS` accumulators + `VECS` `V` registers (+ broadcasts) out of 32.
/// Measured on Zen 5: 4 × 64 beats 6 × 64, 8 × 32 and 2 × 64 (more rows spill or leave less
/// room to overlap one tile's rounding with the next tile's FMAs).
const ROWS: usize = 4;
/// Prefetch the `W` rows this many tiles ahead (helps when `W` comes from L3 or DRAM).
const PREFETCH_TILES: usize = 4;

/// The lanes of each vector of a row of `PANEL` columns that hold the first `left` columns.
fn masks(left: usize) -> [u16; VECS] {
    let mut masks = [0u16; VECS];
    for (c, m) in masks.iter_mut().enumerate() {
        let valid = left.saturating_sub(c * LANES).min(LANES);
        *m = ((1u32 << valid) - 1) as u16;
    }
    masks
}

/// Lanes of `x` that `vcvtne2ps2bf16` would not round like the contract: NaN (QNaN | SNaN)
/// and subnormal.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn bf16_special(x: __m512) -> u16 {
    _mm512_fpclass_ps_mask::<{ 0x81 | 0x20 }>(x)
}

/// Narrow 2 × 16 f32 (no NaN, no subnormal) to 32 BF16, RNE: `lo` to the low 16 words.
///
/// # Safety
/// The CPU must support avx512f and avx512bf16 (an `unsafe fn`, not only a target-feature
/// one, so that the `base` build, which never calls it, can still name it).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
unsafe fn bf16_pair_native(lo: __m512, hi: __m512) -> __m512i {
    let h = _mm512_cvtne2ps_pbh(hi, lo);
    // SAFETY: `__m512bh` and `__m512i` are both 64-byte plain vectors.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(h) }
}

/// The kernel body, instantiated once per set of target features: `$native_bf16` says
/// whether the features include avx512bf16 (so `bf16_pair_native` may be used).
macro_rules! kernel {
    ($features:literal, $native_bf16:literal) => {
        use super::*;

        tile_driver!($features, 1 2 3);

        /// Rows `r .. r + RR` of `job`, panels `p0 .. p1`.
        #[inline]
        #[target_feature(enable = $features)]
        fn rows<const FROM: u8, const TO: u8, const RR: usize>(
            job: &Job,
            r: usize,
            p0: usize,
            p1: usize,
        ) {
            let (rank, cols) = (job.rank, job.cols);
            let u = &job.u[r * rank..(r + RR) * rank];
            let panels = &job.panels[p0 * rank * PANEL..p1 * rank * PANEL];
            for p in p0..p1 {
                let c0 = p * PANEL;
                // (Not dereferenced when `rank == 0`, where `panels` is empty.)
                let v = panels.as_ptr().wrapping_add((p - p0) * rank * PANEL);
                let io = job.rows.at::<FROM, TO>(r, c0);
                let left = cols - c0;
                if left >= PANEL {
                    // SAFETY: `u` holds RR rows of `rank` floats and `v` (a panel of the
                    // packed, 64-byte aligned `V`) `rank × PANEL` floats; rows `r .. r + RR
                    // <= n` of the job have columns `c0 .. c0 + PANEL` (its invariant).
                    unsafe {
                        tile::<FROM, TO, RR, false>(u.as_ptr(), rank, v, io, [u16::MAX; VECS])
                    }
                } else {
                    // SAFETY: as above, except that only the `left` columns selected by
                    // `masks` are inside each row, and only those are accessed.
                    unsafe { tile::<FROM, TO, RR, true>(u.as_ptr(), rank, v, io, masks(left)) }
                }
            }
        }

        /// One tile: `RR` rows × `PANEL` columns.
        ///
        /// # Safety
        /// `u` points at `RR` rows of `rank` f32 (stride `rank`), `v` at `rank × PANEL` f32
        /// aligned to 64 bytes; `io.src` at `RR` rows of `PANEL` readable elements of dtype
        /// `FROM` and `io.dst` at `RR` rows of `PANEL` writable elements of dtype `TO` — or,
        /// if `MASKED`, of the elements whose bit is set in `masks` —, either disjoint or the
        /// same bytes.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn tile<const FROM: u8, const TO: u8, const RR: usize, const MASKED: bool>(
            u: *const f32,
            rank: usize,
            v: *const f32,
            io: Rows,
            masks: [u16; VECS],
        ) {
            if !MASKED {
                for r in 0..RR {
                    for line in 0..PANEL * elem_size(FROM) / 64 {
                        let ahead = PREFETCH_TILES * PANEL * elem_size(FROM) + line * 64;
                        // A prefetch never faults, whatever the address.
                        _mm_prefetch::<_MM_HINT_T0>(
                            io.src.wrapping_add(r * io.src_stride + ahead).cast::<i8>(),
                        );
                    }
                }
            }
            let mut acc = [[_mm512_setzero_ps(); VECS]; RR];
            for k in 0..rank {
                let mut vk = [_mm512_setzero_ps(); VECS];
                for (c, vkc) in vk.iter_mut().enumerate() {
                    // SAFETY: `k · PANEL + c · LANES + LANES <= rank · PANEL`; 64-byte aligned.
                    *vkc = unsafe { _mm512_load_ps(v.add(k * PANEL + c * LANES)) };
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    // SAFETY: row `r < RR` of `u` has `rank > k` floats.
                    let uk = _mm512_set1_ps(unsafe { *u.add(r * rank + k) });
                    for (a, &vkc) in acc_r.iter_mut().zip(&vk) {
                        *a = _mm512_fmadd_ps(uk, vkc, *a);
                    }
                }
            }
            // Every load of the tile before any of its stores: rows are often a multiple of
            // 4 KiB apart, and a load after a store to the same offset of another row would
            // wait on a false (4K-aliased) dependency. (In place, it is also what makes each
            // element read before it is overwritten.)
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: row `r < RR` of `W` has the elements the contract allows.
                let x = unsafe { load_row::<FROM, MASKED>(io.src.add(r * io.src_stride), &masks) };
                for (a, x) in acc_r.iter_mut().zip(x) {
                    *a = _mm512_add_ps(x, *a);
                }
            }
            for (r, sums) in acc.iter().enumerate() {
                // SAFETY: row `r < RR` of the output has the elements the contract allows.
                unsafe { store_row::<TO, MASKED>(io.dst.add(r * io.dst_stride), sums, &masks) };
            }
        }

        /// Convert `src` (elements of `from`) into `dst` (as many of `to`); see
        /// [`crate::kernel::Kernel::convert`].
        ///
        /// # Safety
        /// The CPU must support the target features this function is compiled for.
        #[target_feature(enable = $features)]
        pub(in crate::kernel) unsafe fn convert(
            from: DType,
            src: &[u8],
            to: DType,
            dst: &mut [u8],
        ) {
            with_pair!(from, to, convert_all(src, dst))
        }

        /// [`convert`] one panel-wide row of `PANEL` elements at a time, the last masked.
        #[target_feature(enable = $features)]
        fn convert_all<const FROM: u8, const TO: u8>(src: &[u8], dst: &mut [u8]) {
            let n = src.len() / elem_size(FROM);
            assert_eq!(dst.len(), n * elem_size(TO), "as many elements out as in");
            let all = Rows {
                src: src.as_ptr(),
                src_stride: 0,
                dst: dst.as_mut_ptr(),
                dst_stride: 0,
            };
            for e in (0..n).step_by(PANEL) {
                let io = all.at::<FROM, TO>(0, e);
                // SAFETY: elements `e .. min(e + PANEL, n)` are inside `src` and `dst`, two
                // borrows that cannot overlap; only those are accessed.
                unsafe {
                    if n - e >= PANEL {
                        let x = load_row::<FROM, false>(io.src, &[u16::MAX; VECS]);
                        store_row::<TO, false>(io.dst, &x, &[u16::MAX; VECS]);
                    } else {
                        let m = masks(n - e);
                        let x = load_row::<FROM, true>(io.src, &m);
                        store_row::<TO, true>(io.dst, &x, &m);
                    }
                }
            }
        }

        /// Load one row of `PANEL` elements of dtype `FROM` at `p`, widened exactly to f32
        /// (if `MASKED`, only those selected by `masks`, the others 0).
        ///
        /// # Safety
        /// The elements at `p` (the selected ones if `MASKED`) must be readable.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn load_row<const FROM: u8, const MASKED: bool>(
            p: *const u8,
            masks: &[u16; VECS],
        ) -> [__m512; VECS] {
            let mut x = [_mm512_setzero_ps(); VECS];
            for (c, (x, &m)) in x.iter_mut().zip(masks).enumerate() {
                if MASKED && m == 0 {
                    continue;
                }
                // SAFETY: the caller's contract; `load` touches only the selected lanes.
                *x = unsafe { load::<FROM, MASKED>(p.add(c * LANES * elem_size(FROM)), m) };
            }
            x
        }

        /// Round one row of `PANEL` f32 to dtype `TO` and store it at `p` (if `MASKED`, only
        /// the lanes selected by `masks`).
        ///
        /// # Safety
        /// The elements at `p` (the selected ones if `MASKED`) must be writable.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn store_row<const TO: u8, const MASKED: bool>(
            p: *mut u8,
            sums: &[__m512; VECS],
            masks: &[u16; VECS],
        ) {
            if TO == BF16 && $native_bf16 {
                let mut flags = 0u16;
                for &s in sums {
                    flags |= bf16_special(s);
                }
                if flags == 0 {
                    // SAFETY: the caller's contract; this build has avx512bf16.
                    unsafe { store_bf16_native::<MASKED>(p, sums, masks) };
                    return;
                }
            }
            for (c, (&s, &m)) in sums.iter().zip(masks).enumerate() {
                if MASKED && m == 0 {
                    continue;
                }
                // SAFETY: the caller's contract; `store` touches only the selected lanes.
                unsafe { store::<TO, MASKED>(p.add(c * LANES * elem_size(TO)), s, m) };
            }
        }

        /// Round one tile row of sums without NaNs or subnormals to BF16 with
        /// `vcvtne2ps2bf16` and store it at `p` (only the lanes selected by `masks` if
        /// `MASKED`).
        ///
        /// # Safety
        /// The CPU must support avx512bf16; the `PANEL` elements at `p` (the selected ones if
        /// `MASKED`) must be writable.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn store_bf16_native<const MASKED: bool>(
            p: *mut u8,
            sums: &[__m512; VECS],
            masks: &[u16; VECS],
        ) {
            for c in (0..VECS).step_by(2) {
                // SAFETY: the caller's contract: avx512bf16, and 32 elements from column
                // `c · LANES` (the selected ones if `MASKED`).
                unsafe {
                    let h = bf16_pair_native(sums[c], sums[c + 1]);
                    let q = p.add(c * LANES * 2);
                    if MASKED {
                        let m = (masks[c + 1] as u32) << 16 | masks[c] as u32;
                        _mm512_mask_storeu_epi16(q.cast(), m, h);
                    } else {
                        _mm512_storeu_si512(q.cast(), h);
                    }
                }
            }
        }

        /// Load 16 elements of dtype `D` at `p` (only those selected by `m` if `MASKED`,
        /// others 0), widened exactly to f32.
        ///
        /// # Safety
        /// The 16 elements at `p` (the selected ones if `MASKED`) must be readable.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn load<const D: u8, const MASKED: bool>(p: *const u8, m: u16) -> __m512 {
            // SAFETY: the caller's contract; masked-off lanes are not accessed.
            unsafe {
                if D == F32 {
                    if MASKED {
                        _mm512_maskz_loadu_ps(m, p.cast())
                    } else {
                        _mm512_loadu_ps(p.cast())
                    }
                } else {
                    let h = if MASKED {
                        _mm256_maskz_loadu_epi16(m, p.cast())
                    } else {
                        _mm256_loadu_si256(p.cast())
                    };
                    if D == F16 {
                        _mm512_cvtph_ps(h)
                    } else {
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                    }
                }
            }
        }

        /// Round 16 f32 to dtype `D` — RNE, canonical NaN, subnormals kept — and store them
        /// at `p` (only the lanes selected by `m` if `MASKED`).
        ///
        /// # Safety
        /// The 16 elements at `p` (the selected ones if `MASKED`) must be writable.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn store<const D: u8, const MASKED: bool>(p: *mut u8, x: __m512, m: u16) {
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            let canonical = _mm512_castsi512_ps(_mm512_set1_epi32(CANONICAL_NAN_F32 as i32));
            let x = _mm512_mask_mov_ps(x, nan, canonical);
            // SAFETY: the caller's contract; masked-off lanes are not accessed.
            unsafe {
                if D == F32 {
                    if MASKED {
                        _mm512_mask_storeu_ps(p.cast(), m, x)
                    } else {
                        _mm512_storeu_ps(p.cast(), x)
                    }
                } else {
                    let h = if D == F16 {
                        _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x)
                    } else {
                        let bits = _mm512_castps_si512(x);
                        let odd =
                            _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
                        let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
                        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
                        _mm512_cvtepi32_epi16(rounded)
                    };
                    if MASKED {
                        _mm256_mask_storeu_epi16(p.cast(), m, h)
                    } else {
                        _mm256_storeu_si256(p.cast(), h)
                    }
                }
            }
        }
    };
}

/// AVX-512 F/BW/VL/DQ; BF16 rounded with integer operations.
pub(super) mod base {
    kernel!("avx512f,avx512bw,avx512vl,avx512dq", false);
}

/// AVX-512 F/BW/VL/DQ + BF16; BF16 rounded with `vcvtne2ps2bf16` when exact.
pub(super) mod bf16 {
    kernel!("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16", true);
}
