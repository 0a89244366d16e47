//! Pipelines: typed stages ([`Pipeline`]), one stage as it runs
//! (`stage`), the process runner (`threads`) and the sequential one
//! (`sequential`).

mod output;
mod sequential;
mod stage;
mod threads;

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::wire::{TaskFailure, begin_item, encode_into, end_item};
use procpool_worker::worker::jobs::{self, BatchRunner, JobFns};
use procpool_worker::worker::task::{BatchView, capturing, catch, run_items};

use crate::engine::{JobSpec, Policy, PoolSpec, Workers};
use crate::error::{PipelineError, PoolError, StageKind};
use crate::invoker::TaskFn;
use crate::launch::StartMethod;
use crate::store::{ArchivedModel, ModelStore, UntypedStore};

pub use sequential::SequentialOutput;
pub use threads::Output;

use stage::{Here, InParentFn, PostFn};

/// Tasks a stage may have in flight unless [`Pipeline::in_flight`] says
/// otherwise.
pub const DEFAULT_IN_FLIGHT: usize = 16_384;

/// Starts a pipeline whose input items are `A`s; add stages, then
/// [`apply`](Pipeline::apply) it to the input.
///
/// ```
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
/// let out: Vec<u32> = procpool::pipeline().map(double).apply(1..4u32).map(Result::unwrap).collect();
/// assert_eq!(out, [2, 4, 6]);
/// ```
pub fn pipeline<A>() -> Pipeline<A, A> {
    Pipeline {
        plan: Plan::default(),
        _types: PhantomData,
    }
}

/// A sequence of stages from `A`s to `B`s, not yet running, as blllib's
/// `Pipeline`: each item of the input goes through every stage in turn,
/// and the output comes out lazily, in input order.
///
/// Stages, each added by a method:
///
/// | method | runs | blllib |
/// |---|---|---|
/// | [`map`](Pipeline::map), [`map_with_model`](Pipeline::map_with_model) | `f(item)` on a pool of workers | stateless |
/// | [`stateful`](Pipeline::stateful) | `init()` once, then `step(&mut state, item)` on every item in order, in one dedicated process | stateful |
/// | [`windowed`](Pipeline::windowed) | `f(&window)` on each run of `k` consecutive items (stride 1), on a pool | conditionally stateless |
/// | [`chunked`](Pipeline::chunked) | `f(&chunk)` on each `k` items, the last chunk shorter, on a pool | — |
/// | [`in_parent`](Pipeline::in_parent) | a closure, in this process | `run_in_master` |
/// | [`flatten`](Pipeline::flatten) | the previous stage's `Option` or `Vec` outputs as items: to drop or expand items | — |
///
/// A stage never drops an item on its own: every input item reaches the
/// next stage, whatever the bounds. Stages run at once, each a bounded
/// number of tasks ahead ([`in_flight`](Pipeline::in_flight)); items move
/// between them in chunks, and between two process stages they are passed
/// on encoded, never decoded in this process.
///
/// The seed's example (blllib's README), across processes:
///
/// ```
/// fn start() -> i64 {
///     0
/// }
/// fn accumulate(acc: &mut i64, x: i64) -> i64 {
///     *acc += x;
///     *acc
/// }
/// fn difference2(window: &[i64]) -> i64 {
///     window[2] - window[0]
/// }
/// fn negate(x: i64) -> i64 {
///     -x
/// }
/// let out: Vec<i64> = procpool::pipeline()
///     .stateful(start, accumulate)   // 0 1 3 6 10 15
///     .windowed(3, difference2)      // 3 5 7 9
///     .map(negate)                   // -3 -5 -7 -9
///     .apply(0..6i64)
///     .collect::<Result<_, _>>()?;
/// assert_eq!(out, [-3, -5, -7, -9]);
/// # Ok::<(), procpool::PipelineError>(())
/// ```
///
/// It is used once: [`apply`](Pipeline::apply) and
/// [`apply_sequential`](Pipeline::apply_sequential) consume it (blllib's
/// rule, here checked by the compiler). Start one with [`pipeline`].
pub struct Pipeline<A, B> {
    plan: Plan,
    _types: PhantomData<fn(A) -> B>,
}

impl<A, B> std::fmt::Debug for Pipeline<A, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<StageKind> = self.plan.stages.iter().map(|s| s.kind).collect();
        f.debug_struct("Pipeline")
            .field("stages", &kinds)
            .field("n_cpu", &self.plan.n_cpu)
            .finish_non_exhaustive()
    }
}

/// The stages and settings of a pipeline, with its types erased.
#[derive(Default)]
struct Plan {
    stages: Vec<StagePlan>,
    n_cpu: Option<usize>,
    seed: Option<u64>,
    start_method: StartMethod,
    /// Longest a task of a process stage may run.
    task_timeout: Option<std::time::Duration>,
    /// Address-space limit of each worker of a process stage.
    memory_limit: Option<u64>,
    progress: Option<crate::progress::ProgressFn>,
    /// A setting that made no sense, reported when the pipeline runs.
    misuse: Option<String>,
}

/// One stage, before it runs.
struct StagePlan {
    kind: StageKind,
    work: Work,
    post: Vec<PostFn>,
    n_jobs: Option<usize>,
    in_flight: usize,
}

/// What a stage runs.
enum Work {
    /// A job for worker processes.
    Job {
        job: JobSpec,
        model: Option<UntypedStore>,
    },
    /// A closure for this process.
    Closure(Box<dyn InParentFn>),
}

impl Work {
    fn into_here(self) -> Here {
        match self {
            Work::Job { job, model } => Here::Job {
                job,
                model,
                state: None,
            },
            Work::Closure(closure) => Here::Closure(closure),
        }
    }
}

/// A plan's settings once checked.
struct Checked {
    root_seed: u64,
    /// Worker processes of each stage (0 for one run here).
    n_jobs: Vec<usize>,
}

impl Plan {
    fn first_kind(&self) -> StageKind {
        self.stages.first().map_or(StageKind::InParent, |s| s.kind)
    }

    fn last_stage(&self) -> (usize, StageKind) {
        let last = self.stages.len().saturating_sub(1);
        (
            last,
            self.stages.last().map_or(StageKind::InParent, |s| s.kind),
        )
    }

    /// Checks the settings, and shares the CPU budget among the parallel
    /// stages.
    fn check(&self) -> Result<Checked, PipelineError> {
        let refused = |position: usize, message: String| {
            let kind = self
                .stages
                .get(position)
                .map_or(StageKind::InParent, |s| s.kind);
            PipelineError::start(position, kind, PoolError::refused(message))
        };
        if let Some(message) = &self.misuse {
            return Err(refused(
                self.stages.len().saturating_sub(1),
                message.clone(),
            ));
        }
        if self.stages.is_empty() {
            return Err(refused(0, "a pipeline needs at least one stage".into()));
        }
        if self.task_timeout == Some(std::time::Duration::ZERO) {
            return Err(refused(0, "task_timeout must be longer than zero".into()));
        }
        let n_cpu = match self.n_cpu {
            Some(0) => return Err(refused(0, "n_cpu must be at least 1".into())),
            Some(n) => n,
            None => crate::config::proc_count(1, None, 0)
                .map_err(|e| PipelineError::start(0, self.first_kind(), e.into()))?,
        };
        let parallel = self
            .stages
            .iter()
            .filter(|s| s.is_parallel())
            .count()
            .max(1);
        let share = (n_cpu / parallel).max(1);
        let mut n_jobs = Vec::with_capacity(self.stages.len());
        for (position, stage) in self.stages.iter().enumerate() {
            match stage.kind {
                StageKind::Windowed(0) | StageKind::Chunked(0) => {
                    return Err(refused(
                        position,
                        format!("{} needs k of at least 1", stage.kind),
                    ));
                }
                _ => {}
            }
            if stage.in_flight == 0 {
                return Err(refused(position, "in_flight must be at least 1".into()));
            }
            n_jobs.push(match (stage.kind, stage.n_jobs) {
                (_, Some(0)) => return Err(refused(position, "n_jobs must be at least 1".into())),
                (StageKind::InParent, Some(_)) => {
                    return Err(refused(
                        position,
                        "an in-parent stage runs in this process: it has no n_jobs".into(),
                    ));
                }
                (StageKind::Stateful, Some(n)) if n != 1 => {
                    return Err(refused(
                        position,
                        format!("a stateful stage runs in one process, not {n}"),
                    ));
                }
                (StageKind::InParent, None) => 0,
                (StageKind::Stateful, _) => 1,
                (_, Some(n)) => n,
                (_, None) => share,
            });
        }
        let root_seed = match self.seed {
            Some(seed) => seed,
            None => crate::seed::root_seed_from_env()
                .map_err(|e| PipelineError::start(0, self.first_kind(), e.into()))?,
        };
        Ok(Checked { root_seed, n_jobs })
    }
}

impl StagePlan {
    fn is_parallel(&self) -> bool {
        matches!(
            self.kind,
            StageKind::Stateless | StageKind::Windowed(_) | StageKind::Chunked(_)
        ) && self.n_jobs.is_none()
    }

    /// Starts the stage's `n_jobs` workers, or hands over the closure of a
    /// stage run here.
    fn start(self, n_jobs: usize, plan: &Plan) -> Result<Started, PoolError> {
        let (job, model) = match self.work {
            Work::Job { job, model } => (job, model),
            Work::Closure(closure) => return Ok(Started::Here(closure)),
        };
        let model_fd = match &model {
            Some(store) => Some(
                procpool_worker::sys::dup_owned(&store.fd())
                    .map_err(|e| PoolError::io("duplicate the model descriptor", e))?,
            ),
            None => None,
        };
        // A stateful stage's state dies with its process: its task is not
        // run again on a fresh state, and its process is not replaced.
        let stateful = self.kind == StageKind::Stateful;
        let policy = Policy {
            task_timeout: plan.task_timeout,
            memory_limit: plan.memory_limit,
            max_tries: if stateful { 1 } else { 2 },
            replace_dead: !stateful,
        };
        let spec = PoolSpec::new(plan.start_method, n_jobs, model_fd, job, policy);
        Ok(Started::Workers(Workers::start(spec)?))
    }
}

/// A stage ready to run: its workers, or its closure.
enum Started {
    Workers(Workers),
    Here(Box<dyn InParentFn>),
}

/// The root seed of the stage at `position`: each stage's tasks get seeds
/// of their own.
fn stage_seed(root_seed: u64, position: usize) -> u64 {
    procpool_worker::worker::task::task_seed(root_seed, u64::MAX - position as u64)
}

impl<A, B> Pipeline<A, B>
where
    A: Serialize,
    B: Serialize + DeserializeOwned + 'static,
{
    fn push<C>(mut self, kind: StageKind, work: Work) -> Pipeline<A, C> {
        self.plan.stages.push(StagePlan {
            kind,
            work,
            post: Vec::new(),
            n_jobs: None,
            in_flight: DEFAULT_IN_FLIGHT,
        });
        Pipeline {
            plan: self.plan,
            _types: PhantomData,
        }
    }

    /// A stateless stage: `f` on every item, on a pool of worker processes
    /// (its share of [`n_cpu`](Pipeline::n_cpu), or
    /// [`n_jobs`](Pipeline::n_jobs)), outputs in input order. A task whose
    /// worker crashes is run again once, alone, as in a pool.
    ///
    /// ```
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// let out: Vec<u64> = procpool::pipeline().map(square).apply(0..4u64).map(Result::unwrap).collect();
    /// assert_eq!(out, [0, 1, 4, 9]);
    /// ```
    pub fn map<C>(self, f: fn(B) -> C) -> Pipeline<A, C>
    where
        C: Serialize + DeserializeOwned + 'static,
    {
        let job = JobSpec::map(jobs::map::<B, C> as BatchRunner, f as usize);
        self.push(StageKind::Stateless, Work::Job { job, model: None })
    }

    /// A stateless stage over a shared model: `f` reads `store`'s model in
    /// place in every worker, as an [`invoker`](crate::invoker)'s function.
    ///
    /// ```
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Model {
    ///     offset: u32,
    /// }
    /// fn shift(model: &ArchivedModel, x: u32) -> u32 {
    ///     x + model.offset.to_native()
    /// }
    /// let store = procpool::persist(&Model { offset: 10 })?;
    /// let out: Vec<u32> = procpool::pipeline()
    ///     .map_with_model(&store, shift)
    ///     .apply(0..3u32)
    ///     .collect::<Result<_, _>>()?;
    /// assert_eq!(out, [10, 11, 12]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn map_with_model<M, C>(self, store: &ModelStore<M>, f: TaskFn<M, B, C>) -> Pipeline<A, C>
    where
        M: rkyv::Archive<Archived: ArchivedModel>,
        C: Serialize + DeserializeOwned + 'static,
    {
        let runner = jobs::map_with_model::<M::Archived, B, C> as BatchRunner;
        let job = JobSpec::map(runner, f as usize);
        let model = Some(store.untyped());
        self.push(StageKind::Stateless, Work::Job { job, model })
    }

    /// A stateful stage: `init` runs once, in a process of the stage's
    /// own; then `step` runs on every item, in input order, with the state.
    /// The state never leaves that process, so it need not be serialisable;
    /// its `Drop` runs when the input ends (every output is out by then: a
    /// panic in it is printed to stderr, not an error). If the process dies, the state
    /// is lost and the output ends with that error (the item is not run
    /// again on a fresh state).
    ///
    /// ```
    /// fn start() -> u64 {
    ///     0
    /// }
    /// fn accumulate(sum: &mut u64, x: u64) -> u64 {
    ///     *sum += x;
    ///     *sum
    /// }
    /// let out: Vec<u64> = procpool::pipeline().stateful(start, accumulate)
    ///     .apply(1..=4u64).map(Result::unwrap).collect();
    /// assert_eq!(out, [1, 3, 6, 10]);
    /// ```
    pub fn stateful<S, C>(self, init: fn() -> S, step: fn(&mut S, B) -> C) -> Pipeline<A, C>
    where
        S: 'static,
        C: Serialize + DeserializeOwned + 'static,
    {
        let job = JobSpec {
            kind: procpool_worker::wire::JobKind::Stateful,
            runner: jobs::stateful::<S, B, C> as BatchRunner,
            fns: JobFns {
                task: step as usize,
                helper: init as usize,
            },
        };
        self.push(StageKind::Stateful, Work::Job { job, model: None })
    }

    /// A windowed stage (blllib's "conditionally stateless"): `f` on every
    /// run of `k` consecutive items, sliding by one, on a pool: items
    /// `0..k`, then `1..k + 1`, and so on. `n` items give `n - k + 1`
    /// windows; fewer than `k` items give none.
    ///
    /// ```
    /// fn difference2(w: &[i32]) -> i32 {
    ///     w[2] - w[0]
    /// }
    /// let out: Vec<i32> = procpool::pipeline().windowed(3, difference2)
    ///     .apply([1, 4, 9, 16, 25, 36]).map(Result::unwrap).collect();
    /// assert_eq!(out, [8, 12, 16, 20]);
    /// ```
    pub fn windowed<C>(self, k: usize, f: fn(&[B]) -> C) -> Pipeline<A, C>
    where
        C: Serialize + DeserializeOwned + 'static,
    {
        let job = JobSpec::map(jobs::map_slices::<B, C> as BatchRunner, f as usize);
        self.push(StageKind::Windowed(k), Work::Job { job, model: None })
    }

    /// A chunked stage: `f` on every `k` items in turn (tumbling, not
    /// sliding), on a pool; the last chunk holds what is left, between 1
    /// and `k` items.
    ///
    /// ```
    /// fn len(chunk: &[u8]) -> usize {
    ///     chunk.len()
    /// }
    /// let out: Vec<usize> = procpool::pipeline().chunked(4, len)
    ///     .apply(0..10u8).map(Result::unwrap).collect();
    /// assert_eq!(out, [4, 4, 2]);
    /// ```
    pub fn chunked<C>(self, k: usize, f: fn(&[B]) -> C) -> Pipeline<A, C>
    where
        C: Serialize + DeserializeOwned + 'static,
    {
        let job = JobSpec::map(jobs::map_slices::<B, C> as BatchRunner, f as usize);
        self.push(StageKind::Chunked(k), Work::Job { job, model: None })
    }

    /// An in-parent stage (blllib's `run_in_master`): `f` on every item, in
    /// order, in this process (on a thread of the pipeline's own), so it
    /// may hold what cannot cross a process boundary: a connection, a
    /// progress bar. A panic in it ends the output with that error.
    ///
    /// ```
    /// let mut seen = 0;
    /// let out: Vec<(u32, u32)> = procpool::pipeline()
    ///     .in_parent(move |x: u32| {
    ///         seen += 1;
    ///         (x, seen)
    ///     })
    ///     .apply(10..13u32)
    ///     .map(Result::unwrap)
    ///     .collect();
    /// assert_eq!(out, [(10, 1), (11, 2), (12, 3)]);
    /// ```
    pub fn in_parent<C, F>(self, f: F) -> Pipeline<A, C>
    where
        C: Serialize + DeserializeOwned + 'static,
        F: FnMut(B) -> C + Send + 'static,
    {
        let closure = Box::new(Closure {
            f,
            _types: PhantomData::<fn(B) -> C>,
        });
        self.push(StageKind::InParent, Work::Closure(closure))
    }

    /// Worker processes for the last stage added, instead of its share of
    /// [`n_cpu`](Pipeline::n_cpu). A stateful stage has one; an in-parent
    /// stage none.
    ///
    /// ```
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// let out = procpool::pipeline().map(square).n_jobs(3).apply(0..100u64);
    /// assert_eq!(out.worker_pids().len(), 3);
    /// ```
    pub fn n_jobs(mut self, n_jobs: usize) -> Self {
        match self.plan.stages.last_mut() {
            Some(stage) => stage.n_jobs = Some(n_jobs),
            None => self.misuse("n_jobs set before any stage"),
        }
        self
    }

    /// How many tasks the last stage added may have in flight: started and
    /// not yet passed on to the next stage (blllib's `batch_size`; default
    /// [`DEFAULT_IN_FLIGHT`]). A later task waits for the earliest one to
    /// be passed on. A task is one item, or one window or chunk. The bound
    /// never drops an item: it only holds the input back.
    ///
    /// ```
    /// fn start() -> u64 {
    ///     0
    /// }
    /// fn accumulate(sum: &mut u64, x: u64) -> u64 {
    ///     *sum += x;
    ///     *sum
    /// }
    /// let out: Vec<u64> = procpool::pipeline().stateful(start, accumulate).in_flight(1)
    ///     .apply(0..20u64).map(Result::unwrap).collect();
    /// assert_eq!(out.len(), 20);
    /// assert_eq!(out[19], 190);
    /// ```
    pub fn in_flight(mut self, tasks: usize) -> Self {
        match self.plan.stages.last_mut() {
            Some(stage) => stage.in_flight = tasks,
            None => self.misuse("in_flight set before any stage"),
        }
        self
    }

    /// The CPU budget of the parallel stages (stateless, windowed,
    /// chunked) that do not set [`n_jobs`](Pipeline::n_jobs): each gets
    /// `max(1, n_cpu / their number)` workers. Stateful stages get one
    /// process each and in-parent stages run here, outside the budget.
    /// Default: the CPUs this process may use
    /// ([`proc_count(1, None, 0)`](crate::proc_count)).
    ///
    /// ```
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// fn add(w: &[u64]) -> u64 {
    ///     w.iter().sum()
    /// }
    /// let out = procpool::pipeline().map(square).windowed(2, add).n_cpu(4).apply(0..10u64);
    /// assert_eq!(out.worker_pids().len(), 4); // two each
    /// ```
    pub fn n_cpu(mut self, n_cpu: usize) -> Self {
        self.plan.n_cpu = Some(n_cpu);
        self
    }

    /// The root seed every stage's task seeds derive from (see
    /// [`seed`](crate::seed())). Default: `PROCPOOL_SEED`, else random.
    ///
    /// ```
    /// fn roll(_: u32) -> Option<u64> {
    ///     procpool::seed() // this task's seed
    /// }
    /// let a: Vec<_> = procpool::pipeline().map(roll).seed(7).apply(0..3u32).map(Result::unwrap).collect();
    /// let b: Vec<_> = procpool::pipeline().map(roll).seed(7).apply_sequential(0..3u32).map(Result::unwrap).collect();
    /// assert_eq!(a, b);
    /// assert!(a.iter().all(Option::is_some));
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.plan.seed = Some(seed);
        self
    }

    /// How the stages' workers are started. Default:
    /// [`StartMethod::ForkServer`].
    ///
    /// ```
    /// # fn square(x: u64) -> u64 { x * x }
    /// let pipeline = procpool::pipeline().map(square).start_method(procpool::StartMethod::Spawn);
    /// # let _ = pipeline;
    /// ```
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.plan.start_method = method;
        self
    }

    /// Stops a worker whose task runs longer than `limit` (SIGTERM, then
    /// SIGKILL half a second later); the output ends with that task's
    /// error, [`is_timeout`](PipelineError::is_timeout). Process stages
    /// only; `apply_sequential` and in-parent stages do not time out.
    ///
    /// ```
    /// fn nap(ms: u64) -> u64 {
    ///     std::thread::sleep(std::time::Duration::from_millis(ms));
    ///     ms
    /// }
    /// let out: Vec<_> = procpool::pipeline()
    ///     .map(nap)
    ///     .task_timeout(std::time::Duration::from_millis(500))
    ///     .apply([1, 5_000])
    ///     .collect();
    /// assert_eq!(out.len(), 2);
    /// assert!(out[1].as_ref().unwrap_err().is_timeout());
    /// ```
    pub fn task_timeout(mut self, limit: std::time::Duration) -> Self {
        self.plan.task_timeout = Some(limit);
        self
    }

    /// Limits each worker of a process stage to `bytes` of address space
    /// (`RLIMIT_AS`); a task whose allocation fails under it ends the
    /// output with [`is_out_of_memory`](PipelineError::is_out_of_memory).
    ///
    /// ```
    /// fn hog(mib: usize) -> usize {
    ///     vec![1u8; mib << 20].len()
    /// }
    /// let out: Vec<_> = procpool::pipeline()
    ///     .map(hog)
    ///     .memory_limit(1 << 30)
    ///     .apply([1, 4_096])
    ///     .collect();
    /// assert!(out[1].as_ref().unwrap_err().is_out_of_memory());
    /// ```
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.plan.memory_limit = Some(bytes);
        self
    }

    /// Calls `report` with the [`Progress`](crate::Progress) of the run
    /// from the caller's thread as outputs are taken, at most ten times a
    /// second and once at the end: `submitted` counts the input items read,
    /// `done` the outputs taken (more than the input when a stage expands
    /// items), `failed` the error that ended the output.
    ///
    /// ```
    /// # fn square(x: u64) -> u64 { x * x }
    /// use std::sync::{Arc, Mutex};
    /// let last = Arc::new(Mutex::new(None));
    /// let seen = Arc::clone(&last);
    /// let n = procpool::pipeline()
    ///     .map(square)
    ///     .on_progress(move |p| *seen.lock().unwrap() = Some((p.submitted, p.done)))
    ///     .apply(0..100u64)
    ///     .count();
    /// assert_eq!(n, 100);
    /// assert_eq!(*last.lock().unwrap(), Some((100, 100)));
    /// ```
    pub fn on_progress(
        mut self,
        report: impl Fn(&crate::Progress) + Send + Sync + 'static,
    ) -> Self {
        self.plan.progress = Some(crate::progress::ProgressFn(std::sync::Arc::new(report)));
        self
    }

    fn misuse(&mut self, message: &str) {
        self.plan.misuse.get_or_insert_with(|| message.to_string());
    }

    /// Starts the stages and runs `input` through them: yields each output
    /// in input order, then, if a stage failed, its error (and nothing
    /// after). The input is read as the output is taken, a bounded number
    /// of items ahead. A stage that cannot start is the first (and only)
    /// item's error. Dropping the output early stops everything at once.
    ///
    /// ```
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// let mut out = procpool::pipeline().map(square).apply(0..);
    /// assert_eq!(out.next().unwrap()?, 0); // an endless input, read lazily
    /// assert_eq!(out.next().unwrap()?, 1);
    /// drop(out);
    /// # Ok::<(), procpool::PipelineError>(())
    /// ```
    pub fn apply<I>(self, input: I) -> Output<I::IntoIter, B>
    where
        I: IntoIterator<Item = A>,
    {
        Output::start(self.plan, input.into_iter())
    }

    /// Runs `input` through the stages in this process, one after the
    /// other (blllib's `SequentialPipeline`): the same outputs and errors
    /// as [`apply`](Pipeline::apply), for development and tests. Workers
    /// are not started; a crash takes this process with it.
    ///
    /// ```
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// fn start() -> u64 {
    ///     0
    /// }
    /// fn accumulate(sum: &mut u64, x: u64) -> u64 {
    ///     *sum += x;
    ///     *sum
    /// }
    /// let p = || procpool::pipeline().map(square).stateful(start, accumulate);
    /// let here: Vec<u64> = p().apply_sequential(0..100u64).map(Result::unwrap).collect();
    /// let there: Vec<u64> = p().apply(0..100u64).map(Result::unwrap).collect();
    /// assert_eq!(here, there);
    /// ```
    pub fn apply_sequential<I>(self, input: I) -> SequentialOutput<I::IntoIter, B>
    where
        I: IntoIterator<Item = A>,
    {
        SequentialOutput::new(self.plan, input.into_iter())
    }
}

impl<A, I> Pipeline<A, I>
where
    A: Serialize,
    I: IntoIterator + Serialize + DeserializeOwned + 'static,
    I::Item: Serialize + DeserializeOwned + 'static,
{
    /// Makes each output of the last stage, an `Option` or a `Vec` (any
    /// collection), into its items: `None` and empty collections drop
    /// their item, longer ones expand it. This is how a stage filters or
    /// expands, explicitly; it runs in this process, on the stage's own
    /// thread.
    ///
    /// ```
    /// fn even_halves(x: u32) -> Option<u32> {
    ///     (x % 2 == 0).then_some(x / 2)
    /// }
    /// fn twice(x: u32) -> Vec<u32> {
    ///     vec![x, x]
    /// }
    /// let out: Vec<u32> = procpool::pipeline()
    ///     .map(even_halves).flatten()
    ///     .map(twice).flatten()
    ///     .apply(0..6u32)
    ///     .map(Result::unwrap)
    ///     .collect();
    /// assert_eq!(out, [0, 0, 1, 1, 2, 2]);
    /// ```
    pub fn flatten(mut self) -> Pipeline<A, I::Item> {
        let post = flatten_value::<I> as PostFn;
        match self.plan.stages.last_mut() {
            Some(stage) => stage.post.push(post),
            None => {
                // Flattening the input itself: a stage that passes each
                // item on, then flattens it.
                let mut pipeline = self.in_parent(|item: I| item);
                if let Some(stage) = pipeline.plan.stages.last_mut() {
                    stage.post.push(post);
                }
                return Pipeline {
                    plan: pipeline.plan,
                    _types: PhantomData,
                };
            }
        }
        Pipeline {
            plan: self.plan,
            _types: PhantomData,
        }
    }
}

/// Decodes an `I` and appends each of its items, encoded and framed, to
/// `out`; returns how many. Its `Deserialize`, iteration and the items'
/// `Serialize` and `Drop` are user code: a panic is the item's failure.
fn flatten_value<I>(value: &[u8], out: &mut Vec<u8>) -> Result<u32, TaskFailure>
where
    I: IntoIterator + DeserializeOwned,
    I::Item: Serialize,
{
    let mark = out.len();
    let flattened = capturing(|| {
        catch(|| {
            let collection: I = postcard::from_bytes(value)
                .map_err(|e| TaskFailure::BadResult(format!("cannot decode result: {e}")))?;
            let mut count = 0u32;
            let mut large = false;
            for item in collection {
                let start = begin_item(out, large);
                encode_into(&item, out)
                    .map_err(|e| TaskFailure::BadResult(format!("cannot encode result: {e}")))?;
                large = end_item(out, start);
                count += 1;
            }
            Ok(count)
        })
    });
    let result = flattened.and_then(|r| r);
    if result.is_err() {
        out.truncate(mark);
    }
    result
}

/// An in-parent stage's closure, with its types.
struct Closure<F, B, C> {
    f: F,
    _types: PhantomData<fn(B) -> C>,
}

impl<F, B, C> InParentFn for Closure<F, B, C>
where
    F: FnMut(B) -> C + Send,
    B: DeserializeOwned,
    C: Serialize,
{
    fn run(&mut self, batch: BatchView<'_>, out: &mut Vec<u8>) {
        run_items(batch, out, &mut self.f);
    }
}
