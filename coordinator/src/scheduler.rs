//! Continuous batching: one thread owns the model's forward passes; every active request's
//! sequence takes part in each step (its next prompt chunk, or its last sampled token), so all
//! of them share each pass over the dense weights and each MoE round trip to the workers.
//!
//! Requests wait in a bounded queue ([`Scheduler::submit`] refuses past it) and join the batch
//! between steps, up to `max_batch` sequences. A request whose event receiver is dropped (the
//! client went away, or a stop string ended it) leaves the batch before the next step, and its
//! cache is freed at once.
//!
//! A sequence's token schedule does not depend on the other sequences: its prompt is always cut
//! into chunks at the same multiples of `prefill_chunk`, and the step budget only decides
//! *when* the next chunk runs. With the engine's batch-invariant forward pass, a greedy request
//! gives the same tokens whether it runs alone or among others.
//!
//! The passes run on a [`BatchModel`]: the CPU [`Model`] ([`CpuBatch`], every sequence with a
//! cache of its own, batched together) or a GPU's [`GpuModel`] ([`GpuBatch`], every sequence
//! with a slot of the device cache, batched together; `max_batch` is capped by the slots).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::generate::GenerateError;
use engine::gpu::GpuModel;
use engine::model::kv_cache::{CacheType, KvCache};
use engine::model::moe::RoutedExperts;
use engine::model::{BatchSeq, Model, Workspace};
use engine::sampling::{Sampler, SamplingParams};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Limits of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests waiting for a slot; past it, [`Scheduler::submit`] refuses.
    pub max_queue: usize,
    /// Positions per sequence (prompt and generated tokens together).
    pub max_context: usize,
    /// Prompt tokens per chunk of a prefill; also the prompt tokens one step takes in all (at
    /// least one chunk).
    pub prefill_chunk: usize,
    pub cache: CacheType,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch: 16,
            max_queue: 64,
            max_context: 4096,
            prefill_chunk: 256,
            cache: CacheType::F16,
        }
    }
}

/// What the scheduler runs its forward passes on.
pub trait BatchModel: Send + 'static {
    /// A sequence's own state (its cache, or where it is).
    type Seq: Send;
    fn vocab_size(&self) -> usize;
    /// Positions a sequence can hold.
    fn max_positions(&self) -> usize;
    /// Sequences that can take part in one pass (`max_batch` is capped by it).
    fn max_sequences(&self) -> usize;
    /// A new, empty sequence of at most `capacity` positions.
    fn new_seq(&mut self, cache: CacheType, capacity: usize) -> Self::Seq;
    /// One pass: each sequence's `tokens` at its next positions. Returns one row of logits per
    /// sequence, after its last token, in order.
    fn forward(
        &mut self,
        seqs: &mut [(&[u32], &mut Self::Seq)],
        experts: &dyn RoutedExperts,
    ) -> Result<&[f32], GenerateError>;
}

/// The CPU backend: every sequence has its own latent cache, and a pass runs them together.
pub struct CpuBatch {
    model: Arc<Model>,
    ws: Workspace,
}

impl CpuBatch {
    pub fn new(model: Arc<Model>) -> Self {
        CpuBatch {
            model,
            ws: Workspace::default(),
        }
    }
}

impl BatchModel for CpuBatch {
    type Seq = KvCache;

    fn vocab_size(&self) -> usize {
        self.model.cfg.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.model.cfg.max_positions
    }

    fn max_sequences(&self) -> usize {
        usize::MAX
    }

    fn new_seq(&mut self, cache: CacheType, capacity: usize) -> KvCache {
        self.model.new_cache(cache, capacity)
    }

    fn forward(
        &mut self,
        seqs: &mut [(&[u32], &mut KvCache)],
        experts: &dyn RoutedExperts,
    ) -> Result<&[f32], GenerateError> {
        let mut batch: Vec<BatchSeq<'_>> = seqs
            .iter_mut()
            .map(|(tokens, cache)| BatchSeq { tokens, cache })
            .collect();
        Ok(self
            .model
            .forward_batch(&mut batch, experts, &mut self.ws)?)
    }
}

/// The GPU backend: a [`GpuModel`] with a cache slot per sequence; a pass runs every
/// sequence that takes part together. A sequence gives its slot back when it is dropped.
pub struct GpuBatch {
    model: GpuModel,
    free: Arc<std::sync::Mutex<Vec<usize>>>,
}

/// A sequence of a [`GpuBatch`]: its cache slot (`None` when every slot was taken, which the
/// scheduler's `max_batch` prevents).
pub struct GpuSeq {
    slot: Option<usize>,
    free: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl Drop for GpuSeq {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            self.free.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        }
    }
}

impl GpuBatch {
    pub fn new(model: GpuModel) -> Self {
        // Popped from the end: slot 0 first.
        let free = (0..model.sequences()).rev().collect();
        GpuBatch {
            model,
            free: Arc::new(std::sync::Mutex::new(free)),
        }
    }
}

impl BatchModel for GpuBatch {
    type Seq = GpuSeq;

    fn vocab_size(&self) -> usize {
        self.model.cfg.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.model.capacity()
    }

    fn max_sequences(&self) -> usize {
        self.model.sequences()
    }

    fn new_seq(&mut self, _cache: CacheType, _capacity: usize) -> GpuSeq {
        let slot = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(s) = slot {
            self.model.truncate_seq(s, 0);
        }
        GpuSeq {
            slot,
            free: self.free.clone(),
        }
    }

    fn forward(
        &mut self,
        seqs: &mut [(&[u32], &mut GpuSeq)],
        experts: &dyn RoutedExperts,
    ) -> Result<&[f32], GenerateError> {
        let mut batch = Vec::with_capacity(seqs.len());
        for (tokens, seq) in seqs.iter() {
            let Some(slot) = seq.slot else {
                return Err(GenerateError::Gpu(engine::gpu::GpuError::BadArgument(
                    format!(
                        "every one of the GPU's {} sequence slots is taken",
                        self.model.sequences()
                    ),
                )));
            };
            batch.push((slot, *tokens));
        }
        Ok(self.model.forward_batch(&batch, experts)?)
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token.
    Stop,
    /// The token limit or the end of the context.
    Length,
}

/// What a request hears back, in order: tokens, then exactly one `Done` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token(u32),
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The forward pass failed (a worker lost, ...): the request ends here.
    Failed(String),
}

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    /// At most this many new tokens (also capped by the context).
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Only the length ends the answer, not the stop ids.
    pub ignore_eos: bool,
    pub events: mpsc::UnboundedSender<Event>,
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the prompt has {prompt} tokens; the context holds {context}")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt holds token id {id}, outside the vocabulary of {vocab}")]
    UnknownToken { id: u32, vocab: usize },
    #[error("the scheduler has stopped")]
    Stopped,
}

/// Ids that end a sequence and ids never sampled.
#[derive(Clone, Debug, Default)]
pub struct TokenRules {
    pub stop_ids: Vec<u32>,
    /// Rows from this id on are padding (past the tokenizer's vocabulary).
    pub banned_from: u32,
    pub banned_ids: Vec<u32>,
}

struct Queued {
    job: Job,
    at: Instant,
}

/// The handle requests are submitted through; the thread stops when it is dropped.
pub struct Scheduler {
    tx: std_mpsc::Sender<Queued>,
    cfg: SchedulerConfig,
    vocab: usize,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    /// Starts the batching thread on `model` ([`CpuBatch`] or [`GpuBatch`]). `on_tokens` hears
    /// how many tokens each step generated.
    pub fn start<M: BatchModel>(
        model: M,
        experts: Arc<dyn RoutedExperts>,
        cfg: SchedulerConfig,
        rules: TokenRules,
        metrics: Arc<Metrics>,
        on_tokens: Box<dyn Fn(u64) + Send>,
    ) -> std::io::Result<Scheduler> {
        let cfg = SchedulerConfig {
            max_batch: cfg.max_batch.clamp(1, model.max_sequences().max(1)),
            max_context: cfg.max_context.min(model.max_positions()).max(2),
            prefill_chunk: cfg.prefill_chunk.max(1),
            ..cfg
        };
        // Unbounded channel: `submit` bounds the queue with the depth counter.
        let (tx, rx) = std_mpsc::channel();
        let vocab = model.vocab_size();
        let looped = Loop {
            model,
            experts,
            cfg: cfg.clone(),
            rules,
            metrics: metrics.clone(),
            on_tokens,
            active: Vec::new(),
        };
        std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || looped.run(rx))?;
        Ok(Scheduler {
            tx,
            cfg,
            vocab,
            metrics,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request; its events arrive on `job.events`.
    pub fn submit(&self, mut job: Job) -> Result<(), SubmitError> {
        let (n, ctx) = (job.prompt.len(), self.cfg.max_context);
        if n == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        if n >= ctx {
            return Err(SubmitError::PromptTooLong {
                prompt: n,
                context: ctx,
            });
        }
        if let Some(&id) = job.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(SubmitError::UnknownToken {
                id,
                vocab: self.vocab,
            });
        }
        job.max_new_tokens = job.max_new_tokens.min(ctx - n);
        // The depth counts requests in the channel and in the thread's waiting list; the
        // thread decrements it when a request leaves the queue.
        let depth = &self.metrics.queue_depth;
        if depth.fetch_add(1, Ordering::Relaxed) >= self.cfg.max_queue {
            depth.fetch_sub(1, Ordering::Relaxed);
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull(self.cfg.max_queue));
        }
        let q = Queued {
            job,
            at: Instant::now(),
        };
        if self.tx.send(q).is_err() {
            depth.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Stopped);
        }
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// One sequence in the batch.
struct Active<S> {
    job: Job,
    seq: S,
    sampler: Sampler,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The token the next decode step feeds.
    next: [u32; 1],
    generated: usize,
    queued_at: Instant,
    /// Tokens this step feeds (a prompt chunk or `next`); 0 when it sits this step out.
    step_tokens: usize,
    /// Sampled a token this step (sent once the step's counters are updated).
    sampled: bool,
    ended: bool,
}

impl<S> Active<S> {
    fn in_prefill(&self) -> bool {
        self.fed < self.job.prompt.len()
    }

    fn finish(&mut self, finish: Finish) {
        self.ended = true;
        let _ = self.job.events.send(Event::Done {
            finish,
            prompt_tokens: self.job.prompt.len(),
            completion_tokens: self.generated,
        });
    }
}

struct Loop<M: BatchModel> {
    model: M,
    experts: Arc<dyn RoutedExperts>,
    cfg: SchedulerConfig,
    rules: TokenRules,
    metrics: Arc<Metrics>,
    on_tokens: Box<dyn Fn(u64) + Send>,
    active: Vec<Active<M::Seq>>,
}

impl<M: BatchModel> Loop<M> {
    fn run(mut self, rx: std_mpsc::Receiver<Queued>) {
        let mut waiting: VecDeque<Queued> = VecDeque::new();
        loop {
            // Take what arrived; block only when there is nothing to do.
            loop {
                let next = if self.active.is_empty() && waiting.is_empty() {
                    match rx.recv_timeout(Duration::from_secs(1)) {
                        Ok(q) => Some(q),
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                } else {
                    rx.try_recv().ok()
                };
                match next {
                    Some(q) => waiting.push_back(q),
                    None => break,
                }
            }
            let before = waiting.len();
            waiting.retain(|q| !q.job.events.is_closed());
            self.active.retain(|s| !s.job.events.is_closed());
            let mut left = before - waiting.len();
            while self.active.len() < self.cfg.max_batch {
                let Some(q) = waiting.pop_front() else { break };
                self.admit(q);
                left += 1;
            }
            self.metrics.queue_depth.fetch_sub(left, Ordering::Relaxed);
            self.metrics
                .active
                .store(self.active.len(), Ordering::Relaxed);
            if !self.active.is_empty() {
                self.step();
                self.metrics
                    .active
                    .store(self.active.len(), Ordering::Relaxed);
            }
        }
    }

    fn admit(&mut self, q: Queued) {
        // Prompt and answer fit the context (`submit` capped the answer).
        let capacity = q.job.prompt.len() + q.job.max_new_tokens;
        let sampler = Sampler::new(q.job.sampling)
            .with_banned_from(self.rules.banned_from)
            .with_banned_ids(self.rules.banned_ids.iter().copied());
        self.active.push(Active {
            seq: self.model.new_seq(self.cfg.cache, capacity),
            sampler,
            fed: 0,
            next: [0],
            generated: 0,
            queued_at: q.at,
            step_tokens: 0,
            sampled: false,
            ended: false,
            job: q.job,
        });
    }

    /// One forward pass over every sequence that takes part, then sampling.
    fn step(&mut self) {
        let chunk = self.cfg.prefill_chunk;
        let mut budget = chunk;
        let mut first_chunk = true;
        for s in &mut self.active {
            s.step_tokens = if s.in_prefill() {
                let take = chunk.min(s.job.prompt.len() - s.fed);
                if first_chunk || take <= budget {
                    first_chunk = false;
                    budget = budget.saturating_sub(take);
                    take
                } else {
                    0
                }
            } else {
                1
            };
        }
        let mut seqs: Vec<(&[u32], &mut M::Seq)> = self
            .active
            .iter_mut()
            .filter(|s| s.step_tokens > 0)
            .map(|s| {
                let tokens: &[u32] = if s.in_prefill() {
                    &s.job.prompt[s.fed..s.fed + s.step_tokens]
                } else {
                    &s.next
                };
                (tokens, &mut s.seq)
            })
            .collect();
        let vocab = self.model.vocab_size();
        let result = self.model.forward(&mut seqs, self.experts.as_ref());
        drop(seqs);
        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Everything in this step fails; sequences that sat it out go on.
                let msg = e.to_string();
                tracing::warn!("forward step failed: {msg}");
                let before = self.active.len();
                self.active.retain(|s| {
                    if s.step_tokens == 0 {
                        return true;
                    }
                    let _ = s.job.events.send(Event::Failed(msg.clone()));
                    false
                });
                let failed = (before - self.active.len()) as u64;
                self.metrics.failed.fetch_add(failed, Ordering::Relaxed);
                return;
            }
        };
        let mut row = 0;
        let mut generated = 0u64;
        let mut prompt = 0u64;
        for s in self.active.iter_mut() {
            if s.step_tokens == 0 {
                continue;
            }
            let logits = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            if s.in_prefill() {
                s.fed += s.step_tokens;
                prompt += s.step_tokens as u64;
                if s.in_prefill() {
                    continue;
                }
            }
            let tok = s.sampler.sample(logits);
            if s.generated == 0 {
                self.metrics.ttft.observe(s.queued_at.elapsed());
            }
            s.generated += 1;
            s.next = [tok];
            s.sampled = true;
            generated += 1;
        }
        // Counted before anyone hears of the tokens, so the metrics never lag the answers.
        self.metrics
            .generated_tokens
            .fetch_add(generated, Ordering::Relaxed);
        self.metrics
            .prompt_tokens
            .fetch_add(prompt, Ordering::Relaxed);
        for s in self.active.iter_mut().filter(|s| s.sampled) {
            s.sampled = false;
            let tok = s.next[0];
            if s.job.events.send(Event::Token(tok)).is_err() {
                s.ended = true;
            } else if !s.job.ignore_eos && self.rules.stop_ids.contains(&tok) {
                s.finish(Finish::Stop);
            } else if s.generated >= s.job.max_new_tokens {
                // `submit` capped the answer to the context, so the cache never runs out.
                s.finish(Finish::Length);
            }
        }
        // In admission order still: earlier requests keep their prefill priority.
        self.active.retain(|s| !s.ended);
        if generated > 0 {
            (self.on_tokens)(generated);
        }
    }
}
