//! The AVX2 + FMA + F16C kernel: tiles of [`ROWS`] rows × 16 columns (a quarter panel), i.e.
//! `ROWS × 2` ymm accumulators out of 16 registers, filled by `rank` rounds of
//! `vfmadd231ps` with a broadcast `U[i,k]`. Columns past the last multiple of 16 go through a
//! small zero-padded copy of the rows, so the tail runs the very same vector code. `W` is
//! read in the input dtype and the output written in the output dtype (the same buffer when
//! merging in place); `convert` runs the same loads and stores 16 elements at a time.
//!
//! Conversions, each checked bit for bit against [`crate::dtype`] by `tests/kernels/`:
//! F16 by `vcvtph2ps` / `vcvtps2ph` with a round-to-nearest-even immediate (exact, subnormals
//! kept, overflow to ±inf); BF16 by a 16-bit shift and integer RNE on the f32 bits; a NaN sum
//! first becomes the f32 quiet NaN `0x7FC00000`, which narrows to the canonical NaN.
#![deny(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::driver::dcode::{elem_size, BF16, F16, F32};
use super::driver::{Job, Rows};
use super::{panels_per_block, PANEL};
use crate::dtype::{DType, CANONICAL_NAN_F32};

/// f32 lanes per vector.
const LANES: usize = 8;
/// Vectors per tile row.
const VECS: usize = 2;
/// Columns per tile.
const WIDTH: usize = LANES * VECS;
/// Rows per tile: `ROWS × VECS` accumulators + `VECS` `V` registers + 1 broadcast ≤ 16.
const ROWS: usize = 6;

padded_tile_driver!("avx2,fma,f16c");
padded_convert_driver!("avx2,fma,f16c");

/// One tile: `RR` rows × `WIDTH` columns.
///
/// # Safety
/// `u` points at `RR` rows of `rank` f32 (stride `rank`), `v` at `rank` rows of `WIDTH` f32
/// (stride `PANEL`) aligned to 32 bytes; `io.src` at `RR` rows of `WIDTH` readable elements
/// of dtype `FROM`, `io.dst` at `RR` rows of `WIDTH` writable elements of dtype `TO`, either
/// disjoint or the same bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const FROM: u8, const TO: u8, const RR: usize>(
    u: *const f32,
    rank: usize,
    v: *const f32,
    io: Rows,
) {
    let mut acc = [[_mm256_setzero_ps(); VECS]; RR];
    for k in 0..rank {
        let mut vk = [_mm256_setzero_ps(); VECS];
        for (c, vkc) in vk.iter_mut().enumerate() {
            // SAFETY: row `k < rank` of `v` has WIDTH floats, 32-byte aligned.
            *vkc = unsafe { _mm256_load_ps(v.add(k * PANEL + c * LANES)) };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: row `r < RR` of `u` has `rank > k` floats.
            let uk = _mm256_set1_ps(unsafe { *u.add(r * rank + k) });
            for (a, &vkc) in acc_r.iter_mut().zip(&vk) {
                *a = _mm256_fmadd_ps(uk, vkc, *a);
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
            *a = _mm256_add_ps(x, *a);
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        // SAFETY: the WIDTH elements of row `r` of the output are writable.
        unsafe { store_pair::<TO>(io.dst.add(r * io.dst_stride), acc_r[0], acc_r[1]) };
    }
}

/// Convert `WIDTH` elements of dtype `FROM` at `src` into dtype `TO` at `dst`.
///
/// # Safety
/// The `WIDTH` elements at `src` must be readable, those at `dst` writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn convert_chunk<const FROM: u8, const TO: u8>(src: *const u8, dst: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe {
        let a = load::<FROM>(src);
        let b = load::<FROM>(src.add(LANES * elem_size(FROM)));
        store_pair::<TO>(dst, a, b)
    }
}

/// Load 8 elements of dtype `D` at `p`, widened exactly to f32 (NaNs stay NaN).
///
/// # Safety
/// The 8 elements at `p` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load<const D: u8>(p: *const u8) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        match D {
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p.cast()),
            ))),
            _ => _mm256_loadu_ps(p.cast()),
        }
    }
}

/// Replace NaNs by the f32 quiet NaN `0x7FC00000`, which every narrowing below turns into the
/// canonical NaN of its dtype.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn canonical_nan(x: __m256) -> __m256 {
    let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
    _mm256_blendv_ps(
        x,
        _mm256_castsi256_ps(_mm256_set1_epi32(CANONICAL_NAN_F32 as i32)),
        nan,
    )
}

/// f32 bits rounded to nearest even at bit 16: the BF16 value in the high half of each lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bf16_round(x: __m256) -> __m256i {
    let bits = _mm256_castps_si256(x);
    let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)))
}

/// Round 2 × 8 f32 to dtype `D` (RNE, canonical NaN, subnormals kept) and store them as 16
/// consecutive elements at `p`, `a` first.
///
/// # Safety
/// The 16 elements at `p` must be writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_pair<const D: u8>(p: *mut u8, a: __m256, b: __m256) {
    let (a, b) = (canonical_nan(a), canonical_nan(b));
    // SAFETY: the caller's contract.
    unsafe {
        match D {
            F16 => {
                let ha = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(a);
                let hb = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(b);
                _mm256_storeu_si256(p.cast(), _mm256_set_m128i(hb, ha))
            }
            BF16 => {
                let ra = _mm256_srli_epi32::<16>(bf16_round(a));
                let rb = _mm256_srli_epi32::<16>(bf16_round(b));
                // `packus` works per 128-bit lane (a0-3 b0-3 a4-7 b4-7): reorder the quarters.
                let packed = _mm256_packus_epi32(ra, rb);
                _mm256_storeu_si256(p.cast(), _mm256_permute4x64_epi64::<0b11_01_10_00>(packed))
            }
            _ => {
                _mm256_storeu_ps(p.cast(), a);
                _mm256_storeu_ps(p.add(32).cast(), b)
            }
        }
    }
}
