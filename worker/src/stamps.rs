//! Timestamps at the steps of a batch's trip through the parent and a
//! worker, for finding where a task's round trip spends its time. They are
//! recorded only with the `stamps` feature; without it [`stamp`] compiles to
//! nothing and [`take`] returns nothing.
//!
//! Each process keeps its last [`CAPACITY`] stamps in a ring in memory. A
//! stamp is one read of the monotonic clock and of the current CPU (both
//! served without a system call) and two stores: tens of nanoseconds, so
//! the stamps change little of what they measure. A worker writes its ring to
//! `$PROCPOOL_STAMPS_DIR/<pid>.stamps` when it leaves, if that variable is
//! set; the parent takes its own with [`take`]. `benches/trip_stamps.rs`
//! puts the two together into a lone task's round trip, step by step.
//!
//! ```
//! use procpool_worker::stamps::{self, Step};
//!
//! stamps::stamp(Step::CallerStart);
//! let taken = stamps::take();
//! // Only a build with the `stamps` feature records anything.
//! assert_eq!(taken.len(), usize::from(stamps::ENABLED));
//! ```

use std::io;
use std::path::Path;

/// How many stamps a process keeps: the newest ones.
pub const CAPACITY: usize = 1 << 16;

/// The variable naming the directory workers write their stamps to.
pub const DIR_ENV: &str = "PROCPOOL_STAMPS_DIR";

/// Whether this build records stamps (the `stamps` feature).
pub const ENABLED: bool = cfg!(feature = "stamps");

/// A step of a trip. The parent stamps the caller's and the `map`'s steps,
/// the worker the task's; both stamp their reads and writes on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Step {
    /// The caller is about to ask for a result (stamped by the caller).
    CallerStart = 1,
    /// The parent starts a `map`.
    MapStart = 2,
    /// The parent has encoded a batch of arguments.
    BatchBuilt = 3,
    /// The process is about to write to its link.
    Write = 4,
    /// A read on the process's link returned.
    ReadDone = 5,
    /// The worker is about to call the user's function.
    CallStart = 6,
    /// The user's function returned.
    CallDone = 7,
    /// The parent has decoded a batch's results.
    ResultsDecoded = 8,
    /// The caller has its result (stamped by the caller).
    CallerDone = 9,
    /// The process is about to read from its link.
    Read = 10,
    /// A write on the process's link returned.
    WriteDone = 11,
}

impl Step {
    const ALL: [Step; 11] = [
        Step::CallerStart,
        Step::MapStart,
        Step::BatchBuilt,
        Step::Write,
        Step::ReadDone,
        Step::CallStart,
        Step::CallDone,
        Step::ResultsDecoded,
        Step::CallerDone,
        Step::Read,
        Step::WriteDone,
    ];

    fn from_code(code: u8) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u8 == code)
    }
}

/// One recorded step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Which step.
    pub step: Step,
    /// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process.
    pub ns: u64,
    /// The CPU the process ran on.
    pub cpu: u32,
}

/// Records `step` (nothing without the `stamps` feature).
#[inline(always)]
pub fn stamp(step: Step) {
    #[cfg(feature = "stamps")]
    ring::record(step);
    #[cfg(not(feature = "stamps"))]
    let _ = step;
}

/// Takes the stamps this process recorded so far, oldest first, and empties
/// its ring.
pub fn take() -> Vec<Stamp> {
    #[cfg(feature = "stamps")]
    return ring::take();
    #[cfg(not(feature = "stamps"))]
    Vec::new()
}

/// In a worker that leaves: writes its stamps where [`DIR_ENV`] says, if
/// it is set and this build records stamps.
pub fn write_on_exit() {
    if !ENABLED {
        return;
    }
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        let path = Path::new(&dir).join(format!("{}.stamps", std::process::id()));
        // Diagnostics only: a worker that cannot write them still leaves.
        let _ = std::fs::write(path, encode(&take()));
    }
}

/// The text a worker writes: one `step ns cpu` line per stamp.
fn encode(stamps: &[Stamp]) -> String {
    stamps
        .iter()
        .map(|s| format!("{} {} {}\n", s.step as u8, s.ns, s.cpu))
        .collect()
}

/// Reads the stamps a worker wrote with [`write_on_exit`].
pub fn read_file(path: &Path) -> io::Result<Vec<Stamp>> {
    let bad = |line: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad stamp line {line:?} in {}", path.display()),
        )
    };
    std::fs::read_to_string(path)?
        .lines()
        .map(|line| {
            let mut fields = line.split(' ').map(str::parse::<u64>);
            match (fields.next(), fields.next(), fields.next(), fields.next()) {
                (Some(Ok(code)), Some(Ok(ns)), Some(Ok(cpu)), None) => Ok(Stamp {
                    step: u8::try_from(code)
                        .ok()
                        .and_then(Step::from_code)
                        .ok_or_else(|| bad(line))?,
                    ns,
                    cpu: u32::try_from(cpu).map_err(|_| bad(line))?,
                }),
                _ => Err(bad(line)),
            }
        })
        .collect()
}

#[cfg(feature = "stamps")]
mod ring {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use super::{CAPACITY, Stamp, Step};

    /// Stamps recorded so far (also counting those overwritten).
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    /// Per slot: the clock, then the CPU shifted left by 8 or'ed with the step.
    static SLOTS: [[AtomicU64; 2]; CAPACITY] =
        [const { [AtomicU64::new(0), AtomicU64::new(0)] }; CAPACITY];

    #[inline(always)]
    pub(super) fn record(step: Step) {
        let ns = crate::sys::monotonic_ns();
        // SAFETY: sched_getcpu takes no arguments.
        let cpu = unsafe { libc::sched_getcpu() };
        let slot = &SLOTS[NEXT.fetch_add(1, Ordering::Relaxed) % CAPACITY];
        slot[0].store(ns, Ordering::Relaxed);
        slot[1].store(
            (u64::from(cpu.max(0) as u32) << 8) | step as u64,
            Ordering::Relaxed,
        );
    }

    pub(super) fn take() -> Vec<Stamp> {
        let end = NEXT.swap(0, Ordering::Relaxed);
        (end.saturating_sub(CAPACITY)..end)
            .filter_map(|i| {
                let slot = &SLOTS[i % CAPACITY];
                let word = slot[1].load(Ordering::Relaxed);
                Some(Stamp {
                    step: Step::from_code(word as u8)?,
                    ns: slot[0].load(Ordering::Relaxed),
                    cpu: (word >> 8) as u32,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_and_a_bad_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("procpool-stamps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stamps = vec![
            Stamp {
                step: Step::ReadDone,
                ns: 12,
                cpu: 1,
            },
            Stamp {
                step: Step::Write,
                ns: 40,
                cpu: 0,
            },
        ];
        let path = dir.join("good.stamps");
        std::fs::write(&path, encode(&stamps)).unwrap();
        assert_eq!(read_file(&path).unwrap(), stamps);
        let bad = dir.join("bad.stamps");
        std::fs::write(&bad, "5 12 1\n77 13 0\n").unwrap();
        let err = read_file(&bad).unwrap_err();
        assert!(err.to_string().contains("\"77 13 0\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stamps_are_taken_in_order_when_recorded() {
        stamp(Step::MapStart);
        stamp(Step::CallerDone);
        let taken: Vec<Step> = take().into_iter().map(|s| s.step).collect();
        if ENABLED {
            let first = taken.iter().position(|s| *s == Step::MapStart);
            let then = first.and_then(|i| taken[i..].iter().position(|s| *s == Step::CallerDone));
            assert!(then.is_some(), "{taken:?}");
        } else {
            assert!(taken.is_empty());
        }
    }
}
