//! The worker side of [procpool](https://docs.rs/procpool): everything that
//! runs inside a process the parent starts, and the wire protocol it shares
//! with the parent.
//!
//! Most users never name this crate; `procpool` re-exports what they need.
//!
//! The tree says which code runs where:
//!
//! - this file: the entry point, which makes a re-executed process a fork
//!   server or a worker before `main` runs;
//! - [`worker`]: what runs in a worker process (its main loop, running a
//!   batch under `catch_unwind`, forwarding logs, its status page);
//! - [`fork_server`]: what runs in the single-threaded fork server that
//!   forks workers;
//! - [`wire`]: what both sides must agree on to talk (frames, messages,
//!   batch and results headers, the shared status and arena region), with
//!   `PROTOCOL.md` beside it;
//! - [`fnref`] (function identity and the build fingerprint),
//!   [`store_format`] (the model store's header), [`stamps`] (timestamps of
//!   a trip's steps in both processes, behind the `stamps` feature) and
//!   [`sys`] (system calls): definitions both sides use.
//!
//! A process becomes a fork server or a worker before `main` runs: a
//! constructor in this crate looks for the role the parent set in the
//! environment and, if there is one, never returns to `main`. So code in the
//! user's `main` never runs twice, and test binaries work as they are.

#![deny(missing_docs)]

// Everything here rests on Linux interfaces (sealed memfds, signalfd,
// PR_SET_PDEATHSIG, /proc/self/exe); say so before the compiler lists each.
#[cfg(not(target_os = "linux"))]
compile_error!(
    "procpool runs on Linux only: it relies on sealed memfds, signalfd, PR_SET_PDEATHSIG and /proc/self/exe"
);

#[doc(hidden)]
pub mod fnref;
#[doc(hidden)]
pub mod fork_server;
#[doc(hidden)]
pub mod stamps;
#[doc(hidden)]
pub mod store_format;
#[doc(hidden)]
pub mod sys;
#[doc(hidden)]
pub mod wire;
#[doc(hidden)]
pub mod worker;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use wire::ROLE_ENV;

/// Returns true when this process was started as a worker or fork server
/// whose entry point did not run (the role is still in the environment).
/// Starting more processes from there would recurse.
pub fn role_pending() -> bool {
    std::env::var_os(ROLE_ENV).is_some()
}

/// The role suffix by which the parent says it set `LD_BIND_NOW` for the
/// fork server (and the user had not).
pub const BIND_NOW_ROLE: &str = "bind-now";

fn parse_fd(s: &str) -> Option<RawFd> {
    s.parse::<RawFd>().ok().filter(|fd| *fd > 2)
}

fn parse_pid(s: &str) -> Option<libc::pid_t> {
    s.parse::<libc::pid_t>().ok().filter(|pid| *pid > 0)
}

/// Makes this re-executed worker die when its parent process does. The
/// parent asked for `PR_SET_PDEATHSIG` when it started us from its main
/// thread; from any other thread, whose end is not the process's, a thread
/// here watches the parent instead.
fn die_with_parent_process(parent: libc::pid_t) {
    let parent_exit = sys::watch_parent(parent);
    if sys::has_parent_death_signal() {
        return;
    }
    if let Some(exit) = parent_exit {
        let watch = move || {
            let _ = sys::wait_readable(exit.as_raw_fd(), -1);
            // SAFETY: kill and getpid have no preconditions; this ends the
            // process as the death signal would have.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        };
        if std::thread::Builder::new()
            .name("procpool-parent-watch".into())
            .spawn(watch)
            .is_err()
        {
            eprintln!("procpool: cannot watch the parent process; this worker may outlive it");
        }
    }
}

#[ctor::ctor(unsafe)]
fn procpool_entry() {
    let Some(role) = std::env::var_os(ROLE_ENV) else {
        return;
    };
    // SAFETY: this runs before `main`, while the process has one thread.
    unsafe { std::env::remove_var(ROLE_ENV) };
    let role = role.to_string_lossy().into_owned();
    let parts: Vec<&str> = role.split(':').collect();
    match parts.as_slice() {
        ["fork-server", fd, parent, rest @ ..] => {
            if rest == [BIND_NOW_ROLE] {
                // The parent asked the dynamic loader to bind every symbol at
                // start, so that workers forked from here inherit a bound
                // process and need not resolve symbols themselves (a lookup
                // plus copy-on-write faults per symbol, in every worker).
                // Workers and their own children must not see the request.
                // SAFETY: as above, one thread.
                unsafe { std::env::remove_var("LD_BIND_NOW") };
            }
            if let (Some(fd), Some(parent)) = (parse_fd(fd), parse_pid(parent)) {
                let parent_exit = sys::watch_parent(parent);
                // SAFETY: the parent placed the link at this descriptor for us alone.
                fork_server::run(unsafe { OwnedFd::from_raw_fd(fd) }, parent_exit);
            }
        }
        ["worker", read, write, status, model, parent] => {
            if let (Some(read), Some(write), Some(parent)) =
                (parse_fd(read), parse_fd(write), parse_pid(parent))
            {
                die_with_parent_process(parent);
                // SAFETY: the parent placed the link's ends, the status page
                // and the model store (the last two if it gave a number) at
                // these descriptors for this process alone.
                let fds = unsafe {
                    sys::WorkerFds {
                        link: sys::LinkEnds {
                            read: OwnedFd::from_raw_fd(read),
                            write: OwnedFd::from_raw_fd(write),
                        },
                        status: parse_fd(status).map(|s| OwnedFd::from_raw_fd(s)),
                        model: parse_fd(model).map(|m| OwnedFd::from_raw_fd(m)),
                    }
                };
                sys::reset_signals_for_child();
                worker::run(fds);
            }
        }
        _ => {}
    }
    eprintln!("procpool: bad role {role:?} in {ROLE_ENV}");
    std::process::exit(2);
}
