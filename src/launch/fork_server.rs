//! The parent's side of the fork server: starting it, asking it for workers,
//! and hearing how they ended.

use super::NewWorker;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use procpool_worker::sys;
use procpool_worker::wire::{
    FORK_SERVER_DATAGRAM, ForkServerEvent, ForkServerRequest, ROLE_ENV, handoff_flags,
};

use super::Ended;
use crate::error::PoolError;

/// How long a new fork server may take to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A child the fork server forked ahead of need, waiting on `sock` for a
/// worker's descriptors.
struct Spare {
    pid: u32,
    sock: OwnedFd,
}

/// A running fork server.
pub(crate) struct ForkServer {
    ctrl: OwnedFd,
    send_lock: Mutex<()>,
    /// Spares the server offered that nobody took yet, oldest first.
    spares: Mutex<VecDeque<Spare>>,
    /// Workers whose exit nobody will wait for.
    forgotten: Mutex<std::collections::HashSet<u32>>,
    exits: Mutex<HashMap<u32, Ended>>,
    exit_signal: Condvar,
    next_request: AtomicU64,
    alive: AtomicBool,
    /// The process that started it. A plain fork of that process inherits
    /// this value but not the thread that reads the server's events, and
    /// must not take the spares its parent holds.
    owner: u32,
}

static SERVER: Mutex<Option<Arc<ForkServer>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The running fork server, started now if there is none (or it died, or
/// it is the server of the process this one was forked from).
pub(crate) fn get() -> Result<Arc<ForkServer>, PoolError> {
    let mut slot = lock(&SERVER);
    if let Some(server) = slot.as_ref()
        && server.alive.load(Ordering::Acquire)
        && server.owner == std::process::id()
    {
        return Ok(Arc::clone(server));
    }
    let server = start()?;
    *slot = Some(Arc::clone(&server));
    Ok(server)
}

fn start() -> Result<Arc<ForkServer>, PoolError> {
    if std::env::var_os("LD_BIND_NOW").is_some() {
        return start_with(false);
    }
    match start_with(true) {
        // A program can load a library with a symbol nothing defines, as
        // long as nobody calls it: lazy binding never looks it up. Binding
        // everything at start then fails, so start the server as the
        // program itself started.
        Err(e) if !e.is_build_mismatch() => start_with(false),
        started => started,
    }
}

/// Starts the fork server, with `LD_BIND_NOW` set for it if `bind_now`.
fn start_with(bind_now: bool) -> Result<Arc<ForkServer>, PoolError> {
    if procpool_worker::role_pending() {
        return Err(PoolError::entry_not_run());
    }
    let (ours, theirs) = sys::socket_pair(libc::SOCK_SEQPACKET)
        .map_err(|e| PoolError::io("create the fork server's socket", e))?;
    let their_fd = theirs.as_raw_fd();
    let role = format!("fork-server:{their_fd}:{}", std::process::id());
    let mut command = Command::new("/proc/self/exe");
    command.stdin(Stdio::null());
    if bind_now {
        // Bind every symbol once in the server rather than lazily in each
        // worker; the server takes the variable out of its environment.
        command.env("LD_BIND_NOW", "1").env(
            ROLE_ENV,
            format!("{role}:{}", procpool_worker::BIND_NOW_ROLE),
        );
    } else {
        command.env(ROLE_ENV, role);
    }
    let death_signal = sys::on_main_thread();
    // SAFETY: the hook runs in the child between fork and exec and calls only
    // fcntl and prctl, which are async-signal-safe. It lets the server's end
    // of the socket survive exec (it is close-on-exec everywhere else), and
    // asks for SIGKILL when the thread starting it ends if that thread is
    // the main one (the server watches the parent itself too).
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(their_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if death_signal {
                sys::kill_with_creator_thread()?;
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| PoolError::io("start the fork server", e))?;
    drop(theirs);
    let ready = sys::wait_readable(ours.as_raw_fd(), START_TIMEOUT.as_millis() as i32)
        .map_err(|e| PoolError::io("wait for the fork server", e))?;
    let mut buf = vec![0u8; FORK_SERVER_DATAGRAM];
    let event = if ready {
        match sys::recv_with_fds(ours.as_raw_fd(), &mut buf) {
            Ok((len, _)) if len > 0 => postcard::from_bytes::<ForkServerEvent>(&buf[..len]).ok(),
            _ => None,
        }
    } else {
        None
    };
    let fingerprint = match event {
        Some(ForkServerEvent::Ready { fingerprint, .. }) => fingerprint,
        _ => {
            let _ = child.kill();
            let status = child.wait().ok();
            return Err(PoolError::protocol(format!(
                "the fork server did not start (it ended with {status:?}; is procpool linked into this binary?)"
            )));
        }
    };
    if fingerprint != procpool_worker::fnref::fingerprint() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(PoolError::build_mismatch());
    }
    let server = Arc::new(ForkServer {
        ctrl: ours,
        send_lock: Mutex::new(()),
        spares: Mutex::new(VecDeque::new()),
        forgotten: Mutex::new(std::collections::HashSet::new()),
        exits: Mutex::new(HashMap::new()),
        exit_signal: Condvar::new(),
        next_request: AtomicU64::new(1),
        alive: AtomicBool::new(true),
        owner: std::process::id(),
    });
    let reader = Arc::clone(&server);
    std::thread::Builder::new()
        .name("procpool-fork-server".into())
        .spawn(move || reader.read_events(child))
        .map_err(|e| PoolError::io("start the fork server's reader thread", e))?;
    Ok(server)
}

impl ForkServer {
    /// Reads events until the server goes away, then reaps it.
    fn read_events(&self, mut child: std::process::Child) {
        let mut buf = vec![0u8; FORK_SERVER_DATAGRAM];
        loop {
            let (event, fds) = match sys::recv_with_fds(self.ctrl.as_raw_fd(), &mut buf) {
                Ok((0, _)) | Err(_) => break,
                Ok((len, fds)) => match postcard::from_bytes::<ForkServerEvent>(&buf[..len]) {
                    Ok(event) => (event, fds),
                    Err(_) => continue,
                },
            };
            match event {
                ForkServerEvent::Spare { pid } => {
                    if let Some(sock) = fds.into_iter().next() {
                        lock(&self.spares).push_back(Spare { pid, sock });
                    }
                }
                // A failed fork also closes the worker's link, which its
                // caller sees; this says why.
                ForkServerEvent::SpawnFailed { request_id, error } => {
                    log::error!(target: "procpool", "the fork server could not fork worker request {request_id}: {error}");
                }
                ForkServerEvent::Exited {
                    pid,
                    status,
                    stderr_tail,
                } => {
                    if lock(&self.forgotten).remove(&pid) {
                        continue;
                    }
                    {
                        let mut spares = lock(&self.spares);
                        if let Some(at) = spares.iter().position(|s| s.pid == pid) {
                            // Died before anyone took it.
                            spares.remove(at);
                            continue;
                        }
                    }
                    lock(&self.exits).insert(
                        pid,
                        Ended {
                            exit: status,
                            stderr_tail,
                        },
                    );
                    self.exit_signal.notify_all();
                }
                ForkServerEvent::Ready { .. } => {}
            }
        }
        self.alive.store(false, Ordering::Release);
        self.exit_signal.notify_all();
        let _ = child.wait();
    }

    fn send(&self, request: &ForkServerRequest, fds: &[i32]) -> std::io::Result<()> {
        let bytes = postcard::to_allocvec(request).map_err(std::io::Error::other)?;
        let _guard = lock(&self.send_lock);
        sys::send_with_fds(self.ctrl.as_raw_fd(), &bytes, fds)
    }

    /// Starts a worker on `link` with the status page `status` and the
    /// model store `model` (each if any), from a spare if one is waiting,
    /// else by asking the server to fork one. Returns once the descriptors
    /// are sent, with the pid if it came from a spare; otherwise the worker
    /// reports its pid when ready, and a failed fork closes its link.
    pub(crate) fn spawn(&self, new_worker: NewWorker<'_>) -> Result<Option<u32>, PoolError> {
        let (label, link, status, model) = new_worker.into_parts();
        if !self.alive.load(Ordering::Acquire) {
            return Err(PoolError::protocol("the fork server ended"));
        }
        let mut fds = vec![link.read.as_raw_fd(), link.write.as_raw_fd()];
        fds.extend(status.map(|s| s.as_raw_fd()));
        fds.extend(model.map(|m| m.as_raw_fd()));
        // The oldest spare has had the longest to get ready.
        let taken = lock(&self.spares).pop_front();
        if let Some(spare) = taken {
            // The server must know the worker before it can write or die.
            self.send(
                &ForkServerRequest::Took {
                    pid: spare.pid,
                    label: label.to_string(),
                },
                &[],
            )
            .map_err(|e| PoolError::io("tell the fork server a spare was taken", e))?;
            let flags = handoff_flags(status.is_some(), model.is_some());
            if sys::send_with_fds(spare.sock.as_raw_fd(), &[flags], &fds).is_ok() {
                return Ok(Some(spare.pid));
            }
            // The spare died before it got them; nobody waits for its end.
            self.forget(spare.pid);
        }
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let request = ForkServerRequest::Spawn {
            request_id,
            label: label.to_string(),
            has_status: status.is_some(),
            has_model: model.is_some(),
        };
        self.send(&request, &fds)
            .map_err(|e| PoolError::io("ask the fork server for a worker", e))?;
        Ok(None)
    }

    /// Says nobody will wait for how `pid` ended, so its report is dropped.
    pub(crate) fn forget(&self, pid: u32) {
        let mut exits = lock(&self.exits);
        if exits.remove(&pid).is_none() {
            lock(&self.forgotten).insert(pid);
        }
    }

    /// Signals a worker the server has not reaped yet.
    pub(crate) fn kill(&self, pid: u32, signal: i32) {
        let _ = self.send(&ForkServerRequest::Kill { pid, signal }, &[]);
    }

    /// Waits up to `timeout` for the server to report how `pid` ended.
    pub(crate) fn wait_exit(&self, pid: u32, timeout: Duration) -> Option<Ended> {
        let deadline = Instant::now() + timeout;
        let mut exits = lock(&self.exits);
        loop {
            if let Some(status) = exits.remove(&pid) {
                return Some(status);
            }
            let now = Instant::now();
            if now >= deadline || !self.alive.load(Ordering::Acquire) {
                return None;
            }
            exits = match self.exit_signal.wait_timeout(exits, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// Starts the fork server now, if it is not running. See [`crate::init`].
pub(crate) fn ensure_started() -> Result<(), PoolError> {
    get().map(|_| ())
}
