//! Long CPU or disk work inside the engine's async tasks.
//!
//! The engine runs on a small multi-threaded runtime (two workers, one
//! where the process may use one CPU) that
//! also carries the A-link's heartbeats and readers and the witness's
//! lease. A task that digests or reads for long without an `.await`
//! holds its worker, and with it the tasks queued there: on a node with
//! one CPU (a lab node) the peer heard nothing for a second and ended a
//! resynchronisation, and the lease lapsed. Such work runs here.

/// Runs `f`, which blocks for long (a digest reads the whole VM), without
/// holding up the async tasks of a multi-threaded runtime (the link's
/// heartbeats and readers, the lease): the worker's queue moves to
/// another thread meanwhile. On any other runtime, or none, it just runs.
pub(crate) fn off_the_workers<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
