//! Dispatch and waiting: batches pushed to workers, outcomes and deaths
//! pulled back. Nothing here is generic over the user's types: it moves
//! encoded batches, and hands each batch's encoded outcomes to a [`Sink`].
//!
//! It is driven by calls, so anything can push work to it: a `map` that
//! reads its input as results are taken, a producer that adds tasks one by
//! one, or several stages of a pipeline.
//!
//! ```text
//! while engine.wants_batch() { engine.submit(next_batch) }
//! engine.wait(&mut sink)    // outcomes, deaths, timeouts → sink
//! ```

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use procpool_worker::stamps::{Step, stamp};
use procpool_worker::sys::monotonic_ns;
use procpool_worker::wire::frame::ReadStatus;
use procpool_worker::wire::{LogRecord, ResultsHeader, from_worker};

use super::batch::Batch;
use super::blame::{LastWords, Ledger};
use super::worker::{Stopping, Worker, emit_log};
use super::{IN_FLIGHT_PER_WORKER, TERM_GRACE, Workers};
use crate::batching::BatchSizer;
use crate::error::TaskError;

/// Where the engine delivers what comes back for the batches it was given.
pub(crate) trait Sink {
    /// The encoded outcomes of tasks `first_index..first_index + count`,
    /// each a framed item (see `procpool_worker::wire::split_item`).
    fn outcomes(&mut self, first_index: u64, count: u32, items: &[u8]);
    /// Task `index` failed without an outcome: its worker died, or it ran
    /// past its time limit.
    fn failed(&mut self, index: u64, error: TaskError);
}

/// One run of work on a pool's workers: the batches sent and not answered
/// yet, those waiting to be sent, and the deaths charged so far.
pub(crate) struct Engine<'p> {
    workers: &'p mut Workers,
    sizer: &'p mut BatchSizer,
    root_seed: u64,
    /// Batches that go out before new work: tasks to run again because a
    /// worker died holding them, and work submitted while no worker had
    /// room.
    queued: VecDeque<Batch>,
    ledger: Ledger,
}

/// What an engine keeps from one call to the next, for a driver that
/// cannot keep it borrowed in between (a producer adding tasks one by one):
/// the batches waiting to go out, and the deaths charged so far.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    queued: VecDeque<Batch>,
    ledger: Ledger,
}

impl<'p> Engine<'p> {
    /// An engine over `workers`, whose tasks derive their seeds from
    /// `root_seed`, sizing batches with `sizer`.
    pub(crate) fn new(workers: &'p mut Workers, sizer: &'p mut BatchSizer, root_seed: u64) -> Self {
        Engine::resume(workers, sizer, root_seed, Backlog::default())
    }

    /// An engine that goes on where one left off with `backlog`.
    pub(crate) fn resume(
        workers: &'p mut Workers,
        sizer: &'p mut BatchSizer,
        root_seed: u64,
        backlog: Backlog,
    ) -> Self {
        Engine {
            workers,
            sizer,
            root_seed,
            queued: backlog.queued,
            ledger: backlog.ledger,
        }
    }

    /// Lets the workers go, keeping what the engine has not finished.
    pub(crate) fn suspend(self) -> Backlog {
        Backlog {
            queued: self.queued,
            ledger: self.ledger,
        }
    }

    /// How many tasks, and how many bytes of encoded arguments, the next
    /// batch should hold at most.
    #[inline]
    pub(crate) fn batch_limits(&self) -> (usize, usize) {
        (self.sizer.count() as usize, self.sizer.max_bytes())
    }

    /// The worker slot that should take the next batch: the least busy of
    /// those with room that are not being stopped.
    #[inline]
    fn free_slot(&self) -> Option<usize> {
        let workers = &self.workers.workers;
        (0..workers.len())
            .filter(|&i| workers[i].in_flight.len() < IN_FLIGHT_PER_WORKER)
            .filter(|&i| workers[i].stopping.is_none())
            .min_by_key(|&i| workers[i].in_flight.len())
    }

    /// Sends queued batches to workers with room; then whether a worker
    /// would take a new batch at once.
    #[inline]
    pub(crate) fn wants_batch(&mut self) -> bool {
        loop {
            let Some(slot) = self.free_slot() else {
                return false;
            };
            let Some(batch) = self.queued.pop_front() else {
                return true;
            };
            self.send(slot, batch);
        }
    }

    /// Gives the engine a batch: it goes to a worker with room now, or
    /// waits its turn.
    #[inline]
    pub(crate) fn submit(&mut self, batch: Batch) {
        match self.free_slot().filter(|_| self.queued.is_empty()) {
            Some(slot) => self.send(slot, batch),
            None => self.queued.push_back(batch),
        }
    }

    #[inline]
    fn send(&mut self, slot: usize, mut batch: Batch) {
        let worker = &mut self.workers.workers[slot];
        worker.send_batch(&mut batch, self.root_seed);
        worker.in_flight.push_back(batch);
        // A broken link shows up as the worker's death at the next wait.
        let _ = worker.flush();
    }

    /// Whether some worker holds a batch not answered yet.
    #[inline]
    pub(crate) fn in_flight(&self) -> bool {
        self.workers.workers.iter().any(|w| !w.in_flight.is_empty())
    }

    /// Whether batches wait to be sent.
    pub(crate) fn has_queued(&self) -> bool {
        !self.queued.is_empty()
    }

    /// Whether any worker is running (a pool that cannot replace its dead
    /// workers may have none left).
    pub(crate) fn has_workers(&self) -> bool {
        !self.workers.workers.is_empty()
    }

    /// Takes back the oldest batch waiting to be sent.
    pub(crate) fn take_queued(&mut self) -> Option<Batch> {
        self.queued.pop_front()
    }

    /// Waits until some worker has results, died, or ran past a time limit,
    /// and delivers what came back to `sink`.
    pub(crate) fn wait(&mut self, sink: &mut dyn Sink) {
        if self.collect_buffered(sink) {
            return;
        }
        // One busy worker, nothing to send and no clock to watch: block in
        // its read directly, which wakes sooner than poll (a lone task).
        let lone = self.lone_busy_worker();
        if let Some(slot) = lone {
            let worker = &mut self.workers.workers[slot];
            let status = worker.reader.fill(worker.link.read.as_raw_fd());
            let closed = !matches!(status, Ok(ReadStatus::Data) | Ok(ReadStatus::Empty));
            if self.collect_frames(slot, sink).is_err() || closed {
                self.worker_died(slot, sink);
            }
            return;
        }
        self.poll_and_collect(sink, None);
    }

    /// Like [`wait`](Self::wait), but also returns when `doorbell` becomes
    /// readable (the caller clears it), for a driver that has other work to
    /// watch: a pipeline stage whose input may arrive while its workers are
    /// busy.
    pub(crate) fn wait_or_woken(&mut self, sink: &mut dyn Sink, doorbell: RawFd) {
        if !self.collect_buffered(sink) {
            self.poll_and_collect(sink, Some(doorbell));
        }
    }

    /// Handles the frames already in a worker's read buffer (they can
    /// arrive with a READY), before blocking on new ones; whether there
    /// were any.
    fn collect_buffered(&mut self, sink: &mut dyn Sink) -> bool {
        let buffered = self
            .workers
            .workers
            .iter()
            .position(|w| w.reader.has_frame());
        let Some(slot) = buffered else {
            return false;
        };
        if self.collect_frames(slot, sink).is_err() {
            self.worker_died(slot, sink);
        }
        true
    }

    /// The one worker with work, when nothing else needs watching.
    #[inline]
    fn lone_busy_worker(&self) -> Option<usize> {
        if self.workers.spec.task_timeout.is_some() {
            return None;
        }
        let workers = &self.workers.workers;
        let mut busy = (0..workers.len()).filter(|&i| !workers[i].in_flight.is_empty());
        match (busy.next(), busy.next()) {
            (Some(slot), None) if !workers.iter().any(Worker::has_output) => Some(slot),
            _ => None,
        }
    }

    /// Polls every worker's link (and the write ends with output waiting)
    /// until something happens or a time limit needs enforcing.
    fn poll_and_collect(&mut self, sink: &mut dyn Sink, doorbell: Option<RawFd>) {
        let wait_ms = self.enforce_timeouts();
        let workers = &self.workers.workers;
        // One entry per worker's read end, then one per write end with output
        // waiting; `owners[i]` is the worker slot of `pollfds[i]`. The
        // doorbell, if any, comes last and has no owner.
        let mut pollfds = Vec::with_capacity(workers.len() * 2 + 1);
        let mut owners = Vec::with_capacity(workers.len() * 2);
        for (slot, w) in workers.iter().enumerate() {
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
        if let Some(fd) = doorbell {
            pollfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
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
            let worker = &mut self.workers.workers[slot];
            if pfd.events == libc::POLLOUT {
                // Writable, or the worker's read end closed (POLLERR).
                if worker.flush().is_err() {
                    dead.push(slot);
                }
                continue;
            }
            let status = worker.reader.fill(worker.link.read.as_raw_fd());
            let closed = !matches!(status, Ok(ReadStatus::Data) | Ok(ReadStatus::Empty));
            if self.collect_frames(slot, sink).is_err() || closed {
                dead.push(slot);
            }
        }
        // Highest slot first: replacing a worker may remove its slot.
        dead.sort_unstable();
        for slot in dead.into_iter().rev() {
            self.worker_died(slot, sink);
        }
    }

    /// Stops workers whose task ran past the time limit (SIGTERM, then
    /// SIGKILL after a grace period); returns how long poll may wait (ms).
    fn enforce_timeouts(&mut self) -> i32 {
        let Some(limit) = self.workers.spec.task_timeout else {
            return -1;
        };
        let now_ns = monotonic_ns();
        let now = Instant::now();
        let mut wait = Duration::MAX;
        for worker in &mut self.workers.workers {
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
            // Rounded up, so poll does not wake just before the limit.
            wait.as_millis().saturating_add(1).min(i32::MAX as u128) as i32
        }
    }

    /// Handles every complete frame a worker has sent.
    fn collect_frames(&mut self, slot: usize, sink: &mut dyn Sink) -> Result<(), ()> {
        let worker = &mut self.workers.workers[slot];
        let worker_id = worker.id;
        loop {
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
                    sink,
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
                        sink,
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

    /// A worker's link closed or broke: charge the death (see
    /// [`Ledger::after_death`]), queue what runs again, and replace it.
    fn worker_died(&mut self, slot: usize, sink: &mut dyn Sink) {
        let worker = &mut self.workers.workers[slot];
        let last = LastWords {
            running: match &worker.status {
                Some(page) => page.words().current_task(),
                // An isolated call's worker runs its one task or nothing.
                None => worker.in_flight.front().map(|b| b.first_index),
            },
            timed_out: worker.stopping.as_ref().map(|s| s.task),
        };
        let ended = worker.kill_and_reap().map(|e| (e.exit, e.stderr_tail));
        let (id, pid) = (worker.id, worker.pid);
        let held = std::mem::take(&mut worker.in_flight);
        let spec = &self.workers.spec;
        let time_limit = spec.task_timeout.unwrap_or_default();
        let after = self
            .ledger
            .after_death(held, last, spec.max_tries, time_limit);
        for batch in after.first.into_iter().rev() {
            self.queued.push_front(batch);
        }
        self.queued.extend(after.later);
        for (index, death) in after.failed {
            sink.failed(
                index,
                TaskError::worker_died(index, id, pid, ended.clone(), death),
            );
        }
        self.workers.replace(slot);
    }

    /// Stops all work: busy workers are killed and replaced, and nothing
    /// queued is sent.
    pub(crate) fn cancel(&mut self) {
        self.queued.clear();
        let workers = &mut *self.workers;
        for slot in (0..workers.workers.len()).rev() {
            let worker = &mut workers.workers[slot];
            if worker.in_flight.is_empty() {
                continue;
            }
            worker.in_flight.clear();
            worker.kill_and_reap();
            workers.replace(slot);
        }
    }
}

/// Handles a RESULTS body: checks it answers the oldest batch in flight,
/// releases that batch (and its arena span), and hands its outcomes on.
fn take_results(
    in_flight: &mut VecDeque<Batch>,
    arena: &mut procpool_worker::wire::region::Ring,
    sizer: &mut BatchSizer,
    sink: &mut dyn Sink,
    body: &[u8],
) -> Result<(), ()> {
    let Some((header, outcomes)) = ResultsHeader::decode(body) else {
        return Err(());
    };
    let ResultsHeader {
        first_index,
        count,
        elapsed_ns,
    } = header;
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
    sink.outcomes(first_index, count, outcomes);
    stamp(Step::ResultsDecoded);
    Ok(())
}
