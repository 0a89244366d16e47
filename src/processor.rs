//! A processor with a collector, as pyrallel's `ParallelProcessor`: a
//! producer adds tasks one by one, workers map them, and a collector in this
//! process receives each result as it completes.

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::wire::split_item;
use procpool_worker::worker::jobs::{self, BatchRunner, JobState};
use procpool_worker::worker::task::{capturing, catch};

use std::marker::PhantomData;

use crate::engine::{Backlog, Batch, JobSpec, Sink, decode_outcome};
use crate::error::{PoolError, TaskError};
use crate::invoker::TaskFn;
use crate::map::{Executor, MapOptions, executor_accessors, map_options};
use crate::progress::Tracker;
use crate::store::{ArchivedModel, ModelStore, UntypedStore};

/// What a processor did: tasks collected with a value, and with an error.
///
/// ```
/// let summary = procpool::Summary { done: 9, failed: 1 };
/// assert_eq!(summary.done + summary.failed, 10);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Tasks whose result the collector received.
    pub done: u64,
    /// Tasks whose error the collector received.
    pub failed: u64,
}

/// Creates a processor that maps each task added with `mapper` in `n_jobs`
/// worker processes (`n_jobs = 1`: in this process) and hands each result,
/// with its task's index, to `collector`, here, as tasks complete.
///
/// ```
/// // The seed's example: the mapper returns (x * x, y + 5), the collector
/// // keeps the larger.
/// fn heavy_calculation((x, y): (u64, u64)) -> (u64, u64) {
///     (x * x, y + 5)
/// }
/// let mut result = Vec::new();
/// let mut pp = procpool::processor(heavy_calculation, 2, |_, r: Result<(u64, u64), _>| {
///     let (r1, r2) = r.unwrap();
///     result.push(r1.max(r2));
/// })?;
/// for i in 0..8 {
///     pp.add_task((i, i + 1))?;
/// }
/// let summary = pp.join()?;
/// assert_eq!(summary.done, 8);
/// result.sort();
/// assert_eq!(result, [6, 7, 8, 9, 16, 25, 36, 49]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// Fails if `n_jobs` is 0 or the workers cannot be started.
pub fn processor<A, R, C>(
    mapper: fn(A) -> R,
    n_jobs: usize,
    collector: C,
) -> Result<Processor<A, R, C>, PoolError>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
    C: FnMut(u64, Result<R, TaskError>),
{
    ProcessorBuilder::new(mapper)
        .n_jobs(n_jobs)
        .build(collector)
}

/// Configures a [`Processor`].
///
/// ```
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
/// let mut sum = 0;
/// let mut pp = procpool::ProcessorBuilder::new(double)
///     .n_jobs(2)
///     .chunk_size(100)
///     .build(|_, r: Result<u32, _>| sum += r.unwrap())?;
/// for x in 0..1_000 {
///     pp.add_task(x)?;
/// }
/// pp.join()?;
/// assert_eq!(sum, 999_000);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ProcessorBuilder<A, R> {
    /// What the workers run: a map, or a stateful stage per worker.
    job: JobSpec,
    /// The model the mapper reads, if it takes one.
    model: Option<UntypedStore>,
    options: MapOptions,
    _types: PhantomData<fn(A) -> R>,
}

impl<A, R> std::fmt::Debug for ProcessorBuilder<A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorBuilder")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<A, R> ProcessorBuilder<A, R>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// Starts a configuration for `mapper`.
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// let builder = procpool::ProcessorBuilder::new(double).n_jobs(2);
    /// # let _ = builder;
    /// ```
    pub fn new(mapper: fn(A) -> R) -> Self {
        ProcessorBuilder {
            job: JobSpec::map(jobs::map::<A, R> as BatchRunner, mapper as usize),
            model: None,
            options: MapOptions::default(),
            _types: PhantomData,
        }
    }

    /// A mapper over a shared model, as an invoker's: `mapper` reads
    /// `store`'s model in place in every worker.
    ///
    /// ```
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Model {
    ///     weights: Vec<f32>,
    /// }
    /// fn score(model: &ArchivedModel, row: u32) -> f32 {
    ///     model.weights[row as usize].to_native() * 10.0
    /// }
    /// let store = procpool::persist(&Model { weights: vec![0.5, 1.5] })?;
    /// let mut total = 0.0;
    /// let mut pp = procpool::ProcessorBuilder::with_model(&store, score)
    ///     .n_jobs(2)
    ///     .build(|_, r: Result<f32, _>| total += r.unwrap())?;
    /// pp.add_task(0)?;
    /// pp.add_task(1)?;
    /// pp.join()?;
    /// assert_eq!(total, 20.0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_model<M>(store: &ModelStore<M>, mapper: TaskFn<M, A, R>) -> Self
    where
        M: rkyv::Archive<Archived: ArchivedModel>,
    {
        ProcessorBuilder {
            job: JobSpec::map(
                jobs::map_with_model::<M::Archived, A, R> as BatchRunner,
                mapper as usize,
            ),
            model: Some(store.untyped()),
            options: MapOptions::default(),
            _types: PhantomData,
        }
    }

    /// A mapper with per-worker state, as pyrallel's `Mapper` with its
    /// `enter()`: `init` runs once in each worker (and once here for
    /// `n_jobs = 1`) before its first task, for example to open one file or
    /// connection per worker ([`worker_id`](crate::worker_id) tells which
    /// worker it is); then `step` runs on every task that worker gets, with
    /// the state. The state never leaves its process, so it need not be
    /// serialisable. Its `Drop` is the teardown (pyrallel's `exit()`): it
    /// runs when the worker is stopped by [`join`](Processor::join) (or
    /// here, for `n_jobs = 1`). A worker that dies, or that dropping the
    /// processor kills, takes its state with it unfinished; a replacement
    /// runs `init` again.
    ///
    /// ```
    /// fn open() -> Vec<u64> {
    ///     Vec::new() // a connection, a file, a cache…
    /// }
    /// fn remember(seen: &mut Vec<u64>, x: u64) -> usize {
    ///     seen.push(x);
    ///     seen.len() // how many this worker has seen
    /// }
    /// let mut most = 0;
    /// let mut pp = procpool::ProcessorBuilder::with_state(open, remember)
    ///     .n_jobs(2)
    ///     .build(|_, r: Result<usize, _>| most = most.max(r.unwrap()))?;
    /// for x in 0..100 {
    ///     pp.add_task(x)?;
    /// }
    /// pp.join()?;
    /// assert!(most >= 50); // one of the two workers saw at least half
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_state<S: 'static>(init: fn() -> S, step: fn(&mut S, A) -> R) -> Self {
        ProcessorBuilder {
            job: JobSpec {
                kind: procpool_worker::wire::JobKind::Stateful,
                runner: jobs::stateful::<S, A, R> as BatchRunner,
                fns: procpool_worker::worker::jobs::JobFns {
                    task: step as usize,
                    helper: init as usize,
                },
            },
            model: None,
            options: MapOptions::default(),
            _types: PhantomData,
        }
    }

    map_options!();

    /// Starts the workers, with `collector` to receive each task's index
    /// and result as it completes.
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// let pp = procpool::ProcessorBuilder::new(double).build(|_, _| {})?;
    /// assert_eq!(pp.join()?, procpool::Summary::default());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`PoolBuilder::build`](crate::PoolBuilder::build).
    pub fn build<C>(self, collector: C) -> Result<Processor<A, R, C>, PoolError>
    where
        C: FnMut(u64, Result<R, TaskError>),
    {
        let fail_fast = self.options.fail_fast;
        let progress = self.options.progress.clone();
        let job = self.job;
        // SAFETY: each constructor of this builder pairs its runner with
        // the functions, `A`, `R` and (for `with_model`) the store it was
        // given.
        let executor = unsafe { Executor::start(self.options, job, self.model) }?;
        Ok(Processor {
            executor,
            backlog: Some(Backlog::default()),
            collected: Collected {
                collector,
                summary: Summary::default(),
                stopped: None,
                fail_fast,
                tracker: Tracker::new(progress),
                _result: PhantomData,
            },
            pending: None,
            next_index: 0,
            large: true,
            local_state: None,
        })
    }
}

/// A mapper over worker processes fed one task at a time, with a collector
/// here. Made by [`processor`] or [`ProcessorBuilder`].
///
/// [`add_task`](Processor::add_task) blocks while the workers have as much
/// work as they may hold (a few batches each), collecting results in the
/// meantime: backpressure, with no spinning and no unbounded queue. A
/// panic or a crash in the mapper is that task's error, handed to the
/// collector; a panic in the collector stops the processor, and `add_task`
/// and [`join`](Processor::join) then return its error. Dropping the
/// processor without `join` stops the tasks still running and the workers.
pub struct Processor<A, R, C> {
    executor: Executor<A, R>,
    /// The engine's work in progress between calls.
    backlog: Option<Backlog>,
    collected: Collected<R, C>,
    /// Tasks added and not yet sent.
    pending: Option<Batch>,
    next_index: u64,
    /// Whether the next argument is expected to be large (see `begin_item`).
    large: bool,
    /// A stage's state when it runs in this process (`n_jobs = 1`).
    local_state: JobState,
}

impl<A, R, C> std::fmt::Debug for Processor<A, R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("n_jobs", &self.executor.n_jobs())
            .field("added", &self.next_index)
            .field("summary", &self.collected.summary)
            .finish_non_exhaustive()
    }
}

impl<A, R, C> Processor<A, R, C>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
    C: FnMut(u64, Result<R, TaskError>),
{
    /// Adds a task; returns its index. Blocks while the workers are full,
    /// collecting results meanwhile.
    ///
    /// ```
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// let mut pp = procpool::processor(square, 2, |_, _| {})?;
    /// assert_eq!(pp.add_task(3)?, 0);
    /// assert_eq!(pp.add_task(4)?, 1);
    /// pp.join()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The error that stopped the processor: a panic in the collector, or,
    /// with `fail_fast`, the first failed task.
    pub fn add_task(&mut self, arg: A) -> Result<u64, TaskError> {
        if let Some(error) = &self.collected.stopped {
            return Err(error.clone());
        }
        let index = self.next_index;
        self.next_index += 1;
        self.collected.tracker.submitted(1);
        let Some(backlog) = self.backlog.take() else {
            return Err(TaskError::pool(index, "the processor has stopped"));
        };
        let (max_count, max_bytes) = self.executor.batch_limits();
        let job = self.executor.job();
        let root_seed = self.executor.root_seed();
        if self.executor.n_jobs() == 1 {
            // n_jobs = 1: run it now, here, as a worker would.
            self.backlog = Some(Backlog::default());
            let mut batch = Batch::new(index);
            match batch.push_argument(arg, &mut true) {
                Ok(()) => {
                    // SAFETY: the job's runner was instantiated for its
                    // functions' types and `A` (see `build`); `local_state`
                    // is this job's alone; the archive is the validated,
                    // immutable model the mapper was given with, or nothing
                    // for one without.
                    let out = unsafe {
                        crate::map::run_batch_here(
                            job,
                            &mut self.local_state,
                            self.executor.archive(),
                            &batch,
                            root_seed,
                        )
                    };
                    self.collected.outcomes(index, 1, &out);
                }
                Err(failure) => self
                    .collected
                    .deliver(index, Err(TaskError::from_failure(index, failure))),
            }
            return self.status(index);
        }
        let Some(mut engine) = self.executor.resume(backlog) else {
            return Err(TaskError::pool(index, "the processor has no workers"));
        };
        let batch = self.pending.get_or_insert_with(|| Batch::new(index));
        match batch.push_argument(arg, &mut self.large) {
            Ok(()) => {}
            Err(failure) => {
                // It fails alone; the batch goes on without it, so the
                // tasks after it start a batch of their own.
                let unsent = self.pending.take().filter(|b| b.count() > 0);
                if let Some(unsent) = unsent {
                    self.pending = Some(unsent);
                    send_pending(&mut engine, &mut self.pending, &mut self.collected);
                }
                self.collected
                    .deliver(index, Err(TaskError::from_failure(index, failure)));
                self.backlog = Some(engine.suspend());
                return self.status(index);
            }
        }
        let full = batch.count() as usize >= max_count || batch.encoded_len() >= max_bytes;
        // A batch goes out when full, or at once when the workers are idle,
        // so a slow producer's tasks do not wait for company.
        if full || !engine.in_flight() {
            send_pending(&mut engine, &mut self.pending, &mut self.collected);
        }
        if self.collected.stopped.is_some() {
            engine.cancel();
        }
        self.backlog = Some(engine.suspend());
        self.status(index)
    }

    fn status(&self, index: u64) -> Result<u64, TaskError> {
        match &self.collected.stopped {
            Some(error) => Err(error.clone()),
            None => Ok(index),
        }
    }

    /// Sends what is pending, waits until every task added has been
    /// collected, stops the workers, and says how it went.
    ///
    /// ```
    /// fn fail_on_2(x: u8) -> u8 {
    ///     assert_ne!(x, 2);
    ///     x
    /// }
    /// let mut errors = Vec::new();
    /// let mut pp = procpool::processor(fail_on_2, 2, |i, r: Result<u8, _>| {
    ///     if r.is_err() {
    ///         errors.push(i);
    ///     }
    /// })?;
    /// for x in 0..5 {
    ///     pp.add_task(x)?;
    /// }
    /// assert_eq!(pp.join()?, procpool::Summary { done: 4, failed: 1 });
    /// assert_eq!(errors, [2]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The error that stopped the processor: a panic in the collector, or,
    /// with `fail_fast`, the first failed task.
    pub fn join(mut self) -> Result<Summary, TaskError> {
        if let Some(backlog) = self.backlog.take()
            && let Some(mut engine) = self.executor.resume(backlog)
        {
            send_pending(&mut engine, &mut self.pending, &mut self.collected);
            while self.collected.stopped.is_none() && (engine.in_flight() || engine.has_queued()) {
                if !engine.in_flight() {
                    // Queued work and idle workers: send it.
                    if !engine.has_workers() {
                        break;
                    }
                    engine.wants_batch();
                    continue;
                }
                engine.wait(&mut self.collected);
            }
            if self.collected.stopped.is_some() {
                engine.cancel();
            }
        }
        self.executor.stop();
        // A stage run here: its state's `Drop` is its teardown, user code
        // like any other, so its panic is an error, not an unwinding.
        if let Some(state) = self.local_state.take()
            && let Err(failure) = capturing(|| catch(move || drop(state)))
            && self.collected.stopped.is_none()
        {
            let last = self.next_index.saturating_sub(1);
            self.collected.stopped = Some(TaskError::from_failure(last, failure));
        }
        self.collected.tracker.finish();
        match self.collected.stopped.take() {
            Some(error) => Err(error),
            None => Ok(self.collected.summary),
        }
    }
}

impl<A, R, C> Processor<A, R, C> {
    executor_accessors!();
}

impl<A, R, C> Drop for Processor<A, R, C> {
    fn drop(&mut self) {
        // Work still running belongs to nobody now: stop it rather than
        // wait for it.
        if let Some(backlog) = self.backlog.take()
            && let Some(mut engine) = self.executor.resume(backlog)
        {
            engine.cancel();
        }
    }
}

/// Sends the pending batch, waiting (and collecting) until a worker takes
/// it.
fn send_pending<C>(
    engine: &mut crate::engine::Engine<'_>,
    pending: &mut Option<Batch>,
    collected: &mut C,
) where
    C: Sink + Stopped,
{
    let Some(batch) = pending.take() else {
        return;
    };
    while !engine.wants_batch() && !collected.is_stopped() {
        if !engine.in_flight() && !engine.has_workers() {
            break;
        }
        engine.wait(collected);
    }
    engine.submit(batch);
}

/// Whether the collector (or fail-fast) has stopped the processor.
trait Stopped {
    fn is_stopped(&self) -> bool;
}

/// The collector, and what it has been given.
struct Collected<R, C> {
    collector: C,
    summary: Summary,
    /// The error that stopped the processor.
    stopped: Option<TaskError>,
    fail_fast: bool,
    tracker: Tracker,
    _result: PhantomData<fn(R)>,
}

impl<R, C> Stopped for Collected<R, C> {
    fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }
}

impl<R, C> Collected<R, C>
where
    C: FnMut(u64, Result<R, TaskError>),
{
    /// Hands one result to the collector, under `catch_unwind`.
    fn deliver(&mut self, index: u64, result: Result<R, TaskError>) {
        if self.stopped.is_some() {
            return;
        }
        let failed = result.as_ref().err().cloned();
        self.tracker.finished(failed.is_none());
        let collector = &mut self.collector;
        match capturing(|| catch(|| collector(index, result))) {
            Ok(()) => {}
            Err(failure) => {
                self.stopped = Some(TaskError::from_failure(index, failure));
                return;
            }
        }
        match failed {
            None => self.summary.done += 1,
            Some(error) => {
                self.summary.failed += 1;
                if self.fail_fast {
                    self.stopped = Some(error);
                }
            }
        }
    }
}

impl<R, C> Sink for Collected<R, C>
where
    R: DeserializeOwned,
    C: FnMut(u64, Result<R, TaskError>),
{
    fn outcomes(&mut self, first_index: u64, count: u32, mut items: &[u8]) {
        for i in 0..u64::from(count) {
            let index = first_index + i;
            let result = match split_item(&mut items) {
                Some(item) => capturing(|| decode_outcome::<R>(index, item)),
                None => Err(TaskError::bad_result(index, "malformed results")),
            };
            self.deliver(index, result);
        }
        self.tracker.tick();
    }

    fn failed(&mut self, index: u64, error: TaskError) {
        self.deliver(index, Err(error));
        self.tracker.tick();
    }
}
