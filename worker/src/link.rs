//! The worker's end of its link to the parent, shared by the task loop and
//! the log forwarder (user code may log from several threads).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::sys;

static LINK: OnceLock<Mutex<RawFd>> = OnceLock::new();
/// Whether the link's pipe was made large (for a frame that would not fit).
static GROWN: AtomicBool = AtomicBool::new(false);

/// Makes `fd` (the write end of the link) where every later frame goes.
pub fn set(fd: RawFd) {
    let _ = LINK.set(Mutex::new(fd));
}

/// Sends one frame, whole, before any other thread's.
pub fn send_frame(tag: u8, body: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(body.len() + 5);
    sys::push_frame(&mut buf, tag, body);
    send_raw(&buf)
}

/// Sends bytes that already hold whole frames.
pub fn send_raw(bytes: &[u8]) -> io::Result<()> {
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
    sys::write_all(*fd, bytes)
}
