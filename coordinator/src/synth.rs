//! `coordinator synth`: writes a deterministic synthetic DeepSeek-V3-shaped GGUF (see
//! [`engine::synth`]) for tests, demos and benchmarks against other engines on the same file.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use engine::synth::{self, ChatStyle, SynthSpec, SynthType};

#[derive(Args)]
pub struct SynthArgs {
    /// Output .gguf file.
    #[arg(long)]
    out: PathBuf,
    /// Shape: `tiny` (the oracle's 8.3 M-parameter model) or `mid` (0.82 B, hidden 2048,
    /// 64 experts).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Weight type of the matrices: bf16 or f32 (norms and router are always f32).
    #[arg(long, default_value = "bf16")]
    dtype: SynthType,
    /// Seed (default: the preset's).
    #[arg(long)]
    seed: Option<u64>,
    /// Vocabulary rows (default: the preset's; rows past the tokenizer's 1024 are padding).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Number of layers (default: the preset's).
    #[arg(long)]
    layers: Option<usize>,
    /// `general.name` (default: the preset's).
    #[arg(long)]
    name: Option<String>,
    /// The chat template the file carries: r1 (answers start in a `<think>` part) or v3.
    #[arg(long, default_value = "r1")]
    chat: ChatStyle,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let mut spec = SynthSpec::preset(&a.preset).with_context(|| {
        format!(
            "unknown preset `{}` (one of {})",
            a.preset,
            synth::PRESETS.join(", ")
        )
    })?;
    spec.dtype = a.dtype;
    spec.chat = a.chat;
    if let Some(s) = a.seed {
        spec.seed = s;
    }
    if let Some(v) = a.vocab_size {
        spec.vocab_size = v;
    }
    if let Some(l) = a.layers {
        spec.n_layers = l;
    }
    if let Some(n) = a.name {
        spec.name = n;
    }
    let t = Instant::now();
    let s = synth::write_model(&a.out, &spec)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {}: {} ({:.1} M parameters, {} tensors, {:.1} MB, seed {}) in {:.1}s",
        a.out.display(),
        spec.name,
        s.params as f64 / 1e6,
        s.tensors,
        s.bytes as f64 / 1e6,
        spec.seed,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
