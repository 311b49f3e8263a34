//! One MoE layer's routed work, cut into one request per worker and put back together: the
//! sans-I/O half of the data plane (no sockets, no clock).
//!
//! [`split`] takes the batch's hidden vectors, its routing and the layer's owners, and builds
//! for every worker that holds any chosen expert one [`ExpertRequest`] with just the tokens
//! that need it and just the (expert, weight) pairs it must evaluate, so a worker never
//! evaluates an expert that another worker also answers for. [`Batch::combine`] adds a
//! worker's partial sums back into the tokens' rows.

use engine::model::moe::Routing;
use proto::wire::{Dtype, ExpertRequest, ExpertResult, MAX_TOKENS};

use crate::placement::WorkerIdx;

/// Why a layer's work cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    #[error("layer {layer}: expert {expert} has no holder")]
    Unplaced { layer: u32, expert: u32 },
    #[error("layer {layer}: expert id {expert} does not fit the wire format")]
    ExpertId { layer: u32, expert: u32 },
    #[error("worker {worker} answered {got} tokens of width {hidden} for a request of {want}")]
    ResultShape {
        worker: WorkerIdx,
        got: usize,
        want: usize,
        hidden: usize,
    },
}

/// One worker's share of a layer, and where its answers go.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub worker: WorkerIdx,
    /// For each token of `request`, its index in the layer's batch.
    pub tokens: Vec<u32>,
    pub request: ExpertRequest,
}

impl Batch {
    /// Adds the worker's partial sums to `out` (`n_tokens x hidden` of the whole batch).
    pub fn combine(&self, res: &ExpertResult, out: &mut [f32]) -> Result<(), DispatchError> {
        let h = self.request.hidden;
        if res.hidden != h || res.ys.len() != self.tokens.len() * h {
            return Err(DispatchError::ResultShape {
                worker: self.worker,
                got: res.n_tokens(),
                want: self.tokens.len(),
                hidden: res.hidden,
            });
        }
        for (&t, y) in self.tokens.iter().zip(res.ys.chunks_exact(h)) {
            let row = &mut out[t as usize * h..(t as usize + 1) * h];
            for (o, v) in row.iter_mut().zip(y) {
                *o += v;
            }
        }
        Ok(())
    }
}

/// Splits a layer's work (`xs`: `n x hidden`, `routing` for the same `n` tokens) by the owners
/// of the layer's experts. Batches come out ordered by worker, then by token range; a worker
/// with more than [`MAX_TOKENS`] tokens gets several batches. `request_id`s are left 0 for the
/// sender to fill in.
pub fn split(
    layer: u32,
    xs: &[f32],
    hidden: usize,
    routing: &Routing,
    owner: &[WorkerIdx],
    dtype: Dtype,
) -> Result<Vec<Batch>, DispatchError> {
    let n = routing.n_tokens();
    debug_assert_eq!(xs.len(), n * hidden);
    let n_workers = owner.iter().copied().max().map_or(0, |m| m + 1);
    let mut batches: Vec<Vec<Batch>> = vec![Vec::new(); n_workers];
    for t in 0..n {
        let (es, ws) = routing.token(t);
        for (&e, &w) in es.iter().zip(ws) {
            let &o = owner
                .get(e as usize)
                .ok_or(DispatchError::Unplaced { layer, expert: e })?;
            let expert =
                u16::try_from(e).map_err(|_| DispatchError::ExpertId { layer, expert: e })?;
            let list = &mut batches[o];
            let need_new = match list.last() {
                None => true,
                Some(b) => b.tokens.last() != Some(&(t as u32)) && b.tokens.len() == MAX_TOKENS,
            };
            if need_new {
                list.push(Batch {
                    worker: o,
                    tokens: Vec::new(),
                    request: ExpertRequest {
                        request_id: 0,
                        layer,
                        hidden,
                        dtype,
                        ..Default::default()
                    },
                });
            }
            let b = list.last_mut().expect("pushed above");
            if b.tokens.last() != Some(&(t as u32)) {
                b.tokens.push(t as u32);
                b.request.counts.push(0);
                b.request
                    .xs
                    .extend_from_slice(&xs[t * hidden..(t + 1) * hidden]);
            }
            *b.request.counts.last_mut().expect("pushed above") += 1;
            b.request.experts.push(expert);
            b.request.weights.push(w);
        }
    }
    Ok(batches.into_iter().flatten().collect())
}

/// The work of `failed` batches cut anew for other workers: each (token, expert, weight) goes
/// to `target(expert)`, with the token's hidden vector taken from its failed batch. Batches
/// come out ordered by worker; `request_id`s are left 0. `Err(expert)`: an expert `target`
/// has no worker for, and nothing is sent.
pub fn reroute(
    failed: &[&Batch],
    mut target: impl FnMut(u16) -> Option<WorkerIdx>,
) -> Result<Vec<Batch>, u16> {
    // Per new worker: its batches, and the (failed batch, token) its last entry came from.
    let mut out: std::collections::BTreeMap<WorkerIdx, (Vec<Batch>, (usize, usize))> =
        Default::default();
    for (bi, b) in failed.iter().enumerate() {
        let r = &b.request;
        let h = r.hidden;
        for (t, es, ws) in r.pairs() {
            for (&e, &w) in es.iter().zip(ws) {
                let o = target(e).ok_or(e)?;
                let (list, last) = out.entry(o).or_insert((Vec::new(), (usize::MAX, 0)));
                // A token of two failed batches gets two entries, which the worker and
                // `combine` both simply add up.
                let same = *last == (bi, t) && !list.is_empty();
                if !same && list.last().is_none_or(|nb| nb.tokens.len() == MAX_TOKENS) {
                    list.push(Batch {
                        worker: o,
                        tokens: Vec::new(),
                        request: ExpertRequest {
                            request_id: 0,
                            layer: r.layer,
                            hidden: h,
                            dtype: r.dtype,
                            ..Default::default()
                        },
                    });
                }
                *last = (bi, t);
                let nb = list.last_mut().expect("pushed above");
                if !same {
                    nb.tokens.push(b.tokens[t]);
                    nb.request.counts.push(0);
                    nb.request.xs.extend_from_slice(&r.xs[t * h..(t + 1) * h]);
                }
                *nb.request.counts.last_mut().expect("pushed above") += 1;
                nb.request.experts.push(e);
                nb.request.weights.push(w);
            }
        }
    }
    Ok(out.into_values().flat_map(|(list, _)| list).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::Frame;

    fn routing(top_k: usize, experts: Vec<u32>, weights: Vec<f32>) -> Routing {
        Routing {
            top_k,
            experts,
            weights,
        }
    }

    #[test]
    fn each_worker_gets_only_its_tokens_and_pairs() {
        // 3 tokens, top-2, 4 experts: 0,1 on worker 0; 2 on worker 1; 3 on worker 2.
        let owner = [0, 0, 1, 2];
        let r = routing(
            2,
            vec![0, 1, 1, 2, 0, 3],
            vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        );
        let xs: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let b = split(5, &xs, 2, &r, &owner, Dtype::F32).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].worker, b[0].tokens.clone()), (0, vec![0, 1, 2]));
        assert_eq!(b[0].request.counts, vec![2, 1, 1]);
        assert_eq!(b[0].request.experts, vec![0, 1, 1, 0]);
        assert_eq!(b[0].request.weights, vec![0.1, 0.2, 0.3, 0.5]);
        assert_eq!(b[0].request.xs, xs);
        assert_eq!((b[1].worker, b[1].tokens.clone()), (1, vec![1]));
        assert_eq!(b[1].request.xs, vec![2.0, 3.0]);
        assert_eq!(b[1].request.weights, vec![0.4]);
        assert_eq!((b[2].worker, b[2].tokens.clone()), (2, vec![2]));
        assert_eq!(b[2].request.experts, vec![3]);
        // Every batch is a valid frame.
        for x in &b {
            let mut bytes = Vec::new();
            x.request.encode(&mut bytes).unwrap();
            assert_eq!(
                Frame::decode_all(&bytes).unwrap(),
                Frame::Request(x.request.clone())
            );
        }
    }

    #[test]
    fn combine_adds_partial_sums_into_the_right_rows() {
        let owner = [0, 1];
        let r = routing(1, vec![1, 0, 1], vec![1.0; 3]);
        let xs = vec![0.0; 6];
        let b = split(0, &xs, 2, &r, &owner, Dtype::F32).unwrap();
        let mut out = vec![1.0; 6];
        let res = |b: &Batch, v: f32| ExpertResult {
            request_id: 0,
            layer: 0,
            hidden: 2,
            dtype: Dtype::F32,
            compute_us: 0,
            ys: vec![v; b.tokens.len() * 2],
        };
        b[0].combine(&res(&b[0], 10.0), &mut out).unwrap();
        b[1].combine(&res(&b[1], 100.0), &mut out).unwrap();
        assert_eq!(out, vec![101.0, 101.0, 11.0, 11.0, 101.0, 101.0]);
        let short = ExpertResult {
            ys: vec![0.0; 2],
            ..res(&b[1], 0.0)
        };
        assert!(matches!(
            b[1].combine(&short, &mut out),
            Err(DispatchError::ResultShape { .. })
        ));
    }

    #[test]
    fn large_batches_are_cut_at_the_frame_limit() {
        let n = MAX_TOKENS * 2 + 3;
        let r = routing(2, (0..n).flat_map(|_| [0, 1]).collect(), vec![0.5; 2 * n]);
        let xs = vec![0.0; n];
        let b = split(0, &xs, 1, &r, &[0, 0], Dtype::Bf16).unwrap();
        assert_eq!(
            b.iter().map(|b| b.tokens.len()).collect::<Vec<_>>(),
            [MAX_TOKENS, MAX_TOKENS, 3]
        );
        assert!(b.iter().all(|b| b.request.counts.iter().all(|&c| c == 2)));
        assert_eq!(
            b[2].tokens,
            [
                2 * MAX_TOKENS as u32,
                2 * MAX_TOKENS as u32 + 1,
                2 * MAX_TOKENS as u32 + 2
            ]
        );
    }

    #[test]
    fn failed_batches_are_rerouted_to_other_holders_with_the_same_sum() {
        // 4 tokens, top-2, 4 experts on 2 workers; worker 1 fails and its experts (2, 3) go
        // to workers 0 and 2. The new batches must add up to what worker 1's would have.
        let owner = [0, 0, 1, 1];
        let r = routing(
            2,
            vec![0, 2, 3, 1, 2, 3, 0, 1],
            vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        );
        let xs: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let b = split(7, &xs, 2, &r, &owner, Dtype::Bf16).unwrap();
        let failed = [&b[1]];
        let moved = reroute(&failed, |e| Some([9, 9, 0, 2][e as usize])).unwrap();
        assert_eq!(
            moved.iter().map(|m| m.worker).collect::<Vec<_>>(),
            [0, 2],
            "ordered by worker"
        );
        // Worker 0 gets expert 2 (tokens 0 and 2), worker 2 expert 3 (tokens 1 and 2).
        assert_eq!(moved[0].tokens, [0, 2]);
        assert_eq!(moved[0].request.experts, [2, 2]);
        assert_eq!(moved[0].request.weights, [0.2, 0.5]);
        assert_eq!(moved[0].request.xs, [0.0, 1.0, 4.0, 5.0]);
        assert_eq!(moved[1].tokens, [1, 2]);
        assert_eq!(moved[1].request.counts, [1, 1]);
        assert_eq!(moved[1].request.experts, [3, 3]);
        assert_eq!(moved[1].request.xs, [2.0, 3.0, 4.0, 5.0]);
        assert!(moved
            .iter()
            .all(|m| m.request.layer == 7 && m.request.dtype == Dtype::Bf16));
        // The same pairs as the failed batch, with the same weights.
        let mut pairs: Vec<(u32, u16, u32)> = moved
            .iter()
            .flat_map(|m| {
                m.request.pairs().flat_map(move |(t, es, ws)| {
                    es.iter()
                        .zip(ws)
                        .map(move |(&e, &w)| (m.tokens[t], e, w.to_bits()))
                })
            })
            .collect();
        pairs.sort_unstable();
        let b1 = &b[1];
        let mut want: Vec<(u32, u16, u32)> = b1
            .request
            .pairs()
            .flat_map(|(t, es, ws)| {
                es.iter()
                    .zip(ws)
                    .map(move |(&e, &w)| (b1.tokens[t], e, w.to_bits()))
            })
            .collect();
        want.sort_unstable();
        assert_eq!(pairs, want);
        // Two failed batches that share a token: both entries reach the new worker.
        let both = reroute(&[&b[0], &b[1]], |_| Some(5)).unwrap();
        assert_eq!(both.len(), 1);
        assert_eq!(both[0].request.experts.len(), 8);
        assert_eq!(both[0].tokens, [0, 1, 3, 0, 1, 2]);
        // An expert nobody else holds: nothing is sent.
        assert_eq!(reroute(&failed, |e| (e == 2).then_some(0)), Err(3));
    }

    #[test]
    fn an_expert_without_holder_is_an_error() {
        let r = routing(1, vec![7], vec![1.0]);
        assert_eq!(
            split(3, &[0.0], 1, &r, &[0, 0], Dtype::F32),
            Err(DispatchError::Unplaced {
                layer: 3,
                expert: 7
            })
        );
    }
}
