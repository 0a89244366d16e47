//! The wire protocol between the parent and the processes it starts: frame
//! tags and messages, the batch and results headers, items, [`frame`]s on a
//! byte stream, and the [`region`] a pool worker shares with its parent.
//! `PROTOCOL.md` beside this file tells the message flow and why it is so.

pub mod frame;
pub mod region;

use serde::{Deserialize, Serialize};

/// Frame tags on a worker link (parent → worker).
pub mod to_worker {
    /// Body: postcard [`Setup`](super::Setup).
    pub const SETUP: u8 = 1;
    /// Body: `u64` first task index, `u64` root seed, `u32` count, then
    /// `count` postcard-encoded arguments, each framed as an item (see
    /// [`push_item`](super::push_item)).
    pub const BATCH: u8 = 2;
    /// No body: finish and exit.
    pub const SHUTDOWN: u8 = 3;
    /// Body: `u64` offset, `u64` length of a span of the arena's parent
    /// half that holds a [`BATCH`] body (see [`crate::wire::region`]).
    pub const BATCH_IN_ARENA: u8 = 4;
}

/// Frame tags on a worker link (worker → parent).
pub mod from_worker {
    /// Body: postcard [`LogRecord`](super::LogRecord).
    pub const LOG: u8 = 11;
    /// Body: `u64` first task index, `u32` count, `u64` nanoseconds the
    /// batch took, then `count` postcard-encoded `Result<R, TaskFailure>`,
    /// each framed as an item (see [`push_item`](super::push_item)).
    pub const RESULTS: u8 = 12;
    /// Body: postcard `String`; the worker could not start and exits.
    pub const FATAL: u8 = 13;
    /// Body: postcard [`Ready`](super::Ready): the setup succeeded and the
    /// worker waits for batches.
    pub const READY: u8 = 14;
    /// Body: `u64` offset, `u64` length of a span of the arena's worker
    /// half that holds a [`RESULTS`] body (see [`crate::wire::region`]).
    pub const RESULTS_IN_ARENA: u8 = 15;
}

/// Reads a little-endian `u64` at `at` in `bytes`, which must hold it.
#[inline]
pub fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The fixed part of a BATCH body; the items follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Index of the first task in its run.
    pub first_index: u64,
    /// The root seed every task seed derives from.
    pub root_seed: u64,
    /// Number of tasks (items) in the batch.
    pub count: u32,
}

impl BatchHeader {
    /// The header's bytes.
    #[inline]
    pub fn encode(&self) -> [u8; BATCH_HEADER] {
        let mut bytes = [0u8; BATCH_HEADER];
        bytes[..8].copy_from_slice(&self.first_index.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.root_seed.to_le_bytes());
        bytes[16..].copy_from_slice(&self.count.to_le_bytes());
        bytes
    }

    /// The header at the start of `body`, and the items after it; `None` if
    /// `body` is too short.
    ///
    /// ```
    /// use procpool_worker::wire::BatchHeader;
    /// let header = BatchHeader { first_index: 7, root_seed: 42, count: 3 };
    /// let mut body = header.encode().to_vec();
    /// body.extend_from_slice(b"items");
    /// assert_eq!(BatchHeader::decode(&body), Some((header, &b"items"[..])));
    /// assert_eq!(BatchHeader::decode(&body[..10]), None);
    /// ```
    #[inline]
    pub fn decode(body: &[u8]) -> Option<(BatchHeader, &[u8])> {
        let (bytes, items) = body.split_first_chunk::<BATCH_HEADER>()?;
        let header = BatchHeader {
            first_index: le_u64(bytes, 0),
            root_seed: le_u64(bytes, 8),
            count: u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
        };
        Some((header, items))
    }
}

/// The fixed part of a RESULTS body; the outcomes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultsHeader {
    /// Index of the first task of the batch answered.
    pub first_index: u64,
    /// Number of outcomes (items), as many as the batch had tasks.
    pub count: u32,
    /// Nanoseconds the worker took to run the batch.
    pub elapsed_ns: u64,
}

impl ResultsHeader {
    /// The header's bytes.
    #[inline]
    pub fn encode(&self) -> [u8; RESULTS_HEADER] {
        let mut bytes = [0u8; RESULTS_HEADER];
        bytes[..8].copy_from_slice(&self.first_index.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.count.to_le_bytes());
        bytes[12..].copy_from_slice(&self.elapsed_ns.to_le_bytes());
        bytes
    }

    /// The header at the start of `body`, and the outcomes after it; `None`
    /// if `body` is too short.
    ///
    /// ```
    /// use procpool_worker::wire::ResultsHeader;
    /// let header = ResultsHeader { first_index: 7, count: 3, elapsed_ns: 1_000 };
    /// let body = header.encode();
    /// assert_eq!(ResultsHeader::decode(&body), Some((header, &[][..])));
    /// ```
    #[inline]
    pub fn decode(body: &[u8]) -> Option<(ResultsHeader, &[u8])> {
        let (bytes, outcomes) = body.split_first_chunk::<RESULTS_HEADER>()?;
        let header = ResultsHeader {
            first_index: le_u64(bytes, 0),
            count: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            elapsed_ns: le_u64(bytes, 12),
        };
        Some((header, outcomes))
    }
}

/// `log::Level` as it travels in a [`LogRecord`].
#[inline]
pub fn level_to_wire(level: log::Level) -> u8 {
    level as usize as u8
}

/// The `log::Level` of a [`LogRecord`]'s `level` (an unknown value is the
/// most verbose).
#[inline]
pub fn level_from_wire(level: u8) -> log::Level {
    match level {
        1 => log::Level::Error,
        2 => log::Level::Warn,
        3 => log::Level::Info,
        4 => log::Level::Debug,
        _ => log::Level::Trace,
    }
}

/// `log::LevelFilter` as it travels in [`Setup::max_log_level`].
#[inline]
pub fn level_filter_to_wire(filter: log::LevelFilter) -> u8 {
    filter as usize as u8
}

/// The `log::LevelFilter` of a [`Setup::max_log_level`] (0: off).
///
/// ```
/// use procpool_worker::wire::{level_filter_from_wire, level_filter_to_wire};
/// for filter in log::LevelFilter::iter() {
///     assert_eq!(level_filter_from_wire(level_filter_to_wire(filter)), filter);
/// }
/// ```
#[inline]
pub fn level_filter_from_wire(filter: u8) -> log::LevelFilter {
    match filter {
        0 => log::LevelFilter::Off,
        n => level_from_wire(n).to_level_filter(),
    }
}

/// Byte length of the fixed part of a batch body.
pub const BATCH_HEADER: usize = 8 + 8 + 4;
/// Byte length of the fixed part of a results body.
pub const RESULTS_HEADER: usize = 8 + 4 + 8;

/// Most bytes one framed argument (its length prefix included) may take: a
/// batch of that task alone must fit in a frame.
pub const MAX_ARGUMENT_BYTES: usize = frame::MAX_FRAME - 1 - BATCH_HEADER;
/// Most bytes the encoded outcomes of one batch may take together.
pub const MAX_RESULTS_BYTES: usize = frame::MAX_FRAME - 1 - RESULTS_HEADER;

/// Most tasks in one batch. Room for a short failure per task is kept in
/// every batch's results (see [`MAX_RESULTS_BYTES`]), so that a task whose
/// result does not fit can still be answered; this bounds that room to a
/// fifth of a message.
pub const MAX_BATCH_TASKS: usize = 1 << 24;
const _: () = assert!(MAX_BATCH_TASKS * RESULT_FAILURE_RESERVE < MAX_RESULTS_BYTES / 4);

/// Bytes kept per task for a result that does not fit: the framed item of
/// `Err(TaskFailure::BadResult(RESULT_TOO_LARGE))` (a length byte, two
/// variant bytes, the string's length byte and the string).
pub const RESULT_FAILURE_RESERVE: usize = 4 + RESULT_TOO_LARGE.len();

/// The failure message of a result that does not fit, when there is no
/// room for a longer one.
pub const RESULT_TOO_LARGE: &str = "result too large to send";

/// Appends `value`, postcard-encoded, to `out`. On error, `out` may hold part
/// of the encoding: the caller truncates it.
///
/// Faster than `postcard::to_io` for the small values most tasks take and
/// return: a few bytes go in one by one rather than through a call to
/// `memcpy` each.
///
/// ```
/// let mut out = vec![9];
/// procpool_worker::wire::encode_into(&(1u8, 300u32), &mut out).unwrap();
/// assert_eq!(out, [9, 1, 0xac, 0x02]);
/// ```
#[inline]
pub fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), postcard::Error> {
    postcard::serialize_with_flavor(value, AppendTo(out))
}

/// A postcard flavor that appends to a `Vec`.
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if data.len() <= 16 {
            self.0.reserve(data.len());
            for &byte in data {
                self.0.push(byte);
            }
        } else {
            self.0.extend_from_slice(data);
        }
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    #[inline]
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Most bytes an item's length prefix takes (a LEB128 `u32`).
pub const MAX_ITEM_PREFIX: usize = 5;

/// Where an item being written starts (see [`begin_item`]).
#[derive(Debug, Clone, Copy)]
pub struct ItemStart {
    /// Where its prefix starts.
    prefix: usize,
    /// Where its content starts, behind the room kept for the prefix.
    content: usize,
}

/// Starts an item of a BATCH or RESULTS body at the end of `out`;
/// [`end_item`] finishes it.
///
/// Each argument and each outcome is framed on its own, its length first
/// (LEB128), so that a reader who cannot decode one item, or whose decoder
/// panics, still finds the next: a bad item never costs its neighbours in
/// the batch. The length is known only once the content is written, so room
/// is kept for the prefix: one byte when the item is expected to be short
/// (under 128 bytes), else five. A guess that turns out wrong costs a move of
/// the content; writers guess from the item before, so a run of large
/// arguments or results is never copied again, and a run of small ones
/// never moves at all.
#[inline]
pub fn begin_item(out: &mut Vec<u8>, expect_large: bool) -> ItemStart {
    let prefix = out.len();
    if expect_large {
        out.extend_from_slice(&[0; MAX_ITEM_PREFIX]);
    } else {
        out.push(0);
    }
    ItemStart {
        prefix,
        content: out.len(),
    }
}

/// Finishes the item started at `start` (from [`begin_item`]), whose
/// content runs to the end of `out`; returns whether it was large (128
/// bytes or more), the guess for the next item.
///
/// The content must be shorter than 4 GiB (frames are at most 2 GiB).
#[inline]
pub fn end_item(out: &mut Vec<u8>, start: ItemStart) -> bool {
    let ItemStart { prefix, content } = start;
    let len = out.len() - content;
    if len < 0x80 {
        out[prefix] = len as u8;
        if content > prefix + 1 {
            out.copy_within(content.., prefix + 1);
            out.truncate(prefix + 1 + len);
        }
        return false;
    }
    if content == prefix + 1 {
        out.splice(prefix..content, [0; MAX_ITEM_PREFIX]);
    }
    // Five bytes whatever the length: LEB128 allows the padding, and the
    // content then stays where it is.
    let mut rest = len as u64;
    for byte in &mut out[prefix..prefix + MAX_ITEM_PREFIX - 1] {
        *byte = (rest as u8 & 0x7f) | 0x80;
        rest >>= 7;
    }
    out[prefix + MAX_ITEM_PREFIX - 1] = rest as u8;
    true
}

/// Appends `bytes` to `out` as one item.
///
/// ```
/// use procpool_worker::wire::{push_item, split_item};
/// let mut body = Vec::new();
/// push_item(&mut body, b"short");
/// push_item(&mut body, &[7u8; 300]);
/// let mut rest = &body[..];
/// assert_eq!(split_item(&mut rest), Some(&b"short"[..]));
/// assert_eq!(split_item(&mut rest).map(<[u8]>::len), Some(300));
/// assert!(rest.is_empty());
/// ```
pub fn push_item(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = begin_item(out, bytes.len() >= 0x80);
    out.extend_from_slice(bytes);
    end_item(out, start);
}

/// Takes the next item off the front of `rest`; `None` if `rest` does not
/// start with a whole item (the body is malformed: nothing after it can be
/// found).
#[inline]
pub fn split_item<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let mut len: u64 = 0;
    for (i, &byte) in rest.iter().take(MAX_ITEM_PREFIX).enumerate() {
        len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let start = i + 1;
            let end = start.checked_add(usize::try_from(len).ok()?)?;
            let item = rest.get(start..end)?;
            *rest = &rest[end..];
            return Some(item);
        }
    }
    None
}

impl TaskFailure {
    /// The failure of a task whose argument encodes to `size` bytes, more
    /// than one message carries.
    pub fn argument_too_large(size: usize) -> TaskFailure {
        TaskFailure::BadArgument(format!(
            "argument too large to send: {size} bytes encoded, at most {MAX_ARGUMENT_BYTES}"
        ))
    }
}

/// A worker's answer to its setup: it is ready for batches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    /// The worker's process id.
    pub pid: u32,
    /// The build fingerprint of the worker's executable image.
    pub fingerprint: u64,
}

/// The kinds of job a worker runs (see [`crate::worker::jobs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// One call per task, one outcome each (with a model or without).
    Map,
    /// One call per task, the results folded in the worker by a reducer;
    /// the batch sends one partial result.
    MapReduce,
    /// `init` once in the worker, then `step` on every item in order, the
    /// state kept in the worker.
    Stateful,
}

/// What a worker runs: functions named by their offsets (see
/// [`crate::fnref`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Which kind of job.
    pub kind: JobKind,
    /// The batch runner monomorphised for the user's types.
    pub runner: i64,
    /// The function each task calls: a map's, a map-reduce's mapper, a
    /// stateful stage's `step`.
    pub task: i64,
    /// A map-reduce's reducer or a stateful stage's `init`.
    pub helper: Option<i64>,
}

/// Everything a worker needs to run tasks: the first frame on its link,
/// written by the parent before the worker starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    /// The parent's build fingerprint; a worker of another build refuses to
    /// use the offsets below.
    pub fingerprint: u64,
    /// The worker's number in its pool, for logs.
    pub worker_id: u32,
    /// What the worker runs.
    pub job: Job,
    /// The most verbose log level the parent wants (`log::LevelFilter` as usize).
    pub max_log_level: u8,
    /// Environment variables to set before any user code runs.
    pub env: Vec<(String, String)>,
    /// Address-space limit in bytes (`RLIMIT_AS`), if any. It counts the
    /// model mapping too.
    pub memory_limit: Option<u64>,
    /// Whether the parent enforces task timeouts (then the worker records
    /// each task's start time in its status page).
    pub timed: bool,
    /// Whether the worker exits after its first batch (an isolated call)
    /// instead of waiting for the parent to close its link.
    pub one_batch: bool,
}

/// One log record forwarded from a worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogRecord {
    /// `log::Level` as usize (1 = error … 5 = trace).
    pub level: u8,
    /// The record's target.
    pub target: String,
    /// The module that logged it.
    pub module_path: Option<String>,
    /// The source file that logged it.
    pub file: Option<String>,
    /// The source line that logged it.
    pub line: Option<u32>,
    /// The formatted message.
    pub message: String,
    /// The task running when it was logged, if any.
    pub task_index: Option<u64>,
}

/// Why one task produced no value. Travels inside `Result<R, TaskFailure>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum TaskFailure {
    /// The function panicked.
    Panicked {
        /// The panic message.
        message: String,
        /// `file:line:column` of the panic, when known.
        location: Option<String>,
    },
    /// The argument could not be decoded in the worker.
    BadArgument(String),
    /// The result could not be encoded in the worker.
    BadResult(String),
}

/// Messages from the parent to the fork server, one per datagram.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForkServerRequest {
    /// Fork a worker. Attached descriptors: the worker's ends of its link
    /// (read, then write), then its status page if `has_status`, then the
    /// model store if `has_model`.
    Spawn {
        /// Echoed in the reply.
        request_id: u64,
        /// Prefix for the worker's stderr lines.
        label: String,
        /// Whether a status page descriptor is attached.
        has_status: bool,
        /// Whether a model descriptor is attached.
        has_model: bool,
    },
    /// The parent is about to hand a request's descriptors straight to the
    /// spare `pid` (announced by [`ForkServerEvent::Spare`]): from now on it is
    /// a worker, its stderr lines carry `label`, and the server forks the
    /// next spare. Sent before the hand-off, so the server knows the worker
    /// before the worker can write or die.
    Took {
        /// The spare.
        pid: u32,
        /// Prefix for the worker's stderr lines.
        label: String,
    },
    /// Send a signal to a worker the fork server has not reaped yet.
    Kill {
        /// The worker.
        pid: u32,
        /// The signal number.
        signal: i32,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExitInfo {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal {
        /// The signal number.
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl ExitInfo {
    /// How a process ended, from the status `waitpid` gave for it.
    pub fn from_wait_status(status: libc::c_int) -> ExitInfo {
        if libc::WIFSIGNALED(status) {
            ExitInfo::Signal {
                signal: libc::WTERMSIG(status),
                core_dumped: libc::WCOREDUMP(status),
            }
        } else {
            ExitInfo::Code(libc::WEXITSTATUS(status))
        }
    }
}

/// Messages from the fork server to the parent, one per datagram.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForkServerEvent {
    /// Sent once at start.
    Ready {
        /// The fork server's build fingerprint.
        fingerprint: u64,
        /// Its process id.
        pid: u32,
    },
    /// A spare is waiting: a child forked ahead of need. Attached: a socket
    /// on which one datagram of [`HANDOFF_FLAGS_LEN`] byte (the
    /// [`HANDOFF_STATUS`] and [`HANDOFF_MODEL`] bits) with a spawn request's
    /// descriptors attached makes it that worker, after a
    /// [`ForkServerRequest::Took`]. The parent owns it from here on; how it
    /// ends is reported like any worker's.
    Spare {
        /// The spare's process id.
        pid: u32,
    },
    /// A worker could not be forked.
    SpawnFailed {
        /// From the request.
        request_id: u64,
        /// What went wrong.
        error: String,
    },
    /// A worker ended and was reaped.
    Exited {
        /// The worker's process id.
        pid: u32,
        /// How it ended.
        status: ExitInfo,
        /// The last lines it wrote to stderr (at most [`STDERR_TAIL`] bytes).
        stderr_tail: String,
    },
}

/// The environment variable that carries process counts per nesting level;
/// every worker's [`Setup::env`] sets it.
pub const NUM_PROCS_ENV: &str = "PROCPOOL_NUM_PROCS";

/// Thread-count variables of common native libraries (and rayon); every
/// worker's [`Setup::env`] sets them.
pub const THREAD_ENV_VARS: [&str; 4] = [
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "RAYON_NUM_THREADS",
];

/// Bytes in the datagram that hands a spawn request's descriptors to a spare.
pub const HANDOFF_FLAGS_LEN: usize = 1;
/// Hand-off flag: a status page descriptor follows the link's two.
pub const HANDOFF_STATUS: u8 = 1;
/// Hand-off flag: the model store's descriptor comes last.
pub const HANDOFF_MODEL: u8 = 2;

/// The hand-off byte for a worker with these descriptors.
pub fn handoff_flags(has_status: bool, has_model: bool) -> u8 {
    (if has_status { HANDOFF_STATUS } else { 0 }) | (if has_model { HANDOFF_MODEL } else { 0 })
}

/// Bytes of a dead worker's stderr kept to explain its death.
pub const STDERR_TAIL: usize = 16 * 1024;

/// Largest datagram on the fork-server link.
pub const FORK_SERVER_DATAGRAM: usize = 64 * 1024;

/// The FATAL message of a worker whose build differs from its parent's.
pub const BUILD_MISMATCH: &str = "the worker runs a different build than its parent";

/// Environment variable that tells a re-executed binary which role to take.
pub const ROLE_ENV: &str = "__PROCPOOL_ROLE";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_of_every_size_read_back_in_order() {
        let sizes = [0, 1, 5, 16, 17, 127, 128, 129, 300, 16_383, 16_384, 70_000];
        let mut body = vec![0xee];
        // Every guess, right and wrong, for every size.
        for expect_large in [false, true] {
            for (i, &n) in sizes.iter().enumerate() {
                let start = begin_item(&mut body, expect_large);
                body.extend((0..n).map(|j| (i + j) as u8));
                assert_eq!(end_item(&mut body, start), n >= 128);
            }
        }
        let mut rest = &body[1..];
        for _ in 0..2 {
            for (i, &n) in sizes.iter().enumerate() {
                let item = split_item(&mut rest).unwrap();
                assert_eq!(item.len(), n);
                assert!(item.iter().enumerate().all(|(j, &b)| b == (i + j) as u8));
            }
        }
        assert!(rest.is_empty());
        // Small items take one byte of prefix, large ones five.
        let prefixes: usize = sizes.iter().map(|&n| if n < 128 { 1 } else { 5 }).sum();
        assert_eq!(body.len(), 1 + 2 * (prefixes + sizes.iter().sum::<usize>()));
    }

    #[test]
    fn a_cut_or_overlong_item_is_not_taken() {
        let mut body = Vec::new();
        push_item(&mut body, &[1; 200]);
        for cut in 0..body.len() {
            let mut rest = &body[..cut];
            assert_eq!(split_item(&mut rest), None, "cut at {cut}");
            assert_eq!(rest.len(), cut, "a failed split leaves the rest");
        }
        // A prefix that never ends.
        let mut rest = &[0x80u8, 0x80, 0x80, 0x80, 0x80, 0x01][..];
        assert_eq!(split_item(&mut rest), None);
    }
}
