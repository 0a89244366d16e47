//! The client side: a connection to the server, and the jobs it starts
//! (their shapes are in `shapes`, their bookkeeping in `job`).

use std::any::TypeId;
use std::marker::PhantomData;
use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::job::{self, Followed, Job, JobPlan, ResultReader};
use super::shapes::{self, ClusterBackend, ClusterProcessor, MapUnordered};
use super::wire;
use super::{ClusterError, NatsOptions, Registry, ensure_streams, liveness, models, runtime};
use crate::ModelStore;
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
    /// The tasks stream, once made (a job needs it, not a new look-up).
    tasks: Option<jetstream::stream::Stream>,
    /// This client's id: its jobs' results go to subjects under it.
    id: u64,
    /// What this client follows for its jobs, once its first job started.
    followed: Option<Followed>,
    /// Keeps saying this client is there, so that agents run its batches.
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Dropping a subscription spawns its unsubscribe on the runtime.
        let _inside = self.rt.enter();
        self.followed = None;
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
    }
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
            tasks: None,
            id: job::new_id(),
            followed: None,
            heartbeat: None,
        })
    }

    /// Tasks per batch (default 1,000; at most 16,777,216, as locally); a
    /// batch is also cut where it would outgrow the server's largest
    /// message.
    ///
    /// ```no_run
    /// let cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?.chunk_size(100);
    /// # let _ = cluster;
    /// # Ok::<(), procpool::cluster::ClusterError>(())
    /// ```
    pub fn chunk_size(mut self, tasks: usize) -> Cluster {
        self.chunk_size = tasks.clamp(1, procpool_worker::wire::MAX_BATCH_TASKS);
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
        shapes::ordered(results)
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
        registry.check::<A, R>(name, None, false)?;
        let job = self.job(name, None, false)?;
        Ok(MapUnordered::new(job, args.into_iter()))
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

    /// Deletes `model` from the server's Object Store (nodes keep their
    /// cached copies; a later job of it needs it published again).
    ///
    /// ```no_run
    /// #[derive(rkyv::Archive, rkyv::Serialize)]
    /// struct Weights {
    ///     values: Vec<f32>,
    /// }
    /// let store = procpool::persist(&Weights { values: vec![1.0] })?;
    /// let mut cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?;
    /// let model = cluster.publish_model(&store)?;
    /// cluster.delete_model(&model)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Fails if the server refuses, or has no such model.
    pub fn delete_model<M>(&mut self, model: &ClusterModel<M>) -> Result<(), ClusterError> {
        let _inside = self.rt.enter();
        self.rt.block_on(models::delete(&self.js, &model.digest))
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
        shapes::ordered(results)
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
        registry.check::<A, R>(name, Some(TypeId::of::<M>()), false)?;
        let job = self.job(name, Some(model.digest.clone()), false)?;
        Ok(MapUnordered::new(job, args.into_iter()))
    }

    /// Applies the function exposed as `name` to tasks added one at a
    /// time, on the agents, and hands each result to `collector` here as
    /// it arrives, with its task's index: RLTK's `Task`, whose input
    /// handler runs on the workers and output handler at the client.
    ///
    /// ```no_run
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// let registry = procpool::cluster::Registry::new().map("square", square);
    /// let mut cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?;
    /// let mut total = 0;
    /// let mut tasks = cluster.processor(&registry, "square", |_, r: Result<u64, _>| {
    ///     total += r.unwrap_or(0);
    /// })?;
    /// for x in 0..100u64 {
    ///     tasks.add_task(x)?;
    /// }
    /// let summary = tasks.join()?;
    /// assert_eq!((summary.done, total), (100, 328_350));
    /// # Ok::<(), procpool::cluster::ClusterError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Fails if `name` is not exposed for `A` and `R` or the streams cannot
    /// be made.
    pub fn processor<A, R, C>(
        &mut self,
        registry: &Registry,
        name: &str,
        collector: C,
    ) -> Result<ClusterProcessor<'_, A, R, C>, ClusterError>
    where
        A: Serialize + 'static,
        R: DeserializeOwned + 'static,
        C: FnMut(u64, Result<R, TaskError>),
    {
        registry.check::<A, R>(name, None, false)?;
        let job = self.job(name, None, false)?;
        Ok(ClusterProcessor::new(job, collector))
    }

    /// Runs the map-reduce exposed as `name` (see [`Registry::map_reduce`])
    /// over `items`: the agents' workers map and fold, one value per batch
    /// comes back, and those are folded here. The reducer must be
    /// associative and commutative (values are folded in the order they
    /// arrive). Empty input gives `None`.
    ///
    /// ```no_run
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    /// fn add(a: u64, b: u64) -> u64 {
    ///     a + b
    /// }
    /// let registry = procpool::cluster::Registry::new().map_reduce("sum_of_squares", square, add);
    /// let mut cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?;
    /// let total = cluster.map_reduce::<u64, u64>(&registry, "sum_of_squares", 1..=10u64)?;
    /// assert_eq!(total, Some(385));
    /// # Ok::<(), procpool::cluster::ClusterError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Fails if `name` is not a map-reduce of `A`s to `R`s, the server
    /// refuses the job, it runs past its timeout, or a task fails: then
    /// [`ClusterError::task_error`] is the failure of the lowest task index
    /// (a panic or crash in the mapper or reducer), and the input is read
    /// no further.
    pub fn map_reduce<A, R>(
        &mut self,
        registry: &Registry,
        name: &str,
        items: impl IntoIterator<Item = A>,
    ) -> Result<Option<R>, ClusterError>
    where
        A: Serialize + 'static,
        R: DeserializeOwned + 'static,
    {
        let entry = registry.check::<A, R>(name, None, true)?;
        // SAFETY: `Registry::map_reduce` made this entry's helper from a
        // `fn(R, R) -> R` and recorded its types, which `check` just
        // matched against `A` and `R`.
        let reducer = unsafe { std::mem::transmute::<usize, fn(R, R) -> R>(entry.job.fns.helper) };
        let job = self.job(name, None, true)?;
        shapes::run_map_reduce(job, reducer, items)
    }

    /// This cluster as a backend for [`fold`](crate::fold) and other code
    /// written against [`ParallelMap`](crate::ParallelMap): the functions
    /// it is given must be exposed in `registry` with
    /// [`Registry::mapper`].
    ///
    /// ```no_run
    /// fn add(sum: u64, x: u64) -> u64 {
    ///     sum + x
    /// }
    /// let registry = procpool::cluster::Registry::new()
    ///     .mapper("sum_chunk", procpool::Mapper::fold_chunks(add));
    /// let mut cluster = procpool::cluster::Cluster::connect("nats://127.0.0.1:4222")?;
    /// let total = procpool::fold(&mut cluster.backend(&registry), add, 1..=1_000_000u64, 0, 10_000, add)?;
    /// assert_eq!(total, 500_000_500_000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn backend<'c>(&'c mut self, registry: &'c Registry) -> ClusterBackend<'c> {
        ClusterBackend {
            cluster: self,
            registry,
        }
    }

    /// Starts a job of the function `name` (checked by the caller).
    fn job(
        &mut self,
        name: &str,
        model: Option<String>,
        reduces: bool,
    ) -> Result<Job<'_>, ClusterError> {
        let root_seed =
            crate::seed::root_seed_from_env().map_err(|e| ClusterError::new(e.to_string()))?;
        if self.tasks.is_none() || self.followed.is_none() {
            let _inside = self.rt.enter();
            let (tasks, results) = self.rt.block_on(ensure_streams(&self.js))?;
            let fingerprint = procpool_worker::fnref::fingerprint();
            let advisories = self
                .rt
                .block_on(async {
                    let subscriber = self
                        .client
                        .subscribe(wire::max_deliveries_subject(fingerprint))
                        .await?;
                    self.client.flush().await?;
                    Ok::<_, async_nats::Error>(subscriber)
                })
                .map_err(|e| ClusterError::new(format!("cannot follow the job's batches: {e}")))?;
            if self.heartbeat.is_none() {
                let heartbeat = self.rt.block_on(liveness::keep_alive(&self.js, self.id))?;
                self.heartbeat = Some(heartbeat);
            }
            self.tasks = Some(tasks);
            self.followed = Some(Followed {
                reader: ResultReader::new(results, self.id),
                advisories,
            });
        }
        let (Some(tasks), Some(followed)) = (&self.tasks, &mut self.followed) else {
            return Err(ClusterError::new("the streams are not there"));
        };
        let plan = JobPlan {
            tasks: tasks.clone(),
            function: name.to_string(),
            model,
            root_seed,
            chunk_size: self.chunk_size,
            in_flight: self.in_flight,
            timeout: self.timeout,
            max_message: self
                .client
                .server_info()
                .max_payload
                .saturating_sub(wire::MESSAGE_HEADROOM),
            reduces,
        };
        Ok(Job::new(&self.rt, &self.js, self.id, followed, plan))
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
