//! Automatic batch sizing: trivial tasks travel thousands to a message,
//! slow tasks one at a time, with no tuning.
//!
//! Each batch's compute time comes back with its results. The size starts at
//! one task (so a lone task goes out at once) and grows, up to eight-fold a
//! step, while batches take less than the target time, and halves when they
//! take more than twice as long. The target, a few milliseconds, makes the
//! tens of microseconds each message costs negligible while keeping the
//! in-flight work, and so the memory and the delay before the first result,
//! small. A byte limit keeps large arguments from building huge messages.

/// Compute time a batch should take.
const TARGET_NS: u64 = 2_000_000;
/// Most tasks in one automatic batch.
const MAX_AUTO_COUNT: u32 = 65_536;
/// Most argument bytes in one batch (a batch always holds at least one task).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Chooses how many tasks go in the next batch.
#[derive(Debug, Clone)]
pub(crate) struct BatchSizer {
    fixed: Option<u32>,
    current: u32,
}

impl BatchSizer {
    /// An adaptive sizer, or a fixed one when `chunk_size` is given.
    pub(crate) fn new(chunk_size: Option<usize>) -> BatchSizer {
        let fixed = chunk_size.map(|c| c.clamp(1, u32::MAX as usize) as u32);
        BatchSizer {
            fixed,
            current: fixed.unwrap_or(1),
        }
    }

    /// Tasks in the next batch.
    pub(crate) fn count(&self) -> u32 {
        self.current
    }

    /// Most argument bytes in one batch: an argument that would take a
    /// batch past this starts the next one (alone, it may be larger).
    pub(crate) fn max_bytes(&self) -> usize {
        if self.fixed.is_some() {
            usize::MAX
        } else {
            MAX_BATCH_BYTES
        }
    }

    /// Learns from a batch of `count` tasks that took `elapsed_ns`.
    pub(crate) fn observe(&mut self, count: u32, elapsed_ns: u64) {
        if self.fixed.is_some() || count < self.current {
            // A short batch (end of input) says little about the size.
            return;
        }
        if elapsed_ns < TARGET_NS / 8 {
            self.current = self.current.saturating_mul(8).min(MAX_AUTO_COUNT);
        } else if elapsed_ns < TARGET_NS / 2 {
            self.current = self.current.saturating_mul(2).min(MAX_AUTO_COUNT);
        } else if elapsed_ns > TARGET_NS * 2 {
            self.current = (self.current / 2).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_for_fast_tasks_and_shrinks_for_slow_ones() {
        let mut s = BatchSizer::new(None);
        assert_eq!(s.count(), 1);
        for _ in 0..10 {
            let c = s.count();
            s.observe(c, 1_000);
        }
        assert_eq!(s.count(), MAX_AUTO_COUNT);
        for _ in 0..40 {
            let c = s.count();
            s.observe(c, 50_000_000);
        }
        assert_eq!(s.count(), 1);
    }

    #[test]
    fn fixed_size_never_changes() {
        let mut s = BatchSizer::new(Some(100));
        s.observe(100, 1);
        assert_eq!(s.count(), 100);
        assert_eq!(s.max_bytes(), usize::MAX);
    }

    #[test]
    fn short_batches_do_not_grow_the_size() {
        let mut s = BatchSizer::new(None);
        s.observe(1, 10);
        assert_eq!(s.count(), 8);
        s.observe(3, 10);
        assert_eq!(s.count(), 8);
    }
}
