//! Tasks with contiguous indices and their encoded arguments, as the parent
//! keeps them until their outcomes arrive (a batch whose worker dies runs
//! again from this copy).

use procpool_worker::wire::frame;
use procpool_worker::wire::{
    BATCH_HEADER, BatchHeader, MAX_ARGUMENT_BYTES, MAX_ITEM_PREFIX, TaskFailure, begin_item,
    encode_into, end_item, to_worker,
};
use procpool_worker::worker::task::{BatchView, capturing, catch};
use serde::Serialize;

/// Tasks with contiguous indices and their encoded arguments.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(super) first_index: u64,
    /// Where each task's argument starts in `items`.
    pub(super) offsets: Vec<u32>,
    pub(super) items: Vec<u8>,
    /// Whether it went to its worker through the bulk arena (so its span
    /// is released when its results arrive).
    pub(super) in_arena: bool,
}

impl Batch {
    /// The index of its first task.
    pub(crate) fn first_index(&self) -> u64 {
        self.first_index
    }

    /// The batch as a runner reads it, its tasks' seeds derived from
    /// `root_seed`.
    pub(crate) fn view(&self, root_seed: u64) -> BatchView<'_> {
        BatchView {
            first_index: self.first_index,
            root_seed,
            count: self.count(),
            items: &self.items,
        }
    }

    /// Adds a task whose argument is `arg` (see [`encode_argument`]).
    pub(crate) fn push_argument<A: Serialize>(
        &mut self,
        arg: A,
        large: &mut bool,
    ) -> Result<(), TaskFailure> {
        let mark = self.items.len();
        encode_argument(arg, &mut self.items, large)?;
        self.offsets.push(mark as u32);
        Ok(())
    }

    /// Adds a task whose argument is already encoded: `parts`, one after
    /// the other, behind `prefix` (a pipeline passes a stage's outputs on
    /// as the next stage's arguments without decoding them).
    /// Fails, leaving the batch as it was, if the argument is larger than
    /// one message carries.
    pub(crate) fn push_encoded<'a>(
        &mut self,
        prefix: &[u8],
        parts: impl Iterator<Item = &'a [u8]> + Clone,
    ) -> Result<(), TaskFailure> {
        let mark = self.items.len();
        let len = prefix.len() + parts.clone().map(<[u8]>::len).sum::<usize>();
        if len + MAX_ITEM_PREFIX > MAX_ARGUMENT_BYTES {
            return Err(TaskFailure::argument_too_large(len));
        }
        let start = begin_item(&mut self.items, len >= 0x80);
        self.items.extend_from_slice(prefix);
        for part in parts {
            self.items.extend_from_slice(part);
        }
        end_item(&mut self.items, start);
        self.offsets.push(mark as u32);
        Ok(())
    }

    /// Bytes of encoded arguments.
    pub(crate) fn encoded_len(&self) -> usize {
        self.items.len()
    }

    /// An empty batch whose first task will have index `first_index`.
    pub(crate) fn new(first_index: u64) -> Batch {
        Batch {
            first_index,
            offsets: Vec::new(),
            items: Vec::new(),
            in_arena: false,
        }
    }

    /// A batch of already framed arguments (as another process sent them):
    /// `None` if `items` is not a sequence of whole items, or holds more
    /// than one batch may.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn from_framed(first_index: u64, items: Vec<u8>) -> Option<Batch> {
        let mut offsets = Vec::new();
        let mut rest = &items[..];
        while !rest.is_empty() {
            offsets.push(u32::try_from(items.len() - rest.len()).ok()?);
            procpool_worker::wire::split_item(&mut rest)?;
        }
        if offsets.len() > procpool_worker::wire::MAX_BATCH_TASKS {
            return None;
        }
        Some(Batch {
            first_index,
            offsets,
            items,
            in_arena: false,
        })
    }

    pub(crate) fn count(&self) -> u32 {
        self.offsets.len() as u32
    }

    /// The encoded argument of the task at `i` in this batch.
    pub(super) fn item(&self, i: usize) -> &[u8] {
        let start = self.offsets[i] as usize;
        let end = self
            .offsets
            .get(i + 1)
            .map_or(self.items.len(), |&o| o as usize);
        &self.items[start..end]
    }

    /// Tasks `range` of this batch as a batch of their own.
    pub(crate) fn slice(&self, range: std::ops::Range<usize>) -> Batch {
        let mut part = Batch {
            first_index: self.first_index + range.start as u64,
            offsets: Vec::new(),
            items: Vec::new(),
            in_arena: false,
        };
        for i in range {
            part.offsets.push(part.items.len() as u32);
            part.items.extend_from_slice(self.item(i));
        }
        part
    }

    /// The fixed part of this batch's BATCH body.
    #[inline]
    pub(super) fn header(&self, root_seed: u64) -> [u8; BATCH_HEADER] {
        BatchHeader {
            first_index: self.first_index,
            root_seed,
            count: self.count(),
        }
        .encode()
    }
}

/// Appends the tag and header of a BATCH frame; returns where it starts.
#[inline]
pub(super) fn begin_batch_frame(
    out: &mut Vec<u8>,
    first_index: u64,
    root_seed: u64,
    count: u32,
) -> usize {
    let start = frame::begin_frame(out, to_worker::BATCH);
    let header = BatchHeader {
        first_index,
        root_seed,
        count,
    };
    out.extend_from_slice(&header.encode());
    start
}

/// Appends `arg` to `out`, encoded as one item of a BATCH body, and drops
/// it; if it cannot be encoded, is larger than one message carries, or its
/// `Serialize` or `Drop` panics, `out` is left as it was and the task's
/// failure is returned. The same check for every `n_jobs`, pool or isolated
/// call.
pub(crate) fn encode_argument<A: Serialize>(
    arg: A,
    out: &mut Vec<u8>,
    large: &mut bool,
) -> Result<(), TaskFailure> {
    let mark = out.len();
    // One `catch_unwind` for both: a panic in either fails the task.
    let encoded = capturing(|| {
        catch(|| {
            let start = begin_item(out, *large);
            let encoded = encode_into(&arg, out);
            *large = end_item(out, start);
            drop(arg);
            encoded
        })
    });
    let failure = match encoded {
        Ok(Ok(())) if out.len() - mark <= MAX_ARGUMENT_BYTES => return Ok(()),
        Ok(Ok(())) => TaskFailure::argument_too_large(out.len() - mark),
        Ok(Err(e)) => TaskFailure::BadArgument(format!("cannot encode argument: {e}")),
        Err(panic) => panic,
    };
    out.truncate(mark);
    Err(failure)
}

/// Appends to `out` a BATCH frame of one task, `index`, with `arg` encoded
/// in place (so a large one is copied no more than needed); on failure `out`
/// is left as it was.
pub(super) fn task_frame<A: Serialize>(
    out: &mut Vec<u8>,
    index: u64,
    root_seed: u64,
    arg: A,
) -> Result<(), TaskFailure> {
    let start = begin_batch_frame(out, index, root_seed, 1);
    if let Err(failure) = encode_argument(arg, out, &mut true) {
        out.truncate(start);
        return Err(failure);
    }
    frame::end_frame(out, start);
    Ok(())
}

/// An input iterator read lazily into batches of encoded arguments.
pub(crate) struct Feed<I> {
    input: I,
    next_index: u64,
    exhausted: bool,
    /// An argument too large to share the batch before it: it goes out
    /// alone, next.
    overflow: Option<Batch>,
    /// An argument that could not be encoded: its task fails alone.
    failed: Option<(u64, TaskFailure)>,
}

impl<I, A> Feed<I>
where
    I: Iterator<Item = A>,
    A: Serialize,
{
    /// A feed whose first task has index `first_index`.
    pub(crate) fn new(input: I, first_index: u64) -> Self {
        Feed {
            input,
            next_index: first_index,
            exhausted: false,
            overflow: None,
            failed: None,
        }
    }

    /// Whether every argument has gone into a batch (or failed).
    pub(crate) fn is_done(&self) -> bool {
        self.exhausted && self.overflow.is_none()
    }

    /// The next batch, of at most `max_count` tasks and about `max_bytes`
    /// of arguments; `None` when the input is done, or when the next
    /// argument failed to encode (then [`take_failed`](Self::take_failed)
    /// has it).
    pub(crate) fn next_batch(&mut self, (max_count, max_bytes): (usize, usize)) -> Option<Batch> {
        if let Some(batch) = self.overflow.take() {
            return Some(batch);
        }
        if self.exhausted {
            return None;
        }
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
                self.failed = Some((index, failure));
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
        (!batch.offsets.is_empty()).then_some(batch)
    }

    /// The task whose argument failed to encode, if one did since the last
    /// call.
    pub(crate) fn take_failed(&mut self) -> Option<(u64, TaskFailure)> {
        self.failed.take()
    }

    /// Gives up what is left: the overflow batch, if any, else the index of
    /// the next argument (read and dropped); `None` when nothing is left.
    pub(crate) fn give_up_next(&mut self) -> Option<Result<Batch, u64>> {
        if let Some(batch) = self.overflow.take() {
            return Some(Ok(batch));
        }
        self.input.next()?;
        self.next_index += 1;
        Some(Err(self.next_index - 1))
    }

    /// Reads nothing more.
    pub(crate) fn stop(&mut self) {
        self.exhausted = true;
        self.overflow = None;
    }
}
