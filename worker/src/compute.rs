//! The worker's expert computation on a thread of its own, fed by a bounded queue: async code
//! hands a request over and awaits the answer; it never computes or blocks itself.

use std::collections::BTreeSet;
use std::sync::Arc;

use engine::gpu::GpuExperts;
use engine::model::moe::{ExpertError, LocalExperts, MoeScratch, Pair};
use proto::wire::{code, ErrorFrame, ExpertRequest, ExpertResult};
use tokio::sync::{mpsc, oneshot};

/// Requests waiting for the compute thread (beyond these, senders wait).
pub const QUEUE_DEPTH: usize = 32;

type Job = (
    ExpertRequest,
    oneshot::Sender<Result<ExpertResult, ErrorFrame>>,
);

/// Where the experts are computed.
pub enum Compute {
    /// The CPU backend, over host (memory-mapped) weights.
    Cpu(Arc<LocalExperts>),
    /// The wgpu backend: weights resident on the device. `held` lists what was uploaded.
    Gpu {
        experts: Arc<GpuExperts>,
        held: BTreeSet<(u32, u32)>,
        hidden: usize,
    },
}

impl Compute {
    fn hidden(&self) -> usize {
        match self {
            Compute::Cpu(e) => e.hidden,
            Compute::Gpu { hidden, .. } => *hidden,
        }
    }

    fn eval_pairs(
        &self,
        layer: usize,
        xs: &[f32],
        pairs: &[Pair],
        out: &mut [f32],
        scratch: &mut MoeScratch,
    ) -> Result<(), ExpertError> {
        match self {
            Compute::Cpu(e) => e.eval_pairs(layer, xs, pairs, out, scratch),
            Compute::Gpu { experts, .. } => experts.eval_pairs(layer, xs, pairs, out),
        }
    }
}

/// A handle to the compute thread. Cloning is cheap; the thread stops when every handle is
/// dropped.
#[derive(Clone)]
pub struct Executor {
    tx: mpsc::Sender<Job>,
    held: Arc<BTreeSet<(u32, u32)>>,
}

impl Executor {
    /// Starts the compute thread over `experts`.
    pub fn start(experts: Arc<LocalExperts>) -> Executor {
        Executor::start_with(Compute::Cpu(experts))
    }

    /// Starts the compute thread over `experts` on either backend.
    pub fn start_with(experts: Compute) -> Executor {
        let held = Arc::new(match &experts {
            Compute::Cpu(e) => e.held().map(|(l, e)| (l as u32, e as u32)).collect(),
            Compute::Gpu { held, .. } => held.clone(),
        });
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE_DEPTH);
        std::thread::Builder::new()
            .name("expert-compute".into())
            .spawn(move || {
                let mut scratch = MoeScratch::default();
                let mut pairs = Vec::new();
                loop {
                    let (req, reply) = match rx.try_recv() {
                        Ok(job) => job,
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                        Err(mpsc::error::TryRecvError::Empty) => {
                            // Nothing queued: the next request is a network round trip away,
                            // so the kernels' idle threads park instead of spinning on the
                            // cores the data plane needs meanwhile.
                            engine::cpu::pool::global().rest();
                            match rx.blocking_recv() {
                                Some(job) => job,
                                None => break,
                            }
                        }
                    };
                    let r = compute(&experts, &req, &mut pairs, &mut scratch);
                    let _ = reply.send(r);
                }
            })
            .expect("spawning the compute thread");
        Executor { tx, held }
    }

    /// The `(layer, expert)` pairs this executor computes.
    pub fn held(&self) -> &BTreeSet<(u32, u32)> {
        &self.held
    }

    /// Evaluates a request's experts for its tokens: one partial sum per token.
    pub async fn eval(&self, req: ExpertRequest) -> Result<ExpertResult, ErrorFrame> {
        let id = req.request_id;
        let (tx, rx) = oneshot::channel();
        let gone = || ErrorFrame {
            request_id: id,
            code: code::INTERNAL,
            message: "the compute thread has stopped".into(),
        };
        self.tx.send((req, tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

fn compute(
    experts: &Compute,
    req: &ExpertRequest,
    pairs: &mut Vec<Pair>,
    scratch: &mut MoeScratch,
) -> Result<ExpertResult, ErrorFrame> {
    let err = |code, message: String| ErrorFrame {
        request_id: req.request_id,
        code,
        message,
    };
    if req.hidden != experts.hidden() {
        return Err(err(
            code::BAD_REQUEST,
            format!(
                "hidden width {} but the model's is {}",
                req.hidden,
                experts.hidden()
            ),
        ));
    }
    pairs.clear();
    for (t, es, ws) in req.pairs() {
        for (&e, &w) in es.iter().zip(ws) {
            pairs.push(Pair {
                token: t as u32,
                expert: e as u32,
                weight: w,
            });
        }
    }
    let t0 = std::time::Instant::now();
    // The answer's buffer leaves with the frame: one allocation, no copy.
    let mut out = vec![0f32; req.xs.len()];
    experts
        .eval_pairs(req.layer as usize, &req.xs, pairs, &mut out, scratch)
        .map_err(|e| {
            let c = match e {
                engine::model::moe::ExpertError::NotHeld { .. } => code::NOT_HELD,
                _ => code::BAD_REQUEST,
            };
            err(c, e.to_string())
        })?;
    Ok(ExpertResult {
        request_id: req.request_id,
        layer: req.layer,
        hidden: req.hidden,
        dtype: req.dtype,
        compute_us: t0.elapsed().as_micros().min(u32::MAX as u128) as u32,
        ys: out,
    })
}
