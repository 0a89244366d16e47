//! The invoker: a model, a function, and the processes that apply one to
//! the other over a stream of arguments.

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::worker::jobs::{self, BatchRunner};

use crate::engine::JobSpec;

use crate::error::PoolError;
use crate::map::{Executor, MapOptions, executor_accessors, map_methods, map_options};
use crate::store::{ArchivedModel, ModelStore};

/// The function an invoker applies: a plain `fn` (or a closure that captures
/// nothing) taking the archived model and one argument.
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model {
///     weights: Vec<f32>,
/// }
/// fn score(model: &ArchivedModel, row: u32) -> f32 {
///     model.weights[row as usize].to_native() * 2.0
/// }
/// let func: procpool::TaskFn<Model, u32, f32> = score;
/// # let _ = func;
/// ```
pub type TaskFn<M, A, R> = fn(&<M as rkyv::Archive>::Archived, A) -> R;

/// Creates an invoker that applies `func` to `store`'s model and each
/// argument, in `n_jobs` worker processes (`n_jobs = 1`: in this process).
///
/// Use [`InvokerBuilder`] for the start method, the batch size or the seed.
///
/// ```
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
/// ```
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
    options: MapOptions,
}

impl<M: rkyv::Archive, A, R> std::fmt::Debug for InvokerBuilder<M, A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvokerBuilder")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<M, A, R> InvokerBuilder<M, A, R>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    /// Starts a configuration for `func` over `store`'s model.
    ///
    /// ```
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Model {
    ///     weights: Vec<f32>,
    /// }
    /// fn score(model: &ArchivedModel, row: u32) -> f32 {
    ///     model.weights[row as usize].to_native() * 2.0
    /// }
    /// let store = procpool::persist(&Model { weights: vec![1.0, 2.0] })?;
    /// let builder = procpool::InvokerBuilder::new(&store, score).n_jobs(2);
    /// # let _ = builder;
    /// # Ok::<(), procpool::StoreError>(())
    /// ```
    pub fn new(store: &ModelStore<M>, func: TaskFn<M, A, R>) -> Self {
        InvokerBuilder {
            store: store.clone(),
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
    /// 16,777,216 (2^24) tasks, `PROCPOOL_SEED` or
    /// `PROCPOOL_NUM_PROCS` is malformed, or the workers cannot be started.
    ///
    /// ```
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Model {
    ///     weights: Vec<f32>,
    /// }
    /// fn score(model: &ArchivedModel, row: u32) -> f32 {
    ///     model.weights[row as usize].to_native() * 2.0
    /// }
    /// let store = procpool::persist(&Model { weights: vec![1.0, 2.0] })?;
    /// let mut invoker = procpool::InvokerBuilder::new(&store, score).n_jobs(2).build()?;
    /// assert_eq!(invoker.worker_pids().len(), 2);
    /// let scores: Vec<f32> = invoker.map(0..2u32).map(Result::unwrap).collect();
    /// assert_eq!(scores, [2.0, 4.0]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn build(self) -> Result<Invoker<M, A, R>, PoolError> {
        let runner = jobs::map_with_model::<M::Archived, A, R> as BatchRunner;
        let job = JobSpec::map(runner, self.func as usize);
        // SAFETY: `map_with_model` is instantiated with the types of the
        // job's function, and the store's archive was validated as
        // `M::Archived` and is immutable.
        let executor = unsafe { Executor::start(self.options, job, Some(self.store.untyped())) }?;
        Ok(Invoker {
            executor,
            _model: std::marker::PhantomData,
        })
    }
}

/// Applies a function to a shared model over streams of arguments. Made by
/// [`invoker`] or [`InvokerBuilder`]; reusable for any number of maps; stops
/// its workers on [`shutdown`](Invoker::shutdown) or drop.
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Model {
///     weights: Vec<f32>,
/// }
/// fn score(model: &ArchivedModel, row: u32) -> f32 {
///     model.weights[row as usize].to_native() * 2.0
/// }
/// let store = procpool::persist(&Model { weights: vec![1.0, 2.0, 3.0] })?;
/// let mut invoker = procpool::invoker(&store, score, 2)?;
/// // Reusable: each map starts where the workers are.
/// assert_eq!(invoker.map([0u32]).next().unwrap()?, 2.0);
/// let mut done: Vec<(usize, f32)> =
///     invoker.map_unordered([1u32, 2]).map(|(i, r)| (i, r.unwrap())).collect();
/// done.sort_by_key(|&(i, _)| i);
/// assert_eq!(done, [(0, 4.0), (1, 6.0)]);
/// invoker.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Invoker<M: rkyv::Archive, A, R> {
    executor: Executor<A, R>,
    _model: std::marker::PhantomData<fn() -> M>,
}

impl<M: rkyv::Archive, A, R> std::fmt::Debug for Invoker<M, A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invoker")
            .field("n_jobs", &self.executor.n_jobs())
            .field("root_seed", &self.executor.root_seed())
            .finish()
    }
}

impl<M, A, R> Invoker<M, A, R>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + 'static,
{
    map_methods!();
}

impl<M: rkyv::Archive, A, R> Invoker<M, A, R> {
    executor_accessors!();
}
