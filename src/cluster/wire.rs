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

/// A job as agents address its results: the client that started it (a
/// [`Cluster`](super::Cluster) connection), and the job's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct JobId {
    pub(crate) client: u64,
    pub(crate) job: u64,
}

impl JobId {
    /// The subject of the job's results.
    pub(crate) fn results_subject(self) -> String {
        format!("procpool.results.{:016x}.{:016x}", self.client, self.job)
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}.{:016x}", self.client, self.job)
    }
}

/// The subjects of the results of every job of client `client`.
pub(crate) fn client_results(client: u64) -> String {
    format!("procpool.results.{client:016x}.>")
}

/// The durable consumer every agent of build `fingerprint` shares.
pub(crate) fn agents_consumer(fingerprint: u64) -> String {
    format!("agents-{fingerprint:016x}")
}

/// The deduplication id of batch `batch` of job `job`.
pub(crate) fn task_id(job: u64, batch: u64) -> String {
    format!("{job:016x}-{batch}")
}

/// The deduplication id of the outcomes of tasks `first_index` to
/// `first_index + count` of job `job` (a batch's result may come in parts).
pub(crate) fn result_id(job: u64, first_index: u64, count: u32) -> String {
    format!("{job:016x}-{first_index}+{count}")
}

/// The deduplication id of the notice that an agent runs batch `batch` of
/// job `job` one task at a time, on its `delivery`-th delivery (a result
/// of no tasks; each delivery's notice is kept).
pub(crate) fn alone_id(job: u64, batch: u64, delivery: i64) -> String {
    format!("{job:016x}-{batch}-alone-{delivery}")
}

/// The server's advisory, on core NATS, that a batch of build
/// `fingerprint` was delivered as often as the agents' consumer allows and
/// never acknowledged.
pub(crate) fn max_deliveries_subject(fingerprint: u64) -> String {
    format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{TASKS_STREAM}.{}",
        agents_consumer(fingerprint)
    )
}

/// The fields of the server's max-deliveries advisory that matter here.
#[derive(Debug, Deserialize)]
pub(crate) struct MaxDeliveries {
    pub(crate) stream_seq: u64,
    pub(crate) deliveries: u64,
}

/// Room kept in a message, below the server's `max_payload`, for headers
/// and the fields around the items.
pub(crate) const MESSAGE_HEADROOM: usize = 4 * 1024;

/// A batch of tasks for an agent (`B`: its framed arguments, owned by the
/// agent that decoded it, borrowed by the client that encodes it).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TaskMsg<B = Vec<u8>> {
    /// The client that started the job (where its results go).
    pub(crate) client: u64,
    pub(crate) job: u64,
    pub(crate) batch: u64,
    /// The exposed function's name in the agent's registry.
    pub(crate) function: String,
    pub(crate) first_index: u64,
    pub(crate) count: u32,
    pub(crate) root_seed: u64,
    /// The SHA-256 (hex) of the model store the function reads, in the
    /// models bucket; none for a function without a model.
    pub(crate) model: Option<String>,
    /// The tasks' arguments, each a framed item.
    pub(crate) items: B,
}

impl TaskMsg {
    /// Why a batch that decoded cannot be run: no tasks, more than a batch
    /// may hold, or task indices past `u64::MAX`.
    pub(crate) fn fault(&self) -> Option<String> {
        if self.count == 0 {
            return Some("a batch of no tasks".into());
        }
        if self.count as usize > procpool_worker::wire::MAX_BATCH_TASKS {
            return Some(format!("a batch of {} tasks", self.count));
        }
        if self
            .first_index
            .checked_add(u64::from(self.count))
            .is_none()
        {
            return Some("task indices past u64::MAX".into());
        }
        None
    }
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

/// What tasks `first_index..first_index + count` of a batch gave, as the
/// agent that ran them reports it: the whole batch, or a part (a batch run
/// again runs one task at a time, and a result too large for one message
/// is split).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ResultMsg {
    pub(crate) job: u64,
    pub(crate) batch: u64,
    pub(crate) first_index: u64,
    pub(crate) count: u32,
    pub(crate) outcomes: Result<Vec<Outcome>, String>,
    /// A map-reduce's folds of these tasks' values, each as a worker
    /// encodes it (`Result<Option<R>, TaskFailure>`) with the index of the
    /// first task it covers; empty for a map.
    pub(crate) partials: Vec<(u64, Vec<u8>)>,
    /// On the notice (a result of no tasks) that an agent runs the batch
    /// one task at a time: that agent, as `host (pid N)`.
    pub(crate) alone_on: Option<String>,
}
