//! `Model::forward_batch`: batch invariance and refusals.

use std::path::Path;

use crate::model::kv_cache::{CacheType, ContextFull, KvCache};
use crate::model::moe::LocalExperts;
use crate::model::weights::ExpertFilter;
use crate::model::{BatchSeq, ForwardError, Logits, Model, ModelFile, Workspace};
use crate::synth::{self, SynthSpec};

fn load(path: &Path) -> (Model, LocalExperts) {
    let mf = ModelFile::open(path).unwrap();
    (
        mf.load_model().unwrap(),
        mf.load_experts(&ExpertFilter::All).unwrap(),
    )
}

/// The synthetic tiny model (BF16 weights).
fn tiny() -> (Model, LocalExperts) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synth::write_model(&path, &SynthSpec::tiny()).unwrap();
    load(&path)
}

/// The oracle's Q4_K_M file (Q4_K, Q5_0, Q6_K and Q8_0 matrices: the quantized kernels).
fn q4_k_m() -> (Model, LocalExperts) {
    load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/oracle/qlora/q4_k_m.gguf"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// SplitMix64 step, for reproducible token ids and orders.
fn mix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Per step, the `(sequence, tokens)` that run in it: 5 sequences whose prompts (1 to 13
/// tokens) arrive at different steps, some in two prefill chunks, then single decode tokens,
/// so prefill chunks and decode tokens share steps. Sequence 0 runs alone in the first step.
fn schedule(vocab: usize) -> Vec<Vec<(usize, Vec<u32>)>> {
    let mut rng = 7u64;
    let mut tok = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (mix(&mut rng) % vocab as u64) as u32)
            .collect()
    };
    // (sequence, first step, prompt chunks)
    let plan: [(usize, usize, &[usize]); 5] = [
        (0, 0, &[6, 3]),
        (1, 1, &[1]),
        (2, 1, &[13]),
        (3, 2, &[4, 4]),
        (4, 3, &[2]),
    ];
    let steps = 7;
    let mut out: Vec<Vec<(usize, Vec<u32>)>> = vec![Vec::new(); steps];
    for (seq, first, chunks) in plan {
        for (k, step) in out.iter_mut().enumerate().skip(first) {
            let n = chunks.get(k - first).copied().unwrap_or(1);
            // Sequence 3 pauses one step after its prompt.
            if seq == 3 && k == first + 2 {
                continue;
            }
            step.push((seq, tok(n)));
        }
    }
    out
}

/// Runs the schedule one sequence at a time with `forward` and returns, per step, the logits
/// of each sequence that ran in it.
fn alone(
    model: &Model,
    experts: &LocalExperts,
    ty: CacheType,
    sched: &[Vec<(usize, Vec<u32>)>],
) -> Vec<Vec<Vec<u32>>> {
    let mut ws = Workspace::default();
    let mut caches: Vec<KvCache> = (0..5).map(|_| model.new_cache(ty, 64)).collect();
    sched
        .iter()
        .map(|step| {
            step.iter()
                .map(|(s, toks)| {
                    bits(
                        model
                            .forward(toks, &mut caches[*s], experts, &mut ws, Logits::Last)
                            .unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Runs the schedule batched, each step's sequences in a shuffled order, and checks every
/// row against the sequence run alone.
fn check_invariance(model: &Model, experts: &LocalExperts, ty: CacheType) {
    let v = model.cfg.vocab_size;
    let sched = schedule(v);
    let want = alone(model, experts, ty, &sched);
    // `Logits::All`'s last row and a batch of one are the same computation.
    {
        let mut ws = Workspace::default();
        let mut cache = model.new_cache(ty, 64);
        let (s, toks) = &sched[0][0];
        assert_eq!(*s, 0);
        let all = model
            .forward(toks, &mut cache, experts, &mut ws, Logits::All)
            .unwrap();
        assert_eq!(bits(&all[(toks.len() - 1) * v..]), want[0][0]);
    }
    let mut rng = 99u64;
    for round in 0..3 {
        let mut ws = Workspace::default();
        let mut caches: Vec<KvCache> = (0..5).map(|_| model.new_cache(ty, 64)).collect();
        for (k, step) in sched.iter().enumerate() {
            let mut order: Vec<usize> = (0..step.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (mix(&mut rng) % (i as u64 + 1)) as usize);
            }
            // Each cache borrowed mutably once, in the step's order.
            let mut slots: Vec<Option<&mut KvCache>> = caches.iter_mut().map(Some).collect();
            let mut seqs: Vec<BatchSeq> = order
                .iter()
                .map(|&j| {
                    let (s, toks) = &step[j];
                    BatchSeq {
                        tokens: toks,
                        cache: slots[*s].take().unwrap(),
                    }
                })
                .collect();
            let lens: Vec<usize> = seqs.iter().map(|q| q.cache.len()).collect();
            let logits = model.forward_batch(&mut seqs, experts, &mut ws).unwrap();
            assert_eq!(logits.len(), order.len() * v);
            for (row, &j) in order.iter().enumerate() {
                let (s, toks) = &step[j];
                assert!(
                    bits(&logits[row * v..(row + 1) * v]) == want[k][j],
                    "{ty:?} round {round} step {k}: sequence {s} ({} tokens) at row {row} of \
                     {} differs from its run alone",
                    toks.len(),
                    order.len()
                );
                assert_eq!(seqs[row].cache.len(), lens[row] + toks.len());
            }
        }
    }
}

#[test]
fn batched_sequences_match_their_runs_alone_bit_for_bit() {
    let (model, experts) = tiny();
    check_invariance(&model, &experts, CacheType::F32);
}

#[test]
fn batch_invariance_holds_for_quantized_weights_and_an_f16_cache() {
    let (model, experts) = q4_k_m();
    check_invariance(&model, &experts, CacheType::F16);
}

#[test]
fn bad_batches_are_refused_before_any_cache_changes() {
    let (model, experts) = tiny();
    let mut ws = Workspace::default();
    let mut a = model.new_cache(CacheType::F32, 16);
    let mut b = model.new_cache(CacheType::F32, 16);
    let mut full = model.new_cache(CacheType::F32, 4);
    let one_seq = |toks: &[u32], cache: &mut KvCache, ws: &mut Workspace| {
        let mut s = [BatchSeq {
            tokens: toks,
            cache,
        }];
        model
            .forward_batch(&mut s, &experts, ws)
            .map(|l| l.to_vec())
    };
    one_seq(&[5, 6, 7], &mut a, &mut ws).unwrap();
    one_seq(&[8], &mut b, &mut ws).unwrap();
    one_seq(&[9, 10, 11], &mut full, &mut ws).unwrap();
    let lens = |a: &KvCache, b: &KvCache, f: &KvCache| [a.len(), b.len(), f.len()];
    assert_eq!(lens(&a, &b, &full), [3, 1, 3]);

    assert!(matches!(
        model.forward_batch(&mut [], &experts, &mut ws),
        Err(ForwardError::Empty)
    ));
    let vocab = model.cfg.vocab_size;
    let cases: [(&[u32], &[u32], &[u32]); 3] = [
        (&[1], &[], &[2]),
        (&[1, 2], &[3], &[vocab as u32 + 7]),
        (&[1], &[2, 3], &[4, 5]),
    ];
    for (ta, tb, tf) in cases {
        let mut seqs = [
            BatchSeq {
                tokens: ta,
                cache: &mut a,
            },
            BatchSeq {
                tokens: tb,
                cache: &mut b,
            },
            BatchSeq {
                tokens: tf,
                cache: &mut full,
            },
        ];
        let e = model
            .forward_batch(&mut seqs, &experts, &mut ws)
            .unwrap_err();
        match (tb.is_empty(), tf.len()) {
            (true, _) => assert!(matches!(e, ForwardError::Empty), "{e}"),
            (false, 1) => assert!(
                matches!(e, ForwardError::UnknownToken { id, vocab: v } if id == vocab as u32 + 7 && v == vocab),
                "{e}"
            ),
            _ => assert!(
                matches!(
                    e,
                    ForwardError::ContextFull(ContextFull {
                        needed: 5,
                        capacity: 4
                    })
                ),
                "{e}"
            ),
        }
        assert_eq!(lens(&a, &b, &full), [3, 1, 3], "after {e}");
    }

    // An expert failure in the middle of the pass, after every cache got rows written: no
    // length changes either, and the next pass sees nothing of the failed one.
    let none = LocalExperts {
        hidden: experts.hidden,
        layers: Vec::new(),
    };
    let next = |a: &mut KvCache, b: &mut KvCache, toks: [u32; 3], x: &LocalExperts| {
        let mut seqs = [
            BatchSeq {
                tokens: &toks[..2],
                cache: a,
            },
            BatchSeq {
                tokens: &toks[2..],
                cache: b,
            },
        ];
        model
            .forward_batch(&mut seqs, x, &mut Workspace::default())
            .map(bits)
    };
    let (mut a2, mut b2) = (
        model.new_cache(CacheType::F32, 16),
        model.new_cache(CacheType::F32, 16),
    );
    one_seq(&[5, 6, 7], &mut a2, &mut ws).unwrap();
    one_seq(&[8], &mut b2, &mut ws).unwrap();
    let e = next(&mut a, &mut b, [20, 21, 22], &none).unwrap_err();
    assert!(matches!(e, ForwardError::Experts(_)), "{e}");
    assert_eq!(lens(&a, &b, &full), [3, 1, 3]);
    let after_failure = next(&mut a, &mut b, [12, 13, 14], &experts).unwrap();
    assert_eq!(
        after_failure,
        next(&mut a2, &mut b2, [12, 13, 14], &experts).unwrap()
    );
    assert_eq!((a.len(), b.len()), (5, 2));
}
