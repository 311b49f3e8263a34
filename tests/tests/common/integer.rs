//! Tests shared by the integer activation modes (each runs in its own test binary: the mode
//! is a process-wide setting).

use engine::model::kv_cache::CacheType;
use engine::model::weights::ExpertFilter;
use engine::quant::QuantType;

use super::data_dir;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Batch invariance of the integer products (the mode set by the caller): activations are
/// quantised row by row and every token runs the same integer kernel, so a token's rows of a
/// product over 1 to 9 tokens, in any position, are bit for bit its own matvec. Every type of
/// `types` must take integer activations in the mode.
pub fn rows_are_batch_invariant(types: &[QuantType]) {
    use engine::tensor::{ActBuf, Matrix};
    let (rows, cols) = (40, 512);
    let xs: Vec<Vec<f32>> = (0..9)
        .map(|t| engine::bench::random_f32(cols, 70 + t))
        .collect();
    let mut act = ActBuf::default();
    for (i, &ty) in types.iter().enumerate() {
        let data = engine::bench::random_weights(ty, rows * cols, 60 + i as u64);
        let w = Matrix::new(ty, rows, cols, engine::Bytes::from_vec(data)).unwrap();
        assert_ne!(
            w.act_type(),
            QuantType::F32,
            "{ty}: the integer mode is in effect"
        );
        let want: Vec<Vec<u32>> = xs
            .iter()
            .map(|x| {
                let mut o = vec![f32::NAN; rows];
                w.matvec(x, &mut o, &mut act);
                bits(&o)
            })
            .collect();
        for n in 1..=xs.len() {
            for shift in 0..n {
                let order: Vec<usize> = (0..n).map(|i| (i + shift) % n).collect();
                let batch: Vec<f32> = order.iter().flat_map(|&k| xs[k].clone()).collect();
                let mut out = vec![f32::NAN; n * rows];
                w.matmul(&batch, n, &mut out, &mut act);
                for (p, &k) in order.iter().enumerate() {
                    let got = bits(&out[p * rows..(p + 1) * rows]);
                    assert_eq!(got, want[k], "{ty}: token {k} at {p} of {n}");
                }
            }
        }
    }
}

/// A model's sequences run batched give, bit for bit, the logits they give alone (in the mode
/// set by the caller, on the calm Q4_K_M file): three sequences with prompts of 5, 1 and 9
/// tokens (the last in two chunks), then decode tokens, in two orders.
pub fn batched_sequences_match_their_runs_alone() {
    use engine::model::{BatchSeq, Logits, ModelFile, Workspace};
    let mf = ModelFile::open(&data_dir().join("oracle/bg03/q4_k_m.gguf")).unwrap();
    let model = mf.load_model().unwrap();
    let experts = mf.load_experts(&ExpertFilter::All).unwrap();
    let v = model.cfg.vocab_size;
    let tok = |s: usize, k: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((s * 131 + k * 37 + i * 11 + 3) % v) as u32)
            .collect()
    };
    // Per step, the tokens of each sequence.
    let steps: Vec<[Vec<u32>; 3]> = (0..4)
        .map(|k| {
            let n = |prompt: usize, chunks: usize| {
                if k < chunks {
                    prompt.div_ceil(chunks)
                } else {
                    1
                }
            };
            [tok(0, k, n(5, 1)), tok(1, k, n(1, 1)), tok(2, k, n(9, 2))]
        })
        .collect();
    let mut ws = Workspace::default();
    let mut caches: Vec<_> = (0..3)
        .map(|_| model.new_cache(CacheType::F32, 32))
        .collect();
    let want: Vec<Vec<Vec<u32>>> = steps
        .iter()
        .map(|step| {
            step.iter()
                .zip(caches.iter_mut())
                .map(|(t, c)| {
                    bits(
                        model
                            .forward(t, c, &experts, &mut ws, Logits::Last)
                            .unwrap(),
                    )
                })
                .collect()
        })
        .collect();
    for order in [[0, 1, 2], [2, 0, 1]] {
        let mut caches: Vec<_> = (0..3)
            .map(|_| model.new_cache(CacheType::F32, 32))
            .collect();
        for (k, step) in steps.iter().enumerate() {
            let [c0, c1, c2] = &mut caches[..] else {
                unreachable!()
            };
            let mut by_seq = [Some(c0), Some(c1), Some(c2)];
            let mut seqs: Vec<BatchSeq> = order
                .iter()
                .map(|&s| BatchSeq {
                    tokens: &step[s],
                    cache: by_seq[s].take().unwrap(),
                })
                .collect();
            let logits = model.forward_batch(&mut seqs, &experts, &mut ws).unwrap();
            for (row, &s) in order.iter().enumerate() {
                assert!(
                    bits(&logits[row * v..(row + 1) * v]) == want[k][s],
                    "step {k}: sequence {s} at row {row} differs from its run alone"
                );
            }
        }
    }
}
