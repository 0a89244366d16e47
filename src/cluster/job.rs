//! A job on the cluster, as the client keeps it: tasks gathered into
//! batches and published to the work queue, the batches not yet finished,
//! and the outcomes that come back, each task's taken once.

use std::collections::{HashMap, VecDeque};
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::{FutureExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ClusterError;
use super::publish_until_stored;
use super::wire::{self, JobId, MaxDeliveries, Outcome, ResultMsg, TaskMsg};
use crate::engine::{Batch, decode_outcome};
use crate::error::TaskError;

/// What came back and was not yet handed on: tasks' outcomes (`T`: a
/// map's results; `()` for a map-reduce, whose values travel folded), and
/// a map-reduce's partial folds (`P`).
pub(super) struct Ready<T, P> {
    pub(super) outcomes: VecDeque<(u64, Result<T, TaskError>)>,
    pub(super) partials: VecDeque<(u64, Result<Option<P>, TaskError>)>,
}

impl<T, P> Default for Ready<T, P> {
    fn default() -> Self {
        Ready {
            outcomes: VecDeque::new(),
            partials: VecDeque::new(),
        }
    }
}

/// What a client follows for all its jobs, one at a time: its results,
/// and the server's max-deliveries advisories for its build's batches.
pub(super) struct Followed {
    pub(super) reader: ResultReader,
    pub(super) advisories: async_nats::Subscriber,
}

/// Where a job's batches start: what [`Job::new`] needs besides the
/// connection.
pub(super) struct JobPlan {
    pub(super) tasks: jetstream::stream::Stream,
    pub(super) function: String,
    pub(super) model: Option<String>,
    pub(super) root_seed: u64,
    pub(super) chunk_size: usize,
    pub(super) in_flight: usize,
    pub(super) timeout: Option<Duration>,
    pub(super) max_message: usize,
    /// Whether the function is a map-reduce (its results carry folds).
    pub(super) reduces: bool,
}

/// A job on the cluster: the batch being filled, the batches sent and not
/// yet finished, and where their results and the server's word on them
/// arrive.
pub(super) struct Job<'c> {
    pub(super) rt: &'c tokio::runtime::Runtime,
    js: &'c jetstream::Context,
    follow: &'c mut Followed,
    tasks: jetstream::stream::Stream,
    /// The job as its agents address its results.
    address: JobId,
    pub(super) id: u64,
    function: String,
    root_seed: u64,
    /// The digest of the job's model, if its function reads one.
    model: Option<String>,
    fingerprint: u64,
    pending: HashMap<u64, Sent>,
    /// Which pending batch each task message's stream sequence is.
    by_sequence: HashMap<u64, u64>,
    next_batch: u64,
    started: Instant,
    timeout: Option<Duration>,
    /// The largest batch of arguments a task message may carry.
    max_message: usize,
    chunk_size: usize,
    in_flight: usize,
    /// Tasks added and not yet sent.
    building: Batch,
    /// Whether the next argument may be large (see `Batch::push_argument`).
    large: bool,
    next_index: u64,
    reduces: bool,
}

/// A batch sent: its arguments (to send its unfinished tasks again) and
/// which of its tasks have an outcome.
struct Sent {
    sequence: u64,
    batch: Batch,
    done: Vec<bool>,
    left: usize,
    /// The agents that said they run the batch one task at a time.
    alone_on: Vec<String>,
    /// How often its tasks were sent again after no agent started them.
    resent: u32,
}

/// How often a batch's tasks are sent again when the server gave up on
/// a batch no agent started alone (it came behind another that killed
/// its agent), before its first task is blamed anyway.
const MAX_RESENDS: u32 = 2;

impl<'c> Job<'c> {
    pub(super) fn new(
        rt: &'c tokio::runtime::Runtime,
        js: &'c jetstream::Context,
        client: u64,
        follow: &'c mut Followed,
        plan: JobPlan,
    ) -> Job<'c> {
        let id = new_id();
        Job {
            rt,
            js,
            follow,
            tasks: plan.tasks,
            address: JobId { client, job: id },
            id,
            function: plan.function,
            root_seed: plan.root_seed,
            model: plan.model,
            fingerprint: procpool_worker::fnref::fingerprint(),
            pending: HashMap::new(),
            by_sequence: HashMap::new(),
            next_batch: 0,
            started: Instant::now(),
            timeout: plan.timeout,
            max_message: plan.max_message,
            chunk_size: plan.chunk_size,
            in_flight: plan.in_flight,
            building: Batch::new(0),
            large: true,
            next_index: 0,
            reduces: plan.reduces,
        }
    }

    /// Adds a task; sends its batch once full. An argument that cannot be
    /// encoded, or is larger than a message, fails alone (its error goes
    /// to `ready`). Returns the task's index.
    pub(super) fn add<A: Serialize, T, P>(
        &mut self,
        arg: A,
        ready: &mut Ready<T, P>,
    ) -> Result<u64, ClusterError> {
        let index = self.next_index;
        self.next_index += 1;
        if let Err(failure) = self.building.push_argument(arg, &mut self.large) {
            // The tasks before it go as they are; the next start a batch.
            self.flush_before(index + 1)?;
            let error = TaskError::from_failure(index, failure);
            ready.outcomes.push_back((index, Err(error)));
            return Ok(index);
        }
        let limit = self.max_message;
        if self.building.encoded_len() > limit {
            let count = self.building.count() as usize;
            let last = self.building.slice(count - 1..count);
            let before = self.building.slice(0..count - 1);
            self.building = Batch::new(index);
            if before.count() > 0 {
                self.send(before)?;
            }
            if last.encoded_len() > limit {
                let why = format!(
                    "its argument takes {} bytes, more than the server takes in one message \
                     ({limit} bytes)",
                    last.encoded_len()
                );
                self.building = Batch::new(index + 1);
                ready
                    .outcomes
                    .push_back((index, Err(TaskError::pool(index, why))));
                return Ok(index);
            }
            self.building = last;
        }
        if self.building.count() as usize >= self.chunk_size {
            self.flush()?;
        }
        Ok(index)
    }

    /// Sends the batch being filled, if it has tasks.
    pub(super) fn flush(&mut self) -> Result<(), ClusterError> {
        self.flush_before(self.next_index)
    }

    /// Sends the batch being filled, if it has tasks; the next starts at
    /// `next_first`.
    fn flush_before(&mut self, next_first: u64) -> Result<(), ClusterError> {
        let batch = std::mem::replace(&mut self.building, Batch::new(next_first));
        if batch.count() > 0 {
            self.send(batch)?;
        }
        Ok(())
    }

    /// Whether as many batches as allowed are in flight.
    pub(super) fn is_full(&self) -> bool {
        self.pending.len() >= self.in_flight
    }

    /// Whether every task sent has its outcome (the batch being filled
    /// aside).
    pub(super) fn is_settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// Batches sent and not yet finished.
    pub(super) fn batches_in_flight(&self) -> usize {
        self.pending.len()
    }

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
            client: self.address.client,
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
                alone_on: Vec::new(),
                resent,
            },
        );
        Ok(())
    }

    /// Waits about a second for results and advisories, and puts the
    /// outcomes of tasks that had none yet in `ready`.
    pub(super) fn poll<T: DeserializeOwned, P: DeserializeOwned>(
        &mut self,
        ready: &mut Ready<T, P>,
    ) -> Result<(), ClusterError> {
        if let Some(limit) = self.timeout
            && self.started.elapsed() >= limit
        {
            let why = self
                .rt
                .block_on(agents_of_build(&self.tasks, self.fingerprint));
            return Err(ClusterError::timeout(limit, &why));
        }
        for payload in self.rt.block_on(self.follow.reader.next_results()) {
            let Ok(result) = postcard::from_bytes::<ResultMsg>(&payload) else {
                log::warn!(target: "procpool", "a malformed result of job {}", self.address);
                continue;
            };
            if result.job != self.id {
                continue; // of an earlier job of this client, cancelled
            }
            let number = result.batch;
            let Some(sent) = self.pending.get_mut(&number) else {
                continue; // a batch finished already, run again
            };
            if let Some(agent) = &result.alone_on
                && !sent.alone_on.contains(agent)
            {
                sent.alone_on.push(agent.clone());
            }
            place(sent, result, ready, self.reduces);
            if sent.left == 0 {
                let sequence = sent.sequence;
                self.pending.remove(&number);
                self.by_sequence.remove(&sequence);
            }
        }
        while let Some(Some(advisory)) = self.follow.advisories.next().now_or_never() {
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
    fn give_up<T, P>(
        &mut self,
        number: u64,
        deliveries: u64,
        ready: &mut Ready<T, P>,
    ) -> Result<(), ClusterError> {
        let Some(sent) = self.pending.remove(&number) else {
            return Ok(());
        };
        // It stays in the work queue otherwise.
        let _ = self.rt.block_on(self.tasks.delete_message(sent.sequence));
        let Some(culprit) = sent.done.iter().position(|done| !done) else {
            return Ok(());
        };
        let ran_alone = !sent.alone_on.is_empty();
        let (resend_from, resent) = if !ran_alone && sent.resent < MAX_RESENDS {
            (culprit, sent.resent + 1)
        } else {
            let index = sent.batch.first_index() + culprit as u64;
            let why = if ran_alone {
                format!(
                    "no agent finished this task: its batch was delivered {deliveries} times \
                     (the agents' max_deliver), and each agent that ran it died or went silent \
                     here; run alone by {}",
                    sent.alone_on.join(", ")
                )
            } else {
                format!(
                    "no agent finished this task: its batch was delivered {deliveries} times \
                     (the agents' max_deliver), {} times over, and no agent started it",
                    MAX_RESENDS + 1
                )
            };
            ready
                .outcomes
                .push_back((index, Err(TaskError::pool(index, why))));
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
        for sent in self.pending.values() {
            let _ = self.rt.block_on(self.tasks.delete_message(sent.sequence));
        }
        // Waited for: a purge moves this client's results consumer past
        // the stream's last message, which must not be the next job's.
        let subject = self.address.results_subject();
        let purge = self.follow.reader.stream.purge().filter(subject);
        let _ = self.rt.block_on(purge.into_future());
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
/// `ready`. A map-reduce's result is taken whole or not at all: its fold
/// covers all its tasks, so one that repeats any task already counted is
/// left out (its other tasks come in another result).
fn place<T: DeserializeOwned, P: DeserializeOwned>(
    sent: &mut Sent,
    result: ResultMsg,
    ready: &mut Ready<T, P>,
    reduces: bool,
) {
    let first = result.first_index;
    let end = first.saturating_add(u64::from(result.count));
    if reduces {
        let all_new = (first..end).all(|i| sent.is_open(i));
        if !all_new {
            return;
        }
        for (partial_first, item) in &result.partials {
            let partial = procpool_worker::worker::task::capturing(|| {
                decode_outcome::<Option<P>>(*partial_first, item)
            });
            ready.partials.push_back((*partial_first, partial));
        }
    }
    match result.outcomes {
        Ok(list) => {
            for (i, outcome) in list.into_iter().enumerate() {
                // A result is untrusted input: indices past the end wrap to
                // ones no batch has.
                let index = first.wrapping_add(i as u64);
                if !sent.takes(index) {
                    continue;
                }
                let outcome = match outcome {
                    Outcome::Encoded(item) => procpool_worker::worker::task::capturing(|| {
                        decode_outcome::<T>(index, &item)
                    }),
                    Outcome::Died(parts) => Err(TaskError::from_death(index, parts)),
                    Outcome::Lost(why) => Err(TaskError::pool(index, why)),
                };
                ready.outcomes.push_back((index, outcome));
            }
        }
        Err(why) => {
            for index in first..end {
                if sent.takes(index) {
                    ready
                        .outcomes
                        .push_back((index, Err(TaskError::pool(index, why.clone()))));
                }
            }
        }
    }
}

impl Sent {
    /// Whether task `index` is one of this batch's, without an outcome yet.
    fn is_open(&self, index: u64) -> bool {
        index
            .checked_sub(self.batch.first_index())
            .and_then(|offset| usize::try_from(offset).ok())
            .and_then(|offset| self.done.get(offset))
            .is_some_and(|done| !done)
    }

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
pub(super) struct ResultReader {
    stream: jetstream::stream::Stream,
    subject: String,
    /// The stream sequence of the next result to read.
    next_sequence: u64,
    consumer: Option<jetstream::consumer::PullConsumer>,
}

impl ResultReader {
    /// A reader of the results of every job of client `client`, from the
    /// end of `stream` as last looked up: nothing before it can be this
    /// client's, whose first batch is not sent yet (so the server does not
    /// scan the other clients' results).
    pub(super) fn new(stream: jetstream::stream::Stream, client: u64) -> ResultReader {
        let next_sequence = stream.cached_info().state.last_sequence + 1;
        ResultReader {
            stream,
            subject: wire::client_results(client),
            next_sequence,
            consumer: None,
        }
    }

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

/// A job or client id no other will pick.
pub(super) fn new_id() -> u64 {
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
