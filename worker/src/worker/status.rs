//! This worker's status page (see [`crate::wire::region`]): where it
//! records the task it is running and since when.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use crate::sys::monotonic_ns;
use crate::wire::region::{STATUS_PAGE_BYTES, StatusWords};

static PAGE: OnceLock<&'static StatusWords> = OnceLock::new();

/// Address and half size of the arena after the page, if the region has one.
static ARENA: OnceLock<(usize, usize)> = OnceLock::new();

/// Whether start times are recorded: only a parent that enforces timeouts
/// reads them, and a clock read costs more than a trivial task.
static RECORD_TIMES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Maps the region the parent created and makes its first page this
/// process's status page; `record_times` when the parent enforces task
/// timeouts.
pub fn install(fd: OwnedFd, record_times: bool) -> Result<(), String> {
    RECORD_TIMES.store(record_times, Ordering::Relaxed);
    let file = std::fs::File::from(fd);
    let len = match file.metadata() {
        Ok(meta) => usize::try_from(meta.len()).unwrap_or(0),
        Err(e) => return Err(format!("cannot stat the status page: {e}")),
    };
    if len < STATUS_PAGE_BYTES {
        return Err(format!("the status page is {len} bytes, too short"));
    }
    // SAFETY: the parent's memfd, shared with it alone; the page is read
    // and written through atomics, the arena as `wire::region` says.
    let ptr = unsafe { crate::sys::map_shared(file.as_raw_fd(), len, true) }
        .map_err(|e| format!("cannot map the status page: {e}"))?;
    // SAFETY: the mapping is page-aligned, at least `size_of::<StatusWords>()`
    // bytes, zero-filled (valid atomics), and lives forever.
    let words = unsafe { &*(ptr as *const StatusWords) };
    let _ = PAGE.set(words);
    let half = crate::wire::region::half_of_region(len);
    if half > 0 {
        let _ = ARENA.set((ptr as usize, half));
    }
    Ok(())
}

/// The status words, if this worker has a status page.
#[inline]
pub fn words() -> Option<&'static StatusWords> {
    PAGE.get().copied()
}

/// The start of the shared region and the arena's half size, if this worker
/// has an arena.
pub fn arena() -> Option<(*mut u8, usize)> {
    ARENA.get().map(|&(base, half)| (base as *mut u8, half))
}

/// Records that task `index` starts now.
#[inline]
pub fn task_started(index: u64) {
    if let Some(page) = PAGE.get() {
        if RECORD_TIMES.load(Ordering::Relaxed) {
            page.started_ns.store(monotonic_ns(), Ordering::Relaxed);
        }
        page.current.store(index + 1, Ordering::Release);
    }
}

/// Records that no task runs (the batch is done).
#[inline]
pub fn idle() {
    if let Some(page) = PAGE.get() {
        page.current.store(0, Ordering::Release);
    }
}
