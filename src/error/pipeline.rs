//! Why a pipeline's output ended early.

use std::fmt;

use super::{PoolError, TaskError};

/// What a pipeline stage is: how its items are run (see
/// [`Pipeline`](crate::Pipeline)'s stage methods).
///
/// ```
/// assert_eq!(procpool::StageKind::Windowed(3).to_string(), "windowed(3)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StageKind {
    /// A function of one item, on a pool of worker processes.
    Stateless,
    /// A function of its state and one item, in one dedicated process.
    Stateful,
    /// A function of each run of `k` consecutive items, on a pool.
    Windowed(usize),
    /// A function of each chunk of `k` items, on a pool.
    Chunked(usize),
    /// A closure run in this process.
    InParent,
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StageKind::Stateless => f.write_str("stateless"),
            StageKind::Stateful => f.write_str("stateful"),
            StageKind::Windowed(k) => write!(f, "windowed({k})"),
            StageKind::Chunked(k) => write!(f, "chunked({k})"),
            StageKind::InParent => f.write_str("in-parent"),
        }
    }
}

/// Why a pipeline's output ended before its input did: a stage failed on
/// an item (a panic, a crash, an item that could not cross a process
/// boundary), or the pipeline could not be started.
///
/// The output yields every item that comes before the failure, then this
/// error, then nothing.
///
/// ```
/// fn check(x: u32) -> u32 {
///     assert!(x != 3, "no threes");
///     x
/// }
/// let out: Vec<_> = procpool::pipeline().map(check).apply_sequential(0..10u32).collect();
/// assert_eq!(out.len(), 4); // 0, 1, 2, then the error
/// let err = out[3].as_ref().unwrap_err();
/// assert_eq!((err.stage(), err.item()), (0, Some(3)));
/// assert!(err.is_panic());
/// ```
#[derive(Debug, Clone)]
pub struct PipelineError {
    stage: usize,
    kind: StageKind,
    cause: Cause,
}

#[derive(Debug, Clone)]
enum Cause {
    Task { item: u64, error: TaskError },
    Start(std::sync::Arc<PoolError>),
}

impl PipelineError {
    pub(crate) fn task(stage: usize, kind: StageKind, item: u64, error: TaskError) -> Self {
        PipelineError {
            stage,
            kind,
            cause: Cause::Task { item, error },
        }
    }

    pub(crate) fn start(stage: usize, kind: StageKind, error: PoolError) -> Self {
        PipelineError {
            stage,
            kind,
            cause: Cause::Start(std::sync::Arc::new(error)),
        }
    }

    /// The position of the failed stage in the pipeline (0-based, in the
    /// order the stages were added).
    ///
    /// ```
    /// # fn check(x: u32) -> u32 { assert!(x != 3); x }
    /// # fn id(x: u32) -> u32 { x }
    /// let err = procpool::pipeline().map(id).map(check)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert_eq!(err.stage(), 1);
    /// ```
    pub fn stage(&self) -> usize {
        self.stage
    }

    /// What the failed stage is.
    ///
    /// ```
    /// # fn check(x: u32) -> u32 { assert!(x != 3); x }
    /// let err = procpool::pipeline().map(check)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert_eq!(err.stage_kind(), procpool::StageKind::Stateless);
    /// ```
    pub fn stage_kind(&self) -> StageKind {
        self.kind
    }

    /// The index, among the failed stage's input items, of the first item
    /// of the task that failed: the item itself for a stateless, stateful
    /// or in-parent stage, the first of the window or chunk for a windowed
    /// or chunked one. `None` if the stage could not be started.
    ///
    /// ```
    /// fn sum(chunk: &[u32]) -> u32 {
    ///     assert!(!chunk.contains(&7), "a seven");
    ///     chunk.iter().sum()
    /// }
    /// let err = procpool::pipeline().chunked(4, sum)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert_eq!(err.item(), Some(4)); // the chunk 4, 5, 6, 7
    /// ```
    pub fn item(&self) -> Option<u64> {
        match &self.cause {
            Cause::Task { item, .. } => Some(*item),
            Cause::Start(_) => None,
        }
    }

    /// The failed task's error, with its own predicates (its
    /// [`task_index`](TaskError::task_index) counts the stage's tasks).
    /// `None` if the stage could not be started.
    ///
    /// ```
    /// # fn check(x: u32) -> u32 { assert!(x != 3, "no threes"); x }
    /// let err = procpool::pipeline().map(check)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert_eq!(err.task_error().and_then(|e| e.panic_message()), Some("no threes"));
    /// ```
    pub fn task_error(&self) -> Option<&TaskError> {
        match &self.cause {
            Cause::Task { error, .. } => Some(error),
            Cause::Start(_) => None,
        }
    }

    /// The error that kept the stage's workers from starting, if that is
    /// what happened.
    ///
    /// ```
    /// # fn check(x: u32) -> u32 { assert!(x != 3); x }
    /// let err = procpool::pipeline().map(check)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert!(err.start_error().is_none());
    /// ```
    pub fn start_error(&self) -> Option<&PoolError> {
        match &self.cause {
            Cause::Start(error) => Some(error),
            Cause::Task { .. } => None,
        }
    }

    /// Whether user code panicked (see [`TaskError::is_panic`]).
    ///
    /// ```
    /// # fn check(x: u32) -> u32 { assert!(x != 3); x }
    /// let err = procpool::pipeline().map(check)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert!(err.is_panic() && !err.is_crash());
    /// ```
    pub fn is_panic(&self) -> bool {
        self.task_error().is_some_and(TaskError::is_panic)
    }

    /// Whether a worker process died running the task (see
    /// [`TaskError::is_crash`]); a stateful stage's state died with it.
    ///
    /// ```
    /// # fn check(x: u32) -> u32 { assert!(x != 3); x }
    /// let err = procpool::pipeline().map(check)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert!(!err.is_crash());
    /// ```
    pub fn is_crash(&self) -> bool {
        self.task_error().is_some_and(TaskError::is_crash)
    }

    /// Whether the task ran past the pipeline's `task_timeout` (see
    /// [`TaskError::is_timeout`]).
    ///
    /// ```
    /// # fn check(x: u32) -> u32 { assert!(x != 3); x }
    /// let err = procpool::pipeline().map(check)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert!(!err.is_timeout());
    /// ```
    pub fn is_timeout(&self) -> bool {
        self.task_error().is_some_and(TaskError::is_timeout)
    }

    /// Whether an allocation failed under the pipeline's `memory_limit`
    /// (see [`TaskError::is_out_of_memory`]).
    ///
    /// ```
    /// # fn check(x: u32) -> u32 { assert!(x != 3); x }
    /// let err = procpool::pipeline().map(check)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert!(!err.is_out_of_memory());
    /// ```
    pub fn is_out_of_memory(&self) -> bool {
        self.task_error().is_some_and(TaskError::is_out_of_memory)
    }

    /// The signal that killed the worker, if one did.
    ///
    /// ```
    /// # fn check(x: u32) -> u32 { assert!(x != 3); x }
    /// let err = procpool::pipeline().map(check)
    ///     .apply_sequential(0..10u32).find_map(Result::err).unwrap();
    /// assert_eq!(err.signal(), None);
    /// ```
    pub fn signal(&self) -> Option<i32> {
        self.task_error().and_then(TaskError::signal)
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (stage, kind) = (self.stage, self.kind);
        match &self.cause {
            Cause::Task { item, error } => {
                write!(f, "stage {stage} ({kind}) failed at item {item}: {error}")
            }
            Cause::Start(error) => write!(f, "stage {stage} ({kind}) could not start: {error}"),
        }
    }
}

impl std::error::Error for PipelineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Cause::Task { error, .. } => Some(error),
            Cause::Start(error) => Some(&**error),
        }
    }
}
