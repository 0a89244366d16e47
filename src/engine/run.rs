//! The typed layer of a `map`: reads the input iterator lazily, encodes
//! arguments into batches for the [`Engine`], decodes outcomes, and gives
//! results back in input order or as they complete.

use std::collections::VecDeque;
use std::marker::PhantomData;

use procpool_worker::stamps::{Step, stamp};
use procpool_worker::wire::{TaskFailure, split_item};
use procpool_worker::worker::task::{capturing, catch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::batch::Feed;
use super::dispatch::{Engine, Sink};
use super::workers::Workers;
use crate::batching::BatchSizer;
use crate::error::TaskError;
use crate::progress::Tracker;

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

/// Where a run's outcomes arrive: its results, and its progress.
struct Arrivals<'a, R> {
    results: &'a mut Results<R>,
    tracker: &'a mut Tracker,
}

impl<R: DeserializeOwned> Sink for Arrivals<'_, R> {
    fn outcomes(&mut self, first_index: u64, count: u32, items: &[u8]) {
        // Two loops, so that a run without progress reports pays nothing
        // per result for them.
        if self.tracker.is_active() {
            let tracker = &mut *self.tracker;
            decode_outcomes(first_index, count, items, |index, result| {
                tracker.finished(result.is_ok());
                self.results.put(index, result)
            });
            tracker.tick();
        } else {
            decode_outcomes(first_index, count, items, |index, result| {
                self.results.put(index, result)
            });
        }
    }

    fn failed(&mut self, index: u64, error: TaskError) {
        self.tracker.finished(false);
        self.tracker.tick();
        self.results.put(index, Err(error));
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
    feed: Feed<I>,
    results: Results<R>,
    tracker: Tracker,
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
        (ordered, fail_fast): (bool, bool),
        tracker: Tracker,
    ) -> Self {
        stamp(Step::MapStart);
        Run {
            engine: Engine::new(workers, sizer, root_seed),
            feed: Feed::new(input, first_index),
            results: Results::new(ordered, first_index),
            tracker,
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
            self.tracker.finish();
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
                if self.feed.is_done() && !self.engine.has_queued() {
                    self.tracker.finish();
                    return None;
                }
                if !self.engine.has_workers() {
                    return self.fail_without_workers();
                }
                continue;
            }
            self.engine.wait(&mut Arrivals {
                results: &mut self.results,
                tracker: &mut self.tracker,
            });
        }
    }

    /// Gives the engine batches of new input while a worker would take one.
    #[inline]
    fn feed(&mut self) {
        while self.engine.wants_batch() {
            let batch = self.feed.next_batch(self.engine.batch_limits());
            stamp(Step::BatchBuilt);
            if let Some((index, failure)) = self.feed.take_failed() {
                self.results
                    .put(index, Err(TaskError::from_failure(index, failure)));
            }
            match batch {
                Some(batch) => {
                    self.tracker.submitted(u64::from(batch.count()));
                    self.engine.submit(batch)
                }
                None => return,
            }
        }
    }

    /// No worker runs and none could be started: fail what is left, one by one.
    fn fail_without_workers(&mut self) -> Option<(u64, Result<R, TaskError>)> {
        let msg = "no worker is running and none could be started";
        let unsent = match self.engine.take_queued() {
            Some(batch) => Ok(batch),
            None => self.feed.give_up_next()?,
        };
        match unsent {
            Ok(batch) => {
                for i in 0..u64::from(batch.count()) {
                    let index = batch.first_index + i;
                    self.results.put(index, Err(TaskError::pool(index, msg)));
                }
                self.results.take()
            }
            Err(index) => Some((index, Err(TaskError::pool(index, msg)))),
        }
    }

    /// Stops all work of this run: busy workers are killed and replaced, and
    /// nothing more is sent.
    fn cancel(&mut self) {
        self.feed.stop();
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
