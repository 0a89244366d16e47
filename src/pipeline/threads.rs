//! The process runner: each stage driven by its own thread in this
//! process, so all stages progress at once. A process stage's thread feeds
//! its workers and collects their outcomes; an in-parent stage's thread
//! runs its closure. Items go from stage to stage over bounded channels,
//! in chunks; a stage whose workers are busy is woken by a doorbell when
//! input arrives.
//!
//! ```text
//! caller ──input──▶ stage 0 ──▶ stage 1 ──▶ … ──▶ stage n ──events──▶ caller
//!   ▲                  │ (hungry: read more input)                     │
//!   └──────────────────┴───────────────────────────────────────────────┘
//! ```

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::sys;
use procpool_worker::wire::split_item;

use super::output::{Received, push_input};
use super::stage::{Chunk, Outputs, Tasks};
use super::stage::{InParentFn, run_closure};
use super::{Plan, Started};
use crate::batching::BatchSizer;
use crate::engine::{Engine, Sink, Workers};
use crate::error::{PipelineError, StageKind, TaskError};

/// Chunks a channel between two stages holds.
const CHANNEL_CHUNKS: usize = 4;
/// Most input items the caller sends the first stage in one chunk.
const INPUT_CHUNK_ITEMS: usize = 4096;

/// What flows from one stage to the next.
pub(super) enum Flow {
    Items(Chunk),
    /// The input has ended, and every item before has been sent.
    End,
    /// A stage failed; every item before its failure has been sent.
    Failed(PipelineError),
}

/// What the caller's thread waits for.
enum Event {
    /// From the last stage.
    Flow(Flow),
    /// The first stage took a chunk: it has room for more input.
    Hungry,
}

/// A doorbell: an eventfd a stage's thread polls with its workers.
struct Doorbell(OwnedFd);

impl Doorbell {
    fn ring(&self) {
        sys::ring_event(self.0.as_raw_fd());
    }
}

/// What the caller and every stage's thread share.
struct Shared {
    /// Set when the output is dropped: every thread stops at once.
    stop: AtomicBool,
    bells: Vec<Arc<Doorbell>>,
}

/// Where a stage sends what it passes on.
enum Downstream {
    Stage {
        tx: SyncSender<Flow>,
        bell: Arc<Doorbell>,
    },
    Caller(Sender<Event>),
}

impl Downstream {
    /// Sends `flow`, waiting for room; false if nobody receives any more.
    fn send(&self, flow: Flow) -> bool {
        match self {
            Downstream::Stage { tx, bell } => {
                let sent = tx.send(flow).is_ok();
                bell.ring();
                sent
            }
            Downstream::Caller(tx) => tx.send(Event::Flow(flow)).is_ok(),
        }
    }
}

/// Where a stage's input stands.
enum Input {
    Open,
    Ended,
    Failed(PipelineError),
}

/// A stage as its thread runs it.
struct StageThread {
    input: Receiver<Flow>,
    bell: Arc<Doorbell>,
    /// The first stage tells the caller when it takes a chunk.
    hungry: Option<Sender<Event>>,
    downstream: Downstream,
    shared: Arc<Shared>,
    tasks: Tasks,
    outputs: Outputs,
    /// Tasks that may be in flight: made and not yet passed on.
    bound: u64,
    /// A chunk of input partly made into tasks, and where its rest starts.
    held: Option<(Chunk, usize)>,
    state: Input,
}

impl StageThread {
    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> u64 {
        self.tasks.next_task - self.outputs.next_task
    }

    /// Takes a flow from upstream.
    fn accept(&mut self, flow: Flow) {
        if let Some(tx) = &self.hungry {
            let _ = tx.send(Event::Hungry);
        }
        match flow {
            Flow::Items(chunk) => self.held = Some((chunk, 0)),
            Flow::End => {
                self.state = Input::Ended;
                self.tasks.finish(&mut self.outputs);
            }
            Flow::Failed(error) => {
                // The items before the failure still go through.
                self.state = Input::Failed(error);
                self.tasks.close_pending();
            }
        }
    }

    /// Makes tasks of the input at hand, while the bound allows, without
    /// blocking.
    fn take_input(&mut self, bounded: bool) {
        let full = |stage: &Self| bounded && stage.in_flight() >= stage.bound;
        loop {
            if full(self) {
                return;
            }
            if let Some((chunk, mut offset)) = self.held.take() {
                let mut rest = &chunk.items[offset..];
                while !rest.is_empty() && !full(self) {
                    let before = rest.len();
                    let Some(item) = split_item(&mut rest) else {
                        rest = &[];
                        break;
                    };
                    self.tasks.push(item, &mut self.outputs);
                    offset += before - rest.len();
                }
                if !rest.is_empty() {
                    self.held = Some((chunk, offset));
                }
                continue;
            }
            if !matches!(self.state, Input::Open) {
                return;
            }
            match self.input.try_recv() {
                Ok(flow) => self.accept(flow),
                Err(TryRecvError::Empty) => {
                    // Nothing more now: what is made goes without waiting
                    // for company.
                    self.tasks.close_pending();
                    return;
                }
                Err(TryRecvError::Disconnected) => return self.upstream_gone(),
            }
        }
    }

    /// Blocks until upstream sends something.
    fn wait_input(&mut self) {
        match self.input.recv() {
            Ok(flow) => self.accept(flow),
            Err(_) => self.upstream_gone(),
        }
    }

    fn upstream_gone(&mut self) {
        if !self.stopped() {
            let task = self.outputs.next_task;
            let error = TaskError::pool(task, "the stage before ended without a word");
            self.outputs.fail(task, error);
        }
        self.state = Input::Ended;
    }

    /// Sends what is passed on; `Err` if the stage is to stop: it failed
    /// (its failure is sent on) or nobody listens any more.
    fn pass_on(&mut self) -> Result<(), ()> {
        if let Some(chunk) = self.outputs.take_chunk()
            && !self.downstream.send(Flow::Items(chunk))
        {
            return Err(());
        }
        if let Some(failure) = self.outputs.failure.take() {
            self.downstream.send(Flow::Failed(failure));
            return Err(());
        }
        Ok(())
    }

    /// Whether every task has been passed on and no input is to come; then
    /// the end (or the failure before it) is sent on.
    fn finish_if_done(&mut self) -> bool {
        let done = self.held.is_none()
            && !matches!(self.state, Input::Open)
            && !self.tasks.has_tasks()
            && self.outputs.caught_up(self.tasks.next_task);
        if done {
            let state = std::mem::replace(&mut self.state, Input::Ended);
            self.downstream.send(match state {
                Input::Failed(error) => Flow::Failed(error),
                _ => Flow::End,
            });
        }
        done
    }

    /// A process stage: feeds `workers`, collects their outcomes, until the
    /// input ends, a task fails, or the output is dropped.
    fn run_workers(mut self, mut workers: Workers, mut sizer: BatchSizer, root_seed: u64) {
        let n_workers = workers.pids().len().max(1) as u64;
        let per_batch = (self.bound / (2 * n_workers)).max(1);
        let clean = {
            let mut engine = Engine::new(&mut workers, &mut sizer, root_seed);
            self.drive(&mut engine, per_batch)
        };
        if clean {
            workers.shutdown();
        } else {
            workers.kill_all();
        }
    }

    /// The loop of [`run_workers`](Self::run_workers); whether it ended
    /// cleanly (the workers may be asked to exit rather than killed).
    fn drive(&mut self, engine: &mut Engine<'_>, per_batch: u64) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            let (count, max_bytes) = engine.batch_limits();
            self.tasks.target = (count as u64).min(per_batch) as usize;
            self.tasks.max_bytes = max_bytes;
            self.take_input(true);
            while let Some(batch) = self.tasks.next_batch() {
                engine.submit(batch);
            }
            engine.wants_batch();
            if self.pass_on().is_err() {
                return false;
            }
            if self.finish_if_done() {
                // Every task is done: the workers may exit on their own.
                return true;
            }
            if engine.in_flight() {
                engine.wait_or_woken(&mut self.outputs, self.bell.0.as_raw_fd());
                sys::clear_event(self.bell.0.as_raw_fd());
            } else if !engine.has_workers() && (engine.has_queued() || self.tasks.has_tasks()) {
                // Work to run and no worker left: a stateful stage's
                // process died between tasks, and its state with it.
                let task = self.outputs.next_task;
                let error = TaskError::pool(task, "the stage's worker process died");
                self.outputs.fail(task, error);
            } else if self.tasks.has_tasks() {
                // Idle workers: the tasks made so far go without waiting
                // for company.
                self.tasks.close_pending();
            } else if self.held.is_none() && matches!(self.state, Input::Open) {
                self.wait_input();
            }
        }
    }

    /// An in-parent stage: runs each chunk through `closure` as it comes.
    fn run_here(mut self, mut closure: Box<dyn InParentFn>, root_seed: u64) {
        self.tasks.target = INPUT_CHUNK_ITEMS;
        loop {
            if self.stopped() {
                return;
            }
            self.take_input(false);
            self.tasks.close_pending();
            while let Some(batch) = self.tasks.next_batch() {
                if self.outputs.failure.is_some() {
                    break;
                }
                let out = run_closure(closure.as_mut(), &batch, root_seed);
                self.outputs
                    .outcomes(batch.first_index(), batch.count(), &out);
            }
            if self.pass_on().is_err() || self.finish_if_done() {
                return;
            }
            if self.held.is_none() && matches!(self.state, Input::Open) {
                self.wait_input();
            }
        }
    }
}

/// The output of [`Pipeline::apply`](super::Pipeline::apply): the last
/// stage's items in input order, then, if a stage failed, its error.
///
/// Dropping it before the end stops every stage at once: running tasks are
/// abandoned and the workers killed.
pub struct Output<I, Z> {
    input: I,
    /// Input items read so far.
    read: u64,
    first_kind: StageKind,
    /// Input items per chunk sent to the first stage.
    chunk_items: u32,
    /// The first stage's input, until the input ends.
    to_first: Option<SyncSender<Flow>>,
    /// Flows read from the input and not yet taken by the first stage.
    unsent: VecDeque<Flow>,
    events: Option<Receiver<Event>>,
    received: Received<Z>,
    /// The last stage has sent its end (or failure), or will send nothing.
    finished: bool,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    pids: Vec<u32>,
}

impl<I, Z> std::fmt::Debug for Output<I, Z> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("read", &self.read)
            .field("finished", &self.finished)
            .field("worker_pids", &self.pids)
            .finish_non_exhaustive()
    }
}

impl<I, A, Z> Output<I, Z>
where
    I: Iterator<Item = A>,
    A: Serialize,
    Z: DeserializeOwned,
{
    pub(super) fn start(plan: Plan, input: I) -> Self {
        let mut output = Output {
            input,
            read: 0,
            first_kind: plan.first_kind(),
            chunk_items: plan
                .stages
                .first()
                .map_or(1, |s| s.in_flight.min(INPUT_CHUNK_ITEMS)) as u32,
            to_first: None,
            unsent: VecDeque::new(),
            events: None,
            received: Received::new(plan.last_stage(), plan.progress.clone()),
            finished: true,
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                bells: Vec::new(),
            }),
            threads: Vec::new(),
            pids: Vec::new(),
        };
        if let Err(error) = output.launch(plan) {
            output.stop();
            output.received.fail(None, error);
        }
        output
    }

    /// Starts every stage's workers, then their threads.
    fn launch(&mut self, mut plan: Plan) -> Result<(), PipelineError> {
        let checked = plan.check()?;
        let last = plan.stages.len() - 1;
        let mut bells = Vec::new();
        for (position, stage) in plan.stages.iter().enumerate() {
            let bell = sys::event_fd()
                .map_err(|e| crate::PoolError::io("create a doorbell", e))
                .map_err(|e| PipelineError::start(position, stage.kind, e))?;
            bells.push(Arc::new(Doorbell(bell)));
        }
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            bells: bells.clone(),
        });
        self.shared = Arc::clone(&shared);
        // Workers first, so a stage that cannot start leaves no thread.
        let mut started = Vec::new();
        let stages = std::mem::take(&mut plan.stages);
        for (position, stage) in stages.into_iter().enumerate() {
            let (kind, post, in_flight) = (stage.kind, stage.post.clone(), stage.in_flight);
            let ready = stage
                .start(checked.n_jobs[position], &plan)
                .map_err(|e| PipelineError::start(position, kind, e))?;
            if let Started::Workers(workers) = &ready {
                self.pids.extend(workers.pids());
            }
            started.push((kind, post, in_flight, ready));
        }
        let (events_tx, events_rx) = mpsc::channel();
        let (first_tx, mut rx) = mpsc::sync_channel(CHANNEL_CHUNKS);
        for (position, (kind, post, in_flight, ready)) in started.into_iter().enumerate() {
            let (downstream, next_rx) = if position == last {
                (Downstream::Caller(events_tx.clone()), None)
            } else {
                let (tx, next_rx) = mpsc::sync_channel(CHANNEL_CHUNKS);
                let bell = Arc::clone(&bells[position + 1]);
                (Downstream::Stage { tx, bell }, Some(next_rx))
            };
            let thread = StageThread {
                input: rx,
                bell: Arc::clone(&bells[position]),
                hungry: (position == 0).then(|| events_tx.clone()),
                downstream,
                shared: Arc::clone(&shared),
                tasks: Tasks::new(kind),
                outputs: Outputs::new(position, kind, post, position == last),
                bound: in_flight as u64,
                held: None,
                state: Input::Open,
            };
            let root_seed = super::stage_seed(checked.root_seed, position);
            let builder = std::thread::Builder::new().name(format!("procpool-stage-{position}"));
            let spawned = match ready {
                Started::Workers(workers) => builder
                    .spawn(move || thread.run_workers(workers, BatchSizer::new(None), root_seed)),
                Started::Here(closure) => {
                    builder.spawn(move || thread.run_here(closure, root_seed))
                }
            };
            match spawned {
                Ok(handle) => self.threads.push(handle),
                Err(e) => {
                    let error = crate::PoolError::io("start a stage's thread", e);
                    return Err(PipelineError::start(position, kind, error));
                }
            }
            match next_rx {
                Some(next) => rx = next,
                None => break,
            }
        }
        self.to_first = Some(first_tx);
        self.events = Some(events_rx);
        self.finished = false;
        Ok(())
    }

    /// Sends the first stage as much input as its channel takes.
    fn top_up(&mut self) {
        while self.to_first.is_some() {
            if self.unsent.is_empty() {
                self.read_input();
            }
            let Some(tx) = &self.to_first else {
                return;
            };
            let Some(flow) = self.unsent.pop_front() else {
                return;
            };
            let last = !matches!(flow, Flow::Items(_));
            match tx.try_send(flow) {
                Ok(()) => {
                    self.shared.bells[0].ring();
                    if last {
                        self.to_first = None;
                    }
                }
                Err(TrySendError::Full(flow)) => {
                    self.unsent.push_front(flow);
                    return;
                }
                Err(TrySendError::Disconnected(_)) => self.to_first = None,
            }
        }
    }

    /// Reads the next chunk of input (and its end, or a failure to encode
    /// an item) into `unsent`.
    fn read_input(&mut self) {
        let mut chunk = Chunk {
            first: self.read,
            ..Chunk::default()
        };
        let mut end = None;
        while chunk.count < self.chunk_items {
            let Some(arg) = self.input.next() else {
                end = Some(Flow::End);
                break;
            };
            let index = self.read;
            self.read += 1;
            self.received.read(1);
            if let Err(error) = push_input(arg, index, self.first_kind, &mut chunk) {
                // The items before it go first; the first stage passes the
                // failure on after them.
                end = Some(Flow::Failed(error));
                break;
            }
        }
        if chunk.count > 0 {
            self.unsent.push_back(Flow::Items(chunk));
        }
        self.unsent.extend(end);
    }
}

impl<I, Z> Output<I, Z> {
    /// The worker processes the stages started with (a worker that dies is
    /// replaced, and its replacement is not listed).
    pub fn worker_pids(&self) -> &[u32] {
        &self.pids
    }

    /// Stops every stage and waits for their threads.
    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for bell in &self.shared.bells {
            bell.ring();
        }
        self.to_first = None;
        self.unsent.clear();
        self.events = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.finished = true;
    }
}

impl<I, A, Z> Iterator for Output<I, Z>
where
    I: Iterator<Item = A>,
    A: Serialize,
    Z: DeserializeOwned,
{
    type Item = Result<Z, PipelineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.received.next_item() {
                if item.is_err() {
                    self.stop();
                }
                return Some(item);
            }
            if self.finished || self.received.ended() {
                self.stop();
                self.received.finish();
                return None;
            }
            self.top_up();
            let event = match &self.events {
                Some(events) => events.recv(),
                None => Err(mpsc::RecvError),
            };
            match event {
                Ok(Event::Hungry) => {}
                Ok(Event::Flow(Flow::Items(chunk))) => self.received.push(chunk),
                Ok(Event::Flow(Flow::End)) => self.finished = true,
                Ok(Event::Flow(Flow::Failed(error))) => {
                    self.received.fail(Some(error.stage()), error);
                    self.finished = true;
                }
                Err(_) => {
                    // Every stage's thread is gone without an end: only a
                    // bug does that, but it must not look like a clean end.
                    let kind = self.first_kind;
                    let error =
                        TaskError::pool(self.read, "the pipeline's stages ended without a word");
                    self.received
                        .fail(None, PipelineError::task(0, kind, self.read, error));
                    self.finished = true;
                }
            }
        }
    }
}

impl<I, Z> Drop for Output<I, Z> {
    fn drop(&mut self) {
        self.stop();
    }
}
