//! Measurement harness for the `bench` command: memory bandwidth and kernel throughput.
//!
//! Decode is bound by how fast weights stream from DRAM, so the figure that matters is a
//! matvec's weight bytes per second as a fraction of the machine's streaming read bandwidth
//! (measured here the same way, with the same threads). Every measurement reads buffers far
//! larger than the last-level cache, rotating through several copies of a matrix so that each
//! call reads from DRAM, and reports medians (and p90) of per-call times.
//!
//! Also here: synthetic weights and activations with valid block headers (finite, moderate f16
//! scales; consistent Q8_K/Q8_1 sums), shared with the kernel tests.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::cpu::pool::{self, Pool};
use crate::quant::{QuantType, QK_K};
use crate::tensor::Matrix;
use crate::Bytes;

/// The 671B's decode matvec shapes as `(rows, cols, what)` = out x in.
pub const DECODE_SHAPES: &[(usize, usize, &str)] = &[
    (7168, 2048, "expert down"),
    (2048, 7168, "expert gate/up"),
    (7168, 16384, "o_proj"),
    (1536, 7168, "q_a_proj"),
];

/// Weight types the decode figures are taken for.
pub const BENCH_TYPES: &[QuantType] = &[QuantType::Q4_K, QuantType::Q6_K, QuantType::Q8_0];

/// Sizes of one benchmark run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Buffer read by the bandwidth test.
    pub bandwidth_bytes: usize,
    /// Passes of the bandwidth test (the median is reported).
    pub bandwidth_passes: usize,
    /// Least total weight bytes a measurement rotates through (copies of the matrix).
    pub weight_bytes_min: usize,
    /// Least calls and least time per measurement (per round, for a matvec figure).
    pub calls_min: usize,
    pub time_min: Duration,
    /// Rounds of each matvec figure: each times the matvec right after a bandwidth
    /// measurement (`bandwidth_round_passes` passes), so that the ratio compares the two at the
    /// same moment of a machine whose bandwidth drifts; the figure is the median of the rounds.
    pub matvec_rounds: usize,
    pub bandwidth_round_passes: usize,
    /// Time per in-cache kernel ceiling figure.
    pub ceiling_time: Duration,
    /// Matvec shapes `(rows, cols)` and types.
    pub shapes: Vec<(usize, usize)>,
    pub types: Vec<QuantType>,
    /// Prefill (`matmul`) runs: `(type, rows, cols, tokens)`.
    pub matmuls: Vec<(QuantType, usize, usize, usize)>,
}

impl BenchConfig {
    /// The full measurement: 1 GiB bandwidth buffer, >= 256 MiB of weights per figure.
    pub fn full() -> Self {
        BenchConfig {
            bandwidth_bytes: 1 << 30,
            bandwidth_passes: 7,
            weight_bytes_min: 256 << 20,
            calls_min: 20,
            time_min: Duration::from_millis(150),
            matvec_rounds: 5,
            bandwidth_round_passes: 2,
            ceiling_time: Duration::from_millis(300),
            shapes: DECODE_SHAPES.iter().map(|&(r, c, _)| (r, c)).collect(),
            types: BENCH_TYPES.to_vec(),
            matmuls: vec![
                (QuantType::Q4_K, 2048, 7168, 64),
                (QuantType::Q4_K, 7168, 2048, 64),
                (QuantType::Q6_K, 2048, 7168, 64),
                (QuantType::Q8_0, 2048, 7168, 64),
            ],
        }
    }

    /// A few-millisecond run over small buffers that exercises every path (not a measurement).
    pub fn smoke() -> Self {
        BenchConfig {
            bandwidth_bytes: 4 << 20,
            bandwidth_passes: 2,
            weight_bytes_min: 1 << 20,
            calls_min: 3,
            time_min: Duration::ZERO,
            matvec_rounds: 2,
            bandwidth_round_passes: 1,
            ceiling_time: Duration::ZERO,
            shapes: vec![(64, 512), (96, 1024)],
            types: BENCH_TYPES.to_vec(),
            matmuls: vec![(QuantType::Q4_K, 64, 512, 4)],
        }
    }
}

/// Streaming read bandwidth.
#[derive(Clone, Debug)]
pub struct BandwidthResult {
    pub threads: usize,
    pub bytes: usize,
    pub median_gbps: f64,
    pub best_gbps: f64,
}

/// One matvec measurement.
#[derive(Clone, Debug)]
pub struct MatvecResult {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub threads: usize,
    /// Weight bytes of one matrix.
    pub weight_bytes: usize,
    /// Weight bytes read per second at the median call time, in GB/s (1e9).
    pub gbps: f64,
    /// Median over the rounds of each round's GB/s over the bandwidth measured just before it.
    pub ratio: f64,
    /// Median of the rounds' bandwidth measurements, GB/s.
    pub bandwidth_gbps: f64,
    pub ns_median: u64,
    pub ns_p90: u64,
}

/// One matmul (prefill) measurement.
#[derive(Clone, Debug)]
pub struct MatmulResult {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub tokens: usize,
    pub threads: usize,
    pub ns_median: u64,
    /// `2·rows·cols·tokens` flops per median call, in GFLOP/s.
    pub gflops: f64,
    /// Weight bytes per median call, in GB/s.
    pub gbps: f64,
}

/// One core's kernel speed with weights in cache (see [`kernel_ceiling`]).
#[derive(Clone, Debug)]
pub struct CeilingResult {
    pub ty: QuantType,
    pub cols: usize,
    /// Activation rows per weight pass: 1 (decode's kernel) or the multi-token kernel's width.
    pub tokens: usize,
    /// Weight GB per second of CPU time (each pass counted once, however many tokens).
    pub gb_per_cpu_s: f64,
    /// CPU time over wall time during the measurement (below 1: the core was shared).
    pub cpu_share: f64,
}

/// A line of the kernel benchmark report.
#[derive(Clone, Debug)]
pub enum BenchLine {
    Bandwidth(BandwidthResult),
    Ceiling(CeilingResult),
    Matvec(MatvecResult),
    Matmul(MatmulResult),
}

impl fmt::Display for BenchLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchLine::Bandwidth(b) => write!(
                f,
                "bandwidth  {:>2} thr  read {:>6.0} MiB: median {:6.2} GB/s, best {:6.2} GB/s",
                b.threads,
                b.bytes as f64 / (1 << 20) as f64,
                b.median_gbps,
                b.best_gbps
            ),
            BenchLine::Ceiling(c) => write!(
                f,
                "kernel      1 thr  {:<5} cols {:<5} {} tok in cache: {:6.2} GB per CPU-second \
                 = {:6.1} GFLOP per CPU-second (had {:3.0}% of a core)",
                c.ty.name(),
                c.cols,
                c.tokens,
                c.gb_per_cpu_s,
                c.gb_per_cpu_s * c.tokens as f64 * 2.0 * c.ty.block_elems() as f64
                    / c.ty.block_bytes() as f64,
                c.cpu_share * 100.0
            ),
            BenchLine::Matvec(m) => write!(
                f,
                "matvec     {:>2} thr  {:<5} {:>5}x{:<5} {:>7.2} MB: {:6.2} GB/s = {:5.3} of bw \
                 ({:5.2} GB/s beside it), median {:>8.1} us, p90 {:>8.1} us",
                m.threads,
                m.ty.name(),
                m.rows,
                m.cols,
                m.weight_bytes as f64 / 1e6,
                m.gbps,
                m.ratio,
                m.bandwidth_gbps,
                m.ns_median as f64 / 1e3,
                m.ns_p90 as f64 / 1e3
            ),
            BenchLine::Matmul(m) => write!(
                f,
                "matmul     {:>2} thr  {:<5} {:>5}x{:<5} n={:<4}: {:7.2} GFLOP/s, {:6.2} GB/s \
                 weights, median {:>8.1} us",
                m.threads,
                m.ty.name(),
                m.rows,
                m.cols,
                m.tokens,
                m.gflops,
                m.gbps,
                m.ns_median as f64 / 1e3
            ),
        }
    }
}

/// The report as text, one line per measurement.
pub fn format_report(lines: &[BenchLine]) -> String {
    let mut s = String::new();
    for l in lines {
        s.push_str(&l.to_string());
        s.push('\n');
    }
    s
}

/// Bandwidth, every decode shape and type, and the prefill runs, with `threads` threads.
pub fn run_kernel_bench(threads: usize) -> Vec<BenchLine> {
    run_kernel_bench_with(threads, &BenchConfig::full())
}

/// [`run_kernel_bench`] with explicit sizes.
pub fn run_kernel_bench_with(threads: usize, cfg: &BenchConfig) -> Vec<BenchLine> {
    let probe = BandwidthProbe::new(threads, cfg.bandwidth_bytes);
    let bw = probe.measure(cfg.bandwidth_passes);
    let mut lines = vec![BenchLine::Bandwidth(bw)];
    for &ty in &cfg.types {
        lines.push(BenchLine::Ceiling(kernel_ceiling(
            ty,
            7168,
            cfg.ceiling_time,
        )));
        if multi_width(ty).is_some() {
            lines.push(BenchLine::Ceiling(kernel_ceiling_multi(
                ty,
                7168,
                cfg.ceiling_time,
            )));
        }
    }
    for &ty in &cfg.types {
        for &(rows, cols) in &cfg.shapes {
            let m = matvec_with(ty, rows, cols, threads, Some(&probe), cfg);
            lines.push(BenchLine::Matvec(m));
        }
    }
    for &(ty, rows, cols, n) in &cfg.matmuls {
        lines.push(BenchLine::Matmul(matmul_with(
            ty, rows, cols, n, threads, cfg,
        )));
    }
    lines
}

/// Runs `f` with the matrix kernels' pool at `threads` threads, then restores its size.
fn with_threads<T>(threads: usize, f: impl FnOnce() -> T) -> T {
    let before = pool::threads();
    pool::set_threads(threads);
    let r = f();
    pool::set_threads(before);
    r
}

// ---------------------------------------------------------------------------------------------
// Bandwidth.

/// Median streaming read bandwidth in GB/s over a 1 GiB buffer, read by `threads` threads.
pub fn memory_bandwidth_gbps(threads: usize) -> f64 {
    bandwidth_with(threads, 1 << 30, 7).median_gbps
}

/// Reads a `bytes` buffer `passes` times with `threads` threads.
pub fn bandwidth_with(threads: usize, bytes: usize, passes: usize) -> BandwidthResult {
    BandwidthProbe::new(threads, bytes).measure(passes)
}

/// A buffer (faulted in) and a pool to measure the streaming read bandwidth with, again and
/// again.
pub struct BandwidthProbe {
    pool: Pool,
    buf: Vec<u64>,
}

impl BandwidthProbe {
    pub fn new(threads: usize, bytes: usize) -> Self {
        let pool = Pool::new(threads);
        let buf: Vec<u64> = (0..bytes / 8)
            .into_par_iter()
            .map(|i| splitmix(i as u64))
            .collect();
        // One untimed pass to fault in and settle the pages.
        std::hint::black_box(read_all(&pool, &buf));
        BandwidthProbe { pool, buf }
    }

    /// `passes` timed reads of the whole buffer: median and best GB/s.
    pub fn measure(&self, passes: usize) -> BandwidthResult {
        let bytes = self.buf.len() * 8;
        let mut gbps: Vec<f64> = (0..passes.max(1))
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(read_all(&self.pool, &self.buf));
                bytes as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect();
        gbps.sort_by(f64::total_cmp);
        BandwidthResult {
            threads: self.pool.threads(),
            bytes,
            median_gbps: gbps[gbps.len() / 2],
            best_gbps: gbps[gbps.len() - 1],
        }
    }
}

/// Reads `buf` with every thread of `pool`, in 2 MiB pieces claimed in order (long sequential
/// runs for the prefetchers; a thread that loses its core does not leave a big part unread).
fn read_all(pool: &Pool, buf: &[u64]) -> u64 {
    const PART: usize = (2 << 20) / 8;
    let total = AtomicU64::new(0);
    pool.for_each(buf.len().div_ceil(PART), |c| {
        let s = sum_words(&buf[c * PART..((c + 1) * PART).min(buf.len())]);
        total.fetch_add(s, Ordering::Relaxed);
    });
    total.load(Ordering::Relaxed)
}

/// Wrapping sum of `c` (the fastest way to make the CPU read every byte).
fn sum_words(c: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 checked just above.
        return unsafe { sum_words_avx2(c) };
    }
    c.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(c: &[u64]) -> u64 {
    use core::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let blocks = c.chunks_exact(16);
    let rest = blocks.remainder();
    for b in blocks {
        let p = b.as_ptr() as *const __m256i;
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_epi64(*a, _mm256_loadu_si256(p.add(k)));
        }
    }
    let v = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    let mut lanes = [0u64; 4];
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v);
    lanes
        .iter()
        .chain(rest)
        .fold(0u64, |a, &b| a.wrapping_add(b))
}

// ---------------------------------------------------------------------------------------------
// Matvec and matmul.

/// Weight GB/s of `matvec` on a `rows x cols` matrix of `ty` with `threads` threads, in
/// `cfg.matvec_rounds` rounds, each right after a bandwidth measurement with `probe` (when
/// given): medians of the rounds' GB/s and of their ratios to that bandwidth.
fn matvec_with(
    ty: QuantType,
    rows: usize,
    cols: usize,
    threads: usize,
    probe: Option<&BandwidthProbe>,
    cfg: &BenchConfig,
) -> MatvecResult {
    let mats = matrix_copies(ty, rows, cols, cfg.weight_bytes_min);
    let store = activations(&mats[0], 1, 7);
    let xq: &[u8] = bytemuck::cast_slice(&store);
    let xq = &xq[..mats[0].act_type().row_bytes(cols).expect("whole blocks")];
    let mut out = vec![0f32; rows];
    let weight_bytes = mats[0].data.len();
    // Per round: the matvec's GB/s, and the bandwidth measured just before it (NaN without
    // a probe).
    let (mut gbps, mut bws) = (Vec::new(), Vec::new());
    let mut times = Vec::new();
    for _ in 0..cfg.matvec_rounds.max(1) {
        bws.push(probe.map_or(f64::NAN, |p| {
            p.measure(cfg.bandwidth_round_passes).median_gbps
        }));
        let t = with_threads(threads, || {
            time_calls(mats.len(), cfg, |k| {
                crate::cpu::matvec(&mats[k], xq, &mut out);
            })
        });
        gbps.push(weight_bytes as f64 / percentile(&t, 50) as f64);
        times.extend(t);
    }
    times.sort_unstable();
    let ratios: Vec<f64> = gbps.iter().zip(&bws).map(|(g, b)| g / b).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    MatvecResult {
        ty,
        rows,
        cols,
        threads,
        weight_bytes,
        gbps: median(gbps),
        ratio: median(ratios),
        bandwidth_gbps: median(bws),
        ns_median: percentile(&times, 50),
        ns_p90: percentile(&times, 90),
    }
}

/// GFLOP/s and weight GB/s of `matmul` with `tokens` activation rows.
pub fn matmul_gflops(
    ty: QuantType,
    rows: usize,
    cols: usize,
    tokens: usize,
    threads: usize,
) -> MatmulResult {
    matmul_with(ty, rows, cols, tokens, threads, &BenchConfig::full())
}

fn matmul_with(
    ty: QuantType,
    rows: usize,
    cols: usize,
    tokens: usize,
    threads: usize,
    cfg: &BenchConfig,
) -> MatmulResult {
    let mats = matrix_copies(ty, rows, cols, cfg.weight_bytes_min);
    let store = activations(&mats[0], tokens, 11);
    let xq: &[u8] = bytemuck::cast_slice(&store);
    let xq = &xq[..tokens * mats[0].act_type().row_bytes(cols).expect("whole blocks")];
    let mut out = vec![0f32; rows * tokens];
    let cfg = BenchConfig {
        calls_min: cfg.calls_min.min(10),
        ..cfg.clone()
    };
    let times = with_threads(threads, || {
        time_calls(mats.len(), &cfg, |k| {
            crate::cpu::matmul(&mats[k], xq, tokens, &mut out);
        })
    });
    let ns_median = percentile(&times, 50);
    MatmulResult {
        ty,
        rows,
        cols,
        tokens,
        threads,
        ns_median,
        gflops: (2 * rows * cols * tokens) as f64 / ns_median as f64,
        gbps: mats[0].data.len() as f64 / ns_median as f64,
    }
}

/// `tokens` activation rows for `m` in the format its products take (`m.act_type()`), packed
/// back to back in 8-byte-aligned storage (f32 rows are read as `&[f32]`).
fn activations(m: &Matrix, tokens: usize, seed: u64) -> Vec<u64> {
    let bytes: Vec<u8> = (0..tokens)
        .flat_map(|t| random_activation(m.act_type(), m.cols, seed + t as u64))
        .collect();
    let mut store = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut store)[..bytes.len()].copy_from_slice(&bytes);
    store
}

/// Times `call(k)` for rotating `k` until both minimums are met; per-call nanoseconds, sorted.
fn time_calls(copies: usize, cfg: &BenchConfig, mut call: impl FnMut(usize)) -> Vec<u64> {
    // Warm-up: page in every copy, start the threads.
    for k in 0..copies {
        call(k);
    }
    let start = Instant::now();
    let mut times = Vec::new();
    let mut k = 0;
    while times.len() < cfg.calls_min || start.elapsed() < cfg.time_min {
        let t = Instant::now();
        call(k);
        times.push(t.elapsed().as_nanos() as u64);
        k = (k + 1) % copies;
        if times.len() >= 100_000 {
            break;
        }
    }
    times.sort_unstable();
    times
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    sorted[(sorted.len() - 1) * p / 100].max(1)
}

/// Enough copies of a random `rows x cols` matrix to hold `min_bytes` (at least two).
fn matrix_copies(ty: QuantType, rows: usize, cols: usize, min_bytes: usize) -> Vec<Matrix> {
    let bytes = ty.row_bytes(cols).expect("shape fits the block size") * rows;
    let copies = min_bytes.div_ceil(bytes.max(1)).max(2);
    (0..copies)
        .map(|k| {
            let data = random_weights(ty, rows * cols, 1000 + k as u64);
            Matrix::new(ty, rows, cols, Bytes::from_vec(data)).expect("valid matrix")
        })
        .collect()
}

/// One core's dot-kernel speed in weight GB per CPU-second, rows and activations in L2: the
/// ceiling a matvec could reach per thread if memory were free. The kernel is the one the
/// current activation mode ([`crate::tensor::activations`]) uses for `ty`, run through the CPU
/// backend on one thread. Measured in on-CPU time where the OS reports it (Linux), so it holds
/// on a machine shared with other work.
pub fn kernel_ceiling(ty: QuantType, cols: usize, time: Duration) -> CeilingResult {
    ceiling(ty, cols, 1, time)
}

/// [`kernel_ceiling`] for the multi-token kernel (prefill's) of the current mode, at its full
/// width (1 token where the mode has none for `ty`).
pub fn kernel_ceiling_multi(ty: QuantType, cols: usize, time: Duration) -> CeilingResult {
    ceiling(ty, cols, multi_width(ty).unwrap_or(1), time)
}

/// Tokens per call of the multi-token integer kernel the current mode uses for `ty`, if any.
fn multi_width(ty: QuantType) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::quant::avx2;
        use crate::tensor::Activations;
        match crate::tensor::activations() {
            Activations::Int8 => avx2::kernel_multi(ty).map(|(_, w)| w),
            Activations::Int16 => avx2::kernel_q16(ty).map(|(_, w)| w),
            Activations::F32 => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

fn ceiling(ty: QuantType, cols: usize, tokens: usize, time: Duration) -> CeilingResult {
    let rows = 64;
    let data = random_weights(ty, rows * cols, 1);
    let m = Matrix::new(ty, rows, cols, Bytes::from_vec(data)).expect("valid matrix");
    let store = activations(&m, tokens, 2);
    let xq: &[u8] = bytemuck::cast_slice(&store);
    let xq = &xq[..tokens * m.act_type().row_bytes(cols).expect("whole blocks")];
    let mut out = vec![0f32; rows * tokens];
    let (gb_per_cpu_s, cpu_share) = with_threads(1, || {
        per_cpu_second(time, || {
            crate::cpu::matmul(&m, xq, tokens, &mut out);
            m.data.len()
        })
    });
    std::hint::black_box(&out);
    CeilingResult {
        ty,
        cols,
        tokens,
        gb_per_cpu_s,
        cpu_share,
    }
}

/// Runs `pass` (which returns the bytes it read) for at least `time`: GB per second of this
/// thread's CPU time, and CPU time over wall time.
fn per_cpu_second(time: Duration, mut pass: impl FnMut() -> usize) -> (f64, f64) {
    let mut bytes = 0usize;
    let (cpu0, start) = (thread_cpu_ns(), Instant::now());
    while bytes == 0 || start.elapsed() < time {
        bytes += pass();
    }
    let wall = start.elapsed().as_nanos() as u64;
    let cpu = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => wall,
    };
    (bytes as f64 / cpu as f64, cpu as f64 / wall.max(1) as f64)
}

/// On-CPU nanoseconds of the calling thread, where the OS says (Linux schedstat).
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Synthetic data.

/// A 64-bit mix of `x` (splitmix64): cheap, stateless, good enough for test data.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// `n` values uniform in [-1, 1) from `seed`.
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let r = splitmix(seed.wrapping_mul(0x1_0000_0001) ^ i as u64);
            (r >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Byte offsets of the f16 scale fields inside one block of `ty`.
fn f16_fields(ty: QuantType) -> &'static [usize] {
    use QuantType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[],
    }
}

/// `n` elements of `ty` weights: random bytes with every f16 scale set to a finite value in
/// [2^-10, 2^-6) (either sign for `d`), so every block is one the quantiser could produce in
/// range. Float types hold values in [-1, 1).
pub fn random_weights(ty: QuantType, n: usize, seed: u64) -> Vec<u8> {
    let bytes = ty.row_bytes(n).expect("whole blocks");
    let fl = random_f32_chunked(ty, n, seed);
    if let Some(v) = fl {
        return v;
    }
    let mut out = vec![0u8; bytes];
    out.par_chunks_mut(8 << 10).enumerate().for_each(|(c, ch)| {
        let base = seed ^ ((c as u64) << 32);
        for (i, b) in ch.chunks_mut(8).enumerate() {
            let r = splitmix(base.wrapping_add(i as u64)).to_le_bytes();
            b.copy_from_slice(&r[..b.len()]);
        }
    });
    let bb = ty.block_bytes();
    for (i, blk) in out.chunks_exact_mut(bb).enumerate() {
        let r = splitmix(seed ^ 0x5ca1e ^ (i as u64) << 8);
        for (k, &off) in f16_fields(ty).iter().enumerate() {
            let r = r >> (16 * k);
            let mag = 2f32.powi(-10) * (1.0 + (r & 0xfff) as f32 / 1024.0);
            let v = if r & 0x1000 != 0 && k == 0 { -mag } else { mag };
            blk[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
    }
    out
}

fn random_f32_chunked(ty: QuantType, n: usize, seed: u64) -> Option<Vec<u8>> {
    let v = random_f32(n, seed);
    let out = match ty {
        QuantType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        QuantType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        QuantType::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        _ => return None,
    };
    Some(out)
}

/// A random activation row of `n` elements already in `ty` (F32, Q8_0, Q8_1 or Q8_K built
/// directly, without the quantiser: values in [-127, 127], moderate positive scales, and the
/// sums (Q8_1 `s`, Q8_K `bsums`) consistent with them; Q16_K quantised from random values).
pub fn random_activation(ty: QuantType, n: usize, seed: u64) -> Vec<u8> {
    let q = |i: usize| (splitmix(seed ^ (i as u64) << 1) % 255) as i32 - 127;
    let d = |b: usize| 2f32.powi(-8) * (1.0 + (splitmix(!seed ^ b as u64) % 64) as f32 / 64.0);
    let mut out = Vec::with_capacity(ty.row_bytes(n).expect("whole blocks"));
    match ty {
        QuantType::F32 => return random_weights(QuantType::F32, n, seed),
        QuantType::Q8_0 | QuantType::Q8_1 => {
            for b in 0..n / 32 {
                let dh = half::f16::from_f32(d(b));
                out.extend_from_slice(&dh.to_le_bytes());
                let qs: Vec<i32> = (0..32).map(|j| q(b * 32 + j)).collect();
                if ty == QuantType::Q8_1 {
                    let s = dh.to_f32() * qs.iter().sum::<i32>() as f32;
                    out.extend_from_slice(&half::f16::from_f32(s).to_le_bytes());
                }
                out.extend(qs.iter().map(|&v| v as i8 as u8));
            }
        }
        QuantType::Q8_K => {
            for b in 0..n / QK_K {
                out.extend_from_slice(&d(b).to_le_bytes());
                let qs: Vec<i32> = (0..QK_K).map(|j| q(b * QK_K + j)).collect();
                out.extend(qs.iter().map(|&v| v as i8 as u8));
                for s in qs.chunks(16) {
                    out.extend_from_slice(&(s.iter().sum::<i32>() as i16).to_le_bytes());
                }
            }
        }
        QuantType::Q16_K => {
            // Through the quantiser, which lays out the values and group sums.
            let mut out = vec![0u8; ty.row_bytes(n).expect("whole blocks")];
            crate::quant::quantize_activation(ty, &random_f32(n, seed), &mut out)
                .expect("Q16_K rows of whole blocks");
            return out;
        }
        other => panic!("{other} is not an activation type"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_run_covers_every_line() {
        let lines = run_kernel_bench_with(2, &BenchConfig::smoke());
        let cfg = BenchConfig::smoke();
        assert_eq!(
            lines.len(),
            1 + cfg.types.len() * (1 + cfg.shapes.len()) + cfg.matmuls.len()
        );
        for l in &lines {
            match l {
                BenchLine::Bandwidth(b) => assert!(b.median_gbps > 0.0),
                BenchLine::Matvec(m) => {
                    assert!(m.gbps > 0.0 && m.ns_p90 >= m.ns_median);
                    assert!(m.bandwidth_gbps > 0.0 && m.ratio > 0.0 && m.ratio.is_finite());
                }
                BenchLine::Matmul(m) => assert!(m.gflops > 0.0),
                BenchLine::Ceiling(c) => assert!(c.gb_per_cpu_s > 0.0),
            }
        }
        let text = format_report(&lines);
        assert_eq!(text.lines().count(), lines.len());
    }

    /// Bandwidth only: `cargo test --release -p engine bandwidth_only -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bandwidth_only() {
        for threads in [1, 2] {
            println!(
                "{}",
                BenchLine::Bandwidth(bandwidth_with(threads, 1 << 30, 7))
            );
        }
    }

    /// The real measurement (minutes, ~1.5 GiB of memory): `cargo test --release -p engine
    /// full_kernel_bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn full_kernel_bench() {
        let threads = std::env::var("BENCH_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2);
        let lines = run_kernel_bench(threads);
        print!("{}", format_report(&lines));
    }

    #[test]
    fn random_activation_sizes() {
        for ty in [
            QuantType::F32,
            QuantType::Q8_0,
            QuantType::Q8_1,
            QuantType::Q8_K,
        ] {
            let v = random_activation(ty, 512, 1);
            assert_eq!(v.len(), ty.row_bytes(512).unwrap());
        }
    }
}

// The wgpu backend.

/// Shapes of the GPU matvec measurement: the 671B's attention, dense/shared FFN and expert
/// matrices.
pub const GPU_SHAPES: [(usize, usize); 4] =
    [(7168, 2048), (2048, 7168), (7168, 16384), (1536, 7168)];
/// Types of the GPU matvec measurement.
pub const GPU_TYPES: [QuantType; 3] = [QuantType::Q4_K, QuantType::Q6_K, QuantType::Q8_0];

/// One GPU matvec measurement.
#[derive(Clone, Debug)]
pub struct GpuMatvecResult {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub weight_bytes: usize,
    /// Matvecs per submit (one wait per submit).
    pub iters: usize,
    /// Median over submits of the time per matvec.
    pub ns_per_matvec: u64,
    /// Weight bytes per second, GB/s.
    pub gbps: f64,
}

impl fmt::Display for GpuMatvecResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gpu matvec {:<5} {:>5}x{:<5} {:>7.1} MB: {:>8.1} us, {:>7.2} GB/s ({} per submit)",
            self.ty.name(),
            self.rows,
            self.cols,
            self.weight_bytes as f64 / 1e6,
            self.ns_per_matvec as f64 / 1e3,
            self.gbps,
            self.iters
        )
    }
}

/// Weight GB/s of the GPU matvec on a random `rows x cols` matrix of `ty`: the matvec is
/// encoded many times into one command buffer (sized to take about `target` per submit), each
/// submit waited for once; the median of `submits` submits is reported.
pub fn gpu_matvec_gbps(
    ctx: &crate::gpu::GpuContext,
    ty: QuantType,
    rows: usize,
    cols: usize,
    target: Duration,
    submits: usize,
) -> Result<GpuMatvecResult, crate::gpu::GpuError> {
    let m = Matrix::new(
        ty,
        rows,
        cols,
        Bytes::from_vec(random_weights(ty, rows * cols, 11)),
    )
    .map_err(|e| crate::gpu::GpuError::BadArgument(e.to_string()))?;
    let g = crate::gpu::GpuMatrix::upload(ctx, &m)?;
    let x = ctx.upload_f32("x", &random_f32(cols, 5))?;
    let out = ctx.alloc_f32("out", rows)?;
    let call = g.prepare(ctx, &x, 0, 1, &out, 0)?;
    let run = |iters: usize| -> Result<Duration, crate::gpu::GpuError> {
        let mut enc = ctx.encoder("bench");
        for _ in 0..iters {
            call.encode(&mut enc);
        }
        let t = Instant::now();
        ctx.submit_and_wait(enc)?;
        Ok(t.elapsed())
    };
    let once = run(1)?; // warm-up (pipeline, first touch)
    let once = run(1)?.min(once);
    let iters = (target.as_secs_f64() / once.as_secs_f64().max(1e-7)).clamp(1.0, 1000.0) as usize;
    let mut times: Vec<u64> = (0..submits.max(1))
        .map(|_| run(iters).map(|d| d.as_nanos() as u64 / iters as u64))
        .collect::<Result<_, _>>()?;
    times.sort_unstable();
    let ns = percentile(&times, 50);
    Ok(GpuMatvecResult {
        ty,
        rows,
        cols,
        weight_bytes: m.data.len(),
        iters,
        ns_per_matvec: ns,
        gbps: m.data.len() as f64 / ns as f64,
    })
}

/// A quick estimate (about a quarter of a second) of expert throughput on this machine: GB/s of
/// Q4_K weights through the decode matvec at the 671B's expert shape. What a worker reports so
/// that placement can give faster boxes more experts.
pub fn quick_expert_gbps(threads: usize) -> f64 {
    let cfg = BenchConfig {
        weight_bytes_min: 64 << 20,
        calls_min: 8,
        time_min: Duration::from_millis(200),
        matvec_rounds: 1,
        ..BenchConfig::smoke()
    };
    matvec_with(QuantType::Q4_K, 2048, 7168, threads, None, &cfg).gbps
}
