//! What crosses NATS between a cluster client and its node agents, and the
//! names of the streams, subjects and consumers it crosses in. Every
//! message from the server is untrusted input: decoding it is checked, and
//! a message that does not decode is an error, never undefined behaviour.

use serde::{Deserialize, Serialize};

/// The work queue every batch goes through.
pub(crate) const TASKS_STREAM: &str = "PROCPOOL_TASKS";
/// Where agents publish what each batch gave.
pub(crate) const RESULTS_STREAM: &str = "PROCPOOL_RESULTS";

/// The subject of batches for agents of build `fingerprint`: an agent of
/// another build never sees them.
pub(crate) fn task_subject(fingerprint: u64) -> String {
    format!("procpool.tasks.{fingerprint:016x}")
}

/// The subject of job `job`'s results.
pub(crate) fn result_subject(job: u64) -> String {
    format!("procpool.results.{job:016x}")
}

/// The durable consumer every agent of build `fingerprint` shares.
pub(crate) fn agents_consumer(fingerprint: u64) -> String {
    format!("agents-{fingerprint:016x}")
}

/// The deduplication id of batch `batch` of job `job`, for its task and
/// its result alike.
pub(crate) fn message_id(job: u64, batch: u64) -> String {
    format!("{job:016x}-{batch}")
}

/// A batch of tasks for an agent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TaskMsg {
    pub(crate) job: u64,
    pub(crate) batch: u64,
    /// The exposed function's name in the agent's registry.
    pub(crate) function: String,
    pub(crate) first_index: u64,
    pub(crate) count: u32,
    pub(crate) root_seed: u64,
    /// The tasks' arguments, each a framed item.
    pub(crate) items: Vec<u8>,
}

/// What one task of a batch gave.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// Its outcome as a worker encodes it: `Result<R, TaskFailure>`.
    Encoded(Vec<u8>),
    /// Its worker on the agent died: the parts of the error, so that the
    /// client's has the same predicates (`is_crash`, `signal`, …).
    Died(crate::error::DeathParts),
    /// It could not run; the agent's account of why.
    Lost(String),
}

/// What a batch gave, as the agent that ran it reports it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ResultMsg {
    pub(crate) batch: u64,
    pub(crate) first_index: u64,
    pub(crate) count: u32,
    pub(crate) outcomes: Result<Vec<Outcome>, String>,
}
