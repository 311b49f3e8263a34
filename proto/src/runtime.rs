//! The data plane's own async runtime: one thread that runs the QUIC endpoint, its connections
//! and the request tasks, apart from the control plane and the HTTP API.
//!
//! A layer's round trip is a chain of wake-ups: a datagram in, the connection's task, the
//! stream's task, a hand-off to the compute thread (or the forward thread) and back. On a
//! runtime of several threads each hand-off may also wake an idle sibling to look for work,
//! and tasks hop between threads; on one thread of its own every step after the first wake-up
//! runs on a warm thread, and nothing else (gRPC, HTTP clients) queues in front of it.
//!
//! A QUIC endpoint runs on the runtime it was created in (its driver tasks are spawned there),
//! so create endpoints and dial connections in a task spawned on [`DataPlaneRuntime::handle`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

/// A one-thread runtime for the data plane. Dropping it stops its tasks without waiting for
/// them (also from inside another runtime, where a plain `Runtime` may not be dropped).
pub struct DataPlaneRuntime {
    rt: Option<Runtime>,
    poll: BusyPoll,
}

impl DataPlaneRuntime {
    /// Starts the runtime's thread.
    pub fn new() -> std::io::Result<Self> {
        let rt = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("data-plane")
            .enable_all()
            .build()?;
        let poll = BusyPoll {
            state: Arc::new(PollState {
                window_ns: AtomicU64::new(0),
                until_ns: AtomicU64::new(0),
                spinning: AtomicBool::new(false),
                epoch: Instant::now(),
            }),
            handle: rt.handle().clone(),
        };
        Ok(DataPlaneRuntime { rt: Some(rt), poll })
    }

    pub fn handle(&self) -> &Handle {
        self.rt.as_ref().expect("running until dropped").handle()
    }

    /// Sets the busy-poll window (zero, the default, turns it off): see [`BusyPoll`].
    pub fn set_busy_poll(&self, window: Duration) {
        self.poll.state.window_ns.store(
            window.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// The busy-poll window (zero when off).
    pub fn busy_poll_window(&self) -> Duration {
        Duration::from_nanos(self.poll.state.window_ns.load(Ordering::Relaxed))
    }

    /// The handle that keeps this runtime's thread polling.
    pub fn busy_poll(&self) -> BusyPoll {
        self.poll.clone()
    }

    /// Polls for the busy-poll window from now ([`BusyPoll::touch`]).
    pub fn touch(&self) {
        self.poll.touch()
    }

    /// Runs `f` on the data plane's thread; the returned guard aborts it when dropped.
    pub fn spawn<F>(&self, f: F) -> AbortOnDrop<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        AbortOnDrop(self.handle().spawn(f))
    }
}

impl Drop for DataPlaneRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The busy-poll window of the daemons' data planes unless told otherwise (`--busy-poll-us`),
/// microseconds: longer than the gap between a token's MoE layers on a CPU coordinator, so
/// during a generation the data plane's threads never sleep, and short enough that an idle
/// cluster stops polling at once. On a 2-core VM (coordinator and three workers on the same
/// two cores) it took the loopback round trip less compute from a median of 180 us to 117 us
/// (from 98 to 42 us with one worker), and decode from 0.72 to 0.82 of one process.
pub const DEFAULT_BUSY_POLL_US: u64 = 1000;

/// Keeps the data plane's thread polling its sockets for a while instead of sleeping.
///
/// A round trip wakes sleeping threads at each end, and on some machines (virtual ones, or
/// cores in deep idle states) waking a thread on an idle core costs more than the rest of the
/// exchange: on a 2-core VM a UDP ping-pong between processes took 51 us across cores and 9
/// us on one. [`BusyPoll::touch`] (called when an answer or the next request is expected
/// soon) keeps the thread running for the window: a task that yields in a loop, so the runtime
/// polls its sockets without blocking between yields and picks up the next datagram without
/// being woken.
///
/// Each turn of the loop also yields the core to the OS (`sched_yield`), so a poller never
/// holds a core that another thread has work for: without it, three workers and a coordinator
/// polling on two cores took each other's time slices and the loopback round trip grew from
/// 138-188 us to 580 us; with it, it fell to 83-145 us. On an idle core the poller keeps
/// running and costs that core's power for the window.
#[derive(Clone)]
pub struct BusyPoll {
    state: Arc<PollState>,
    handle: Handle,
}

struct PollState {
    window_ns: AtomicU64,
    /// Polling goes on until this time (nanoseconds since `epoch`).
    until_ns: AtomicU64,
    /// The polling task is running.
    spinning: AtomicBool,
    epoch: Instant,
}

impl PollState {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64
    }
}

impl BusyPoll {
    /// Polls for the window from now (nothing when the window is zero).
    pub fn touch(&self) {
        let s = &self.state;
        let window = s.window_ns.load(Ordering::Relaxed);
        if window == 0 {
            return;
        }
        s.until_ns
            .fetch_max(s.now_ns().saturating_add(window), Ordering::Relaxed);
        if !s.spinning.swap(true, Ordering::AcqRel) {
            let state = s.clone();
            self.handle.spawn(async move {
                loop {
                    while state.now_ns() < state.until_ns.load(Ordering::Relaxed) {
                        tokio::task::yield_now().await;
                        // And to the OS: a thread with work on this core (a worker's
                        // compute, the forward pass) runs now instead of at the end of this
                        // thread's time slice.
                        std::thread::yield_now();
                    }
                    state.spinning.store(false, Ordering::Release);
                    // A touch between the check and the store saw the task still running.
                    if state.now_ns() >= state.until_ns.load(Ordering::Relaxed)
                        || state.spinning.swap(true, Ordering::AcqRel)
                    {
                        break;
                    }
                }
            });
        }
    }
}

/// A task that is aborted when its handle is dropped (a plain `JoinHandle` detaches it).
pub struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn tasks_run_on_the_data_plane_thread_and_stop_with_their_guard() {
        let dp = DataPlaneRuntime::new().unwrap();
        let name = dp
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("data-plane"));

        // Dropping the guard aborts the task: its channel's sender goes with it.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let guard = dp.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(guard);
        let r = tokio::time::timeout(Duration::from_secs(10), rx).await;
        assert!(matches!(r, Ok(Err(_))), "the task was not stopped");
        // Dropped inside this runtime: no panic, its thread stops.
        drop(dp);
    }

    #[tokio::test]
    async fn busy_polling_runs_for_its_window_only_and_lets_other_tasks_run() {
        let dp = DataPlaneRuntime::new().unwrap();
        let spinning = |dp: &DataPlaneRuntime| dp.poll.state.spinning.load(Ordering::Acquire);
        // Off by default: a touch starts nothing.
        dp.touch();
        assert!(!spinning(&dp));

        dp.set_busy_poll(Duration::from_millis(30));
        dp.touch();
        assert!(spinning(&dp));
        // Other tasks run on the thread while it polls.
        let done = tokio::time::timeout(Duration::from_secs(10), dp.spawn(async { 7 })).await;
        assert!(matches!(done, Ok(Ok(7))));
        // Touching again while it polls extends the window; no second poller starts.
        dp.touch();
        // It stops once the window has passed without a touch.
        let t0 = Instant::now();
        while spinning(&dp) {
            assert!(t0.elapsed() < Duration::from_secs(10), "still polling");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(t0.elapsed() >= Duration::from_millis(10));
        // And starts again on the next touch.
        dp.touch();
        assert!(spinning(&dp));
        drop(dp);
    }
}
