//! The CPU backend's worker threads.

/// Sizes the CPU backend's threads: the matrix kernels' pool and rayon's global pool (used
/// for load-time work); call once, before any computation.
pub fn set_threads(n: usize) -> Result<(), rayon::ThreadPoolBuildError> {
    crate::cpu::pool::set_threads(n);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .build_global()
}
