//! One worker as the parent sees it: its link, status page and arena, the
//! batches it holds, and the handshake that makes a started process one.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{Ordering, fence};
use std::time::Instant;

use procpool_worker::sys::LinkEnds;
use procpool_worker::wire::frame::{self, FrameReader, ReadStatus};
use procpool_worker::wire::region::{self, ARENA_MIN_BYTES, Ring};
use procpool_worker::wire::{
    BATCH_HEADER, BUILD_MISMATCH, LogRecord, Ready, from_worker, level_from_wire, to_worker,
};

use super::batch::{Batch, begin_batch_frame};
use super::region::StatusPage;
use super::{EXIT_STATUS_TIMEOUT, HANDSHAKE_TIMEOUT};
use crate::error::PoolError;
use crate::launch::{self, Reaper};

/// Why we are stopping a worker, if we are.
pub(super) struct Stopping {
    /// The task that ran past its time limit.
    pub task: u64,
    /// When SIGTERM went out.
    pub since: Instant,
    pub killed: bool,
}

pub(super) struct Worker {
    pub id: u32,
    pub pid: u32,
    pub link: LinkEnds,
    /// None for an isolated call's worker (one batch of one task).
    pub status: Option<StatusPage>,
    /// When the worker was asked for; an isolated call's task was waiting
    /// in its pipe from then on.
    pub launched_at: Instant,
    pub reader: FrameReader,
    pub out: Outbox,
    pub in_flight: VecDeque<Batch>,
    /// Spans of the arena's parent half held by batches in flight.
    pub arena: Ring,
    pub reaper: Reaper,
    pub stopping: Option<Stopping>,
}

/// Frames for a worker that its pipe has not taken yet.
#[derive(Default)]
pub(super) struct Outbox {
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
            let n = frame::send_some(fd, &self.bytes[self.sent..])?;
            if n == 0 {
                return Ok(());
            }
            self.sent += n;
        }
        if self.bytes.capacity() > frame::RETAINED_BUFFER_BYTES {
            self.bytes = Vec::new();
        }
        self.bytes.clear();
        self.sent = 0;
        Ok(())
    }
}

impl Worker {
    #[inline]
    pub(super) fn has_output(&self) -> bool {
        self.out.has_output()
    }

    /// Sends as much pending output as the pipe takes without blocking.
    #[inline]
    pub(super) fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush(self.link.write.as_raw_fd())
    }

    /// Queues `batch` for the worker, through the arena if it is large and
    /// finds room there, else as a BATCH frame.
    #[inline]
    pub(super) fn send_batch(&mut self, batch: &mut Batch, root_seed: u64) {
        let len = BATCH_HEADER + batch.items.len();
        batch.in_arena = false;
        if let Some(page) = self.status.as_mut().filter(|_| len >= ARENA_MIN_BYTES)
            && let Some(offset) = self.arena.alloc(len)
        {
            let header = batch.header(root_seed);
            if page.write_batch(offset, &[&header, &batch.items]) {
                // The bytes are in place before the frame that names them.
                fence(Ordering::Release);
                let body = region::span_frame_body(offset, len);
                frame::push_frame(&mut self.out.bytes, to_worker::BATCH_IN_ARENA, &body);
                batch.in_arena = true;
                return;
            }
            self.arena.cancel_newest();
        }
        let out = &mut self.out.bytes;
        let start = begin_batch_frame(out, batch.first_index, root_seed, batch.count());
        out.extend_from_slice(&batch.items);
        frame::end_frame(out, start);
    }

    /// Kills the worker and waits for how it ended.
    pub(super) fn kill_and_reap(&mut self) -> Option<launch::Ended> {
        self.reaper.kill(self.pid, libc::SIGKILL);
        self.reaper.wait(self.pid, EXIT_STATUS_TIMEOUT)
    }
}

/// Re-emits a worker's log record through this process's logger.
pub(super) fn emit_log(record: &LogRecord, worker_id: u32) {
    let level = level_from_wire(record.level);
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

/// A started worker, before the handshake, with its status page if it has
/// one.
pub(super) struct Launched {
    pub started: launch::Launched,
    pub status: Option<StatusPage>,
}

/// Waits for a new worker's READY (its setup went out with it).
pub(super) fn handshake(id: u32, launched: Launched) -> Result<Worker, PoolError> {
    let launched_at = Instant::now();
    let Launched {
        started:
            launch::Launched {
                pid,
                link,
                mut reaper,
                first_frames,
                first_sent,
            },
        status,
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
