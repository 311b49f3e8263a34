//! Quantized block formats: the type table, dequantisation, activation quantisation and dot
//! products that read packed blocks directly.
//!
//! Every GGML type is in the table (so a file holding types this engine cannot compute yet can
//! still be parsed and sized exactly); `is_supported` says which ones the kernels handle.
//! Adding a type (the IQ family) means: its row in `TABLE`, a `dequant` arm, a `dot` arm.
//!
//! Activations are quantised once per matvec to the weight type's `vec_dot_type` (as ggml does:
//! Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants), or kept in f32 for float
//! weights (F32/F16/BF16/F8E4M3), which is exact.

pub mod act;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
pub mod dequant;
pub mod dot;
pub mod f32dot;
pub mod fp8;

use thiserror::Error;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// One call of a multi-token kernel: several weight rows against up to `avx2::MULTI` (8) tokens.
#[derive(Clone, Copy)]
pub struct Tile<'a> {
    /// Elements per row.
    pub cols: usize,
    /// Weight rows back to back, `row_bytes` apart (any number of them).
    pub w: &'a [u8],
    pub row_bytes: usize,
    /// The tokens' activation rows (`vec_dot_type`), token `t` at byte `t * stride`.
    pub a: &'a [u8],
    pub stride: usize,
    /// Tokens, 1 to `avx2::MULTI` (8).
    pub tokens: usize,
    /// Where token `t`'s result for row `r` goes: `out[t * out_stride + r]`.
    pub out_stride: usize,
}

/// A multi-token kernel: for every weight row `r` of the tile and token `t < tile.tokens`,
/// `out[t * tile.out_stride + r]` = the dot of the row with the token's activations. Each
/// token's result is bit for bit what the one-token kernel gives: the same operations in the
/// same order, only the weight unpacking is shared. Bounds are checked once per call, so a
/// tile of many short rows costs one call, not one per row.
pub type MultiDotFn = fn(&Tile, &mut [f32]);

/// A tensor element format. GGML ids are those of `ggml.h`; `F8E4M3` is the safetensors FP8
/// format of the official checkpoint (no GGML id; its 128x128 block scales live beside it).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    F8E4M3,
    /// Activations only (no file holds it): each 256-value block as 16-bit integers under one
    /// f32 scale, with the sums of its 32-value groups, laid out for the K-quant kernels that
    /// multiply them in 16-bit lanes. See [`act`].
    Q16_K,
}

struct TypeInfo {
    ty: QuantType,
    ggml_id: Option<u32>,
    name: &'static str,
    block_elems: usize,
    block_bytes: usize,
    supported: bool,
}

const fn t(ty: QuantType, id: u32, name: &'static str, be: usize, bb: usize, s: bool) -> TypeInfo {
    TypeInfo {
        ty,
        ggml_id: Some(id),
        name,
        block_elems: be,
        block_bytes: bb,
        supported: s,
    }
}

const TABLE: &[TypeInfo] = &[
    t(QuantType::F32, 0, "F32", 1, 4, true),
    t(QuantType::F16, 1, "F16", 1, 2, true),
    t(QuantType::Q4_0, 2, "Q4_0", 32, 18, true),
    t(QuantType::Q4_1, 3, "Q4_1", 32, 20, true),
    t(QuantType::Q5_0, 6, "Q5_0", 32, 22, true),
    t(QuantType::Q5_1, 7, "Q5_1", 32, 24, true),
    t(QuantType::Q8_0, 8, "Q8_0", 32, 34, true),
    t(QuantType::Q8_1, 9, "Q8_1", 32, 36, true),
    t(QuantType::Q2_K, 10, "Q2_K", 256, 84, true),
    t(QuantType::Q3_K, 11, "Q3_K", 256, 110, true),
    t(QuantType::Q4_K, 12, "Q4_K", 256, 144, true),
    t(QuantType::Q5_K, 13, "Q5_K", 256, 176, true),
    t(QuantType::Q6_K, 14, "Q6_K", 256, 210, true),
    t(QuantType::Q8_K, 15, "Q8_K", 256, 292, true),
    t(QuantType::IQ2_XXS, 16, "IQ2_XXS", 256, 66, false),
    t(QuantType::IQ2_XS, 17, "IQ2_XS", 256, 74, false),
    t(QuantType::IQ3_XXS, 18, "IQ3_XXS", 256, 98, false),
    t(QuantType::IQ1_S, 19, "IQ1_S", 256, 50, false),
    t(QuantType::IQ4_NL, 20, "IQ4_NL", 32, 18, false),
    t(QuantType::IQ3_S, 21, "IQ3_S", 256, 110, false),
    t(QuantType::IQ2_S, 22, "IQ2_S", 256, 82, false),
    t(QuantType::IQ4_XS, 23, "IQ4_XS", 256, 136, false),
    t(QuantType::I8, 24, "I8", 1, 1, false),
    t(QuantType::I16, 25, "I16", 1, 2, false),
    t(QuantType::I32, 26, "I32", 1, 4, false),
    t(QuantType::I64, 27, "I64", 1, 8, false),
    t(QuantType::F64, 28, "F64", 1, 8, false),
    t(QuantType::IQ1_M, 29, "IQ1_M", 256, 56, false),
    t(QuantType::BF16, 30, "BF16", 1, 2, true),
    t(QuantType::TQ1_0, 34, "TQ1_0", 256, 54, false),
    t(QuantType::TQ2_0, 35, "TQ2_0", 256, 66, false),
    t(QuantType::MXFP4, 39, "MXFP4", 32, 17, false),
    TypeInfo {
        ty: QuantType::F8E4M3,
        ggml_id: None,
        name: "F8_E4M3",
        block_elems: 1,
        block_bytes: 1,
        supported: true,
    },
    TypeInfo {
        ty: QuantType::Q16_K,
        ggml_id: None,
        name: "Q16_K",
        block_elems: QK_K,
        block_bytes: act::Q16_BYTES,
        supported: false,
    },
];

/// Errors of the quant layer: all are caller mistakes that the loaders check for first.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("tensor type {0} is not supported by this engine's kernels yet")]
    Unsupported(&'static str),
    #[error("row of {len} elements is not a multiple of the {ty} block size {block}")]
    RaggedRow {
        ty: &'static str,
        len: usize,
        block: usize,
    },
    #[error("{ty} buffer holds {got} bytes, {expected} expected")]
    BadLength {
        ty: &'static str,
        got: usize,
        expected: usize,
    },
}

impl QuantType {
    fn info(self) -> &'static TypeInfo {
        // The table is tiny and in declaration order; a linear scan is clearer than an index.
        TABLE
            .iter()
            .find(|i| i.ty == self)
            .expect("every QuantType has a table row")
    }

    /// The type with this GGML id, if the id exists.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|i| i.ggml_id == Some(id)).map(|i| i.ty)
    }

    /// The type called `name` (as [`QuantType::name`] spells it), if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        TABLE.iter().find(|i| i.name == name).map(|i| i.ty)
    }

    pub fn ggml_id(self) -> Option<u32> {
        self.info().ggml_id
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Elements per block (1 for plain scalar types).
    pub fn block_elems(self) -> usize {
        self.info().block_elems
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.info().block_bytes
    }

    /// Whether dequantisation and dot products exist for this type.
    pub fn is_supported(self) -> bool {
        self.info().supported
    }

    /// Bytes of a row of `n` elements, or an error when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Result<usize, QuantError> {
        let be = self.block_elems();
        if !n.is_multiple_of(be) {
            return Err(QuantError::RaggedRow {
                ty: self.name(),
                len: n,
                block: be,
            });
        }
        Ok(n / be * self.block_bytes())
    }

    /// Bytes of `n` elements laid out as whole blocks, checked for overflow.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        if !n.is_multiple_of(be) {
            return None;
        }
        (n / be).checked_mul(self.block_bytes() as u64)
    }

    /// The format activations take for `vec_dot` against weights of this type.
    pub fn vec_dot_type(self) -> QuantType {
        use QuantType::*;
        match self {
            Q4_0 | Q5_0 | Q8_0 => Q8_0,
            Q4_1 | Q5_1 => Q8_1,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K => Q8_K,
            _ => F32,
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantises one row (`dst.len()` elements) from its packed bytes.
pub fn dequantize_row(ty: QuantType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let expected = ty.row_bytes(dst.len())?;
    if src.len() != expected {
        return Err(QuantError::BadLength {
            ty: ty.name(),
            got: src.len(),
            expected,
        });
    }
    dequant::dequantize_row(ty, src, dst)
}

/// The CPU kernels this machine runs: "AVX-512" (F, BW and VNNI, for the 16-bit and the int8
/// Q4_K/Q6_K products; AVX2 for the rest), "AVX2", or "portable".
pub fn cpu_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::avx512::available() {
            return "AVX-512";
        }
        if avx2::full() {
            return "AVX2";
        }
    }
    "portable"
}

/// Whether weights of type `ty` take [`QuantType::Q16_K`] activations on this CPU: the K-quants
/// with a 16-bit kernel (Q4_K, Q5_K, Q6_K, with AVX2).
pub fn takes_q16_k(ty: QuantType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::kernel_q16(ty).is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// Quantises an activation row to `ty` (one of F32, Q8_0, Q8_1, Q8_K, Q16_K) into `dst`
/// (`ty.row_bytes(src.len())` bytes).
pub fn quantize_activation(ty: QuantType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    let expected = ty.row_bytes(src.len())?;
    if dst.len() != expected {
        return Err(QuantError::BadLength {
            ty: ty.name(),
            got: dst.len(),
            expected,
        });
    }
    act::quantize_row(ty, src, dst)
}

/// Dot product of one packed weight row of `n` elements with an activation row already in
/// `ty.vec_dot_type()` format. Uses the fastest kernel the CPU has (checked once).
/// Lengths are the caller's contract (checked by debug assertions only: this is the hot path).
#[inline]
pub fn vec_dot(ty: QuantType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            if let Some(v) = avx2::vec_dot(ty, n, w, a) {
                return v;
            }
        }
    }
    dot::vec_dot(ty, n, w, a)
}

/// Dot product of one packed weight row with f32 activations, dequantising block by block in
/// registers: exact (the same weights as dequantise-then-dot, summed in another order) and
/// allocation-free. Uses AVX2 kernels where the CPU has them; see [`f32dot`].
#[inline]
pub fn vec_dot_f32(ty: QuantType, w: &[u8], x: &[f32]) -> f32 {
    f32dot::vec_dot_f32(ty, w, x)
}
