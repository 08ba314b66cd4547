//! Merge kernels: `out[i,:] = round(W[i,:] + Σ_k U[i,k]·V[k,:])` over a block of rows, and
//! plain dtype conversion.
//!
//! # The contract every kernel meets, bit for bit
//! For each output element, with `W` stored in the input dtype and widened exactly to f32:
//! ```text
//! acc = +0.0
//! for k in 0..rank: acc = fma(U[i,k], V[k,j], acc)      // fused, one rounding each
//! out = round_to_dtype(W[i,j] + acc)                    // one f32 add, then one RNE
//! ```
//! `round_to_dtype` rounds into the output dtype ([`Kernel::merge_into`]; the input dtype for
//! [`Kernel::merge`], in place): round-to-nearest-even with subnormals kept and overflow to
//! ±inf, and any NaN result becomes the output dtype's canonical quiet NaN
//! ([`crate::dtype`]), whatever the input NaN's payload. So the result is rounded once,
//! whatever the two dtypes: never into the output dtype before `Δ` is added.
//! [`Kernel::convert`] is `round_to_dtype(W[i])` alone (no addition, so `-0` stays `-0`).
//! [`scalar`] is the reference; every other kernel is tested to produce exactly its bytes
//! (`tests/kernels/`).
//!
//! # The SIMD kernels
//! `avx512` / `avx512bf16` (x86-64 AVX-512 F/BW/VL/DQ, and BF16), `avx2` (x86-64 AVX2 + FMA +
//! F16C) and `neon` (aarch64) all work the same way: a register tile of a few rows × [`PANEL`]
//! (or a slice of it) columns of f32 accumulators is filled by `rank` rounds of vector FMAs —
//! one load of a `V` slice serves every row of the tile, one broadcast of `U[i,k]` every
//! column — and then `W` is loaded, widened, added, rounded and stored once (the same code in
//! place or from one buffer into another: `driver.rs`). Each lane does
//! exactly the scalar sequence of operations above, so the results are the same bits; only
//! the order in which *elements* are computed differs, never the order of the operations
//! *within* an element. Every kernel is chosen at run time (`is_x86_feature_detected!`), so
//! one binary runs everywhere; see `BENCHMARKS.md` ("Kernels") for their speed.
//!
//! `V` is packed once per tensor by [`Factors::new`] into column panels ([`PANEL`] columns
//! wide, `k`-major inside, zero-padded, 64-byte aligned) so the tile reads it contiguously
//! instead of with a stride of `cols` floats (which for `cols = 4096` would make every `V` row
//! of a tile fall into the same L1 set). The columns are walked in blocks of panels whose
//! packed `V` fits in L2 ([`panels_per_block`]), so large ranks do not stream `V` from L3 for
//! every group of rows.
//!
//! A tensor narrower than a panel (`cols < PANEL`) keeps `V` unpadded instead (its one
//! "panel" is `cols` wide): padded, a rank far above the tensor's size (valid PEFT) would
//! cost up to 64 times `V`'s memory. Only the scalar kernel reads that layout, so such
//! tensors are merged by it whatever kernel is selected: the same bits, by the contract.

#[macro_use]
mod driver;
pub mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::OnceLock;

use crate::dtype::DType;
use driver::Job;

/// Width in columns of one packed panel of `V`.
pub(crate) const PANEL: usize = 64;

/// Budget of packed `V` bytes that one column block may use: it is re-read by every group of
/// rows, so it should stay in L2 next to the streamed `W` rows.
const V_BLOCK_BYTES: usize = 256 << 10;

/// How many panels one column block holds for this rank (at least one).
pub(crate) fn panels_per_block(rank: usize) -> usize {
    (V_BLOCK_BYTES / (rank.max(1) * PANEL * 4)).max(1)
}

/// One cache line of 16 f32: the unit of the packed `V`, so it is 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

const _: () = assert!(std::mem::size_of::<Line>() == 64 && PANEL.is_multiple_of(16));

/// Columns of one panel of a tensor's packed `V`: [`PANEL`], or `cols` when that is fewer
/// (at least 1, so that it divides).
fn panel_width(cols: usize) -> usize {
    cols.clamp(1, PANEL)
}

/// Floats per rank of a tensor's packed `V` (`cols` rounded up to whole panels): less than
/// twice `cols`, and `cols` itself below [`PANEL`]. For memory accounting.
pub fn packed_cols(cols: usize) -> usize {
    let width = panel_width(cols);
    cols.div_ceil(width) * width
}

/// `V` packed in column panels of `width` columns: element `(k, p·width + c)` is at
/// `(p·rank + k)·width + c`. `width` is [`PANEL`] (what the SIMD kernels read), or `cols`
/// when that is narrower (one unpadded panel, which the scalar kernel reads).
#[derive(Clone)]
struct PackedV {
    lines: Vec<Line>,
    width: usize,
}

impl PackedV {
    fn new(rank: usize, cols: usize, v: &[f32]) -> PackedV {
        let width = panel_width(cols);
        let panels = cols.div_ceil(width);
        let mut lines = vec![Line([0.0; 16]); (panels * rank * width).div_ceil(16)];
        // SAFETY: `Line` is `repr(C)` around `[f32; 16]` with size 64 (checked above), so
        // the `lines.len() * 16` floats are contiguous, initialised and exclusively borrowed.
        let flat = unsafe {
            std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<f32>(), lines.len() * 16)
        };
        for p in 0..panels {
            let c0 = p * width;
            let n = width.min(cols - c0);
            for k in 0..rank {
                let dst = (p * rank + k) * width;
                flat[dst..dst + n].copy_from_slice(&v[k * cols + c0..k * cols + c0 + n]);
            }
        }
        PackedV { lines, width }
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: as in `new`: the lines are `lines.len() * 16` contiguous initialised f32.
        unsafe {
            std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.lines.len() * 16)
        }
    }
}

impl std::fmt::Debug for PackedV {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedV({} floats)", self.lines.len() * 16)
    }
}

/// The low-rank factors of one merged tensor: `Δ = U @ V` with `U` (rows × rank) and
/// `V` (rank × cols), both row-major f32. Several adapters are concatenated along the rank.
///
/// [`Factors::new`] also packs `V` for the SIMD kernels, so `u` and `v` are read-only after
/// construction: build a new `Factors` to change them.
#[derive(Debug, Clone)]
pub struct Factors {
    pub rows: usize,
    pub rank: usize,
    pub cols: usize,
    pub u: Vec<f32>,
    /// `V`, kept only in the packed layout (one copy in memory); [`Factors::v`] reads it.
    packed: PackedV,
}

impl Factors {
    pub fn new(rows: usize, rank: usize, cols: usize, u: Vec<f32>, v: Vec<f32>) -> Factors {
        assert_eq!(u.len(), rows * rank);
        assert_eq!(v.len(), rank * cols);
        let packed = PackedV::new(rank, cols, &v);
        Factors {
            rows,
            rank,
            cols,
            u,
            packed,
        }
    }

    /// `V[k, j]`.
    #[inline]
    pub fn v(&self, k: usize, j: usize) -> f32 {
        let width = self.packed.width;
        self.packed.as_slice()[((j / width) * self.rank + k) * width + j % width]
    }

    /// Column `j` of `V`: `V[k, j]` for `k` in `0 .. rank`, in order.
    #[inline]
    pub fn v_column(&self, j: usize) -> impl Iterator<Item = f32> + '_ {
        let width = self.packed.width;
        let start = ((j / width) * self.rank) * width + j % width;
        let packed = self.packed.as_slice();
        packed[start.min(packed.len())..]
            .iter()
            .step_by(width)
            .take(self.rank)
            .copied()
    }

    /// Bytes held by the factors (for memory accounting).
    pub fn bytes(&self) -> usize {
        self.u.len() * 4 + self.packed.lines.len() * 64
    }

    /// The packed `V`: `ceil(cols / PANEL)` panels of `rank × PANEL` floats, 64-byte aligned,
    /// when [`Factors::is_panelled`].
    pub(crate) fn panels(&self) -> &[f32] {
        self.packed.as_slice()
    }

    /// Whether `V` is packed in [`PANEL`]-wide panels, which the SIMD kernels need; a tensor
    /// narrower than a panel keeps it unpadded, for the scalar kernel.
    pub fn is_panelled(&self) -> bool {
        self.packed.width == PANEL
    }
}

/// A kernel implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The reference: plain Rust, one element at a time.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C: 6 rows × 16 columns of accumulators.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/DQ: 4 rows × 64 columns of accumulators, masked tails.
    Avx512,
    /// [`Kernel::Avx512`] built with AVX512_BF16 too, for its BF16 rounding instruction.
    Avx512Bf16,
    /// aarch64 Advanced SIMD: 6 rows × 16 columns of accumulators.
    Neon,
}

impl Kernel {
    /// Every kernel, runnable here or not, reference first.
    pub const ALL: [Kernel; 5] = [
        Kernel::Scalar,
        Kernel::Avx2,
        Kernel::Avx512,
        Kernel::Avx512Bf16,
        Kernel::Neon,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Avx512Bf16 => "avx512bf16",
            Kernel::Neon => "neon",
        }
    }

    /// What the kernel needs from the CPU.
    pub fn requires(self) -> &'static str {
        match self {
            Kernel::Scalar => "nothing",
            Kernel::Avx2 => "x86-64 with avx2, fma and f16c",
            Kernel::Avx512 => "x86-64 with avx512f, avx512bw, avx512vl and avx512dq",
            Kernel::Avx512Bf16 => {
                "x86-64 with avx512f, avx512bw, avx512vl, avx512dq and avx512bf16"
            }
            Kernel::Neon => "aarch64 with neon",
        }
    }

    /// Whether this CPU can run the kernel (cheap: the detection is cached by std).
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => {
                Kernel::Avx512.is_supported() && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Whether this build holds the kernel: each SIMD kernel is compiled for its own
    /// architecture only (the `cfg`s of the modules above and of the dispatch).
    pub fn is_compiled(self) -> bool {
        match self {
            Kernel::Scalar => true,
            Kernel::Avx2 | Kernel::Avx512 | Kernel::Avx512Bf16 => cfg!(target_arch = "x86_64"),
            Kernel::Neon => cfg!(target_arch = "aarch64"),
        }
    }

    /// Every kernel of this build, reference first, best last (`lorafs --version`).
    pub fn compiled() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_compiled())
            .collect()
    }

    /// Every kernel this CPU can run, reference first, best last.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_supported())
            .collect()
    }

    /// The kernel in use: `LORAFS_KERNEL` if set (and runnable here), else the best available.
    /// Chosen once per process.
    pub fn selected() -> Kernel {
        static SELECTED: OnceLock<Kernel> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            Kernel::choose(
                &Kernel::available(),
                std::env::var("LORAFS_KERNEL").ok().as_deref(),
            )
        })
    }

    /// The kernel named `requested` if it is in `available`, else the best (last) of
    /// `available`, with a warning when a name was given but cannot be used.
    fn choose(available: &[Kernel], requested: Option<&str>) -> Kernel {
        let best = *available
            .last()
            .expect("the scalar kernel is always available");
        match requested {
            Some(name) if !name.is_empty() => match available.iter().find(|k| k.name() == name) {
                Some(&k) => k,
                None => {
                    log::warn!(
                        "LORAFS_KERNEL={name} is not available on this CPU; using {}",
                        best.name()
                    );
                    best
                }
            },
            _ => best,
        }
    }

    /// Merge rows `row0 .. row0 + n` of a tensor from one buffer into another: `src` holds
    /// those rows of `W` (little-endian `from`, `n × f.cols` elements) and `dst` receives the
    /// merged values in `to` (as many elements), rounded once from the f32 sum (the module's
    /// contract, with `round_to_dtype` into `to`).
    ///
    /// Panics if the kernel cannot run on this CPU (see [`Kernel::available`]) or the buffers
    /// do not hold the same whole rows.
    pub fn merge_into(
        self,
        from: DType,
        src: &[u8],
        to: DType,
        dst: &mut [u8],
        f: &Factors,
        row0: usize,
    ) {
        let n = whole_rows(f, row0, from, src);
        assert_eq!(
            dst.len(),
            n * f.cols * to.size(),
            "the output holds other rows than the input"
        );
        if n == 0 {
            return;
        }
        match self.for_factors(f) {
            Kernel::Scalar => scalar::merge_into(from, src, to, dst, f, row0),
            simd => simd.merge_simd(from, to, &Job::new(f, row0, from, src, to, dst)),
        }
    }

    /// Merge rows `row0 .. row0 + n` of a tensor in place: `data` holds those rows of `W`
    /// (little-endian `dtype`, `n × f.cols` elements) and receives the merged values. The same
    /// code as [`Kernel::merge_into`] from `dtype` to `dtype`.
    ///
    /// Panics if the kernel cannot run on this CPU (see [`Kernel::available`]).
    pub fn merge(self, dtype: DType, f: &Factors, row0: usize, data: &mut [u8]) {
        if whole_rows(f, row0, dtype, data) == 0 {
            return;
        }
        match self.for_factors(f) {
            Kernel::Scalar => scalar::merge(dtype, f, row0, data),
            simd => simd.merge_simd(dtype, dtype, &Job::in_place(f, row0, dtype, data)),
        }
    }

    /// Convert `src` (little-endian `from`) into `dst` (as many elements of `to`): each value
    /// widened exactly to f32 and rounded once, as [`DType::store`] does (round to nearest
    /// even, subnormals kept, overflow to ±inf, any NaN to the canonical NaN of `to`; `-0`
    /// stays `-0`). For the tensors no adapter changes when the output dtype differs.
    ///
    /// Panics if the kernel cannot run on this CPU or the lengths differ in elements.
    pub fn convert(self, from: DType, src: &[u8], to: DType, dst: &mut [u8]) {
        assert_eq!(src.len() % from.size(), 0, "partial element");
        let n = src.len() / from.size();
        assert_eq!(
            dst.len(),
            n * to.size(),
            "the output holds another element count"
        );
        self.assert_supported();
        match self {
            Kernel::Scalar => scalar::convert(from, src, to, dst),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `assert_supported` checked avx2, fma and f16c just above.
            Kernel::Avx2 => unsafe { avx2::convert(from, src, to, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `assert_supported` checked avx512f, avx512bw, avx512vl and avx512dq.
            Kernel::Avx512 => unsafe { avx512::base::convert(from, src, to, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `assert_supported` checked those and avx512bf16 just above.
            Kernel::Avx512Bf16 => unsafe { avx512::bf16::convert(from, src, to, dst) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `assert_supported` checked neon just above.
            Kernel::Neon => unsafe { neon::convert(from, src, to, dst) },
            #[allow(unreachable_patterns)]
            _ => unreachable!("is_supported is false for kernels of other architectures"),
        }
    }

    fn assert_supported(self) {
        assert!(
            self.is_supported(),
            "the {} kernel needs {}",
            self.name(),
            self.requires()
        );
    }

    /// The kernel that merges `f`: this one, or the reference when `V` is narrower than a
    /// panel and so stored unpadded, a layout only the reference reads (see the module's
    /// documentation).
    fn for_factors(self, f: &Factors) -> Kernel {
        self.assert_supported();
        if f.is_panelled() {
            self
        } else {
            Kernel::Scalar
        }
    }

    /// Run this SIMD kernel (supported here, as [`Kernel::for_factors`] checked) on `job`.
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(unused_variables)
    )]
    fn merge_simd(self, from: DType, to: DType, job: &Job) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `for_factors` checked avx2, fma and f16c.
            Kernel::Avx2 => unsafe { avx2::merge(from, to, job) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `for_factors` checked avx512f, avx512bw, avx512vl and avx512dq.
            Kernel::Avx512 => unsafe { avx512::base::merge(from, to, job) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `for_factors` checked those and avx512bf16.
            Kernel::Avx512Bf16 => unsafe { avx512::bf16::merge(from, to, job) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `for_factors` checked neon.
            Kernel::Neon => unsafe { neon::merge(from, to, job) },
            _ => unreachable!("the reference takes slices; other architectures' kernels never run"),
        }
    }
}

/// How many whole rows of `W` (`dtype`) `data` holds, checked to be rows of `f` from `row0`.
fn whole_rows(f: &Factors, row0: usize, dtype: DType, data: &[u8]) -> usize {
    let row_bytes = f.cols * dtype.size();
    assert_eq!(data.len() % row_bytes.max(1), 0, "partial row");
    let n = data.len() / row_bytes.max(1);
    assert!(row0 + n <= f.rows, "rows out of range");
    n
}

#[cfg(test)]
mod tests {
    use super::Kernel::{self, Avx2, Scalar};
    use super::{packed_cols, Factors, PANEL};

    #[test]
    fn packed_v_is_padded_to_less_than_twice_and_narrow_tensors_not_at_all() {
        for (cols, packed) in [
            (0, 0),
            (1, 1),
            (8, 8),
            (63, 63),
            (64, 64),
            (65, 128),
            (300, 320),
        ] {
            assert_eq!(packed_cols(cols), packed, "cols {cols}");
        }
        // Rank 1000 on an 8-column tensor: V is 8000 floats, not 1000 rows of a 64-wide panel.
        let (rows, rank, cols) = (3, 1000, 8);
        let v: Vec<f32> = (0..rank * cols).map(|x| x as f32).collect();
        let f = Factors::new(rows, rank, cols, vec![1.0; rows * rank], v);
        assert!(!f.is_panelled());
        assert_eq!(f.bytes(), (rows * rank + rank * cols) * 4);
        assert_eq!(f.v(999, 7), (999 * cols + 7) as f32);
        let column: Vec<f32> = f.v_column(5).collect();
        assert_eq!(column.len(), rank);
        assert!(column
            .iter()
            .enumerate()
            .all(|(k, &x)| x == (k * cols + 5) as f32));
        let wide = Factors::new(1, 2, PANEL + 1, vec![0.0; 2], vec![0.0; 2 * (PANEL + 1)]);
        assert!(wide.is_panelled());
        assert_eq!(wide.bytes(), (2 + 2 * 2 * PANEL) * 4);
    }

    #[test]
    fn every_kernel_this_cpu_runs_is_compiled() {
        let compiled = Kernel::compiled();
        assert_eq!(compiled[0], Kernel::Scalar);
        for k in Kernel::available() {
            assert!(
                compiled.contains(&k),
                "{} runs but is not compiled",
                k.name()
            );
        }
        for k in Kernel::ALL {
            assert!(!k.is_supported() || k.is_compiled(), "{}", k.name());
        }
    }

    #[test]
    fn choose_takes_the_requested_kernel_if_available_else_the_best() {
        let available = [Scalar, Avx2];
        assert_eq!(Kernel::choose(&available, None), Avx2);
        assert_eq!(Kernel::choose(&available, Some("")), Avx2);
        assert_eq!(Kernel::choose(&available, Some("scalar")), Scalar);
        assert_eq!(Kernel::choose(&available, Some("avx2")), Avx2);
        assert_eq!(Kernel::choose(&available, Some("neon")), Avx2);
        assert_eq!(Kernel::choose(&available, Some("bogus")), Avx2);
        assert_eq!(Kernel::choose(&[Scalar], Some("avx512")), Scalar);
    }
}
