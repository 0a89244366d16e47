//! The node agent: the user's own program, run on each machine, taking
//! batches from the work queue and running them on its local pool.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;

use procpool_worker::wire::split_item;

use super::wire::{self, Outcome, ResultMsg, TaskMsg};
use super::{ClusterError, NatsOptions, Registry, ensure_streams, publish_until_stored, runtime};
use crate::batching::BatchSizer;
use crate::engine::{Batch, Engine, Policy, PoolSpec, Sink, Workers};
use crate::error::TaskError;
use crate::launch::StartMethod;

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
    /// Deliveries of a batch before the server gives up on it.
    pub max_deliver: i64,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            n_jobs: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
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
    let rt = runtime()?;
    // Dropping a subscription spawns its unsubscribe on the runtime.
    let handle = rt.handle().clone();
    let _inside = handle.enter();
    let client = rt.block_on(nats.connect())?;
    let js = {
        let _inside = rt.enter();
        jetstream::new(client)
    };
    let (tasks, _) = rt.block_on(ensure_streams(&js))?;
    let fingerprint = procpool_worker::fnref::fingerprint();
    let name = wire::agents_consumer(fingerprint);
    let consumer: jetstream::consumer::PullConsumer = rt
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
    let n_jobs = match options.n_jobs {
        Some(0) => return Err(ClusterError::new("n_jobs must be at least 1")),
        Some(n) => n,
        None => {
            crate::config::proc_count(1, None, 0).map_err(|e| ClusterError::new(e.to_string()))?
        }
    };
    let mut pools: HashMap<String, (Workers, BatchSizer)> = HashMap::new();
    loop {
        let fetched = rt.block_on(async {
            let mut messages = consumer
                .fetch()
                .max_messages(2 * n_jobs)
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
        let mut runs: HashMap<(String, u64, u64), Vec<(jetstream::Message, TaskMsg)>> =
            HashMap::new();
        for message in messages {
            match postcard::from_bytes::<TaskMsg>(&message.payload) {
                Ok(task) => runs
                    .entry((task.function.clone(), task.job, task.root_seed))
                    .or_default()
                    .push((message, task)),
                Err(e) => {
                    // Not ours to retry: it will never decode.
                    log::warn!(target: "procpool", "a malformed batch on {}: {e}", message.subject);
                    let _ = rt.block_on(message.ack_with(AckKind::Term));
                }
            }
        }
        for ((function, job, root_seed), mut run) in runs {
            let results = match registry.job(&function) {
                None => run
                    .iter()
                    .map(|(_, task)| ResultMsg {
                        batch: task.batch,
                        first_index: task.first_index,
                        count: task.count,
                        outcomes: Err(format!(
                            "no function is exposed as {function:?} by this agent"
                        )),
                    })
                    .collect(),
                Some(spec) => {
                    let pool = match pools.entry(function.clone()) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            let policy = Policy {
                                task_timeout: None,
                                memory_limit: None,
                                max_tries: 2,
                                replace_dead: true,
                            };
                            let spec =
                                PoolSpec::new(StartMethod::default(), n_jobs, None, spec, policy);
                            let workers = Workers::start(spec)
                                .map_err(|e| ClusterError::new(e.to_string()))?;
                            e.insert((workers, BatchSizer::new(None)))
                        }
                    };
                    run_batches(&mut pool.0, &mut pool.1, root_seed, &mut run)
                }
            };
            for ((message, _), result) in run.into_iter().zip(results) {
                let payload = match postcard::to_allocvec(&result) {
                    Ok(payload) => payload,
                    Err(e) => {
                        log::error!(target: "procpool", "cannot encode a result: {e}");
                        continue;
                    }
                };
                let id = wire::message_id(job, result.batch);
                // The result is stored before the batch is acknowledged: a
                // crash in between runs the batch again, and the client
                // keeps one result per batch.
                match publish_until_stored(
                    &rt,
                    &js,
                    &wire::result_subject(job),
                    &id,
                    payload.into(),
                ) {
                    Ok(()) => {
                        let _ = rt.block_on(message.ack());
                    }
                    // Not acknowledged: the server gives the batch again.
                    Err(e) => log::warn!(target: "procpool", "cannot publish the result {id}: {e}"),
                }
            }
        }
    }
}

/// Runs batches of one job on `workers`; what each gave, in order.
fn run_batches(
    workers: &mut Workers,
    sizer: &mut BatchSizer,
    root_seed: u64,
    run: &mut [(jetstream::Message, TaskMsg)],
) -> Vec<ResultMsg> {
    let mut collect = Collect::default();
    let mut results: Vec<Option<ResultMsg>> = Vec::with_capacity(run.len());
    let mut engine = Engine::new(workers, sizer, root_seed);
    for (_, task) in run.iter_mut() {
        // The arguments go to the engine as they came; the message keeps
        // only what its result needs.
        match Batch::from_framed(task.first_index, std::mem::take(&mut task.items))
            .filter(|b| b.count() == task.count)
        {
            Some(batch) => {
                collect.expect(task.first_index, batch.count());
                engine.submit(batch);
                results.push(None);
            }
            None => results.push(Some(ResultMsg {
                batch: task.batch,
                first_index: task.first_index,
                count: task.count,
                outcomes: Err("a malformed batch".into()),
            })),
        }
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
    run.iter()
        .zip(results)
        .map(|((_, task), done)| {
            done.unwrap_or_else(|| ResultMsg {
                batch: task.batch,
                first_index: task.first_index,
                count: task.count,
                outcomes: Ok(collect.take(task.first_index)),
            })
        })
        .collect()
}

/// The outcomes of the batches being run, by their first task.
#[derive(Default)]
struct Collect {
    batches: BTreeMap<u64, Vec<Option<Outcome>>>,
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

    fn take(&mut self, first: u64) -> Vec<Outcome> {
        self.batches
            .remove(&first)
            .unwrap_or_default()
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Outcome::Lost("the agent's pool has no workers left".into()))
            })
            .collect()
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
