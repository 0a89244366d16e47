//! Tasks with contiguous indices and their encoded arguments, as the parent
//! keeps them until their outcomes arrive (a batch whose worker dies runs
//! again from this copy).

use procpool_worker::wire::frame;
use procpool_worker::wire::{
    BATCH_HEADER, BatchHeader, MAX_ARGUMENT_BYTES, TaskFailure, begin_item, encode_into, end_item,
    to_worker,
};
use procpool_worker::worker::task::{capturing, catch};
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
    /// An empty batch whose first task will have index `first_index`.
    pub(super) fn new(first_index: u64) -> Batch {
        Batch {
            first_index,
            offsets: Vec::new(),
            items: Vec::new(),
            in_arena: false,
        }
    }

    pub(super) fn count(&self) -> u32 {
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
    pub(super) fn slice(&self, range: std::ops::Range<usize>) -> Batch {
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
