//! WGSL sources of the wgpu backend, one kernel family per file, compiled in as strings.
//!
//! The engine assembles a module from [`PRELUDE`] (pure helpers: byte extraction from u32
//! words, f16/bf16/e4m3 unpacking), a few variant constants, and the family's files. This crate
//! holds text only; it knows nothing about wgpu.

/// Helpers shared by every module (no bindings).
pub const PRELUDE: &str = include_str!("../wgsl/prelude.wgsl");

/// Matrix products over packed rows: bindings, byte readers of the weight words, entry point.
/// Needs `WG`, `ROWS`, `NT` constants, a `reduce` function (one of the two below), a `fma_x2`
/// function (`PAIR_*`) and a `unit_dot` function (one of the `MM_*` files).
pub const MATMUL: &str = include_str!("../wgsl/matmul.wgsl");
/// `fma_x2` (products of two weights with two activations) in f32, or in an f16 pair (adapters
/// with `shader-f16`; the module then starts with `enable f16;`).
pub const PAIR_F32: &str = include_str!("../wgsl/pair_f32.wgsl");
pub const PAIR_F16: &str = include_str!("../wgsl/pair_f16.wgsl");
/// Workgroup reduction with `subgroupAdd`.
pub const REDUCE_SUBGROUP: &str = include_str!("../wgsl/reduce_subgroup.wgsl");
/// Workgroup reduction in shared memory only (adapters without subgroups).
pub const REDUCE_SHARED: &str = include_str!("../wgsl/reduce_shared.wgsl");

pub const MM_F32: &str = include_str!("../wgsl/mm_f32.wgsl");
pub const MM_F16: &str = include_str!("../wgsl/mm_f16.wgsl");
pub const MM_BF16: &str = include_str!("../wgsl/mm_bf16.wgsl");
pub const MM_F8E4M3: &str = include_str!("../wgsl/mm_f8e4m3.wgsl");
pub const MM_Q4_0: &str = include_str!("../wgsl/mm_q4_0.wgsl");
pub const MM_Q4_1: &str = include_str!("../wgsl/mm_q4_1.wgsl");
pub const MM_Q5_0: &str = include_str!("../wgsl/mm_q5_0.wgsl");
pub const MM_Q5_1: &str = include_str!("../wgsl/mm_q5_1.wgsl");
pub const MM_Q8_0: &str = include_str!("../wgsl/mm_q8_0.wgsl");
pub const MM_Q2_K: &str = include_str!("../wgsl/mm_q2_k.wgsl");
pub const MM_Q3_K: &str = include_str!("../wgsl/mm_q3_k.wgsl");
pub const MM_Q4_K: &str = include_str!("../wgsl/mm_q4_k.wgsl");
pub const MM_Q5_K: &str = include_str!("../wgsl/mm_q5_k.wgsl");
pub const MM_Q6_K: &str = include_str!("../wgsl/mm_q6_k.wgsl");

/// RMSNorm of rows (`main`: X to Y; `inplace`: Y itself).
pub const RMSNORM: &str = include_str!("../wgsl/rmsnorm.wgsl");
/// YaRN rotary embedding from a host-computed cos/sin table.
pub const ROPE: &str = include_str!("../wgsl/rope.wgsl");
/// Absorbed MLA over the latent cache: `write` (new rows into the cache), `scores` and
/// `latent` (the softmax runs in between). Needs the prelude and one of the `CACHE_*` files.
pub const ATTENTION: &str = include_str!("../wgsl/attention.wgsl");
/// Latent cache storage (`PER_WORD`, `cache_at`, `to_word`): f32, or two f16/bf16 per word.
pub const CACHE_F32: &str = include_str!("../wgsl/cache_f32.wgsl");
pub const CACHE_F16: &str = include_str!("../wgsl/cache_f16.wgsl");
pub const CACHE_BF16: &str = include_str!("../wgsl/cache_bf16.wgsl");
/// Row softmax in place (rows of growing length for causal attention).
pub const SOFTMAX: &str = include_str!("../wgsl/softmax.wgsl");
/// Element-wise `swiglu` and `add`.
pub const ELEMENTWISE: &str = include_str!("../wgsl/elementwise.wgsl");
/// Routed experts for a batch: `gather`, `swiglu_rows`, `scatter`.
pub const EXPERTS: &str = include_str!("../wgsl/experts.wgsl");
