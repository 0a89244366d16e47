//! Starting, replacing and stopping the worker processes of a pool.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use procpool_worker::sys;
use procpool_worker::wire::frame::{self, ReadStatus};
use procpool_worker::wire::region;
use procpool_worker::wire::{LogRecord, TaskFailure, from_worker, to_worker};
use serde::Serialize;

use super::batch::{Batch, task_frame};
use super::region::StatusPage;
use super::worker::{Launched, Worker, emit_log, handshake};
use super::{PoolSpec, SHUTDOWN_GRACE};
use crate::error::PoolError;
use crate::launch;

/// A running set of workers.
pub(crate) struct Workers {
    pub(super) spec: PoolSpec,
    pub(super) workers: Vec<Worker>,
    next_worker_id: u32,
}

impl Workers {
    /// Starts one worker whose only task (index `index`) is already waiting
    /// in its pipe behind its setup, so it runs without a round trip more:
    /// an isolated call, whose task is known before the process exists.
    /// `arg` is encoded once, in place, behind the setup frame; if it cannot
    /// be sent, no process is started and its failure is returned.
    pub(crate) fn start_with_task<A: Serialize>(
        spec: PoolSpec,
        index: u64,
        root_seed: u64,
        arg: A,
    ) -> Result<Result<Workers, PoolError>, TaskFailure> {
        debug_assert_eq!(spec.n_jobs, 1);
        let mut spec = spec;
        // Nothing follows the batch: the worker may exit as soon as it has
        // answered, rather than wake once more to see its link close.
        spec.setup.one_batch = true;
        let mut pool = Workers {
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
            let mut worker = handshake(id, launched)?;
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
    pub(crate) fn start(spec: PoolSpec) -> Result<Workers, PoolError> {
        let mut pool = Workers {
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
            let worker = handshake(id, worker)?;
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
        frame::push_frame(&mut frame, to_worker::SETUP, &body);
        Ok(frame)
    }

    /// Launches the next worker with `frames` (its setup, perhaps followed
    /// by a batch) waiting in its pipe.
    fn launch_one(&mut self, frames: Vec<u8>) -> Result<(u32, Launched), PoolError> {
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        let label = format!("[procpool worker {id}] ");
        let model = self.spec.model.as_ref().map(|m| m.as_fd());
        // An isolated call runs one task: nothing to tell apart, no page.
        let status = if self.spec.setup.one_batch {
            None
        } else {
            let half = region::half_bytes(self.spec.setup.memory_limit);
            Some(
                StatusPage::new(half)
                    .map_err(|e| PoolError::io("create a worker status page", e))?,
            )
        };
        let status_fd = status.as_ref().map(StatusPage::fd);
        let started = launch::launch(self.spec.method, status_fd, &label, frames, model)?;
        Ok((id, Launched { started, status }))
    }

    /// Replaces the worker at `slot` (whose process has ended) by a new one;
    /// if none can be started, or the pool does not replace workers, it goes
    /// on with one worker fewer.
    pub(super) fn replace(&mut self, slot: usize) {
        if !self.spec.replace_dead {
            self.workers.remove(slot);
            return;
        }
        let (id, pid) = (self.workers[slot].id, self.workers[slot].pid);
        match self
            .setup_frame(self.next_worker_id)
            .and_then(|frames| self.launch_one(frames))
            .and_then(|(id, launched)| handshake(id, launched))
        {
            Ok(worker) => self.workers[slot] = worker,
            Err(e) => {
                log::error!(target: "procpool", "cannot replace worker {id} (pid {pid}): {e}");
                self.workers.remove(slot);
            }
        }
    }

    /// The process ids of the running workers.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.pid).collect()
    }

    /// Lets every worker go without waiting: closing its link ends it (it
    /// exits at end of file). For a worker that has nothing more to say,
    /// such as an isolated call's once its result is in.
    pub(crate) fn release(&mut self) {
        for worker in self.workers.drain(..) {
            let pid = worker.pid;
            worker.reaper.release_later(pid);
        }
    }

    /// Kills every worker at once, without waiting for what it is running:
    /// for work that nobody will collect.
    pub(crate) fn kill_all(&mut self) {
        for mut worker in self.workers.drain(..) {
            worker.kill_and_reap();
        }
    }

    /// Stops every worker: asks each to exit, forwards the logs they still
    /// send, waits for them, and kills any that does not exit in time.
    pub(crate) fn shutdown(&mut self) {
        let mut frame = Vec::new();
        frame::push_frame(&mut frame, to_worker::SHUTDOWN, &[]);
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
                    if tag == from_worker::LOG
                        && let Ok(record) = postcard::from_bytes::<LogRecord>(body)
                    {
                        emit_log(&record, worker.id);
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
