//! A parallel fold over a swappable backend, as PyToolz's `fold`: the same
//! domain code runs sequentially, on threads or on worker processes by
//! changing the [`ParallelMap`] it is given.

use std::any::Any;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::wire::JobKind;
use procpool_worker::worker::jobs::{self, BatchRunner, JobFns};
use procpool_worker::worker::task::{capturing, catch};

use crate::engine::JobSpec;
use crate::error::TaskError;
use crate::map::{Executor, MapOptions};

/// A function that can run anywhere a [`ParallelMap`] runs it: in this
/// process, on a thread, or in a worker process (where it is named by its
/// place in this executable, as every procpool function is).
///
/// ```
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
/// let f = procpool::Mapper::new(double);
/// assert_eq!(f.call(21), 42);
/// ```
pub struct Mapper<A, R> {
    job: JobSpec,
    /// Runs the job's function here.
    local: fn(JobFns, A) -> R,
    _types: PhantomData<fn(A) -> R>,
}

impl<A, R> Clone for Mapper<A, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A, R> Copy for Mapper<A, R> {}

impl<A, R> std::fmt::Debug for Mapper<A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapper").finish_non_exhaustive()
    }
}

impl<A, R> Mapper<A, R>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// The function `f`.
    ///
    /// ```
    /// fn len(s: String) -> usize {
    ///     s.len()
    /// }
    /// assert_eq!(procpool::Mapper::new(len).call("four".into()), 4);
    /// ```
    pub fn new(f: fn(A) -> R) -> Self {
        fn call<A, R>(fns: JobFns, arg: A) -> R {
            // SAFETY: `Mapper::new` made `fns.task` from a `fn(A) -> R` of
            // these very types; the fields are private, so nothing else set
            // them.
            let f = unsafe { std::mem::transmute::<usize, fn(A) -> R>(fns.task) };
            f(arg)
        }
        Mapper {
            job: JobSpec::map(jobs::map::<A, R> as BatchRunner, f as usize),
            local: call::<A, R>,
            _types: PhantomData,
        }
    }

    /// What a worker runs for it.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn job(&self) -> JobSpec {
        self.job
    }

    /// Calls the function here.
    ///
    /// ```
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// assert_eq!(procpool::Mapper::new(square).call(12), 144);
    /// ```
    pub fn call(&self, arg: A) -> R {
        (self.local)(self.job.fns, arg)
    }
}

impl<T, R> Mapper<(R, Vec<T>), R>
where
    T: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// Folds a chunk with `binop`: the function of `(start, chunk)` that
    /// gives `chunk.into_iter().fold(start, binop)`.
    ///
    /// ```
    /// fn add(sum: u64, x: u64) -> u64 {
    ///     sum + x
    /// }
    /// let fold = procpool::Mapper::fold_chunks(add);
    /// assert_eq!(fold.call((100, vec![1, 2, 3])), 106);
    /// ```
    pub fn fold_chunks(binop: fn(R, T) -> R) -> Self {
        fn call<T, R>(fns: JobFns, (start, chunk): (R, Vec<T>)) -> R {
            // SAFETY: `Mapper::fold_chunks` made `fns.task` from a
            // `fn(R, T) -> R` of these very types (private fields).
            let binop = unsafe { std::mem::transmute::<usize, fn(R, T) -> R>(fns.task) };
            chunk.into_iter().fold(start, binop)
        }
        Mapper {
            job: JobSpec {
                kind: JobKind::Map,
                runner: jobs::fold_chunks::<T, R> as BatchRunner,
                fns: JobFns {
                    task: binop as usize,
                    helper: 0,
                },
            },
            local: call::<T, R>,
            _types: PhantomData,
        }
    }
}

/// A way to apply a [`Mapper`] to many arguments, in input order: toolz's
/// `map` argument. The same domain code moves from a sequential run to
/// threads to worker processes by changing the backend.
///
/// ```
/// use procpool::{Mapper, ParallelMap};
///
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// fn squares(backend: &mut impl ParallelMap) -> Vec<u64> {
///     backend.map(Mapper::new(square), vec![1, 2, 3]).unwrap()
/// }
/// assert_eq!(squares(&mut procpool::Sequential), [1, 4, 9]);
/// assert_eq!(squares(&mut procpool::Threads::new(2)), [1, 4, 9]);
/// assert_eq!(squares(&mut procpool::Processes::new(2)), [1, 4, 9]);
/// ```
pub trait ParallelMap {
    /// Applies `f` to every argument; the results in input order.
    ///
    /// # Errors
    ///
    /// The error of the first argument (in input order) whose task failed:
    /// a panic, a crash of a worker process, an argument or result that
    /// could not be sent, or workers that could not be started.
    fn map<A, R>(&mut self, f: Mapper<A, R>, args: Vec<A>) -> Result<Vec<R>, TaskError>
    where
        A: Serialize + DeserializeOwned + Send + 'static,
        R: Serialize + DeserializeOwned + Send + 'static;
}

/// Runs `f` on `arg` (task `index`) here, a panic becoming its error.
fn call_caught<A, R>(f: &Mapper<A, R>, arg: A, index: u64) -> Result<R, TaskError>
where
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    capturing(|| catch(|| f.call(arg))).map_err(|failure| TaskError::from_failure(index, failure))
}

/// Everything in this process, one argument after another.
///
/// ```
/// use procpool::{Mapper, ParallelMap};
/// fn inc(x: u8) -> u8 {
///     x + 1
/// }
/// assert_eq!(procpool::Sequential.map(Mapper::new(inc), vec![1, 2]).unwrap(), [2, 3]);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Sequential;

impl ParallelMap for Sequential {
    fn map<A, R>(&mut self, f: Mapper<A, R>, args: Vec<A>) -> Result<Vec<R>, TaskError>
    where
        A: Serialize + DeserializeOwned + Send + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        args.into_iter()
            .enumerate()
            .map(|(i, arg)| call_caught(&f, arg, i as u64))
            .collect()
    }
}

/// Threads of this process: the arguments are shared out among `n`
/// scoped threads, results kept in input order. A panic fails its task; a
/// crash ends the process, as in any thread.
///
/// ```
/// use procpool::{Mapper, ParallelMap};
/// fn inc(x: u8) -> u8 {
///     x + 1
/// }
/// let mut threads = procpool::Threads::new(4);
/// assert_eq!(threads.map(Mapper::new(inc), vec![1, 2, 3]).unwrap(), [2, 3, 4]);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Threads {
    n: usize,
}

impl Threads {
    /// `n` threads (at least 1).
    ///
    /// ```
    /// let threads = procpool::Threads::new(2);
    /// # let _ = threads;
    /// ```
    pub fn new(n: usize) -> Self {
        Threads { n: n.max(1) }
    }
}

impl ParallelMap for Threads {
    fn map<A, R>(&mut self, f: Mapper<A, R>, args: Vec<A>) -> Result<Vec<R>, TaskError>
    where
        A: Serialize + DeserializeOwned + Send + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let count = args.len();
        let per_thread = count.div_ceil(self.n).max(1);
        let mut parts: Vec<Vec<A>> = Vec::new();
        let mut rest = args.into_iter();
        loop {
            let part: Vec<A> = rest.by_ref().take(per_thread).collect();
            if part.is_empty() {
                break;
            }
            parts.push(part);
        }
        let outcomes: Vec<Vec<Result<R, TaskError>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .enumerate()
                .map(|(p, part)| {
                    scope.spawn(move || {
                        let first = (p * per_thread) as u64;
                        part.into_iter()
                            .enumerate()
                            .map(|(i, arg)| call_caught(&f, arg, first + i as u64))
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(p, h)| {
                    // Every task runs under catch_unwind: a thread ends by
                    // returning.
                    h.join().unwrap_or_else(|_| {
                        vec![Err(TaskError::pool(
                            (p * per_thread) as u64,
                            "a thread died",
                        ))]
                    })
                })
                .collect()
        });
        outcomes.into_iter().flatten().collect()
    }
}

/// Worker processes: a [`Pool`](crate::Pool) for each [`Mapper`] given,
/// started at its first use and kept while the same one comes back.
///
/// ```
/// use procpool::{Mapper, ParallelMap};
/// fn inc(x: u8) -> u8 {
///     x + 1
/// }
/// let mut processes = procpool::Processes::new(2);
/// assert_eq!(processes.map(Mapper::new(inc), vec![1, 2, 3]).unwrap(), [2, 3, 4]);
/// ```
pub struct Processes {
    options: MapOptions,
    /// The workers of the last mapper: its job, and its `Executor<A, R>`.
    current: Option<(JobSpec, Box<dyn Any>)>,
}

impl std::fmt::Debug for Processes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processes")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Processes {
    /// `n_jobs` worker processes (1: in this process, through the same
    /// encoding).
    ///
    /// ```
    /// let processes = procpool::Processes::new(2);
    /// # let _ = processes;
    /// ```
    pub fn new(n_jobs: usize) -> Self {
        Processes {
            options: MapOptions {
                n_jobs: Some(n_jobs),
                ..MapOptions::default()
            },
            current: None,
        }
    }
}

impl ParallelMap for Processes {
    fn map<A, R>(&mut self, f: Mapper<A, R>, args: Vec<A>) -> Result<Vec<R>, TaskError>
    where
        A: Serialize + DeserializeOwned + Send + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let same = self.current.as_ref().is_some_and(|(job, _)| {
            job.runner as usize == f.job.runner as usize && job.fns == f.job.fns
        });
        if !same {
            self.current = None;
            let job = f.job;
            // SAFETY: a `Mapper<A, R>`'s runner was instantiated for its
            // function's types, `A` and `R`, which take no model.
            let executor = unsafe { Executor::<A, R>::start(self.options.clone(), job, None) }
                .map_err(|e| TaskError::pool(0, format!("cannot start the workers: {e}")))?;
            self.current = Some((job, Box::new(executor)));
        }
        let Some(executor) = self
            .current
            .as_mut()
            .and_then(|(_, e)| e.downcast_mut::<Executor<A, R>>())
        else {
            return Err(TaskError::pool(0, "the workers run another function"));
        };
        crate::Map {
            inner: executor.map(args.into_iter(), true),
        }
        .collect()
    }
}

/// Folds `items` with `binop` in parallel on `backend`, as toolz's `fold`:
/// the input is read lazily, `chunk_size` items at a time; each chunk is
/// folded from `identity` (so `identity` is applied once per chunk, and
/// must be an identity of `binop`: `binop(identity, x) == x` in effect);
/// the chunks' results are combined with `combine` in input order. Empty
/// input gives `identity`.
///
/// ```
/// fn add(sum: u64, x: u64) -> u64 {
///     sum + x
/// }
/// let total = procpool::fold(&mut procpool::Processes::new(2), add, 1..=1_000_000u64, 0, 10_000, add)?;
/// assert_eq!(total, 500_000_500_000);
/// let none = procpool::fold(&mut procpool::Sequential, add, std::iter::empty(), 0, 7, add)?;
/// assert_eq!(none, 0);
/// # Ok::<(), procpool::TaskError>(())
/// ```
///
/// # Errors
///
/// `chunk_size` is 0, or a chunk's fold failed (its error names the chunk's
/// index), or `combine` panicked.
pub fn fold<B, T, R, I>(
    backend: &mut B,
    binop: fn(R, T) -> R,
    items: I,
    identity: R,
    chunk_size: usize,
    combine: fn(R, R) -> R,
) -> Result<R, TaskError>
where
    B: ParallelMap,
    I: IntoIterator<Item = T>,
    T: Serialize + DeserializeOwned + Send + 'static,
    R: Serialize + DeserializeOwned + Clone + Send + 'static,
{
    if chunk_size == 0 {
        return Err(TaskError::pool(0, "chunk_size must be at least 1"));
    }
    let folder = Mapper::fold_chunks(binop);
    // A window of chunks goes to the backend at once: enough to keep its
    // workers busy, never the whole input.
    const CHUNKS_PER_WINDOW: usize = 64;
    let mut items = items.into_iter();
    let mut total: Option<R> = None;
    let mut chunk_index = 0u64;
    loop {
        let mut window = Vec::with_capacity(CHUNKS_PER_WINDOW);
        while window.len() < CHUNKS_PER_WINDOW {
            let chunk: Vec<T> = items.by_ref().take(chunk_size).collect();
            if chunk.is_empty() {
                break;
            }
            window.push((identity.clone(), chunk));
        }
        if window.is_empty() {
            break;
        }
        let first = chunk_index;
        chunk_index += window.len() as u64;
        let results = backend
            .map(folder, window)
            .map_err(|e| e.offset_index(first))?;
        for result in results {
            total = Some(match total.take() {
                None => result,
                Some(sum) => capturing(|| catch(|| combine(sum, result)))
                    .map_err(|failure| TaskError::from_failure(first, failure))?,
            });
        }
    }
    Ok(total.unwrap_or(identity))
}
