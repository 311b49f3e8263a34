//! Activation quantisation (Q8_0, Q8_1, Q8_K), as ggml's `quantize_row_*_ref`.

use super::{QuantError, QuantType};

pub fn quantize_row(ty: QuantType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    match ty {
        QuantType::F32 => {
            for (c, v) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        }
        other => Err(QuantError::Unsupported(other.name())),
    }
}
