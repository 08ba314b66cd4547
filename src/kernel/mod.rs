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
//! reference; every other kernel is tested to produce exactly its bytes.

pub mod scalar;

use std::sync::OnceLock;

use crate::dtype::DType;

/// The low-rank factors of one merged tensor: `Δ = U @ V` with `U` (rows × rank) and
/// `V` (rank × cols), both row-major f32. Several adapters are concatenated along the rank.
#[derive(Debug, Clone)]
pub struct Factors {
    pub rows: usize,
    pub rank: usize,
    pub cols: usize,
    pub u: Vec<f32>,
    pub v: Vec<f32>,
}

impl Factors {
    pub fn new(rows: usize, rank: usize, cols: usize, u: Vec<f32>, v: Vec<f32>) -> Factors {
        assert_eq!(u.len(), rows * rank);
        assert_eq!(v.len(), rank * cols);
        Factors {
            rows,
            rank,
            cols,
            u,
            v,
        }
    }

    /// Bytes held by the factors (for memory accounting).
    pub fn bytes(&self) -> usize {
        (self.u.len() + self.v.len()) * 4
    }
}

/// A kernel implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
        }
    }

    /// Every kernel this CPU can run, reference first.
    pub fn available() -> Vec<Kernel> {
        vec![Kernel::Scalar]
    }

    /// The kernel in use: `LORAFS_KERNEL` if set (and runnable here), else the best available.
    /// Chosen once per process.
    pub fn selected() -> Kernel {
        static SELECTED: OnceLock<Kernel> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let available = Kernel::available();
            let best = *available
                .last()
                .expect("the scalar kernel is always available");
            match std::env::var("LORAFS_KERNEL") {
                Ok(name) if !name.is_empty() => match available.iter().find(|k| k.name() == name) {
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
        })
    }

    /// Merge rows `row0 .. row0 + n` of a tensor in place: `data` holds those rows of `W`
    /// (little-endian `dtype`, `n × f.cols` elements) and receives the merged values.
    pub fn merge(self, dtype: DType, f: &Factors, row0: usize, data: &mut [u8]) {
        let row_bytes = f.cols * dtype.size();
        assert_eq!(data.len() % row_bytes.max(1), 0, "partial row");
        assert!(
            row0 + data.len() / row_bytes.max(1) <= f.rows,
            "rows out of range"
        );
        match self {
            Kernel::Scalar => scalar::merge(dtype, f, row0, data),
        }
    }
}
