//! Root seeds and the seed of the running task.

use crate::error::ConfigError;

/// The environment variable that fixes the root seed (a decimal `u64`).
///
/// ```
/// assert_eq!(procpool::SEED_ENV, "PROCPOOL_SEED");
/// ```
pub const SEED_ENV: &str = "PROCPOOL_SEED";

/// The root seed: `PROCPOOL_SEED` if set, else fresh randomness from the OS.
pub(crate) fn root_seed_from_env() -> Result<u64, ConfigError> {
    match std::env::var(SEED_ENV) {
        Ok(value) => value.trim().parse::<u64>().map_err(|_| ConfigError {
            source: SEED_ENV.into(),
            value,
            reason: "expected an unsigned 64-bit integer",
        }),
        Err(_) => Ok(os_random()),
    }
}

fn os_random() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n == bytes.len() as isize {
        return u64::from_le_bytes(bytes);
    }
    // No getrandom: the std hasher's per-process random keys still differ per run.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// This worker's number in its pool (0, 1, … as workers are started; a
/// replacement gets a new number), or `None` outside a pool's worker
/// process (`n_jobs = 1` runs in the caller, which is no worker). A stage's
/// `init` may use it, as pyrallel's `Mapper.enter()` uses its index.
///
/// ```
/// fn which(_: u8) -> Option<u32> {
///     procpool::worker_id()
/// }
/// let mut pool = procpool::pool(which, 2)?;
/// assert!(pool.map(0..4u8).all(|id| id.unwrap().is_some_and(|id| id < 2)));
/// assert_eq!(procpool::worker_id(), None);
/// # Ok::<(), procpool::PoolError>(())
/// ```
pub fn worker_id() -> Option<u32> {
    procpool_worker::worker::task::worker_id()
}

/// The seed of the task running on this thread, or `None` outside a task.
///
/// Each task's seed derives from the invoker's root seed and the task's index
/// in its input, never from which worker runs it, so a randomised function
/// gives the same results for any `n_jobs` and from run to run with the same
/// root seed. Seed a named generator with it (ChaCha, PCG, …): `StdRng` and
/// `SmallRng` do not promise the same stream across `rand` versions.
///
/// ```
/// assert_eq!(procpool::seed(), None); // not inside a task
/// ```
pub fn seed() -> Option<u64> {
    procpool_worker::worker::task::current_task().map(|t| t.seed)
}
