//! Error types, one per concern, each with predicates to branch on.

use procpool_worker::wire::TaskFailure;
use std::fmt;
use std::io;

use procpool_worker::store_format::FormatError;
pub use procpool_worker::wire::ExitInfo;

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

/// Why a worker died while running a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub fn task_index(&self) -> u64 {
        self.index
    }

    /// True if the function panicked (and the worker lived on).
    pub fn is_panic(&self) -> bool {
        matches!(
            *self.kind,
            TaskErrorKind::Failed(TaskFailure::Panicked { .. })
        )
    }

    /// The panic message, if the function panicked.
    pub fn panic_message(&self) -> Option<&str> {
        match &*self.kind {
            TaskErrorKind::Failed(TaskFailure::Panicked { message, .. }) => Some(message),
            _ => None,
        }
    }

    /// `file:line:column` of the panic, if the function panicked there.
    pub fn panic_location(&self) -> Option<&str> {
        match &*self.kind {
            TaskErrorKind::Failed(TaskFailure::Panicked { location, .. }) => location.as_deref(),
            _ => None,
        }
    }

    /// True if the worker running the task died on its own: a signal
    /// (SIGSEGV, SIGABRT, SIGKILL from outside …), an exit, or running out
    /// of memory. A timeout is not a crash: see [`is_timeout`](Self::is_timeout).
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
    pub fn stderr_tail(&self) -> Option<&str> {
        match &*self.kind {
            TaskErrorKind::WorkerDied { stderr_tail, .. } if !stderr_tail.is_empty() => {
                Some(stderr_tail)
            }
            _ => None,
        }
    }

    /// The signal that killed the worker, if one did.
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
    pub fn worker_pid(&self) -> Option<u32> {
        match *self.kind {
            TaskErrorKind::WorkerDied { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// The pool's number for the worker that died, for a crash.
    pub fn worker_id(&self) -> Option<u32> {
        match *self.kind {
            TaskErrorKind::WorkerDied { worker_id, .. } => Some(worker_id),
            _ => None,
        }
    }

    /// True if the argument or the result could not cross the process
    /// boundary: a serde error, or more than one message carries (2 GiB
    /// for an argument, or for the results of one batch).
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

/// Why a pool could not start, or stopped working.
#[derive(Debug)]
pub struct PoolError {
    kind: PoolErrorKind,
}

#[derive(Debug)]
enum PoolErrorKind {
    Io(&'static str, io::Error),
    Protocol(String),
    WorkerFatal(String),
    BuildMismatch,
    EntryNotRun,
    Config(ConfigError),
    Refused(String),
}

impl PoolError {
    pub(crate) fn io(what: &'static str, err: io::Error) -> PoolError {
        PoolError {
            kind: PoolErrorKind::Io(what, err),
        }
    }
    pub(crate) fn protocol(msg: impl Into<String>) -> PoolError {
        PoolError {
            kind: PoolErrorKind::Protocol(msg.into()),
        }
    }
    pub(crate) fn worker_fatal(msg: impl Into<String>) -> PoolError {
        PoolError {
            kind: PoolErrorKind::WorkerFatal(msg.into()),
        }
    }
    pub(crate) fn build_mismatch() -> PoolError {
        PoolError {
            kind: PoolErrorKind::BuildMismatch,
        }
    }
    pub(crate) fn entry_not_run() -> PoolError {
        PoolError {
            kind: PoolErrorKind::EntryNotRun,
        }
    }
    pub(crate) fn refused(msg: impl Into<String>) -> PoolError {
        PoolError {
            kind: PoolErrorKind::Refused(msg.into()),
        }
    }

    /// True if a system call failed (fork, socket, pipe …).
    pub fn is_io(&self) -> bool {
        matches!(self.kind, PoolErrorKind::Io(..))
    }

    /// True if a worker reported that it could not start (for example the
    /// model failed validation in it).
    pub fn is_worker_fatal(&self) -> bool {
        matches!(self.kind, PoolErrorKind::WorkerFatal(_))
    }

    /// True if a started process runs a different build than the parent.
    pub fn is_build_mismatch(&self) -> bool {
        matches!(self.kind, PoolErrorKind::BuildMismatch)
    }

    /// True if the request was refused as unsafe or invalid (for example
    /// `StartMethod::Fork` in a multi-threaded process).
    pub fn is_refused(&self) -> bool {
        matches!(
            self.kind,
            PoolErrorKind::Refused(_) | PoolErrorKind::Config(_)
        )
    }
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            PoolErrorKind::Io(what, e) => write!(f, "cannot {what}: {e}"),
            PoolErrorKind::Protocol(m) => write!(f, "worker protocol error: {m}"),
            PoolErrorKind::WorkerFatal(m) => write!(f, "worker failed to start: {m}"),
            PoolErrorKind::BuildMismatch => write!(
                f,
                "a started process runs a different build of this program"
            ),
            PoolErrorKind::EntryNotRun => write!(
                f,
                "this process was started as a procpool worker but its entry point did not run; \
                 link procpool into the binary (call procpool::init() in main)"
            ),
            PoolErrorKind::Config(e) => write!(f, "{e}"),
            PoolErrorKind::Refused(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            PoolErrorKind::Io(_, e) => Some(e),
            PoolErrorKind::Config(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ConfigError> for PoolError {
    fn from(e: ConfigError) -> PoolError {
        PoolError {
            kind: PoolErrorKind::Config(e),
        }
    }
}

/// A bad process-count setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub(crate) source: String,
    pub(crate) value: String,
    pub(crate) reason: &'static str,
}

impl ConfigError {
    /// Where the bad value came from (an environment variable or a parameter name).
    pub fn source_name(&self) -> &str {
        &self.source
    }

    /// The bad value as given.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} value {:?}: {}",
            self.source, self.value, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// Why a model store could not be written, read or trusted.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
}

#[derive(Debug)]
enum StoreErrorKind {
    Io(String, io::Error),
    Format(FormatError),
    Checksum { expected: u64, actual: u64 },
    TypeMismatch { expected: String, found: String },
    FormatFlags,
    Invalid(String),
    Serialize(String),
}

impl StoreError {
    pub(crate) fn io(what: impl Into<String>, err: io::Error) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Io(what.into(), err),
        }
    }
    pub(crate) fn format(err: FormatError) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Format(err),
        }
    }
    pub(crate) fn checksum(expected: u64, actual: u64) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Checksum { expected, actual },
        }
    }
    pub(crate) fn type_mismatch(expected: String, found: String) -> StoreError {
        StoreError {
            kind: StoreErrorKind::TypeMismatch { expected, found },
        }
    }
    pub(crate) fn format_flags() -> StoreError {
        StoreError {
            kind: StoreErrorKind::FormatFlags,
        }
    }
    pub(crate) fn invalid(msg: String) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Invalid(msg),
        }
    }
    pub(crate) fn serialize(msg: String) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Serialize(msg),
        }
    }

    /// True for a file that is not a store, or whose bytes were damaged:
    /// bad magic, a header or archive checksum mismatch, or an archive that
    /// fails validation.
    pub fn is_corrupted(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Format(FormatError::BadMagic | FormatError::HeaderChecksum)
                | StoreErrorKind::Checksum { .. }
                | StoreErrorKind::Invalid(_)
        ) || self.is_truncated()
    }

    /// True if the file is shorter (or longer) than its header says.
    pub fn is_truncated(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Format(FormatError::Length { .. } | FormatError::TooShort(_))
        )
    }

    /// True if the store holds another type than the one asked for.
    pub fn is_type_mismatch(&self) -> bool {
        matches!(self.kind, StoreErrorKind::TypeMismatch { .. })
    }

    /// True if the store was written by another format version, or by a
    /// build with other rkyv format settings (endianness, pointer width).
    pub fn is_version_mismatch(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Format(FormatError::Version(_)) | StoreErrorKind::FormatFlags
        )
    }

    /// True if reading or writing the file or memory failed.
    pub fn is_io(&self) -> bool {
        matches!(self.kind, StoreErrorKind::Io(..))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            StoreErrorKind::Io(what, e) => write!(f, "cannot {what}: {e}"),
            StoreErrorKind::Format(e) => write!(f, "{e}"),
            StoreErrorKind::Checksum { expected, actual } => write!(
                f,
                "store archive is corrupted (checksum {actual:016x}, the header says {expected:016x})"
            ),
            StoreErrorKind::TypeMismatch { expected, found } => {
                write!(f, "store holds `{found}`, not the requested `{expected}`")
            }
            StoreErrorKind::FormatFlags => write!(
                f,
                "store was written with other rkyv format settings (endianness, pointer width or alignment)"
            ),
            StoreErrorKind::Invalid(m) => write!(f, "store archive is invalid: {m}"),
            StoreErrorKind::Serialize(m) => write!(f, "cannot serialize the model: {m}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            StoreErrorKind::Io(_, e) => Some(e),
            StoreErrorKind::Format(e) => Some(e),
            _ => None,
        }
    }
}
