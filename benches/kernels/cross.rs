//! The "cross" part: `merge_into` and `convert` from one dtype into another (what an output
//! dtype other than the base's costs), one thread, the 4096 × 4096 tensor.
//!
//! Per pair: "memcpy" copies the input bytes into a second buffer, "convert" rows run
//! `Kernel::convert` (every kernel), and the merge rows `Kernel::merge_into` at rank
//! [`RANK`] (every SIMD kernel). "vs convert-only" is against the best kernel's `convert` of
//! the same pair: the merge without its FMAs. GB/s counts the input bytes.

use std::hint::black_box;

use lorafs::dtype::DType;
use lorafs::kernel::{Factors, Kernel};

use super::{time, values, wait_idle, weights, Bench, COLS, ROWS};

/// The pairs timed: an output dtype narrower, as wide, or wider than the base's.
pub const PAIRS: [(DType, DType); 5] = [
    (DType::BF16, DType::F16),
    (DType::F16, DType::BF16),
    (DType::F32, DType::BF16),
    (DType::F32, DType::F16),
    (DType::BF16, DType::F32),
];

/// The rank of the merge rows.
const RANK: usize = 16;

impl Bench {
    /// The cross cases of one pair.
    pub fn run_cross(&mut self, from: DType, to: DType, kernels: &[Kernel]) {
        let tag = format!("{}>{} 1t", from.name(), to.name());
        let best = *kernels
            .last()
            .expect("the scalar kernel is always available");
        let reps = self.reps;
        let src = weights(from);
        let bytes = src.len();
        let mut dst = vec![0u8; ROWS * COLS * to.size()];
        let mut copy_dst = vec![0u8; bytes];
        wait_idle();
        let copy = time(reps, || {
            copy_dst.copy_from_slice(&src);
            black_box(&mut copy_dst);
        });
        drop(copy_dst);
        wait_idle();
        let convert = time(reps, || best.convert(from, &src, to, black_box(&mut dst)));
        let base = (copy.0, convert.0);
        self.push(format!("memcpy {tag}"), copy, bytes, 0.0, base);
        for &kernel in kernels {
            let label = format!("convert {} {tag}", kernel.name());
            if !self.wanted(&label) {
                continue;
            }
            let reps = if kernel == Kernel::Scalar { 3 } else { reps };
            wait_idle();
            let secs = time(reps, || kernel.convert(from, &src, to, black_box(&mut dst)));
            self.push(label, secs, bytes, 0.0, base);
        }
        let f = Factors::new(
            ROWS,
            RANK,
            COLS,
            values(ROWS * RANK, 2, 0.01),
            values(RANK * COLS, 3, 0.01),
        );
        let flops = 2.0 * (ROWS * COLS * RANK) as f64;
        // The scalar reference's merge (seconds) is not timed here: see the in-place sets.
        for &kernel in kernels.iter().filter(|&&k| k != Kernel::Scalar) {
            let label = format!("{} {tag} r{RANK}", kernel.name());
            if !self.wanted(&label) {
                continue;
            }
            wait_idle();
            let secs = time(reps, || {
                kernel.merge_into(from, &src, to, black_box(&mut dst), &f, 0)
            });
            self.push(label, secs, bytes, flops, base);
        }
    }
}
