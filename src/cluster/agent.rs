//! The node agent: the user's own program, run on each machine, taking
//! batches from the work queue and running them on its local pool.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;

use procpool_worker::wire::split_item;

use super::liveness::Clients;
use super::models::{self, ModelCache};
use super::wire::{self, JobId, Outcome, ResultMsg, TaskMsg};
use super::{
    ClusterError, NatsOptions, OpenModel, Registry, ensure_streams, publish_until_stored, runtime,
};
use crate::batching::BatchSizer;
use crate::engine::{Batch, Engine, Policy, PoolSpec, Sink, Workers};
use crate::error::TaskError;
use crate::launch::StartMethod;
use crate::store::UntypedStore;

/// How a node agent runs.
///
/// ```
/// let options = procpool::cluster::AgentOptions::default();
/// assert_eq!(options.max_deliver, 5);
/// ```
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Worker processes of the local pool (default: the CPUs this process
    /// may use).
    pub n_jobs: Option<usize>,
    /// How long a batch may go unacknowledged before the server gives it
    /// to another agent: longer than the slowest batch.
    pub ack_wait: Duration,
    /// Deliveries of a batch before the server gives up on it; the
    /// client then reports its first unfinished task as failed.
    pub max_deliver: i64,
    /// Longest a task may run before its worker is stopped (default: no
    /// limit).
    pub task_timeout: Option<Duration>,
    /// Address-space limit of each worker, in bytes (default: none).
    pub memory_limit: Option<u64>,
    /// Where this node keeps the models it downloaded, one file per
    /// digest (default: `$PROCPOOL_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/procpool/models`, else `~/.cache/procpool/models`).
    /// Agents of one node may share it; each digest is downloaded once.
    pub cache_dir: Option<std::path::PathBuf>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            n_jobs: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            task_timeout: None,
            memory_limit: None,
            cache_dir: None,
        }
    }
}

/// Runs this program as a node agent of the NATS server at `url`, for jobs
/// of this build whose functions `registry` exposes; returns only if it
/// cannot go on (the server unreachable at the start, a pool that cannot
/// start). The server's restarts are waited out.
///
/// ```no_run
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// let registry = procpool::cluster::Registry::new().map("square", square);
/// let options = procpool::cluster::AgentOptions::default();
/// procpool::cluster::run_agent("nats://127.0.0.1:4222", &registry, &options)?;
/// # Ok::<(), procpool::cluster::ClusterError>(())
/// ```
///
/// # Errors
///
/// Fails if the server cannot be reached or refuses the streams, or the
/// local pool cannot start.
pub fn run_agent(
    url: &str,
    registry: &Registry,
    options: &AgentOptions,
) -> Result<(), ClusterError> {
    run_agent_with(&NatsOptions::new(url), registry, options)
}

/// [`run_agent`] with the credentials and TLS settings of `nats`.
///
/// ```no_run
/// # fn square(x: u64) -> u64 { x * x }
/// let registry = procpool::cluster::Registry::new().map("square", square);
/// let nats = procpool::cluster::NatsOptions::new("nats://10.0.0.5:4222")
///     .credentials_file("/etc/nats/agent.creds");
/// let options = procpool::cluster::AgentOptions::default();
/// procpool::cluster::run_agent_with(&nats, &registry, &options)?;
/// # Ok::<(), procpool::cluster::ClusterError>(())
/// ```
///
/// # Errors
///
/// As for [`run_agent`], and if the server refuses the credentials.
pub fn run_agent_with(
    nats: &NatsOptions,
    registry: &Registry,
    options: &AgentOptions,
) -> Result<(), ClusterError> {
    let n_jobs = match options.n_jobs {
        Some(0) => return Err(ClusterError::new("n_jobs must be at least 1")),
        Some(n) => n,
        None => {
            crate::config::proc_count(1, None, 0).map_err(|e| ClusterError::new(e.to_string()))?
        }
    };
    let rt = runtime()?;
    // Dropping a subscription spawns its unsubscribe on the runtime.
    let handle = rt.handle().clone();
    let _inside = handle.enter();
    let client = rt.block_on(nats.connect())?;
    let js = {
        let _inside = rt.enter();
        jetstream::new(client.clone())
    };
    let (tasks, results) = rt.block_on(ensure_streams(&js))?;
    let fingerprint = procpool_worker::fnref::fingerprint();
    let name = wire::agents_consumer(fingerprint);
    let mut consumer: jetstream::consumer::PullConsumer = rt
        .block_on(tasks.get_or_create_consumer(
            &name,
            jetstream::consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: wire::task_subject(fingerprint),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: options.ack_wait,
                max_deliver: options.max_deliver,
                ..Default::default()
            },
        ))
        .map_err(|e| ClusterError::new(format!("cannot make the consumer {name}: {e}")))?;
    // The consumer may have been made by an agent with other options: its
    // own deadline is the one to beat.
    let ack_wait = rt
        .block_on(consumer.info())
        .map_or(options.ack_wait, |info| info.config.ack_wait);
    let agent = Agent {
        rt: &rt,
        js: &js,
        registry,
        options,
        n_jobs,
        max_payload: client.server_info().max_payload,
        pools: Vec::new(),
        cache: ModelCache::new(
            options
                .cache_dir
                .clone()
                .unwrap_or_else(models::default_cache_dir),
        ),
        bad_models: HashMap::new(),
        results,
        clients: Clients::default(),
        name: agent_name(),
    };
    agent.serve(&mut consumer, ack_wait)
}

/// A running agent: its connection and its pools, one per function.
struct Agent<'a> {
    rt: &'a tokio::runtime::Runtime,
    js: &'a jetstream::Context,
    registry: &'a Registry,
    options: &'a AgentOptions,
    n_jobs: usize,
    /// The largest message the server takes.
    max_payload: usize,
    /// Pools by function and model digest, the most recently used last.
    pools: Vec<(PoolKey, Pool)>,
    cache: ModelCache,
    /// Models whose file failed its checks even when fetched again.
    bad_models: HashMap<String, String>,
    results: jetstream::stream::Stream,
    clients: Clients,
    /// This agent as a client's error names it: `host (pid N)`.
    name: String,
}

/// A function, and the digest of the model it reads, if any.
type PoolKey = (String, Option<String>);

/// Pools an agent keeps started: each holds its workers' processes.
const MAX_POOLS: usize = 4;

/// Workers running one function (over one model).
struct Pool {
    workers: Workers,
    sizer: BatchSizer,
    /// The model's mapping, kept as long as its workers.
    _model: Option<UntypedStore>,
}

/// Batches of one job, as fetched.
type Run = Vec<(jetstream::Message, TaskMsg)>;

impl Agent<'_> {
    /// Takes batches and runs them, until it cannot go on.
    fn serve(
        mut self,
        consumer: &mut jetstream::consumer::PullConsumer,
        ack_wait: Duration,
    ) -> Result<(), ClusterError> {
        loop {
            let fetched = self.rt.block_on(async {
                let mut messages = consumer
                    .fetch()
                    .max_messages(2 * self.n_jobs)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await?;
                let mut got = Vec::new();
                while let Some(message) = messages.next().await {
                    got.push(message?);
                }
                Ok::<_, async_nats::Error>(got)
            });
            let messages = match fetched {
                Ok(messages) => messages,
                Err(e) => {
                    // The server may be restarting: the client reconnects.
                    log::warn!(target: "procpool", "cannot fetch batches: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            let mut runs: HashMap<(PoolKey, JobId, u64), Run> = HashMap::new();
            for message in messages {
                let task = postcard::from_bytes::<TaskMsg>(&message.payload)
                    .map_err(|e| e.to_string())
                    .and_then(|task| task.fault().map_or(Ok(task), Err));
                match task {
                    Ok(task) => runs
                        .entry((
                            (task.function.clone(), task.model.clone()),
                            JobId {
                                client: task.client,
                                job: task.job,
                            },
                            task.root_seed,
                        ))
                        .or_default()
                        .push((message, task)),
                    Err(e) => {
                        // Not ours to retry: it will never decode, or never run.
                        log::warn!(target: "procpool", "a malformed batch on {}: {e}", message.subject);
                        let _ = self.rt.block_on(message.ack_with(AckKind::Term));
                    }
                }
            }
            for ((key, job, root_seed), run) in runs {
                if self.clients.is_gone(self.rt, self.js, job.client) {
                    // Its client died without cancelling: nobody waits for
                    // these results.
                    log::info!(target: "procpool", "dropping batches of job {job}: its client has gone");
                    for (message, _) in run {
                        let _ = self.rt.block_on(message.ack_with(AckKind::Term));
                    }
                    self.clients.forget(self.rt, &self.results, job.client);
                    continue;
                }
                // The server gives a batch to another agent if this one is
                // silent for `ack_wait`: while it runs, it says it is busy.
                let messages: Vec<jetstream::Message> =
                    run.iter().map(|(m, _)| m.clone()).collect();
                let busy = self.rt.spawn(async move {
                    let every = (ack_wait / 3).max(Duration::from_millis(100));
                    loop {
                        tokio::time::sleep(every).await;
                        for message in &messages {
                            let _ = message.ack_with(AckKind::Progress).await;
                        }
                    }
                });
                self.run_job(key, job, root_seed, run);
                busy.abort();
            }
        }
    }

    /// Runs the batches of one job and publishes their results, each
    /// before its batch is acknowledged; a job this agent cannot run (an
    /// unknown function, a model it cannot get) gets that as its results.
    fn run_job(&mut self, key: PoolKey, job: JobId, root_seed: u64, mut run: Run) {
        let mut pool = match self.pool(&key) {
            Ok(pool) => pool,
            Err(why) => {
                for (message, task) in run {
                    let result = ResultMsg {
                        job: task.job,
                        batch: task.batch,
                        first_index: task.first_index,
                        count: task.count,
                        outcomes: Err(why.clone()),
                        partials: Vec::new(),
                        alone_on: None,
                    };
                    self.finish(job, &message, result);
                }
                return;
            }
        };
        let (workers, sizer) = (&mut pool.workers, &mut pool.sizer);
        // A batch given again may be one that killed the agent before:
        // its tasks run one at a time, each result published before the
        // next starts, so that what finished is kept and the client can
        // tell which task no agent gets past.
        let (again, first): (Run, Run) = run
            .drain(..)
            .partition(|(m, _)| m.info().is_ok_and(|info| info.delivered > 1));
        let mut first = first;
        let results = run_batches(workers, sizer, root_seed, &mut first);
        for ((message, _), result) in first.into_iter().zip(results) {
            self.finish(job, &message, result);
        }
        for (message, mut task) in again {
            let Some(batch) = batch_of(&mut task) else {
                self.finish(job, &message, malformed(&task));
                continue;
            };
            // The client learns that the batch is run alone, before it
            // runs: it blames the task a lone run does not get past, not
            // one that never ran.
            let notice = ResultMsg {
                job: task.job,
                batch: task.batch,
                first_index: task.first_index,
                count: 0,
                outcomes: Ok(Vec::new()),
                partials: Vec::new(),
                alone_on: Some(self.name.clone()),
            };
            let mut stored = postcard::to_allocvec(&notice)
                .map_err(|e| e.to_string())
                .and_then(|payload| {
                    let delivery = message.info().map_or(0, |info| info.delivered);
                    let id = wire::alone_id(job.job, task.batch, delivery);
                    self.publish(job, &id, payload)
                })
                .is_ok();
            for i in 0..batch.count() as usize {
                if !stored {
                    break;
                }
                let single = batch.slice(i..i + 1);
                let (outcomes, partials) = run_on(workers, sizer, root_seed, vec![single])
                    .pop()
                    .unwrap_or_default();
                let result = ResultMsg {
                    job: task.job,
                    batch: task.batch,
                    first_index: batch.first_index() + i as u64,
                    count: 1,
                    outcomes: Ok(outcomes),
                    partials,
                    alone_on: None,
                };
                if let Err(e) = self.publish_result(job, result) {
                    log::warn!(target: "procpool", "cannot publish a result of job {job}: {e}");
                    stored = false;
                    break;
                }
            }
            if stored {
                let _ = self.rt.block_on(message.ack());
            }
        }
        self.pools.push((key, pool));
    }

    /// The pool of `key`, taken out of the agent's (put it back when
    /// done), started if there is none.
    fn pool(&mut self, key: &PoolKey) -> Result<Pool, String> {
        if let Some(at) = self.pools.iter().position(|(k, _)| k == key) {
            return Ok(self.pools.remove(at).1);
        }
        let (function, digest) = key;
        let entry = self
            .registry
            .entry(function)
            .ok_or_else(|| format!("no function is exposed as {function:?} by this agent"))?;
        let model = match (entry.model, digest) {
            (None, None) => None,
            (None, Some(_)) => return Err(format!("{function:?} takes no model on this agent")),
            (Some(_), None) => return Err(format!("{function:?} takes a model: none was given")),
            (Some((_, open)), Some(digest)) => Some(self.open_model(open, digest)?),
        };
        let model_fd = match &model {
            Some(store) => Some(
                procpool_worker::sys::dup_owned(&store.fd())
                    .map_err(|e| format!("cannot duplicate the model's descriptor: {e}"))?,
            ),
            None => None,
        };
        let policy = Policy {
            task_timeout: self.options.task_timeout,
            memory_limit: self.options.memory_limit,
            max_tries: 2,
            replace_dead: true,
        };
        let spec = PoolSpec::new(
            StartMethod::default(),
            self.n_jobs,
            model_fd,
            entry.job,
            policy,
        );
        let workers =
            Workers::start(spec).map_err(|e| format!("the agent cannot start workers: {e}"))?;
        if self.pools.len() >= MAX_POOLS {
            self.pools.remove(0); // the least recently used: its workers stop
        }
        Ok(Pool {
            workers,
            sizer: BatchSizer::new(None),
            _model: model,
        })
    }

    /// The model store of `digest` from the node's cache, fetched if the
    /// node does not have it; a cached file that fails its checks is
    /// fetched again, once.
    fn open_model(&mut self, open: OpenModel, digest: &str) -> Result<UntypedStore, String> {
        if let Some(why) = self.bad_models.get(digest) {
            return Err(why.clone());
        }
        let path = self.cache.file(self.rt, self.js, digest)?;
        let first = match open(&path) {
            Ok(store) => return Ok(store),
            Err(e) => e,
        };
        log::warn!(target: "procpool", "the cached model {} fails its checks ({first}): fetching it again", path.display());
        self.cache.evict(digest);
        let path = self.cache.file(self.rt, self.js, digest)?;
        open(&path).map_err(|e| {
            let why =
                format!("the model sha256-{digest} cannot be read as this function's model: {e}");
            self.bad_models.insert(digest.to_string(), why.clone());
            why
        })
    }

    /// Publishes what a batch gave, then acknowledges the batch; leaves it
    /// unacknowledged (the server gives it again) if a result cannot be
    /// stored. A crash in between runs the batch again, and the client
    /// keeps one outcome per task.
    fn finish(&self, job: JobId, message: &jetstream::Message, result: ResultMsg) {
        match self.publish_result(job, result) {
            Ok(()) => {
                let _ = self.rt.block_on(message.ack());
            }
            Err(e) => {
                log::warn!(target: "procpool", "cannot publish a result of job {job}: {e}");
            }
        }
    }

    /// Publishes `result`, in parts if it is larger than the server takes
    /// in one message; a single outcome too large for any message becomes
    /// that task's error.
    fn publish_result(&self, job: JobId, result: ResultMsg) -> Result<(), String> {
        let limit = self.max_payload.saturating_sub(wire::MESSAGE_HEADROOM);
        let payload =
            postcard::to_allocvec(&result).map_err(|e| format!("cannot encode a result: {e}"))?;
        if payload.len() > limit {
            let ResultMsg {
                job: job_id,
                batch,
                first_index,
                count,
                outcomes,
                partials,
                alone_on: _,
            } = result;
            // A map-reduce's folds go with the first part.
            let parts = match outcomes {
                Ok(mut list) if list.len() > 1 => {
                    let tail = list.split_off(list.len() / 2);
                    let head = list.len() as u32;
                    vec![
                        (first_index, head, Ok(list), partials),
                        (
                            first_index + u64::from(head),
                            count - head,
                            Ok(tail),
                            Vec::new(),
                        ),
                    ]
                }
                Ok(_) => vec![(
                    first_index,
                    count,
                    Ok(vec![Outcome::Lost(format!(
                        "its result takes {} bytes, more than the server takes in one \
                         message ({limit} bytes)",
                        payload.len()
                    ))]),
                    Vec::new(),
                )],
                Err(why) => vec![(
                    first_index,
                    count,
                    Err(why.chars().take(limit / 8).collect::<String>()),
                    Vec::new(),
                )],
            };
            for (first_index, count, outcomes, partials) in parts {
                self.publish_result(
                    job,
                    ResultMsg {
                        job: job_id,
                        batch,
                        first_index,
                        count,
                        outcomes,
                        partials,
                        alone_on: None,
                    },
                )?;
            }
            return Ok(());
        }
        let id = wire::result_id(job.job, result.first_index, result.count);
        self.publish(job, &id, payload)
    }

    /// Publishes an encoded result under the deduplication id `id`, until
    /// stored.
    fn publish(&self, job: JobId, id: &str, payload: Vec<u8>) -> Result<(), String> {
        publish_until_stored(self.rt, self.js, &job.results_subject(), id, payload.into())
            .map(|_| ())
    }
}

/// This agent as `host (pid N)`.
fn agent_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "an unnamed host".into());
    format!("{host} (pid {})", std::process::id())
}

/// A task message's arguments as a batch (taken out of the message), if
/// they are whole items and as many as it says.
fn batch_of(task: &mut TaskMsg) -> Option<Batch> {
    // The arguments go to the engine as they came; the message keeps only
    // what its result needs.
    Batch::from_framed(task.first_index, std::mem::take(&mut task.items))
        .filter(|b| b.count() == task.count)
}

/// The result of a batch whose arguments do not decode.
fn malformed(task: &TaskMsg) -> ResultMsg {
    ResultMsg {
        job: task.job,
        batch: task.batch,
        first_index: task.first_index,
        count: task.count,
        outcomes: Err("a malformed batch".into()),
        partials: Vec::new(),
        alone_on: None,
    }
}

/// Runs batches of one job on `workers`; what each gave, in order.
fn run_batches(
    workers: &mut Workers,
    sizer: &mut BatchSizer,
    root_seed: u64,
    run: &mut [(jetstream::Message, TaskMsg)],
) -> Vec<ResultMsg> {
    let mut batches = Vec::new();
    let mut whole = Vec::with_capacity(run.len());
    for (_, task) in run.iter_mut() {
        let batch = batch_of(task);
        whole.push(batch.is_some());
        batches.extend(batch);
    }
    let mut ran = run_on(workers, sizer, root_seed, batches).into_iter();
    run.iter()
        .zip(whole)
        .map(|((_, task), whole)| {
            if !whole {
                return malformed(task);
            }
            let (outcomes, partials) = ran.next().unwrap_or_default();
            ResultMsg {
                job: task.job,
                batch: task.batch,
                first_index: task.first_index,
                count: task.count,
                outcomes: Ok(outcomes),
                partials,
                alone_on: None,
            }
        })
        .collect()
}

/// What a batch gave: its tasks' outcomes, and a map-reduce's folds with
/// the first task each covers.
type Ran = (Vec<Outcome>, Vec<(u64, Vec<u8>)>);

/// Runs `batches` on `workers`: each batch's tasks' outcomes (and a
/// map-reduce's folds), in the batches' order.
fn run_on(
    workers: &mut Workers,
    sizer: &mut BatchSizer,
    root_seed: u64,
    batches: Vec<Batch>,
) -> Vec<Ran> {
    let mut collect = Collect::default();
    let mut firsts = Vec::with_capacity(batches.len());
    let mut engine = Engine::new(workers, sizer, root_seed);
    for batch in batches {
        firsts.push(batch.first_index());
        collect.expect(batch.first_index(), batch.count());
        engine.submit(batch);
    }
    while engine.in_flight() || engine.has_queued() {
        if !engine.in_flight() {
            if !engine.has_workers() {
                break;
            }
            engine.wants_batch();
            continue;
        }
        engine.wait(&mut collect);
    }
    firsts
        .into_iter()
        .map(|first| collect.take(first))
        .collect()
}

/// The outcomes of the batches being run, by their first task.
#[derive(Default)]
struct Collect {
    batches: BTreeMap<u64, Vec<Option<Outcome>>>,
    /// A map-reduce's folds, by the batch they belong to: each with the
    /// first task it covers (a batch rerun in parts has one per part).
    partials: BTreeMap<u64, Vec<(u64, Vec<u8>)>>,
}

impl Collect {
    fn expect(&mut self, first: u64, count: u32) {
        self.batches
            .insert(first, (0..count).map(|_| None).collect());
    }

    fn slot(&mut self, index: u64) -> Option<&mut Option<Outcome>> {
        let (first, outcomes) = self.batches.range_mut(..=index).next_back()?;
        outcomes.get_mut(usize::try_from(index - first).ok()?)
    }

    /// The outcomes of the batch starting at `first`, and its folds.
    fn take(&mut self, first: u64) -> Ran {
        let outcomes = self
            .batches
            .remove(&first)
            .unwrap_or_default()
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Outcome::Lost("the agent's pool has no workers left".into()))
            })
            .collect();
        (outcomes, self.partials.remove(&first).unwrap_or_default())
    }
}

impl Sink for Collect {
    fn outcomes(&mut self, first_index: u64, count: u32, mut items: &[u8]) {
        for i in 0..u64::from(count) {
            let outcome = match split_item(&mut items) {
                Some(item) => Outcome::Encoded(item.to_vec()),
                None => Outcome::Lost("malformed results".into()),
            };
            if let Some(slot) = self.slot(first_index + i) {
                *slot = Some(outcome);
            }
        }
        // A map-reduce's batch ends with its fold.
        if let Some(partial) = split_item(&mut items)
            && let Some((&batch, _)) = self.batches.range(..=first_index).next_back()
        {
            self.partials
                .entry(batch)
                .or_default()
                .push((first_index, partial.to_vec()));
        }
    }

    fn failed(&mut self, index: u64, error: TaskError) {
        let outcome = match error.death() {
            Some(parts) => Outcome::Died(parts),
            None => Outcome::Lost(error.to_string()),
        };
        if let Some(slot) = self.slot(index) {
            *slot = Some(outcome);
        }
    }
}
