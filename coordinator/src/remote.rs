//! The coordinator's side of the data plane: [`RemoteExperts`] implements the engine's
//! `RoutedExperts` by sending each MoE layer's work to the workers that hold the chosen experts
//! over their QUIC connections, and adding up the partial sums they return.
//!
//! The forward pass runs on a plain thread (never on the async runtime); `begin` spawns one
//! task per worker batch on the data plane's runtime and returns at once, so the shared expert is computed
//! while the workers compute; `eval` waits for the answers with a deadline. A worker that is
//! missing, closes its stream, answers with an error or misses the deadline has its work sent
//! once more, to other live workers that hold the same experts (spare copies); where an
//! expert has no other holder, the layer fails with an error that names the worker and the
//! experts it was asked for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use engine::model::moe::{ExpertError, LocalExperts, MoeScratch, Pair, RoutedExperts, Routing};
use proto::runtime::DataPlaneRuntime;
use proto::stream::{read_only_frame, write_bytes, StreamError};
use proto::wire::{Dtype, ExpertResult, Frame};

use crate::dispatch::{self, Batch};
use crate::membership::WorkerId;
use crate::metrics::Histogram;

/// Round-trip samples kept per worker for percentiles.
const RTT_SAMPLES: usize = 1024;

/// Per-worker data-plane counters.
#[derive(Debug)]
pub struct WorkerStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Recent round trips in microseconds (ring buffer).
    rtt: Mutex<(Vec<u32>, usize)>,
    /// The worker's own compute time of the same requests (microseconds).
    compute: Mutex<(Vec<u32>, usize)>,
    /// Every round trip since the start, for `/metrics`.
    pub rtt_histogram: Histogram,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            rtt: Mutex::default(),
            compute: Mutex::default(),
            rtt_histogram: Histogram::new(crate::metrics::RTT_BOUNDS),
        }
    }
}

fn push_sample(ring: &Mutex<(Vec<u32>, usize)>, us: u32) {
    let mut g = ring.lock().expect("sample lock");
    let (v, at) = &mut *g;
    if v.len() < RTT_SAMPLES {
        v.push(us);
    } else {
        v[*at] = us;
    }
    *at = (*at + 1) % RTT_SAMPLES;
}

fn percentiles(ring: &Mutex<(Vec<u32>, usize)>) -> Option<(u32, u32)> {
    let mut v = ring.lock().expect("sample lock").0.clone();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((p(0.5), p(0.99)))
}

impl WorkerStats {
    fn record(&self, rtt: Duration, compute_us: u32) {
        push_sample(&self.rtt, rtt.as_micros().min(u32::MAX as u128) as u32);
        self.rtt_histogram.observe(rtt);
        push_sample(&self.compute, compute_us);
    }

    /// `(p50, p99)` of recent round trips in microseconds.
    pub fn rtt_percentiles(&self) -> Option<(u32, u32)> {
        percentiles(&self.rtt)
    }

    /// `(p50, p99)` of the workers' compute time of the same requests, microseconds.
    pub fn compute_percentiles(&self) -> Option<(u32, u32)> {
        percentiles(&self.compute)
    }

    /// Forgets the samples (benchmarks measure from a clean slate).
    pub fn clear_samples(&self) {
        *self.rtt.lock().expect("sample lock") = (Vec::new(), 0);
        *self.compute.lock().expect("sample lock") = (Vec::new(), 0);
    }
}

/// Who holds what, and how to reach them: shared by the control plane (which updates it) and
/// [`RemoteExperts`] (which reads it on every layer).
#[derive(Default)]
pub struct Routes {
    /// Per model layer: the holder of each expert (as the index `dispatch::split` takes).
    owners: RwLock<HashMap<u32, Arc<Vec<usize>>>>,
    /// Per model layer: every live holder of each expert, the route first (the fallbacks
    /// when a worker fails).
    holders: RwLock<HashMap<u32, Arc<Vec<Vec<WorkerId>>>>>,
    /// Live data-plane connections of ready workers.
    conns: RwLock<HashMap<WorkerId, (String, quinn::Connection)>>,
    stats: RwLock<HashMap<WorkerId, Arc<WorkerStats>>>,
    /// Names of the workers ever connected (kept after a disconnect, for error messages).
    names: RwLock<HashMap<WorkerId, String>>,
}

impl Routes {
    pub fn set_owners(&self, layer: u32, owners: Vec<WorkerId>) {
        self.owners.write().expect("routes lock").insert(
            layer,
            Arc::new(owners.into_iter().map(|o| o as usize).collect()),
        );
    }

    pub fn set_holders(&self, layer: u32, holders: Vec<Vec<WorkerId>>) {
        self.holders
            .write()
            .expect("routes lock")
            .insert(layer, Arc::new(holders));
    }

    pub fn connect(&self, id: WorkerId, name: String, conn: quinn::Connection) {
        self.names
            .write()
            .expect("routes lock")
            .insert(id, name.clone());
        self.conns
            .write()
            .expect("routes lock")
            .insert(id, (name, conn));
        self.stats
            .write()
            .expect("routes lock")
            .entry(id)
            .or_default();
    }

    /// Forgets `id`'s connection (only if it is still `conn`, when given); whether it did.
    pub fn disconnect(&self, id: WorkerId, conn: Option<&quinn::Connection>) -> bool {
        let mut g = self.conns.write().expect("routes lock");
        if let Some((_, c)) = g.get(&id) {
            if conn.is_none_or(|x| x.stable_id() == c.stable_id()) {
                g.remove(&id);
                return true;
            }
        }
        false
    }

    /// Forgets `id`'s connection and closes it: requests on their way fail at once (and go to
    /// spare copies) instead of waiting for their deadline. For a worker declared lost.
    pub fn close(&self, id: WorkerId, why: &str) {
        let conn = self.conns.write().expect("routes lock").remove(&id);
        if let Some((_, c)) = conn {
            c.close(3u32.into(), why.as_bytes());
        }
    }

    pub fn is_connected(&self, id: WorkerId) -> bool {
        self.conns.read().expect("routes lock").contains_key(&id)
    }

    pub fn stats(&self, id: WorkerId) -> Option<Arc<WorkerStats>> {
        self.stats.read().expect("routes lock").get(&id).cloned()
    }

    fn holders(&self, layer: u32) -> Option<Arc<Vec<Vec<WorkerId>>>> {
        self.holders
            .read()
            .expect("routes lock")
            .get(&layer)
            .cloned()
    }

    fn owners(&self, layer: u32) -> Option<Arc<Vec<usize>>> {
        self.owners
            .read()
            .expect("routes lock")
            .get(&layer)
            .cloned()
    }

    /// `worker <id> ("<name>")`, or without the name if it never connected.
    fn describe(&self, id: WorkerId) -> String {
        match self.names.read().expect("routes lock").get(&id) {
            Some(n) => format!("worker {id} ({n:?})"),
            None => format!("worker {id}"),
        }
    }

    fn conn(&self, id: WorkerId) -> Option<(String, quinn::Connection)> {
        self.conns.read().expect("routes lock").get(&id).cloned()
    }
}

/// Settings of the data plane.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    pub hidden: usize,
    pub dtype: Dtype,
    /// Longest wait for one layer's answers.
    pub timeout: Duration,
}

/// Routed experts held by workers (and optionally by this process).
pub struct RemoteExperts {
    /// Where the round trips run: the runtime the QUIC endpoint was made in.
    dp: Arc<DataPlaneRuntime>,
    routes: Arc<Routes>,
    cfg: RemoteConfig,
    /// Experts this process holds itself, under its own worker id (no network hop).
    local: RwLock<Option<(WorkerId, Arc<LocalExperts>)>>,
    next_id: AtomicU64,
    pending: Mutex<Option<Pending>>,
    /// The slowest worker's own compute time in the last layer that succeeded (microseconds).
    last_compute_us: std::sync::atomic::AtomicU32,
}

type Answer = (usize, Result<ExpertResult, String>);

/// A layer's answers as they arrive. The waiting thread is woken once, by the last answer (or
/// by its deadline), not once per worker: each wake-up of the forward thread costs a context
/// switch on a machine that is busy receiving the other answers.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    all_in: Condvar,
}

#[derive(Default)]
struct InboxState {
    answers: Vec<Answer>,
    /// How many batches went out (`None` while they are still being sent).
    expected: Option<usize>,
}

impl Inbox {
    fn put(&self, a: Answer) {
        let mut g = self.state.lock().expect("inbox lock");
        g.answers.push(a);
        if g.expected == Some(g.answers.len()) {
            self.all_in.notify_one();
        }
    }

    /// Every answer that arrived before `deadline` (all of them, unless it passed). For the
    /// first `spin` of the wait the thread polls, yielding its core between looks, before it
    /// sleeps.
    fn wait(&self, deadline: Instant, spin: Duration) -> Vec<Answer> {
        let poll_until = Instant::now() + spin;
        let mut g = self.state.lock().expect("inbox lock");
        while g.expected.is_some_and(|n| g.answers.len() < n) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if now < poll_until {
                drop(g);
                std::thread::yield_now();
                g = self.state.lock().expect("inbox lock");
            } else {
                g = self
                    .all_in
                    .wait_timeout(g, deadline - now)
                    .expect("inbox lock")
                    .0;
            }
        }
        std::mem::take(&mut g.answers)
    }
}

struct Pending {
    layer: usize,
    batches: Vec<Batch>,
    /// Batches that went out, by index into `batches`.
    sent: usize,
    inbox: Arc<Inbox>,
    /// Batches that could not be sent (worker not connected): index and reason.
    unsent: Vec<(usize, String)>,
    started: Instant,
}

impl RemoteExperts {
    pub fn new(
        dp: Arc<DataPlaneRuntime>,
        routes: Arc<Routes>,
        cfg: RemoteConfig,
        local: Option<(WorkerId, Arc<LocalExperts>)>,
    ) -> Self {
        RemoteExperts {
            dp,
            routes,
            cfg,
            local: RwLock::new(local),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(None),
            last_compute_us: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// The slowest worker's own compute time in the last layer that succeeded, in
    /// microseconds: what a round trip spent computing rather than moving data.
    pub fn last_compute_us(&self) -> u32 {
        self.last_compute_us.load(Ordering::Relaxed)
    }

    /// Sets (or clears) the experts this process holds itself.
    pub fn set_local(&self, local: Option<(WorkerId, Arc<LocalExperts>)>) {
        *self.local.write().expect("local lock") = local;
    }

    fn local(&self) -> Option<(WorkerId, Arc<LocalExperts>)> {
        self.local.read().expect("local lock").clone()
    }

    fn send(&self, layer: usize, xs: &[f32], routing: &Routing) -> Result<Pending, ExpertError> {
        let l = layer as u32;
        let owners = self.routes.owners(l).ok_or(ExpertError::Unavailable {
            layer,
            detail: "no placement for this layer".into(),
        })?;
        let batches = dispatch::split(l, xs, self.cfg.hidden, routing, &owners, self.cfg.dtype)
            .map_err(|e| ExpertError::Unavailable {
                layer,
                detail: e.to_string(),
            })?;
        Ok(self.send_batches(layer, batches))
    }

    /// Sends every batch not for this process's own experts; what cannot be sent is noted.
    fn send_batches(&self, layer: usize, mut batches: Vec<Batch>) -> Pending {
        let inbox = Arc::new(Inbox::default());
        let mut sent = 0;
        let mut unsent = Vec::new();
        let local = self.local().map(|(id, _)| id);
        for (i, b) in batches.iter_mut().enumerate() {
            let wid = b.worker as WorkerId;
            if local == Some(wid) {
                continue;
            }
            let Some((name, conn)) = self.routes.conn(wid) else {
                unsent.push((i, format!("{} is not connected", self.routes.describe(wid))));
                continue;
            };
            b.request.request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut bytes = Vec::new();
            if let Err(e) = b.request.encode(&mut bytes) {
                unsent.push((i, e.to_string()));
                continue;
            }
            let stats = self.routes.stats(wid).unwrap_or_default();
            stats
                .bytes_out
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let inbox = inbox.clone();
            let id = b.request.request_id;
            let t0 = Instant::now();
            self.dp.handle().spawn(async move {
                let r = round_trip(&conn, &bytes, id).await;
                let r = r.map_err(|e| format!("worker {wid} ({name:?}): {e}"));
                let dt = t0.elapsed();
                match &r {
                    Ok(res) => {
                        stats.requests.fetch_add(1, Ordering::Relaxed);
                        stats
                            .bytes_in
                            .fetch_add((res.ys.len() * res.dtype.size()) as u64, Ordering::Relaxed);
                        stats.record(dt, res.compute_us);
                    }
                    Err(_) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                inbox.put((i, r));
            });
            sent += 1;
        }
        inbox.state.lock().expect("inbox lock").expected = Some(sent);
        if sent > 0 {
            // The answers are a round trip away: the data plane's thread polls for them.
            self.dp.touch();
        }
        Pending {
            layer,
            batches,
            sent,
            inbox,
            unsent,
            started: Instant::now(),
        }
    }

    fn missing(&self, layer: usize, p: &Pending, failed: &[(usize, String)]) -> ExpertError {
        let mut parts = Vec::new();
        for (i, why) in failed {
            let b = &p.batches[*i];
            let mut es: Vec<u16> = b.request.experts.clone();
            es.sort_unstable();
            es.dedup();
            parts.push(format!("{why} (experts {es:?})"));
        }
        ExpertError::Unavailable {
            layer,
            detail: parts.join("; "),
        }
    }
}

async fn round_trip(
    conn: &quinn::Connection,
    bytes: &[u8],
    id: u64,
) -> Result<ExpertResult, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_bytes(&mut send, bytes)
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    match read_only_frame(&mut recv).await {
        Ok(Frame::Result(r)) if r.request_id == id => Ok(r),
        Ok(Frame::Error(e)) => Err(format!("refused (code {}): {}", e.code, e.message)),
        Ok(f) => Err(format!(
            "unexpected answer (request {} for {id})",
            f.request_id()
        )),
        Err(StreamError::Closed) => Err("closed the stream".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl RoutedExperts for RemoteExperts {
    fn begin(&self, layer: usize, xs: &[f32], routing: &Routing) -> Result<(), ExpertError> {
        let p = self.send(layer, xs, routing)?;
        *self.pending.lock().expect("pending lock") = Some(p);
        Ok(())
    }

    fn eval(
        &self,
        layer: usize,
        xs: &[f32],
        routing: &Routing,
        out: &mut [f32],
        scratch: &mut MoeScratch,
    ) -> Result<(), ExpertError> {
        let p = match self.pending.lock().expect("pending lock").take() {
            Some(p) if p.layer == layer => p,
            _ => self.send(layer, xs, routing)?,
        };
        let xs = &xs[..routing.n_tokens() * self.cfg.hidden];
        let (answers, failed) = self.settle(&p, xs, out, scratch)?;
        if failed.is_empty() {
            let slowest = self.combine(&p, &answers, out)?;
            self.last_compute_us.store(slowest, Ordering::Relaxed);
            return Ok(());
        }
        // Some workers failed: their work once more, to other workers holding the same
        // experts. `out` holds this process's own share already; the others' answers are kept
        // and added with the retry's.
        let retry = self.failover(&p, &failed)?;
        let (more, failed_again) = self.settle(&retry, xs, out, scratch)?;
        if !failed_again.is_empty() {
            return Err(self.missing(layer, &retry, &failed_again));
        }
        let slowest = self
            .combine(&p, &answers, out)?
            .max(self.combine(&retry, &more, out)?);
        self.last_compute_us.store(slowest, Ordering::Relaxed);
        tracing::warn!(
            "layer {layer}: {}; answered by spare copies",
            failed
                .iter()
                .map(|(_, why)| why.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
        Ok(())
    }
}

impl RemoteExperts {
    /// Evaluates `p`'s batches for this process's own experts into `out`, then waits for the
    /// others' answers: the answers by batch, and the batches that failed (with why).
    #[allow(clippy::type_complexity)]
    fn settle(
        &self,
        p: &Pending,
        xs: &[f32],
        out: &mut [f32],
        scratch: &mut MoeScratch,
    ) -> Result<(Vec<Option<ExpertResult>>, Vec<(usize, String)>), ExpertError> {
        let layer = p.layer;
        // Our own experts first, while the workers compute theirs.
        let local = self.local();
        if let Some((wid, local)) = &local {
            for b in p.batches.iter().filter(|b| b.worker as WorkerId == *wid) {
                let mut pairs = Vec::with_capacity(b.request.experts.len());
                for (t, es, ws) in b.request.pairs() {
                    for (&e, &w) in es.iter().zip(ws) {
                        pairs.push(Pair {
                            token: b.tokens[t],
                            expert: e as u32,
                            weight: w,
                        });
                    }
                }
                local.eval_pairs(layer, xs, &pairs, out, scratch)?;
            }
        }
        let deadline = p.started + self.cfg.timeout;
        let mut failed = p.unsent.clone();
        let mut answers: Vec<Option<ExpertResult>> = p.batches.iter().map(|_| None).collect();
        let mut answered = vec![false; p.batches.len()];
        for (i, _) in &p.unsent {
            answered[*i] = true;
        }
        if p.sent > 0 {
            // The answers are a network round trip away: the kernels' idle threads park rather
            // than spin on the cores the runtime needs to receive them.
            engine::cpu::pool::global().rest();
            // With busy polling on, this thread polls for the answers too (yielding its core
            // to any thread with work): the data plane's thread then hands them over without
            // a wake-up.
            for (i, r) in p.inbox.wait(deadline, self.dp.busy_poll_window()) {
                answered[i] = true;
                match r {
                    Ok(res) => answers[i] = Some(res),
                    Err(e) => failed.push((i, e)),
                }
            }
        }
        // Past the deadline: every remote batch without an answer has failed.
        for (i, b) in p.batches.iter().enumerate() {
            let wid = b.worker as WorkerId;
            let here = local.as_ref().is_some_and(|(id, _)| *id == wid);
            if !here && !answered[i] {
                failed.push((
                    i,
                    format!(
                        "{} did not answer within {:?}",
                        self.routes.describe(wid),
                        self.cfg.timeout
                    ),
                ));
            }
        }
        Ok((answers, failed))
    }

    /// Adds the answers into `out` in batch order (by worker), not in arrival order: a token's
    /// sum is then the same on every run and in every batch. Returns the slowest worker's own
    /// compute time among them (microseconds).
    fn combine(
        &self,
        p: &Pending,
        answers: &[Option<ExpertResult>],
        out: &mut [f32],
    ) -> Result<u32, ExpertError> {
        let slowest = answers.iter().flatten().map(|r| r.compute_us).max();
        let mut failed = Vec::new();
        for (i, res) in answers.iter().enumerate() {
            if let Some(res) = res {
                if let Err(e) = p.batches[i].combine(res, out) {
                    failed.push((i, e.to_string()));
                }
            }
        }
        if failed.is_empty() {
            Ok(slowest.unwrap_or(0))
        } else {
            Err(self.missing(p.layer, p, &failed))
        }
    }

    /// The `failed` batches of `p` sent again, each expert to a live holder other than the
    /// workers that failed; the layer's error (naming them) when an expert has no other.
    fn failover(&self, p: &Pending, failed: &[(usize, String)]) -> Result<Pending, ExpertError> {
        let layer = p.layer;
        let dead: Vec<WorkerId> = failed
            .iter()
            .map(|(i, _)| p.batches[*i].worker as WorkerId)
            .collect();
        let local = self.local().map(|(id, _)| id);
        let holders = self.routes.holders(layer as u32).unwrap_or_default();
        let target = |e: u16| {
            holders.get(e as usize).and_then(|hs| {
                hs.iter()
                    .copied()
                    .find(|h| {
                        !dead.contains(h) && (local == Some(*h) || self.routes.is_connected(*h))
                    })
                    .map(|h| h as usize)
            })
        };
        let batches: Vec<&Batch> = failed.iter().map(|(i, _)| &p.batches[*i]).collect();
        match dispatch::reroute(&batches, target) {
            Ok(moved) => Ok(self.send_batches(layer, moved)),
            Err(_) => Err(self.missing(layer, p, failed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(i: usize) -> Answer {
        (i, Err(format!("answer {i}")))
    }

    #[test]
    fn the_inbox_returns_when_the_last_answer_is_in_or_at_its_deadline() {
        // Sleeping at once, polling for part of the wait, and polling past the last answer.
        for spin in [0, 30, 5_000].map(Duration::from_millis) {
            // All in: the wait ends with the last answer, long before the deadline.
            let inbox = Arc::new(Inbox::default());
            inbox.put(answer(0));
            inbox.state.lock().unwrap().expected = Some(3);
            let late = {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    for i in 1..3 {
                        std::thread::sleep(Duration::from_millis(20));
                        inbox.put(answer(i));
                    }
                })
            };
            let t0 = Instant::now();
            let mut got: Vec<usize> = inbox
                .wait(t0 + Duration::from_secs(30), spin)
                .into_iter()
                .map(|a| a.0)
                .collect();
            got.sort_unstable();
            assert_eq!(got, [0, 1, 2], "spin {spin:?}");
            assert!(t0.elapsed() < Duration::from_secs(4), "spin {spin:?}");
            late.join().unwrap();

            // One missing: what arrived, once the deadline has passed (also when the deadline
            // comes before the end of the polling).
            let inbox = Inbox::default();
            inbox.state.lock().unwrap().expected = Some(2);
            inbox.put(answer(1));
            let t0 = Instant::now();
            let got = inbox.wait(t0 + Duration::from_millis(50), spin);
            assert_eq!(got.len(), 1, "spin {spin:?}");
            assert!(t0.elapsed() >= Duration::from_millis(50), "spin {spin:?}");
            assert!(t0.elapsed() < Duration::from_secs(4), "spin {spin:?}");
        }
    }
}
