//! The engine behind a multi-process invoker: a set of workers, batches sent
//! to them, results collected in order or as they come, and workers that die
//! detected at once (their socket closes) and replaced.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use procpool_worker::protocol::{
    BATCH_HEADER, Hello, LogRecord, RESULTS_HEADER, Setup, TaskFailure, from_worker, to_worker,
};
use procpool_worker::sys::{self, FrameReader, LinkEnds, ReadStatus};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::batching::BatchSizer;
use crate::error::{PoolError, TaskError};
use crate::launch::{self, Reaper, StartMethod};

/// Batches each worker may hold at once: one running, one waiting, so a
/// worker never idles between batches.
const IN_FLIGHT_PER_WORKER: usize = 2;
/// How long a new worker may take to start and report ready.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the exit status of a worker whose link closed.
const EXIT_STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a worker may take to drain and exit at shutdown before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What every worker of a pool is set up with.
pub(crate) struct PoolSpec {
    pub method: StartMethod,
    pub n_jobs: usize,
    pub model: OwnedFd,
    pub setup: Setup,
}

struct InFlight {
    first_index: u64,
    count: u32,
}

struct Worker {
    id: u32,
    pid: u32,
    link: LinkEnds,
    reader: FrameReader,
    out: Vec<u8>,
    out_pos: usize,
    in_flight: VecDeque<InFlight>,
    reaper: Reaper,
}

impl Worker {
    fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Sends as much pending output as the socket takes without blocking.
    fn flush(&mut self) -> std::io::Result<()> {
        while self.has_output() {
            let n = sys::write_some(self.link.write.as_raw_fd(), &self.out[self.out_pos..])?;
            if n == 0 {
                return Ok(());
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
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

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Pool {
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
            launched.push(pool.launch_one()?);
        }
        for (id, worker) in launched {
            let worker = pool.handshake(id, worker)?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    fn launch_one(&mut self) -> Result<(u32, launch::Launched), PoolError> {
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        let label = format!("[procpool worker {id}] ");
        let launched = launch::launch(self.spec.method, &label, self.spec.model.as_fd())?;
        Ok((id, launched))
    }

    fn handshake(&self, id: u32, launched: launch::Launched) -> Result<Worker, PoolError> {
        let launch::Launched {
            pid,
            link,
            mut reaper,
        } = launched;
        let fd = link.read.as_raw_fd();
        let mut reader = FrameReader::default();
        let result = (|| {
            let hello: Hello = match read_frame_timeout(&mut reader, fd, id)? {
                (from_worker::HELLO, body) => postcard::from_bytes(&body)
                    .map_err(|e| PoolError::protocol(format!("bad hello: {e}")))?,
                (tag, _) => {
                    return Err(PoolError::protocol(format!(
                        "expected hello, got frame tag {tag}"
                    )));
                }
            };
            if hello.fingerprint != procpool_worker::fnref::fingerprint() {
                return Err(PoolError::build_mismatch());
            }
            let mut setup = self.spec.setup.clone();
            setup.worker_id = id;
            let body =
                postcard::to_allocvec(&setup).map_err(|e| PoolError::protocol(e.to_string()))?;
            let mut frame = Vec::new();
            sys::push_frame(&mut frame, to_worker::SETUP, &body);
            sys::write_all(link.write.as_raw_fd(), &frame)
                .map_err(|e| PoolError::io("send setup to a worker", e))?;
            match read_frame_timeout(&mut reader, fd, id)? {
                (from_worker::READY, _) => Ok(()),
                (from_worker::FATAL, body) => {
                    let msg: String =
                        postcard::from_bytes(&body).unwrap_or_else(|_| "unreadable error".into());
                    Err(PoolError::worker_fatal(msg))
                }
                (tag, _) => Err(PoolError::protocol(format!(
                    "expected ready, got frame tag {tag}"
                ))),
            }
        })();
        match result {
            Ok(()) => {
                // Writes must never block (a worker may be writing to us);
                // reads stay blocking and happen only when poll says so, or
                // when one worker alone has work (see `wait_and_collect`).
                sys::set_nonblocking(link.write.as_raw_fd(), true)
                    .map_err(|e| PoolError::io("configure a worker link", e))?;
                Ok(Worker {
                    id,
                    pid,
                    link,
                    reader,
                    out: Vec::new(),
                    out_pos: 0,
                    in_flight: VecDeque::new(),
                    reaper,
                })
            }
            Err(e) => {
                reaper.kill(pid, libc::SIGKILL);
                let status = reaper.wait(pid, EXIT_STATUS_TIMEOUT);
                if e.is_io() || e.is_worker_fatal() || e.is_build_mismatch() {
                    return Err(e);
                }
                Err(PoolError::protocol(format!(
                    "worker {id} (pid {pid}) failed during start-up ({e}); it ended with {}",
                    crate::error::describe_exit(status)
                )))
            }
        }
    }

    /// Replaces the worker at `slot` (whose process has ended) by a new one.
    fn replace(&mut self, slot: usize) -> Result<(), PoolError> {
        let (id, launched) = self.launch_one()?;
        let worker = self.handshake(id, launched)?;
        self.workers[slot] = worker;
        Ok(())
    }

    /// The process ids of the running workers.
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.pid).collect()
    }

    /// Stops every worker: asks each to exit, forwards the logs they still
    /// send, waits for them, and kills any that does not exit in time.
    pub fn shutdown(&mut self) {
        let mut frame = Vec::new();
        sys::push_frame(&mut frame, to_worker::SHUTDOWN, &[]);
        for worker in &mut self.workers {
            let _ = sys::write_all(worker.link.write.as_raw_fd(), &frame);
        }
        let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
        for worker in &mut self.workers {
            // Drain until the worker closes its end: nothing it logged is lost.
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match sys::wait_readable(worker.link.read.as_raw_fd(), left.as_millis() as i32) {
                    Ok(true) => {}
                    _ => break,
                }
                match worker.reader.fill(worker.link.read.as_raw_fd()) {
                    Ok(ReadStatus::Data) | Ok(ReadStatus::Empty) => {}
                    _ => break,
                }
                while let Ok(Some((tag, body))) = worker.reader.next_frame() {
                    if tag == from_worker::LOG {
                        if let Ok(record) = postcard::from_bytes::<LogRecord>(body) {
                            emit_log(&record, worker.id);
                        }
                    }
                }
            }
            if worker
                .reaper
                .wait(worker.pid, Duration::from_millis(200))
                .is_none()
            {
                worker.reaper.kill(worker.pid, libc::SIGKILL);
                worker.reaper.wait(worker.pid, EXIT_STATUS_TIMEOUT);
            }
        }
        self.workers.clear();
    }
}

/// Reads one frame, blocking up to the handshake timeout, re-emitting logs.
fn read_frame_timeout(
    reader: &mut FrameReader,
    fd: i32,
    worker_id: u32,
) -> Result<(u8, Vec<u8>), PoolError> {
    let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
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
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(PoolError::protocol("timed out waiting for a worker"));
        }
        if !sys::wait_readable(fd, left.as_millis().min(i32::MAX as u128) as i32)
            .map_err(|e| PoolError::io("wait for a worker", e))?
        {
            continue;
        }
        if reader
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
    batch: Vec<u8>,
    _types: PhantomData<fn(A) -> R>,
}

impl<'p, I, A, R> Run<'p, I, A, R>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    pub fn new(
        pool: &'p mut Pool,
        sizer: &'p mut BatchSizer,
        input: I,
        root_seed: u64,
        ordered: bool,
    ) -> Self {
        let collector = if ordered {
            Collector::Ordered {
                base: 0,
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
            next_index: 0,
            root_seed,
            collector,
            batch: Vec::new(),
            _types: PhantomData,
        }
    }

    fn in_flight(&self) -> bool {
        self.pool.workers.iter().any(|w| !w.in_flight.is_empty())
    }

    /// The next result, waiting for workers as needed.
    pub fn next_result(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        loop {
            if let Some(result) = self.collector.take() {
                return Some(result);
            }
            self.dispatch();
            if let Some(result) = self.collector.take() {
                return Some(result);
            }
            if !self.in_flight() {
                if self.exhausted {
                    return None;
                }
                if self.pool.workers.is_empty() {
                    // No worker could be started: fail the inputs one by one.
                    let index = self.next_index;
                    self.input.next()?;
                    self.next_index += 1;
                    return Some((
                        index,
                        Err(TaskError::pool(
                            index,
                            "no worker is running and none could be started",
                        )),
                    ));
                }
                continue;
            }
            self.wait_and_collect();
        }
    }

    /// Gives every worker with room a new batch from the input.
    fn dispatch(&mut self) {
        while !self.exhausted {
            let Some(slot) = (0..self.pool.workers.len())
                .filter(|&i| self.pool.workers[i].in_flight.len() < IN_FLIGHT_PER_WORKER)
                .min_by_key(|&i| self.pool.workers[i].in_flight.len())
            else {
                break;
            };
            let Some((first_index, count)) = self.build_batch() else {
                break;
            };
            let worker = &mut self.pool.workers[slot];
            worker.out.extend_from_slice(&self.batch);
            worker.in_flight.push_back(InFlight { first_index, count });
            if worker.flush().is_err() {
                // The link is broken; the next poll reports the worker's death.
            }
        }
    }

    /// Encodes the next batch into `self.batch` as a whole frame; `None`
    /// when the input has nothing more to send now.
    fn build_batch(&mut self) -> Option<(u64, u32)> {
        let max_count = self.sizer.count();
        let max_bytes = self.sizer.max_bytes();
        self.batch.clear();
        let start = sys::begin_frame(&mut self.batch, to_worker::BATCH);
        let first_index = self.next_index;
        self.batch.extend_from_slice(&first_index.to_le_bytes());
        self.batch.extend_from_slice(&self.root_seed.to_le_bytes());
        self.batch.extend_from_slice(&0u32.to_le_bytes());
        let items_start = self.batch.len();
        let mut count: u32 = 0;
        while count < max_count && self.batch.len() - items_start < max_bytes {
            let Some(item) = self.input.next() else {
                self.exhausted = true;
                break;
            };
            let mark = self.batch.len();
            if let Err(e) = postcard::to_io(&item, &mut self.batch) {
                // This argument cannot be sent: it fails alone, and the batch
                // so far goes out without it.
                self.batch.truncate(mark);
                let index = first_index + u64::from(count);
                self.next_index = index + 1;
                self.collector.put(
                    index,
                    Err(TaskError::from_failure(
                        index,
                        TaskFailure::BadArgument(format!("cannot encode argument: {e}")),
                    )),
                );
                break;
            }
            count += 1;
            self.next_index = first_index + u64::from(count);
        }
        if count == 0 {
            return None;
        }
        let count_at = start + 5 + 16;
        self.batch[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        sys::end_frame(&mut self.batch, start);
        debug_assert_eq!(BATCH_HEADER, 20);
        Some((first_index, count))
    }

    /// Waits until some worker has results (or died), and collects them.
    fn wait_and_collect(&mut self) {
        // One busy worker and nothing to send: block in its read directly,
        // which wakes sooner than poll does (a lone task's round trip).
        let mut busy = self
            .pool
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.in_flight.is_empty());
        if let (Some((slot, _)), None) = (busy.next(), busy.next()) {
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
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
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
                (from_worker::RESULTS, body) if body.len() >= RESULTS_HEADER => {
                    let first_index = le_u64(body, 0);
                    let count = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
                    let elapsed_ns = le_u64(body, 12);
                    let matches_head = worker
                        .in_flight
                        .front()
                        .is_some_and(|b| b.first_index == first_index && b.count == count);
                    if !matches_head {
                        return Err(());
                    }
                    worker.in_flight.pop_front();
                    self.sizer.observe(count, elapsed_ns);
                    decode_results(
                        &mut self.collector,
                        first_index,
                        count,
                        &body[RESULTS_HEADER..],
                    );
                }
                _ => return Err(()),
            }
        }
    }

    /// A worker's link closed or broke: fail what it held, replace it.
    fn worker_died(&mut self, slot: usize) {
        let worker = &mut self.pool.workers[slot];
        worker.reaper.kill(worker.pid, libc::SIGKILL);
        let exit = worker.reaper.wait(worker.pid, EXIT_STATUS_TIMEOUT);
        let (id, pid) = (worker.id, worker.pid);
        for batch in std::mem::take(&mut worker.in_flight) {
            for i in 0..u64::from(batch.count) {
                let index = batch.first_index + i;
                self.collector
                    .put(index, Err(TaskError::worker_died(index, id, pid, exit)));
            }
        }
        if let Err(e) = self.pool.replace(slot) {
            log::error!(target: "procpool", "cannot replace worker {id} (pid {pid}): {e}");
            self.pool.workers.remove(slot);
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
        // Results still on their way belong to this run; collect and discard
        // them so the next run starts on clean links. At most two batches per
        // worker are in flight, so this is bounded too.
        while self.in_flight() {
            self.wait_and_collect();
        }
    }
}

/// Decodes `count` outcomes into the collector.
fn decode_results<R: DeserializeOwned>(
    collector: &mut Collector<R>,
    first_index: u64,
    count: u32,
    mut bytes: &[u8],
) {
    let mut broken: Option<String> = None;
    for i in 0..u64::from(count) {
        let index = first_index + i;
        let result = match &broken {
            Some(msg) => Err(TaskError::bad_result(index, msg.clone())),
            None => match postcard::take_from_bytes::<Result<R, TaskFailure>>(bytes) {
                Ok((outcome, rest)) => {
                    bytes = rest;
                    outcome.map_err(|f| TaskError::from_failure(index, f))
                }
                Err(e) => {
                    let msg = format!("cannot decode result: {e}");
                    broken = Some(msg.clone());
                    Err(TaskError::bad_result(index, msg))
                }
            },
        };
        collector.put(index, result);
    }
}
