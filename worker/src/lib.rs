//! The worker: joins a cluster, loads the routed experts the coordinator assigns it, and
//! serves them over QUIC.

pub mod cache;
pub mod compute;
pub mod daemon;
pub mod dataplane;
pub mod numerics;
