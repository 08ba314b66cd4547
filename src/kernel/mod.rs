//! Merge kernels: `out[i,:] = round(W[i,:] + Σ_k U[i,k]·V[k,:])` over a block of rows.
//!
//! # The contract every kernel meets, bit for bit
//! For each output element, with `W` widened exactly to f32:
//! ```text
//! acc = +0.0
//! for k in 0..rank: acc = fma(U[i,k], V[k,j], acc)      // fused, one rounding each
//! out = round_to_dtype(W[i,j] + acc)                    // one f32 add, then one RNE
//! ```
//! `round_to_dtype` is round-to-nearest-even with subnormals kept and overflow to ±inf, and
//! any NaN result becomes the canonical quiet NaN ([`crate::dtype`]). [`scalar`] is the
//! reference; every other kernel is tested to produce exactly its bytes (`tests/kernels.rs`).
//!
//! # The SIMD kernels
//! `avx512` / `avx512bf16` (x86-64 AVX-512 F/BW/VL/DQ, and BF16), `avx2` (x86-64 AVX2 + FMA +
//! F16C) and `neon` (aarch64) all work the same way: a register tile of a few rows × [`PANEL`]
//! (or a slice of it) columns of f32 accumulators is filled by `rank` rounds of vector FMAs —
//! one load of a `V` slice serves every row of the tile, one broadcast of `U[i,k]` every
//! column — and then `W` is loaded, widened, added, rounded and stored once. Each lane does
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

/// The dtype as a const generic parameter of the SIMD kernels, so each dtype gets its own
/// monomorphised tile.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
mod dcode {
    pub const F16: u8 = 0;
    pub const BF16: u8 = 1;
    pub const F32: u8 = 2;

    /// Bytes per element.
    pub const fn elem_size(d: u8) -> usize {
        if d == F32 {
            4
        } else {
            2
        }
    }
}

/// The entry point and tiling loop every SIMD kernel shares: `merge` (one monomorphised `run`
/// per dtype), then column blocks of panels that keep `V` in L2, tiles of `ROWS` rows, then
/// the remaining rows (`$rem`: 1 to `ROWS - 1`). The invoking module provides `ROWS` and
/// `fn rows::<D, RR>(job, data, r, p0, p1)`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! tile_driver {
    ($features:literal, $($rem:literal)+) => {
        const _: () = assert!(ROWS == 1 + [$($rem),+].len(), "a remainder arm per row count");

        /// Merge `data` (rows `row0 ..` of the tensor) in place; see
        /// [`crate::kernel::Kernel::merge`].
        ///
        /// # Safety
        /// The CPU must support the target features this function is compiled for.
        #[target_feature(enable = $features)]
        pub(in crate::kernel) unsafe fn merge(
            dtype: DType,
            f: &Factors,
            row0: usize,
            data: &mut [u8],
        ) {
            let job = Job::new(dtype, f, row0, data);
            match dtype {
                DType::F16 => run::<F16>(&job, data),
                DType::BF16 => run::<BF16>(&job, data),
                DType::F32 => run::<F32>(&job, data),
            }
        }

        #[target_feature(enable = $features)]
        fn run<const D: u8>(job: &Job, data: &mut [u8]) {
            let panels = job.cols.div_ceil(PANEL);
            let block = panels_per_block(job.rank);
            let mut p0 = 0;
            while p0 < panels {
                let p1 = (p0 + block).min(panels);
                let mut r = 0;
                while r + ROWS <= job.n {
                    rows::<D, ROWS>(job, data, r, p0, p1);
                    r += ROWS;
                }
                match job.n - r {
                    0 => {}
                    $($rem => rows::<D, $rem>(job, data, r, p0, p1),)+
                    _ => unreachable!(),
                }
                p0 = p1;
            }
        }
    };
}

/// The row loop of the kernels that finish the last columns of a row on a zero-padded copy
/// (AVX2 and NEON, both 6-row tiles), on top of [`tile_driver`]. The invoking module provides
/// `ROWS`, `WIDTH` and `unsafe fn tile::<D, RR>(u, rank, v, w, row_bytes)`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! padded_tile_driver {
    ($features:literal) => {
        tile_driver!($features, 1 2 3 4 5);

        /// Rows `r .. r + RR` of `data`, panels `p0 .. p1`.
        #[inline]
        #[target_feature(enable = $features)]
        fn rows<const D: u8, const RR: usize>(
            job: &Job,
            data: &mut [u8],
            r: usize,
            p0: usize,
            p1: usize,
        ) {
            let (rank, cols, row_bytes) = (job.rank, job.cols, job.row_bytes);
            let size = elem_size(D);
            let u = &job.u[r * rank..(r + RR) * rank];
            let w = &mut data[r * row_bytes..(r + RR) * row_bytes];
            let panels = &job.panels[p0 * rank * PANEL..p1 * rank * PANEL];
            for p in p0..p1 {
                for s in 0..PANEL / WIDTH {
                    let c0 = p * PANEL + s * WIDTH;
                    if c0 >= cols {
                        break;
                    }
                    // (Not dereferenced when `rank == 0`, where `panels` is empty.)
                    let v = panels
                        .as_ptr()
                        .wrapping_add((p - p0) * rank * PANEL + s * WIDTH);
                    let left = cols - c0;
                    if left >= WIDTH {
                        // SAFETY: `u` holds RR rows of `rank` floats, `v` (aligned as the
                        // packing guarantees) is followed by `rank` rows of PANEL floats of
                        // which it reads the first WIDTH, and `w` holds RR rows of `row_bytes`
                        // with columns `c0 .. c0 + WIDTH` inside each row.
                        unsafe {
                            tile::<D, RR>(
                                u.as_ptr(),
                                rank,
                                v,
                                w[c0 * size..].as_mut_ptr(),
                                row_bytes,
                            )
                        }
                    } else {
                        // The last columns: run the same tile on a zero-padded copy.
                        let stride = WIDTH * size;
                        let mut buf = [0u8; ROWS * WIDTH * 4];
                        for i in 0..RR {
                            buf[i * stride..i * stride + left * size].copy_from_slice(
                                &w[i * row_bytes + c0 * size..i * row_bytes + cols * size],
                            );
                        }
                        // SAFETY: as above, with `buf` holding RR rows of `stride` bytes =
                        // WIDTH elements.
                        unsafe { tile::<D, RR>(u.as_ptr(), rank, v, buf.as_mut_ptr(), stride) }
                        for i in 0..RR {
                            w[i * row_bytes + c0 * size..i * row_bytes + cols * size]
                                .copy_from_slice(&buf[i * stride..i * stride + left * size]);
                        }
                    }
                }
            }
        }
    };
}

pub mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::OnceLock;

use crate::dtype::DType;

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

    /// Merge rows `row0 .. row0 + n` of a tensor in place: `data` holds those rows of `W`
    /// (little-endian `dtype`, `n × f.cols` elements) and receives the merged values.
    ///
    /// Panics if the kernel cannot run on this CPU (see [`Kernel::available`]).
    pub fn merge(self, dtype: DType, f: &Factors, row0: usize, data: &mut [u8]) {
        let row_bytes = f.cols * dtype.size();
        assert_eq!(data.len() % row_bytes.max(1), 0, "partial row");
        assert!(
            row0 + data.len() / row_bytes.max(1) <= f.rows,
            "rows out of range"
        );
        if data.is_empty() {
            return;
        }
        assert!(
            self.is_supported(),
            "the {} kernel needs {}",
            self.name(),
            self.requires()
        );
        // Factors narrower than a panel are stored unpadded, a layout only the reference
        // reads (see the module's documentation).
        let kernel = if f.is_panelled() {
            self
        } else {
            Kernel::Scalar
        };
        match kernel {
            Kernel::Scalar => scalar::merge(dtype, f, row0, data),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `is_supported` checked avx2, fma and f16c just above.
            Kernel::Avx2 => unsafe { avx2::merge(dtype, f, row0, data) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `is_supported` checked avx512f, avx512bw, avx512vl and avx512dq above.
            Kernel::Avx512 => unsafe { avx512::base::merge(dtype, f, row0, data) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `is_supported` checked those and avx512bf16 just above.
            Kernel::Avx512Bf16 => unsafe { avx512::bf16::merge(dtype, f, row0, data) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `is_supported` checked neon just above.
            Kernel::Neon => unsafe { neon::merge(dtype, f, row0, data) },
            #[allow(unreachable_patterns)]
            _ => unreachable!("is_supported is false for kernels of other architectures"),
        }
    }
}

/// The shape of one `merge` call, checked once so the kernels can use raw pointers.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) struct Job<'a> {
    /// `U` rows `row0 ..`, row-major, `rank` floats each (at least `n · rank` floats).
    pub u: &'a [f32],
    /// Packed `V`, see [`Factors::panels`].
    pub panels: &'a [f32],
    pub rank: usize,
    pub cols: usize,
    /// Rows in `data`.
    pub n: usize,
    /// Bytes per row of `data`.
    pub row_bytes: usize,
}

#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
impl<'a> Job<'a> {
    pub fn new(dtype: DType, f: &'a Factors, row0: usize, data: &[u8]) -> Job<'a> {
        let row_bytes = f.cols * dtype.size();
        assert!(row_bytes > 0 && data.len().is_multiple_of(row_bytes));
        let n = data.len() / row_bytes;
        assert!(row0 + n <= f.rows);
        let panels = f.panels();
        assert_eq!(panels.len(), f.cols.div_ceil(PANEL) * f.rank * PANEL);
        Job {
            u: &f.u[row0 * f.rank..(row0 + n) * f.rank],
            panels,
            rank: f.rank,
            cols: f.cols,
            n,
            row_bytes,
        }
    }
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
