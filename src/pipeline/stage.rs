//! One stage of a pipeline as it runs, whichever runner drives it: how its
//! input items become tasks (one each, sliding windows, chunks), how its
//! batches run here when they do, and how its outcomes go back into input
//! order and become the next stage's items.
//!
//! Items travel between stages encoded, as framed items (see
//! `procpool_worker::wire::split_item`). A stage's successful outcome is
//! `Ok` followed by its value's encoding, so the value is passed on as the
//! next stage's argument as it is: between two process stages, nothing is
//! decoded in this process.

use std::collections::{BTreeMap, VecDeque};

use procpool_worker::wire::{TaskFailure, push_item, split_item};
use procpool_worker::worker::jobs::JobState;
use procpool_worker::worker::task::{BatchView, capturing};

use crate::engine::{Batch, JobSpec, Sink, decode_outcome};
use crate::error::{PipelineError, StageKind, TaskError};
use crate::store::UntypedStore;

/// Items on their way from one stage to the next, in input order.
#[derive(Debug, Default)]
pub(super) struct Chunk {
    /// The index of the first, among the receiving stage's input items.
    pub first: u64,
    pub count: u32,
    /// The items, framed.
    pub items: Vec<u8>,
    /// For the last stage's output only: for each item, the index of the
    /// first input item of the task it came from (to name it if the item
    /// cannot be decoded here).
    pub origins: Vec<u64>,
}

/// What a stage does after its function: turns one encoded value into
/// zero or more items appended to `out` (framed); returns how many. A
/// pipeline's `flatten`.
pub(super) type PostFn = fn(&[u8], &mut Vec<u8>) -> Result<u32, TaskFailure>;

/// A closure run in this process on a batch, with a worker's outcomes.
pub(super) trait InParentFn: Send {
    fn run(&mut self, batch: BatchView<'_>, out: &mut Vec<u8>);
}

/// A stage's work when it runs here: a process stage's job (in the
/// sequential runner), or an in-parent closure.
pub(super) enum Here {
    Job {
        job: JobSpec,
        model: Option<UntypedStore>,
        state: JobState,
    },
    Closure(Box<dyn InParentFn>),
}

impl Here {
    /// Runs `batch` and returns its outcomes, as a worker would.
    pub(super) fn run(&mut self, batch: &Batch, root_seed: u64) -> Vec<u8> {
        match self {
            Here::Job { job, model, state } => {
                let archive = model.as_ref().map_or(&[][..], UntypedStore::archive_bytes);
                // SAFETY: the stage's job was built with its runner
                // monomorphised for its functions and the stage's input and
                // output types, and the model it reads (see `Pipeline`);
                // the batch holds that input type's encodings, and `state`
                // is this stage's alone.
                unsafe { crate::map::run_batch_here(*job, state, archive, batch, root_seed) }
            }
            Here::Closure(closure) => run_closure(closure.as_mut(), batch, root_seed),
        }
    }

    /// Drops a stateful job's state here, as a worker does when it is
    /// stopped: under `catch_unwind` (its `Drop` is user code), a panic
    /// printed to stderr, since every output is out by then.
    pub(super) fn finish(&mut self) {
        if let Here::Job { state, .. } = self
            && let Some(state) = state.take()
            && let Err(failure) =
                capturing(|| procpool_worker::worker::task::catch(move || drop(state)))
        {
            eprintln!("the stage's state panicked when dropped: {failure:?}");
        }
    }
}

/// Runs `batch` through an in-parent stage's closure; returns its
/// outcomes, as a worker's.
pub(super) fn run_closure(closure: &mut dyn InParentFn, batch: &Batch, root_seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    closure.run(batch.view(root_seed), &mut out);
    out
}

/// How a stage's input items become its tasks' arguments.
enum Shaper {
    /// One task per item.
    Each,
    /// One task per run of `k` consecutive items: the last `k` items seen.
    Windows { k: usize, recent: VecDeque<Vec<u8>> },
    /// One task per `k` items; the last may be shorter.
    Chunks {
        k: usize,
        held: Vec<u8>,
        count: usize,
    },
}

/// The task arguments of a stage, made from its input items.
pub(super) struct Tasks {
    shaper: Shaper,
    /// The index of the next task.
    pub next_task: u64,
    /// Batches ready to run, in task order.
    ready: VecDeque<Batch>,
    /// Tasks not yet in a batch of `ready`.
    pending: Batch,
    /// Tasks a batch should hold at most.
    pub target: usize,
    /// Bytes of arguments a batch should hold at most.
    pub max_bytes: usize,
}

impl Tasks {
    pub(super) fn new(kind: StageKind) -> Tasks {
        let shaper = match kind {
            StageKind::Windowed(k) => Shaper::Windows {
                k,
                recent: VecDeque::with_capacity(k),
            },
            StageKind::Chunked(k) => Shaper::Chunks {
                k,
                held: Vec::new(),
                count: 0,
            },
            _ => Shaper::Each,
        };
        Tasks {
            shaper,
            next_task: 0,
            ready: VecDeque::new(),
            pending: Batch::new(0),
            target: 1,
            max_bytes: usize::MAX,
        }
    }

    /// The same, with batches of at most `target` tasks.
    pub(super) fn with_target(mut self, target: usize) -> Tasks {
        self.target = target;
        self
    }

    /// Takes one input item; a task it completes goes into a batch. A task
    /// whose argument is too large to send fails at once, into `outputs`.
    pub(super) fn push(&mut self, item: &[u8], outputs: &mut Outputs) {
        let pushed = match &mut self.shaper {
            Shaper::Each => Some(self.pending.push_encoded(&[], std::iter::once(item))),
            Shaper::Windows { k, recent } => {
                let mut slot = if recent.len() == *k {
                    recent.pop_front().unwrap_or_default()
                } else {
                    Vec::new()
                };
                slot.clear();
                slot.extend_from_slice(item);
                recent.push_back(slot);
                if recent.len() == *k {
                    Some(push_vec(
                        &mut self.pending,
                        *k,
                        recent.iter().map(Vec::as_slice),
                    ))
                } else {
                    None
                }
            }
            Shaper::Chunks { k, held, count } => {
                held.extend_from_slice(item);
                *count += 1;
                if *count == *k {
                    let pushed = push_vec(&mut self.pending, *k, std::iter::once(held.as_slice()));
                    held.clear();
                    *count = 0;
                    Some(pushed)
                } else {
                    None
                }
            }
        };
        self.after_push(pushed, outputs);
    }

    /// The input has ended: a chunked stage's last, shorter chunk becomes a
    /// task.
    pub(super) fn finish(&mut self, outputs: &mut Outputs) {
        if let Shaper::Chunks { held, count, .. } = &mut self.shaper
            && *count > 0
        {
            let pushed = push_vec(&mut self.pending, *count, std::iter::once(held.as_slice()));
            held.clear();
            *count = 0;
            self.after_push(Some(pushed), outputs);
        }
        self.close_pending();
    }

    fn after_push(&mut self, pushed: Option<Result<(), TaskFailure>>, outputs: &mut Outputs) {
        match pushed {
            None => {}
            Some(Ok(())) => {
                self.next_task += 1;
                let full = self.pending.count() as usize >= self.target
                    || self.pending.encoded_len() >= self.max_bytes;
                if full {
                    self.close_pending();
                }
            }
            Some(Err(failure)) => {
                // The batches hold contiguous tasks: the ones before it go
                // as they are, and the ones after it start a new batch.
                let index = self.next_task;
                self.close_pending();
                self.next_task += 1;
                self.pending = Batch::new(self.next_task);
                outputs.failed(index, TaskError::from_failure(index, failure));
            }
        }
    }

    /// The tasks not yet in a batch make one.
    pub(super) fn close_pending(&mut self) {
        if self.pending.count() > 0 {
            let next = Batch::new(self.next_task);
            self.ready
                .push_back(std::mem::replace(&mut self.pending, next));
        } else {
            self.pending = Batch::new(self.next_task);
        }
    }

    /// The next batch ready to run.
    pub(super) fn next_batch(&mut self) -> Option<Batch> {
        self.ready.pop_front()
    }

    /// Whether tasks wait, in a batch or not.
    pub(super) fn has_tasks(&self) -> bool {
        !self.ready.is_empty() || self.pending.count() > 0
    }
}

/// `n` as postcard encodes a length: LEB128, in a buffer and its length.
fn varint(mut n: u64) -> ([u8; 10], usize) {
    let mut out = [0; 10];
    let mut len = 0;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out[len] = byte;
            return (out, len + 1);
        }
        out[len] = byte | 0x80;
        len += 1;
    }
}

/// A `Vec` of `count` items as postcard encodes it, from the items'
/// encodings: the length, then the items.
fn push_vec<'a>(
    batch: &mut Batch,
    count: usize,
    items: impl Iterator<Item = &'a [u8]> + Clone,
) -> Result<(), TaskFailure> {
    let (prefix, len) = varint(count as u64);
    batch.push_encoded(&prefix[..len], items)
}

/// What came back for tasks that cannot be passed on yet: an earlier task
/// has not come back.
enum Delivered {
    Outcomes { count: u32, items: Vec<u8> },
    Failed(TaskError),
}

/// A stage's outcomes, put back in task order and passed on as the next
/// stage's items; the first failure ends them.
pub(super) struct Outputs {
    position: usize,
    kind: StageKind,
    post: Vec<PostFn>,
    /// Whether each item's origin is kept (the last stage's).
    track_origins: bool,
    /// The next task whose outcome is to be passed on.
    pub next_task: u64,
    waiting: BTreeMap<u64, Delivered>,
    /// Items passed on and not yet sent.
    chunk: Chunk,
    /// Items passed on so far, sent or not.
    passed: u64,
    /// The failure that ends this stage's output.
    pub failure: Option<PipelineError>,
    scratch: Vec<u8>,
}

impl Outputs {
    pub(super) fn new(
        position: usize,
        kind: StageKind,
        post: Vec<PostFn>,
        track_origins: bool,
    ) -> Outputs {
        Outputs {
            position,
            kind,
            post,
            track_origins,
            next_task: 0,
            waiting: BTreeMap::new(),
            chunk: Chunk::default(),
            passed: 0,
            failure: None,
            scratch: Vec::new(),
        }
    }

    /// The index of the first input item of task `task`.
    pub(super) fn first_item(&self, task: u64) -> u64 {
        match self.kind {
            StageKind::Chunked(k) => task * k as u64,
            _ => task,
        }
    }

    /// The failure of task `task`, as the pipeline reports it.
    pub(super) fn fail(&mut self, task: u64, error: TaskError) {
        if self.failure.is_none() {
            let item = self.first_item(task);
            self.failure = Some(PipelineError::task(self.position, self.kind, item, error));
        }
    }

    /// Items passed on since the last call, if any.
    pub(super) fn take_chunk(&mut self) -> Option<Chunk> {
        if self.chunk.count == 0 {
            return None;
        }
        let first = self.passed;
        let mut chunk = std::mem::take(&mut self.chunk);
        chunk.first = first;
        self.passed += u64::from(chunk.count);
        Some(chunk)
    }

    /// Whether every task up to `made` has been passed on (or the stage
    /// has failed).
    pub(super) fn caught_up(&self, made: u64) -> bool {
        self.failure.is_some() || (self.next_task == made && self.waiting.is_empty())
    }

    /// Passes on the outcomes of tasks `first..first + count`, which are
    /// next in order.
    fn pass_on(&mut self, first: u64, count: u32, mut items: &[u8]) {
        for i in 0..u64::from(count) {
            if self.failure.is_some() {
                return;
            }
            let task = first + i;
            self.next_task = task + 1;
            let Some(item) = split_item(&mut items) else {
                self.fail(task, TaskError::bad_result(task, "malformed results"));
                return;
            };
            match item.split_first() {
                // `Ok`, then the value's encoding.
                Some((0, value)) => {
                    if let Err(failure) = self.post_process(value, task) {
                        self.fail(task, TaskError::from_failure(task, failure));
                    }
                }
                _ => {
                    let error = match capturing(|| decode_outcome::<()>(task, item)) {
                        Err(error) => error,
                        Ok(()) => TaskError::bad_result(task, "malformed results"),
                    };
                    self.fail(task, error);
                }
            }
        }
    }

    /// Appends `value`, after the stage's post-steps, to the chunk.
    fn post_process(&mut self, value: &[u8], task: u64) -> Result<(), TaskFailure> {
        let before = self.chunk.count;
        match self.post.as_slice() {
            [] => {
                push_item(&mut self.chunk.items, value);
                self.chunk.count += 1;
            }
            [flatten] => self.chunk.count += flatten(value, &mut self.chunk.items)?,
            steps => {
                // Each step's items are the next one's values.
                let mut values = Vec::new();
                push_item(&mut values, value);
                for step in steps {
                    self.scratch.clear();
                    let mut rest = &values[..];
                    while let Some(v) = split_item(&mut rest) {
                        step(v, &mut self.scratch)?;
                    }
                    std::mem::swap(&mut values, &mut self.scratch);
                }
                let mut rest = &values[..];
                while let Some(v) = split_item(&mut rest) {
                    push_item(&mut self.chunk.items, v);
                    self.chunk.count += 1;
                }
            }
        }
        if self.track_origins {
            let origin = self.first_item(task);
            let added = (self.chunk.count - before) as usize;
            self.chunk
                .origins
                .extend(std::iter::repeat_n(origin, added));
        }
        Ok(())
    }

    /// Passes on what waited for the tasks now passed on.
    fn drain_waiting(&mut self) {
        while let Some(entry) = self.waiting.first_entry() {
            if *entry.key() != self.next_task || self.failure.is_some() {
                return;
            }
            let (first, delivered) = entry.remove_entry();
            match delivered {
                Delivered::Outcomes { count, items } => self.pass_on(first, count, &items),
                Delivered::Failed(error) => {
                    self.next_task = first + 1;
                    self.fail(first, error);
                }
            }
        }
    }
}

impl Sink for Outputs {
    fn outcomes(&mut self, first_index: u64, count: u32, items: &[u8]) {
        if self.failure.is_some() {
            return;
        }
        if first_index == self.next_task {
            self.pass_on(first_index, count, items);
            self.drain_waiting();
        } else {
            let items = items.to_vec();
            self.waiting
                .insert(first_index, Delivered::Outcomes { count, items });
        }
    }

    fn failed(&mut self, index: u64, error: TaskError) {
        if self.failure.is_some() {
            return;
        }
        if self.kind == StageKind::Stateful {
            // The process died, and its state with it: the outcomes of the
            // items it ran since its last results are lost too, so the
            // output ends at the first of them (the error names the task
            // that was running).
            let first_lost = self.next_task;
            self.fail(first_lost, error);
            return;
        }
        if index == self.next_task {
            self.next_task = index + 1;
            self.fail(index, error);
        } else {
            self.waiting.insert(index, Delivered::Failed(error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(values: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for v in values {
            push_item(&mut out, v);
        }
        out
    }

    fn outcome_ok(value: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(value);
        v
    }

    #[test]
    fn windows_slide_by_one_and_chunks_end_short() {
        let mut outputs = Outputs::new(0, StageKind::Windowed(3), Vec::new(), false);
        let mut tasks = Tasks::new(StageKind::Windowed(3));
        tasks.target = 100;
        for x in 1u8..=6 {
            tasks.push(&[x], &mut outputs);
        }
        tasks.finish(&mut outputs);
        let batch = tasks.next_batch().unwrap();
        assert_eq!(batch.count(), 4);
        let mut rest = batch.view(0).items;
        let first = split_item(&mut rest).unwrap();
        assert_eq!(first, [3, 1, 2, 3]); // Vec of 3: length, then the items
        let mut chunks = Tasks::new(StageKind::Chunked(4));
        chunks.target = 100;
        for x in 0u8..10 {
            chunks.push(&[x], &mut outputs);
        }
        chunks.finish(&mut outputs);
        let batch = chunks.next_batch().unwrap();
        let mut rest = batch.view(0).items;
        let lens: Vec<u8> = (0..batch.count())
            .map(|_| split_item(&mut rest).unwrap()[0])
            .collect();
        assert_eq!(lens, [4, 4, 2]);
    }

    #[test]
    fn outcomes_are_passed_on_in_task_order() {
        let mut outputs = Outputs::new(0, StageKind::Stateless, Vec::new(), true);
        // Tasks 2..4 come back before 0..2.
        outputs.outcomes(2, 2, &items(&[&outcome_ok(&[12]), &outcome_ok(&[13])]));
        assert!(outputs.take_chunk().is_none());
        outputs.outcomes(0, 2, &items(&[&outcome_ok(&[10]), &outcome_ok(&[11])]));
        let chunk = outputs.take_chunk().unwrap();
        assert_eq!(chunk.count, 4);
        let mut rest = &chunk.items[..];
        let got: Vec<u8> = (0..4).map(|_| split_item(&mut rest).unwrap()[0]).collect();
        assert_eq!(got, [10, 11, 12, 13]);
        assert_eq!(chunk.origins, [0, 1, 2, 3]);
        assert!(outputs.caught_up(4));
    }

    #[test]
    fn a_failure_ends_the_output_after_the_tasks_before_it() {
        let mut outputs = Outputs::new(1, StageKind::Chunked(5), Vec::new(), false);
        outputs.failed(1, TaskError::pool(1, "lost"));
        outputs.outcomes(2, 1, &items(&[&outcome_ok(&[2])]));
        assert!(outputs.failure.is_none());
        outputs.outcomes(0, 1, &items(&[&outcome_ok(&[0])]));
        let chunk = outputs.take_chunk().unwrap();
        assert_eq!(chunk.count, 1, "only task 0 comes before the failure");
        let failure = outputs.failure.as_ref().unwrap();
        assert_eq!((failure.stage(), failure.item()), (1, Some(5)));
        assert!(outputs.caught_up(0));
    }

    #[test]
    fn varint_is_leb128() {
        let (bytes, len) = varint(3);
        assert_eq!(bytes[..len], [3]);
        let (bytes, len) = varint(300);
        assert_eq!(bytes[..len], [0xac, 0x02]);
    }
}
