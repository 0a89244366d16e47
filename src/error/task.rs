//! Why one task produced no value.

use std::fmt;

use procpool_worker::wire::{ExitInfo, TaskFailure};

/// Why one task of a `map` produced no value.
///
/// ```
/// fn report(err: &procpool::TaskError) {
///     if err.is_panic() {
///         eprintln!("task {} panicked: {}", err.task_index(), err);
///     } else if let Some(signal) = err.signal() {
///         eprintln!("task {} killed its worker with signal {signal}", err.task_index());
///     }
/// }
/// # let _ = report;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    index: u64,
    // Boxed: results of trivial tasks travel as `Result<R, TaskError>` by the
    // million, and a small error keeps them small.
    kind: Box<TaskErrorKind>,
}

/// How a worker died, as parts (see [`TaskError::death`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct DeathParts {
    pub(crate) worker_id: u32,
    pub(crate) pid: u32,
    /// How it ended, and the tail of its stderr.
    pub(crate) ended: Option<(ExitInfo, String)>,
    pub(crate) cause: Death,
}

/// Why a worker died while running a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Death {
    /// It crashed on its own (signal, abort, exit).
    Crash,
    /// We stopped it: the task ran past its time limit.
    Timeout(std::time::Duration),
    /// An allocation failed under its memory limit.
    OutOfMemory,
    /// This many workers died holding the task alone in the batch they were
    /// to run next, before it started.
    BeforeStart(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TaskErrorKind {
    /// The task ran and failed: a panic, or its argument or result could
    /// not cross the process boundary. As the worker reported it.
    Failed(TaskFailure),
    WorkerDied {
        worker_id: u32,
        pid: u32,
        exit: Option<ExitInfo>,
        stderr_tail: String,
        cause: Death,
    },
    Pool(String),
}

impl TaskError {
    pub(crate) fn from_failure(index: u64, failure: TaskFailure) -> TaskError {
        TaskError {
            index,
            kind: Box::new(TaskErrorKind::Failed(failure)),
        }
    }

    /// Task `index` failed with its worker `worker_id` (process `pid`),
    /// which ended as `ended` says (how, and the tail of its stderr), if
    /// known.
    /// The same error for a task `by` places further on (its index in a
    /// larger input).
    pub(crate) fn offset_index(mut self, by: u64) -> TaskError {
        self.index += by;
        self
    }

    pub(crate) fn worker_died(
        index: u64,
        worker_id: u32,
        pid: u32,
        ended: Option<(ExitInfo, String)>,
        cause: Death,
    ) -> TaskError {
        let (exit, stderr_tail) = match ended {
            Some((exit, tail)) => (Some(exit), tail),
            None => (None, String::new()),
        };
        // Rust's default allocation-error handler prints this, then aborts.
        let cause = match (cause, exit) {
            (
                Death::Crash,
                Some(ExitInfo::Signal {
                    signal: libc::SIGABRT,
                    ..
                }),
            ) if stderr_tail.contains("memory allocation of") => Death::OutOfMemory,
            (cause, _) => cause,
        };
        TaskError {
            index,
            kind: Box::new(TaskErrorKind::WorkerDied {
                worker_id,
                pid,
                exit,
                stderr_tail,
                cause,
            }),
        }
    }

    /// How its worker died, if it did, as parts that can cross to another
    /// process and become the same error there ([`TaskError::from_death`]).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn death(&self) -> Option<DeathParts> {
        match &*self.kind {
            TaskErrorKind::WorkerDied {
                worker_id,
                pid,
                exit,
                stderr_tail,
                cause,
            } => Some(DeathParts {
                worker_id: *worker_id,
                pid: *pid,
                ended: exit.map(|e| (e, stderr_tail.clone())),
                cause: *cause,
            }),
            _ => None,
        }
    }

    /// Task `index`'s error from the parts of a worker's death.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn from_death(index: u64, parts: DeathParts) -> TaskError {
        let DeathParts {
            worker_id,
            pid,
            ended,
            cause,
        } = parts;
        TaskError::worker_died(index, worker_id, pid, ended, cause)
    }

    pub(crate) fn pool(index: u64, message: impl Into<String>) -> TaskError {
        TaskError {
            index,
            kind: Box::new(TaskErrorKind::Pool(message.into())),
        }
    }

    pub(crate) fn bad_result(index: u64, message: impl Into<String>) -> TaskError {
        TaskError {
            index,
            kind: Box::new(TaskErrorKind::Failed(TaskFailure::BadResult(
                message.into(),
            ))),
        }
    }

    /// The index of the task in its `map` input (0-based).
    ///
    /// ```
    /// fn fail_on_2(x: u32) -> u32 {
    ///     assert_ne!(x, 2, "two");
    ///     x
    /// }
    /// let mut pool = procpool::pool(fail_on_2, 1)?;
    /// let err = pool.map(0..4u32).find_map(Result::err).unwrap();
    /// assert_eq!(err.task_index(), 2);
    /// # Ok::<(), procpool::PoolError>(())
    /// ```
    pub fn task_index(&self) -> u64 {
        self.index
    }

    /// True if the function panicked (and the worker lived on).
    ///
    /// ```
    /// fn explode(_: u8) -> u8 {
    ///     panic!("boom")
    /// }
    /// let err = procpool::run_sp(explode, 0).unwrap_err();
    /// assert!(err.is_panic() && !err.is_crash());
    /// ```
    pub fn is_panic(&self) -> bool {
        matches!(
            *self.kind,
            TaskErrorKind::Failed(TaskFailure::Panicked { .. })
        )
    }

    /// The panic message, if the function panicked.
    ///
    /// ```
    /// fn explode(n: u8) -> u8 {
    ///     panic!("boom {n}")
    /// }
    /// let err = procpool::run_sp(explode, 3).unwrap_err();
    /// assert_eq!(err.panic_message(), Some("boom 3"));
    /// ```
    pub fn panic_message(&self) -> Option<&str> {
        match &*self.kind {
            TaskErrorKind::Failed(TaskFailure::Panicked { message, .. }) => Some(message),
            _ => None,
        }
    }

    /// `file:line:column` of the panic, if the function panicked there.
    ///
    /// ```
    /// fn explode(_: u8) -> u8 {
    ///     panic!("boom")
    /// }
    /// let err = procpool::run_sp(explode, 0).unwrap_err();
    /// assert!(err.panic_location().is_some_and(|l| l.contains(".rs:")));
    /// ```
    pub fn panic_location(&self) -> Option<&str> {
        match &*self.kind {
            TaskErrorKind::Failed(TaskFailure::Panicked { location, .. }) => location.as_deref(),
            _ => None,
        }
    }

    /// True if the worker running the task died on its own: a signal
    /// (SIGSEGV, SIGABRT, SIGKILL from outside …), an exit, or running out
    /// of memory. A timeout is not a crash: see [`is_timeout`](Self::is_timeout).
    ///
    /// ```
    /// fn quit(code: i32) -> u8 {
    ///     std::process::exit(code)
    /// }
    /// let err = procpool::run_sp(quit, 3).unwrap_err();
    /// assert!(err.is_crash());
    /// assert_eq!(err.exit_code(), Some(3));
    /// assert_eq!(err.signal(), None);
    /// ```
    pub fn is_crash(&self) -> bool {
        matches!(
            *self.kind,
            TaskErrorKind::WorkerDied {
                cause: Death::Crash | Death::OutOfMemory | Death::BeforeStart(_),
                ..
            }
        )
    }

    /// True if the task ran past its time limit and its worker was stopped.
    ///
    /// ```
    /// use std::time::Duration;
    /// fn nap(ms: u64) -> u64 {
    ///     std::thread::sleep(Duration::from_millis(ms));
    ///     ms
    /// }
    /// let call = procpool::Isolated::new(nap).timeout(Duration::from_millis(100));
    /// assert!(call.run(10_000).unwrap_err().is_timeout());
    /// ```
    pub fn is_timeout(&self) -> bool {
        matches!(
            *self.kind,
            TaskErrorKind::WorkerDied {
                cause: Death::Timeout(_),
                ..
            }
        )
    }

    /// True if an allocation failed under the worker's memory limit.
    ///
    /// ```
    /// fn hoard(bytes: usize) -> usize {
    ///     let v: Vec<u8> = Vec::with_capacity(bytes);
    ///     std::hint::black_box(&v).capacity()
    /// }
    /// let call = procpool::Isolated::new(hoard).memory_limit(1 << 30);
    /// let err = call.run(8 << 30).unwrap_err();
    /// assert!(err.is_out_of_memory() && err.is_crash());
    /// ```
    pub fn is_out_of_memory(&self) -> bool {
        matches!(
            *self.kind,
            TaskErrorKind::WorkerDied {
                cause: Death::OutOfMemory,
                ..
            }
        )
    }

    /// The last lines the dead worker wrote to stderr, when known.
    ///
    /// ```
    /// fn confess(_: u8) -> u8 {
    ///     eprintln!("about to abort");
    ///     std::process::abort()
    /// }
    /// let err = procpool::run_sp(confess, 0).unwrap_err();
    /// assert!(err.stderr_tail().is_some_and(|t| t.contains("about to abort")));
    /// ```
    pub fn stderr_tail(&self) -> Option<&str> {
        match &*self.kind {
            TaskErrorKind::WorkerDied { stderr_tail, .. } if !stderr_tail.is_empty() => {
                Some(stderr_tail)
            }
            _ => None,
        }
    }

    /// The signal that killed the worker, if one did.
    ///
    /// ```
    /// fn abort(_: u8) -> u8 {
    ///     std::process::abort()
    /// }
    /// let err = procpool::run_sp(abort, 0).unwrap_err();
    /// assert_eq!(err.signal(), Some(6)); // SIGABRT
    /// ```
    pub fn signal(&self) -> Option<i32> {
        match *self.kind {
            TaskErrorKind::WorkerDied {
                exit: Some(ExitInfo::Signal { signal, .. }),
                ..
            } => Some(signal),
            _ => None,
        }
    }

    /// The exit code of the worker, if it exited while running the task.
    ///
    /// ```
    /// fn quit(code: i32) -> u8 {
    ///     std::process::exit(code)
    /// }
    /// assert_eq!(procpool::run_sp(quit, 9).unwrap_err().exit_code(), Some(9));
    /// ```
    pub fn exit_code(&self) -> Option<i32> {
        match *self.kind {
            TaskErrorKind::WorkerDied {
                exit: Some(ExitInfo::Code(code)),
                ..
            } => Some(code),
            _ => None,
        }
    }

    /// The process id of the worker that died, for a crash.
    ///
    /// ```
    /// fn abort(_: u8) -> u8 {
    ///     std::process::abort()
    /// }
    /// let err = procpool::run_sp(abort, 0).unwrap_err();
    /// assert!(err.worker_pid().is_some_and(|pid| pid != std::process::id()));
    /// ```
    pub fn worker_pid(&self) -> Option<u32> {
        match *self.kind {
            TaskErrorKind::WorkerDied { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// The pool's number for the worker that died, for a crash.
    ///
    /// ```
    /// fn abort_on_1(x: u8) -> u8 {
    ///     if x == 1 {
    ///         std::process::abort();
    ///     }
    ///     x
    /// }
    /// let mut pool = procpool::PoolBuilder::new(abort_on_1).n_jobs(2).max_tries(1).build()?;
    /// let err = pool.map(0..3u8).find_map(Result::err).unwrap();
    /// assert!(err.worker_id().is_some());
    /// # Ok::<(), procpool::PoolError>(())
    /// ```
    pub fn worker_id(&self) -> Option<u32> {
        match *self.kind {
            TaskErrorKind::WorkerDied { worker_id, .. } => Some(worker_id),
            _ => None,
        }
    }

    /// True if the argument or the result could not cross the process
    /// boundary: a serde error, or more than one message carries (2 GiB
    /// for an argument, or for the results of one batch).
    ///
    /// ```
    /// use serde::{Serialize, Serializer};
    /// struct Opaque;
    /// impl Serialize for Opaque {
    ///     fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
    ///         Err(serde::ser::Error::custom("opaque"))
    ///     }
    /// }
    /// # impl<'de> serde::Deserialize<'de> for Opaque {
    /// #     fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
    /// #         Ok(Opaque)
    /// #     }
    /// # }
    /// fn touch(_: Opaque) -> u8 {
    ///     0
    /// }
    /// let err = procpool::run_sp(touch, Opaque).unwrap_err();
    /// assert!(err.is_serialization());
    /// ```
    pub fn is_serialization(&self) -> bool {
        matches!(
            *self.kind,
            TaskErrorKind::Failed(TaskFailure::BadArgument(_) | TaskFailure::BadResult(_))
        )
    }
}

/// Describes how a process ended, as in `signal 11 (SIGSEGV)`.
pub(crate) fn describe_exit(exit: Option<ExitInfo>) -> String {
    match exit {
        Some(ExitInfo::Code(code)) => format!("exit code {code}"),
        Some(ExitInfo::Signal {
            signal,
            core_dumped,
        }) => {
            let name = signal_name(signal);
            let core = if core_dumped { ", core dumped" } else { "" };
            format!("signal {signal} ({name}{core})")
        }
        None => "an unknown status".to_string(),
    }
}

pub(crate) fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => "unknown signal",
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = self.index;
        match &*self.kind {
            TaskErrorKind::Failed(TaskFailure::Panicked {
                message,
                location: Some(loc),
            }) => write!(f, "task {i} panicked at {loc}: {message}"),
            TaskErrorKind::Failed(TaskFailure::Panicked {
                message,
                location: None,
            }) => write!(f, "task {i} panicked: {message}"),
            TaskErrorKind::Failed(TaskFailure::BadArgument(m) | TaskFailure::BadResult(m)) => {
                write!(f, "task {i}: {m}")
            }
            TaskErrorKind::WorkerDied {
                worker_id,
                pid,
                exit,
                cause,
                ..
            } => match cause {
                Death::Crash => {
                    write!(
                        f,
                        "task {i}: worker {worker_id} (pid {pid}) died with {}",
                        describe_exit(*exit)
                    )
                }
                Death::Timeout(limit) => write!(
                    f,
                    "task {i} timed out after {limit:?}: worker {worker_id} (pid {pid}) was stopped ({})",
                    describe_exit(*exit)
                ),
                Death::OutOfMemory => write!(
                    f,
                    "task {i} ran out of memory: an allocation failed in worker {worker_id} (pid {pid}), which died with {}",
                    describe_exit(*exit)
                ),
                Death::BeforeStart(deaths) => write!(
                    f,
                    "task {i}: {deaths} workers died holding it before it started, the last, worker {worker_id} (pid {pid}), with {}",
                    describe_exit(*exit)
                ),
            },
            TaskErrorKind::Pool(m) => write!(f, "task {i}: {m}"),
        }
    }
}

impl std::error::Error for TaskError {}
