//! What both runners share at the ends of a pipeline: the input encoded
//! into the first stage's items, and the last stage's items decoded, in
//! order, then the failure that ended them, if any.

use std::collections::VecDeque;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::wire::split_item;
use procpool_worker::worker::task::{capturing, catch};

use super::stage::Chunk;
use crate::error::{PipelineError, StageKind, TaskError};
use crate::progress::{ProgressFn, Tracker};

/// Appends input item `index`, encoded, to `chunk`; a failure to encode it
/// (or a panic in its `Serialize` or `Drop`) is the first stage's, at that
/// item.
pub(super) fn push_input<A: Serialize>(
    arg: A,
    index: u64,
    first_kind: StageKind,
    chunk: &mut Chunk,
) -> Result<(), PipelineError> {
    match crate::engine::encode_argument(arg, &mut chunk.items, &mut true) {
        Ok(()) => {
            chunk.count += 1;
            Ok(())
        }
        Err(failure) => Err(PipelineError::task(
            0,
            first_kind,
            index,
            TaskError::from_failure(index, failure),
        )),
    }
}

/// The last stage's items as they arrive, decoded one by one as they are
/// taken, then the failure that ended them.
pub(super) struct Received<Z> {
    /// Where the last stage is, and what it is.
    last: (usize, StageKind),
    chunks: VecDeque<Chunk>,
    /// Items of the front chunk already taken.
    taken: usize,
    /// Where the front chunk's next item starts.
    offset: usize,
    /// The failure to report after the items, with its rank: a later
    /// stage's failure concerns earlier items, so it comes first.
    failure: Option<(usize, PipelineError)>,
    /// An error has been yielded: nothing more comes.
    ended: bool,
    /// Input items read, and outputs taken, for the progress callback.
    tracker: Tracker,
    _types: PhantomData<fn() -> Z>,
}

impl<Z: DeserializeOwned> Received<Z> {
    pub(super) fn new(last: (usize, StageKind), progress: Option<ProgressFn>) -> Self {
        Received {
            last,
            chunks: VecDeque::new(),
            taken: 0,
            offset: 0,
            failure: None,
            ended: false,
            tracker: Tracker::new(progress),
            _types: PhantomData,
        }
    }

    /// `n` more input items were read.
    pub(super) fn read(&mut self, n: u64) {
        self.tracker.submitted(n);
    }

    /// The output is over: the last progress report goes out.
    pub(super) fn finish(&mut self) {
        self.tracker.finish();
    }

    pub(super) fn push(&mut self, chunk: Chunk) {
        if chunk.count > 0 {
            self.chunks.push_back(chunk);
        }
    }

    /// A failure that ends the output once the items before it are taken:
    /// of the stage at `position`, or of the input (`None`).
    pub(super) fn fail(&mut self, position: Option<usize>, error: PipelineError) {
        let rank = position.map_or(0, |p| p + 1);
        if self.failure.as_ref().is_none_or(|(r, _)| rank > *r) {
            self.failure = Some((rank, error));
        }
    }

    /// Whether the output has ended with an error.
    pub(super) fn ended(&self) -> bool {
        self.ended
    }

    /// The next item, or the failure once the items are all taken; `None`
    /// when nothing has arrived yet (or after the failure).
    pub(super) fn next_item(&mut self) -> Option<Result<Z, PipelineError>> {
        let item = self.take_item()?;
        self.tracker.finished(item.is_ok());
        self.tracker.tick();
        Some(item)
    }

    fn take_item(&mut self) -> Option<Result<Z, PipelineError>> {
        if self.ended {
            return None;
        }
        loop {
            let Some(chunk) = self.chunks.front() else {
                let (_, error) = self.failure.take()?;
                self.ended = true;
                return Some(Err(error));
            };
            if self.taken == chunk.count as usize {
                self.chunks.pop_front();
                (self.taken, self.offset) = (0, 0);
                continue;
            }
            let mut rest = &chunk.items[self.offset..];
            let before = rest.len();
            let origin = chunk.origins.get(self.taken).copied().unwrap_or_default();
            let item = split_item(&mut rest);
            self.offset += before - rest.len();
            self.taken += 1;
            let decoded = match item {
                Some(bytes) => capturing(|| catch(|| postcard::from_bytes::<Z>(bytes)))
                    .map_err(|failure| TaskError::from_failure(origin, failure))
                    .and_then(|r| {
                        r.map_err(|e| {
                            TaskError::bad_result(origin, format!("cannot decode result: {e}"))
                        })
                    }),
                None => Err(TaskError::bad_result(origin, "malformed results")),
            };
            return Some(match decoded {
                Ok(value) => Ok(value),
                Err(error) => {
                    self.ended = true;
                    let (position, kind) = self.last;
                    Err(PipelineError::task(position, kind, origin, error))
                }
            });
        }
    }
}
