//! Weight matrices as the model uses them: packed rows of any supported type, with the
//! activation-quantisation scratch they need, and the CPU matvec/matmul entry points.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::quant::{self, QuantError, QuantType};
use crate::Bytes;

static INT8_ACTIVATIONS: AtomicBool = AtomicBool::new(false);

/// Chooses the activation format of quantized matrix products for the whole process: f32
/// (default, exact) or int8 per block as llama.cpp does (faster; costs accuracy). Set it once,
/// before any computation.
pub fn set_int8_activations(on: bool) {
    INT8_ACTIVATIONS.store(on, Ordering::Relaxed);
}

/// Block edge of the official FP8 checkpoint's `weight_scale_inv` grid.
pub const FP8_BLOCK: usize = 128;

/// A `rows x cols` weight matrix `W[out, in]` stored as packed rows.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    /// Bytes of one row.
    pub row_bytes: usize,
    /// `rows * row_bytes` bytes.
    pub data: Bytes,
    /// For `F8E4M3` only: the `ceil(rows/128) x ceil(cols/128)` grid of multipliers.
    pub block_scales: Option<Arc<[f32]>>,
}

impl Matrix {
    /// A matrix over `data`, checking that the size matches the shape and the type is usable.
    pub fn new(ty: QuantType, rows: usize, cols: usize, data: Bytes) -> Result<Self, QuantError> {
        if !ty.is_supported() || matches!(ty, QuantType::Q8_1 | QuantType::Q8_K) {
            return Err(QuantError::Unsupported(ty.name()));
        }
        let row_bytes = ty.row_bytes(cols)?;
        let expected = row_bytes * rows;
        if data.len() != expected {
            return Err(QuantError::BadLength {
                ty: ty.name(),
                got: data.len(),
                expected,
            });
        }
        Ok(Matrix {
            ty,
            rows,
            cols,
            row_bytes,
            data,
            block_scales: None,
        })
    }

    /// An FP8 matrix with its block-scale grid (row-major, `ceil(rows/128) x ceil(cols/128)`).
    pub fn new_fp8(
        rows: usize,
        cols: usize,
        data: Bytes,
        scales: Vec<f32>,
    ) -> Result<Self, QuantError> {
        let mut m = Matrix::new(QuantType::F8E4M3, rows, cols, data)?;
        let expected = rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK);
        if scales.len() != expected {
            return Err(QuantError::BadLength {
                ty: "F8_E4M3 scales",
                got: scales.len(),
                expected,
            });
        }
        m.block_scales = Some(scales.into());
        Ok(m)
    }

    /// The packed bytes of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// The FP8 scales that apply to row `r` (one per 128 columns), if this is an FP8 matrix.
    #[inline]
    pub fn row_scales(&self, r: usize) -> Option<&[f32]> {
        let s = self.block_scales.as_ref()?;
        let nb = self.cols.div_ceil(FP8_BLOCK);
        let br = r / FP8_BLOCK;
        Some(&s[br * nb..(br + 1) * nb])
    }

    /// Format the activations take for this matrix: f32 (weights are dequantised block by block
    /// inside the dot product, which is exact), or with [`set_int8_activations`] the type's int8
    /// `vec_dot_type` (ggml's scheme: faster integer kernels, llama.cpp-like rounding).
    pub fn act_type(&self) -> QuantType {
        if INT8_ACTIVATIONS.load(Ordering::Relaxed) && self.block_scales.is_none() {
            self.ty.vec_dot_type()
        } else {
            QuantType::F32
        }
    }

    /// Dequantises row `r` into `dst` (`cols` elements).
    pub fn dequantize_row(&self, r: usize, dst: &mut [f32]) -> Result<(), QuantError> {
        match self.row_scales(r) {
            Some(scales) => {
                quant::fp8::dequantize_row(self.row(r), scales, dst);
                Ok(())
            }
            None => quant::dequantize_row(self.ty, self.row(r), dst),
        }
    }

    /// The whole matrix as f32, row-major (for load-time transforms of small tensors).
    pub fn to_f32(&self) -> Result<Vec<f32>, QuantError> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, dst)?;
        }
        Ok(out)
    }

    /// `out = W · x` for one activation vector, multi-threaded.
    pub fn matvec(&self, x: &[f32], out: &mut [f32], scratch: &mut ActBuf) {
        debug_assert_eq!(x.len(), self.cols);
        debug_assert_eq!(out.len(), self.rows);
        let xq = scratch.quantize(self.act_type(), x, self.cols, 1);
        crate::cpu::matvec(self, xq, out);
    }

    /// `out[t] = W · xs[t]` for `n` activation rows (`xs` is `n x cols`, `out` is `n x rows`).
    pub fn matmul(&self, xs: &[f32], n: usize, out: &mut [f32], scratch: &mut ActBuf) {
        debug_assert_eq!(xs.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        let xq = scratch.quantize(self.act_type(), xs, self.cols, n);
        crate::cpu::matmul(self, xq, n, out);
    }
}

/// Reusable buffer for quantised activations (no allocation once warmed up).
#[derive(Default)]
pub struct ActBuf {
    /// u64 storage so that f32 activations viewed through it are aligned.
    buf: Vec<u64>,
}

impl ActBuf {
    /// Quantises `n` rows of `cols` values to `ty` and returns the packed rows; f32 activations
    /// are handed through as they are, without a copy.
    pub fn quantize<'a>(
        &'a mut self,
        ty: QuantType,
        xs: &'a [f32],
        cols: usize,
        n: usize,
    ) -> &'a [u8] {
        if ty == QuantType::F32 {
            return bytemuck::cast_slice(&xs[..cols * n]);
        }
        let rb = ty
            .row_bytes(cols)
            .expect("matrix shapes are checked at load time");
        let words = (rb * n).div_ceil(8);
        if self.buf.len() < words {
            self.buf.resize(words, 0);
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.buf[..words]);
        for (src, dst) in xs
            .chunks_exact(cols)
            .zip(bytes.chunks_exact_mut(rb))
            .take(n)
        {
            quant::quantize_activation(ty, src, dst).expect("activation type is quantisable");
        }
        &bytes[..rb * n]
    }
}
