//! The engine behind a multi-process invoker: a set of workers, batches sent
//! to them, results collected in order or as they come.
//!
//! A worker that dies is noticed at once (its pipe reaches end of file). Its
//! status page says which task it was running: only that task fails (after
//! `max_tries` deaths), the other tasks it held run again elsewhere from the
//! copy of their arguments kept here, and a fresh worker takes its place.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use procpool_worker::arena::{self, ARENA_MIN_BYTES, Ring};
use procpool_worker::protocol::{
    BATCH_HEADER, BUILD_MISMATCH, LogRecord, MAX_ARGUMENT_BYTES, RESULTS_HEADER, Ready, Setup,
    TaskFailure, begin_item, encode_into, end_item, from_worker, split_item, to_worker,
};
use procpool_worker::stamps::{Step, stamp};
use procpool_worker::status::monotonic_ns;
use procpool_worker::sys::{self, FrameReader, LinkEnds, ReadStatus};
use procpool_worker::task::{BatchRunner, capturing, catch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::batching::BatchSizer;
use crate::error::{Death, PoolError, TaskError};
use crate::launch::{self, Reaper, StartMethod, StatusPage};

/// Batches each worker may hold at once: one running, one waiting, so a
/// worker never idles between batches.
const IN_FLIGHT_PER_WORKER: usize = 2;
/// Workers that may die holding a task alone in the batch they were to run
/// next, before it started (killed from outside, or unable to read it),
/// before the task fails rather than runs again.
const DEATHS_BEFORE_START: u32 = 3;
/// How long a new worker may take to start and report ready.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the exit status of a worker whose link closed.
const EXIT_STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a worker may take to drain and exit at shutdown before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a timed-out worker has between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_millis(500);

/// How a pool treats its tasks and workers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Longest a task may run before its worker is stopped.
    pub task_timeout: Option<Duration>,
    /// Address-space limit of each worker.
    pub memory_limit: Option<u64>,
    /// Deaths a task may cause before it is reported instead of retried.
    pub max_tries: u32,
    /// Whether a dead worker is replaced (a pool) or not (an isolated call).
    pub replace_dead: bool,
}

impl PoolSpec {
    /// A pool of `n_jobs` workers that run `runner` over the user's
    /// function at `user_fn`, both in this executable.
    pub fn new(
        method: StartMethod,
        n_jobs: usize,
        model: Option<OwnedFd>,
        (runner, user_fn): (BatchRunner, usize),
        policy: Policy,
    ) -> PoolSpec {
        let setup = Setup {
            fingerprint: procpool_worker::fnref::fingerprint(),
            worker_id: 0,
            batch_runner: procpool_worker::fnref::offset_of(runner as usize),
            user_fn: procpool_worker::fnref::offset_of(user_fn),
            max_log_level: log::max_level() as usize as u8,
            env: crate::config::worker_env(n_jobs),
            memory_limit: policy.memory_limit,
            timed: policy.task_timeout.is_some(),
            one_batch: false,
        };
        PoolSpec {
            method,
            n_jobs,
            model,
            setup,
            task_timeout: policy.task_timeout,
            max_tries: policy.max_tries,
            replace_dead: policy.replace_dead,
        }
    }
}

/// What every worker of a pool is set up with, and the pool's policies.
pub(crate) struct PoolSpec {
    pub method: StartMethod,
    pub n_jobs: usize,
    pub model: Option<OwnedFd>,
    pub setup: Setup,
    /// Longest a task may run before its worker is stopped.
    pub task_timeout: Option<Duration>,
    /// Deaths a task may cause before it is reported instead of retried.
    pub max_tries: u32,
    /// Whether a dead worker is replaced (a pool) or not (an isolated call).
    pub replace_dead: bool,
}

/// Tasks with contiguous indices and their encoded arguments.
pub(crate) struct Batch {
    first_index: u64,
    /// Where each task's argument starts in `items`.
    offsets: Vec<u32>,
    items: Vec<u8>,
    /// Whether it went to its worker through the bulk arena (so its span
    /// is released when its results arrive).
    in_arena: bool,
}

impl Batch {
    fn count(&self) -> u32 {
        self.offsets.len() as u32
    }

    /// The encoded argument of the task at `i` in this batch.
    fn item(&self, i: usize) -> &[u8] {
        let start = self.offsets[i] as usize;
        let end = self
            .offsets
            .get(i + 1)
            .map_or(self.items.len(), |&o| o as usize);
        &self.items[start..end]
    }

    /// Tasks `range` of this batch as a batch of their own.
    fn slice(&self, range: std::ops::Range<usize>) -> Batch {
        let mut part = Batch {
            first_index: self.first_index + range.start as u64,
            offsets: Vec::new(),
            items: Vec::new(),
            in_arena: false,
        };
        for i in range {
            part.offsets.push(part.items.len() as u32);
            part.items.extend_from_slice(self.item(i));
        }
        part
    }

    /// The fixed part of this batch's BATCH body.
    #[inline]
    fn header(&self, root_seed: u64) -> [u8; BATCH_HEADER] {
        batch_header(self.first_index, root_seed, self.count())
    }
}

/// The fixed part of a BATCH body.
#[inline]
fn batch_header(first_index: u64, root_seed: u64, count: u32) -> [u8; BATCH_HEADER] {
    let mut header = [0u8; BATCH_HEADER];
    header[..8].copy_from_slice(&first_index.to_le_bytes());
    header[8..16].copy_from_slice(&root_seed.to_le_bytes());
    header[16..].copy_from_slice(&count.to_le_bytes());
    header
}

/// Appends the tag and header of a BATCH frame; returns where it starts.
#[inline]
fn begin_batch_frame(out: &mut Vec<u8>, first_index: u64, root_seed: u64, count: u32) -> usize {
    let start = sys::begin_frame(out, to_worker::BATCH);
    out.extend_from_slice(&batch_header(first_index, root_seed, count));
    start
}

/// Appends `arg` to `out`, encoded as one item of a BATCH body, and drops
/// it; if it cannot be encoded, is larger than one message carries, or its
/// `Serialize` or `Drop` panics, `out` is left as it was and the task's
/// failure is returned. The same check for every `n_jobs`, pool or isolated
/// call.
pub(crate) fn encode_argument<A: Serialize>(
    arg: A,
    out: &mut Vec<u8>,
    large: &mut bool,
) -> Result<(), TaskFailure> {
    let mark = out.len();
    // One `catch_unwind` for both: a panic in either fails the task.
    let encoded = capturing(|| {
        catch(|| {
            let start = begin_item(out, *large);
            let encoded = encode_into(&arg, out);
            *large = end_item(out, start);
            drop(arg);
            encoded
        })
    });
    let failure = match encoded {
        Ok(Ok(())) if out.len() - mark <= MAX_ARGUMENT_BYTES => return Ok(()),
        Ok(Ok(())) => TaskFailure::argument_too_large(out.len() - mark),
        Ok(Err(e)) => TaskFailure::BadArgument(format!("cannot encode argument: {e}")),
        Err(panic) => panic,
    };
    out.truncate(mark);
    Err(failure)
}

/// Appends to `out` a BATCH frame of one task, `index`, with `arg` encoded
/// in place (so a large one is copied no more than needed); on failure `out`
/// is left as it was.
fn task_frame<A: Serialize>(
    out: &mut Vec<u8>,
    index: u64,
    root_seed: u64,
    arg: A,
) -> Result<(), TaskFailure> {
    let start = begin_batch_frame(out, index, root_seed, 1);
    if let Err(failure) = encode_argument(arg, out, &mut true) {
        out.truncate(start);
        return Err(failure);
    }
    sys::end_frame(out, start);
    Ok(())
}

/// Why we are stopping a worker, if we are.
struct Stopping {
    /// The task that ran past its time limit.
    task: u64,
    /// When SIGTERM went out.
    since: Instant,
    killed: bool,
}

struct Worker {
    id: u32,
    pid: u32,
    link: LinkEnds,
    /// None for an isolated call's worker (one batch of one task).
    status: Option<StatusPage>,
    /// When the worker was asked for; an isolated call's task was waiting
    /// in its pipe from then on.
    launched_at: Instant,
    reader: FrameReader,
    out: Outbox,
    in_flight: VecDeque<Batch>,
    /// Spans of the arena's parent half held by batches in flight.
    arena: Ring,
    reaper: Reaper,
    stopping: Option<Stopping>,
}

/// Frames for a worker that its pipe has not taken yet.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    sent: usize,
}

impl Outbox {
    #[inline]
    fn has_output(&self) -> bool {
        self.sent < self.bytes.len()
    }

    /// Sends as much as the pipe `fd` takes without blocking.
    #[inline]
    fn flush(&mut self, fd: RawFd) -> std::io::Result<()> {
        while self.has_output() {
            let n = sys::write_some(fd, &self.bytes[self.sent..])?;
            if n == 0 {
                return Ok(());
            }
            self.sent += n;
        }
        if self.bytes.capacity() > sys::RETAINED_BUFFER_BYTES {
            self.bytes = Vec::new();
        }
        self.bytes.clear();
        self.sent = 0;
        Ok(())
    }
}

impl Worker {
    #[inline]
    fn has_output(&self) -> bool {
        self.out.has_output()
    }

    /// Sends as much pending output as the pipe takes without blocking.
    #[inline]
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush(self.link.write.as_raw_fd())
    }

    /// Queues `batch` for the worker, through the arena if it is large and
    /// finds room there, else as a BATCH frame.
    #[inline]
    fn send_batch(&mut self, batch: &mut Batch, root_seed: u64) {
        let len = BATCH_HEADER + batch.items.len();
        batch.in_arena = false;
        if let Some(page) = self.status.as_mut().filter(|_| len >= ARENA_MIN_BYTES)
            && let Some(offset) = self.arena.alloc(len)
        {
            let header = batch.header(root_seed);
            if page.write_batch(offset, &[&header, &batch.items]) {
                // The bytes are in place before the frame that names them.
                fence(Ordering::Release);
                let body = arena::span_frame_body(offset, len);
                sys::push_frame(&mut self.out.bytes, to_worker::BATCH_IN_ARENA, &body);
                batch.in_arena = true;
                return;
            }
            self.arena.cancel_newest();
        }
        let out = &mut self.out.bytes;
        let start = begin_batch_frame(out, batch.first_index, root_seed, batch.count());
        out.extend_from_slice(&batch.items);
        sys::end_frame(out, start);
    }

    /// Kills the worker and waits for how it ended.
    fn kill_and_reap(&mut self) -> Option<launch::Ended> {
        self.reaper.kill(self.pid, libc::SIGKILL);
        self.reaper.wait(self.pid, EXIT_STATUS_TIMEOUT)
    }
}

/// A running set of workers.
pub(crate) struct Pool {
    spec: PoolSpec,
    workers: Vec<Worker>,
    next_worker_id: u32,
}

/// Re-emits a worker's log record through this process's logger.
fn emit_log(record: &LogRecord, worker_id: u32) {
    let level = match record.level {
        1 => log::Level::Error,
        2 => log::Level::Warn,
        3 => log::Level::Info,
        4 => log::Level::Debug,
        _ => log::Level::Trace,
    };
    if level > log::max_level() {
        return;
    }
    let with_task;
    let without_task;
    let kvs: &dyn log::kv::Source = match record.task_index {
        Some(task) => {
            with_task = [("worker", u64::from(worker_id)), ("task", task)];
            &with_task
        }
        None => {
            without_task = [("worker", u64::from(worker_id))];
            &without_task
        }
    };
    log::logger().log(
        &log::Record::builder()
            .level(level)
            .target(&record.target)
            .module_path(record.module_path.as_deref())
            .file(record.file.as_deref())
            .line(record.line)
            .key_values(kvs)
            .args(format_args!("{}", record.message))
            .build(),
    );
}

#[inline]
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Pool {
    /// Starts one worker whose only task (index `index`) is already waiting
    /// in its pipe behind its setup, so it runs without a round trip more:
    /// an isolated call, whose task is known before the process exists.
    /// `arg` is encoded once, in place, behind the setup frame; if it cannot
    /// be sent, no process is started and its failure is returned.
    pub fn start_with_task<A: Serialize>(
        spec: PoolSpec,
        index: u64,
        root_seed: u64,
        arg: A,
    ) -> Result<Result<Pool, PoolError>, TaskFailure> {
        debug_assert_eq!(spec.n_jobs, 1);
        let mut spec = spec;
        // Nothing follows the batch: the worker may exit as soon as it has
        // answered, rather than wake once more to see its link close.
        spec.setup.one_batch = true;
        let mut pool = Pool {
            spec,
            workers: Vec::new(),
            next_worker_id: 0,
        };
        let id = pool.next_worker_id;
        let mut frames = match pool.setup_frame(id) {
            Ok(frames) => frames,
            Err(e) => return Ok(Err(e)),
        };
        task_frame(&mut frames, index, root_seed, arg)?;
        Ok(pool.launch_one(frames).and_then(|(id, launched)| {
            let mut worker = pool.handshake(id, launched)?;
            // The argument went out and is not kept: an isolated call is
            // never retried, so only the task's index is needed here.
            worker.in_flight.push_back(Batch {
                first_index: index,
                offsets: vec![0],
                items: Vec::new(),
                in_arena: false,
            });
            pool.workers.push(worker);
            Ok(pool)
        }))
    }

    /// Starts `spec.n_jobs` workers and completes their handshakes.
    pub fn start(spec: PoolSpec) -> Result<Pool, PoolError> {
        let mut pool = Pool {
            spec,
            workers: Vec::new(),
            next_worker_id: 0,
        };
        // Launch all first so they start up side by side, then shake hands.
        let mut launched = Vec::new();
        for _ in 0..pool.spec.n_jobs {
            let frames = pool.setup_frame(pool.next_worker_id)?;
            launched.push(pool.launch_one(frames)?);
        }
        for (id, worker) in launched {
            let worker = pool.handshake(id, worker)?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    /// The SETUP frame of the worker with id `id`.
    fn setup_frame(&self, id: u32) -> Result<Vec<u8>, PoolError> {
        let mut setup = self.spec.setup.clone();
        setup.worker_id = id;
        let body = postcard::to_allocvec(&setup).map_err(|e| PoolError::protocol(e.to_string()))?;
        let mut frame = Vec::new();
        sys::push_frame(&mut frame, to_worker::SETUP, &body);
        Ok(frame)
    }

    /// Launches the next worker with `frames` (its setup, perhaps followed
    /// by a batch) waiting in its pipe.
    fn launch_one(&mut self, frames: Vec<u8>) -> Result<(u32, launch::Launched), PoolError> {
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        let label = format!("[procpool worker {id}] ");
        let model = self.spec.model.as_ref().map(|m| m.as_fd());
        let purpose = if self.spec.setup.one_batch {
            launch::Purpose::Isolated
        } else {
            launch::Purpose::Pool {
                arena_half: arena::half_bytes(self.spec.setup.memory_limit),
            }
        };
        let launched = launch::launch(self.spec.method, purpose, &label, frames, model)?;
        Ok((id, launched))
    }

    /// Waits for a new worker's READY (its setup went out with it).
    fn handshake(&self, id: u32, launched: launch::Launched) -> Result<Worker, PoolError> {
        let launched_at = Instant::now();
        let launch::Launched {
            pid,
            link,
            status,
            mut reaper,
            first_frames,
            first_sent,
        } = launched;
        let mut reader = FrameReader::default();
        let mut out = Outbox {
            bytes: first_frames,
            sent: first_sent,
        };
        let result = match read_frame_timeout(&mut reader, &link, &mut out, id) {
            Ok((from_worker::READY, body)) => match postcard::from_bytes::<Ready>(&body) {
                Ok(ready) if ready.fingerprint == procpool_worker::fnref::fingerprint() => {
                    Ok(ready.pid)
                }
                Ok(_) => Err(PoolError::build_mismatch()),
                Err(e) => Err(PoolError::protocol(format!("bad ready: {e}"))),
            },
            Ok((from_worker::FATAL, body)) => {
                let msg: String =
                    postcard::from_bytes(&body).unwrap_or_else(|_| "unreadable error".into());
                if msg == BUILD_MISMATCH {
                    Err(PoolError::build_mismatch())
                } else {
                    Err(PoolError::worker_fatal(msg))
                }
            }
            Ok((tag, _)) => Err(PoolError::protocol(format!(
                "expected ready, got frame tag {tag}"
            ))),
            Err(e) => Err(e),
        };
        match result {
            Ok(ready_pid) => {
                let arena_half = status.as_ref().map_or(0, StatusPage::arena_half);
                // Writes never block (a worker may be writing to us; `launch`
                // made our end non-blocking); reads stay blocking and happen
                // only when poll says so, or when one worker alone has work
                // (see `wait_and_collect`).
                Ok(Worker {
                    id,
                    pid: pid.unwrap_or(ready_pid),
                    link,
                    status,
                    launched_at,
                    reader,
                    out,
                    in_flight: VecDeque::new(),
                    arena: Ring::new(arena_half),
                    reaper,
                    stopping: None,
                })
            }
            Err(e) => {
                // A worker the fork server forked on request that never got
                // ready never told us its pid; closing its link (on return)
                // ends it.
                let ended = pid.and_then(|pid| {
                    reaper.kill(pid, libc::SIGKILL);
                    reaper.wait(pid, EXIT_STATUS_TIMEOUT)
                });
                if e.is_io() || e.is_worker_fatal() || e.is_build_mismatch() {
                    return Err(e);
                }
                let who = pid.map_or_else(
                    || format!("worker {id}"),
                    |pid| format!("worker {id} (pid {pid})"),
                );
                Err(PoolError::protocol(format!(
                    "{who} failed during start-up ({e}); it ended with {}",
                    crate::error::describe_exit(ended.map(|e| e.exit))
                )))
            }
        }
    }

    /// Replaces the worker at `slot` (whose process has ended) by a new one;
    /// if none can be started, or the pool does not replace workers, it goes
    /// on with one worker fewer.
    fn replace(&mut self, slot: usize) {
        if !self.spec.replace_dead {
            self.workers.remove(slot);
            return;
        }
        let (id, pid) = (self.workers[slot].id, self.workers[slot].pid);
        match self
            .setup_frame(self.next_worker_id)
            .and_then(|frames| self.launch_one(frames))
            .and_then(|(id, launched)| self.handshake(id, launched))
        {
            Ok(worker) => self.workers[slot] = worker,
            Err(e) => {
                log::error!(target: "procpool", "cannot replace worker {id} (pid {pid}): {e}");
                self.workers.remove(slot);
            }
        }
    }

    /// The process ids of the running workers.
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.pid).collect()
    }

    /// Lets every worker go without waiting: closing its link ends it (it
    /// exits at end of file). For a worker that has nothing more to say,
    /// such as an isolated call's once its result is in.
    pub fn release(&mut self) {
        for worker in self.workers.drain(..) {
            let pid = worker.pid;
            worker.reaper.release_later(pid);
        }
    }

    /// Stops every worker: asks each to exit, forwards the logs they still
    /// send, waits for them, and kills any that does not exit in time.
    pub fn shutdown(&mut self) {
        let mut frame = Vec::new();
        sys::push_frame(&mut frame, to_worker::SHUTDOWN, &[]);
        for worker in &mut self.workers {
            let _ = sys::set_nonblocking(worker.link.write.as_raw_fd(), false);
            let _ = sys::write_all(worker.link.write.as_raw_fd(), &frame);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        for worker in &mut self.workers {
            // Drain until the worker closes its end: nothing it logged is lost.
            let mut drained = false;
            while !drained {
                let left = deadline.saturating_duration_since(Instant::now());
                match sys::wait_readable(worker.link.read.as_raw_fd(), left.as_millis() as i32) {
                    Ok(true) => {}
                    _ => break,
                }
                match worker.reader.fill(worker.link.read.as_raw_fd()) {
                    Ok(ReadStatus::Data) | Ok(ReadStatus::Empty) => {}
                    Ok(ReadStatus::Closed) => drained = true,
                    Err(_) => break,
                }
                while let Ok(Some((tag, body))) = worker.reader.next_frame() {
                    if tag == from_worker::LOG {
                        if let Ok(record) = postcard::from_bytes::<LogRecord>(body) {
                            emit_log(&record, worker.id);
                        }
                    }
                }
            }
            if drained {
                // End of file: it exited, or is exiting, of its own accord.
                worker.reaper.release(worker.pid);
            } else {
                worker.kill_and_reap();
            }
        }
        self.workers.clear();
    }
}

/// Reads the next frame other than a log record (logs are re-emitted) from
/// a new worker, sending it the rest of its first frames meanwhile, for at
/// most [`HANDSHAKE_TIMEOUT`].
fn read_frame_timeout(
    reader: &mut FrameReader,
    link: &LinkEnds,
    out: &mut Outbox,
    worker_id: u32,
) -> Result<(u8, Vec<u8>), PoolError> {
    let fd = link.read.as_raw_fd();
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        if let Some((tag, body)) = reader
            .next_frame()
            .map_err(|e| PoolError::io("read from a worker", e))?
        {
            if tag == from_worker::LOG {
                if let Ok(record) = postcard::from_bytes::<LogRecord>(body) {
                    emit_log(&record, worker_id);
                }
                continue;
            }
            return Ok((tag, body.to_vec()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PoolError::protocol("timed out waiting for a worker"));
        }
        let left_ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut pollfds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: link.write.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            },
        ];
        let watched = if out.has_output() { 2 } else { 1 };
        // SAFETY: `pollfds` is a valid array of at least `watched` entries.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), watched, left_ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(PoolError::io("wait for a worker", err));
        }
        if watched == 2 && pollfds[1].revents != 0 {
            // Writable, or the worker's read end is gone (then its link's
            // end of file follows on the read side).
            match out.flush(link.write.as_raw_fd()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => *out = Outbox::default(),
                Err(e) => return Err(PoolError::io("write to a worker", e)),
            }
        }
        if pollfds[0].revents != 0
            && reader
                .fill(fd)
                .map_err(|e| PoolError::io("read from a worker", e))?
                == ReadStatus::Closed
        {
            return Err(PoolError::protocol("the worker closed its link"));
        }
    }
}

/// Where results wait until the caller takes them.
enum Collector<R> {
    /// In input order: slot `i` holds task `base + i`.
    Ordered {
        base: u64,
        slots: VecDeque<Option<Result<R, TaskError>>>,
    },
    /// As they complete, with their input index.
    Unordered {
        ready: VecDeque<(u64, Result<R, TaskError>)>,
    },
}

impl<R> Collector<R> {
    fn put(&mut self, index: u64, result: Result<R, TaskError>) {
        match self {
            Collector::Ordered { base, slots } => {
                let at = (index - *base) as usize;
                if slots.len() <= at {
                    slots.resize_with(at + 1, || None);
                }
                slots[at] = Some(result);
            }
            Collector::Unordered { ready } => ready.push_back((index, result)),
        }
    }

    fn take(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        match self {
            Collector::Ordered { base, slots } => {
                if matches!(slots.front(), Some(Some(_))) {
                    let index = *base;
                    *base += 1;
                    slots.pop_front().flatten().map(|r| (index, r))
                } else {
                    None
                }
            }
            Collector::Unordered { ready } => ready.pop_front(),
        }
    }
}

/// One `map` running on a pool.
pub(crate) struct Run<'p, I, A, R>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    pool: &'p mut Pool,
    sizer: &'p mut BatchSizer,
    input: I,
    exhausted: bool,
    next_index: u64,
    root_seed: u64,
    collector: Collector<R>,
    /// Batches that go out before new input: tasks to run again because a
    /// worker died holding them, and an argument too large to share a batch.
    queued: VecDeque<Batch>,
    /// Deaths each task has caused (only tasks that caused one).
    deaths: HashMap<u64, u32>,
    /// Workers that died holding this task alone in the batch they were to
    /// run next, before it started.
    deaths_before_start: HashMap<u64, u32>,
    fail_fast: bool,
    /// Set once fail-fast has stopped the run.
    stopped: bool,
    _types: PhantomData<fn(A) -> R>,
}

impl<'p, I, A, R> Run<'p, I, A, R>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    /// A run whose first task has index `first_index` (0 for a `map`).
    pub fn new(
        pool: &'p mut Pool,
        sizer: &'p mut BatchSizer,
        input: I,
        (root_seed, first_index): (u64, u64),
        ordered: bool,
        fail_fast: bool,
    ) -> Self {
        stamp(Step::MapStart);
        let collector = if ordered {
            Collector::Ordered {
                base: first_index,
                slots: VecDeque::new(),
            }
        } else {
            Collector::Unordered {
                ready: VecDeque::new(),
            }
        };
        Run {
            pool,
            sizer,
            input,
            exhausted: false,
            next_index: first_index,
            root_seed,
            collector,
            queued: VecDeque::new(),
            deaths: HashMap::new(),
            deaths_before_start: HashMap::new(),
            fail_fast,
            stopped: false,
            _types: PhantomData,
        }
    }

    fn in_flight(&self) -> bool {
        self.pool.workers.iter().any(|w| !w.in_flight.is_empty())
    }

    /// The next result, waiting for workers as needed.
    pub fn next_result(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        if self.stopped {
            return None;
        }
        let result = self.next_inner()?;
        if self.fail_fast && result.1.is_err() {
            self.cancel();
            self.stopped = true;
        }
        Some(result)
    }

    fn next_inner(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        loop {
            if let Some(result) = self.collector.take() {
                return Some(result);
            }
            self.dispatch();
            if let Some(result) = self.collector.take() {
                return Some(result);
            }
            if !self.in_flight() {
                if self.exhausted && self.queued.is_empty() {
                    return None;
                }
                if self.pool.workers.is_empty() {
                    return self.fail_without_workers();
                }
                continue;
            }
            self.wait_and_collect();
        }
    }

    /// No worker runs and none could be started: fail what is left, one by one.
    fn fail_without_workers(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        let msg = "no worker is running and none could be started";
        if let Some(batch) = self.queued.pop_front() {
            for i in 0..u64::from(batch.count()) {
                let index = batch.first_index + i;
                self.collector.put(index, Err(TaskError::pool(index, msg)));
            }
            return self.collector.take();
        }
        let index = self.next_index;
        self.input.next()?;
        self.next_index += 1;
        Some((index, Err(TaskError::pool(index, msg))))
    }

    /// Gives every worker with room a batch: retries first, then new input.
    fn dispatch(&mut self) {
        loop {
            let Some(slot) = (0..self.pool.workers.len())
                .filter(|&i| self.pool.workers[i].in_flight.len() < IN_FLIGHT_PER_WORKER)
                .filter(|&i| self.pool.workers[i].stopping.is_none())
                .min_by_key(|&i| self.pool.workers[i].in_flight.len())
            else {
                return;
            };
            let mut batch = match self.queued.pop_front() {
                Some(batch) => batch,
                None if self.exhausted => return,
                None => match self.build_batch() {
                    Some(batch) => batch,
                    None => return,
                },
            };
            let worker = &mut self.pool.workers[slot];
            worker.send_batch(&mut batch, self.root_seed);
            worker.in_flight.push_back(batch);
            // A broken link shows up as the worker's death at the next poll.
            let _ = worker.flush();
        }
    }

    /// Encodes the next batch of new input; `None` when there is none now.
    fn build_batch(&mut self) -> Option<Batch> {
        let max_count = self.sizer.count() as usize;
        let max_bytes = self.sizer.max_bytes();
        let mut batch = Batch {
            first_index: self.next_index,
            offsets: Vec::new(),
            items: Vec::new(),
            in_arena: false,
        };
        // Whether the next argument is expected to take 128 bytes or more
        // (see `begin_item`): the first is; then each is like the one before.
        let mut large = true;
        while batch.offsets.len() < max_count && batch.items.len() < max_bytes {
            let Some(item) = self.input.next() else {
                self.exhausted = true;
                break;
            };
            let mark = batch.items.len();
            let index = self.next_index;
            self.next_index += 1;
            if let Err(failure) = encode_argument(item, &mut batch.items, &mut large) {
                // This argument cannot be sent: it fails alone, and the batch
                // so far goes out without it.
                self.collector
                    .put(index, Err(TaskError::from_failure(index, failure)));
                break;
            }
            if mark > 0 && batch.items.len() > max_bytes.min(MAX_ARGUMENT_BYTES) {
                // It would take the batch past its byte limit (or past what
                // a message carries): it starts the next batch instead.
                self.queued.push_back(Batch {
                    first_index: index,
                    offsets: vec![0],
                    items: batch.items.split_off(mark),
                    in_arena: false,
                });
                break;
            }
            batch.offsets.push(mark as u32);
        }
        stamp(Step::BatchBuilt);
        (!batch.offsets.is_empty()).then_some(batch)
    }

    /// Waits until some worker has results, died, or ran past a time limit.
    fn wait_and_collect(&mut self) {
        // Frames may already wait in a reader's buffer (they can arrive with
        // a READY); handle them before blocking on new ones.
        if let Some(slot) = self.pool.workers.iter().position(|w| w.reader.has_frame()) {
            if self.collect_frames(slot).is_err() {
                self.worker_died(slot);
            }
            return;
        }
        let timeout = self.pool.spec.task_timeout;
        // One busy worker, nothing to send and no clock to watch: block in
        // its read directly, which wakes sooner than poll (a lone task).
        let mut busy = self
            .pool
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.in_flight.is_empty());
        if let (Some((slot, _)), None, None) = (busy.next(), busy.next(), timeout) {
            if !self.pool.workers.iter().any(Worker::has_output) {
                let worker = &mut self.pool.workers[slot];
                let status = worker.reader.fill(worker.link.read.as_raw_fd());
                let closed = !matches!(status, Ok(ReadStatus::Data) | Ok(ReadStatus::Empty));
                if self.collect_frames(slot).is_err() || closed {
                    self.worker_died(slot);
                }
                return;
            }
        }
        let wait_ms = self.enforce_timeouts();
        // One entry per worker's read end, then one per write end with output
        // waiting; `owners[i]` is the worker slot of `pollfds[i]`.
        let mut pollfds = Vec::with_capacity(self.pool.workers.len() * 2);
        let mut owners = Vec::with_capacity(self.pool.workers.len() * 2);
        for (slot, w) in self.pool.workers.iter().enumerate() {
            pollfds.push(libc::pollfd {
                fd: w.link.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            owners.push(slot);
            if w.has_output() {
                pollfds.push(libc::pollfd {
                    fd: w.link.write.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                });
                owners.push(slot);
            }
        }
        // SAFETY: `pollfds` is a valid array of its length.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, wait_ms) };
        if n <= 0 {
            return;
        }
        let mut dead = Vec::new();
        for (pfd, &slot) in pollfds.iter().zip(&owners) {
            if pfd.revents == 0 || dead.contains(&slot) {
                continue;
            }
            let worker = &mut self.pool.workers[slot];
            if pfd.events == libc::POLLOUT {
                // Writable, or the worker's read end closed (POLLERR).
                if worker.flush().is_err() {
                    dead.push(slot);
                }
                continue;
            }
            let status = worker.reader.fill(worker.link.read.as_raw_fd());
            let closed = !matches!(status, Ok(ReadStatus::Data) | Ok(ReadStatus::Empty));
            if self.collect_frames(slot).is_err() || closed {
                dead.push(slot);
            }
        }
        // Highest slot first: replacing a worker may remove its slot.
        dead.sort_unstable();
        for slot in dead.into_iter().rev() {
            self.worker_died(slot);
        }
    }

    /// Stops workers whose task ran past the time limit (SIGTERM, then
    /// SIGKILL after a grace period); returns how long poll may wait (ms).
    fn enforce_timeouts(&mut self) -> i32 {
        let Some(limit) = self.pool.spec.task_timeout else {
            return -1;
        };
        let now_ns = monotonic_ns();
        let now = Instant::now();
        let mut wait = Duration::MAX;
        for worker in &mut self.pool.workers {
            if let Some(stopping) = &mut worker.stopping {
                let left = TERM_GRACE.saturating_sub(now - stopping.since);
                if left.is_zero() && !stopping.killed {
                    worker.reaper.kill(worker.pid, libc::SIGKILL);
                    stopping.killed = true;
                } else if !stopping.killed {
                    wait = wait.min(left);
                }
                continue;
            }
            if worker.in_flight.is_empty() {
                continue;
            }
            let (task, ran) = match &worker.status {
                Some(page) => {
                    let words = page.words();
                    let Some(task) = words.current_task() else {
                        // Sent but not started yet: look again very soon.
                        wait = wait.min(Duration::from_millis(10));
                        continue;
                    };
                    let started = words.started_ns.load(Ordering::Relaxed);
                    (task, Duration::from_nanos(now_ns.saturating_sub(started)))
                }
                // An isolated call: its one task waited in the pipe from the
                // moment the process was asked for.
                None => match worker.in_flight.front() {
                    Some(batch) => (batch.first_index, worker.launched_at.elapsed()),
                    None => continue,
                },
            };
            if ran >= limit {
                worker.reaper.kill(worker.pid, libc::SIGTERM);
                worker.stopping = Some(Stopping {
                    task,
                    since: now,
                    killed: false,
                });
                wait = wait.min(TERM_GRACE);
            } else {
                wait = wait.min(limit - ran);
            }
        }
        if wait == Duration::MAX {
            -1
        } else {
            (wait.as_millis() as i32).saturating_add(1)
        }
    }

    /// Handles every complete frame a worker has sent.
    fn collect_frames(&mut self, slot: usize) -> Result<(), ()> {
        loop {
            let worker = &mut self.pool.workers[slot];
            let worker_id = worker.id;
            let frame = match worker.reader.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(_) => return Err(()),
            };
            match frame {
                (from_worker::LOG, body) => {
                    if let Ok(record) = postcard::from_bytes::<LogRecord>(body) {
                        emit_log(&record, worker_id);
                    }
                }
                (from_worker::RESULTS, body) => take_results(
                    &mut worker.in_flight,
                    &mut worker.arena,
                    self.sizer,
                    &mut self.collector,
                    body,
                )?,
                (from_worker::RESULTS_IN_ARENA, frame_body) => {
                    let Some(page) = worker.status.as_ref() else {
                        return Err(());
                    };
                    let Some(body) = page.results_span(frame_body) else {
                        return Err(());
                    };
                    // The worker wrote the span before it sent the frame.
                    fence(Ordering::Acquire);
                    take_results(
                        &mut worker.in_flight,
                        &mut worker.arena,
                        self.sizer,
                        &mut self.collector,
                        body,
                    )?;
                    // Decoded: the worker may write the span again.
                    page.words()
                        .results_released
                        .fetch_add(1, Ordering::Release);
                }
                _ => return Err(()),
            }
        }
    }

    /// A worker's link closed or broke: blame the task it was running, run
    /// the others it held again, and replace it.
    fn worker_died(&mut self, slot: usize) {
        let worker = &mut self.pool.workers[slot];
        let running = match &worker.status {
            Some(page) => page.words().current_task(),
            // An isolated call's worker runs its one task or nothing.
            None => worker.in_flight.front().map(|b| b.first_index),
        };
        let timed_out = worker.stopping.as_ref().map(|s| s.task);
        let ended = worker.kill_and_reap();
        let (id, pid) = (worker.id, worker.pid);
        let held = std::mem::take(&mut worker.in_flight);
        let limit = self.pool.spec.task_timeout.unwrap_or_default();
        // The task to blame: the one we stopped for its time, else the one
        // the status page says was running.
        let culprit = timed_out.or(running);
        let held_culprit = culprit.filter(|&c| {
            held.iter()
                .any(|b| (b.first_index..b.first_index + u64::from(b.count())).contains(&c))
        });
        for (position, batch) in held.into_iter().enumerate() {
            let n = batch.count() as usize;
            let Some(c) = held_culprit
                .filter(|&c| c >= batch.first_index && c < batch.first_index + n as u64)
            else {
                if held_culprit.is_none() && position == 0 {
                    // It died with no task running: killed from outside, or
                    // while it read this batch, the only one it could have
                    // been reading. No task started, so none is blamed, but
                    // a batch that keeps killing workers before any task
                    // starts must not loop forever.
                    self.died_before_start(batch, id, pid, &ended);
                } else {
                    self.queued.push_back(batch);
                }
                continue;
            };
            let at = (c - batch.first_index) as usize;
            if at > 0 {
                self.queued.push_back(batch.slice(0..at));
            }
            let deaths = self.deaths.entry(c).or_insert(0);
            *deaths += 1;
            if timed_out == Some(c) {
                let err = TaskError::worker_died(c, id, pid, ended.clone(), Death::Timeout(limit));
                self.collector.put(c, Err(err));
            } else if *deaths >= self.pool.spec.max_tries {
                let err = TaskError::worker_died(c, id, pid, ended.clone(), Death::Crash);
                self.collector.put(c, Err(err));
            } else {
                // Once more, alone, so a second death names it for certain.
                self.queued.push_front(batch.slice(at..at + 1));
            }
            if at + 1 < n {
                self.queued.push_back(batch.slice(at + 1..n));
            }
        }
        self.pool.replace(slot);
    }

    /// Runs `batch` again after its worker died before starting any of its
    /// tasks: no task is blamed. If the batch itself kills workers (they die
    /// reading it, or a task hides its start), running it in halves finds
    /// the one task that does; after [`DEATHS_BEFORE_START`] such deaths
    /// alone in its batch, that task fails with the last one's exit status.
    fn died_before_start(
        &mut self,
        batch: Batch,
        id: u32,
        pid: u32,
        ended: &Option<launch::Ended>,
    ) {
        let n = batch.count() as usize;
        if n > 1 {
            self.queued.push_front(batch.slice(n / 2..n));
            self.queued.push_front(batch.slice(0..n / 2));
            return;
        }
        let index = batch.first_index;
        let deaths = self.deaths_before_start.entry(index).or_insert(0);
        *deaths += 1;
        if *deaths < DEATHS_BEFORE_START {
            self.queued.push_front(batch);
            return;
        }
        let err = TaskError::worker_died(
            index,
            id,
            pid,
            ended.clone(),
            Death::BeforeStart(DEATHS_BEFORE_START),
        );
        self.collector.put(index, Err(err));
    }

    /// Stops all work of this run: busy workers are killed and replaced, and
    /// nothing more is sent.
    fn cancel(&mut self) {
        self.exhausted = true;
        self.queued.clear();
        for slot in (0..self.pool.workers.len()).rev() {
            let worker = &mut self.pool.workers[slot];
            if worker.in_flight.is_empty() {
                continue;
            }
            worker.in_flight.clear();
            worker.kill_and_reap();
            self.pool.replace(slot);
        }
    }
}

impl<I, A, R> Drop for Run<'_, I, A, R>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    fn drop(&mut self) {
        // Work still running belongs to this run and nobody wants it: stop
        // it now rather than wait for it (its tasks may be slow).
        self.cancel();
    }
}

/// Handles a RESULTS body: checks it answers the oldest batch in flight,
/// releases that batch (and its arena span), and decodes its outcomes.
fn take_results<R: DeserializeOwned>(
    in_flight: &mut VecDeque<Batch>,
    arena: &mut Ring,
    sizer: &mut BatchSizer,
    collector: &mut Collector<R>,
    body: &[u8],
) -> Result<(), ()> {
    if body.len() < RESULTS_HEADER {
        return Err(());
    }
    let first_index = le_u64(body, 0);
    let count = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
    let elapsed_ns = le_u64(body, 12);
    let matches_head = in_flight
        .front()
        .is_some_and(|b| b.first_index == first_index && b.count() == count);
    if !matches_head {
        return Err(());
    }
    if in_flight.pop_front().is_some_and(|b| b.in_arena) {
        arena.release_oldest();
    }
    sizer.observe(count, elapsed_ns);
    decode_results(collector, first_index, count, &body[RESULTS_HEADER..]);
    stamp(Step::ResultsDecoded);
    Ok(())
}

/// Decodes `count` outcomes, each a framed item, into the collector. The
/// result type's `Deserialize` runs under `catch_unwind`: its panic, like a
/// decoding error, fails that task alone.
fn decode_results<R: DeserializeOwned>(
    collector: &mut Collector<R>,
    first_index: u64,
    count: u32,
    mut bytes: &[u8],
) {
    capturing(|| {
        for i in 0..u64::from(count) {
            let index = first_index + i;
            let result = match split_item(&mut bytes) {
                Some(item) => decode_outcome(index, item),
                None => Err(TaskError::bad_result(
                    index,
                    format!(
                        "malformed results: task {index} (item {i} of {count}) is not a whole item"
                    ),
                )),
            };
            collector.put(index, result);
        }
    });
}

/// Decodes the outcome of task `index` from its item. Call it while
/// [`capturing`] panics.
#[inline]
pub(crate) fn decode_outcome<R: DeserializeOwned>(index: u64, item: &[u8]) -> Result<R, TaskError> {
    match catch(|| postcard::from_bytes::<Result<R, TaskFailure>>(item)) {
        Ok(Ok(outcome)) => outcome.map_err(|f| TaskError::from_failure(index, f)),
        Ok(Err(e)) => Err(TaskError::bad_result(
            index,
            format!("cannot decode result: {e}"),
        )),
        Err(panic) => Err(TaskError::from_failure(index, panic)),
    }
}
