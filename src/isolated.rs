//! `run_sp`: one call in a fresh, isolated process.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use procpool_worker::worker::jobs::{self, BatchRunner};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::batching::BatchSizer;
use crate::engine::{JobSpec, Policy, PoolSpec, Run, Workers};
use crate::error::TaskError;
use crate::launch::StartMethod;

/// Calls made so far; each call's seed derives from its number.
static SPAWNS: AtomicU64 = AtomicU64::new(0);

/// The root seed of isolated calls that set none: `PROCPOOL_SEED`, else
/// random, chosen once per process.
fn process_root_seed() -> Result<u64, TaskError> {
    static ROOT: OnceLock<Result<u64, String>> = OnceLock::new();
    ROOT.get_or_init(|| crate::seed::root_seed_from_env().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| TaskError::pool(0, e))
}

/// Runs `func(arg)` in a fresh process forked from the fork server and
/// returns its value, or an error saying what happened to the process: a
/// panic (message and location), an exit code, or a signal, with the tail of
/// its stderr. Nothing that happens there can crash the caller.
///
/// The call gets a seed ([`seed`](crate::seed)) derived from the root seed
/// (`PROCPOOL_SEED`, else random once per process) and the number of the
/// call; its `log` records reach this process's logger. Use [`Isolated`] for
/// a timeout, a memory limit or a fixed seed.
///
/// ```
/// fn fragile(n: u64) -> u64 {
///     assert!(n < 10, "too big");
///     n * 2
/// }
///
/// assert_eq!(procpool::run_sp(fragile, 4).unwrap(), 8);
/// let err = procpool::run_sp(fragile, 40).unwrap_err();
/// assert!(err.is_panic());
/// ```
pub fn run_sp<A, R>(func: fn(A) -> R, arg: A) -> Result<R, TaskError>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    Isolated::new(func).run(arg)
}

/// An isolated call with options; see [`run_sp`].
///
/// ```
/// use std::time::Duration;
///
/// fn work(n: u64) -> u64 { n + procpool::seed().unwrap_or(0) % 7 }
///
/// let call = procpool::Isolated::new(work)
///     .timeout(Duration::from_secs(10))
///     .memory_limit(4 << 30)
///     .seed(42);
/// let value = call.run(1).unwrap();
/// assert_eq!(value, call.run(1).unwrap()); // same seed, same call number: same value
/// ```
#[derive(Debug, Clone)]
pub struct Isolated<A, R> {
    func: fn(A) -> R,
    timeout: Option<Duration>,
    memory_limit: Option<u64>,
    seed: Option<u64>,
    start_method: StartMethod,
}

impl<A, R> Isolated<A, R>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// An isolated call of `func`.
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// assert_eq!(procpool::Isolated::new(double).run(21).unwrap(), 42);
    /// ```
    pub fn new(func: fn(A) -> R) -> Self {
        Isolated {
            func,
            timeout: None,
            memory_limit: None,
            seed: None,
            start_method: StartMethod::default(),
        }
    }

    /// Stops the call after `limit`, counted from when the process was
    /// asked for (its start-up, well under a millisecond, counts): SIGTERM,
    /// then SIGKILL half a second later; the error says
    /// [`TaskError::is_timeout`].
    ///
    /// ```
    /// use std::time::Duration;
    /// fn nap(ms: u64) -> u64 {
    ///     std::thread::sleep(Duration::from_millis(ms));
    ///     ms
    /// }
    /// let call = procpool::Isolated::new(nap).timeout(Duration::from_millis(200));
    /// assert_eq!(call.run(1).unwrap(), 1);
    /// assert!(call.run(5_000).unwrap_err().is_timeout());
    /// ```
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Limits the process's address space to `bytes` (`RLIMIT_AS`); a failed
    /// allocation is reported as [`TaskError::is_out_of_memory`].
    ///
    /// ```
    /// fn hoard(bytes: usize) -> usize {
    ///     std::hint::black_box(vec![1u8; bytes]).len()
    /// }
    /// let call = procpool::Isolated::new(hoard).memory_limit(1 << 30);
    /// assert_eq!(call.run(1 << 20).unwrap(), 1 << 20);
    /// assert!(call.run(4 << 30).unwrap_err().is_out_of_memory());
    /// ```
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Derives the call's seed from `root` (and the call's number 0) instead
    /// of the process's root seed and spawn counter.
    ///
    /// ```
    /// fn seeded(_: ()) -> u64 {
    ///     procpool::seed().unwrap()
    /// }
    /// let call = procpool::Isolated::new(seeded).seed(42);
    /// assert_eq!(call.run(()).unwrap(), call.run(()).unwrap());
    /// ```
    pub fn seed(mut self, root: u64) -> Self {
        self.seed = Some(root);
        self
    }

    /// How the process is started. Default: [`StartMethod::ForkServer`].
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// let call = procpool::Isolated::new(double).start_method(procpool::StartMethod::Spawn);
    /// assert_eq!(call.run(4).unwrap(), 8);
    /// ```
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.start_method = method;
        self
    }

    /// Runs the call once, in a new process.
    ///
    /// # Errors
    ///
    /// The function panicked, the process died (signal, exit, out of
    /// memory), ran past the timeout, or could not be started.
    ///
    /// ```
    /// fn parse(s: String) -> u32 {
    ///     s.parse().expect("a number")
    /// }
    /// let call = procpool::Isolated::new(parse);
    /// assert_eq!(call.run("7".into()).unwrap(), 7);
    /// assert!(call.run("seven".into()).unwrap_err().is_panic());
    /// ```
    pub fn run(&self, arg: A) -> Result<R, TaskError> {
        let number = SPAWNS.fetch_add(1, Ordering::Relaxed);
        let (root_seed, index) = match self.seed {
            Some(root) => (root, 0),
            None => (process_root_seed()?, number),
        };
        if self.timeout == Some(Duration::ZERO) {
            return Err(TaskError::pool(index, "timeout must be longer than zero"));
        }
        let job = JobSpec::map(jobs::map::<A, R> as BatchRunner, self.func as usize);
        let policy = Policy {
            task_timeout: self.timeout,
            memory_limit: self.memory_limit,
            max_tries: 1,
            replace_dead: false,
        };
        let spec = PoolSpec::new(self.start_method, 1, None, job, policy);
        let mut pool = Workers::start_with_task(spec, index, root_seed, arg)
            .map_err(|failure| TaskError::from_failure(index, failure))?
            .map_err(|e| TaskError::pool(index, format!("cannot start the process: {e}")))?;
        let mut sizer = BatchSizer::new(Some(1));
        let outcome = {
            // The task is already on its way: the run only collects it.
            let mut run = Run::new(
                &mut pool,
                &mut sizer,
                std::iter::empty::<A>(),
                (root_seed, index),
                (true, false),
                crate::progress::Tracker::new(None),
            );
            run.next_result()
        };
        match &outcome {
            // The child has said all it will: let it go without waiting.
            Some((_, Ok(_))) => pool.release(),
            _ => pool.shutdown(),
        }
        match outcome {
            Some((_, result)) => result,
            None => Err(TaskError::pool(index, "the call produced no result")),
        }
    }
}
