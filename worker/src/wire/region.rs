//! The region a pool worker shares with its parent: its status page, then
//! its bulk arena.
//!
//! The status page is where the worker records the task it is running and
//! since when. The parent reads it when the worker dies (to fail only that
//! task and re-run the rest of its batch) and while it waits (to enforce
//! per-task timeouts). Two plain atomic stores per task cost nothing next
//! to any message.
//!
//! The bulk arena is memory through which large batches and large results
//! travel instead of the worker's pipe. The frame on the pipe then only says
//! where the bytes are.
//!
//! A pipe moves about 0.9 GB/s on the machines we measure (the kernel
//! allocates, fills and frees a page per 4 KiB, under a lock both ends
//! take); a copy through shared memory moves over 10 GB/s. Small frames stay
//! on the pipe: for them the pipe is as fast, and a lone task touches less
//! memory.
//!
//! The arena extends the worker's status page: one memfd holds the status
//! page, then the parent's half (written by the parent, read by the worker),
//! then the worker's half (the other way). Each half is a [`Ring`] of spans
//! released oldest first, so a span is free again once its reader is done:
//! - a batch's span, when the parent receives that batch's results (the
//!   worker has read every argument by then);
//! - a results span, when the parent has decoded it and counted it in the
//!   status page's `results_released`.
//!
//! A frame that finds no room in its half goes through the pipe as before,
//! so nothing ever waits for arena space.

use std::collections::VecDeque;

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes in a status page.
pub const STATUS_PAGE_BYTES: usize = 4096;

/// The words of a status page.
#[repr(C)]
#[derive(Debug)]
pub struct StatusWords {
    /// Index + 1 of the task running now; 0 between tasks.
    pub current: AtomicU64,
    /// `CLOCK_MONOTONIC` nanoseconds when that task started.
    pub started_ns: AtomicU64,
    /// Results spans of the arena the parent has decoded, and so released.
    pub results_released: AtomicU64,
}

impl StatusWords {
    /// The task running now, if any.
    pub fn current_task(&self) -> Option<u64> {
        self.current.load(Ordering::Acquire).checked_sub(1)
    }
}

/// Smallest frame body that travels through the arena.
pub const ARENA_MIN_BYTES: usize = 16 * 1024;

/// Largest half: each direction keeps at most this much memory in use,
/// as much as the buffers a pipe-only link would keep.
pub const ARENA_HALF_MAX: usize = 64 << 20;

/// Smallest half worth having; a smaller one is none.
const ARENA_HALF_MIN: usize = 1 << 20;

/// Bytes of each half for a worker with address-space limit `memory_limit`:
/// [`ARENA_HALF_MAX`], or a 32nd of the limit, so that the mapping (which
/// counts against the limit) leaves the user's code almost all of it. Zero
/// means no arena.
pub fn half_bytes(memory_limit: Option<u64>) -> usize {
    let half = match memory_limit {
        None => ARENA_HALF_MAX as u64,
        Some(limit) => (limit / 32).min(ARENA_HALF_MAX as u64),
    };
    let half = (half as usize) & !(STATUS_PAGE_BYTES - 1);
    if half < ARENA_HALF_MIN { 0 } else { half }
}

/// The byte length of a status page followed by two halves of `half`.
pub fn region_bytes(half: usize) -> usize {
    STATUS_PAGE_BYTES + 2 * half
}

/// The half size of a region of `len` bytes (see [`region_bytes`]).
pub fn half_of_region(len: usize) -> usize {
    len.saturating_sub(STATUS_PAGE_BYTES) / 2
}

/// Where the parent's half starts in the region.
pub const fn to_worker_offset() -> usize {
    STATUS_PAGE_BYTES
}

/// Where the worker's half starts in the region.
pub const fn from_worker_offset(half: usize) -> usize {
    STATUS_PAGE_BYTES + half
}

/// Encodes the body of an arena frame: where its bytes are in the half.
pub fn span_frame_body(offset: usize, len: usize) -> [u8; 16] {
    let mut body = [0u8; 16];
    body[..8].copy_from_slice(&(offset as u64).to_le_bytes());
    body[8..].copy_from_slice(&(len as u64).to_le_bytes());
    body
}

/// Decodes the body of an arena frame, if it names a span inside a half of
/// `half` bytes.
pub fn parse_span_frame_body(body: &[u8], half: usize) -> Option<(usize, usize)> {
    let body: &[u8; 16] = body.try_into().ok()?;
    let mut word = [0u8; 8];
    word.copy_from_slice(&body[..8]);
    let offset = usize::try_from(u64::from_le_bytes(word)).ok()?;
    word.copy_from_slice(&body[8..]);
    let len = usize::try_from(u64::from_le_bytes(word)).ok()?;
    (len > 0 && offset.checked_add(len)? <= half).then_some((offset, len))
}

/// The spans in use in one half, oldest first. New spans go at the lowest
/// free address that fits, so a steady flow of batches reuses the same
/// few megabytes instead of touching (and keeping) the whole half.
#[derive(Debug)]
pub struct Ring {
    capacity: usize,
    spans: VecDeque<(usize, usize)>,
}

impl Ring {
    /// An empty ring over `capacity` bytes (0: nothing ever fits).
    pub fn new(capacity: usize) -> Ring {
        Ring {
            capacity,
            spans: VecDeque::new(),
        }
    }

    /// Takes `len` bytes and returns their offset, or `None` if no free
    /// stretch is that long.
    pub fn alloc(&mut self, len: usize) -> Option<usize> {
        if len == 0 || len > self.capacity {
            return None;
        }
        let start = match (self.spans.front(), self.spans.back()) {
            (Some(&(oldest, _)), Some(&(newest, newest_end))) => {
                if newest >= oldest {
                    // In use: [oldest, newest_end). Free: both ends.
                    if len <= oldest {
                        0
                    } else if len <= self.capacity - newest_end {
                        newest_end
                    } else {
                        return None;
                    }
                } else {
                    // Wrapped: free only between the newest and the oldest.
                    if len <= oldest - newest_end {
                        newest_end
                    } else {
                        return None;
                    }
                }
            }
            _ => 0,
        };
        self.spans.push_back((start, start + len));
        Some(start)
    }

    /// Frees the oldest span.
    pub fn release_oldest(&mut self) {
        self.spans.pop_front();
    }

    /// Takes back the span `alloc` handed out last (it was not used).
    pub fn cancel_newest(&mut self) {
        self.spans.pop_back();
    }

    /// Spans in use.
    pub fn in_use(&self) -> usize {
        self.spans.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_pairs_reuse_the_bottom_of_the_ring() {
        let mut ring = Ring::new(10 << 20);
        let mib = 1 << 20;
        assert_eq!(ring.alloc(mib), Some(0));
        assert_eq!(ring.alloc(mib), Some(mib));
        for _ in 0..100 {
            ring.release_oldest();
            let at = ring.alloc(mib).expect("room");
            assert!(at + mib <= 2 * mib, "span at {at} leaves the first 2 MiB");
        }
    }

    #[test]
    fn spans_never_overlap() {
        // Random sizes, released oldest first: every live span is disjoint.
        let mut ring = Ring::new(1000);
        let mut live: VecDeque<(usize, usize)> = VecDeque::new();
        let mut state = 12345u64;
        for _ in 0..20_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 1 + (state >> 33) as usize % 400;
            if (state >> 20).is_multiple_of(3) && !live.is_empty() {
                ring.release_oldest();
                live.pop_front();
                continue;
            }
            if let Some(at) = ring.alloc(len) {
                assert!(at + len <= 1000);
                for &(s, e) in &live {
                    assert!(
                        at + len <= s || at >= e,
                        "[{at}, {}) overlaps [{s}, {e})",
                        at + len
                    );
                }
                live.push_back((at, at + len));
            }
            assert_eq!(ring.in_use(), live.len());
        }
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let mut ring = Ring::new(100);
        assert_eq!(ring.alloc(0), None);
        assert_eq!(ring.alloc(101), None);
        assert_eq!(ring.alloc(60), Some(0));
        assert_eq!(ring.alloc(50), None);
        assert_eq!(ring.alloc(40), Some(60));
        ring.release_oldest();
        assert_eq!(ring.alloc(61), None);
        assert_eq!(ring.alloc(60), Some(0));
        ring.release_oldest();
        ring.release_oldest();
        assert_eq!(ring.alloc(100), Some(0));
    }

    #[test]
    fn span_frames_are_checked_against_the_half() {
        let body = span_frame_body(10, 20);
        assert_eq!(parse_span_frame_body(&body, 30), Some((10, 20)));
        assert_eq!(parse_span_frame_body(&body, 29), None);
        assert_eq!(parse_span_frame_body(&span_frame_body(0, 0), 30), None);
        assert_eq!(parse_span_frame_body(&body[..15], 30), None);
        let mut huge = span_frame_body(usize::MAX, 2);
        assert_eq!(parse_span_frame_body(&huge, usize::MAX), None);
        huge[8] = 1;
        assert_eq!(parse_span_frame_body(&huge, 30), None);
    }

    #[test]
    fn halves_follow_the_memory_limit() {
        assert_eq!(half_bytes(None), ARENA_HALF_MAX);
        assert_eq!(half_bytes(Some(1 << 30)), 32 << 20);
        assert_eq!(half_bytes(Some(16 << 20)), 0);
        assert_eq!(half_of_region(region_bytes(5 << 20)), 5 << 20);
    }
}
