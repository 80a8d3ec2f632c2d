//! Threads of Raft's own for its blocking storage work (reading the log,
//! applying entries, building and installing snapshots). On the caller's
//! blocking pool, Raft would wait behind whatever else the process runs
//! there: a burst of API work could stall commits for every node.

use std::sync::OnceLock;

/// At most this many of Raft's storage calls run at once; more wait their turn.
const MAX_THREADS: usize = 16;

/// Runs `f` on Raft's storage threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, tokio::task::JoinError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    static POOL: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(MAX_THREADS)
            .thread_name("allod-raft-io")
            .build()
            .expect("Raft's storage threads start")
    });
    pool.spawn_blocking(f).await
}
