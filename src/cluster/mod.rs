//! Cluster mode, behind the `cluster` feature: the same work on many
//! machines through a NATS JetStream server. Each machine runs the user's
//! own program as a node agent ([`run_agent`]), which takes batches from a
//! durable work queue and runs them on its local pool, so crash isolation,
//! seeds and logs are the local engine's. A client ([`Cluster`]) publishes
//! a job's batches and gathers their results, each exactly once however
//! often a batch was delivered.
//!
//! Functions are never named by address: both sides build the same
//! [`Registry`] of exposed functions, a batch names its function, and it
//! is only ever delivered to agents of the client's own build (its subject
//! carries the build fingerprint).

mod agent;
mod client;
mod job;
mod liveness;
mod models;
mod shapes;
mod wire;

use std::any::TypeId;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::wire::JobKind;
use procpool_worker::worker::jobs::{self, BatchRunner, JobFns};

use crate::engine::JobSpec;
use crate::error::TaskError;
use crate::store::{ArchivedModel, ModelStore, UntypedStore};
use crate::{StoreError, TaskFn};

pub use agent::{AgentOptions, run_agent, run_agent_with};
pub use client::{Cluster, ClusterModel};
pub use shapes::{ClusterBackend, ClusterProcessor, MapUnordered};

/// The functions a program exposes to cluster jobs, by name. Build the same
/// registry in the client and in the agents (the same program).
///
/// ```
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// let registry = procpool::cluster::Registry::new().map("square", square);
/// assert!(registry.contains("square"));
/// ```
#[derive(Default, Clone)]
pub struct Registry {
    entries: HashMap<String, Entry>,
}

#[derive(Clone, Copy)]
struct Entry {
    job: JobSpec,
    types: (TypeId, TypeId),
    /// For a function of a model: the model's type, and how an agent opens
    /// a store file of it (checked as that type).
    model: Option<(TypeId, OpenModel)>,
}

/// Opens a model store file from a node's cache, checked as the model
/// type of a registry entry.
type OpenModel = fn(&std::path::Path) -> Result<UntypedStore, StoreError>;

/// Opens the cache file `path` as a store of `M`s.
fn open_model<M>(path: &std::path::Path) -> Result<UntypedStore, StoreError>
where
    M: rkyv::Archive<Archived: ArchivedModel>,
{
    // SAFETY: a node's cache file is written once under another name,
    // checked against its digest, made read-only and renamed into place;
    // nothing of procpool writes it again (a file that fails its checks is
    // removed, never rewritten), and the cache directory is the agents'.
    let store = unsafe { ModelStore::<M>::open_mapped(path) }?;
    Ok(store.untyped())
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        f.debug_struct("Registry")
            .field("functions", &names)
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    ///
    /// ```
    /// let registry = procpool::cluster::Registry::new();
    /// assert!(!registry.contains("anything"));
    /// ```
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Exposes `f` as `name`, for maps of `A`s to `R`s.
    ///
    /// ```
    /// fn double(x: u32) -> u32 {
    ///     x * 2
    /// }
    /// let registry = procpool::cluster::Registry::new().map("double", double);
    /// assert!(registry.contains("double"));
    /// ```
    pub fn map<A, R>(mut self, name: &str, f: fn(A) -> R) -> Registry
    where
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + 'static,
    {
        let job = JobSpec::map(jobs::map::<A, R> as BatchRunner, f as usize);
        let types = (TypeId::of::<A>(), TypeId::of::<R>());
        let entry = Entry {
            job,
            types,
            model: None,
        };
        self.entries.insert(name.to_string(), entry);
        self
    }

    /// Exposes `f` as `name`, for maps of `A`s to `R`s over a model of
    /// type `M` (see [`Cluster::publish_model`]): each node maps the model
    /// from its cache, one copy for all its workers.
    ///
    /// ```
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Weights {
    ///     values: Vec<f32>,
    /// }
    /// fn score(model: &ArchivedWeights, row: u32) -> f32 {
    ///     model.values[row as usize].to_native()
    /// }
    /// let registry = procpool::cluster::Registry::new().map_with_model::<Weights, _, _>("score", score);
    /// assert!(registry.contains("score"));
    /// ```
    pub fn map_with_model<M, A, R>(mut self, name: &str, f: TaskFn<M, A, R>) -> Registry
    where
        M: rkyv::Archive<Archived: ArchivedModel> + 'static,
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + 'static,
    {
        let runner = jobs::map_with_model::<M::Archived, A, R> as BatchRunner;
        let entry = Entry {
            job: JobSpec::map(runner, f as usize),
            types: (TypeId::of::<A>(), TypeId::of::<R>()),
            model: Some((TypeId::of::<M>(), open_model::<M> as OpenModel)),
        };
        self.entries.insert(name.to_string(), entry);
        self
    }

    /// Exposes `mapper` as `name`: the functions a [`fold`](crate::fold)
    /// (or other code written against [`ParallelMap`](crate::ParallelMap))
    /// hands its backend, for [`Cluster::backend`].
    ///
    /// ```
    /// fn add(sum: u64, x: u64) -> u64 {
    ///     sum + x
    /// }
    /// let registry = procpool::cluster::Registry::new()
    ///     .mapper("sum_chunk", procpool::Mapper::fold_chunks(add));
    /// assert!(registry.contains("sum_chunk"));
    /// ```
    pub fn mapper<A, R>(mut self, name: &str, mapper: crate::Mapper<A, R>) -> Registry
    where
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + 'static,
    {
        let entry = Entry {
            job: mapper.job(),
            types: (TypeId::of::<A>(), TypeId::of::<R>()),
            model: None,
        };
        self.entries.insert(name.to_string(), entry);
        self
    }

    /// Exposes `mapper` and `reducer` as the map-reduce `name`, for
    /// [`Cluster::map_reduce`]: each agent's workers fold the values of
    /// the batches they run, and only one value per batch comes back.
    ///
    /// ```
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// fn add(a: u64, b: u64) -> u64 {
    ///     a + b
    /// }
    /// let registry = procpool::cluster::Registry::new().map_reduce("sum_of_squares", square, add);
    /// assert!(registry.contains("sum_of_squares"));
    /// ```
    pub fn map_reduce<A, R>(
        mut self,
        name: &str,
        mapper: fn(A) -> R,
        reducer: fn(R, R) -> R,
    ) -> Registry
    where
        A: Serialize + DeserializeOwned + 'static,
        R: Serialize + DeserializeOwned + 'static,
    {
        let job = JobSpec {
            kind: JobKind::MapReduce,
            runner: jobs::map_reduce::<A, R> as BatchRunner,
            fns: JobFns {
                task: mapper as usize,
                helper: reducer as usize,
            },
        };
        let entry = Entry {
            job,
            types: (TypeId::of::<A>(), TypeId::of::<R>()),
            model: None,
        };
        self.entries.insert(name.to_string(), entry);
        self
    }

    /// Whether a function is exposed as `name`.
    ///
    /// ```
    /// let registry = procpool::cluster::Registry::new();
    /// assert!(!registry.contains("square"));
    /// ```
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The name `job` is exposed as, if it is.
    fn name_of(&self, job: JobSpec) -> Option<String> {
        let same = |other: &JobSpec| {
            other.kind == job.kind
                && other.runner as usize == job.runner as usize
                && other.fns == job.fns
        };
        self.entries
            .iter()
            .find(|(_, entry)| same(&entry.job))
            .map(|(name, _)| name.clone())
    }

    /// Checks that `name` maps `A`s to `R`s, over a model of type `model`
    /// or over none, as a map (`reduces` false) or a map-reduce; its entry.
    fn check<A: 'static, R: 'static>(
        &self,
        name: &str,
        model: Option<TypeId>,
        reduces: bool,
    ) -> Result<Entry, ClusterError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ClusterError::new(format!("no function is exposed as {name:?}")))?;
        if entry.types != (TypeId::of::<A>(), TypeId::of::<R>()) {
            return Err(ClusterError::new(format!(
                "{name:?} is exposed with other argument or result types"
            )));
        }
        match (entry.job.kind == JobKind::MapReduce, reduces) {
            (true, false) => {
                return Err(ClusterError::new(format!(
                    "{name:?} is a map-reduce: use Cluster::map_reduce"
                )));
            }
            (false, true) => {
                return Err(ClusterError::new(format!("{name:?} is not a map-reduce")));
            }
            _ => {}
        }
        match (entry.model.map(|(t, _)| t), model) {
            (None, Some(_)) => Err(ClusterError::new(format!("{name:?} takes no model"))),
            (Some(_), None) => Err(ClusterError::new(format!(
                "{name:?} takes a model: use map_with_model"
            ))),
            (Some(theirs), Some(ours)) if theirs != ours => Err(ClusterError::new(format!(
                "{name:?} is exposed with another model type"
            ))),
            _ => Ok(*entry),
        }
    }

    fn entry(&self, name: &str) -> Option<Entry> {
        self.entries.get(name).copied()
    }
}

/// Why a cluster client or agent could not do its work: the server could
/// not be reached, a stream could not be made, a job ran past its time, or
/// (for the shapes that end at a task's failure: map-reduce, a processor's
/// collector) a task failed.
///
/// ```
/// let err = procpool::cluster::Cluster::connect("127.0.0.1:1").unwrap_err();
/// assert!(err.to_string().starts_with("cannot connect to NATS at 127.0.0.1:1"));
/// assert!(!err.is_timeout() && err.task_error().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterError {
    message: String,
    timed_out: bool,
    task: Option<Box<TaskError>>,
}

impl ClusterError {
    pub(crate) fn new(message: impl Into<String>) -> ClusterError {
        ClusterError {
            message: message.into(),
            timed_out: false,
            task: None,
        }
    }

    /// A job that did not finish within `limit`; `why` is what the server
    /// knows of its agents.
    fn timeout(limit: Duration, why: &str) -> ClusterError {
        ClusterError {
            message: format!("the job did not finish within {limit:?}: {why}"),
            timed_out: true,
            task: None,
        }
    }

    /// The job ended at the failure of a task (or of the code that takes
    /// its result here).
    fn task(error: TaskError) -> ClusterError {
        ClusterError {
            message: error.to_string(),
            timed_out: false,
            task: Some(Box::new(error)),
        }
    }

    /// Whether the job ran past the time it was given.
    ///
    /// ```
    /// let err = procpool::cluster::Cluster::connect("127.0.0.1:1").unwrap_err();
    /// assert!(!err.is_timeout());
    /// ```
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }

    /// The task failure that ended the job, if that is what did: its index,
    /// and whether it panicked or crashed, as for local work.
    ///
    /// ```
    /// let err = procpool::cluster::Cluster::connect("127.0.0.1:1").unwrap_err();
    /// assert!(err.task_error().is_none());
    /// ```
    pub fn task_error(&self) -> Option<&TaskError> {
        self.task.as_deref()
    }
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClusterError {}

/// Where the NATS server is and how to prove who we are to it: the
/// credentials and TLS settings of NATS, passed through as they are.
///
/// ```
/// let nats = procpool::cluster::NatsOptions::new("nats://10.0.0.5:4222")
///     .user_and_password("agent", "s3cret")
///     .tls_root_ca("/etc/nats/ca.pem");
/// assert_eq!(nats.url(), "nats://10.0.0.5:4222");
/// ```
#[derive(Clone, Default)]
pub struct NatsOptions {
    url: String,
    user_and_password: Option<(String, String)>,
    token: Option<String>,
    credentials_file: Option<std::path::PathBuf>,
    tls_root_ca: Option<std::path::PathBuf>,
    require_tls: bool,
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No secret is printed.
        f.debug_struct("NatsOptions")
            .field("url", &self.url)
            .field("user", &self.user_and_password.as_ref().map(|(u, _)| u))
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("credentials_file", &self.credentials_file)
            .field("tls_root_ca", &self.tls_root_ca)
            .field("require_tls", &self.require_tls)
            .finish()
    }
}

impl NatsOptions {
    /// The server at `url`, with no credentials.
    ///
    /// ```
    /// let nats = procpool::cluster::NatsOptions::new("nats://127.0.0.1:4222");
    /// assert_eq!(nats.url(), "nats://127.0.0.1:4222");
    /// ```
    pub fn new(url: impl Into<String>) -> NatsOptions {
        NatsOptions {
            url: url.into(),
            ..NatsOptions::default()
        }
    }

    /// The server's address.
    ///
    /// ```
    /// assert_eq!(procpool::cluster::NatsOptions::new("nats://h:1").url(), "nats://h:1");
    /// ```
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Authenticates with a user name and password.
    ///
    /// ```
    /// let nats = procpool::cluster::NatsOptions::new("nats://h:1").user_and_password("u", "p");
    /// # let _ = nats;
    /// ```
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> NatsOptions {
        self.user_and_password = Some((user.into(), password.into()));
        self
    }

    /// Authenticates with a token.
    ///
    /// ```
    /// let nats = procpool::cluster::NatsOptions::new("nats://h:1").token("t0k3n");
    /// # let _ = nats;
    /// ```
    pub fn token(mut self, token: impl Into<String>) -> NatsOptions {
        self.token = Some(token.into());
        self
    }

    /// Authenticates with an NKey / JWT credentials file (`.creds`).
    ///
    /// ```
    /// let nats = procpool::cluster::NatsOptions::new("nats://h:1").credentials_file("/etc/nats/agent.creds");
    /// # let _ = nats;
    /// ```
    pub fn credentials_file(mut self, path: impl Into<std::path::PathBuf>) -> NatsOptions {
        self.credentials_file = Some(path.into());
        self
    }

    /// Trusts the certificate authority in `path` (PEM), and requires TLS.
    ///
    /// ```
    /// let nats = procpool::cluster::NatsOptions::new("tls://h:1").tls_root_ca("/etc/nats/ca.pem");
    /// # let _ = nats;
    /// ```
    pub fn tls_root_ca(mut self, path: impl Into<std::path::PathBuf>) -> NatsOptions {
        self.tls_root_ca = Some(path.into());
        self.require_tls = true;
        self
    }

    /// Connects, with these settings.
    async fn connect(&self) -> Result<async_nats::Client, ClusterError> {
        let url = &self.url;
        let mut options = async_nats::ConnectOptions::new();
        if let Some((user, password)) = &self.user_and_password {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &self.credentials_file {
            options = options.credentials_file(path).await.map_err(|e| {
                ClusterError::new(format!(
                    "cannot read the credentials file {}: {e}",
                    path.display()
                ))
            })?;
        }
        if let Some(path) = &self.tls_root_ca {
            options = options.add_root_certificates(path.clone());
        }
        options = options.require_tls(self.require_tls);
        match tokio::time::timeout(Duration::from_secs(5), options.connect(url.as_str())).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(ClusterError::new(format!(
                "cannot connect to NATS at {url}: {e}"
            ))),
            Err(_) => Err(ClusterError::new(format!(
                "cannot connect to NATS at {url}: no answer in 5 s"
            ))),
        }
    }
}

/// A tokio runtime for this thread's blocking calls into async-nats, with
/// one thread of its own so the connection keeps being served (pings,
/// reconnection) while this thread runs tasks.
fn runtime() -> Result<tokio::runtime::Runtime, ClusterError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| ClusterError::new(format!("cannot start an async runtime: {e}")))
}

/// Makes the two streams if they are not there yet.
async fn ensure_streams(
    js: &async_nats::jetstream::Context,
) -> Result<
    (
        async_nats::jetstream::stream::Stream,
        async_nats::jetstream::stream::Stream,
    ),
    ClusterError,
> {
    use async_nats::jetstream::stream::RetentionPolicy;
    let tasks = make_stream(
        js,
        wire::TASKS_STREAM,
        "procpool.tasks.>",
        RetentionPolicy::WorkQueue,
        Duration::ZERO,
    )
    .await?;
    let results = make_stream(
        js,
        wire::RESULTS_STREAM,
        "procpool.results.>",
        RetentionPolicy::Limits,
        Duration::from_secs(24 * 3600),
    )
    .await?;
    Ok((tasks, results))
}

/// Makes (or finds) the file stream `name` over `subjects`, with a
/// deduplication window for retried publishes, keeping messages up to
/// `max_age` (zero: until they are taken).
async fn make_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    subjects: &str,
    retention: async_nats::jetstream::stream::RetentionPolicy,
    max_age: Duration,
) -> Result<async_nats::jetstream::stream::Stream, ClusterError> {
    use async_nats::jetstream::stream::{Config, StorageType};
    js.get_or_create_stream(Config {
        name: name.to_string(),
        subjects: vec![subjects.to_string()],
        retention,
        storage: StorageType::File,
        max_age,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| ClusterError::new(format!("cannot make the stream {name}: {e}")))
}

/// Publishes `payload` to `subject` with the deduplication id `id` until
/// the server has stored it (a bounded number of tries, backing off): its
/// sequence in the stream (the first copy's, for a duplicate), or the last
/// error if it never was stored.
fn publish_until_stored(
    rt: &tokio::runtime::Runtime,
    js: &async_nats::jetstream::Context,
    subject: &str,
    id: &str,
    payload: bytes::Bytes,
) -> Result<u64, String> {
    let mut last = String::new();
    for attempt in 0..20u64 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let stored = rt.block_on(async {
            js.publish_with_headers(subject.to_string(), headers, payload.clone())
                .await?
                .await
                .map(|ack| ack.sequence)
                .map_err(async_nats::Error::from)
        });
        match stored {
            Ok(sequence) => return Ok(sequence),
            Err(e) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
            }
        }
    }
    Err(last)
}
