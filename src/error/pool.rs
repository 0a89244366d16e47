//! Why a pool could not start, and bad process-count settings.

use std::fmt;
use std::io;

/// Why a pool could not start, or stopped working.
///
/// ```
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
/// let err = procpool::PoolBuilder::new(double).chunk_size(0).build().unwrap_err();
/// assert!(err.is_refused());
/// assert_eq!(err.to_string(), "chunk_size must be at least 1");
/// ```
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
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// let err = procpool::PoolBuilder::new(double).n_jobs(0).build().unwrap_err();
    /// assert!(!err.is_io() && err.is_refused());
    /// ```
    pub fn is_io(&self) -> bool {
        matches!(self.kind, PoolErrorKind::Io(..))
    }

    /// True if a worker reported that it could not start (for example the
    /// model failed validation in it).
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// let err = procpool::PoolBuilder::new(double).n_jobs(0).build().unwrap_err();
    /// assert!(!err.is_worker_fatal());
    /// ```
    pub fn is_worker_fatal(&self) -> bool {
        matches!(self.kind, PoolErrorKind::WorkerFatal(_))
    }

    /// True if a started process runs a different build than the parent
    /// (the same binary elsewhere is the same build: see
    /// `procpool_worker::fnref::fingerprint`).
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// // The workers of a pool run this very binary.
    /// assert!(procpool::pool(double, 2).is_ok());
    /// ```
    pub fn is_build_mismatch(&self) -> bool {
        matches!(self.kind, PoolErrorKind::BuildMismatch)
    }

    /// True if the request was refused as unsafe or invalid (for example
    /// `StartMethod::Fork` in a multi-threaded process).
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// let err = procpool::PoolBuilder::new(double).max_tries(0).build().unwrap_err();
    /// assert!(err.is_refused());
    /// ```
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
///
/// ```
/// let err = procpool::proc_count(0, None, 0).unwrap_err();
/// assert_eq!(err.source_name(), "core_div");
/// assert_eq!(err.value(), "0");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub(crate) source: String,
    pub(crate) value: String,
    pub(crate) reason: &'static str,
}

impl ConfigError {
    /// Where the bad value came from (an environment variable or a parameter name).
    ///
    /// ```
    /// let err = procpool::proc_count(0, None, 0).unwrap_err();
    /// assert_eq!(err.source_name(), "core_div");
    /// ```
    pub fn source_name(&self) -> &str {
        &self.source
    }

    /// The bad value as given.
    ///
    /// ```
    /// let err = procpool::proc_count(0, None, 0).unwrap_err();
    /// assert_eq!(err.value(), "0");
    /// ```
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
