//! The model's non-matrix kernels (RMSNorm, RoPE, attention, softmax, element-wise, expert
//! gather/scatter) compiled once per model, and [`Op`]: one kernel bound to fixed buffers with
//! its own parameter block, built once and encoded every step.
//!
//! An [`Op`]'s parameters are written with `Queue::write_buffer`, which lands before the next
//! submission: an `Op` must therefore be encoded at most once per submission (the model gives
//! every layer its own).

use std::sync::mpsc;

use super::{GpuBuffer, GpuContext, GpuError};
use crate::model::kv_cache::CacheType;

/// Every pipeline of the model's non-matrix kernels.
pub(crate) struct Kernels {
    pub rms: wgpu::ComputePipeline,
    pub rms_inplace: wgpu::ComputePipeline,
    pub rope: wgpu::ComputePipeline,
    pub cache_write: wgpu::ComputePipeline,
    pub scores: wgpu::ComputePipeline,
    pub latent: wgpu::ComputePipeline,
    pub softmax: wgpu::ComputePipeline,
    pub swiglu: wgpu::ComputePipeline,
    pub add: wgpu::ComputePipeline,
    pub gather: wgpu::ComputePipeline,
    pub swiglu_rows: wgpu::ComputePipeline,
    pub scatter: wgpu::ComputePipeline,
}

fn compile(
    ctx: &GpuContext,
    label: &str,
    src: &str,
    entries: &[&str],
) -> Result<Vec<wgpu::ComputePipeline>, GpuError> {
    let dev = ctx.device();
    let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let out = entries
        .iter()
        .map(|e| {
            dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&format!("{label}.{e}")),
                layout: None,
                module: &module,
                entry_point: Some(e),
                compilation_options: Default::default(),
                cache: None,
            })
        })
        .collect();
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(GpuError::Validation {
            label: label.into(),
            message: e.to_string(),
        });
    }
    Ok(out)
}

/// Elements of a latent cache row of `row` values stored as `cache` (rows padded to whole u32
/// words), and the bytes of one such row.
pub(crate) fn cache_row(cache: CacheType, row: usize) -> (usize, usize) {
    match cache {
        CacheType::F32 => (row, row * 4),
        CacheType::F16 | CacheType::BF16 => (row.next_multiple_of(2), row.next_multiple_of(2) * 2),
    }
}

impl Kernels {
    /// Compiles every kernel, the attention family for a latent cache stored as `cache`.
    pub fn new(ctx: &GpuContext, cache: CacheType) -> Result<Self, GpuError> {
        let mut rms = compile(ctx, "rmsnorm", shaders::RMSNORM, &["main", "inplace"])?;
        let mut rope = compile(ctx, "rope", shaders::ROPE, &["main"])?;
        let store = match cache {
            CacheType::F32 => shaders::CACHE_F32,
            CacheType::F16 => shaders::CACHE_F16,
            CacheType::BF16 => shaders::CACHE_BF16,
        };
        let att_src = format!("{}\n{store}\n{}", shaders::PRELUDE, shaders::ATTENTION);
        let mut att = compile(ctx, "attention", &att_src, &["write", "scores", "latent"])?;
        let mut sm = compile(ctx, "softmax", shaders::SOFTMAX, &["main"])?;
        let mut el = compile(ctx, "elementwise", shaders::ELEMENTWISE, &["swiglu", "add"])?;
        let mut ex = compile(
            ctx,
            "experts",
            shaders::EXPERTS,
            &["gather", "swiglu_rows", "scatter"],
        )?;
        Ok(Kernels {
            scatter: ex.pop().unwrap(),
            swiglu_rows: ex.pop().unwrap(),
            gather: ex.pop().unwrap(),
            add: el.pop().unwrap(),
            swiglu: el.pop().unwrap(),
            softmax: sm.pop().unwrap(),
            latent: att.pop().unwrap(),
            scores: att.pop().unwrap(),
            cache_write: att.pop().unwrap(),
            rope: rope.pop().unwrap(),
            rms_inplace: rms.pop().unwrap(),
            rms: rms.pop().unwrap(),
        })
    }
}

/// One kernel bound to fixed buffers (binding 0: its own parameter block).
pub(crate) struct Op {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    params: GpuBuffer,
}

/// Parameter words of an [`Op`] (u32 or f32 bits), at most 16.
pub(crate) type Words = [u32; 16];

impl Op {
    /// Binds `pipeline` to `buffers` (`(binding, buffer)`, bindings from 1).
    pub fn new(
        ctx: &GpuContext,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[(u32, &GpuBuffer)],
    ) -> Result<Self, GpuError> {
        let params = ctx.create_buffer(
            "op params",
            64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: params.buffer().as_entire_binding(),
        }];
        for (b, buf) in buffers {
            entries.push(wgpu::BindGroupEntry {
                binding: *b,
                resource: buf.buffer().as_entire_binding(),
            });
        }
        let scope = ctx.device().push_error_scope(wgpu::ErrorFilter::Validation);
        let bind_group = ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("op"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation {
                label: "op bind group".into(),
                message: e.to_string(),
            });
        }
        Ok(Op {
            pipeline: pipeline.clone(),
            bind_group,
            params,
        })
    }

    /// Writes `words` as the parameters (before the next submission) and records one dispatch
    /// of `groups` workgroups.
    pub fn encode(
        &self,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        words: &[u32],
        groups: (u32, u32, u32),
    ) {
        let mut w: Words = [0; 16];
        w[..words.len()].copy_from_slice(words);
        ctx.queue()
            .write_buffer(self.params.buffer(), 0, bytemuck::cast_slice(&w));
        if groups.0 == 0 || groups.1 == 0 || groups.2 == 0 {
            return;
        }
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("op"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }
}

/// A 1-D grid of `count` lanes in 64-lane workgroups, folded into 2-D past the dimension
/// limit: `(wg_x, (wg_x, wg_y, 1))`.
pub(crate) fn grid_1d(ctx: &GpuContext, count: usize) -> (u32, (u32, u32, u32)) {
    let groups = (count as u32).div_ceil(64).max(1);
    let max = ctx.device().limits().max_compute_workgroups_per_dimension;
    let x = groups.min(max);
    (x, (x, groups.div_ceil(x), 1))
}

/// A host-mappable buffer that device results are copied into and read back from.
pub(crate) struct Readback {
    staging: GpuBuffer,
}

impl Readback {
    pub fn new(ctx: &GpuContext, floats: usize) -> Result<Self, GpuError> {
        Ok(Readback {
            staging: ctx.create_buffer(
                "readback",
                (floats * 4) as u64,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?,
        })
    }

    /// Records copies of `(buffer, f32 offset, f32 length)` into consecutive ranges of the
    /// staging buffer, submits `enc`, waits, and appends the values to `out` in order.
    pub fn read(
        &self,
        ctx: &GpuContext,
        mut enc: wgpu::CommandEncoder,
        copies: &[(&GpuBuffer, usize, usize)],
        out: &mut Vec<f32>,
    ) -> Result<(), GpuError> {
        let mut at = 0u64;
        for (b, off, len) in copies {
            let bytes = (*len * 4) as u64;
            if at + bytes > self.staging.size() {
                return Err(GpuError::BadArgument("readback larger than staging".into()));
            }
            if bytes > 0 {
                enc.copy_buffer_to_buffer(
                    b.buffer(),
                    (*off * 4) as u64,
                    self.staging.buffer(),
                    at,
                    bytes,
                );
            }
            at += bytes;
        }
        ctx.submit_and_wait(enc)?;
        if at == 0 {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        let slice = self.staging.buffer().slice(..at);
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        ctx.device()
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(std::time::Duration::from_secs(600)),
            })
            .map_err(|e| GpuError::Device(e.to_string()))?;
        rx.recv()
            .map_err(|e| GpuError::Device(e.to_string()))?
            .map_err(|e| GpuError::Device(e.to_string()))?;
        {
            let view = self
                .staging
                .buffer()
                .get_mapped_range(..at)
                .map_err(|e| GpuError::Device(e.to_string()))?;
            out.extend_from_slice(bytemuck::cast_slice::<u8, f32>(&view));
        }
        self.staging.buffer().unmap();
        Ok(())
    }
}
