//! Resident weight matrices and their matrix-vector / matrix-matrix kernels.
//!
//! Upload: each row is padded to a whole number of u32 words (the block bytes are unchanged;
//! the kernels read the packed ggml blocks directly at any byte offset), and the rows are split
//! into pages of at most [`GpuContext::page_limit`] bytes (whole rows), one buffer each. A
//! product dispatches once per page; pages write disjoint row ranges of the same output.
//!
//! Kernels (see `shaders/wgsl/matmul.wgsl`): one workgroup of 32 lanes per 4 rows (decode,
//! one token) or 2 rows x 8 tokens per pass (prefill); lanes walk a row's work units with
//! stride 32, so neighbouring lanes read neighbouring bytes.

use std::sync::{Arc, Mutex};

use super::{GpuBuffer, GpuContext, GpuError, PipelineKey, MM_WG};
use crate::quant::QuantType;
use crate::tensor::{Matrix, FP8_BLOCK};

/// Tokens per pass and rows per workgroup of the one-token (decode) kernel.
const DECODE: (u32, u32) = (1, 4);
/// Tokens per pass and rows per workgroup of the several-token (prefill) kernel.
const PREFILL: (u32, u32) = (8, 2);
/// Prepared calls a matrix keeps for [`GpuMatrix::encode_matmul`].
const CALL_CACHE: usize = 16;

/// The WGSL `unit_dot` of `ty` and the elements of one work unit.
fn kernel(ty: QuantType) -> Option<(&'static str, usize)> {
    use QuantType::*;
    Some(match ty {
        F32 => (shaders::MM_F32, 4),
        F16 => (shaders::MM_F16, 4),
        BF16 => (shaders::MM_BF16, 4),
        F8E4M3 => (shaders::MM_F8E4M3, 16),
        Q4_0 => (shaders::MM_Q4_0, 32),
        Q4_1 => (shaders::MM_Q4_1, 32),
        Q5_0 => (shaders::MM_Q5_0, 32),
        Q5_1 => (shaders::MM_Q5_1, 32),
        Q8_0 => (shaders::MM_Q8_0, 32),
        Q2_K => (shaders::MM_Q2_K, 64),
        Q3_K => (shaders::MM_Q3_K, 64),
        Q4_K => (shaders::MM_Q4_K, 64),
        Q5_K => (shaders::MM_Q5_K, 64),
        Q6_K => (shaders::MM_Q6_K, 64),
        _ => return None,
    })
}

/// Whether `ty`'s kernel computes its products in f16 pairs on a context with
/// [`GpuContext::uses_f16`] (the others compute in f32 everywhere).
pub(crate) fn f16_products(ty: QuantType) -> bool {
    use QuantType::*;
    matches!(ty, F16 | Q8_0 | Q4_K | Q6_K)
}

/// Whether the GPU has a matrix kernel for `ty`.
pub fn gpu_supports(ty: QuantType) -> bool {
    kernel(ty).is_some()
}

/// The WGSL module of one matmul variant.
fn module_source(ty_src: &str, nt: u32, rows: u32, subgroups: bool, f16: bool) -> String {
    let (args, lane, size, reduce) = if subgroups {
        (
            "@builtin(subgroup_invocation_id) sg_lane: u32,\n    @builtin(subgroup_size) sg_size: u32",
            "sg_lane",
            "sg_size",
            shaders::REDUCE_SUBGROUP,
        )
    } else {
        ("", "0u", "1u", shaders::REDUCE_SHARED)
    };
    let body = shaders::MATMUL
        .replace("SUBGROUP_ARGS", args)
        .replace("SG_LANE", lane)
        .replace("SG_SIZE", size);
    let (enable, pair) = if f16 {
        ("enable f16;\n", shaders::PAIR_F16)
    } else {
        ("", shaders::PAIR_F32)
    };
    format!(
        "{enable}{}\nconst WG: u32 = {MM_WG}u;\nconst ROWS: u32 = {rows}u;\nconst NT: u32 = {nt}u;\n\n{body}\n{reduce}\n{pair}\n{ty_src}",
        shaders::PRELUDE
    )
}

/// The uniform block of `matmul.wgsl` (`Params`).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    row_words: u32,
    n: u32,
    x_off: u32,
    x_stride: u32,
    out_off: u32,
    out_stride: u32,
    row_base: u32,
    units: u32,
    scale_cols: u32,
    wg_x: u32,
    group_rows: u32,
    group_x: u32,
    _pad: [u32; 2],
}

#[derive(Debug)]
struct Page {
    buffer: GpuBuffer,
    row0: usize,
    rows: usize,
}

/// A weight matrix resident on the device: packed rows of any type with a GPU kernel (see
/// [`gpu_supports`]), split into pages that each fit one storage binding.
#[derive(Debug)]
pub struct GpuMatrix {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    row_words: usize,
    units: u32,
    pages: Vec<Page>,
    scales: Option<GpuBuffer>,
    scale_cols: u32,
    calls: Mutex<Vec<(CallKey, Arc<MatmulCall>)>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CallKey {
    x: u64,
    x_off: usize,
    out: u64,
    out_off: usize,
    n: usize,
    x_stride: usize,
    out_stride: usize,
    group: (usize, usize),
}

/// One prepared product: for each page a parameter block, a bind group and a grid. Encoding
/// it allocates nothing and writes nothing; it stays valid while its buffers live.
#[derive(Debug)]
pub struct MatmulCall {
    pipeline: wgpu::ComputePipeline,
    passes: Vec<(wgpu::BindGroup, u32, u32)>,
    _params: Vec<GpuBuffer>,
}

impl MatmulCall {
    /// Records the product's dispatches (one per page) in `encoder`.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("matmul"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline);
        for (bg, x, y) in &self.passes {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(*x, *y, 1);
        }
    }
}

impl GpuMatrix {
    /// Uploads `m` (with its FP8 scale grid) as resident pages. The whole size is checked
    /// against the memory budget before anything is allocated.
    pub fn upload(ctx: &GpuContext, m: &Matrix) -> Result<Self, GpuError> {
        let (_, unit) = kernel(m.ty).ok_or(GpuError::Unsupported(m.ty.name()))?;
        if m.ty == QuantType::F8E4M3 && m.block_scales.is_none() {
            return Err(GpuError::BadArgument(
                "an F8_E4M3 matrix needs its block scales".into(),
            ));
        }
        if m.rows == 0 || m.cols == 0 {
            return Err(GpuError::BadArgument(format!(
                "empty matrix {}x{}",
                m.rows, m.cols
            )));
        }
        let row_words = m.row_bytes.div_ceil(4);
        let stride = (row_words * 4) as u64;
        let limit = ctx.page_limit();
        if stride > limit {
            return Err(GpuError::RowTooLarge {
                row_bytes: stride,
                limit,
            });
        }
        let words_total = row_words as u64 * m.rows as u64;
        if words_total > u32::MAX as u64 || (m.rows * m.cols) as u64 > u32::MAX as u64 {
            return Err(GpuError::BadArgument(format!(
                "matrix {}x{} is too large for 32-bit indexing",
                m.rows, m.cols
            )));
        }
        let rows_per_page = (limit / stride) as usize;
        let scale_cols = m.cols.div_ceil(FP8_BLOCK);
        let scale_bytes = m.block_scales.as_ref().map_or(0, |s| s.len() as u64 * 4);
        ctx.check_fits(stride * m.rows as u64 + scale_bytes)?;

        let mut pages = Vec::new();
        let mut row0 = 0;
        while row0 < m.rows {
            let rows = rows_per_page.min(m.rows - row0);
            let buffer = ctx.create_buffer_inner(
                "weights",
                stride * rows as u64,
                wgpu::BufferUsages::STORAGE,
                true,
            )?;
            {
                let mut view = buffer
                    .buffer
                    .get_mapped_range_mut(..)
                    .map_err(|e| GpuError::Device(e.to_string()))?;
                let src = &m.data[row0 * m.row_bytes..(row0 + rows) * m.row_bytes];
                if stride as usize == m.row_bytes {
                    view.slice(..src.len()).copy_from_slice(src);
                } else {
                    for (r, row) in src.chunks_exact(m.row_bytes).enumerate() {
                        let at = r * stride as usize;
                        view.slice(at..at + m.row_bytes).copy_from_slice(row);
                    }
                }
            }
            buffer.buffer.unmap();
            pages.push(Page { buffer, row0, rows });
            row0 += rows;
        }
        let scales = match &m.block_scales {
            Some(s) => {
                let b = ctx.create_buffer(
                    "fp8 scales",
                    s.len() as u64 * 4,
                    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                )?;
                ctx.queue
                    .write_buffer(&b.buffer, 0, bytemuck::cast_slice(&s[..]));
                Some(b)
            }
            None => None,
        };
        Ok(GpuMatrix {
            ty: m.ty,
            rows: m.rows,
            cols: m.cols,
            row_words,
            units: m.cols.div_ceil(unit) as u32,
            pages,
            scales,
            scale_cols: scale_cols as u32,
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Uploads `parts` (one type, one column count, no FP8 scale grids) stacked by rows as one
    /// matrix: part `i` is rows `i * parts[0].rows ..` (for grouped products, one group per
    /// part). The concatenation is a temporary host copy.
    pub fn upload_stacked(ctx: &GpuContext, parts: &[Matrix]) -> Result<Self, GpuError> {
        let Some(first) = parts.first() else {
            return Err(GpuError::BadArgument("no matrices to stack".into()));
        };
        if parts.iter().any(|m| {
            m.ty != first.ty
                || m.rows != first.rows
                || m.cols != first.cols
                || m.block_scales.is_some()
        }) {
            return Err(GpuError::BadArgument(
                "stacked matrices need one type and shape and no block scales".into(),
            ));
        }
        let mut data = Vec::with_capacity(first.data.len() * parts.len());
        for m in parts {
            data.extend_from_slice(&m.data);
        }
        let m = Matrix::new(
            first.ty,
            first.rows * parts.len(),
            first.cols,
            crate::Bytes::from_vec(data),
        )
        .map_err(|e| GpuError::BadArgument(format!("stacked matrix: {e}")))?;
        GpuMatrix::upload(ctx, &m)
    }

    /// Number of buffers the rows are split into.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Device bytes this matrix holds (padded rows plus scales).
    pub fn device_bytes(&self) -> u64 {
        self.pages.iter().map(|p| p.buffer.size()).sum::<u64>()
            + self.scales.as_ref().map_or(0, |s| s.size())
    }

    /// Prepares `out[out_offset + t * rows + r] = W[r] · x_t` for `n` tokens with
    /// `x_t = x[x_offset + t * cols ..][..cols]` (offsets in f32 elements). The buffers must
    /// fit one storage binding each. The result holds its own parameter block and bind groups:
    /// build it once, encode it as often as needed.
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        x: &GpuBuffer,
        x_offset: usize,
        n: usize,
        out: &GpuBuffer,
        out_offset: usize,
    ) -> Result<MatmulCall, GpuError> {
        self.prepare_strided(ctx, x, x_offset, self.cols, n, out, out_offset, self.rows)
    }

    /// [`GpuMatrix::prepare`] with token strides of its own: `x_t = x[x_offset + t *
    /// x_stride ..][..cols]`, `out[out_offset + t * out_stride + r]` (e.g. one head's slice of
    /// every token's query, `x_stride = heads * head_dim`).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_strided(
        &self,
        ctx: &GpuContext,
        x: &GpuBuffer,
        x_offset: usize,
        x_stride: usize,
        n: usize,
        out: &GpuBuffer,
        out_offset: usize,
        out_stride: usize,
    ) -> Result<MatmulCall, GpuError> {
        let group = (self.rows, 0);
        self.prepare_grouped(
            ctx, x, x_offset, x_stride, group, n, out, out_offset, out_stride,
        )
    }

    /// [`GpuMatrix::prepare_strided`] for a matrix of stacked groups of `group.0` rows each
    /// (see [`GpuMatrix::upload_stacked`]): row `R` reads `x_t + (R / group.0) * group.1`, so
    /// every group (e.g. attention head) multiplies its own slice of the token in the same
    /// dispatch.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_grouped(
        &self,
        ctx: &GpuContext,
        x: &GpuBuffer,
        x_offset: usize,
        x_stride: usize,
        group: (usize, usize),
        n: usize,
        out: &GpuBuffer,
        out_offset: usize,
        out_stride: usize,
    ) -> Result<MatmulCall, GpuError> {
        let limits = ctx.device.limits();
        let bind_max = limits.max_storage_buffer_binding_size;
        if n == 0 {
            return Err(GpuError::BadArgument("a product of 0 tokens".into()));
        }
        if x_stride < self.cols || out_stride < self.rows {
            return Err(GpuError::BadArgument(format!(
                "strides {x_stride}/{out_stride} below the {}x{} matrix's row/column count",
                self.rows, self.cols
            )));
        }
        let (group_rows, group_x) = group;
        if group_rows == 0 || group_rows > self.rows {
            return Err(GpuError::BadArgument(format!(
                "groups of {group_rows} rows in a matrix of {}",
                self.rows
            )));
        }
        let last_group = (self.rows - 1) / group_rows;
        let x_end = x_offset.checked_add((n - 1) * x_stride + last_group * group_x + self.cols);
        let out_end = out_offset.checked_add((n - 1) * out_stride + self.rows);
        if x_end.is_none_or(|e| e > x.len_f32()) || out_end.is_none_or(|e| e > out.len_f32()) {
            return Err(GpuError::BadArgument(format!(
                "{n} tokens of a {}x{} product do not fit x ({} f32 at {x_offset}) or out ({} f32 at {out_offset})",
                self.rows,
                self.cols,
                x.len_f32(),
                out.len_f32()
            )));
        }
        if x.size() > bind_max || out.size() > bind_max || out.len_f32() > u32::MAX as usize {
            return Err(GpuError::BadArgument(format!(
                "activation buffers must fit one binding ({bind_max} bytes)"
            )));
        }
        let (nt, rows) = if n == 1 { DECODE } else { PREFILL };
        let (src, _) = kernel(self.ty).ok_or(GpuError::Unsupported(self.ty.name()))?;
        let subgroups = ctx.uses_subgroups();
        let f16 = ctx.uses_f16() && f16_products(self.ty);
        let key = PipelineKey {
            family: "matmul",
            ty: self.ty.name(),
            nt,
            rows,
            subgroups,
            f16,
        };
        let pipeline = ctx.pipeline(key, || module_source(src, nt, rows, subgroups, f16))?;
        let max_dim = limits.max_compute_workgroups_per_dimension.max(1);
        let scales = self
            .scales
            .as_ref()
            .map_or(&ctx.dummy_scales, |s| &s.buffer);
        let mut passes = Vec::with_capacity(self.pages.len());
        let mut params = Vec::with_capacity(self.pages.len());
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        for p in &self.pages {
            let groups = (p.rows as u32).div_ceil(rows);
            let wg_x = groups.min(max_dim);
            let wg_y = groups.div_ceil(wg_x);
            if wg_y > max_dim {
                return Err(GpuError::BadArgument(
                    "too many rows for one dispatch".into(),
                ));
            }
            let prm = Params {
                rows: p.rows as u32,
                cols: self.cols as u32,
                row_words: self.row_words as u32,
                n: n as u32,
                x_off: x_offset as u32,
                x_stride: x_stride as u32,
                out_off: out_offset as u32,
                out_stride: out_stride as u32,
                row_base: p.row0 as u32,
                units: self.units,
                scale_cols: self.scale_cols,
                wg_x,
                group_rows: group_rows as u32,
                group_x: group_x as u32,
                _pad: [0; 2],
            };
            let pb = ctx.create_buffer(
                "matmul params",
                std::mem::size_of::<Params>() as u64,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            )?;
            ctx.queue
                .write_buffer(&pb.buffer, 0, bytemuck::bytes_of(&prm));
            let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("matmul"),
                layout: &ctx.matmul_layout,
                entries: &[
                    entry(0, &pb.buffer),
                    entry(1, &p.buffer.buffer),
                    entry(2, &x.buffer),
                    entry(3, &out.buffer),
                    entry(4, scales),
                ],
            });
            passes.push((bg, wg_x, wg_y));
            params.push(pb);
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation {
                label: "matmul bind group".into(),
                message: e.to_string(),
            });
        }
        Ok(MatmulCall {
            pipeline,
            passes,
            _params: params,
        })
    }

    /// Records `out[out_offset + t * rows + r] = W[r] · x_t` for `n` tokens in `encoder`
    /// (see [`GpuMatrix::prepare`]). The prepared call is kept (a few per matrix, keyed by
    /// buffers, offsets and `n`), so repeating a product rebuilds nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_matmul(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuBuffer,
        x_offset: usize,
        n: usize,
        out: &GpuBuffer,
        out_offset: usize,
    ) -> Result<(), GpuError> {
        self.encode_matmul_strided(
            ctx, encoder, x, x_offset, self.cols, n, out, out_offset, self.rows,
        )
    }

    /// [`GpuMatrix::encode_matmul`] with token strides (see [`GpuMatrix::prepare_strided`]).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_matmul_strided(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuBuffer,
        x_offset: usize,
        x_stride: usize,
        n: usize,
        out: &GpuBuffer,
        out_offset: usize,
        out_stride: usize,
    ) -> Result<(), GpuError> {
        let group = (self.rows, 0);
        self.encode_matmul_grouped(
            ctx, encoder, x, x_offset, x_stride, group, n, out, out_offset, out_stride,
        )
    }

    /// [`GpuMatrix::encode_matmul`] of stacked groups (see [`GpuMatrix::prepare_grouped`]).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_matmul_grouped(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuBuffer,
        x_offset: usize,
        x_stride: usize,
        group: (usize, usize),
        n: usize,
        out: &GpuBuffer,
        out_offset: usize,
        out_stride: usize,
    ) -> Result<(), GpuError> {
        let key = CallKey {
            x: x.id(),
            x_off: x_offset,
            out: out.id(),
            out_off: out_offset,
            n,
            x_stride,
            out_stride,
            group,
        };
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = calls.iter().find(|(k, _)| *k == key) {
            c.encode(encoder);
            return Ok(());
        }
        let call = Arc::new(self.prepare_grouped(
            ctx, x, x_offset, x_stride, group, n, out, out_offset, out_stride,
        )?);
        call.encode(encoder);
        if calls.len() >= CALL_CACHE {
            calls.remove(0);
        }
        calls.push((key, call));
        Ok(())
    }

    /// `W · x` computed on the device: uploads `x`, dispatches, reads the result back.
    pub fn matvec_host(&self, ctx: &GpuContext, x: &[f32]) -> Result<Vec<f32>, GpuError> {
        self.matmul_host(ctx, x, 1)
    }

    /// `out[t * rows + r] = W[r] · x_t` for `n` tokens (`xs` is `n x cols`), on the device.
    pub fn matmul_host(
        &self,
        ctx: &GpuContext,
        xs: &[f32],
        n: usize,
    ) -> Result<Vec<f32>, GpuError> {
        if xs.len() != n * self.cols {
            return Err(GpuError::BadArgument(format!(
                "{} activations for {n} tokens of {} columns",
                xs.len(),
                self.cols
            )));
        }
        let x = ctx.upload_f32("x", xs)?;
        let out = ctx.alloc_f32("out", n * self.rows)?;
        let call = self.prepare(ctx, &x, 0, n, &out, 0)?;
        let mut enc = ctx.encoder("matmul");
        call.encode(&mut enc);
        ctx.submit_and_wait(enc)?;
        ctx.read_f32(&out, 0, n * self.rows)
    }
}

fn entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: buffer.as_entire_binding(),
    }
}
