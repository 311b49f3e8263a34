//! The coordinator: membership, expert placement, scheduling, the generation loop over the
//! always-active part of the model, the OpenAI-compatible API and the cluster status.

pub mod api;
pub mod cli;
pub mod dispatch;
pub mod membership;
pub mod meter;
pub mod metrics;
pub mod placement;
pub mod remote;
pub mod scheduler;
pub mod server;
pub mod streaming;
