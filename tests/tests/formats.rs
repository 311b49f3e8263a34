//! Model-file variants real users have, built from the shipped test model with the project's
//! GGUF writer: split files, the older GGUF generation (`attn_kv_b` instead of
//! `attn_k_b`/`attn_v_b`), files without the expert-group keys, and corrupt shapes.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use engine::gguf::{GgufFile, GgufWriter, MetaValue};
use engine::model::kv_cache::CacheType;
use engine::model::ModelFile;
use engine::quant::QuantType;
use engine::Bytes;

fn oracle(rel: &str) -> PathBuf {
    data_dir().join("oracle").join(rel)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("formats-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A writer holding every key and tensor of `src`, except what `keep` rejects.
fn copy_of(
    src: &GgufFile,
    keep_meta: impl Fn(&str) -> bool,
    keep_tensor: impl Fn(&str) -> bool,
) -> GgufWriter {
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        if keep_meta(k) && k != "general.alignment" {
            w.add_meta(k.clone(), v.clone()).unwrap();
        }
    }
    for t in src.tensor_infos() {
        if keep_tensor(&t.name) {
            w.add_tensor(t.name.clone(), t.ty, &t.shape, src.tensor_data(t).unwrap())
                .unwrap();
        }
    }
    w
}

fn logits_of(path: &Path, r: &Reference) -> Run {
    run_model(path, &r.prompt, r.gen.len(), None, CacheType::F32)
}

#[test]
fn split_model_opens_from_its_first_file_and_computes_the_same() {
    let src_path = oracle("qlora/q8_0.gguf");
    let src = GgufFile::open(&src_path).unwrap();
    let dir = tmp("split");
    let paths = copy_of(&src, |_| true, |_| true)
        .write_splits(&dir.join("tiny-q8_0"), 3)
        .unwrap();
    assert_eq!(paths.len(), 3);
    assert!(paths[0]
        .to_string_lossy()
        .ends_with("tiny-q8_0-00001-of-00003.gguf"));
    let r = Reference::load(&oracle("qlora/ref-q8_0"));
    let whole = logits_of(&src_path, &r);
    let split = logits_of(&paths[0], &r);
    assert_eq!(
        whole.logits, split.logits,
        "split and unsplit files give different logits"
    );
    // A missing split is a clear error naming it.
    std::fs::remove_file(&paths[2]).unwrap();
    let err = ModelFile::open(&paths[0])
        .err()
        .expect("missing split must fail")
        .to_string();
    assert!(err.contains("00003"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// The first DeepSeek GGUF generation stores `attn_kv_b` whole and has no `*_mla` keys; the
/// engine splits and transposes it at load time into the absorbed per-head matrices.
#[test]
fn legacy_kv_b_layout_matches_transformers() {
    let gz = oracle("qlora/f32.gguf.gz");
    let dir = tmp("legacy");
    let f32_path = dir.join("f32.gguf");
    let mut dec = flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap());
    std::io::copy(&mut dec, &mut std::fs::File::create(&f32_path).unwrap()).unwrap();
    let src = GgufFile::open(&f32_path).unwrap();
    let cfg = engine::config::ModelConfig::from_gguf(&src).unwrap();
    let (heads, nope, vh, lora) = (cfg.n_heads, cfg.qk_nope, cfg.v_head, cfg.kv_lora_rank);
    let mut w = copy_of(
        &src,
        |k| !k.ends_with("_mla"),
        |n| !n.contains("attn_k_b") && !n.contains("attn_v_b"),
    );
    w.add_meta(
        "deepseek2.attention.key_length",
        MetaValue::U32((nope + cfg.qk_rope) as u32),
    )
    .unwrap();
    w.add_meta(
        "deepseek2.attention.value_length",
        MetaValue::U32(vh as u32),
    )
    .unwrap();
    w.add_meta(
        "deepseek2.attention.head_count_kv",
        MetaValue::U32(heads as u32),
    )
    .unwrap();
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    for l in 0..cfg.n_layers {
        let kb = f32s(
            &src.tensor_data(
                src.tensor_info(&format!("blk.{l}.attn_k_b.weight"))
                    .unwrap(),
            )
            .unwrap(),
        );
        let vb = f32s(
            &src.tensor_data(
                src.tensor_info(&format!("blk.{l}.attn_v_b.weight"))
                    .unwrap(),
            )
            .unwrap(),
        );
        // kv_b rows of head h: nope rows of W_UK (= k_b[h] transposed), then v rows of W_UV.
        let mut kv = vec![0f32; heads * (nope + vh) * lora];
        for h in 0..heads {
            let base = h * (nope + vh);
            for n in 0..nope {
                for c in 0..lora {
                    kv[(base + n) * lora + c] = kb[h * lora * nope + c * nope + n];
                }
            }
            kv[(base + nope) * lora..(base + nope + vh) * lora]
                .copy_from_slice(&vb[h * vh * lora..(h + 1) * vh * lora]);
        }
        let bytes = Bytes::from_vec(bytemuck::cast_slice(&kv).to_vec());
        w.add_tensor(
            format!("blk.{l}.attn_kv_b.weight"),
            QuantType::F32,
            &[heads * (nope + vh), lora],
            bytes,
        )
        .unwrap();
    }
    let legacy = dir.join("legacy.gguf");
    w.write(&legacy).unwrap();
    let r = Reference::load(&oracle("qlora/ref"));
    let run = logits_of(&legacy, &r);
    let d = diff(&run.logits, &r);
    assert_eq!(run.gen, r.gen);
    assert!(d.max_abs <= 1e-3, "legacy layout: {d:?}");
    std::fs::remove_dir_all(dir).ok();
}

/// Without `expert_group_count` a model that is not DeepSeek-V3's 256 experts routes with plain
/// top-k (the files still load and run); with 256 experts it would use 8 groups keeping 4.
#[test]
fn missing_group_keys_fall_back_to_plain_top_k() {
    let src = GgufFile::open(&oracle("qlora/q8_0.gguf")).unwrap();
    let dir = tmp("groups");
    let p = dir.join("nogroups.gguf");
    copy_of(&src, |k| !k.contains("expert_group"), |_| true)
        .write(&p)
        .unwrap();
    let mf = ModelFile::open(&p).unwrap();
    assert_eq!((mf.config.n_group, mf.config.topk_group), (1, 1));
    let r = Reference::load(&oracle("qlora/ref-q8_0"));
    let run = logits_of(&p, &r);
    assert!(run.logits.iter().flatten().all(|v| v.is_finite()));
    std::fs::remove_dir_all(dir).ok();
}

/// A tensor whose shape disagrees with the configuration is refused by name.
#[test]
fn shape_mismatch_is_a_typed_error() {
    let src = GgufFile::open(&oracle("qlora/q8_0.gguf")).unwrap();
    let dir = tmp("shape");
    let p = dir.join("bad.gguf");
    let mut w = copy_of(&src, |_| true, |n| n != "blk.2.attn_kv_a_mqa.weight");
    let t = src.tensor_info("blk.2.attn_kv_a_mqa.weight").unwrap();
    let data = src.tensor_data(t).unwrap();
    // Drop the last row: 79 rows instead of 80.
    let row = data.len() / t.shape[0];
    w.add_tensor(
        t.name.clone(),
        t.ty,
        &[t.shape[0] - 1, t.shape[1]],
        data.slice(0..data.len() - row).unwrap(),
    )
    .unwrap();
    w.write(&p).unwrap();
    let err = ModelFile::open(&p)
        .unwrap()
        .load_model()
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("blk.2.attn_kv_a_mqa.weight") && err.contains("[79, 256]"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A vocabulary padded to the embedding's size marks the padding ids unused; they are the ids
/// generation bans, whatever the head says about them.
#[test]
fn padding_ids_are_reported_unused() {
    let dir = tmp("padding");
    let p = dir.join("padded.gguf");
    let mut spec = engine::synth::SynthSpec::tiny();
    spec.vocab_size = 1100;
    engine::synth::write_model(&p, &spec).unwrap();
    let mf = ModelFile::open(&p).unwrap();
    assert_eq!(mf.unused_token_ids(), (1024..1100).collect::<Vec<u32>>());
    // The shipped oracle file pads nothing.
    assert!(ModelFile::open(&oracle("qlora/q8_0.gguf"))
        .unwrap()
        .unused_token_ids()
        .is_empty());
    std::fs::remove_dir_all(dir).ok();
}

/// Where each routed expert's bytes are, for streaming: a GGUF expert is its slice of each of
/// the layer's three stacked tensors; an FP8 Hugging Face expert is its three tensors and their
/// block scales, wherever the index puts them (layer 2's experts span both shards here).
#[test]
fn expert_pieces_cover_stacked_slices_and_per_expert_fp8_tensors() {
    use engine::model::weights::ExpertPiece;
    let bytes = |f: &ModelFile, p: &ExpertPiece| {
        let t = f.source.tensor(&p.tensor).unwrap();
        t.data[p.range.start as usize..p.range.end as usize].to_vec()
    };

    let gguf = ModelFile::open(&oracle("bg03/q8_0.gguf")).unwrap();
    let pieces = gguf.expert_pieces().unwrap();
    assert_eq!(pieces.len(), 4 * 16 * 3);
    assert!(pieces.iter().all(|p| !p.scales && p.ty == QuantType::Q8_0));
    let experts = gguf
        .load_experts(&engine::model::weights::ExpertFilter::All)
        .unwrap();
    for p in &pieces {
        let mlp = experts.layers[p.layer].as_ref().unwrap().experts[p.expert]
            .as_ref()
            .unwrap();
        let m = mlp.matrix(p.matrix);
        assert_eq!(p.tensor, p.matrix.gguf_name(p.layer));
        assert_eq!(p.shape, [m.rows, m.cols]);
        assert_eq!(bytes(&gguf, p), &m.data[..]);
    }

    let hf = ModelFile::open(&oracle("fp8/hf")).unwrap();
    let pieces = hf.expert_pieces().unwrap();
    assert_eq!(pieces.len(), 4 * 16 * 6);
    let experts = hf
        .load_experts(&engine::model::weights::ExpertFilter::All)
        .unwrap();
    for p in &pieces {
        let mlp = experts.layers[p.layer].as_ref().unwrap().experts[p.expert]
            .as_ref()
            .unwrap();
        let m = mlp.matrix(p.matrix);
        let weight = p.matrix.hf_name(p.layer, p.expert);
        if p.scales {
            assert_eq!(p.tensor, format!("{}_scale_inv", weight));
            assert_eq!(p.ty, QuantType::F32);
            let grid: Vec<f32> = bytes(&hf, p)
                .chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(p.shape, [m.rows.div_ceil(128), m.cols.div_ceil(128)]);
            assert_eq!(&grid[..], &m.block_scales.as_ref().unwrap()[..]);
        } else {
            assert_eq!(p.tensor, weight);
            assert_eq!((p.ty, p.shape), (QuantType::F8E4M3, [m.rows, m.cols]));
            assert_eq!(bytes(&hf, p), &m.data[..]);
        }
    }
}
