//! The sequential runner: every stage in this process, one after the
//! other, through the same encode → run → decode path as the process
//! runner, so both give the same items and the same errors.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Plan;
use super::output::Received;
use super::stage::{Chunk, Here, Outputs, Tasks};
use crate::engine::Sink;
use crate::error::PipelineError;

/// Input items read per step: few, so the input is read lazily.
const STEP_ITEMS: usize = 64;

/// One stage run here.
struct LocalStage {
    tasks: Tasks,
    outputs: Outputs,
    here: Here,
    root_seed: u64,
}

impl LocalStage {
    /// Runs `chunk` (and, at the end of the input, what the stage still
    /// holds) through the stage; returns what it passes on.
    fn feed(&mut self, chunk: &Chunk, end: bool) -> Chunk {
        let mut rest = &chunk.items[..];
        while let Some(item) = procpool_worker::wire::split_item(&mut rest) {
            self.tasks.push(item, &mut self.outputs);
        }
        if end {
            self.tasks.finish(&mut self.outputs);
        } else {
            self.tasks.close_pending();
        }
        while let Some(batch) = self.tasks.next_batch() {
            if self.outputs.failure.is_some() {
                break;
            }
            let out = self.here.run(&batch, self.root_seed);
            self.outputs
                .outcomes(batch.first_index(), batch.count(), &out);
        }
        if end {
            self.here.finish();
        }
        self.outputs.take_chunk().unwrap_or_default()
    }
}

/// The output of [`Pipeline::apply_sequential`](super::Pipeline::apply_sequential):
/// the last stage's items in input order, then, if a stage failed, its
/// error.
pub struct SequentialOutput<I, Z> {
    input: I,
    stages: Vec<LocalStage>,
    received: Received<Z>,
    /// Input items read so far.
    read: u64,
    first_kind: crate::error::StageKind,
    /// No more input is read.
    done: bool,
}

impl<I, Z> std::fmt::Debug for SequentialOutput<I, Z> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequentialOutput")
            .field("stages", &self.stages.len())
            .field("read", &self.read)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<I, A, Z> SequentialOutput<I, Z>
where
    I: Iterator<Item = A>,
    A: Serialize,
    Z: DeserializeOwned,
{
    pub(super) fn new(plan: Plan, input: I) -> Self {
        let last = plan.stages.len().saturating_sub(1);
        let mut received = Received::new(plan.last_stage(), plan.progress.clone());
        let first_kind = plan.first_kind();
        let checked = plan.check();
        let root_seed = checked.as_ref().map_or(0, |c| c.root_seed);
        if let Err(error) = &checked {
            received.fail(None, error.clone());
        }
        let stages = plan
            .stages
            .into_iter()
            .enumerate()
            .map(|(position, stage)| LocalStage {
                tasks: Tasks::new(stage.kind).with_target(STEP_ITEMS),
                outputs: Outputs::new(position, stage.kind, stage.post, position == last),
                here: stage.work.into_here(),
                root_seed: super::stage_seed(root_seed, position),
            })
            .collect();
        SequentialOutput {
            input,
            stages,
            received,
            read: 0,
            first_kind,
            done: checked.is_err(),
        }
    }

    /// Reads a few input items and runs them through every stage.
    fn step(&mut self) {
        let mut chunk = Chunk::default();
        let mut end = false;
        // An input item that cannot be encoded ends the input, but not as
        // its end: a chunked stage's last short chunk is not run.
        let mut input_failed = false;
        while chunk.count < STEP_ITEMS as u32 {
            let Some(arg) = self.input.next() else {
                end = true;
                break;
            };
            if let Err(error) =
                super::output::push_input(arg, self.read, self.first_kind, &mut chunk)
            {
                // The items before it go on; nothing after it.
                self.received.fail(None, error);
                (end, input_failed) = (true, true);
                break;
            }
            self.read += 1;
            self.received.read(1);
        }
        let mut failed = false;
        for (position, stage) in self.stages.iter_mut().enumerate() {
            // After a stage fails, the later ones still run what came
            // before its failure, but their input has not ended.
            chunk = stage.feed(&chunk, end && !failed && !input_failed);
            if let Some(error) = stage.outputs.failure.take() {
                self.received.fail(Some(position), error);
                failed = true;
            }
        }
        self.received.push(chunk);
        if failed {
            end = true;
        }
        if end {
            self.done = true;
        }
    }
}

impl<I, A, Z> Iterator for SequentialOutput<I, Z>
where
    I: Iterator<Item = A>,
    A: Serialize,
    Z: DeserializeOwned,
{
    type Item = Result<Z, PipelineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.received.next_item() {
                return Some(item);
            }
            if self.done || self.received.ended() {
                self.received.finish();
                return None;
            }
            self.step();
        }
    }
}
