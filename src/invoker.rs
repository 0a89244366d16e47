//! The invoker: a model, a function, and the processes that apply one to
//! the other over a stream of arguments.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::protocol::MAX_BATCH_TASKS;
use procpool_worker::task::{self, BatchRunner, BatchView};

use crate::batching::BatchSizer;
use crate::error::{PoolError, TaskError};
use crate::launch::StartMethod;
use crate::pool::{Policy, PoolSpec, Run, Workers};
use crate::seed;
use crate::store::{ArchivedModel, ModelStore};

/// The function an invoker applies: a plain `fn` (or a closure that captures
/// nothing) taking the archived model and one argument.
pub type TaskFn<M, A, R> = fn(&<M as rkyv::Archive>::Archived, A) -> R;

/// Creates an invoker that applies `func` to `store`'s model and each
/// argument, in `n_jobs` worker processes (`n_jobs = 1`: in this process).
///
/// Use [`InvokerBuilder`] for the start method, the batch size or the seed.
///
/// ```no_run
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model { weights: Vec<f32> }
///
/// fn score(model: &ArchivedModel, row: u32) -> f32 {
///     model.weights[row as usize].to_native() * 2.0
/// }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     procpool::init();
///     let store = procpool::persist(&Model { weights: vec![1.0, 2.0, 3.0] })?;
///     let mut invoker = procpool::invoker(&store, score, 2)?;
///     let scores: Result<Vec<f32>, _> = invoker.map(0..3u32).collect();
///     assert_eq!(scores?, vec![2.0, 4.0, 6.0]);
///     Ok(())
/// }
/// ```
///
/// # Errors
///
/// Fails if `n_jobs` is 0 or the workers cannot be started.
pub fn invoker<M, A, R>(
    store: &ModelStore<M>,
    func: TaskFn<M, A, R>,
    n_jobs: usize,
) -> Result<Invoker<M, A, R>, PoolError>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    InvokerBuilder::new(store, func).n_jobs(n_jobs).build()
}

/// Configures an [`Invoker`], in the style of rayon's `ThreadPoolBuilder`.
///
/// ```no_run
/// # #[derive(rkyv::Archive, rkyv::Serialize)]
/// # struct Model { weights: Vec<f32> }
/// # fn score(_model: &ArchivedModel, _row: u32) -> f32 { 0.0 }
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let store = procpool::persist(&Model { weights: vec![1.0] })?;
/// let invoker = procpool::InvokerBuilder::new(&store, score)
///     .n_jobs(4)
///     .chunk_size(256)
///     .seed(42)
///     .build()?;
/// assert_eq!(invoker.n_jobs(), 4);
/// # Ok(()) }
/// ```
pub struct InvokerBuilder<M: rkyv::Archive, A, R> {
    store: ModelStore<M>,
    func: TaskFn<M, A, R>,
    n_jobs: Option<usize>,
    start_method: StartMethod,
    chunk_size: Option<usize>,
    seed: Option<u64>,
    task_timeout: Option<Duration>,
    memory_limit: Option<u64>,
    max_tries: u32,
    fail_fast: bool,
}

impl<M: rkyv::Archive, A, R> std::fmt::Debug for InvokerBuilder<M, A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvokerBuilder")
            .field("n_jobs", &self.n_jobs)
            .field("start_method", &self.start_method)
            .field("chunk_size", &self.chunk_size)
            .field("seed", &self.seed)
            .field("task_timeout", &self.task_timeout)
            .field("memory_limit", &self.memory_limit)
            .field("max_tries", &self.max_tries)
            .field("fail_fast", &self.fail_fast)
            .finish()
    }
}

impl<M, A, R> InvokerBuilder<M, A, R>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// Starts a configuration for `func` over `store`'s model.
    pub fn new(store: &ModelStore<M>, func: TaskFn<M, A, R>) -> Self {
        InvokerBuilder {
            store: store.clone(),
            func,
            n_jobs: None,
            start_method: StartMethod::default(),
            chunk_size: None,
            seed: None,
            task_timeout: None,
            memory_limit: None,
            max_tries: 2,
            fail_fast: false,
        }
    }

    /// Worker processes to use; 1 runs in this process. Default:
    /// [`proc_count(2, Some(4), 0)`](crate::proc_count).
    pub fn n_jobs(mut self, n_jobs: usize) -> Self {
        self.n_jobs = Some(n_jobs);
        self
    }

    /// How workers are started. Default: [`StartMethod::ForkServer`].
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.start_method = method;
        self
    }

    /// Tasks per batch, instead of automatic sizing: from 1 to 16,777,216
    /// (2^24).
    pub fn chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = Some(chunk_size);
        self
    }

    /// The root seed task seeds derive from. Default: `PROCPOOL_SEED`, else
    /// random from the OS.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Stops a worker whose task runs longer than `limit` (SIGTERM, then
    /// SIGKILL half a second later); that task fails with
    /// [`TaskError::is_timeout`] and is not retried. Applies to worker
    /// processes only: with `n_jobs = 1` tasks run in this process.
    pub fn task_timeout(mut self, limit: Duration) -> Self {
        self.task_timeout = Some(limit);
        self
    }

    /// Limits each worker's address space to `bytes` (`RLIMIT_AS`; the
    /// model's mapping counts too). A task whose allocation fails under it
    /// fails with [`TaskError::is_out_of_memory`]. Worker processes only.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// How many worker deaths a task may cause before it is reported as
    /// failed rather than run again (default 2: a task that crashes once is
    /// retried once, alone).
    pub fn max_tries(mut self, tries: u32) -> Self {
        self.max_tries = tries;
        self
    }

    /// Ends each map at its first error: that error is the last item, the
    /// remaining input is not read, and running tasks are stopped (their
    /// workers are killed and replaced). Default: one result per argument.
    pub fn fail_fast(mut self, on: bool) -> Self {
        self.fail_fast = on;
        self
    }

    /// Starts the workers.
    ///
    /// # Errors
    ///
    /// Fails if `n_jobs` or `chunk_size` is 0, `chunk_size` is over
    /// 16,777,216 (2^24) tasks, `PROCPOOL_SEED` or
    /// `PROCPOOL_NUM_PROCS` is malformed, or the workers cannot be started.
    pub fn build(self) -> Result<Invoker<M, A, R>, PoolError> {
        let n_jobs = match self.n_jobs {
            Some(0) => return Err(PoolError::refused("n_jobs must be at least 1")),
            Some(n) => n,
            None => crate::config::proc_count(2, Some(4), 0)?,
        };
        match self.chunk_size {
            Some(0) => return Err(PoolError::refused("chunk_size must be at least 1")),
            Some(n) if n > MAX_BATCH_TASKS => {
                return Err(PoolError::refused(format!(
                    "chunk_size must be at most {MAX_BATCH_TASKS}, got {n}"
                )));
            }
            _ => {}
        }
        if self.max_tries == 0 {
            return Err(PoolError::refused("max_tries must be at least 1"));
        }
        if self.task_timeout == Some(Duration::ZERO) {
            return Err(PoolError::refused("task_timeout must be longer than zero"));
        }
        let root_seed = match self.seed {
            Some(s) => s,
            None => seed::root_seed_from_env()?,
        };
        let backend = if n_jobs == 1 {
            Backend::InProcess
        } else {
            let model = procpool_worker::sys::dup_owned(&self.store.fd())
                .map_err(|e| PoolError::io("duplicate the model descriptor", e))?;
            let runner = task::run_batch::<M::Archived, A, R> as BatchRunner;
            let policy = Policy {
                task_timeout: self.task_timeout,
                memory_limit: self.memory_limit,
                max_tries: self.max_tries,
                replace_dead: true,
            };
            Backend::Pool(Workers::start(PoolSpec::new(
                self.start_method,
                n_jobs,
                Some(model),
                (runner, self.func as usize),
                policy,
            ))?)
        };
        Ok(Invoker {
            store: self.store,
            func: self.func,
            backend,
            sizer: BatchSizer::new(self.chunk_size),
            root_seed,
            n_jobs,
            fail_fast: self.fail_fast,
        })
    }
}

enum Backend {
    InProcess,
    Pool(Workers),
}

/// Applies a function to a shared model over streams of arguments. Made by
/// [`invoker`] or [`InvokerBuilder`]; reusable for any number of maps; stops
/// its workers on [`shutdown`](Invoker::shutdown) or drop.
pub struct Invoker<M: rkyv::Archive, A, R> {
    store: ModelStore<M>,
    func: TaskFn<M, A, R>,
    backend: Backend,
    sizer: BatchSizer,
    root_seed: u64,
    n_jobs: usize,
    fail_fast: bool,
}

impl<M: rkyv::Archive, A, R> std::fmt::Debug for Invoker<M, A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invoker")
            .field("n_jobs", &self.n_jobs)
            .field("root_seed", &self.root_seed)
            .finish()
    }
}

impl<M, A, R> Invoker<M, A, R>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// Applies the function to every argument; yields one result per
    /// argument, in input order. The input is read lazily, a bounded number
    /// of tasks ahead of what has been taken, so it may be endless.
    pub fn map<I>(&mut self, args: I) -> Map<'_, M, A, R, I::IntoIter>
    where
        I: IntoIterator<Item = A>,
    {
        Map {
            inner: self.start(args.into_iter(), true),
        }
    }

    /// Like [`map`](Self::map), but yields results as they complete, each
    /// with the index of its argument.
    pub fn map_unordered<I>(&mut self, args: I) -> MapUnordered<'_, M, A, R, I::IntoIter>
    where
        I: IntoIterator<Item = A>,
    {
        MapUnordered {
            inner: self.start(args.into_iter(), false),
        }
    }

    fn start<I: Iterator<Item = A>>(
        &mut self,
        input: I,
        ordered: bool,
    ) -> MapInner<'_, M, A, R, I> {
        match &mut self.backend {
            Backend::InProcess => MapInner::InProcess {
                store: &self.store,
                func: self.func,
                input,
                next_index: 0,
                root_seed: self.root_seed,
                fail_fast: self.fail_fast,
                stopped: false,
            },
            Backend::Pool(pool) => MapInner::Pool(Run::new(
                pool,
                &mut self.sizer,
                input,
                (self.root_seed, 0),
                ordered,
                self.fail_fast,
            )),
        }
    }

    /// The number of worker processes (1: runs in this process).
    pub fn n_jobs(&self) -> usize {
        self.n_jobs
    }

    /// The process ids of the workers now running (empty for `n_jobs = 1`).
    /// A worker that dies is replaced, so the list can change between maps.
    pub fn worker_pids(&self) -> Vec<u32> {
        match &self.backend {
            Backend::InProcess => Vec::new(),
            Backend::Pool(pool) => pool.pids(),
        }
    }

    /// The root seed task seeds derive from.
    pub fn root_seed(&self) -> u64 {
        self.root_seed
    }

    /// Stops the workers, forwarding the logs they still send. Dropping the
    /// invoker does the same.
    pub fn shutdown(mut self) {
        self.stop();
    }
}

impl<M: rkyv::Archive, A, R> Invoker<M, A, R> {
    fn stop(&mut self) {
        if let Backend::Pool(pool) = &mut self.backend {
            pool.shutdown();
        }
    }
}

impl<M: rkyv::Archive, A, R> Drop for Invoker<M, A, R> {
    fn drop(&mut self) {
        self.stop();
    }
}

// One per `map`, held where the caller holds the map: boxing the large
// variant would cost an allocation per map, a lone task's included.
#[allow(clippy::large_enum_variant)]
enum MapInner<'a, M, A, R, I>
where
    M: rkyv::Archive,
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    InProcess {
        store: &'a ModelStore<M>,
        func: TaskFn<M, A, R>,
        input: I,
        next_index: u64,
        root_seed: u64,
        fail_fast: bool,
        stopped: bool,
    },
    Pool(Run<'a, I, A, R>),
}

impl<M, A, R, I> MapInner<'_, M, A, R, I>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
    I: Iterator<Item = A>,
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    fn next_result(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        match self {
            MapInner::Pool(run) => run.next_result(),
            MapInner::InProcess {
                store,
                func,
                input,
                next_index,
                root_seed,
                fail_fast,
                stopped,
            } => {
                if *stopped {
                    return None;
                }
                let arg = input.next()?;
                let index = *next_index;
                *next_index += 1;
                let result = run_in_process(store, *func, arg, index, *root_seed);
                *stopped = *fail_fast && result.is_err();
                Some((index, result))
            }
        }
    }
}

/// Runs one task here, through the same encode → run → decode path a worker
/// uses, so results and errors are those of a pool.
fn run_in_process<M, A, R>(
    store: &ModelStore<M>,
    func: TaskFn<M, A, R>,
    arg: A,
    index: u64,
    root_seed: u64,
) -> Result<R, TaskError>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    // A pool could not send what this refuses either, so errors do not
    // depend on n_jobs.
    let mut items = Vec::new();
    if let Err(failure) = crate::pool::encode_argument(arg, &mut items, &mut true) {
        return Err(TaskError::from_failure(index, failure));
    }
    let mut out = Vec::new();
    let batch = BatchView {
        first_index: index,
        root_seed,
        count: 1,
        items: &items,
    };
    // SAFETY: `run_batch` is instantiated with the types of `func`, and the
    // store's archive was validated as `M::Archived` and is immutable.
    unsafe {
        task::run_batch::<M::Archived, A, R>(func as usize, store.archive_bytes(), batch, &mut out)
    };
    let mut outcomes = &out[..];
    match procpool_worker::protocol::split_item(&mut outcomes) {
        Some(item) => task::capturing(|| crate::pool::decode_outcome(index, item)),
        None => Err(TaskError::bad_result(index, "malformed results")),
    }
}

/// The iterator of [`Invoker::map`]: one `Result` per argument, in order.
/// Dropping it early waits for the few batches already sent, then stops.
pub struct Map<'a, M, A, R, I>
where
    M: rkyv::Archive,
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    inner: MapInner<'a, M, A, R, I>,
}

impl<M, A, R, I> Iterator for Map<'_, M, A, R, I>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
    I: Iterator<Item = A>,
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    type Item = Result<R, TaskError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next_result().map(|(_, r)| r)
    }
}

/// The iterator of [`Invoker::map_unordered`]: `(input index, result)` pairs
/// in completion order.
pub struct MapUnordered<'a, M, A, R, I>
where
    M: rkyv::Archive,
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    inner: MapInner<'a, M, A, R, I>,
}

impl<M, A, R, I> Iterator for MapUnordered<'_, M, A, R, I>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
    I: Iterator<Item = A>,
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    type Item = (usize, Result<R, TaskError>);

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next_result().map(|(i, r)| (i as usize, r))
    }
}
