//! The client side: a job's batches published to the work queue, and its
//! results gathered from the agents, one per batch.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::wire::{self, Outcome, ResultMsg, TaskMsg};
use super::{ClusterError, NatsOptions, Registry, ensure_streams, publish_until_stored, runtime};
use crate::engine::{Batch, decode_outcome};
use crate::error::TaskError;

/// Tasks per batch unless [`Cluster::chunk_size`] says otherwise.
const DEFAULT_CHUNK: usize = 1_000;

/// A connection to a NATS server whose node agents run this program's
/// exposed functions.
///
/// ```no_run
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// let registry = procpool::cluster::Registry::new().map("square", square);
/// let mut cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?;
/// let squares = cluster.map::<u64, u64>(&registry, "square", 0..10u64)?;
/// assert_eq!(squares[3], Ok(9));
/// # Ok::<(), procpool::cluster::ClusterError>(())
/// ```
pub struct Cluster {
    rt: tokio::runtime::Runtime,
    js: jetstream::Context,
    chunk_size: usize,
    timeout: Option<Duration>,
    /// The results stream, once made (a job needs it, not a new look-up).
    results: Option<jetstream::stream::Stream>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("chunk_size", &self.chunk_size)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to the NATS server at `url` (JetStream enabled).
    ///
    /// ```
    /// assert!(procpool::cluster::Cluster::connect("127.0.0.1:1").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// Fails if the server cannot be reached.
    pub fn connect(url: &str) -> Result<Cluster, ClusterError> {
        Cluster::connect_with(&NatsOptions::new(url))
    }

    /// Connects to the NATS server `nats` names, with its credentials and
    /// TLS settings.
    ///
    /// ```
    /// let nats = procpool::cluster::NatsOptions::new("127.0.0.1:1").token("t0k3n");
    /// assert!(procpool::cluster::Cluster::connect_with(&nats).is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// Fails if the server cannot be reached or refuses the credentials.
    pub fn connect_with(nats: &NatsOptions) -> Result<Cluster, ClusterError> {
        let rt = runtime()?;
        let client = rt.block_on(nats.connect())?;
        let js = {
            let _inside = rt.enter();
            jetstream::new(client)
        };
        Ok(Cluster {
            rt,
            js,
            chunk_size: DEFAULT_CHUNK,
            timeout: None,
            results: None,
        })
    }

    /// Tasks per batch (default 1,000).
    ///
    /// ```no_run
    /// let cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?.chunk_size(100);
    /// # let _ = cluster;
    /// # Ok::<(), procpool::cluster::ClusterError>(())
    /// ```
    pub fn chunk_size(mut self, tasks: usize) -> Cluster {
        self.chunk_size = tasks.max(1);
        self
    }

    /// The longest a map may wait for its results (default: no limit).
    /// Without one, a map waits for agents as long as it takes: agents may
    /// join at any time, and a batch that no agent can finish (one that
    /// kills every agent that takes it, past the server's `max_deliver`)
    /// is not yet reported as an error.
    ///
    /// ```no_run
    /// let cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?
    ///     .timeout(std::time::Duration::from_secs(600));
    /// # let _ = cluster;
    /// # Ok::<(), procpool::cluster::ClusterError>(())
    /// ```
    pub fn timeout(mut self, limit: Duration) -> Cluster {
        self.timeout = Some(limit);
        self
    }

    /// Applies the function exposed as `name` to every argument on the
    /// cluster's agents; one result per argument, in input order, each
    /// exactly once however often its batch ran.
    ///
    /// # Errors
    ///
    /// Fails if `name` is not exposed for `A` and `R`, the server refuses
    /// the job, or the results do not all arrive within the timeout.
    pub fn map<A, R>(
        &mut self,
        registry: &Registry,
        name: &str,
        args: impl IntoIterator<Item = A>,
    ) -> Result<Vec<Result<R, TaskError>>, ClusterError>
    where
        A: Serialize + 'static,
        R: DeserializeOwned + 'static,
    {
        registry.typed::<A, R>(name)?;
        // Dropping a subscription spawns its unsubscribe on the runtime.
        let handle = self.rt.handle().clone();
        let _inside = handle.enter();
        let started = Instant::now();
        let job = new_id();
        let root_seed =
            crate::seed::root_seed_from_env().map_err(|e| ClusterError::new(e.to_string()))?;
        let fingerprint = procpool_worker::fnref::fingerprint();
        let results_stream = match &self.results {
            Some(stream) => stream.clone(),
            None => {
                let (_, stream) = self.rt.block_on(ensure_streams(&self.js))?;
                self.results = Some(stream.clone());
                stream
            }
        };
        let mut reader = ResultReader {
            stream: results_stream,
            subject: wire::result_subject(job),
            next_sequence: 1,
            consumer: None,
        };

        let mut outcomes: Vec<Option<Result<R, TaskError>>> = Vec::new();
        let mut batches = 0u64;
        let mut batch = Batch::new(0);
        let mut large = true;
        let mut publish_batch = |batch: Batch, outcomes: &mut Vec<Option<Result<R, TaskError>>>| {
            let count = batch.count() as usize;
            let task = TaskMsg {
                job,
                batch: batches,
                function: name.to_string(),
                first_index: batch.first_index(),
                count: batch.count(),
                root_seed,
                items: batch.into_items(),
            };
            batches += 1;
            outcomes.extend((0..count).map(|_| None));
            self.publish_task(fingerprint, job, &task)
        };
        for (index, arg) in args.into_iter().enumerate() {
            let index = index as u64;
            if let Err(failure) = batch.push_argument(arg, &mut large) {
                // It fails alone: the tasks before it go as they are.
                let next = std::mem::replace(&mut batch, Batch::new(index + 1));
                if next.count() > 0 {
                    publish_batch(next, &mut outcomes)?;
                }
                outcomes.push(Some(Err(TaskError::from_failure(index, failure))));
                continue;
            }
            if batch.count() as usize >= self.chunk_size {
                let next = std::mem::replace(&mut batch, Batch::new(index + 1));
                publish_batch(next, &mut outcomes)?;
            }
        }
        if batch.count() > 0 {
            publish_batch(batch, &mut outcomes)?;
        }

        let mut seen = vec![false; batches as usize];
        let mut missing = batches;
        while missing > 0 {
            let left = match self.timeout {
                Some(limit) => match limit.checked_sub(started.elapsed()) {
                    Some(left) => left,
                    None => return Err(ClusterError::timeout(limit)),
                },
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                continue;
            }
            for payload in self.rt.block_on(reader.next_results()) {
                let Ok(result) = postcard::from_bytes::<ResultMsg>(&payload) else {
                    log::warn!(target: "procpool", "a malformed result of job {job:016x}");
                    continue;
                };
                let Some(slot) = seen.get_mut(result.batch as usize) else {
                    continue;
                };
                if std::mem::replace(slot, true) {
                    continue; // a batch that ran twice: its first result stands
                }
                missing -= 1;
                place(&mut outcomes, result);
            }
        }
        let subject = wire::result_subject(job);
        let _ = self
            .rt
            .block_on(reader.stream.purge().filter(subject).into_future());
        Ok(outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.unwrap_or_else(|| Err(TaskError::pool(i as u64, "no result came back")))
            })
            .collect())
    }

    /// Publishes a batch, retrying until the server has stored it.
    fn publish_task(&self, fingerprint: u64, job: u64, task: &TaskMsg) -> Result<(), ClusterError> {
        let payload = postcard::to_allocvec(task)
            .map_err(|e| ClusterError::new(format!("cannot encode a batch: {e}")))?;
        let id = wire::message_id(job, task.batch);
        let subject = wire::task_subject(fingerprint);
        publish_until_stored(&self.rt, &self.js, &subject, &id, payload.into()).map_err(|last| {
            ClusterError::new(format!("cannot publish batch {}: {last}", task.batch))
        })
    }
}

/// Decodes a batch's outcomes into their places.
fn place<R: DeserializeOwned>(outcomes: &mut [Option<Result<R, TaskError>>], result: ResultMsg) {
    let first = result.first_index;
    match result.outcomes {
        Ok(list) => {
            for (i, outcome) in list.into_iter().enumerate() {
                let index = first + i as u64;
                let Some(slot) = outcomes.get_mut(index as usize) else {
                    continue;
                };
                *slot = Some(match outcome {
                    Outcome::Encoded(item) => procpool_worker::worker::task::capturing(|| {
                        decode_outcome::<R>(index, &item)
                    }),
                    Outcome::Died(parts) => Err(TaskError::from_death(index, parts)),
                    Outcome::Lost(why) => Err(TaskError::pool(index, why)),
                });
            }
        }
        Err(why) => {
            for i in first..first + u64::from(result.count) {
                if let Some(slot) = outcomes.get_mut(i as usize) {
                    *slot = Some(Err(TaskError::pool(i, why.clone())));
                }
            }
        }
    }
}

/// Reads a job's results from the results stream with a consumer of its
/// own, made again from the next sequence whenever it fails (the server
/// restarted, and consumers that are not durable do not survive that).
struct ResultReader {
    stream: jetstream::stream::Stream,
    subject: String,
    /// The stream sequence of the next result to read.
    next_sequence: u64,
    consumer: Option<jetstream::consumer::PullConsumer>,
}

impl ResultReader {
    /// The payloads of the results that arrive within about a second.
    async fn next_results(&mut self) -> Vec<bytes::Bytes> {
        use jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        let mut got = Vec::new();
        if self.consumer.is_none() {
            let config = pull::Config {
                filter_subject: self.subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: self.next_sequence,
                },
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            };
            match self.stream.create_consumer(config).await {
                Ok(consumer) => self.consumer = Some(consumer),
                Err(e) => {
                    log::warn!(target: "procpool", "cannot read results yet: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return got;
                }
            }
        }
        let Some(consumer) = &self.consumer else {
            return got;
        };
        let fetched = consumer
            .fetch()
            .max_messages(512)
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let mut messages = match fetched {
            Ok(messages) => messages,
            Err(e) => {
                log::warn!(target: "procpool", "reading results: {e}");
                self.consumer = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
                return got;
            }
        };
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => {
                    if let Ok(info) = message.info() {
                        self.next_sequence = info.stream_sequence + 1;
                    }
                    got.push(message.payload.clone());
                }
                Err(e) => {
                    log::warn!(target: "procpool", "reading results: {e}");
                    self.consumer = None;
                    break;
                }
            }
        }
        got
    }
}

/// A job id no other client will pick.
fn new_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}
