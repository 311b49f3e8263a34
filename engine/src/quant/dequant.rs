//! Dequantisation of every supported block format (reference implementations, bit-exact with
//! ggml's `dequantize_row_*`).

use super::{QuantError, QuantType};

pub fn dequantize_row(ty: QuantType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    match ty {
        QuantType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            Ok(())
        }
        QuantType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
            Ok(())
        }
        QuantType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
            Ok(())
        }
        other => Err(QuantError::Unsupported(other.name())),
    }
}
