//! The engine against the oracle: tiny DeepSeek-V3-shaped models whose reference logits come
//! from Hugging Face transformers (f32), and llama.cpp's own distance to the same references.
//!
//! Every reference holds a 24-token chat prompt and a 32-token greedy continuation; row `t` of
//! its logits follows token `t`. The engine runs the prompt as one prefill call and then one
//! single-token decode step per generated token, reusing the latent cache.

mod common;

use std::path::Path;

use common::*;
use engine::model::kv_cache::CacheType;

/// f32 (bf16-valued) weights: logits within 1e-3 of transformers' on every row, and the same
/// greedy tokens, with the decode steps free-running on the engine's own argmax.
fn check_exact(model: &Path, reference: &str) {
    let r = Reference::load(&oracle(reference));
    let run = run_model(model, &r.prompt, r.gen.len(), None, CacheType::F32);
    let d = diff(&run.logits, &r);
    eprintln!("{}: {d:?}", model.display());
    assert_eq!(run.gen, r.gen, "greedy tokens differ from the reference");
    assert!(d.max_abs <= 1e-3, "max abs diff {} > 1e-3", d.max_abs);
    assert_eq!(d.rows, r.prompt.len() + r.gen.len());
}

#[test]
fn hf_bf16_without_q_lora_matches_transformers() {
    check_exact(&oracle("noqlora/hf-bf16"), "noqlora/ref");
}

#[test]
fn hf_bf16_calm_model_matches_transformers() {
    check_exact(&oracle("bg03/hf-bf16"), "bg03/ref");
}

#[test]
fn official_fp8_layout_matches_its_dequantised_reference() {
    check_exact(&oracle("fp8/hf"), "fp8/ref");
}

#[test]
fn gguf_f32_matches_transformers() {
    let gz = oracle("qlora/f32.gguf.gz");
    let dir = std::env::temp_dir().join(format!("oracle-f32-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("qlora-f32.gguf");
    let mut dec = flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap());
    std::io::copy(&mut dec, &mut std::fs::File::create(&path).unwrap()).unwrap();
    check_exact(&path, "qlora/ref");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gguf_q8_0_at_least_as_close_as_llamacpp() {
    check_quantized("qlora", "q8_0", "deq-qlora-q8_0-kvf32", false);
    check_quantized("noqlora", "q8_0", "deq-noqlora-q8_0-kvf32", false);
}

#[test]
fn gguf_q4_k_m_at_least_as_close_as_llamacpp() {
    check_quantized("qlora", "q4_k_m", "deq-qlora-q4_k_m-kvf32", false);
}

#[test]
fn gguf_calm_model_greedy_at_least_as_long_as_llamacpp() {
    check_quantized("bg03", "q8_0", "deq-qlora-bg0.3-q8_0-kvf32", true);
    check_quantized("bg03", "q4_k_m", "deq-qlora-bg0.3-q4_k_m-kvf32", true);
}

/// A half-precision latent cache stays within what llama.cpp's f16 cache costs on the same
/// model (~1e-2) and keeps the greedy tokens; a bf16 cache (8 mantissa bits against f16's 11)
/// is compared teacher-forced, since one near-tie can change its free-running path.
#[test]
fn f16_and_bf16_cache_stay_close() {
    let r = Reference::load(&oracle("bg03/ref"));
    let run = run_model(
        &oracle("bg03/hf-bf16"),
        &r.prompt,
        r.gen.len(),
        None,
        CacheType::F16,
    );
    let d = diff(&run.logits, &r);
    eprintln!("bg03 cache f16: {d:?}");
    assert_eq!(run.gen, r.gen);
    assert!(d.max_abs < 1e-2, "f16 cache: max abs diff {}", d.max_abs);
    let run = run_model(
        &oracle("bg03/hf-bf16"),
        &r.prompt,
        r.gen.len(),
        Some(&r.gen),
        CacheType::BF16,
    );
    let d = diff(&run.logits, &r);
    eprintln!("bg03 cache bf16 (teacher-forced): {d:?}");
    assert!(d.max_abs < 3e-2, "bf16 cache: max abs diff {}", d.max_abs);
    assert!(
        d.argmax_agree >= 55,
        "bf16 cache: argmax agreement {}",
        d.argmax_agree
    );
}

/// Prefill of the whole sequence and token-by-token decoding give the same logits.
#[test]
fn prefill_equals_stepwise_decode() {
    use engine::model::weights::ExpertFilter;
    use engine::model::{Logits, ModelFile, Workspace};
    let r = Reference::load(&oracle("bg03/ref"));
    let mf = ModelFile::open(&oracle("bg03/hf-bf16")).unwrap();
    let model = mf.load_model().unwrap();
    let experts = mf.load_experts(&ExpertFilter::All).unwrap();
    let seq: Vec<u32> = r.prompt.iter().chain(&r.gen).copied().collect();
    let mut ws = Workspace::default();
    let mut c1 = model.new_cache(CacheType::F32, seq.len());
    let all = model
        .forward(&seq, &mut c1, &experts, &mut ws, Logits::All)
        .unwrap()
        .to_vec();
    let mut c2 = model.new_cache(CacheType::F32, seq.len());
    let v = model.cfg.vocab_size;
    let mut worst = 0f32;
    for (t, &tok) in seq.iter().enumerate() {
        let row = model
            .forward(&[tok], &mut c2, &experts, &mut ws, Logits::Last)
            .unwrap();
        for (a, b) in row.iter().zip(&all[t * v..(t + 1) * v]) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(worst < 1e-4, "prefill vs stepwise: {worst}");
}
