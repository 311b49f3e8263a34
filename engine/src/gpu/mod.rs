//! The wgpu backend: adapter listing and selection, a device context with memory accounting and
//! a pipeline cache, device buffers, resident weight matrices ([`GpuMatrix`]) with WGSL
//! matrix-vector / matrix-matrix kernels, and [`GpuExecutor`], the thread that owns a context.
//!
//! - wgpu is built without its GL backend, so a missing Vulkan/Metal/DX12 driver is an error
//!   (`GpuError::NoAdapter`), never a silent fallback to GL.
//! - [`GpuSelector::Auto`] picks a real GPU (discrete, then integrated, then virtual) and never a
//!   software adapter (lavapipe/llvmpipe, `DeviceType::Cpu`): those are used only when chosen by
//!   index or name (tests pick lavapipe by name).
//! - wgpu does not report how much memory a device has, so the budget comes from the caller
//!   ([`GpuOptions::memory_budget`], the CLI's `--gpu-memory GiB`; default unlimited). Every
//!   device buffer is reserved against it before it is created; a reservation that does not
//!   fit is refused with [`GpuError::OutOfMemory`] and nothing is allocated.
//! - Shader, pipeline and buffer creation run inside error scopes: a validation or
//!   out-of-memory error becomes a typed error, never a panic. Errors outside a scope are
//!   logged (the default handler would panic).

mod executor;
mod experts;
mod matrix;
mod model;
#[cfg(test)]
mod model_tests;
mod ops;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

pub use executor::{GpuExecutor, JobHandle};
pub use experts::GpuExperts;
pub use matrix::{gpu_supports, GpuMatrix, MatmulCall};
pub use model::{GpuForwardError, GpuLoadError, GpuModel};

/// Errors of the wgpu backend.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GpuError {
    #[error("no suitable GPU adapter: {0}")]
    NoAdapter(String),
    #[error("requesting the device failed: {0}")]
    RequestDevice(String),
    #[error("GPU memory budget exceeded: {requested} bytes requested, {used} of {budget} in use")]
    OutOfMemory {
        requested: u64,
        used: u64,
        budget: u64,
    },
    #[error("the device could not allocate {bytes} bytes: {message}")]
    DeviceOutOfMemory { bytes: u64, message: String },
    #[error("shader or pipeline {label} failed validation: {message}")]
    Validation { label: String, message: String },
    #[error("tensor type {0} has no GPU kernel")]
    Unsupported(&'static str),
    #[error("bad argument: {0}")]
    BadArgument(String),
    #[error("a row of {row_bytes} bytes does not fit in a binding of {limit} bytes")]
    RowTooLarge { row_bytes: u64, limit: u64 },
    #[error("device wait or readback failed: {0}")]
    Device(String),
    #[error("the GPU thread is gone")]
    ExecutorGone,
    #[error("the GPU job queue is full")]
    QueueFull,
    #[error("a GPU job panicked: {0}")]
    JobPanicked(String),
}

/// Which adapter [`GpuContext::new`] uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum GpuSelector {
    /// The best real GPU: discrete, then integrated, then virtual. Never a software adapter.
    #[default]
    Auto,
    /// The adapter at this index of [`list_adapters`] (may be a software adapter).
    Index(usize),
    /// The first adapter whose name contains this (case-insensitive; may be software).
    Name(String),
}

impl std::str::FromStr for GpuSelector {
    type Err = std::convert::Infallible;
    /// `auto`, a number (an index) or a name substring.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s.eq_ignore_ascii_case("auto") {
            GpuSelector::Auto
        } else if let Ok(i) = s.parse() {
            GpuSelector::Index(i)
        } else {
            GpuSelector::Name(s.to_string())
        })
    }
}

/// Options of a [`GpuContext`].
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    pub selector: GpuSelector,
    /// Bytes of device memory this context may allocate; `None` is unlimited (wgpu cannot tell
    /// how much memory a device has, so the caller must say).
    pub memory_budget: Option<u64>,
    /// Caps the bytes of one weight page below the adapter's binding limit (tests use it to
    /// page small matrices).
    pub max_binding_override: Option<u64>,
    /// Builds the kernels without subgroup operations even where the adapter has them.
    pub disable_subgroups: bool,
    /// Computes the products of the F16, Q8_0, Q4_K and Q6_K kernels in f16 pairs (f32
    /// accumulators) where the adapter has `shader-f16`. Off by default: each term is rounded
    /// to 11 bits, which moves whole-model logits by ~1e-2 (more where a router near-tie flips
    /// an expert), and no speed gain has been measured yet.
    pub f16_products: bool,
}

/// What [`list_adapters`] reports about one adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    /// True for software rasterisers (lavapipe, llvmpipe, WARP): `DeviceType::Cpu`.
    pub is_software: bool,
    pub driver: String,
    pub driver_info: String,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_storage_buffers_per_shader_stage: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        writeln!(
            f,
            "[{}] {} ({}, {}{})",
            self.index,
            self.name,
            self.backend,
            self.device_type,
            if self.is_software { ", software" } else { "" }
        )?;
        writeln!(f, "    driver: {} {}", self.driver, self.driver_info)?;
        writeln!(
            f,
            "    limits: buffer {:.0} MiB, storage binding {:.0} MiB, {} storage buffers/stage, \
             workgroup storage {} KiB, {} invocations/workgroup",
            mib(self.max_buffer_size),
            mib(self.max_storage_buffer_binding_size),
            self.max_storage_buffers_per_shader_stage,
            self.max_compute_workgroup_storage_size / 1024,
            self.max_compute_invocations_per_workgroup
        )?;
        write!(
            f,
            "    features: shader-f16 {}, subgroups {} (size {}..{})",
            yes(self.shader_f16),
            yes(self.subgroups),
            self.subgroup_min_size,
            self.subgroup_max_size
        )
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let l = a.limits();
    let f = a.features();
    AdapterSummary {
        index,
        name: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        is_software: info.device_type == wgpu::DeviceType::Cpu,
        driver: info.driver,
        driver_info: info.driver_info,
        max_buffer_size: l.max_buffer_size,
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
        shader_f16: f.contains(wgpu::Features::SHADER_F16),
        subgroups: f.contains(wgpu::Features::SUBGROUP),
        subgroup_min_size: info.subgroup_min_size,
        subgroup_max_size: info.subgroup_max_size,
    }
}

/// Every adapter wgpu finds (Vulkan, Metal, DX12; honours `WGPU_BACKEND`).
pub fn list_adapters() -> Vec<AdapterSummary> {
    adapters(&instance())
        .iter()
        .enumerate()
        .map(|(i, a)| summarize(i, a))
        .collect()
}

/// The index [`GpuSelector`] chooses among `list`, or why none.
pub fn select_adapter(list: &[AdapterSummary], sel: &GpuSelector) -> Result<usize, GpuError> {
    match sel {
        GpuSelector::Auto => {
            let rank = |t: &str| match t {
                "DiscreteGpu" => Some(0),
                "IntegratedGpu" => Some(1),
                "VirtualGpu" => Some(2),
                _ => None,
            };
            list.iter()
                .filter(|a| !a.is_software)
                .filter_map(|a| rank(&a.device_type).map(|r| (r, a.index)))
                .min()
                .map(|(_, i)| i)
                .ok_or_else(|| {
                    let names: Vec<String> = list
                        .iter()
                        .map(|a| format!("{} ({})", a.name, a.device_type))
                        .collect();
                    GpuError::NoAdapter(format!(
                        "no hardware GPU among [{}]; software adapters are used only when \
                         chosen by index or name",
                        names.join(", ")
                    ))
                })
        }
        GpuSelector::Index(i) => list
            .iter()
            .find(|a| a.index == *i)
            .map(|a| a.index)
            .ok_or_else(|| GpuError::NoAdapter(format!("no adapter {i} ({} found)", list.len()))),
        GpuSelector::Name(n) => {
            let n = n.to_lowercase();
            list.iter()
                .find(|a| a.name.to_lowercase().contains(&n))
                .map(|a| a.index)
                .ok_or_else(|| GpuError::NoAdapter(format!("no adapter named like {n:?}")))
        }
    }
}

/// Bytes allocated on the device against a budget. Reservations are taken before a buffer is
/// created and released when it is dropped.
#[derive(Debug)]
pub(crate) struct MemAccount {
    used: AtomicU64,
    budget: u64,
}

impl MemAccount {
    fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, GpuError> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let new = used.checked_add(bytes).filter(|&n| n <= self.budget);
            let Some(new) = new else {
                return Err(GpuError::OutOfMemory {
                    requested: bytes,
                    used,
                    budget: self.budget,
                });
            };
            match self
                .used
                .compare_exchange(used, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Ok(Reservation {
                        account: self.clone(),
                        bytes,
                    })
                }
                Err(u) => used = u,
            }
        }
    }
}

/// A share of the memory budget, given back on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    account: Arc<MemAccount>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.account.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

static NEXT_BUFFER_ID: AtomicU64 = AtomicU64::new(1);

/// A device buffer counted against the context's memory budget. Dropping it destroys the
/// device memory at once (bind groups that still name it can no longer be used).
#[derive(Debug)]
pub struct GpuBuffer {
    buffer: wgpu::Buffer,
    size: u64,
    id: u64,
    _reservation: Reservation,
}

impl GpuBuffer {
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size in f32 elements.
    pub fn len_f32(&self) -> usize {
        (self.size / 4) as usize
    }

    /// A process-unique id (keys of bind-group caches).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        self.buffer.destroy();
    }
}

/// Workgroup size of the matrix kernels (lanes).
pub(crate) const MM_WG: u32 = 32;

/// A compiled kernel variant: `(family, type name, tokens per pass, rows per workgroup,
/// subgroups, f16 products)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    pub family: &'static str,
    pub ty: &'static str,
    pub nt: u32,
    pub rows: u32,
    pub subgroups: bool,
    pub f16: bool,
}

/// A device, its queue, the memory account and the pipeline cache.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    summary: AdapterSummary,
    mem: Arc<MemAccount>,
    page_limit: u64,
    subgroups: bool,
    f16: bool,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    matmul_layout: wgpu::BindGroupLayout,
    matmul_pipeline_layout: wgpu::PipelineLayout,
    /// Bound in place of the FP8 scale grid by every other type.
    dummy_scales: wgpu::Buffer,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.summary.name)
            .field("used", &self.memory_used())
            .field("budget", &self.mem.budget)
            .finish()
    }
}

impl GpuContext {
    /// Opens the adapter `opts.selector` chooses, with its full limits and the `shader-f16` and
    /// subgroup features where it has them.
    pub fn new(opts: GpuOptions) -> Result<Self, GpuError> {
        let instance = instance();
        let list = adapters(&instance);
        let summaries: Vec<AdapterSummary> = list
            .iter()
            .enumerate()
            .map(|(i, a)| summarize(i, a))
            .collect();
        let idx = select_adapter(&summaries, &opts.selector)?;
        let adapter = &list[idx];
        let summary = summaries[idx].clone();
        let mut features = wgpu::Features::empty();
        for f in [wgpu::Features::SHADER_F16, wgpu::Features::SUBGROUP] {
            if adapter.features().contains(f) {
                features |= f;
            }
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("engine"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::RequestDevice(e.to_string()))?;
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            tracing::error!("uncaptured wgpu error: {e}");
        }));
        let mut page_limit = limits
            .max_buffer_size
            .min(limits.max_storage_buffer_binding_size);
        if let Some(o) = opts.max_binding_override {
            page_limit = page_limit.min(o);
        }
        page_limit &= !3;
        let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let matmul_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("matmul"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
                storage(1, true),
                storage(2, true),
                storage(3, false),
                storage(4, true),
            ],
        });
        let matmul_pipeline_layout =
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("matmul"),
                bind_group_layouts: &[Some(&matmul_layout)],
                immediate_size: 0,
            });
        let dummy_scales = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("no scales"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(GpuContext {
            device,
            queue,
            subgroups: summary.subgroups && !opts.disable_subgroups,
            f16: summary.shader_f16 && opts.f16_products,
            summary,
            mem: Arc::new(MemAccount {
                used: AtomicU64::new(0),
                budget: opts.memory_budget.unwrap_or(u64::MAX),
            }),
            page_limit,
            pipelines: Mutex::new(HashMap::new()),
            matmul_layout,
            matmul_pipeline_layout,
            dummy_scales,
        })
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The adapter this context runs on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.summary
    }

    /// Whether the kernels use subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.subgroups
    }

    /// Whether the matrix kernels of F16, Q8_0, Q4_K and Q6_K weights compute their products in
    /// f16 pairs (`shader-f16`; f32 accumulation).
    pub fn uses_f16(&self) -> bool {
        self.f16
    }

    /// Bytes of device buffers allocated through this context and alive.
    pub fn memory_used(&self) -> u64 {
        self.mem.used.load(Ordering::Relaxed)
    }

    /// The memory budget (`u64::MAX` when unlimited).
    pub fn memory_budget(&self) -> u64 {
        self.mem.budget
    }

    /// The most bytes one weight page (one binding) may hold.
    pub fn page_limit(&self) -> u64 {
        self.page_limit
    }

    /// Reserves `bytes` against the budget without allocating (for callers that check a whole
    /// load before starting it).
    pub fn check_fits(&self, bytes: u64) -> Result<(), GpuError> {
        self.mem.reserve(bytes).map(drop)
    }

    /// A device buffer of `size` bytes (rounded up to 4) with `usage`, counted against the
    /// budget; refused before allocating when it does not fit.
    pub fn create_buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<GpuBuffer, GpuError> {
        self.create_buffer_inner(label, size, usage, false)
    }

    fn create_buffer_inner(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
        mapped: bool,
    ) -> Result<GpuBuffer, GpuError> {
        let size = size.max(4).next_multiple_of(4);
        if size > self.device.limits().max_buffer_size {
            return Err(GpuError::BadArgument(format!(
                "buffer {label} of {size} bytes exceeds the device's max_buffer_size"
            )));
        }
        let reservation = self.mem.reserve(size)?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: mapped,
        });
        let v = pollster::block_on(val.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = o {
            return Err(GpuError::DeviceOutOfMemory {
                bytes: size,
                message: e.to_string(),
            });
        }
        if let Some(e) = v {
            return Err(GpuError::Validation {
                label: label.to_string(),
                message: e.to_string(),
            });
        }
        Ok(GpuBuffer {
            buffer,
            size,
            id: NEXT_BUFFER_ID.fetch_add(1, Ordering::Relaxed),
            _reservation: reservation,
        })
    }

    /// A storage buffer holding `data` (activations, inputs), usable as a copy source and
    /// destination.
    pub fn upload_f32(&self, label: &str, data: &[f32]) -> Result<GpuBuffer, GpuError> {
        let b = self.create_buffer(label, (data.len() * 4) as u64, act_usage())?;
        self.queue
            .write_buffer(&b.buffer, 0, bytemuck::cast_slice(data));
        Ok(b)
    }

    /// A zeroed storage buffer of `len` f32 (activations, outputs).
    pub fn alloc_f32(&self, label: &str, len: usize) -> Result<GpuBuffer, GpuError> {
        self.create_buffer(label, (len * 4) as u64, act_usage())
    }

    /// Writes `data` at f32 offset `offset` of `buf` (ordered before the next submit).
    pub fn write_f32(&self, buf: &GpuBuffer, offset: usize, data: &[f32]) -> Result<(), GpuError> {
        if offset + data.len() > buf.len_f32() {
            return Err(GpuError::BadArgument(format!(
                "write of {} f32 at {offset} into a buffer of {}",
                data.len(),
                buf.len_f32()
            )));
        }
        self.queue
            .write_buffer(&buf.buffer, (offset * 4) as u64, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Submits `encoder` and waits until the device has finished it.
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<(), GpuError> {
        let idx = self.queue.submit([encoder.finish()]);
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(idx),
                timeout: None,
            })
            .map(drop)
            .map_err(|e| GpuError::Device(e.to_string()))
    }

    /// A new command encoder.
    pub fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// Copies `len` f32 from offset `offset` of `buf` back to the host (submits and waits).
    pub fn read_f32(
        &self,
        buf: &GpuBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<f32>, GpuError> {
        if offset + len > buf.len_f32() {
            return Err(GpuError::BadArgument(format!(
                "read of {len} f32 at {offset} from a buffer of {}",
                buf.len_f32()
            )));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let bytes = (len * 4) as u64;
        let staging = self.create_buffer(
            "readback",
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut enc = self.encoder("readback");
        enc.copy_buffer_to_buffer(&buf.buffer, (offset * 4) as u64, &staging.buffer, 0, bytes);
        self.submit_and_wait(enc)?;
        let (tx, rx) = mpsc::channel();
        staging
            .buffer
            .slice(..bytes)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(Duration::from_secs(600)),
            })
            .map_err(|e| GpuError::Device(e.to_string()))?;
        rx.recv()
            .map_err(|e| GpuError::Device(e.to_string()))?
            .map_err(|e| GpuError::Device(e.to_string()))?;
        let out = {
            let view = staging
                .buffer
                .get_mapped_range(..bytes)
                .map_err(|e| GpuError::Device(e.to_string()))?;
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        staging.buffer.unmap();
        Ok(out)
    }

    /// The pipeline for `key`, compiled from `source` on first use (inside error scopes: a
    /// WGSL or pipeline validation error is returned, not raised).
    pub(crate) fn pipeline(
        &self,
        key: PipelineKey,
        source: impl FnOnce() -> String,
    ) -> Result<wgpu::ComputePipeline, GpuError> {
        let mut cache = self
            .pipelines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let label = format!(
            "{}_{}_nt{}_r{}{}{}",
            key.family,
            key.ty,
            key.nt,
            key.rows,
            if key.subgroups { "_sg" } else { "" },
            if key.f16 { "_f16" } else { "" }
        );
        let src = source();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(&self.matmul_pipeline_layout),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation {
                label,
                message: e.to_string(),
            });
        }
        cache.insert(key, pipeline.clone());
        Ok(pipeline)
    }
}

fn act_usage() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC
}

/// The shared test helper: a context on a software adapter (lavapipe) or any adapter, `None`
/// with one line on stderr when there is none. With `REQUIRE_GPU_TESTS=1` (CI) a missing
/// adapter panics instead, so the GPU tests cannot silently not run.
pub fn test_context(opts: GpuOptions) -> Option<GpuContext> {
    let list = list_adapters();
    let pick = list
        .iter()
        .find(|a| a.name.to_lowercase().contains("llvmpipe") && a.backend == "Vulkan")
        .or_else(|| list.iter().find(|a| !a.is_software))
        .or_else(|| list.first());
    let require = std::env::var("REQUIRE_GPU_TESTS").is_ok_and(|v| v == "1");
    let Some(a) = pick else {
        if require {
            panic!(
                "REQUIRE_GPU_TESTS=1 but wgpu finds no adapter (is mesa-vulkan-drivers installed?)"
            );
        }
        eprintln!("skipping GPU test: no wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
        return None;
    };
    let opts = GpuOptions {
        selector: GpuSelector::Index(a.index),
        ..opts
    };
    match GpuContext::new(opts) {
        Ok(c) => Some(c),
        Err(e) => panic!("adapter {} found but unusable: {e}", a.name),
    }
}
