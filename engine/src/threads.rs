//! The CPU backend's worker threads.

/// Sizes the global worker pool; call once, before any computation.
pub fn set_threads(n: usize) -> Result<(), rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .build_global()
}
