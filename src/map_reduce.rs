//! Map-reduce, as pyrallel's `MapReduce`: the mapper and the reducer both
//! run in the workers, each worker folds the results of the batches it
//! runs, and only one partial result per batch travels back; this process
//! combines the partials.

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::wire::{JobKind, split_item};
use procpool_worker::worker::jobs::{self, BatchRunner, JobFns};
use procpool_worker::worker::task::{capturing, catch};

use crate::engine::{Feed, JobSpec, Sink, decode_outcome};
use crate::error::{PoolError, TaskError};
use crate::map::{Executor, MapOptions, executor_accessors, map_options};
use crate::progress::{ProgressFn, Tracker};

/// Creates a map-reduce of `mapper` and `reducer` over `n_jobs` worker
/// processes (`n_jobs = 1`: in this process).
///
/// The reducer must be **associative and commutative**: results are folded
/// in whatever order batches complete, first inside each worker, then in
/// this process, not in input order.
///
/// ```
/// fn identity(x: u64) -> u64 {
///     x
/// }
/// fn add(a: u64, b: u64) -> u64 {
///     a + b
/// }
/// let mut sum = procpool::map_reduce(identity, add, 2)?;
/// assert_eq!(sum.run(0..10_000u64)?, Some(49_995_000));
/// assert_eq!(sum.run(0..0u64)?, None); // empty input: no result, no error
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// Fails if `n_jobs` is 0 or the workers cannot be started.
pub fn map_reduce<A, R>(
    mapper: fn(A) -> R,
    reducer: fn(R, R) -> R,
    n_jobs: usize,
) -> Result<MapReduce<A, R>, PoolError>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    MapReduceBuilder::new(mapper, reducer)
        .n_jobs(n_jobs)
        .build()
}

/// Configures a [`MapReduce`].
///
/// ```
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// fn add(a: u64, b: u64) -> u64 {
///     a + b
/// }
/// let mut sum = procpool::MapReduceBuilder::new(square, add)
///     .n_jobs(2)
///     .chunk_size(1_000)
///     .build()?;
/// assert_eq!(sum.run(1..=10u64)?, Some(385));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct MapReduceBuilder<A, R> {
    mapper: fn(A) -> R,
    reducer: fn(R, R) -> R,
    options: MapOptions,
}

impl<A, R> std::fmt::Debug for MapReduceBuilder<A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapReduceBuilder")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<A, R> MapReduceBuilder<A, R>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// Starts a configuration for `mapper` and `reducer` (associative and
    /// commutative).
    ///
    /// ```
    /// fn len(s: String) -> usize {
    ///     s.len()
    /// }
    /// fn max(a: usize, b: usize) -> usize {
    ///     a.max(b)
    /// }
    /// let builder = procpool::MapReduceBuilder::new(len, max);
    /// # let _ = builder;
    /// ```
    pub fn new(mapper: fn(A) -> R, reducer: fn(R, R) -> R) -> Self {
        MapReduceBuilder {
            mapper,
            reducer,
            options: MapOptions::default(),
        }
    }

    map_options!();

    /// Starts the workers.
    ///
    /// ```
    /// fn id(x: u8) -> u8 {
    ///     x
    /// }
    /// fn max(a: u8, b: u8) -> u8 {
    ///     a.max(b)
    /// }
    /// let mut largest = procpool::MapReduceBuilder::new(id, max).n_jobs(2).build()?;
    /// assert_eq!(largest.run([3u8, 9, 4])?, Some(9));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Fails if `n_jobs` or `chunk_size` is 0, `chunk_size` is over
    /// 16,777,216 (2^24) tasks, `PROCPOOL_SEED` or `PROCPOOL_NUM_PROCS` is
    /// malformed, or the workers cannot be started.
    pub fn build(self) -> Result<MapReduce<A, R>, PoolError> {
        let job = JobSpec {
            kind: JobKind::MapReduce,
            runner: jobs::map_reduce::<A, R> as BatchRunner,
            fns: JobFns {
                task: self.mapper as usize,
                helper: self.reducer as usize,
            },
        };
        let progress = self.options.progress.clone();
        // SAFETY: `map_reduce` is instantiated with the types of the mapper
        // and the reducer, which take no model.
        let executor = unsafe { Executor::start(self.options, job, None) }?;
        Ok(MapReduce {
            executor,
            reducer: self.reducer,
            progress,
        })
    }
}

/// A mapper and a reducer over worker processes. Made by [`map_reduce`] or
/// [`MapReduceBuilder`]; reusable for any number of runs; stops its workers
/// on [`shutdown`](MapReduce::shutdown) or drop.
///
/// A panic or a crash in the mapper or in the reducer ends the run with that
/// task's [`TaskError`] (the one with the lowest index, whatever `n_jobs`):
/// the input is read no further, and the batches already sent finish.
///
/// ```
/// fn parse(s: String) -> u32 {
///     s.parse().expect("a number")
/// }
/// fn add(a: u32, b: u32) -> u32 {
///     a + b
/// }
/// let mut sum = procpool::map_reduce(parse, add, 2)?;
/// assert_eq!(sum.run(["1", "2", "3"].map(String::from))?, Some(6));
/// let err = sum.run(["1", "two", "3"].map(String::from)).unwrap_err();
/// assert_eq!((err.task_index(), err.is_panic()), (1, true));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct MapReduce<A, R> {
    executor: Executor<A, R>,
    reducer: fn(R, R) -> R,
    progress: Option<ProgressFn>,
}

impl<A, R> std::fmt::Debug for MapReduce<A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapReduce")
            .field("n_jobs", &self.executor.n_jobs())
            .finish_non_exhaustive()
    }
}

impl<A, R> MapReduce<A, R>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// Maps every item and reduces the results: `Some` of the reduction,
    /// or `None` for empty input. The input is read lazily.
    ///
    /// ```
    /// fn one(_: u64) -> u64 {
    ///     1
    /// }
    /// fn add(a: u64, b: u64) -> u64 {
    ///     a + b
    /// }
    /// let mut count = procpool::map_reduce(one, add, 2)?;
    /// assert_eq!(count.run(0..100_000u64)?, Some(100_000));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The first failed task's error (lowest index): a panic or a crash in
    /// the mapper or the reducer, or an item that could not be sent.
    pub fn run<I>(&mut self, items: I) -> Result<Option<R>, TaskError>
    where
        I: IntoIterator<Item = A>,
    {
        let mut feed = Feed::new(items.into_iter(), 0);
        let mut reduction = Reduction {
            reducer: self.reducer,
            total: None,
            error: None,
            tracker: Tracker::new(self.progress.clone()),
        };
        let job = self.executor.job();
        let limits = self.executor.batch_limits();
        let root_seed = self.executor.root_seed();
        match self.executor.engine() {
            None => loop {
                let batch = feed.next_batch(limits);
                if let Some((index, failure)) = feed.take_failed() {
                    reduction.fail(TaskError::from_failure(index, failure));
                }
                let Some(batch) = batch.filter(|_| reduction.error.is_none()) else {
                    break;
                };
                reduction.tracker.submitted(u64::from(batch.count()));
                // SAFETY: the job's runner was instantiated for `A` and `R`,
                // and a map-reduce has no model.
                let out =
                    unsafe { crate::map::run_batch_here(job, &mut None, &[], &batch, root_seed) };
                reduction.outcomes(batch.first_index(), batch.count(), &out);
            },
            Some(mut engine) => loop {
                // Batches to run again go out even after a failure: they may
                // hold a task with a lower index. New input stops.
                while engine.wants_batch() && reduction.error.is_none() {
                    let batch = feed.next_batch(engine.batch_limits());
                    if let Some((index, failure)) = feed.take_failed() {
                        reduction.fail(TaskError::from_failure(index, failure));
                    }
                    match batch {
                        Some(batch) => {
                            reduction.tracker.submitted(u64::from(batch.count()));
                            engine.submit(batch)
                        }
                        None => break,
                    }
                }
                if !engine.in_flight() {
                    let done = feed.is_done() || reduction.error.is_some();
                    if done && !engine.has_queued() {
                        break;
                    }
                    if !engine.has_workers() {
                        let index = engine.take_queued().map_or(0, |b| b.first_index());
                        reduction.fail(TaskError::pool(
                            index,
                            "no worker is running and none could be started",
                        ));
                        break;
                    }
                    continue;
                }
                engine.wait(&mut reduction);
            },
        }
        reduction.tracker.finish();
        match reduction.error {
            Some(error) => Err(error),
            None => Ok(reduction.total),
        }
    }
}

impl<A, R> MapReduce<A, R> {
    executor_accessors!();
}

/// Where a map-reduce's outcomes go: the reduction so far, and the first
/// failure.
struct Reduction<R> {
    reducer: fn(R, R) -> R,
    total: Option<R>,
    error: Option<TaskError>,
    tracker: Tracker,
}

impl<R> Reduction<R> {
    /// Keeps the failure of the lowest task index.
    fn fail(&mut self, error: TaskError) {
        if self
            .error
            .as_ref()
            .is_none_or(|kept| error.task_index() < kept.task_index())
        {
            self.error = Some(error);
        }
    }
}

impl<R: DeserializeOwned> Sink for Reduction<R> {
    fn outcomes(&mut self, first_index: u64, count: u32, mut items: &[u8]) {
        capturing(|| {
            for i in 0..u64::from(count) {
                let index = first_index + i;
                let outcome = match split_item(&mut items) {
                    Some(item) => decode_outcome::<()>(index, item),
                    None => Err(TaskError::bad_result(index, "malformed results")),
                };
                self.tracker.finished(outcome.is_ok());
                if let Err(error) = outcome {
                    self.fail(error);
                }
            }
            self.tracker.tick();
            let partial = match split_item(&mut items) {
                Some(item) => decode_outcome::<Option<R>>(first_index, item),
                None => Err(TaskError::bad_result(
                    first_index,
                    "malformed results: no partial",
                )),
            };
            match partial {
                // A task's own failure names it; a failed fold adds nothing.
                Err(error) if self.error.is_none() => self.fail(error),
                Err(_) | Ok(None) => {}
                Ok(Some(partial)) => {
                    let reducer = self.reducer;
                    self.total = match self.total.take() {
                        None => Some(partial),
                        Some(total) => match catch(|| reducer(total, partial)) {
                            Ok(sum) => Some(sum),
                            Err(failure) => {
                                self.fail(TaskError::from_failure(first_index, failure));
                                None
                            }
                        },
                    };
                }
            }
        });
    }

    fn failed(&mut self, _index: u64, error: TaskError) {
        self.tracker.finished(false);
        self.tracker.tick();
        self.fail(error);
    }
}
