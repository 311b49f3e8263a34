//! `coordinator`: the coordinator daemon. `generate` runs one model on this machine and streams
//! text (the reference path the cluster is checked against); `bench` measures the engine.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use engine::chat::ChatMessage;
use engine::generate::{generate_on, CpuSequence, GenerateRequest, SequenceModel};
use engine::gpu::{GpuContext, GpuError, GpuExperts, GpuModel, GpuOptions};
use engine::model::kv_cache::CacheType;
use engine::model::moe::{LocalExperts, RoutedExperts};
use engine::model::weights::ExpertFilter;
use engine::model::{Model, ModelFile};
use engine::sampling::SamplingParams;

mod apibench;
mod bench;
mod netbench;
mod serve;
mod synth;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "DeepSeek-V3/R1 cluster coordinator"
)]
struct Cli {
    /// List the GPU adapters wgpu finds (backend, type, driver, limits, features) and exit.
    #[arg(long)]
    list_gpus: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a model on this machine.
    Generate(GenerateArgs),
    /// Measure memory bandwidth, kernel throughput and model speed.
    Bench(bench::BenchArgs),
    /// Write a deterministic synthetic DeepSeek-V3-shaped model (GGUF).
    Synth(synth::SynthArgs),
    /// Run the cluster: hold the dense part, place the experts on workers, serve.
    Serve(Box<serve::ServeArgs>),
    /// Measure the cluster's data plane (a MoE layer's round trip) and decode through a
    /// loopback cluster against one process.
    BenchCluster(netbench::ClusterBenchArgs),
    /// Load on a running API: aggregate tokens/s and time to first token at several
    /// concurrency levels.
    BenchApi(apibench::BenchApiArgs),
}

/// What to generate and what to write out: `generate` and `serve --prompt` share these.
#[derive(Args)]
pub struct PromptArgs {
    /// Prompt text (BOS first; with --chat, rendered with the model's chat template).
    #[arg(long, conflicts_with = "token_ids")]
    prompt: Option<String>,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Prompt as token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    token_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Latent KV cache precision: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    kv_cache: CacheType,
    /// Write DIR/logits.npy (f32 [P+N, V]) and DIR/gen_ids.npy (int64 [N]).
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Decode steps consume these ids instead of the sampled ones (teacher forcing).
    #[arg(long, value_delimiter = ',')]
    force_ids: Option<Vec<u32>>,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// A .gguf file (the first split of a split model) or a Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    p: PromptArgs,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(flatten)]
    acts: ActivationArgs,
}

/// The activation format of the CPU's quantized products.
#[derive(Args, Clone, Debug)]
pub struct ActivationArgs {
    /// Activations of the quantized products: `int16` (16-bit integers per 256-value block for
    /// the K-quants, Q4_K, Q5_K and Q6_K, each value within 1/65024 of its block's largest,
    /// through integer kernels; every other type exact f32), `f32` (exact everywhere: the
    /// weights dequantised inside the dot product), or `int8` (8 bits per block as llama.cpp
    /// does: the fastest, at llama.cpp's accuracy).
    #[arg(long, default_value = "int16")]
    pub activations: engine::tensor::Activations,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.list_gpus {
        return list_gpus();
    }
    match cli.command {
        Some(Command::Generate(a)) => run_generate(a),
        Some(Command::Bench(a)) => bench::run(a),
        Some(Command::Synth(a)) => synth::run(a),
        Some(Command::Serve(a)) => serve::run(*a),
        Some(Command::BenchCluster(a)) => netbench::run(a),
        Some(Command::BenchApi(a)) => apibench::run(a),
        None => bail!("no command given (see --help)"),
    }
}

/// `--list-gpus`: every adapter, with what `--gpu` and the GPU backend care about.
fn list_gpus() -> Result<()> {
    let list = engine::gpu::list_adapters();
    if list.is_empty() {
        println!("no GPU adapters found (Vulkan, Metal or DX12)");
    }
    for a in &list {
        println!("{a}");
    }
    match engine::gpu::select_adapter(&list, &engine::gpu::GpuSelector::Auto) {
        Ok(i) => println!("auto selects [{i}]"),
        Err(e) => println!("auto selects none: {e}"),
    }
    Ok(())
}

/// The token ids of a chat turn rendered with the model's own template (which starts with
/// BOS itself).
pub fn chat_prompt(
    mf: &ModelFile,
    tokenizer: &engine::tokenizer::Tokenizer,
    system: Option<&str>,
    user: &str,
) -> Result<Vec<u32>> {
    let template = mf
        .chat_template(tokenizer)?
        .context("the model carries no chat template")?;
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(ChatMessage::system(s.to_string()));
    }
    msgs.push(ChatMessage::user(user.to_string()));
    let rendered = template.render(&msgs, true)?;
    Ok(tokenizer.encode(&rendered, false)?)
}

/// The ids that end a generation: the model's end-of-sequence ids and the tokenizer's.
pub fn stop_ids(mf: &ModelFile, tokenizer: &engine::tokenizer::Tokenizer) -> Vec<u32> {
    let mut ids = mf.config.eos_ids.clone();
    ids.extend(tokenizer.eos_id());
    ids
}

/// Sets the CPU backend's thread count (once, before any work).
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        engine::threads::set_threads(n).context("configuring threads")?;
    }
    Ok(())
}

impl PromptArgs {
    /// Whether a prompt was given at all.
    pub fn given(&self) -> bool {
        self.prompt.is_some() || self.token_ids.is_some()
    }

    /// The prompt's token ids: `--token-ids` as given, or `--prompt` encoded (after BOS, or
    /// rendered with the chat template with `--chat`).
    pub fn prompt_ids(
        &self,
        mf: &ModelFile,
        tokenizer: &engine::tokenizer::Tokenizer,
    ) -> Result<Vec<u32>> {
        let prompt: Vec<u32> = match (&self.prompt, &self.token_ids) {
            (Some(text), None) => {
                if self.chat {
                    chat_prompt(mf, tokenizer, self.system.as_deref(), text)?
                } else {
                    let mut ids = Vec::new();
                    if let Some(b) = mf.config.bos_id.or(tokenizer.bos_id()) {
                        ids.push(b);
                    }
                    ids.extend(tokenizer.encode(text, false)?);
                    ids
                }
            }
            (None, Some(ids)) => ids.clone(),
            _ => bail!("give --prompt or --token-ids"),
        };
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        Ok(prompt)
    }

    /// Positions a sequence needs for `prompt` and the new tokens.
    pub fn capacity(&self, prompt: &[u32]) -> usize {
        prompt.len() + self.max_new_tokens + 1
    }

    /// The engine's request for `prompt` with these options.
    pub fn request(
        &self,
        mf: &ModelFile,
        tokenizer: &engine::tokenizer::Tokenizer,
        prompt: Vec<u32>,
    ) -> GenerateRequest {
        GenerateRequest {
            prompt,
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                seed: self.seed,
            },
            stop_ids: if self.ignore_eos {
                vec![]
            } else {
                stop_ids(mf, tokenizer)
            },
            banned_ids: mf.unused_token_ids(),
            force: self.force_ids.clone(),
            keep_logits: self.logits_out.is_some(),
            cache: self.kv_cache,
        }
    }

    /// Runs `req` on `seq` with `routed`, streaming the text to stdout, then prints the timing
    /// (stderr) and writes `--logits-out`.
    pub fn run(
        &self,
        seq: &mut dyn SequenceModel,
        routed: &dyn RoutedExperts,
        tokenizer: &engine::tokenizer::Tokenizer,
        req: &GenerateRequest,
    ) -> Result<()> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let vocab = seq.vocab_size();
        let g = generate_on(seq, routed, tokenizer, req, |piece| {
            // A closed stdout (e.g. `| head`) ends the stream quietly.
            let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
        })?;
        let _ = writeln!(out);
        let (p, n) = (req.prompt.len(), g.tokens.len());
        eprintln!(
            "[{p} prompt tokens in {:.3}s ({:.1} tok/s); {n} generated in {:.3}s ({:.1} tok/s); finish: {:?}]",
            g.prefill_secs,
            p as f64 / g.prefill_secs.max(1e-9),
            g.decode_secs,
            n as f64 / g.decode_secs.max(1e-9),
            g.finish
        );
        if let Some(dir) = &self.logits_out {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let logits = g.logits.as_deref().unwrap_or_default();
            engine::npy::write(
                &dir.join("logits.npy"),
                &[logits.len() / vocab, vocab],
                logits,
            )?;
            let ids: Vec<i64> = g.tokens.iter().map(|&t| t as i64).collect();
            engine::npy::write(&dir.join("gen_ids.npy"), &[ids.len()], &ids)?;
        }
        Ok(())
    }
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    set_threads(a.threads)?;
    engine::tensor::set_activations(a.acts.activations);
    let mf = ModelFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let tokenizer = mf.tokenizer().context("loading the tokenizer")?;
    let prompt = a.p.prompt_ids(&mf, &tokenizer)?;
    let model = mf.load_model().context("loading the model")?;
    let experts = mf
        .load_experts(&ExpertFilter::All)
        .context("loading the experts")?;
    let capacity = a.p.capacity(&prompt);
    let mut gpu = open_gpu(&a, &model, &experts, capacity)?;
    let req = a.p.request(&mf, &tokenizer, prompt);
    let mut cpu_seq;
    let (seq, routed): (&mut dyn SequenceModel, &dyn RoutedExperts) = match &mut gpu {
        Some((gm, ge)) => (
            gm,
            ge.as_ref().map_or(&experts as &dyn RoutedExperts, |g| g),
        ),
        None => {
            cpu_seq = CpuSequence::new(&model, a.p.kv_cache, capacity);
            (&mut cpu_seq, &experts)
        }
    };
    a.p.run(seq, routed, &tokenizer, &req)
}

/// Which GPU, and how it computes (`generate`, `serve`, `bench`).
#[derive(Args, Clone)]
struct GpuDevice {
    /// With the wgpu backend: the adapter, by index or name substring (`coordinator
    /// --list-gpus`); default: the best hardware GPU. A software adapter (lavapipe) is used
    /// only when named here.
    #[arg(long, default_value = "auto")]
    gpu: engine::gpu::GpuSelector,
    /// With the wgpu backend: device memory this process may use, GiB (wgpu cannot report a
    /// device's memory; default unlimited).
    #[arg(long)]
    gpu_memory: Option<f64>,
    /// With the wgpu backend: products in f16 pairs where the adapter has `shader-f16`
    /// (less exact; off by default).
    #[arg(long)]
    gpu_f16: bool,
}

impl GpuDevice {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            selector: self.gpu.clone(),
            memory_budget: self.gpu_memory.map(|g| (g * (1u64 << 30) as f64) as u64),
            f16_products: self.gpu_f16,
            ..Default::default()
        }
    }
}

/// Where the always-active part of the model runs (`generate` and `serve`).
#[derive(Args, Clone)]
struct GpuArgs {
    /// Backend: `auto` (a hardware GPU through wgpu if there is one, else the CPU; never a
    /// software adapter), `cpu`, or `wgpu`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "wgpu"])]
    backend: String,
    #[command(flatten)]
    device: GpuDevice,
}

impl GpuArgs {
    /// The model's dense part on the GPU, or `None` for the CPU: `--backend wgpu` opens the
    /// chosen adapter or fails; `auto` takes a hardware GPU if there is one (never a software
    /// adapter) and falls back to the CPU when there is none or the model does not fit. The
    /// device cache has a slot of `capacity` positions for each of up to `sequences` (as many
    /// as fit the device's memory, at least one).
    fn open_model(
        &self,
        model: &Model,
        capacity: usize,
        sequences: usize,
        cache: CacheType,
    ) -> Result<Option<GpuModel>> {
        let auto = match self.backend.as_str() {
            "cpu" => return Ok(None),
            "wgpu" => false,
            _ => true,
        };
        let ctx = match GpuContext::new(self.device.options()) {
            Ok(c) => std::sync::Arc::new(c),
            Err(e @ GpuError::NoAdapter(_)) if auto => {
                eprintln!("[backend: cpu ({e})]");
                return Ok(None);
            }
            Err(e) => return Err(e).context("opening the GPU"),
        };
        match GpuModel::with_sequences(ctx.clone(), model, capacity, sequences, cache) {
            Ok(m) => {
                if m.sequences() < sequences {
                    eprintln!(
                        "[gpu: the cache for {sequences} sequences of {capacity} positions does \
                         not fit; {} do]",
                        m.sequences()
                    );
                }
                Ok(Some(m))
            }
            Err(e) if auto => {
                eprintln!(
                    "[backend: cpu (the model does not go on {}: {e})]",
                    ctx.adapter().name
                );
                Ok(None)
            }
            Err(e) => Err(e).context("uploading the model to the GPU"),
        }
    }
}

/// The wgpu backend for `generate`, or `None` for the CPU (see [`GpuArgs::open_model`]). The
/// routed experts go to the device too when they fit; otherwise they stay on the host.
fn open_gpu(
    a: &GenerateArgs,
    model: &Model,
    experts: &LocalExperts,
    capacity: usize,
) -> Result<Option<(GpuModel, Option<GpuExperts>)>> {
    let Some(gm) = a.gpu.open_model(model, capacity, 1, a.p.kv_cache)? else {
        return Ok(None);
    };
    let ctx = gm.context().clone();
    let has_experts = experts
        .layers
        .iter()
        .flatten()
        .any(|s| s.experts.iter().any(Option::is_some));
    let ge = if has_experts {
        match GpuExperts::upload(ctx.clone(), experts, gm.max_batch()) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("[routed experts stay on the CPU: {e}]");
                None
            }
        }
    } else {
        None
    };
    eprintln!(
        "[backend: wgpu on {} ({}), experts on the {}, {:.1} MiB of device memory]",
        ctx.adapter().name,
        ctx.adapter().backend,
        if ge.is_some() { "GPU" } else { "CPU" },
        ctx.memory_used() as f64 / (1u64 << 20) as f64
    );
    Ok(Some((gm, ge)))
}
