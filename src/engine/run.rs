//! The typed layer of a `map`: reads the input iterator lazily, encodes
//! arguments into batches for the [`Engine`], decodes outcomes, and gives
//! results back in input order or as they complete.

use std::collections::VecDeque;
use std::marker::PhantomData;

use procpool_worker::stamps::{Step, stamp};
use procpool_worker::wire::{MAX_ARGUMENT_BYTES, TaskFailure, split_item};
use procpool_worker::worker::task::{capturing, catch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::batch::{Batch, encode_argument};
use super::dispatch::{Engine, Sink};
use super::workers::Workers;
use crate::batching::BatchSizer;
use crate::error::TaskError;

/// Where results wait until the caller takes them.
enum Results<R> {
    /// In input order: slot `i` holds task `base + i`.
    Ordered {
        base: u64,
        slots: VecDeque<Option<Result<R, TaskError>>>,
    },
    /// As they complete, with their input index.
    Unordered {
        ready: VecDeque<(u64, Result<R, TaskError>)>,
    },
}

impl<R> Results<R> {
    fn new(ordered: bool, first_index: u64) -> Self {
        if ordered {
            Results::Ordered {
                base: first_index,
                slots: VecDeque::new(),
            }
        } else {
            Results::Unordered {
                ready: VecDeque::new(),
            }
        }
    }

    fn put(&mut self, index: u64, result: Result<R, TaskError>) {
        match self {
            Results::Ordered { base, slots } => {
                let at = (index - *base) as usize;
                if slots.len() <= at {
                    slots.resize_with(at + 1, || None);
                }
                slots[at] = Some(result);
            }
            Results::Unordered { ready } => ready.push_back((index, result)),
        }
    }

    fn take(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        match self {
            Results::Ordered { base, slots } => {
                if matches!(slots.front(), Some(Some(_))) {
                    let index = *base;
                    *base += 1;
                    slots.pop_front().flatten().map(|r| (index, r))
                } else {
                    None
                }
            }
            Results::Unordered { ready } => ready.pop_front(),
        }
    }
}

impl<R: DeserializeOwned> Sink for Results<R> {
    fn outcomes(&mut self, first_index: u64, count: u32, items: &[u8]) {
        decode_outcomes(first_index, count, items, |index, result| {
            self.put(index, result)
        });
    }

    fn failed(&mut self, index: u64, error: TaskError) {
        self.put(index, Err(error));
    }
}

/// One `map` running on a pool.
pub(crate) struct Run<'p, I, A, R>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    engine: Engine<'p>,
    input: I,
    exhausted: bool,
    next_index: u64,
    results: Results<R>,
    /// An argument too large to share the batch before it: it goes out
    /// alone, next.
    overflow: Option<Batch>,
    fail_fast: bool,
    /// Set once fail-fast has stopped the run.
    stopped: bool,
    _types: PhantomData<fn(A) -> R>,
}

impl<'p, I, A, R> Run<'p, I, A, R>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    /// A run over `workers` whose first task has index `first_index` (0 for
    /// a `map`).
    pub(crate) fn new(
        workers: &'p mut Workers,
        sizer: &'p mut BatchSizer,
        input: I,
        (root_seed, first_index): (u64, u64),
        ordered: bool,
        fail_fast: bool,
    ) -> Self {
        stamp(Step::MapStart);
        Run {
            engine: Engine::new(workers, sizer, root_seed),
            input,
            exhausted: false,
            next_index: first_index,
            results: Results::new(ordered, first_index),
            overflow: None,
            fail_fast,
            stopped: false,
            _types: PhantomData,
        }
    }

    /// The next result, waiting for workers as needed.
    pub(crate) fn next_result(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        if self.stopped {
            return None;
        }
        let result = self.next_inner()?;
        if self.fail_fast && result.1.is_err() {
            self.cancel();
            self.stopped = true;
        }
        Some(result)
    }

    fn next_inner(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        loop {
            if let Some(result) = self.results.take() {
                return Some(result);
            }
            self.feed();
            if let Some(result) = self.results.take() {
                return Some(result);
            }
            if !self.engine.in_flight() {
                let idle = self.overflow.is_none() && !self.engine.has_queued();
                if self.exhausted && idle {
                    return None;
                }
                if !self.engine.has_workers() {
                    return self.fail_without_workers();
                }
                continue;
            }
            self.engine.wait(&mut self.results);
        }
    }

    /// Gives the engine batches of new input while a worker would take one.
    #[inline]
    fn feed(&mut self) {
        while self.engine.wants_batch() {
            if let Some(batch) = self.overflow.take() {
                self.engine.submit(batch);
                continue;
            }
            if self.exhausted {
                return;
            }
            match self.build_batch() {
                Some(batch) => self.engine.submit(batch),
                None if self.overflow.is_some() => {}
                None => return,
            }
        }
    }

    /// No worker runs and none could be started: fail what is left, one by one.
    fn fail_without_workers(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        let msg = "no worker is running and none could be started";
        if let Some(batch) = self.overflow.take().or_else(|| self.engine.take_queued()) {
            for i in 0..u64::from(batch.count()) {
                let index = batch.first_index + i;
                self.results.put(index, Err(TaskError::pool(index, msg)));
            }
            return self.results.take();
        }
        let index = self.next_index;
        self.input.next()?;
        self.next_index += 1;
        Some((index, Err(TaskError::pool(index, msg))))
    }

    /// Encodes the next batch of new input; `None` when there is none now.
    fn build_batch(&mut self) -> Option<Batch> {
        let (max_count, max_bytes) = self.engine.batch_limits();
        let mut batch = Batch::new(self.next_index);
        // Whether the next argument is expected to take 128 bytes or more
        // (see `begin_item`): the first is; then each is like the one before.
        let mut large = true;
        while batch.offsets.len() < max_count && batch.items.len() < max_bytes {
            let Some(item) = self.input.next() else {
                self.exhausted = true;
                break;
            };
            let mark = batch.items.len();
            let index = self.next_index;
            self.next_index += 1;
            if let Err(failure) = encode_argument(item, &mut batch.items, &mut large) {
                // This argument cannot be sent: it fails alone, and the batch
                // so far goes out without it.
                self.results
                    .put(index, Err(TaskError::from_failure(index, failure)));
                break;
            }
            if mark > 0 && batch.items.len() > max_bytes.min(MAX_ARGUMENT_BYTES) {
                // It would take the batch past its byte limit (or past what
                // a message carries): it starts the next batch instead.
                let mut alone = Batch::new(index);
                alone.offsets.push(0);
                alone.items = batch.items.split_off(mark);
                self.overflow = Some(alone);
                break;
            }
            batch.offsets.push(mark as u32);
        }
        stamp(Step::BatchBuilt);
        (!batch.offsets.is_empty()).then_some(batch)
    }

    /// Stops all work of this run: busy workers are killed and replaced, and
    /// nothing more is sent.
    fn cancel(&mut self) {
        self.exhausted = true;
        self.overflow = None;
        self.engine.cancel();
    }
}

impl<I, A, R> Drop for Run<'_, I, A, R>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    fn drop(&mut self) {
        // Work still running belongs to this run and nobody wants it: stop
        // it now rather than wait for it (its tasks may be slow).
        self.cancel();
    }
}

/// Decodes `count` outcomes, each a framed item, and hands each to `put`.
/// The result type's `Deserialize` runs under `catch_unwind`: its panic,
/// like a decoding error, fails that task alone.
fn decode_outcomes<R: DeserializeOwned>(
    first_index: u64,
    count: u32,
    mut items: &[u8],
    mut put: impl FnMut(u64, Result<R, TaskError>),
) {
    capturing(|| {
        for i in 0..u64::from(count) {
            let index = first_index + i;
            let result = match split_item(&mut items) {
                Some(item) => decode_outcome(index, item),
                None => Err(TaskError::bad_result(
                    index,
                    format!(
                        "malformed results: task {index} (item {i} of {count}) is not a whole item"
                    ),
                )),
            };
            put(index, result);
        }
    });
}

/// Decodes the outcome of task `index` from its item. Call it while
/// [`capturing`] panics.
#[inline]
pub(crate) fn decode_outcome<R: DeserializeOwned>(index: u64, item: &[u8]) -> Result<R, TaskError> {
    match catch(|| postcard::from_bytes::<Result<R, TaskFailure>>(item)) {
        Ok(Ok(outcome)) => outcome.map_err(|f| TaskError::from_failure(index, f)),
        Ok(Err(e)) => Err(TaskError::bad_result(
            index,
            format!("cannot decode result: {e}"),
        )),
        Err(panic) => Err(TaskError::from_failure(index, panic)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_input_order_whatever_order_they_arrive_in() {
        let mut results = Results::<u64>::new(true, 10);
        // A retried task (11) comes last; 13 arrives before 12.
        for index in [10, 13, 12, 14] {
            results.put(index, Ok(index));
        }
        assert_eq!(results.take().map(|(i, _)| i), Some(10));
        assert!(results.take().is_none(), "11 is not back yet");
        results.put(11, Err(TaskError::pool(11, "failed")));
        let order: Vec<u64> = std::iter::from_fn(|| results.take())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(order, [11, 12, 13, 14]);
    }

    #[test]
    fn unordered_results_come_as_they_arrive() {
        let mut results = Results::<u64>::new(false, 0);
        for index in [3, 1, 2] {
            results.put(index, Ok(index * 10));
        }
        let got: Vec<(u64, u64)> = std::iter::from_fn(|| results.take())
            .map(|(i, r)| (i, r.unwrap()))
            .collect();
        assert_eq!(got, [(3, 30), (1, 10), (2, 20)]);
    }
}
