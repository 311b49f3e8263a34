//! The GPU thread: owns a [`GpuContext`] and runs jobs from a bounded queue, one at a time.
//!
//! A job is a closure over `&mut GpuContext` returning `Result<R, GpuError>`; its result comes
//! back through a [`JobHandle`] (wait for it, or poll it without blocking). The queue is a
//! `sync_channel` of fixed depth: [`GpuExecutor::submit`] blocks while it is full,
//! [`GpuExecutor::try_submit`] returns [`GpuError::QueueFull`] instead (for callers that must not
//! block, such as async tasks). A job that panics returns [`GpuError::JobPanicked`] and the thread
//! goes on. Dropping the executor closes the queue, lets queued jobs finish and joins the thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;

use super::{GpuContext, GpuError, GpuOptions};

type Job = Box<dyn FnOnce(&mut GpuContext) + Send>;

/// The thread that owns the GPU context.
pub struct GpuExecutor {
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    adapter: super::AdapterSummary,
}

/// The pending result of one job.
pub struct JobHandle<R> {
    rx: Receiver<Result<R, GpuError>>,
}

impl<R> JobHandle<R> {
    /// Blocks until the job has run.
    pub fn wait(self) -> Result<R, GpuError> {
        self.rx.recv().unwrap_or(Err(GpuError::ExecutorGone))
    }

    /// The result if the job has run, `None` if it has not yet (never blocks).
    pub fn try_get(&self) -> Option<Result<R, GpuError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(GpuError::ExecutorGone)),
        }
    }
}

impl GpuExecutor {
    /// Opens a context with `opts` on a new thread with a queue of `depth` jobs (at least 1).
    pub fn new(opts: GpuOptions, depth: usize) -> Result<Self, GpuError> {
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (tx, rx) = mpsc::sync_channel::<Job>(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("gpu".into())
            .spawn(move || {
                let mut ctx = match GpuContext::new(opts) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(c.adapter().clone()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(&mut ctx, rx);
            })
            .map_err(|e| GpuError::Device(format!("spawning the GPU thread: {e}")))?;
        let adapter = ready_rx.recv().unwrap_or(Err(GpuError::ExecutorGone));
        match adapter {
            Ok(adapter) => Ok(GpuExecutor {
                tx: Some(tx),
                thread: Some(thread),
                adapter,
            }),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// Moves an existing context onto a new thread with a queue of `depth` jobs.
    pub fn spawn(mut ctx: GpuContext, depth: usize) -> Result<Self, GpuError> {
        let (tx, rx) = mpsc::sync_channel::<Job>(depth.max(1));
        let adapter = ctx.adapter().clone();
        let thread = std::thread::Builder::new()
            .name("gpu".into())
            .spawn(move || run(&mut ctx, rx))
            .map_err(|e| GpuError::Device(format!("spawning the GPU thread: {e}")))?;
        Ok(GpuExecutor {
            tx: Some(tx),
            thread: Some(thread),
            adapter,
        })
    }

    /// The adapter the thread's context runs on.
    pub fn adapter(&self) -> &super::AdapterSummary {
        &self.adapter
    }

    fn wrap<R, F>(f: F) -> (Job, JobHandle<R>)
    where
        R: Send + 'static,
        F: FnOnce(&mut GpuContext) -> Result<R, GpuError> + Send + 'static,
    {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |ctx: &mut GpuContext| {
            let r = catch_unwind(AssertUnwindSafe(|| f(ctx))).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(GpuError::JobPanicked(msg))
            });
            let _ = rtx.send(r);
        });
        (job, JobHandle { rx: rrx })
    }

    /// Queues `f`, blocking while the queue is full.
    pub fn submit<R, F>(&self, f: F) -> Result<JobHandle<R>, GpuError>
    where
        R: Send + 'static,
        F: FnOnce(&mut GpuContext) -> Result<R, GpuError> + Send + 'static,
    {
        let (job, handle) = Self::wrap(f);
        let tx = self.tx.as_ref().ok_or(GpuError::ExecutorGone)?;
        tx.send(job).map_err(|_| GpuError::ExecutorGone)?;
        Ok(handle)
    }

    /// Queues `f` if there is room, else [`GpuError::QueueFull`]; never blocks.
    pub fn try_submit<R, F>(&self, f: F) -> Result<JobHandle<R>, GpuError>
    where
        R: Send + 'static,
        F: FnOnce(&mut GpuContext) -> Result<R, GpuError> + Send + 'static,
    {
        let (job, handle) = Self::wrap(f);
        let tx = self.tx.as_ref().ok_or(GpuError::ExecutorGone)?;
        match tx.try_send(job) {
            Ok(()) => Ok(handle),
            Err(TrySendError::Full(_)) => Err(GpuError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(GpuError::ExecutorGone),
        }
    }

    /// Queues `f` and waits for its result.
    pub fn run<R, F>(&self, f: F) -> Result<R, GpuError>
    where
        R: Send + 'static,
        F: FnOnce(&mut GpuContext) -> Result<R, GpuError> + Send + 'static,
    {
        self.submit(f)?.wait()
    }
}

fn run(ctx: &mut GpuContext, rx: Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        job(ctx);
    }
}

impl Drop for GpuExecutor {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
