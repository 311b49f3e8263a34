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

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

/// A one-thread runtime for the data plane. Dropping it stops its tasks without waiting for
/// them (also from inside another runtime, where a plain `Runtime` may not be dropped).
pub struct DataPlaneRuntime {
    rt: Option<Runtime>,
}

impl DataPlaneRuntime {
    /// Starts the runtime's thread.
    pub fn new() -> std::io::Result<Self> {
        let rt = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("data-plane")
            .enable_all()
            .build()?;
        Ok(DataPlaneRuntime { rt: Some(rt) })
    }

    pub fn handle(&self) -> &Handle {
        self.rt.as_ref().expect("running until dropped").handle()
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
}
