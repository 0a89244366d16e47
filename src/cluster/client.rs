//! The client side: a job's batches published to the work queue, and its
//! results gathered from the agents, one outcome per task.

use std::any::TypeId;
use std::collections::{HashMap, VecDeque};
use std::future::IntoFuture;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::{FutureExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::wire::{self, MaxDeliveries, Outcome, ResultMsg, TaskMsg};
use super::{
    ClusterError, NatsOptions, Registry, ensure_streams, models, publish_until_stored, runtime,
};
use crate::ModelStore;
use crate::engine::{Batch, decode_outcome};
use crate::error::TaskError;

/// Tasks per batch unless [`Cluster::chunk_size`] says otherwise.
const DEFAULT_CHUNK: usize = 1_000;
/// Batches sent and not yet finished, unless [`Cluster::in_flight`] says
/// otherwise.
const DEFAULT_IN_FLIGHT: usize = 64;

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
    client: async_nats::Client,
    js: jetstream::Context,
    chunk_size: usize,
    in_flight: usize,
    timeout: Option<Duration>,
    /// The tasks and results streams, once made (a job needs them, not a
    /// new look-up).
    streams: Option<(jetstream::stream::Stream, jetstream::stream::Stream)>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("chunk_size", &self.chunk_size)
            .field("in_flight", &self.in_flight)
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
            jetstream::new(client.clone())
        };
        Ok(Cluster {
            rt,
            client,
            js,
            chunk_size: DEFAULT_CHUNK,
            in_flight: DEFAULT_IN_FLIGHT,
            timeout: None,
            streams: None,
        })
    }

    /// Tasks per batch (default 1,000); a batch is also cut where it would
    /// outgrow the server's largest message.
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

    /// Batches sent and not yet finished, at most (default 64): the input
    /// is read that far ahead of the results, so it may be endless.
    ///
    /// ```no_run
    /// let cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?.in_flight(8);
    /// # let _ = cluster;
    /// # Ok::<(), procpool::cluster::ClusterError>(())
    /// ```
    pub fn in_flight(mut self, batches: usize) -> Cluster {
        self.in_flight = batches.max(1);
        self
    }

    /// The longest a job may take (default: no limit). Without one, a job
    /// waits for agents as long as it takes: agents may join at any time.
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
    /// A task that no agent gets past (each agent that runs it dies, as
    /// many times as the agents' `max_deliver` allows) is that task's
    /// error; the others of its batch are sent again.
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
        let results = self.map_unordered(registry, name, args)?;
        ordered(results)
    }

    /// Like [`map`](Self::map), but yields results as they arrive, each
    /// with the index of its argument, and reads the input lazily, at most
    /// [`in_flight`](Self::in_flight) batches ahead. Dropping the iterator
    /// cancels the job: its batches not yet taken are deleted.
    ///
    /// ```no_run
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// let registry = procpool::cluster::Registry::new().map("square", square);
    /// let mut cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?;
    /// let mut total = 0;
    /// for item in cluster.map_unordered::<u64, u64, _>(&registry, "square", 0..1_000u64)? {
    ///     let (_index, square) = item?;
    ///     total += square.unwrap_or(0);
    /// }
    /// assert_eq!(total, 332_833_500);
    /// # Ok::<(), procpool::cluster::ClusterError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Fails at once if `name` is not exposed for `A` and `R` or the
    /// streams cannot be made; later, the iterator yields one error (the
    /// server refused a batch, or the job ran past its timeout) and ends.
    pub fn map_unordered<A, R, I>(
        &mut self,
        registry: &Registry,
        name: &str,
        args: I,
    ) -> Result<MapUnordered<'_, A, R, I::IntoIter>, ClusterError>
    where
        I: IntoIterator<Item = A>,
        A: Serialize + 'static,
        R: DeserializeOwned + 'static,
    {
        registry.check::<A, R>(name, None)?;
        self.start(name, None, args)
    }

    /// Publishes `store`'s model to the server's Object Store, under the
    /// SHA-256 of its bytes, unless it is there already; jobs then name it
    /// by that digest, and each node downloads it once.
    ///
    /// ```no_run
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Weights {
    ///     values: Vec<f32>,
    /// }
    /// let store = procpool::persist(&Weights { values: vec![0.5; 1_000] })?;
    /// let mut cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?;
    /// let model = cluster.publish_model(&store)?;
    /// assert_eq!(model.digest().len(), 64);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Fails if the server refuses the bucket or the upload.
    pub fn publish_model<M>(
        &mut self,
        store: &ModelStore<M>,
    ) -> Result<ClusterModel<M>, ClusterError>
    where
        M: rkyv::Archive,
    {
        let _inside = self.rt.enter();
        let digest = self
            .rt
            .block_on(models::publish(&self.js, store.file_bytes()))?;
        Ok(ClusterModel {
            digest,
            _model: PhantomData,
        })
    }

    /// Like [`map`](Self::map), for a function exposed with
    /// [`Registry::map_with_model`]: each task reads `model`.
    ///
    /// ```no_run
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Weights {
    ///     values: Vec<f32>,
    /// }
    /// fn score(model: &ArchivedWeights, row: u32) -> f32 {
    ///     model.values[row as usize].to_native() * 2.0
    /// }
    /// let registry = procpool::cluster::Registry::new().map_with_model::<Weights, _, _>("score", score);
    /// let store = procpool::persist(&Weights { values: vec![0.5; 1_000] })?;
    /// let mut cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?;
    /// let model = cluster.publish_model(&store)?;
    /// let scores = cluster.map_with_model::<Weights, u32, f32>(&registry, "score", &model, 0..1_000u32)?;
    /// assert_eq!(scores[7], Ok(1.0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`map`](Self::map), and if `name` is not exposed over a model
    /// of type `M`.
    pub fn map_with_model<M, A, R>(
        &mut self,
        registry: &Registry,
        name: &str,
        model: &ClusterModel<M>,
        args: impl IntoIterator<Item = A>,
    ) -> Result<Vec<Result<R, TaskError>>, ClusterError>
    where
        M: 'static,
        A: Serialize + 'static,
        R: DeserializeOwned + 'static,
    {
        let results = self.map_unordered_with_model(registry, name, model, args)?;
        ordered(results)
    }

    /// Like [`map_unordered`](Self::map_unordered), for a function exposed
    /// with [`Registry::map_with_model`]: each task reads `model`.
    ///
    /// # Errors
    ///
    /// As for [`map_unordered`](Self::map_unordered), and if `name` is not
    /// exposed over a model of type `M`.
    pub fn map_unordered_with_model<M, A, R, I>(
        &mut self,
        registry: &Registry,
        name: &str,
        model: &ClusterModel<M>,
        args: I,
    ) -> Result<MapUnordered<'_, A, R, I::IntoIter>, ClusterError>
    where
        M: 'static,
        I: IntoIterator<Item = A>,
        A: Serialize + 'static,
        R: DeserializeOwned + 'static,
    {
        registry.check::<A, R>(name, Some(TypeId::of::<M>()))?;
        self.start(name, Some(model.digest.clone()), args)
    }

    /// Starts a job of the function `name` (checked) over `args`.
    fn start<A, R, I>(
        &mut self,
        name: &str,
        model: Option<String>,
        args: I,
    ) -> Result<MapUnordered<'_, A, R, I::IntoIter>, ClusterError>
    where
        I: IntoIterator<Item = A>,
        A: Serialize + 'static,
        R: DeserializeOwned + 'static,
    {
        let root_seed =
            crate::seed::root_seed_from_env().map_err(|e| ClusterError::new(e.to_string()))?;
        let (tasks, results) = match &self.streams {
            Some(streams) => streams.clone(),
            None => {
                let streams = self.rt.block_on(ensure_streams(&self.js))?;
                self.streams = Some(streams.clone());
                streams
            }
        };
        let fingerprint = procpool_worker::fnref::fingerprint();
        let id = new_id();
        let advisories = {
            let _inside = self.rt.enter();
            self.rt
                .block_on(async {
                    let subscriber = self
                        .client
                        .subscribe(wire::max_deliveries_subject(fingerprint))
                        .await?;
                    self.client.flush().await?;
                    Ok::<_, async_nats::Error>(subscriber)
                })
                .map_err(|e| ClusterError::new(format!("cannot follow the job's batches: {e}")))?
        };
        let job = Job {
            rt: &self.rt,
            js: &self.js,
            tasks,
            id,
            function: name.to_string(),
            root_seed,
            model,
            fingerprint,
            reader: ResultReader {
                stream: results,
                subject: wire::result_subject(id),
                next_sequence: 1,
                consumer: None,
            },
            advisories: Some(advisories),
            pending: HashMap::new(),
            by_sequence: HashMap::new(),
            next_batch: 0,
            started: Instant::now(),
            timeout: self.timeout,
            max_message: self
                .client
                .server_info()
                .max_payload
                .saturating_sub(wire::MESSAGE_HEADROOM),
        };
        Ok(MapUnordered {
            job,
            args: args.into_iter(),
            exhausted: false,
            next_index: 0,
            large: true,
            chunk_size: self.chunk_size,
            in_flight: self.in_flight,
            ready: VecDeque::new(),
            ended: false,
            _types: PhantomData,
        })
    }
}

/// A model published to the cluster's Object Store by
/// [`Cluster::publish_model`]: its digest, and its type for the compiler.
///
/// ```no_run
/// #[derive(rkyv::Archive, rkyv::Serialize)]
/// struct Weights {
///     values: Vec<f32>,
/// }
/// let store = procpool::persist(&Weights { values: vec![1.0] })?;
/// let mut cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?;
/// let model = cluster.publish_model(&store)?;
/// println!("published as sha256-{}", model.digest());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ClusterModel<M> {
    digest: String,
    _model: PhantomData<fn() -> M>,
}

impl<M> ClusterModel<M> {
    /// The SHA-256 of the model store's bytes, in hex.
    ///
    /// See the example on [`ClusterModel`].
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

impl<M> Clone for ClusterModel<M> {
    fn clone(&self) -> Self {
        ClusterModel {
            digest: self.digest.clone(),
            _model: PhantomData,
        }
    }
}

impl<M> std::fmt::Debug for ClusterModel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterModel")
            .field("type", &std::any::type_name::<M>())
            .field("digest", &self.digest)
            .finish()
    }
}

/// Gathers an unordered job's results in input order.
fn ordered<R, I>(results: I) -> Result<Vec<Result<R, TaskError>>, ClusterError>
where
    I: Iterator<Item = Result<(usize, Result<R, TaskError>), ClusterError>>,
{
    let mut slots: Vec<Option<Result<R, TaskError>>> = Vec::new();
    for item in results {
        let (index, result) = item?;
        if slots.len() <= index {
            slots.resize_with(index + 1, || None);
        }
        slots[index] = Some(result);
    }
    Ok(slots
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| Err(TaskError::pool(i as u64, "no result came back"))))
        .collect())
}

/// The results of [`Cluster::map_unordered`], as they arrive: each with
/// the index of its argument, or the one error that ended the job.
pub struct MapUnordered<'c, A, R, I> {
    job: Job<'c>,
    args: I,
    exhausted: bool,
    next_index: u64,
    /// Whether the next argument may be large (see `Batch::push_argument`).
    large: bool,
    chunk_size: usize,
    in_flight: usize,
    ready: VecDeque<(u64, Result<R, TaskError>)>,
    ended: bool,
    _types: PhantomData<fn(A)>,
}

impl<A, R, I> std::fmt::Debug for MapUnordered<'_, A, R, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapUnordered")
            .field("job", &format_args!("{:016x}", self.job.id))
            .field("batches_in_flight", &self.job.pending.len())
            .finish_non_exhaustive()
    }
}

impl<A, R, I> Iterator for MapUnordered<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize + 'static,
    R: DeserializeOwned + 'static,
{
    type Item = Result<(usize, Result<R, TaskError>), ClusterError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Dropping a subscription spawns its unsubscribe on the runtime.
        let handle = self.job.rt.handle().clone();
        let _inside = handle.enter();
        loop {
            if let Some((index, result)) = self.ready.pop_front() {
                // Indices count arguments taken from an iterator.
                return Some(Ok((index as usize, result)));
            }
            if self.ended {
                return None;
            }
            let step = self.send_more().and_then(|()| {
                if self.exhausted && self.job.pending.is_empty() {
                    self.ended = true;
                    return Ok(());
                }
                self.job.poll(&mut self.ready)
            });
            if let Err(e) = step {
                self.ended = true;
                return Some(Err(e));
            }
        }
    }
}

impl<A, R, I> MapUnordered<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize + 'static,
    R: DeserializeOwned + 'static,
{
    /// Reads arguments and sends them in batches, until as many batches
    /// as allowed are in flight or the input ends.
    fn send_more(&mut self) -> Result<(), ClusterError> {
        let limit = self.job.max_message;
        while !self.exhausted && self.job.pending.len() < self.in_flight {
            let mut batch = Batch::new(self.next_index);
            while (batch.count() as usize) < self.chunk_size {
                let Some(arg) = self.args.next() else {
                    self.exhausted = true;
                    break;
                };
                let index = self.next_index;
                self.next_index += 1;
                if let Err(failure) = batch.push_argument(arg, &mut self.large) {
                    // It fails alone: the tasks before it go as they are.
                    self.ready
                        .push_back((index, Err(TaskError::from_failure(index, failure))));
                    break;
                }
                if batch.encoded_len() > limit {
                    let count = batch.count() as usize;
                    let last = batch.slice(count - 1..count);
                    if last.encoded_len() > limit {
                        let why = format!(
                            "its argument takes {} bytes, more than the server takes in one \
                             message ({limit} bytes)",
                            last.encoded_len()
                        );
                        self.ready
                            .push_back((index, Err(TaskError::pool(index, why))));
                        batch = batch.slice(0..count - 1);
                        break;
                    }
                    self.job.send(batch.slice(0..count - 1))?;
                    batch = last;
                }
            }
            if batch.count() > 0 {
                self.job.send(batch)?;
            }
        }
        Ok(())
    }
}

/// A job on the cluster: the batches sent and not yet finished, and where
/// their results and the server's word on them arrive.
struct Job<'c> {
    rt: &'c tokio::runtime::Runtime,
    js: &'c jetstream::Context,
    tasks: jetstream::stream::Stream,
    id: u64,
    function: String,
    root_seed: u64,
    /// The digest of the job's model, if its function reads one.
    model: Option<String>,
    fingerprint: u64,
    reader: ResultReader,
    /// The server's max-deliveries advisories for this build's batches
    /// (taken out to be dropped inside the runtime).
    advisories: Option<async_nats::Subscriber>,
    pending: HashMap<u64, Sent>,
    /// Which pending batch each task message's stream sequence is.
    by_sequence: HashMap<u64, u64>,
    next_batch: u64,
    started: Instant,
    timeout: Option<Duration>,
    /// The largest batch of arguments a task message may carry.
    max_message: usize,
}

/// A batch sent: its arguments (to send its unfinished tasks again) and
/// which of its tasks have an outcome.
struct Sent {
    sequence: u64,
    batch: Batch,
    done: Vec<bool>,
    left: usize,
    /// Whether an agent said it runs the batch one task at a time.
    ran_alone: bool,
    /// How often its tasks were sent again after no agent started them.
    resent: u32,
}

/// How often a batch's tasks are sent again when the server gave up on
/// a batch no agent started alone (it came behind another that killed
/// its agent), before its first task is blamed anyway.
const MAX_RESENDS: u32 = 2;

impl Job<'_> {
    /// Publishes `batch`, retrying until the server has stored it.
    fn send(&mut self, batch: Batch) -> Result<(), ClusterError> {
        self.send_again(batch, 0)
    }

    /// Publishes `batch` (tasks sent `resent` times before without an
    /// agent starting them alone).
    fn send_again(&mut self, batch: Batch, resent: u32) -> Result<(), ClusterError> {
        let number = self.next_batch;
        self.next_batch += 1;
        let task = TaskMsg {
            job: self.id,
            batch: number,
            function: self.function.clone(),
            first_index: batch.first_index(),
            count: batch.count(),
            root_seed: self.root_seed,
            model: self.model.clone(),
            items: batch.view(self.root_seed).items,
        };
        let payload = postcard::to_allocvec(&task)
            .map_err(|e| ClusterError::new(format!("cannot encode a batch: {e}")))?;
        let id = wire::task_id(self.id, number);
        let subject = wire::task_subject(self.fingerprint);
        let sequence = publish_until_stored(self.rt, self.js, &subject, &id, payload.into())
            .map_err(|last| ClusterError::new(format!("cannot publish batch {number}: {last}")))?;
        let count = batch.count() as usize;
        self.by_sequence.insert(sequence, number);
        self.pending.insert(
            number,
            Sent {
                sequence,
                batch,
                done: vec![false; count],
                left: count,
                ran_alone: false,
                resent,
            },
        );
        Ok(())
    }

    /// Waits about a second for results and advisories, and puts the
    /// outcomes of tasks that had none yet in `ready`.
    fn poll<R: DeserializeOwned>(
        &mut self,
        ready: &mut VecDeque<(u64, Result<R, TaskError>)>,
    ) -> Result<(), ClusterError> {
        if let Some(limit) = self.timeout
            && self.started.elapsed() >= limit
        {
            let why = self
                .rt
                .block_on(agents_of_build(&self.tasks, self.fingerprint));
            return Err(ClusterError::timeout(limit, &why));
        }
        for payload in self.rt.block_on(self.reader.next_results()) {
            let Ok(result) = postcard::from_bytes::<ResultMsg>(&payload) else {
                log::warn!(target: "procpool", "a malformed result of job {:016x}", self.id);
                continue;
            };
            let number = result.batch;
            let Some(sent) = self.pending.get_mut(&number) else {
                continue; // a batch finished already, run again
            };
            if result.count == 0 {
                sent.ran_alone = true;
            }
            place(sent, result, ready);
            if sent.left == 0 {
                let sequence = sent.sequence;
                self.pending.remove(&number);
                self.by_sequence.remove(&sequence);
            }
        }
        while let Some(Some(advisory)) = self
            .advisories
            .as_mut()
            .and_then(|a| a.next().now_or_never())
        {
            let Ok(advisory) = serde_json::from_slice::<MaxDeliveries>(&advisory.payload) else {
                continue;
            };
            if let Some(number) = self.by_sequence.remove(&advisory.stream_seq) {
                self.give_up(number, advisory.deliveries, ready)?;
            }
        }
        Ok(())
    }

    /// Batch `number` was delivered `deliveries` times and never finished.
    /// If an agent ran it alone (one task at a time, each outcome published
    /// before the next task starts), its first task without an outcome is
    /// the one no agent got past: it fails, and the tasks after it are sent
    /// again. If none did, it came behind another batch that killed its
    /// agents: its unfinished tasks are sent again, a bounded number of
    /// times.
    fn give_up<R>(
        &mut self,
        number: u64,
        deliveries: u64,
        ready: &mut VecDeque<(u64, Result<R, TaskError>)>,
    ) -> Result<(), ClusterError> {
        let Some(sent) = self.pending.remove(&number) else {
            return Ok(());
        };
        // It stays in the work queue otherwise.
        let _ = self.rt.block_on(self.tasks.delete_message(sent.sequence));
        let Some(culprit) = sent.done.iter().position(|done| !done) else {
            return Ok(());
        };
        let (resend_from, resent) = if !sent.ran_alone && sent.resent < MAX_RESENDS {
            (culprit, sent.resent + 1)
        } else {
            let index = sent.batch.first_index() + culprit as u64;
            let why = if sent.ran_alone {
                format!(
                    "no agent finished this task: its batch was delivered {deliveries} times \
                     (the agents' max_deliver), and each agent that ran it died or went silent here"
                )
            } else {
                format!(
                    "no agent finished this task: its batch was delivered {deliveries} times \
                     (the agents' max_deliver), {} times over, and no agent started it",
                    MAX_RESENDS + 1
                )
            };
            ready.push_back((index, Err(TaskError::pool(index, why))));
            (culprit + 1, 0)
        };
        let mut start = resend_from;
        while start < sent.done.len() {
            if sent.done[start] {
                start += 1;
                continue;
            }
            let end = (start..sent.done.len())
                .find(|&i| sent.done[i])
                .unwrap_or(sent.done.len());
            self.send_again(sent.batch.slice(start..end), resent)?;
            start = end;
        }
        Ok(())
    }
}

impl Drop for Job<'_> {
    /// Deletes the batches no agent finished (cancelling the job) and the
    /// job's results from the server.
    fn drop(&mut self) {
        let _inside = self.rt.enter();
        drop(self.advisories.take());
        for sent in self.pending.values() {
            let _ = self.rt.block_on(self.tasks.delete_message(sent.sequence));
        }
        let subject = wire::result_subject(self.id);
        let _ = self
            .rt
            .block_on(self.reader.stream.purge().filter(subject).into_future());
    }
}

/// What the server knows of the agents of build `fingerprint`, to say why
/// a job did not finish: none of this build ever came (only agents of
/// other builds, which never see its batches), or none waits for batches.
async fn agents_of_build(tasks: &jetstream::stream::Stream, fingerprint: u64) -> String {
    let ours = wire::agents_consumer(fingerprint);
    let mut names = tasks.consumer_names();
    let mut others = 0;
    let mut seen = false;
    while let Some(Ok(name)) = names.next().await {
        if name == ours {
            seen = true;
        } else if name.starts_with("agents-") {
            others += 1;
        }
    }
    if !seen {
        return format!(
            "no agent of this build (fingerprint {fingerprint:016x}) has come to this server; \
             agents of {others} other build(s) have, and never see its batches"
        );
    }
    match tasks.consumer_info(&ours).await {
        Ok(info) if info.num_waiting == 0 && info.num_ack_pending == 0 => {
            format!("no agent of this build (fingerprint {fingerprint:016x}) is taking batches now")
        }
        Ok(info) => format!(
            "{} batch(es) running on agents of this build, {} waiting",
            info.num_ack_pending, info.num_pending
        ),
        Err(e) => format!("the agents' consumer cannot be read: {e}"),
    }
}

/// Decodes the outcomes of the tasks of `result` that had none yet into
/// `ready`.
fn place<R: DeserializeOwned>(
    sent: &mut Sent,
    result: ResultMsg,
    ready: &mut VecDeque<(u64, Result<R, TaskError>)>,
) {
    let first = result.first_index;
    match result.outcomes {
        Ok(list) => {
            for (i, outcome) in list.into_iter().enumerate() {
                let index = first + i as u64;
                if !sent.takes(index) {
                    continue;
                }
                let outcome = match outcome {
                    Outcome::Encoded(item) => procpool_worker::worker::task::capturing(|| {
                        decode_outcome::<R>(index, &item)
                    }),
                    Outcome::Died(parts) => Err(TaskError::from_death(index, parts)),
                    Outcome::Lost(why) => Err(TaskError::pool(index, why)),
                };
                ready.push_back((index, outcome));
            }
        }
        Err(why) => {
            for index in first..first + u64::from(result.count) {
                if sent.takes(index) {
                    ready.push_back((index, Err(TaskError::pool(index, why.clone()))));
                }
            }
        }
    }
}

impl Sent {
    /// Whether task `index` is one of this batch's, without an outcome
    /// until now (it has one from here on).
    fn takes(&mut self, index: u64) -> bool {
        let Some(offset) = index
            .checked_sub(self.batch.first_index())
            .and_then(|offset| usize::try_from(offset).ok())
        else {
            return false;
        };
        match self.done.get_mut(offset) {
            Some(done) if !*done => {
                *done = true;
                self.left -= 1;
                true
            }
            _ => false,
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
