//! Merge-kernel throughput on one 4096 × 4096 tensor, next to the passes that bound it: a
//! plain memcpy of the same bytes, a "convert-only" pass (widen to f32 and round back, in
//! place, with the kernels' own rounding and NaN handling, AVX-512 where the CPU has it, else one element at a time) and, on
//! AVX-512 machines, "fma-only": the best kernel's register tile doing its FMAs without
//! touching `W`, the compute floor of a merge at that rank.
//!
//! A second part ("stream" rows) runs the baselines and the best kernel over 16 copies of the
//! tensor one after the other (512 MiB), far more than the last-level cache, as when a model
//! is merged from the page cache. A third ("cross", `kernels/cross.rs`: rows named like
//! `F32>BF16`) times `merge_into` and `convert` from one dtype into another.
//!
//! `cargo bench --bench kernels [-- FILTER...]` — a `harness = false` main that times each
//! case with repeated runs and reports the median (and minimum); FILTERs are substrings of the
//! case labels (`avx512`, `BF16`, `r16`, `2t`, ...; the stream part runs only with no filter
//! or with `stream` among them, the cross part with no filter or one containing `>`). `KERNEL_BENCH_REPS` sets the runs per case (default 15).
//! GB/s counts the bytes of `W` merged (read and rewritten in place) per second; GFLOP/s is
//! `2 · rows · cols · rank / time`. "vs memcpy" uses the median of the set's memcpy runs;
//! "vs convert-only" that of a block of convert-only runs timed just before the case's, so a
//! machine that gets slower or faster between cases does not skew it. On a shared machine set `KERNEL_BENCH_IDLE=1` to wait for an idle CPU before each case.

#[path = "kernels/cross.rs"]
mod cross;

use std::hint::black_box;
use std::time::Instant;

use lorafs::dtype::DType;
use lorafs::kernel::{Factors, Kernel};

const ROWS: usize = 4096;
const COLS: usize = 4096;
const RANKS: [usize; 3] = [8, 16, 64];
const DTYPES: [DType; 2] = [DType::F16, DType::BF16];
const THREADS: [usize; 2] = [1, 2];
/// Tensors in a streaming set: 16 × 32 MiB, far more than the last-level cache.
const STREAM_TENSORS: usize = 16;

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

/// [`time`] of `base`, then of `case`, on the same data: returns the (median, minimum) of
/// `case` and the median of `base`. Ratios of the two are not skewed by the machine getting
/// slower or faster between cases (a shared VM), and each block of runs starts with a warm-up
/// run, so neither is timed just after the other. (Interleaving single runs was tried: the
/// pass after a merge or an FMA-only run is then slower by up to 30%, a bias, not noise.)
fn time_beside(
    reps: usize,
    data: &mut [u8],
    mut base: impl FnMut(&mut [u8]),
    mut case: impl FnMut(&mut [u8]),
) -> ((f64, f64), f64) {
    let b = time(reps, || {
        base(data);
        black_box(&mut *data);
    });
    let c = time(reps, || {
        case(data);
        black_box(&mut *data);
    });
    (c, b.0)
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
    if Kernel::Avx512.is_supported() && data.len().is_multiple_of(64) {
        let native_bf16 = Kernel::Avx512Bf16.is_supported();
        // SAFETY: the features were just detected; the length is a whole number of vectors.
        return unsafe { x86::convert_avx512(dtype, data, native_bf16) };
    }
    convert_scalar(dtype, data);
}

/// The same pass one element at a time with `DType::load`/`store` (the `half` crate).
fn convert_scalar(dtype: DType, data: &mut [u8]) {
    for i in 0..data.len() / dtype.size() {
        let x = dtype.load(data, i);
        dtype.store(data, i, x);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// One cache line of f32, so the panels are 64-byte aligned like the kernels' packed `V`.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([f32; 16]);

    /// A packed `V` of the kernels' shape (panels of `rank × 64` floats); the values do not
    /// matter to the FMA-only bound.
    pub struct Panels {
        lines: Vec<Line>,
    }

    impl Panels {
        pub fn new(rank: usize, cols: usize) -> Panels {
            Panels {
                lines: vec![Line([0.5; 16]); cols.div_ceil(64) * rank * 4],
            }
        }
    }

    /// The avx512 kernel's tile loop (4 rows × 64 columns of accumulators, `rank` rounds of
    /// one `V` load per vector and one `U` broadcast per row) over the rows of `u` and every
    /// panel, without touching `W`: each tile's sums are only added into a running total.
    ///
    /// # Safety
    /// Needs avx512f.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_only(u: &[f32], rank: usize, v: &Panels) -> f32 {
        const ROWS: usize = 4;
        let mut total = _mm512_setzero_ps();
        for rows in u.chunks_exact(ROWS * rank) {
            for panel in v.lines.chunks_exact(rank * 4) {
                let mut acc = [[_mm512_setzero_ps(); 4]; ROWS];
                for k in 0..rank {
                    let vk: [__m512; 4] = std::array::from_fn(|c| {
                        // SAFETY: `Line` is 16 aligned f32, in bounds by construction.
                        unsafe { _mm512_load_ps(panel[k * 4 + c].0.as_ptr()) }
                    });
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let uk = _mm512_set1_ps(rows[r * rank + k]);
                        for (a, &vkc) in acc_r.iter_mut().zip(&vk) {
                            *a = _mm512_fmadd_ps(uk, vkc, *a);
                        }
                    }
                }
                // A tree of adds, so the running total is one dependent add per tile.
                let a = acc
                    .map(|r| _mm512_add_ps(_mm512_add_ps(r[0], r[1]), _mm512_add_ps(r[2], r[3])));
                let sum = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                total = _mm512_add_ps(total, sum);
            }
        }
        _mm512_reduce_add_ps(total)
    }

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
        let canonical =
            _mm512_castsi512_ps(_mm512_set1_epi32(lorafs::dtype::CANONICAL_NAN_F32 as i32));
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
    /// Median seconds of memcpy (same dtype, threads and data) and of the convert-only pass
    /// (the same, timed just before this case).
    base: (f64, f64),
}

/// One set of cases: a dtype, a thread count and the data they run over (`tensors` copies of
/// the 4096 × 4096 tensor, one after the other, each merged once per run).
struct Set {
    dtype: DType,
    threads: usize,
    tensors: usize,
}

impl Set {
    fn tag(&self) -> String {
        let stream = if self.tensors > 1 { " stream" } else { "" };
        format!("{} {}t{stream}", self.dtype.name(), self.threads)
    }
}

struct Bench {
    reps: usize,
    filters: Vec<String>,
    table: Vec<Row>,
}

impl Bench {
    fn wanted(&self, label: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().all(|f| label.contains(f.as_str()))
    }

    fn push(
        &mut self,
        label: String,
        secs: (f64, f64),
        bytes: usize,
        flops: f64,
        base: (f64, f64),
    ) {
        eprintln!("{label:<34} {:>8.2} ms", secs.0 * 1e3);
        self.table.push(Row {
            label,
            secs,
            bytes,
            flops,
            base,
        });
    }

    /// The baselines, the FMA-only bound and every kernel at every rank, on one set.
    fn run(&mut self, set: &Set, kernels: &[Kernel]) {
        let Set {
            dtype,
            threads,
            tensors,
        } = *set;
        let tag = set.tag();
        let reps = self.reps;
        let one = weights(dtype);
        let bytes = one.len() * tensors;
        let mut w = one.repeat(tensors);
        drop(one);
        let tensor_bytes = bytes / tensors;
        let row_bytes = COLS * dtype.size();
        // Each tensor split over the threads by rows, tensors one after the other.
        let each = |w: &mut [u8], f: &(dyn Fn(usize, &mut [u8]) + Sync)| {
            for t in w.chunks_mut(tensor_bytes) {
                split_rows(t, row_bytes, threads, f);
            }
        };
        // A memcpy of the same bytes into a second buffer, split the same way.
        let mut dst = vec![0u8; bytes];
        wait_idle();
        let copy = time(reps, || {
            for (t, d) in w.chunks(tensor_bytes).zip(dst.chunks_mut(tensor_bytes)) {
                let per = tensor_bytes.div_ceil(threads);
                split_rows(d, per, threads, |i, d| {
                    d.copy_from_slice(&t[i * per..i * per + d.len()])
                });
            }
            black_box(&mut dst);
        });
        drop(dst);
        let convert = |w: &mut [u8]| each(w, &|_, d| convert_only(dtype, d));
        wait_idle();
        let convert_secs = time(reps, || convert(&mut w));
        let base = (copy.0, convert_secs.0);
        self.push(format!("memcpy {tag}"), copy, bytes, 0.0, base);
        self.push(
            format!("convert-only {tag}"),
            convert_secs,
            bytes,
            0.0,
            base,
        );
        if tensors == 1 {
            // For scale: what an unvectorised merge could at best reach.
            wait_idle();
            let scalar = time(reps, || {
                each(&mut w, &|_, d| convert_scalar(dtype, d));
                black_box(&mut w);
            });
            self.push(
                format!("convert-only scalar {tag}"),
                scalar,
                bytes,
                0.0,
                base,
            );
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
            let flops = 2.0 * (ROWS * COLS * rank * tensors) as f64;
            let label = format!("fma-only {tag} r{rank}");
            if tensors == 1 && self.wanted(&label) {
                if let Some(fma) = fma_only(&f, threads) {
                    wait_idle();
                    let (secs, convert_med) = time_beside(reps, &mut w, convert, fma);
                    self.push(label, secs, bytes, flops, (copy.0, convert_med));
                }
            }
            for &kernel in kernels {
                let label = format!("{} {tag} r{rank}", kernel.name());
                // The scalar reference (a software fma per element) only as a reference.
                if !self.wanted(&label) || (kernel == Kernel::Scalar && threads > 1) {
                    continue;
                }
                let reps = if kernel == Kernel::Scalar { 3 } else { reps };
                wait_idle();
                let (secs, convert_med) = time_beside(reps, &mut w, convert, |w: &mut [u8]| {
                    each(w, &|row0, d| kernel.merge(dtype, &f, row0, d))
                });
                self.push(label, secs, bytes, flops, (copy.0, convert_med));
            }
        }
    }
}

/// The FMAs of the best kernel's register tile alone (no `W` loaded, rounded or stored) over
/// the 4096 × 4096 tensor, rows split over `threads`: the compute floor of a merge at this
/// rank. `None` without AVX-512. (The argument, `W`, is not touched.)
#[allow(clippy::type_complexity)]
fn fma_only(f: &Factors, threads: usize) -> Option<Box<dyn Fn(&mut [u8]) + '_>> {
    #[cfg(target_arch = "x86_64")]
    if Kernel::Avx512.is_supported() {
        let v = x86::Panels::new(f.rank, COLS);
        return Some(Box::new(move |_: &mut [u8]| {
            let per = ROWS.div_ceil(threads);
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (u, v) = (&f.u[t * per * f.rank..(t + 1) * per * f.rank], &v);
                    // SAFETY: AVX-512 support was just checked.
                    s.spawn(move || black_box(unsafe { x86::fma_only(u, f.rank, v) }));
                }
            });
        }));
    }
    let _ = (f, threads);
    None
}

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let reps: usize = std::env::var("KERNEL_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let kernels = Kernel::available();
    let best = *kernels
        .last()
        .expect("the scalar kernel is always available");
    eprintln!(
        "kernels: {:?}; tensor {ROWS}x{COLS}; streams of {STREAM_TENSORS}; median of {reps} runs; \
         {} CPUs; load average {}",
        kernels.iter().map(|k| k.name()).collect::<Vec<_>>(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        loadavg()
    );
    let mut bench = Bench {
        reps,
        filters,
        table: Vec::new(),
    };
    for dtype in DTYPES {
        for threads in THREADS {
            let set = Set {
                dtype,
                threads,
                tensors: 1,
            };
            bench.run(&set, &kernels);
        }
    }
    // The same with data much larger than the last-level cache, as when a model is merged
    // from the page cache: the best kernel only.
    for dtype in DTYPES {
        for threads in THREADS {
            let set = Set {
                dtype,
                threads,
                tensors: STREAM_TENSORS,
            };
            // (Only with no filter or a `stream` filter: these sets are the slow ones.)
            if bench.filters.is_empty() || bench.filters.iter().any(|f| f == "stream") {
                bench.run(&set, &[best]);
            }
        }
    }
    // merge_into and convert across dtypes (only with no filter or one naming a pair, as in
    // `F32>BF16`, or `>` for all).
    if bench.filters.is_empty() || bench.filters.iter().any(|f| f.contains('>')) {
        for (from, to) in cross::PAIRS {
            bench.run_cross(from, to, &kernels);
        }
    }
    eprintln!("load average {}", loadavg());
    println!();
    println!("| case | median ms | min ms | GB/s | GFLOP/s | vs memcpy | vs convert-only |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &bench.table {
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
