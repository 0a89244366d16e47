//! `StartMethod::Fork`: fork the worker straight from this process.

use super::NewWorker;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use super::Reaper;
use crate::error::PoolError;

/// The number of threads in this process, from `/proc/self/status`.
pub(crate) fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Workers let go before they exited. A thread waiting for them would make
/// this process multi-threaded and refuse the next fork, so they are reaped
/// without waiting, at each fork and whenever another is let go.
static UNREAPED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Reaps `pid` once it has exited, without waiting for it now.
pub(super) fn reap_later(pid: u32) {
    let mut unreaped = UNREAPED.lock().unwrap_or_else(|e| e.into_inner());
    unreaped.push(pid);
    reap_exited(&mut unreaped);
}

fn reap_exited(unreaped: &mut Vec<u32>) {
    unreaped.retain(|&pid| {
        let mut status = 0;
        // SAFETY: a non-blocking wait for a child of ours nobody else reaps.
        let ret = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        ret == 0
    });
}

pub(super) fn fork(new_worker: NewWorker<'_>) -> Result<(u32, Reaper), PoolError> {
    // A forked worker writes to this process's stderr itself: no label.
    let NewWorker {
        link,
        status,
        model,
        ..
    } = new_worker;
    reap_exited(&mut UNREAPED.lock().unwrap_or_else(|e| e.into_inner()));
    match thread_count() {
        Some(1) => {}
        Some(n) => {
            return Err(PoolError::refused(format!(
                "StartMethod::Fork refused: this process has {n} threads, and forking a \
                 multi-threaded process is unsound (use the fork server)"
            )));
        }
        None => {
            return Err(PoolError::refused(
                "StartMethod::Fork refused: cannot count this process's threads",
            ));
        }
    }
    let dup = |fd: &BorrowedFd<'_>| {
        procpool_worker::sys::dup_owned(fd)
            .map_err(|e| PoolError::io("duplicate a descriptor for a worker", e))
    };
    let fds = procpool_worker::sys::WorkerFds {
        link,
        status: status.as_ref().map(dup).transpose()?,
        model: model.as_ref().map(dup).transpose()?,
    };
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the process has one thread (checked above, and the caller of
    // the unsafe `StartMethod::fork` promised none starts meanwhile), so the
    // child may run any code. It never returns into our frames.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(PoolError::io(
            "fork a worker",
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        // Stderr is inherited as is: a reader thread would make this process
        // multi-threaded and refuse the next fork.
        procpool_worker::fork_server::become_worker(parent, fds, None);
    }
    drop(fds);
    Ok((pid as u32, Reaper::Forked))
}
