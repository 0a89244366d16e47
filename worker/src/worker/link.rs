//! The worker's end of its link to the parent, shared by the task loop and
//! the log forwarder (user code may log from several threads).
//!
//! The link belongs to the worker process alone. A copy of it made by a
//! plain `fork` in a task (no `exec`, so close-on-exec does not apply) drops
//! both ends at once: holding them, a copy that outlived a crash of the
//! worker would hide the crash from the parent, which watches for the
//! link's end of file, and a copy returning from the task would go on
//! reading batches meant for the worker.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, Once, OnceLock};

use crate::sys;
use crate::wire::frame;

static LINK: OnceLock<Mutex<RawFd>> = OnceLock::new();
/// Whether the link's pipe was made large (for a frame that would not fit).
static GROWN: AtomicBool = AtomicBool::new(false);
/// The link's ends, for the fork handler to close (-1: none).
static LINK_READ: AtomicI32 = AtomicI32::new(-1);
static LINK_WRITE: AtomicI32 = AtomicI32::new(-1);
/// Set in a copy of the worker made by `fork`: it has no link.
static FORK_COPY: AtomicBool = AtomicBool::new(false);

/// Makes `read` and `write` (the link's ends, which live as long as the
/// process) the worker's link: every later frame goes to `write`, and a
/// copy of the process made by `fork` closes both before `fork` returns in
/// it.
pub fn set(read: RawFd, write: RawFd) {
    let _ = LINK.set(Mutex::new(write));
    LINK_READ.store(read, Ordering::Relaxed);
    LINK_WRITE.store(write, Ordering::Relaxed);
    register_fork_handler();
}

/// Registers the handler that drops the link in a copy made by `fork` (see
/// [`set`], which calls it too). A spare calls it while it waits: the
/// registration allocates, which a new worker's first allocation would
/// otherwise pay for in page faults.
pub fn register_fork_handler() {
    static HANDLER: Once = Once::new();
    HANDLER.call_once(|| {
        // SAFETY: registers a handler that runs in the child of each later
        // fork of this process and makes only async-signal-safe calls
        // (atomic loads and stores, close).
        unsafe { libc::pthread_atfork(None, None, Some(drop_link_in_fork_copy)) };
    });
}

/// Runs in the child of a `fork()` of the worker. (`Command` starts its
/// programs with `posix_spawn`, which skips it, or with `fork` then `exec`,
/// where closing the ends early changes nothing: they are close-on-exec.)
extern "C" fn drop_link_in_fork_copy() {
    FORK_COPY.store(true, Ordering::Relaxed);
    for end in [&LINK_READ, &LINK_WRITE] {
        let fd = end.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: `fd` is one of the link's ends, which the worker never
            // closes, so in this copy it still names the copied pipe end.
            unsafe { libc::close(fd) };
        }
    }
}

/// Whether this process is a copy of a worker made by `fork` in user code
/// (it has no link to the parent).
#[inline]
pub fn is_fork_copy() -> bool {
    FORK_COPY.load(Ordering::Relaxed)
}

/// Sends one frame, whole, before any other thread's.
pub fn send_frame(tag: u8, body: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(body.len() + 5);
    frame::push_frame(&mut buf, tag, body);
    send_raw(&buf)
}

/// Sends bytes that already hold whole frames.
pub fn send_raw(bytes: &[u8]) -> io::Result<()> {
    // Checked before the lock, which another thread may have held when a
    // copy was forked.
    if is_fork_copy() {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "a forked copy of a worker has no link to the parent",
        ));
    }
    let Some(link) = LINK.get() else {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "no link to the parent",
        ));
    };
    let fd = match link.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    // An isolated call's pipe has the default size, which suits small
    // results; a large one would cost a wakeup of both sides per pipeful.
    if bytes.len() > sys::DEFAULT_PIPE_BYTES && !GROWN.swap(true, Ordering::Relaxed) {
        sys::grow_pipe(*fd);
    }
    frame::send_all(*fd, bytes)
}
