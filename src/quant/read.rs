//! Reading rows of a quantized weight: only the codes and scales of the blocks they touch.

use std::sync::Arc;

use super::dequant::{code4, dequant4, dequant8, nested_scale};
use super::{QuantTensor, Scales, Scheme};
use crate::baseio::SourceFile;
use crate::error::Result;

impl QuantTensor {
    /// Values `e0 .. e0 + out.len()` of the flattened weight, dequantized into `out`.
    /// `files` are the base's safetensors files by layout index.
    pub fn read(
        &self,
        files: &[&Arc<SourceFile>],
        direct: bool,
        e0: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let e1 = e0 + out.len();
        if out.is_empty() {
            return Ok(());
        }
        let read = |layout: usize, offset: u64, len: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len];
            files[layout].read_exact_at(&mut buf, offset, direct)?;
            Ok(buf)
        };
        let (k0, k1) = (e0 / self.blocksize, e1.div_ceil(self.blocksize));
        let scales = match &self.scales {
            Scales::F32(p) => read(p.layout, p.offset + 4 * k0 as u64, 4 * (k1 - k0))?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect::<Vec<f32>>(),
            Scales::Nested {
                codes,
                code,
                nested_absmax,
                nested_blocksize,
                offset,
            } => read(codes.layout, codes.offset + k0 as u64, k1 - k0)?
                .iter()
                .zip(k0..)
                .map(|(&c, k)| nested_scale(code, c, nested_absmax[k / nested_blocksize], *offset))
                .collect(),
        };
        let c = self.codes;
        match self.scheme {
            Scheme::Int8 => {
                let codes = read(c.layout, c.offset + e0 as u64, e1 - e0)?;
                dequant8(self.blocksize, &codes, &scales, out);
            }
            Scheme::Nf4 | Scheme::Fp4 => {
                let (b0, b1) = (e0 / 2, e1.div_ceil(2));
                let packed = read(c.layout, c.offset + b0 as u64, b1 - b0)?;
                dequant4(
                    &code4(self.scheme),
                    self.blocksize,
                    e0,
                    &packed,
                    &scales,
                    out,
                );
            }
        }
        Ok(())
    }
}
