//! What the SIMD kernels share: the checked shape of one call ([`Job`], whose [`Rows`] say
//! where `W` is read and the merged values written), and the loops around their register
//! tiles and conversions, as macros so that each kernel compiles them with its own target
//! features.
//!
//! Input and output are two buffers ([`super::Kernel::merge_into`]) or one
//! ([`super::Kernel::merge`], in place), so the kernels work on raw pointers: Rust references
//! cannot say "the same bytes, read then written". Every tile reads all of its `W` before it
//! writes any output, and tiles never share elements, so in place each element is read
//! before it is overwritten.
#![cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code, unused_macros)
)]

use std::marker::PhantomData;

use super::{Factors, PANEL};
use crate::dtype::DType;

/// The dtype as a const generic parameter of the SIMD kernels, so each (input, output) pair
/// gets its own monomorphised tile.
pub(super) mod dcode {
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

use dcode::elem_size;

/// `$f::<FROM, TO>($args)` for the const codes of the run-time pair `($from, $to)`. The
/// invoking module has `DType` and `dcode::{F16, BF16, F32}` in scope.
macro_rules! with_pair {
    ($from:expr, $to:expr, $f:ident($($arg:expr),*)) => {
        match ($from, $to) {
            (DType::F16, DType::F16) => $f::<F16, F16>($($arg),*),
            (DType::F16, DType::BF16) => $f::<F16, BF16>($($arg),*),
            (DType::F16, DType::F32) => $f::<F16, F32>($($arg),*),
            (DType::BF16, DType::F16) => $f::<BF16, F16>($($arg),*),
            (DType::BF16, DType::BF16) => $f::<BF16, BF16>($($arg),*),
            (DType::BF16, DType::F32) => $f::<BF16, F32>($($arg),*),
            (DType::F32, DType::F16) => $f::<F32, F16>($($arg),*),
            (DType::F32, DType::BF16) => $f::<F32, BF16>($($arg),*),
            (DType::F32, DType::F32) => $f::<F32, F32>($($arg),*),
        }
    };
}

/// Rows of `W` and of the output: row `r` of `W` starts at `src + r · src_stride`, of the
/// output at `dst + r · dst_stride`. Only addresses; what may be accessed is the [`Job`]'s
/// (or the function's) contract.
#[derive(Clone, Copy)]
pub(crate) struct Rows {
    pub src: *const u8,
    pub src_stride: usize,
    pub dst: *mut u8,
    pub dst_stride: usize,
}

impl Rows {
    /// The same rows from row `r` and column `c`, for `FROM` elements in and `TO` out.
    #[inline(always)]
    pub fn at<const FROM: u8, const TO: u8>(self, r: usize, c: usize) -> Rows {
        Rows {
            src: self
                .src
                .wrapping_add(r * self.src_stride + c * elem_size(FROM)),
            dst: self
                .dst
                .wrapping_add(r * self.dst_stride + c * elem_size(TO)),
            ..self
        }
    }
}

/// The shape of one merge call, checked once so the kernels can use raw pointers.
///
/// Invariant: for every row `r < n`, the `cols` elements of row `r` of `rows.src` are
/// readable and those of `rows.dst` writable for `'a`, and the two buffers are either
/// disjoint or the same bytes with the same stride (in place).
pub(crate) struct Job<'a> {
    /// `U` rows `row0 ..`, row-major, `rank` floats each (`n · rank` floats).
    pub u: &'a [f32],
    /// Packed `V`, see [`Factors::panels`].
    pub panels: &'a [f32],
    pub rank: usize,
    pub cols: usize,
    /// Rows to merge.
    pub n: usize,
    pub rows: Rows,
    _data: PhantomData<&'a mut [u8]>,
}

impl<'a> Job<'a> {
    /// Rows `row0 ..` of `W` in `src` (`from`), merged into `dst` (`to`).
    pub fn new(
        f: &'a Factors,
        row0: usize,
        from: DType,
        src: &'a [u8],
        to: DType,
        dst: &'a mut [u8],
    ) -> Job<'a> {
        let (src_stride, dst_stride) = (f.cols * from.size(), f.cols * to.size());
        assert!(src_stride > 0 && src.len().is_multiple_of(src_stride));
        let n = src.len() / src_stride;
        assert_eq!(dst.len(), n * dst_stride);
        let rows = Rows {
            src: src.as_ptr(),
            src_stride,
            dst: dst.as_mut_ptr(),
            dst_stride,
        };
        Job::with_rows(f, row0, n, rows)
    }

    /// Rows `row0 ..` of `W` in `data` (`dtype`), merged in place.
    pub fn in_place(f: &'a Factors, row0: usize, dtype: DType, data: &'a mut [u8]) -> Job<'a> {
        let stride = f.cols * dtype.size();
        assert!(stride > 0 && data.len().is_multiple_of(stride));
        // Both pointers from the one exclusive borrow: no shared reference to `data` exists.
        let dst = data.as_mut_ptr();
        let rows = Rows {
            src: dst.cast_const(),
            src_stride: stride,
            dst,
            dst_stride: stride,
        };
        Job::with_rows(f, row0, data.len() / stride, rows)
    }

    fn with_rows(f: &'a Factors, row0: usize, n: usize, rows: Rows) -> Job<'a> {
        assert!(row0 + n <= f.rows);
        let panels = f.panels();
        assert_eq!(panels.len(), f.cols.div_ceil(PANEL) * f.rank * PANEL);
        Job {
            u: &f.u[row0 * f.rank..(row0 + n) * f.rank],
            panels,
            rank: f.rank,
            cols: f.cols,
            n,
            rows,
            _data: PhantomData,
        }
    }
}

/// The entry point and tiling loop every SIMD kernel shares: `merge` (one monomorphised `run`
/// per (input, output) dtype pair), then column blocks of panels that keep `V` in L2, tiles
/// of `ROWS` rows, then the remaining rows (`$rem`: 1 to `ROWS - 1`). The invoking module
/// provides `ROWS` and `fn rows::<FROM, TO, RR>(job, r, p0, p1)`.
macro_rules! tile_driver {
    ($features:literal, $($rem:literal)+) => {
        const _: () = assert!(ROWS == 1 + [$($rem),+].len(), "a remainder arm per row count");

        /// Merge the rows of `job`, `W` in `from` and the output in `to`; see
        /// [`crate::kernel::Kernel::merge_into`].
        ///
        /// # Safety
        /// The CPU must support the target features this function is compiled for.
        #[target_feature(enable = $features)]
        pub(in crate::kernel) unsafe fn merge(from: DType, to: DType, job: &Job) {
            with_pair!(from, to, run(job))
        }

        #[target_feature(enable = $features)]
        fn run<const FROM: u8, const TO: u8>(job: &Job) {
            let panels = job.cols.div_ceil(PANEL);
            let block = panels_per_block(job.rank);
            let mut p0 = 0;
            while p0 < panels {
                let p1 = (p0 + block).min(panels);
                let mut r = 0;
                while r + ROWS <= job.n {
                    rows::<FROM, TO, ROWS>(job, r, p0, p1);
                    r += ROWS;
                }
                match job.n - r {
                    0 => {}
                    $($rem => rows::<FROM, TO, $rem>(job, r, p0, p1),)+
                    _ => unreachable!(),
                }
                p0 = p1;
            }
        }
    };
}

/// The row loop of the kernels that finish the last columns of a row on a zero-padded copy
/// (AVX2 and NEON, both 6-row tiles), on top of [`tile_driver`]. The invoking module provides
/// `ROWS`, `WIDTH` and `unsafe fn tile::<FROM, TO, RR>(u, rank, v, rows)`.
macro_rules! padded_tile_driver {
    ($features:literal) => {
        tile_driver!($features, 1 2 3 4 5);

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
                for s in 0..PANEL / WIDTH {
                    let c0 = p * PANEL + s * WIDTH;
                    if c0 >= cols {
                        break;
                    }
                    // (Not dereferenced when `rank == 0`, where `panels` is empty.)
                    let v = panels
                        .as_ptr()
                        .wrapping_add((p - p0) * rank * PANEL + s * WIDTH);
                    let io = job.rows.at::<FROM, TO>(r, c0);
                    let left = cols - c0;
                    if left >= WIDTH {
                        // SAFETY: `u` holds RR rows of `rank` floats, `v` (aligned as the
                        // packing guarantees) is followed by `rank` rows of PANEL floats of
                        // which it reads the first WIDTH, and rows `r .. r + RR <= n` of the
                        // job have columns `c0 .. c0 + WIDTH` (the job's invariant).
                        unsafe { tile::<FROM, TO, RR>(u.as_ptr(), rank, v, io) }
                    } else {
                        padded_tile::<FROM, TO, RR>(u, rank, v, io, left);
                    }
                }
            }
        }

        /// The last `left < WIDTH` columns of `RR` rows: the same tile on zero-padded copies.
        #[target_feature(enable = $features)]
        fn padded_tile<const FROM: u8, const TO: u8, const RR: usize>(
            u: &[f32],
            rank: usize,
            v: *const f32,
            io: Rows,
            left: usize,
        ) {
            let (from_size, to_size) = (elem_size(FROM), elem_size(TO));
            let mut w = [0u8; ROWS * WIDTH * 4];
            let mut out = [0u8; ROWS * WIDTH * 4];
            for i in 0..RR {
                // SAFETY: `rows` passes rows of the job that have the `left` columns at `io`
                // (the job's invariant); `w` is local, so they do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        io.src.add(i * io.src_stride),
                        w.as_mut_ptr().add(i * WIDTH * from_size),
                        left * from_size,
                    )
                }
            }
            let padded = Rows {
                src: w.as_ptr(),
                src_stride: WIDTH * from_size,
                dst: out.as_mut_ptr(),
                dst_stride: WIDTH * to_size,
            };
            // SAFETY: as in `rows`, with `w` and `out` holding RR rows of WIDTH elements.
            unsafe { tile::<FROM, TO, RR>(u.as_ptr(), rank, v, padded) }
            for i in 0..RR {
                // SAFETY: as for the copy in; every row was read above, before this write.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        out.as_ptr().add(i * WIDTH * to_size),
                        io.dst.add(i * io.dst_stride),
                        left * to_size,
                    )
                }
            }
        }
    };
}

/// `convert` for the kernels that convert `WIDTH` elements at a time and the last ones on a
/// zero-padded copy (AVX2 and NEON). The invoking module provides `WIDTH` and
/// `unsafe fn convert_chunk::<FROM, TO>(src, dst)`.
macro_rules! padded_convert_driver {
    ($features:literal) => {
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

        #[target_feature(enable = $features)]
        fn convert_all<const FROM: u8, const TO: u8>(src: &[u8], dst: &mut [u8]) {
            let (from_size, to_size) = (elem_size(FROM), elem_size(TO));
            let n = src.len() / from_size;
            assert_eq!(dst.len(), n * to_size, "as many elements out as in");
            let chunks = src
                .chunks_exact(WIDTH * from_size)
                .zip(dst.chunks_exact_mut(WIDTH * to_size));
            for (s, d) in chunks {
                // SAFETY: `s` holds WIDTH elements of FROM, `d` WIDTH of TO.
                unsafe { convert_chunk::<FROM, TO>(s.as_ptr(), d.as_mut_ptr()) }
            }
            let done = n - n % WIDTH;
            if done < n {
                let left = n - done;
                let mut w = [0u8; WIDTH * 4];
                let mut out = [0u8; WIDTH * 4];
                w[..left * from_size].copy_from_slice(&src[done * from_size..]);
                // SAFETY: `w` and `out` hold WIDTH elements of 4 bytes or fewer.
                unsafe { convert_chunk::<FROM, TO>(w.as_ptr(), out.as_mut_ptr()) }
                dst[done * to_size..].copy_from_slice(&out[..left * to_size]);
            }
        }
    };
}
