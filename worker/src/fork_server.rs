//! The fork server: a single-threaded process that forks workers on request.
//!
//! The parent may run any number of threads; forking it would be unsound. So
//! the parent re-executes its own binary once, as this server, which never
//! starts a thread and can therefore fork safely and quickly. It reaps its
//! children and reports how each ended, forwards their stderr line by line
//! with a prefix, and kills them all when the parent goes away: its link
//! closes, even when the parent is killed with SIGKILL, and a pidfd of the
//! parent says so when a plain fork of the parent still holds the link. The
//! parent's main thread also asks for `PR_SET_PDEATHSIG` when it starts us.
//!
//! To take the fork off the path of a request, the server keeps [`SPARES`]
//! *spares*: children forked ahead of need, which have already paid for the
//! fork and, by rehearsing a worker's start while they wait, for nearly all
//! of the page faults of a new worker, and wait for a request's
//! descriptors. The server gives the parent each spare's hand-off
//! socket, so the parent starts a worker by writing to a spare directly,
//! with no turn of the server in between; the parent's `Took` message makes
//! the server fork a replacement. Spares are made only at start and after a
//! request, never in answer to a death, so a spare that cannot live cannot
//! make the server fork in a loop.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys::{self, WorkerFds};
use crate::wire::{
    ExitInfo, FORK_SERVER_DATAGRAM, ForkServerEvent, ForkServerRequest, HANDOFF_FLAGS_LEN,
    HANDOFF_MODEL, HANDOFF_STATUS, STDERR_TAIL,
};

struct Child {
    label: String,
    stderr: Option<OwnedFd>,
    partial: Vec<u8>,
    /// The last bytes of stderr, to explain a death.
    tail: Vec<u8>,
}

impl Child {
    fn new(label: String, stderr: OwnedFd) -> Child {
        Child {
            label,
            stderr: Some(stderr),
            partial: Vec::new(),
            tail: Vec::new(),
        }
    }

    fn remember(&mut self, data: &[u8]) {
        self.tail.extend_from_slice(data);
        if self.tail.len() > STDERR_TAIL {
            self.tail.drain(..self.tail.len() - STDERR_TAIL);
        }
    }
}

/// Spares kept ready. A new worker wakes on an idle CPU, and the server,
/// woken at the same moment by `Took`, often lands behind it there and
/// replaces the spare only once the worker has run; with a second spare in
/// hand, a call that comes sooner still finds one.
pub const SPARES: usize = 2;

/// A child forked ahead of need and offered to the parent, which holds the
/// hand-off socket it waits on.
struct Spare {
    pid: u32,
    /// The read end of the spare's stderr pipe, read once the parent takes it.
    stderr: OwnedFd,
}

fn send_event(ctrl: RawFd, event: &ForkServerEvent) {
    if let Ok(bytes) = postcard::to_allocvec(event) {
        // If the parent is gone the next poll sees the hang-up and we exit.
        let _ = sys::send_with_fds(ctrl, &bytes, &[]);
    }
}

/// Reads what a child's stderr pipe holds now; returns false at end of file.
fn pump_stderr(child: &mut Child) -> bool {
    let Some(fd) = child.stderr.as_ref().map(|f| f.as_raw_fd()) else {
        return false;
    };
    let mut buf = [0u8; 16 * 1024];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            sys::write_prefixed(&child.label, &mut child.partial, &buf[..n as usize], false);
            child.remember(&buf[..n as usize]);
            continue;
        }
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if err.kind() == std::io::ErrorKind::WouldBlock {
                return true;
            }
        }
        sys::write_prefixed(&child.label, &mut child.partial, &[], true);
        child.stderr = None;
        return false;
    }
}

fn reap(ctrl: RawFd, children: &mut HashMap<u32, Child>, spares: &mut Vec<Spare>) {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid with a valid out-pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let pid = pid as u32;
        // The parent was offered the spare, so it hears of its end too.
        let child = children.remove(&pid).or_else(|| {
            take_spare(spares, pid).map(|s| Child::new(format!("procpool spare {pid}"), s.stderr))
        });
        let Some(mut child) = child else {
            continue;
        };
        // Forward what the child wrote before it died, before saying it died.
        pump_stderr(&mut child);
        sys::write_prefixed(&child.label, &mut child.partial, &[], true);
        let stderr_tail = String::from_utf8_lossy(&child.tail).into_owned();
        send_event(
            ctrl,
            &ForkServerEvent::Exited {
                pid,
                status: ExitInfo::from_wait_status(status),
                stderr_tail,
            },
        );
    }
}

/// The link, the signalfd and the parent's exit come first in the poll set;
/// the children's stderr pipes follow.
const FIXED_POLLFDS: usize = 3;

fn fork_worker(
    server_pid: libc::pid_t,
    fds: WorkerFds,
    label: String,
) -> Result<(u32, Child), String> {
    let (err_read, err_write) = stderr_pipe()?;
    // SAFETY: this process is single-threaded (it never starts a thread), so
    // the child may run any code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork failed: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        become_worker(server_pid, fds, Some(err_write));
    }
    Ok((pid as u32, Child::new(label, err_read)))
}

/// A pipe for a child's stderr; the server's read end does not block.
fn stderr_pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let (read, write) = sys::pipe().map_err(|e| format!("cannot create a stderr pipe: {e}"))?;
    sys::set_nonblocking(read.as_raw_fd(), true).map_err(|e| e.to_string())?;
    Ok((read, write))
}

/// Removes the spare `pid` from `spares`, if it is there.
fn take_spare(spares: &mut Vec<Spare>, pid: u32) -> Option<Spare> {
    let at = spares.iter().position(|s| s.pid == pid)?;
    Some(spares.swap_remove(at))
}

/// Forks spares until there are [`SPARES`] (or a fork fails), offering each
/// to the parent on `ctrl`.
fn refill_spares(ctrl: RawFd, server_pid: libc::pid_t, spares: &mut Vec<Spare>) {
    while spares.len() < SPARES {
        match offer_spare(ctrl, server_pid) {
            Some(spare) => spares.push(spare),
            None => return,
        }
    }
}

/// Forks a spare and offers it to the parent on `ctrl`, with the socket on
/// which the spare waits for a spawn request's descriptors.
fn offer_spare(ctrl: RawFd, server_pid: libc::pid_t) -> Option<Spare> {
    let (spare, sock) = fork_spare(server_pid).ok()?;
    if let Ok(bytes) = postcard::to_allocvec(&ForkServerEvent::Spare { pid: spare.pid }) {
        // If the parent is gone the next poll sees the hang-up and we exit,
        // killing the spare.
        let _ = sys::send_with_fds(ctrl, &bytes, &[sock.as_raw_fd()]);
    }
    Some(spare)
}

/// Forks a spare; returns it and the socket on which it waits for a spawn
/// request's descriptors.
fn fork_spare(server_pid: libc::pid_t) -> Result<(Spare, OwnedFd), String> {
    let (ours, theirs) = sys::socket_pair(libc::SOCK_SEQPACKET)
        .map_err(|e| format!("cannot create a hand-off socket: {e}"))?;
    let (err_read, err_write) = stderr_pipe()?;
    // SAFETY: this process is single-threaded, as in `fork_worker`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork failed: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop((ours, err_read));
        wait_as_spare(server_pid, theirs, err_write);
    }
    Ok((
        Spare {
            pid: pid as u32,
            stderr: err_read,
        },
        ours,
    ))
}

/// The lowest descriptor number above a worker's fixed ones (3 to 6, see
/// [`WorkerFds`]).
const FIRST_FREE_FD: RawFd = 7;

/// In a freshly forked spare: get ready, wait for a spawn request's
/// descriptors on `sock`, and become that worker. Exits when the parent
/// closes `sock` instead.
fn wait_as_spare(server_pid: libc::pid_t, sock: OwnedFd, stderr: OwnedFd) -> ! {
    sys::reset_signals_for_child();
    sys::die_with_parent(server_pid);
    let sock_fd = sock.as_raw_fd();
    if sys::dup_to(stderr.as_raw_fd(), 2).is_err() {
        // SAFETY: _exit ends the process without running any Rust code.
        unsafe { libc::_exit(3) };
    }
    drop(stderr);
    // Keep only stdin, stdout, stderr and the hand-off socket: the server's
    // other descriptors (its link, other children's pipes) are not ours.
    // `sock_fd` is at least 3: 0 to 2 were open when the socket was made.
    sys::close_range(3..=sock_fd as u32 - 1);
    sys::close_range(sock_fd as u32 + 1..=u32::MAX);
    // Above the worker's fixed numbers, the socket leaves them free: the
    // descriptors it brings land there, since the kernel gives the lowest
    // free numbers, and need no moving (see `adopt_descriptors`).
    let high = sys::dup_at_least(&sock, FIRST_FREE_FD);
    drop(sock);
    let Ok(sock) = high else {
        // SAFETY: as above.
        unsafe { libc::_exit(3) }
    };
    crate::worker::rehearse_start();
    let mut flags = [0u8; HANDOFF_FLAGS_LEN];
    let (len, fds) = match sys::recv_with_fds(sock.as_raw_fd(), &mut flags) {
        Ok(got) => got,
        // SAFETY: as above.
        Err(_) => unsafe { libc::_exit(0) },
    };
    // Closed with every other stray descriptor when the worker takes its own.
    std::mem::forget(sock);
    if len != HANDOFF_FLAGS_LEN {
        // The parent let us go.
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let (has_status, has_model) = (
        flags[0] & HANDOFF_STATUS != 0,
        flags[0] & HANDOFF_MODEL != 0,
    );
    match WorkerFds::from_received(fds, has_status, has_model) {
        Some(fds) => adopt_descriptors(fds, None),
        // SAFETY: as above.
        None => unsafe { libc::_exit(3) },
    }
}

/// In a freshly forked child: put `fds` at their fixed numbers (see
/// [`WorkerFds`]) and `stderr`, if given, at 2, close everything else, and
/// become a worker that dies with `parent_pid`.
pub fn become_worker(parent_pid: libc::pid_t, fds: WorkerFds, stderr: Option<OwnedFd>) -> ! {
    sys::reset_signals_for_child();
    sys::die_with_parent(parent_pid);
    adopt_descriptors(fds, stderr)
}

/// Puts a new worker's descriptors in place (see `become_worker`) and runs
/// the worker. The descriptors in `fds` are close-on-exec: the parent makes
/// them so, and a spare receives them so (`MSG_CMSG_CLOEXEC`).
fn adopt_descriptors(fds: WorkerFds, stderr: Option<OwnedFd>) -> ! {
    let (has_status, has_model) = (fds.status.is_some(), fds.model.is_some());
    // A spare closed every other descriptor before it waited, so the kernel
    // put the ones it received at the lowest free numbers: for a pool's
    // worker and for an isolated call, the very numbers they need.
    let mut wanted = vec![3, 4];
    wanted.extend(fds.status.as_ref().map(|_| 5));
    wanted.extend(fds.model.as_ref().map(|_| 6));
    if stderr.is_some() || fds.raw() != wanted {
        move_descriptors(fds, stderr);
    } else {
        // Already in place; the numbers are taken over below.
        std::mem::forget(fds);
    }
    if !has_status {
        sys::close_range(5..=5);
    }
    sys::close_from(if has_model { 7 } else { 6 });
    // SAFETY: 3 and 4 now hold the link, 5 the status page and 6 the model
    // store (each if present), owned by nobody else in this process.
    let fds = unsafe {
        WorkerFds {
            link: sys::LinkEnds {
                read: OwnedFd::from_raw_fd(3),
                write: OwnedFd::from_raw_fd(4),
            },
            status: has_status.then(|| OwnedFd::from_raw_fd(5)),
            model: has_model.then(|| OwnedFd::from_raw_fd(6)),
        }
    };
    crate::worker::run_adopted(fds)
}

/// Moves `fds` to their fixed numbers, close-on-exec, and `stderr`, if
/// given, to 2; the originals stay open until `close_from`.
fn move_descriptors(fds: WorkerFds, stderr: Option<OwnedFd>) {
    // Move the kept descriptors high first so the dup calls cannot clobber them.
    let high = |fd: OwnedFd| -> RawFd {
        // SAFETY: F_DUPFD returns a new descriptor >= 100 that we own.
        let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 100) };
        if n < 0 {
            // SAFETY: _exit never returns and runs no Rust code.
            unsafe { libc::_exit(3) };
        }
        n
    };
    let (read, write) = (high(fds.link.read), high(fds.link.write));
    let status = fds.status.map(high);
    let model = fds.model.map(high);
    let err = stderr.map(high);
    let ok = err.is_none_or(|e| sys::dup_to(e, 2).is_ok())
        && sys::dup_cloexec_to(read, 3).is_ok()
        && sys::dup_cloexec_to(write, 4).is_ok()
        && status.is_none_or(|s| sys::dup_cloexec_to(s, 5).is_ok())
        && model.is_none_or(|m| sys::dup_cloexec_to(m, 6).is_ok());
    if !ok {
        // SAFETY: as above.
        unsafe { libc::_exit(3) };
    }
}

/// Runs the fork server on the link `ctrl`; `parent_exit`, if the kernel
/// could make one, becomes readable when the parent process has exited.
/// Never returns.
pub fn run(ctrl: OwnedFd, parent_exit: Option<OwnedFd>) -> ! {
    let ctrl_fd = ctrl.as_raw_fd();
    // SAFETY: getpid has no preconditions.
    let server_pid = unsafe { libc::getpid() };
    // Inherited across `exec` from a parent that ignores SIGCHLD, it would
    // make the kernel reap workers at once and lose how they ended.
    sys::keep_child_exits();
    // SAFETY: signal-mask changes on a local set; SIGCHLD is then read from a
    // signalfd instead of being delivered to a handler.
    let sigfd = unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if sigfd < 0 {
        eprintln!(
            "procpool fork server: cannot create a signalfd: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(2);
    }
    send_event(
        ctrl_fd,
        &ForkServerEvent::Ready {
            fingerprint: crate::fnref::fingerprint(),
            pid: server_pid as u32,
        },
    );
    let mut children: HashMap<u32, Child> = HashMap::new();
    // Without a spare, a request simply forks.
    let mut spares = Vec::with_capacity(SPARES);
    refill_spares(ctrl_fd, server_pid, &mut spares);
    let mut buf = vec![0u8; FORK_SERVER_DATAGRAM];
    loop {
        let mut pollfds = vec![
            libc::pollfd {
                fd: ctrl_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd,
                events: libc::POLLIN,
                revents: 0,
            },
            // The link alone can outlive the parent: a plain fork of the
            // parent holds a copy of it. A negative descriptor is ignored.
            libc::pollfd {
                fd: parent_exit.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut order = Vec::new();
        for (pid, child) in &children {
            if let Some(fd) = &child.stderr {
                pollfds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                order.push(*pid);
            }
        }
        // SAFETY: `pollfds` is a valid array of its length.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        for (i, pid) in order.iter().enumerate() {
            if pollfds[FIXED_POLLFDS + i].revents != 0
                && let Some(child) = children.get_mut(pid)
            {
                pump_stderr(child);
            }
        }
        if pollfds[2].revents != 0 {
            shutdown(&mut children, spares);
        }
        if pollfds[0].revents != 0 || pollfds[1].revents != 0 {
            // Every waiting request before any exit is reaped: a worker the
            // parent took from a spare may already be dead, and the `Took`
            // sent before the hand-off says whose it is.
            let mut asked = false;
            loop {
                match sys::try_recv_with_fds(ctrl_fd, &mut buf) {
                    Ok(None) => break,
                    Ok(Some((0, fds))) if fds.is_empty() => shutdown(&mut children, spares),
                    Ok(Some((len, fds))) => {
                        asked |= serve(
                            ctrl_fd,
                            server_pid,
                            &buf[..len],
                            fds,
                            &mut children,
                            &mut spares,
                        );
                    }
                    Err(_) => shutdown(&mut children, spares),
                }
            }
            if asked && spares.len() < SPARES {
                // Let the new worker run first if it was woken on this CPU:
                // the fork of the next spare takes about as long as a short
                // isolated call, and would otherwise come before it.
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
                refill_spares(ctrl_fd, server_pid, &mut spares);
            }
        }
        if pollfds[1].revents != 0 {
            let mut info = [0u8; 128];
            // SAFETY: draining the signalfd into a buffer of a siginfo's size.
            while unsafe { libc::read(sigfd, info.as_mut_ptr().cast(), info.len()) } > 0 {}
            reap(ctrl_fd, &mut children, &mut spares);
        }
    }
}

/// Serves one request from the parent; returns whether it started a worker
/// (or the parent took a spare for one).
fn serve(
    ctrl_fd: RawFd,
    server_pid: libc::pid_t,
    request: &[u8],
    fds: Vec<OwnedFd>,
    children: &mut HashMap<u32, Child>,
    spares: &mut Vec<Spare>,
) -> bool {
    match postcard::from_bytes::<ForkServerRequest>(request) {
        Ok(ForkServerRequest::Spawn {
            request_id,
            label,
            has_status,
            has_model,
        }) => match WorkerFds::from_received(fds, has_status, has_model)
            .ok_or_else(|| "spawn request carried the wrong descriptors".to_string())
            .and_then(|fds| fork_worker(server_pid, fds, label))
        {
            // The worker tells its parent its pid itself.
            Ok((pid, child)) => {
                children.insert(pid, child);
                true
            }
            Err(error) => {
                send_event(ctrl_fd, &ForkServerEvent::SpawnFailed { request_id, error });
                false
            }
        },
        Ok(ForkServerRequest::Took { pid, label }) => {
            // A spare that already died was reported as one; the parent
            // then finds its socket closed and asks again.
            if let Some(taken) = take_spare(spares, pid) {
                children.insert(pid, Child::new(label, taken.stderr));
            }
            true
        }
        Ok(ForkServerRequest::Kill { pid, signal }) => {
            if children.contains_key(&pid) {
                // SAFETY: `pid` is our unreaped child, so it cannot have
                // been reused by another process.
                unsafe { libc::kill(pid as libc::pid_t, signal) };
            }
            false
        }
        Err(e) => {
            eprintln!("procpool fork server: bad request: {e}");
            false
        }
    }
}

/// The parent went away: kill every worker, reap them, and exit.
fn shutdown(children: &mut HashMap<u32, Child>, spares: Vec<Spare>) -> ! {
    for spare in spares {
        let mut status = 0;
        // SAFETY: the spare is our unreaped child; the wait blocks only
        // until the SIGKILL takes effect.
        unsafe {
            libc::kill(spare.pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(spare.pid as libc::pid_t, &mut status, 0);
        }
    }
    for pid in children.keys() {
        // SAFETY: each pid is our unreaped child.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
    }
    for (pid, mut child) in children.drain() {
        let mut status = 0;
        // SAFETY: blocking wait for our own child.
        unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        pump_stderr(&mut child);
    }
    std::process::exit(0)
}
