//! A pool of worker processes for a plain function, with no model: the
//! invoker's engine and guarantees for any Rust program that needs
//! process-level parallelism.

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::worker::jobs::{self, BatchRunner};

use crate::engine::JobSpec;

use crate::error::PoolError;
use crate::map::{Executor, MapOptions, executor_accessors, map_methods, map_options};

/// Creates a pool that applies `func` to each argument in `n_jobs` worker
/// processes (`n_jobs = 1`: in this process).
///
/// Use [`PoolBuilder`] for the start method, batch size, seed, timeouts or
/// a memory limit.
///
/// ```
/// fn collatz_steps(mut n: u64) -> u32 {
///     let mut steps = 0;
///     while n != 1 {
///         n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
///         steps += 1;
///     }
///     steps
/// }
///
/// let mut pool = procpool::pool(collatz_steps, 2)?;
/// let steps: Vec<u32> = pool.map(1..=10u64).collect::<Result<_, _>>()?;
/// assert_eq!(steps, [0, 1, 7, 2, 5, 8, 16, 3, 19, 6]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// Fails if `n_jobs` is 0 or the workers cannot be started.
pub fn pool<A, R>(func: fn(A) -> R, n_jobs: usize) -> Result<Pool<A, R>, PoolError>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    PoolBuilder::new(func).n_jobs(n_jobs).build()
}

/// Configures a [`Pool`].
///
/// ```
/// use std::time::Duration;
///
/// fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// let mut pool = procpool::PoolBuilder::new(square)
///     .n_jobs(2)
///     .chunk_size(64)
///     .task_timeout(Duration::from_secs(10))
///     .build()?;
/// let total: u64 = pool.map(0..1000u64).map(Result::unwrap).sum();
/// assert_eq!(total, 332_833_500);
/// # Ok::<(), procpool::PoolError>(())
/// ```
pub struct PoolBuilder<A, R> {
    func: fn(A) -> R,
    options: MapOptions,
}

impl<A, R> std::fmt::Debug for PoolBuilder<A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<A, R> PoolBuilder<A, R>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// Starts a configuration for `func`.
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// let builder = procpool::PoolBuilder::new(double).n_jobs(2);
    /// # let _ = builder;
    /// ```
    pub fn new(func: fn(A) -> R) -> Self {
        PoolBuilder {
            func,
            options: MapOptions::default(),
        }
    }

    map_options!();

    /// Starts the workers.
    ///
    /// # Errors
    ///
    /// Fails if `n_jobs` or `chunk_size` is 0, `chunk_size` is over
    /// 16,777,216 (2^24) tasks, `PROCPOOL_SEED` or `PROCPOOL_NUM_PROCS` is
    /// malformed, or the workers cannot be started.
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// let pool = procpool::PoolBuilder::new(double).n_jobs(2).seed(7).build()?;
    /// assert_eq!((pool.n_jobs(), pool.root_seed()), (2, 7));
    /// # Ok::<(), procpool::PoolError>(())
    /// ```
    pub fn build(self) -> Result<Pool<A, R>, PoolError> {
        let job = JobSpec::map(jobs::map::<A, R> as BatchRunner, self.func as usize);
        // SAFETY: `map` is instantiated with the types of the job's
        // function, which takes no model.
        let executor = unsafe { Executor::start(self.options, job, None) }?;
        Ok(Pool { executor })
    }
}

/// Applies a function to streams of arguments in worker processes. Made by
/// [`pool`] or [`PoolBuilder`]; reusable for any number of maps; stops its
/// workers on [`shutdown`](Pool::shutdown) or drop.
///
/// Everything an [`Invoker`](crate::Invoker) guarantees holds here: results
/// in input order (or as they complete), a lazily read input, a panic or a
/// crash failing only its task, per-task seeds ([`seed`](crate::seed)),
/// forwarded logs, timeouts and memory limits, and the same results and
/// errors for `n_jobs = 1`, which runs in this process.
///
/// ```
/// fn parse(s: String) -> i64 {
///     s.parse().expect("a number")
/// }
///
/// let mut pool = procpool::pool(parse, 2)?;
/// let input = ["1", "x", "3"].map(String::from);
/// let results: Vec<_> = pool.map(input).collect();
/// assert_eq!(results[0].as_ref().ok(), Some(&1));
/// assert!(results[1].as_ref().is_err_and(|e| e.is_panic()));
/// assert_eq!(results[2].as_ref().ok(), Some(&3));
///
/// // As they complete, with the index of their argument.
/// let mut doubled: Vec<(usize, i64)> = pool
///     .map_unordered(["4", "5"].map(String::from))
///     .map(|(i, r)| (i, r.unwrap()))
///     .collect();
/// doubled.sort();
/// assert_eq!(doubled, [(0, 4), (1, 5)]);
/// pool.shutdown();
/// # Ok::<(), procpool::PoolError>(())
/// ```
pub struct Pool<A, R> {
    executor: Executor<A, R>,
}

impl<A, R> std::fmt::Debug for Pool<A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("n_jobs", &self.executor.n_jobs())
            .field("root_seed", &self.executor.root_seed())
            .finish()
    }
}

impl<A, R> Pool<A, R>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    map_methods!();
}

impl<A, R> Pool<A, R> {
    executor_accessors!();
}
