//! What an [`Invoker`](crate::Invoker) and a [`Pool`](crate::Pool) share:
//! their options, the processes (or, for `n_jobs = 1`, this process) that
//! run their tasks, and the iterators their maps return.

use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::wire::{MAX_BATCH_TASKS, split_item};
use procpool_worker::worker::jobs::{BatchJob, JobState};
use procpool_worker::worker::task::{BatchView, capturing};

use crate::batching::BatchSizer;
use crate::engine::{Backlog, Engine, JobSpec, Policy, PoolSpec, Run, Workers};
use crate::error::{PoolError, TaskError};
use crate::launch::StartMethod;
use crate::progress::{ProgressFn, Tracker};
use crate::seed;
use crate::store::UntypedStore;

/// The options of a map-running builder, before they are checked.
#[derive(Debug, Clone)]
pub(crate) struct MapOptions {
    pub n_jobs: Option<usize>,
    pub start_method: StartMethod,
    pub chunk_size: Option<usize>,
    pub seed: Option<u64>,
    pub task_timeout: Option<Duration>,
    pub memory_limit: Option<u64>,
    pub max_tries: u32,
    pub fail_fast: bool,
    pub progress: Option<ProgressFn>,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            n_jobs: None,
            start_method: StartMethod::default(),
            chunk_size: None,
            seed: None,
            task_timeout: None,
            memory_limit: None,
            max_tries: 2,
            fail_fast: false,
            progress: None,
        }
    }
}

/// The builder methods every map-running builder has, each setting one
/// field of its `options: MapOptions`.
macro_rules! map_options {
    () => {
        /// Worker processes to use; 1 runs in this process. Default:
        /// [`proc_count(2, Some(4), 0)`](crate::proc_count).
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// assert_eq!(procpool::PoolBuilder::new(f).n_jobs(3).build()?.n_jobs(), 3);
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn n_jobs(mut self, n_jobs: usize) -> Self {
            self.options.n_jobs = Some(n_jobs);
            self
        }

        /// How workers are started. Default: [`StartMethod::ForkServer`](crate::StartMethod::ForkServer).
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// let builder = procpool::PoolBuilder::new(f).start_method(procpool::StartMethod::Spawn);
        /// # let _ = builder;
        /// ```
        pub fn start_method(mut self, method: crate::StartMethod) -> Self {
            self.options.start_method = method;
            self
        }

        /// Tasks per batch, instead of automatic sizing: from 1 to
        /// 16,777,216 (2^24).
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// let mut pool = procpool::PoolBuilder::new(f).n_jobs(2).chunk_size(1).build()?;
        /// assert_eq!(pool.map(0..3u8).count(), 3);
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn chunk_size(mut self, chunk_size: usize) -> Self {
            self.options.chunk_size = Some(chunk_size);
            self
        }

        /// The root seed task seeds derive from. Default: `PROCPOOL_SEED`,
        /// else random from the OS.
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// assert_eq!(procpool::PoolBuilder::new(f).n_jobs(1).seed(9).build()?.root_seed(), 9);
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn seed(mut self, seed: u64) -> Self {
            self.options.seed = Some(seed);
            self
        }

        /// Stops a worker whose task runs longer than `limit` (SIGTERM, then
        /// SIGKILL half a second later); that task fails with
        /// [`TaskError::is_timeout`](crate::TaskError::is_timeout) and is not
        /// retried. Applies to worker processes only: with `n_jobs = 1` tasks
        /// run in this process.
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// let builder = procpool::PoolBuilder::new(f).task_timeout(std::time::Duration::from_secs(30));
        /// # let _ = builder;
        /// ```
        pub fn task_timeout(mut self, limit: std::time::Duration) -> Self {
            self.options.task_timeout = Some(limit);
            self
        }

        /// Limits each worker's address space to `bytes` (`RLIMIT_AS`; a
        /// model's mapping counts too). A task whose allocation fails under
        /// it fails with
        /// [`TaskError::is_out_of_memory`](crate::TaskError::is_out_of_memory).
        /// Worker processes only.
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// let builder = procpool::PoolBuilder::new(f).memory_limit(4 << 30);
        /// # let _ = builder;
        /// ```
        pub fn memory_limit(mut self, bytes: u64) -> Self {
            self.options.memory_limit = Some(bytes);
            self
        }

        /// How many worker deaths a task may cause before it is reported as
        /// failed rather than run again (default 2: a task that crashes once
        /// is retried once, alone).
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// let builder = procpool::PoolBuilder::new(f).max_tries(1);
        /// # let _ = builder;
        /// ```
        pub fn max_tries(mut self, tries: u32) -> Self {
            self.options.max_tries = tries;
            self
        }

        /// Ends each map at its first error: that error is the last item, the
        /// remaining input is not read, and running tasks are stopped (their
        /// workers are killed and replaced). Default: one result per argument.
        ///
        /// ```
        /// fn fail_on_1(x: u8) -> u8 {
        ///     assert_ne!(x, 1);
        ///     x
        /// }
        /// let mut pool = procpool::PoolBuilder::new(fail_on_1).n_jobs(1).fail_fast(true).build()?;
        /// let results: Vec<_> = pool.map(0..5u8).collect();
        /// assert_eq!(results.len(), 2); // 0, then the error
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn fail_fast(mut self, on: bool) -> Self {
            self.options.fail_fast = on;
            self
        }

        /// Calls `report` with the [`Progress`](crate::Progress) of each
        /// run (tasks submitted, done, failed, time) as results arrive, at
        /// most ten times a second and once at the end, from this process:
        /// workers are never woken for it.
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// let mut pool = procpool::PoolBuilder::new(f)
        ///     .n_jobs(2)
        ///     .on_progress(|p| eprintln!("{} of {} done", p.done, p.submitted))
        ///     .build()?;
        /// assert_eq!(pool.map(0..10u8).count(), 10);
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn on_progress(
            mut self,
            report: impl Fn(&crate::Progress) + Send + Sync + 'static,
        ) -> Self {
            self.options.progress = Some(crate::progress::ProgressFn(std::sync::Arc::new(report)));
            self
        }
    };
}
pub(crate) use map_options;

/// The maps of a type with an `executor: Executor<A, R>` field.
macro_rules! map_methods {
    () => {
        /// Applies the function to every argument; yields one result per
        /// argument, in input order. The input is read lazily, a bounded
        /// number of tasks ahead of what has been taken, so it may be
        /// endless.
        ///
        /// ```
        /// # fn double(x: u8) -> u8 { x * 2 }
        /// let mut pool = procpool::pool(double, 2)?;
        /// let doubled: Vec<u8> = pool.map(0..4u8).map(Result::unwrap).collect();
        /// assert_eq!(doubled, [0, 2, 4, 6]);
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn map<I>(&mut self, args: I) -> crate::Map<'_, A, R, I::IntoIter>
        where
            I: IntoIterator<Item = A>,
        {
            crate::Map {
                inner: self.executor.map(args.into_iter(), true),
            }
        }

        /// Like [`map`](Self::map), but yields results as they complete,
        /// each with the index of its argument.
        ///
        /// ```
        /// # fn double(x: u8) -> u8 { x * 2 }
        /// let mut pool = procpool::pool(double, 2)?;
        /// let mut got: Vec<(usize, u8)> = pool.map_unordered(0..3u8).map(|(i, r)| (i, r.unwrap())).collect();
        /// got.sort();
        /// assert_eq!(got, [(0, 0), (1, 2), (2, 4)]);
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn map_unordered<I>(&mut self, args: I) -> crate::MapUnordered<'_, A, R, I::IntoIter>
        where
            I: IntoIterator<Item = A>,
        {
            crate::MapUnordered {
                inner: self.executor.map(args.into_iter(), false),
            }
        }
    };
}
pub(crate) use map_methods;

/// What a type with an `executor: Executor<A, R>` field tells of its
/// workers, and how it stops them.
macro_rules! executor_accessors {
    () => {
        /// The number of worker processes (1: runs in this process).
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// assert_eq!(procpool::pool(f, 2)?.n_jobs(), 2);
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn n_jobs(&self) -> usize {
            self.executor.n_jobs()
        }

        /// The process ids of the workers now running (empty for
        /// `n_jobs = 1`). A worker that dies is replaced, so the list can
        /// change between maps.
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// let pool = procpool::pool(f, 2)?;
        /// assert!(pool.worker_pids().iter().all(|&pid| pid != std::process::id()));
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn worker_pids(&self) -> Vec<u32> {
            self.executor.worker_pids()
        }

        /// The root seed task seeds derive from.
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// assert_eq!(procpool::PoolBuilder::new(f).n_jobs(1).seed(5).build()?.root_seed(), 5);
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn root_seed(&self) -> u64 {
            self.executor.root_seed()
        }

        /// Stops the workers, forwarding the logs they still send. Dropping
        /// it does the same.
        ///
        /// ```
        /// # fn f(x: u8) -> u8 { x }
        /// let pool = procpool::pool(f, 2)?;
        /// pool.shutdown(); // the workers are gone
        /// # Ok::<(), procpool::PoolError>(())
        /// ```
        pub fn shutdown(mut self) {
            self.executor.stop();
        }
    };
}
pub(crate) use executor_accessors;

/// Runs `batch` here, as a worker would, through `job` with the model
/// `archive` and the job's `state` in this process, and returns its RESULTS
/// items (see `procpool_worker::wire`).
///
/// # Safety
///
/// As for calling the job's runner: it must be monomorphised for the types
/// of the job's functions and of the batch's arguments, and `archive` must
/// be what it expects.
pub(crate) unsafe fn run_batch_here(
    job: JobSpec,
    state: &mut JobState,
    archive: &[u8],
    batch: &crate::engine::Batch,
    root_seed: u64,
) -> Vec<u8> {
    let mut out = Vec::new();
    let job_io = BatchJob {
        state,
        archive,
        batch: batch.view(root_seed),
        out: &mut out,
    };
    // SAFETY: the caller's promise about the job, the batch and `archive`.
    unsafe { (job.runner)(job.fns, job_io) };
    out
}

/// Runs task `index` on `arg` here, through the same encode → run → decode
/// path a worker uses, so results and errors are those of a pool: the map
/// `job`, with the model `archive`.
///
/// # Safety
///
/// As for calling the job's runner: it must be monomorphised for the types
/// of the job's functions, `A` and `R`, and `archive` must be what it expects
/// (a validated, immutable archive for a model's function, any bytes for a
/// model-less one).
pub(crate) unsafe fn run_here<A, R>(
    job: JobSpec,
    archive: &[u8],
    arg: A,
    (index, root_seed): (u64, u64),
) -> Result<R, TaskError>
where
    A: Serialize,
    R: DeserializeOwned,
{
    // A pool could not send what this refuses either, so errors do not
    // depend on n_jobs.
    let mut items = Vec::new();
    if let Err(failure) = crate::engine::encode_argument(arg, &mut items, &mut true) {
        return Err(TaskError::from_failure(index, failure));
    }
    let mut out = Vec::new();
    let batch = BatchView {
        first_index: index,
        root_seed,
        count: 1,
        items: &items,
    };
    // SAFETY: the caller's promise about the job and `archive`; a map keeps
    // no state.
    unsafe {
        (job.runner)(
            job.fns,
            BatchJob {
                state: &mut None,
                archive,
                batch,
                out: &mut out,
            },
        )
    };
    let mut outcomes = &out[..];
    match split_item(&mut outcomes) {
        Some(item) => capturing(|| crate::engine::decode_outcome(index, item)),
        None => Err(TaskError::bad_result(index, "malformed results")),
    }
}

enum Backend {
    InProcess,
    Workers(Workers),
}

/// The processes that run a builder's tasks, or this process for
/// `n_jobs = 1`, and what every map on them shares.
pub(crate) struct Executor<A, R> {
    backend: Backend,
    progress: Option<ProgressFn>,
    job: JobSpec,
    /// The model the job reads, if it takes one: its workers map it, and
    /// `n_jobs = 1` reads it here.
    model: Option<UntypedStore>,
    sizer: BatchSizer,
    _types: PhantomData<fn(A) -> R>,
    root_seed: u64,
    n_jobs: usize,
    fail_fast: bool,
}

impl<A, R> Executor<A, R>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// Checks `options` and starts the workers that run `job`, with `model`
    /// mapped (or, for `n_jobs = 1`, runs it here).
    ///
    /// # Safety
    ///
    /// The job's runner must be monomorphised for the types of the job's
    /// functions and for `A` and `R`, and for the archived type of `model`
    /// if the job reads one (a job without a model is given `None`).
    pub(crate) unsafe fn start(
        options: MapOptions,
        job: JobSpec,
        model: Option<UntypedStore>,
    ) -> Result<Self, PoolError> {
        let n_jobs = match options.n_jobs {
            Some(0) => return Err(PoolError::refused("n_jobs must be at least 1")),
            Some(n) => n,
            None => crate::config::proc_count(2, Some(4), 0)?,
        };
        match options.chunk_size {
            Some(0) => return Err(PoolError::refused("chunk_size must be at least 1")),
            Some(n) if n > MAX_BATCH_TASKS => {
                return Err(PoolError::refused(format!(
                    "chunk_size must be at most {MAX_BATCH_TASKS}, got {n}"
                )));
            }
            _ => {}
        }
        if options.max_tries == 0 {
            return Err(PoolError::refused("max_tries must be at least 1"));
        }
        if options.task_timeout == Some(Duration::ZERO) {
            return Err(PoolError::refused("task_timeout must be longer than zero"));
        }
        let root_seed = match options.seed {
            Some(s) => s,
            None => seed::root_seed_from_env()?,
        };
        let backend = if n_jobs == 1 {
            Backend::InProcess
        } else {
            let model_fd = match &model {
                Some(store) => Some(
                    procpool_worker::sys::dup_owned(&store.fd())
                        .map_err(|e| PoolError::io("duplicate the model descriptor", e))?,
                ),
                None => None,
            };
            let policy = Policy {
                task_timeout: options.task_timeout,
                memory_limit: options.memory_limit,
                max_tries: options.max_tries,
                replace_dead: true,
            };
            Backend::Workers(Workers::start(PoolSpec::new(
                options.start_method,
                n_jobs,
                model_fd,
                job,
                policy,
            ))?)
        };
        Ok(Executor {
            backend,
            progress: options.progress.clone(),
            job,
            model,
            sizer: BatchSizer::new(options.chunk_size),
            root_seed,
            n_jobs,
            fail_fast: options.fail_fast,
            _types: PhantomData,
        })
    }

    /// A map over `input`, in input order or as results complete.
    pub(crate) fn map<I: Iterator<Item = A>>(
        &mut self,
        input: I,
        ordered: bool,
    ) -> MapInner<'_, A, R, I> {
        match &mut self.backend {
            Backend::InProcess => MapInner::InProcess(InProcessRun {
                job: self.job,
                archive: self.model.as_ref().map_or(&[], UntypedStore::archive_bytes),
                input,
                next_index: 0,
                root_seed: self.root_seed,
                fail_fast: self.fail_fast,
                stopped: false,
                tracker: Tracker::new(self.progress.clone()),
                _types: PhantomData,
            }),
            Backend::Workers(workers) => MapInner::Workers(Run::new(
                workers,
                &mut self.sizer,
                input,
                (self.root_seed, 0),
                (ordered, self.fail_fast),
                Tracker::new(self.progress.clone()),
            )),
        }
    }
}

impl<A, R> Executor<A, R> {
    /// The engine over the workers, going on from `backlog`, or `None` for
    /// `n_jobs = 1`.
    pub(crate) fn resume(&mut self, backlog: Backlog) -> Option<Engine<'_>> {
        match &mut self.backend {
            Backend::InProcess => None,
            Backend::Workers(workers) => Some(Engine::resume(
                workers,
                &mut self.sizer,
                self.root_seed,
                backlog,
            )),
        }
    }

    /// Where a job's batches run: the engine over the workers, or `None`
    /// for `n_jobs = 1`, where they run in this process (see
    /// [`run_batch_here`]).
    pub(crate) fn engine(&mut self) -> Option<Engine<'_>> {
        match &mut self.backend {
            Backend::InProcess => None,
            Backend::Workers(workers) => {
                Some(Engine::new(workers, &mut self.sizer, self.root_seed))
            }
        }
    }

    /// What the workers run.
    pub(crate) fn job(&self) -> JobSpec {
        self.job
    }

    /// The model's archive, as this process reads it (empty without one).
    pub(crate) fn archive(&self) -> &[u8] {
        self.model.as_ref().map_or(&[], UntypedStore::archive_bytes)
    }

    /// How many tasks, and how many bytes of arguments, a batch holds at
    /// most when it runs in this process.
    pub(crate) fn batch_limits(&self) -> (usize, usize) {
        (self.sizer.count() as usize, self.sizer.max_bytes())
    }

    pub(crate) fn n_jobs(&self) -> usize {
        self.n_jobs
    }

    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        match &self.backend {
            Backend::InProcess => Vec::new(),
            Backend::Workers(workers) => workers.pids(),
        }
    }

    pub(crate) fn root_seed(&self) -> u64 {
        self.root_seed
    }

    /// Stops the workers, forwarding the logs they still send.
    pub(crate) fn stop(&mut self) {
        if let Backend::Workers(workers) = &mut self.backend {
            workers.shutdown();
        }
    }
}

impl<A, R> Drop for Executor<A, R> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<A, R> std::fmt::Debug for Executor<A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("n_jobs", &self.n_jobs)
            .field("root_seed", &self.root_seed)
            .field("worker_pids", &self.worker_pids())
            .finish()
    }
}

// One per `map`, held where the caller holds the map: boxing the large
// variant would cost an allocation per map, a lone task's included.
#[allow(clippy::large_enum_variant)]
pub(crate) enum MapInner<'a, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    InProcess(InProcessRun<'a, A, R, I>),
    Workers(Run<'a, I, A, R>),
}

impl<A, R, I> MapInner<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    #[inline]
    fn next_result(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        match self {
            MapInner::Workers(run) => run.next_result(),
            MapInner::InProcess(here) => here.next_result(),
        }
    }
}

/// A map run in this process (`n_jobs = 1`), one task at a time.
pub(crate) struct InProcessRun<'a, A, R, I> {
    /// The executor's job, run on each argument through `run_here`.
    job: JobSpec,
    archive: &'a [u8],
    input: I,
    next_index: u64,
    root_seed: u64,
    fail_fast: bool,
    stopped: bool,
    tracker: Tracker,
    _types: PhantomData<fn(A) -> R>,
}

impl<A, R, I> InProcessRun<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    // Kept out of line: the workers' path, which shares `Map::next` with
    // it, stays small.
    #[inline(never)]
    fn next_result(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        if self.stopped {
            return None;
        }
        let Some(arg) = self.input.next() else {
            self.tracker.finish();
            return None;
        };
        let index = self.next_index;
        self.next_index += 1;
        self.tracker.submitted(1);
        // SAFETY: `Executor::start`'s caller promised that the job's runner
        // fits its functions, `A`, `R` and the model this archive holds.
        let result = unsafe { run_here(self.job, self.archive, arg, (index, self.root_seed)) };
        self.tracker.finished(result.is_ok());
        self.tracker.tick();
        self.stopped = self.fail_fast && result.is_err();
        if self.stopped {
            self.tracker.finish();
        }
        Some((index, result))
    }
}

/// The iterator of a `map` ([`Invoker::map`](crate::Invoker::map),
/// [`Pool::map`](crate::Pool::map)): one `Result` per argument, in input
/// order. The input is read lazily, a bounded number of tasks ahead of what
/// has been taken. Dropping it before the end stops the tasks still
/// running (their workers are killed and replaced) and leaves the rest of
/// the input unread.
///
/// ```
/// # fn double(x: u8) -> u8 { x * 2 }
/// let mut pool = procpool::pool(double, 2)?;
/// let mut map: procpool::Map<'_, u8, u8, _> = pool.map(0..100u8);
/// assert_eq!(map.next().unwrap()?, 0);
/// drop(map); // the rest is stopped, and the pool is ready for more
/// assert_eq!(pool.map([7u8]).next().unwrap()?, 14);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Map<'a, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    pub(crate) inner: MapInner<'a, A, R, I>,
}

impl<A, R, I> Iterator for Map<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    type Item = Result<R, TaskError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next_result().map(|(_, r)| r)
    }
}

impl<A, R, I> std::fmt::Debug for Map<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map").finish_non_exhaustive()
    }
}

/// The iterator of a `map_unordered`: `(input index, result)` pairs in
/// completion order. Dropping it early stops the work as
/// [`Map`] does.
///
/// ```
/// # fn double(x: u8) -> u8 { x * 2 }
/// let mut pool = procpool::pool(double, 2)?;
/// let total: u32 = pool.map_unordered(0..10u8).map(|(_, r)| u32::from(r.unwrap())).sum();
/// assert_eq!(total, 90);
/// # Ok::<(), procpool::PoolError>(())
/// ```
pub struct MapUnordered<'a, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    pub(crate) inner: MapInner<'a, A, R, I>,
}

impl<A, R, I> Iterator for MapUnordered<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    type Item = (usize, Result<R, TaskError>);

    fn next(&mut self) -> Option<Self::Item> {
        // Indices count arguments taken from an iterator: they fit a usize.
        self.inner.next_result().map(|(i, r)| (i as usize, r))
    }
}

impl<A, R, I> std::fmt::Debug for MapUnordered<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapUnordered").finish_non_exhaustive()
    }
}
