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
