//! The engine behind every multi-process API: a set of worker processes
//! ([`Workers`]), batches of encoded tasks pushed to them and their
//! outcomes pulled back ([`Engine`]), and the typed layer of a `map`
//! ([`Run`]), which encodes arguments and decodes results.
//!
//! - `workers`: starting, replacing and stopping the processes of a pool.
//! - `worker`: one worker's connection (its link, status page, arena and
//!   the batches it holds), and the handshake with a new one.
//! - `batch`: tasks with contiguous indices and their encoded arguments.
//! - `region`: the parent's side of a worker's status page and bulk arena.
//! - `dispatch`: the [`Engine`], dispatch and waiting, not generic over
//!   user types: driven by calls (submit a batch, wait for the next
//!   events), so that anything can push work to it.
//! - `blame`: which task a dead worker's death is charged to, and what runs
//!   again; pure logic, tested here without processes.
//! - `run`: a `map` over an input iterator, results in input order or as
//!   they complete.
//!
//! A worker that dies is noticed at once (its pipe reaches end of file). Its
//! status page says which task it was running: only that task fails (after
//! `max_tries` deaths), the other tasks it held run again elsewhere from the
//! copy of their arguments kept here, and a fresh worker takes its place.

mod batch;
mod blame;
mod dispatch;
mod region;
mod run;
mod worker;
mod workers;

#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::time::Duration;

use procpool_worker::wire::{Job, JobKind, Setup};
use procpool_worker::worker::jobs::{BatchRunner, JobFns};

use crate::launch::StartMethod;

pub(crate) use batch::{Batch, Feed, encode_argument};
pub(crate) use dispatch::{Backlog, Engine, Sink};
pub(crate) use run::{Run, decode_outcome};
pub(crate) use workers::Workers;

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

/// What a pool's workers run: a kind of job, the runner monomorphised for
/// the user's types, and the user's functions, all in this executable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JobSpec {
    pub(crate) kind: JobKind,
    pub(crate) runner: BatchRunner,
    pub(crate) fns: JobFns,
}

impl JobSpec {
    /// A map: `runner` calls the function at `task` once per task.
    pub(crate) fn map(runner: BatchRunner, task: usize) -> JobSpec {
        JobSpec {
            kind: JobKind::Map,
            runner,
            fns: JobFns { task, helper: 0 },
        }
    }

    /// As the worker's setup names it: offsets, not addresses.
    fn to_wire(self) -> Job {
        use procpool_worker::fnref::offset_of;
        Job {
            kind: self.kind,
            runner: offset_of(self.runner as usize),
            task: offset_of(self.fns.task),
            helper: (self.fns.helper != 0).then(|| offset_of(self.fns.helper)),
        }
    }
}

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
    /// A pool of `n_jobs` workers that run `job`.
    pub(crate) fn new(
        method: StartMethod,
        n_jobs: usize,
        model: Option<OwnedFd>,
        job: JobSpec,
        policy: Policy,
    ) -> PoolSpec {
        let setup = Setup {
            fingerprint: procpool_worker::fnref::fingerprint(),
            worker_id: 0,
            job: job.to_wire(),
            max_log_level: procpool_worker::wire::level_filter_to_wire(log::max_level()),
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
