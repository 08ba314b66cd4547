//! Merge-kernel throughput on one 4096 × 4096 tensor, next to the two passes that bound it:
//! a plain memcpy of the same bytes and a "convert-only" pass (widen to f32 and round back,
//! in place, with the kernels' own rounding and NaN handling, best SIMD available).
//!
//! `cargo bench --bench kernels [-- FILTER...]` — a `harness = false` main that times each
//! case with repeated runs and reports the median (and minimum); FILTERs are substrings of the
//! case labels (`avx512`, `BF16`, `r16`, `2t`, ...). `KERNEL_BENCH_REPS` sets the runs per
//! case (default 15). GB/s counts the bytes of `W` merged (read and rewritten in place) per
//! second; GFLOP/s is `2 · rows · cols · rank / time`. Ratios use medians. On a shared
//! machine set `KERNEL_BENCH_IDLE=1` to wait for an idle CPU before each case.

use std::hint::black_box;
use std::time::Instant;

use lorafs::dtype::DType;
use lorafs::kernel::{Factors, Kernel};

const ROWS: usize = 4096;
const COLS: usize = 4096;
const RANKS: [usize; 3] = [8, 16, 64];
const DTYPES: [DType; 2] = [DType::F16, DType::BF16];
const THREADS: [usize; 2] = [1, 2];

/// Deterministic pseudo-random f32 in [-1, 1).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn weights(dtype: DType) -> Vec<u8> {
    let mut w = vec![0u8; ROWS * COLS * dtype.size()];
    for (i, x) in values(ROWS * COLS, 1, 0.05).into_iter().enumerate() {
        dtype.store(&mut w, i, x);
    }
    w
}

/// (median, minimum) wall time in seconds of `reps` runs of `f` after one warm-up run.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0])
}

/// Busy and total jiffies of all CPUs, from `/proc/stat`.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

/// With `KERNEL_BENCH_IDLE=1`, wait (at most a minute) until the machine has been idle
/// (≥ 97% idle CPU) for a second: on a shared machine, other work skews the timings.
fn wait_idle() {
    if std::env::var_os("KERNEL_BENCH_IDLE").is_none() {
        return;
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let mut quiet = 0;
    while quiet < 4 && Instant::now() < deadline {
        let Some((b0, t0)) = cpu_jiffies() else {
            return;
        };
        std::thread::sleep(std::time::Duration::from_millis(250));
        let Some((b1, t1)) = cpu_jiffies() else {
            return;
        };
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        quiet = if busy <= 0.03 { quiet + 1 } else { 0 };
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Run `f(first_row, rows_bytes)` on `threads` contiguous row ranges of `data` in parallel.
fn split_rows(
    data: &mut [u8],
    row_bytes: usize,
    threads: usize,
    f: impl Fn(usize, &mut [u8]) + Sync,
) {
    if threads == 1 {
        return f(0, data);
    }
    let rows = data.len() / row_bytes;
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in data.chunks_mut(per * row_bytes).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

/// Widen every element to f32 and round it back in place: the conversion work of a merge
/// without the FMAs, with the same rounding (RNE, subnormals kept) and NaN canonicalisation,
/// using the same instructions as the best kernel.
fn convert_only(dtype: DType, data: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && data.len().is_multiple_of(64)
    {
        let native_bf16 = is_x86_feature_detected!("avx512bf16");
        // SAFETY: the features were just detected; the length is a whole number of vectors.
        return unsafe { x86::convert_avx512(dtype, data, native_bf16) };
    }
    for i in 0..data.len() / dtype.size() {
        let x = dtype.load(data, i);
        dtype.store(data, i, x);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use lorafs::dtype::DType;

    /// # Safety
    /// Needs avx512f/bw/vl/dq (and avx512bf16 if `native_bf16`); `data.len()` must be a
    /// multiple of 64.
    pub unsafe fn convert_avx512(dtype: DType, data: &mut [u8], native_bf16: bool) {
        // SAFETY: the caller's contract.
        unsafe {
            match (dtype, native_bf16) {
                (DType::F16, _) => convert_f16(data),
                (_, false) => convert_bf16(data),
                (_, true) => convert_bf16_native(data),
            }
        }
    }

    /// 16 f32 with NaNs replaced by the quiet NaN `0x7FC00000`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn canonical_nan(x: __m512) -> __m512 {
        let canonical = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC0_0000));
        _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), canonical)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    fn bf16_widen(h: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// BF16 RNE on the bits, subnormals kept, canonical NaN.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    fn bf16_narrow(x: __m512) -> __m256i {
        let bits = _mm512_castps_si512(canonical_nan(x));
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
        _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias)))
    }

    /// # Safety
    /// avx512f/bw/vl/dq; `data.len()` a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn convert_f16(data: &mut [u8]) {
        for chunk in data.chunks_exact_mut(32) {
            let p = chunk.as_mut_ptr().cast::<__m256i>();
            // SAFETY: the 32 bytes at `p` are `chunk`.
            unsafe {
                let x = canonical_nan(_mm512_cvtph_ps(_mm256_loadu_si256(p)));
                let out = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                _mm256_storeu_si256(p, out);
            }
        }
    }

    /// # Safety
    /// avx512f/bw/vl/dq; `data.len()` a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn convert_bf16(data: &mut [u8]) {
        for chunk in data.chunks_exact_mut(32) {
            let p = chunk.as_mut_ptr().cast::<__m256i>();
            // SAFETY: the 32 bytes at `p` are `chunk`.
            unsafe { _mm256_storeu_si256(p, bf16_narrow(bf16_widen(_mm256_loadu_si256(p)))) };
        }
    }

    /// Like the `avx512bf16` kernel: `vcvtne2ps2bf16` unless a NaN or subnormal is present.
    ///
    /// # Safety
    /// avx512f/bw/vl/dq + avx512bf16; `data.len()` a multiple of 64.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
    unsafe fn convert_bf16_native(data: &mut [u8]) {
        for chunk in data.chunks_exact_mut(64) {
            let p = chunk.as_mut_ptr().cast::<__m256i>();
            // SAFETY: the 64 bytes at `p` are `chunk`; `__m512bh` and `__m512i` are plain
            // 64-byte vectors.
            unsafe {
                let x0 = bf16_widen(_mm256_loadu_si256(p));
                let x1 = bf16_widen(_mm256_loadu_si256(p.add(1)));
                let special =
                    _mm512_fpclass_ps_mask::<0xA1>(x0) | _mm512_fpclass_ps_mask::<0xA1>(x1);
                if special == 0 {
                    let out: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
                    _mm512_storeu_si512(p.cast(), out);
                } else {
                    _mm256_storeu_si256(p, bf16_narrow(x0));
                    _mm256_storeu_si256(p.add(1), bf16_narrow(x1));
                }
            }
        }
    }
}

struct Row {
    label: String,
    /// (median, min) seconds.
    secs: (f64, f64),
    bytes: usize,
    flops: f64,
    /// Median seconds of memcpy and of the convert-only pass, same dtype and threads.
    base: (f64, f64),
}

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted =
        |label: &str| filters.is_empty() || filters.iter().all(|f| label.contains(f.as_str()));
    let reps: usize = std::env::var("KERNEL_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let kernels = Kernel::available();
    eprintln!(
        "kernels: {:?}; tensor {ROWS}x{COLS}; median of {reps} runs; {} CPUs; load average {}",
        kernels.iter().map(|k| k.name()).collect::<Vec<_>>(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        loadavg()
    );
    let mut table: Vec<Row> = Vec::new();
    for dtype in DTYPES {
        let bytes = ROWS * COLS * dtype.size();
        let mut w = weights(dtype);
        let row_bytes = COLS * dtype.size();
        for threads in THREADS {
            let tag = format!("{} {}t", dtype.name(), threads);
            // A memcpy of the same bytes into a second buffer, split the same way.
            let mut dst = vec![0u8; bytes];
            wait_idle();
            let copy = time(reps, || {
                let per = bytes / threads;
                split_rows(&mut dst, per, threads, |i, d| {
                    d.copy_from_slice(&w[i * per..i * per + d.len()])
                });
                black_box(&mut dst);
            });
            drop(dst);
            wait_idle();
            let convert = time(reps, || {
                split_rows(&mut w, row_bytes, threads, |_, d| convert_only(dtype, d));
                black_box(&mut w);
            });
            // The same pass one element at a time with `DType::load`/`store` (the `half`
            // crate), for scale: what an unvectorised merge could at best reach.
            wait_idle();
            let convert_scalar = time(reps, || {
                split_rows(&mut w, row_bytes, threads, |_, d| {
                    for i in 0..d.len() / dtype.size() {
                        let x = dtype.load(d, i);
                        dtype.store(d, i, x);
                    }
                });
                black_box(&mut w);
            });
            let base = (copy.0, convert.0);
            for (label, secs) in [
                (format!("memcpy {tag}"), copy),
                (format!("convert-only {tag}"), convert),
                (format!("convert-only scalar {tag}"), convert_scalar),
            ] {
                eprintln!("{label:<28} {:>8.2} ms", secs.0 * 1e3);
                table.push(Row {
                    label,
                    secs,
                    bytes,
                    flops: 0.0,
                    base,
                });
            }
            for &rank in &RANKS {
                // Small factors, so that the repeated in-place merges keep W in its range.
                let f = Factors::new(
                    ROWS,
                    rank,
                    COLS,
                    values(ROWS * rank, 2, 0.01),
                    values(rank * COLS, 3, 0.01),
                );
                for &kernel in &kernels {
                    let label = format!("{} {tag} r{rank}", kernel.name());
                    // The scalar reference (a software fma per element) only as a reference.
                    if !wanted(&label) || (kernel == Kernel::Scalar && threads > 1) {
                        continue;
                    }
                    let reps = if kernel == Kernel::Scalar { 3 } else { reps };
                    wait_idle();
                    let secs = time(reps, || {
                        split_rows(&mut w, row_bytes, threads, |row0, d| {
                            kernel.merge(dtype, &f, row0, d)
                        });
                        black_box(&mut w);
                    });
                    eprintln!("{label:<28} {:>8.2} ms", secs.0 * 1e3);
                    table.push(Row {
                        label,
                        secs,
                        bytes,
                        flops: 2.0 * (ROWS * COLS * rank) as f64,
                        base,
                    });
                }
            }
        }
    }
    eprintln!("load average {}", loadavg());
    println!();
    println!("| case | median ms | min ms | GB/s | GFLOP/s | vs memcpy | vs convert-only |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &table {
        let (median, min) = r.secs;
        let gflops = if r.flops > 0.0 {
            format!("{:.1}", r.flops / median / 1e9)
        } else {
            "-".into()
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {} | {:.0}% | {:.0}% |",
            r.label,
            median * 1e3,
            min * 1e3,
            r.bytes as f64 / median / 1e9,
            gflops,
            r.base.0 / median * 100.0,
            r.base.1 / median * 100.0,
        );
    }
}
