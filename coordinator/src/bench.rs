//! `coordinator bench`: memory bandwidth, kernel throughput at the 671B's shapes, and decode /
//! prefill speed of a model file, optionally against llama.cpp's `llama-bench` on the same file
//! in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::model::kv_cache::CacheType;
use engine::model::weights::ExpertFilter;
use engine::model::{Logits, ModelFile, Workspace};

#[derive(Args)]
pub struct BenchArgs {
    /// Threads for every measurement (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Skip the kernel measurements (bandwidth, matvec at the 671B's shapes).
    #[arg(long)]
    no_kernels: bool,
    /// Smaller kernel measurements (quick check, less precise).
    #[arg(long)]
    quick: bool,
    /// Also measure decode and prefill on this model (.gguf or Hugging Face directory).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Decode steps measured.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Latent KV cache precision of the model measurement, CPU or GPU (f16 matches
    /// llama-bench's default).
    #[arg(long, default_value = "f16")]
    kv_cache: CacheType,
    #[command(flatten)]
    acts: crate::ActivationArgs,
    /// llama.cpp's `llama-bench` binary: run it on the same model with the same threads.
    #[arg(long)]
    llama_bench: Option<PathBuf>,
    /// Backend of the measurements: `cpu`, or `wgpu` (GPU matvec GB/s at the 671B's shapes for
    /// Q4_K, Q6_K, Q8_0; with `--model`, the whole model's prefill and decode step on the GPU).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "wgpu"])]
    backend: String,
    /// With `--backend wgpu --model`: also decode this many sequences together (each in a
    /// cache slot of its own after its own prefill) and report the tokens per second of all.
    #[arg(long, default_value_t = 8)]
    gpu_batch: usize,
    #[command(flatten)]
    device: crate::GpuDevice,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    crate::set_threads(Some(threads))?;
    engine::tensor::set_activations(a.acts.activations);
    let acts = a.acts.activations.describe();
    if a.backend == "wgpu" {
        return gpu_bench(&a);
    }
    println!(
        "# threads: {threads}; CPU kernels: {}; activations of quantized products: {acts}",
        engine::quant::cpu_kernels()
    );
    if !a.no_kernels {
        let cfg = if a.quick {
            engine::bench::BenchConfig::smoke()
        } else {
            engine::bench::BenchConfig::full()
        };
        let lines = engine::bench::run_kernel_bench_with(threads, &cfg);
        print!("{}", engine::bench::format_report(&lines));
    }
    if let Some(model) = &a.model {
        let mut speed = ModelSpeed::load(model, a.prompt, a.decode, a.kv_cache)?;
        // Untimed: the first pass faults the mapped weights in (llama-bench warms up too).
        speed.rep()?;
        // With llama-bench: rounds of one repetition each, the engine's then llama-bench's, so
        // both run on the machine as it is at that moment (a shared host's speed drifts over
        // minutes); the ratio is the median of the rounds' ratios.
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..a.reps.max(1) {
            ours.push(speed.rep()?);
            if let Some(bin) = &a.llama_bench {
                theirs.push(llama_bench(bin, model, threads, a.prompt, a.decode)?);
            }
        }
        let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
        println!(
            "model {}: prefill {} tokens {:.1} tok/s, decode {:.2} tok/s (median of {})",
            model.display(),
            a.prompt,
            med(&ours, |r| r.0),
            med(&ours, |r| r.1),
            ours.len()
        );
        if !theirs.is_empty() {
            let ratios: Vec<(f64, f64)> = ours
                .iter()
                .zip(&theirs)
                .map(|(o, t)| (o.0 / t.0, o.1 / t.1))
                .collect();
            println!(
                "llama.cpp: prefill {:.1} tok/s, decode {:.2} tok/s (median of {}, one repetition after each of the engine's)",
                med(&theirs, |r| r.0),
                med(&theirs, |r| r.1),
                theirs.len()
            );
            println!(
                "ratio engine/llama.cpp, median of the rounds: prefill {:.2}x, decode {:.2}x",
                med(&ratios, |r| r.0),
                med(&ratios, |r| r.1)
            );
            let each: Vec<String> = ratios
                .iter()
                .map(|r| format!("{:.2}/{:.2}", r.0, r.1))
                .collect();
            println!("  rounds (prefill/decode ratio): {}", each.join(" "));
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A model loaded for speed measurements: prefill of a fixed pseudo-random prompt, then
/// greedy decode steps.
struct ModelSpeed {
    model: engine::model::Model,
    experts: engine::model::moe::LocalExperts,
    ids: Vec<u32>,
    decode: usize,
    kv: CacheType,
    ws: Workspace,
}

impl ModelSpeed {
    fn load(path: &Path, prompt: usize, decode: usize, kv: CacheType) -> Result<Self> {
        let mf = ModelFile::open(path).with_context(|| format!("opening {}", path.display()))?;
        let model = mf.load_model()?;
        let experts = mf.load_experts(&ExpertFilter::All)?;
        let vocab = model.cfg.vocab_size as u64;
        // Deterministic pseudo-random prompt (ids inside the vocabulary).
        let ids = (0..prompt as u64)
            .map(|i| (engine::bench::splitmix(i + 1) % vocab) as u32)
            .collect();
        Ok(ModelSpeed {
            model,
            experts,
            ids,
            decode,
            kv,
            ws: Workspace::default(),
        })
    }

    /// One repetition: (prefill tokens/s, decode tokens/s).
    fn rep(&mut self) -> Result<(f64, f64)> {
        let (prompt, decode) = (self.ids.len(), self.decode);
        let mut cache = self.model.new_cache(self.kv, prompt + decode + 1);
        let (m, e, ws) = (&self.model, &self.experts, &mut self.ws);
        let t = Instant::now();
        let mut next = argmax(m.forward(&self.ids, &mut cache, e, ws, Logits::Last)?);
        let pp = prompt as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..decode {
            next = argmax(m.forward(&[next], &mut cache, e, ws, Logits::Last)?);
        }
        Ok((pp, decode as f64 / t.elapsed().as_secs_f64()))
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(0, |b, (i, &x)| if x > v[b] { i } else { b }) as u32
}

/// Runs `llama-bench -r 1 -o json` (one repetition) and returns (prefill, decode) tokens/s.
fn llama_bench(bin: &Path, model: &Path, threads: usize, p: usize, n: usize) -> Result<(f64, f64)> {
    let out = Command::new(bin)
        .args([
            "-m",
            &model.display().to_string(),
            "-t",
            &threads.to_string(),
        ])
        .args([
            "-p",
            &p.to_string(),
            "-n",
            &n.to_string(),
            "-r",
            "1",
            "-o",
            "json",
        ])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "llama-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing llama-bench's JSON")?;
    let mut pp = None;
    let mut tg = None;
    for run in v.as_array().context("llama-bench JSON is not a list")? {
        let ts = run["avg_ts"].as_f64();
        if run["n_prompt"].as_u64().unwrap_or(0) > 0 && run["n_gen"].as_u64() == Some(0) {
            pp = ts;
        } else if run["n_gen"].as_u64().unwrap_or(0) > 0 {
            tg = ts;
        }
    }
    Ok((
        pp.context("no prefill result")?,
        tg.context("no decode result")?,
    ))
}

/// `bench --backend wgpu`: GPU matvec GB/s at the 671B's shapes.
fn gpu_bench(a: &BenchArgs) -> Result<()> {
    let ctx = engine::gpu::GpuContext::new(a.device.options())?;
    println!("# wgpu adapter:\n{}", ctx.adapter());
    println!(
        "# kernels use subgroups: {}, f16 products: {}; weights-bytes/second of one matvec, many per submit",
        ctx.uses_subgroups(),
        ctx.uses_f16()
    );
    let (target, submits) = if a.quick {
        (std::time::Duration::from_millis(100), 2)
    } else {
        (std::time::Duration::from_millis(500), 5)
    };
    if !a.no_kernels {
        for ty in engine::bench::GPU_TYPES {
            for (rows, cols) in engine::bench::GPU_SHAPES {
                let r = engine::bench::gpu_matvec_gbps(&ctx, ty, rows, cols, target, submits)?;
                println!("{r}");
            }
        }
    }
    if let Some(model) = &a.model {
        gpu_model_speed(std::sync::Arc::new(ctx), model, a)?;
    }
    Ok(())
}

/// Where the router's selection runs: the GPU computes the router logits, and the selection
/// (sigmoid, bias, group-limited top-k) runs on the host from their readback. Measures the
/// host selection per token at the 671B's routing (256 experts, 8 groups keeping 4, top 8)
/// and the readback of one token's logits, which the cluster needs anyway (the hidden state
/// goes to the workers with it).
fn router_placement(
    ctx: &engine::gpu::GpuContext,
    cfg: &engine::config::ModelConfig,
) -> Result<()> {
    use engine::model::moe::{route_logits, RouterScratch, Routing};
    let big = engine::config::ModelConfig {
        n_routed: 256,
        top_k: 8,
        n_group: 8,
        topk_group: 4,
        ..cfg.clone()
    };
    let logits: Vec<f32> = (0..256u64)
        .map(|i| (engine::bench::splitmix(i + 7) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let bias: Vec<f32> = logits.iter().map(|v| v * 0.01).collect();
    let (mut out, mut scratch) = (Routing::default(), RouterScratch::default());
    let reps = 20_000;
    let t = Instant::now();
    for _ in 0..reps {
        route_logits(
            &big,
            Some(&bias),
            std::hint::black_box(&logits),
            1,
            &mut out,
            &mut scratch,
        );
    }
    let select_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let buf = ctx.upload_f32("router logits", &logits)?;
    let mut reads = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        ctx.read_f32(&buf, 0, 256)?;
        reads.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "router selection on the host: {select_us:.2} us per token (256 experts, 8 groups keeping 4, top 8); readback of one token's router logits: {:.1} us (median)",
        median(reads)
    );
    Ok(())
}

/// `bench --backend wgpu --model PATH`: prefill and decode speed of the whole model on the GPU
/// (routed experts on the device when they fit, else on the host), median of `--reps`.
fn gpu_model_speed(
    ctx: std::sync::Arc<engine::gpu::GpuContext>,
    path: &Path,
    a: &BenchArgs,
) -> Result<()> {
    use engine::model::moe::RoutedExperts;
    let mf = ModelFile::open(path).with_context(|| format!("opening {}", path.display()))?;
    let model = mf.load_model()?;
    let experts = mf.load_experts(&ExpertFilter::All)?;
    let t = Instant::now();
    let mut gm = engine::gpu::GpuModel::with_sequences(
        ctx.clone(),
        &model,
        a.prompt + a.decode + 1,
        a.gpu_batch.max(1),
        a.kv_cache,
    )?;
    let ge = match engine::gpu::GpuExperts::upload(ctx.clone(), &experts, gm.max_batch()) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("# routed experts stay on the CPU: {e}");
            None
        }
    };
    println!(
        "# model uploaded in {:.2}s: {:.1} MiB of device memory, experts on the {}",
        t.elapsed().as_secs_f64(),
        ctx.memory_used() as f64 / (1u64 << 20) as f64,
        if ge.is_some() { "GPU" } else { "CPU" }
    );
    let routed: &dyn RoutedExperts = match &ge {
        Some(g) => g,
        None => &experts,
    };
    drop(model);
    let vocab = gm.cfg.vocab_size as u64;
    let ids: Vec<u32> = (0..a.prompt as u64)
        .map(|i| (engine::bench::splitmix(i + 1) % vocab) as u32)
        .collect();
    let (mut pps, mut steps) = (Vec::new(), Vec::new());
    for _ in 0..a.reps.max(1) {
        gm.truncate(0);
        let t = Instant::now();
        let mut next = argmax(gm.forward(&ids, routed, Logits::Last)?);
        pps.push(a.prompt as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..a.decode {
            next = argmax(gm.forward(&[next], routed, Logits::Last)?);
        }
        steps.push(t.elapsed().as_secs_f64() / a.decode.max(1) as f64);
    }
    let step = median(steps);
    let step_one = step;
    println!(
        "model {} on {}: prefill {} tokens {:.1} tok/s; decode step {:.2} ms, {:.2} tok/s (median of {})",
        path.display(),
        ctx.adapter().name,
        a.prompt,
        median(pps),
        step * 1e3,
        1.0 / step,
        a.reps
    );
    router_placement(&ctx, &gm.cfg)?;
    let batch = gm.sequences().min(a.gpu_batch);
    if batch > 1 {
        let mut steps = Vec::new();
        for _ in 0..a.reps.max(1) {
            let mut next = Vec::with_capacity(batch);
            for s in 0..batch {
                gm.truncate_seq(s, 0);
                let out = gm.forward_batch(&[(s, &ids[..])], routed)?;
                next.push([argmax(out)]);
            }
            let t = Instant::now();
            for _ in 0..a.decode {
                let seqs: Vec<(usize, &[u32])> =
                    next.iter().enumerate().map(|(s, t)| (s, &t[..])).collect();
                let v = gm.cfg.vocab_size;
                let rows: Vec<u32> = gm
                    .forward_batch(&seqs, routed)?
                    .chunks(v)
                    .map(argmax)
                    .collect();
                for (n, r) in next.iter_mut().zip(rows) {
                    n[0] = r;
                }
            }
            steps.push(t.elapsed().as_secs_f64() / a.decode.max(1) as f64);
        }
        let step = median(steps);
        println!(
            "decode of {batch} sequences together: step {:.2} ms, {:.2} tok/s in all ({:.2}x one sequence's)",
            step * 1e3,
            batch as f64 / step,
            (batch as f64 / step) * step_one
        );
    }
    Ok(())
}
