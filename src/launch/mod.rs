//! Starting worker processes. Three start methods share one result: a
//! process running the worker loop, connected to us by a pair of pipes, with
//! a way to learn how it ended.

mod fork;
pub(crate) mod fork_server;
mod spawn;

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use procpool_worker::sys::{self, LinkEnds};
use procpool_worker::wire::{ExitInfo, STDERR_TAIL};

use crate::error::PoolError;

/// How a pool starts its workers.
///
/// ```
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
/// for method in [procpool::StartMethod::ForkServer, procpool::StartMethod::Spawn] {
///     let mut pool = procpool::PoolBuilder::new(double).n_jobs(2).start_method(method).build()?;
///     assert_eq!(pool.map([1u32]).next().unwrap()?, 2);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartMethod {
    /// Fork each worker from a single-threaded fork server, a re-execution
    /// of this program started at [`init`](crate::init) or at the first pool.
    /// Fast (about a millisecond per worker), safe in a multi-threaded parent,
    /// and independent of how much memory the parent holds. The default.
    #[default]
    ForkServer,
    /// Re-execute this program for each worker. Slower to start (a few
    /// milliseconds per worker) but needs no fork server.
    Spawn,
    /// Fork each worker directly from the calling process. Made with the
    /// `unsafe` [`StartMethod::fork`]; refused when the process has more than
    /// one thread. Its workers write to the parent's stderr directly, with
    /// no prefix and no tail kept (a thread to read it would make the
    /// process multi-threaded and refuse the next fork), so an allocation
    /// failure under a memory limit is reported as a crash, not as
    /// out-of-memory.
    Fork(ForkPermit),
}

/// Proof that the caller accepted the contract of [`StartMethod::fork`].
///
/// ```
/// // SAFETY: this doctest starts no thread between the check and a fork.
/// let method = unsafe { procpool::StartMethod::fork() };
/// assert!(matches!(method, procpool::StartMethod::Fork(_)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkPermit(());

impl StartMethod {
    /// Forks workers straight from this process.
    ///
    /// The pool checks at each fork that the process has exactly one thread
    /// and refuses otherwise (a fork of a multi-threaded process may deadlock
    /// on a lock another thread held). A program that uses only this method
    /// should not call [`init`](crate::init): the fork server it starts is
    /// read by a thread of this process, and forks would then be refused.
    ///
    /// # Safety
    ///
    /// Between the check and the fork no other thread may be started (for
    /// example by a signal handler or a library's background thread), and
    /// the process must not rely on state a forked copy would corrupt (open
    /// network connections, locks held across the call).
    pub unsafe fn fork() -> StartMethod {
        StartMethod::Fork(ForkPermit(()))
    }
}

/// A started worker, before the handshake.
pub(crate) struct Launched {
    /// Known at once for workers we start ourselves and for a fork-server
    /// worker that was a spare; one the fork server forks on request
    /// reports its own in its READY.
    pub pid: Option<u32>,
    pub link: LinkEnds,
    pub reaper: Reaper,
    /// The first frames, of which the pipe took the first `first_sent`
    /// bytes before the worker existed; the rest goes out as it reads.
    pub first_frames: Vec<u8>,
    pub first_sent: usize,
}

/// How a worker ended, with the last lines it wrote to stderr when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ended {
    pub exit: ExitInfo,
    pub stderr_tail: String,
}

/// The last [`STDERR_TAIL`] bytes a worker wrote to stderr, kept by the
/// thread that forwards its stderr (for start methods whose workers are our
/// own children; the fork server keeps its children's tails itself).
pub(crate) struct StderrTail {
    bytes: Arc<Mutex<Vec<u8>>>,
    /// Disconnected once the forwarding thread has read to end of file.
    ended: mpsc::Receiver<()>,
}

/// The forwarding thread's side of a [`StderrTail`].
pub(crate) struct TailWriter {
    bytes: Arc<Mutex<Vec<u8>>>,
    _ended: mpsc::Sender<()>,
}

impl StderrTail {
    /// A tail, and the writer the forwarding thread keeps until end of file.
    pub(crate) fn new() -> (StderrTail, TailWriter) {
        let (ended_tx, ended) = mpsc::channel();
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let writer = TailWriter {
            bytes: Arc::clone(&bytes),
            _ended: ended_tx,
        };
        (StderrTail { bytes, ended }, writer)
    }

    /// The tail of a worker that has ended. Waits briefly for the forwarding
    /// thread to reach end of file: the pipe closes when the worker dies,
    /// unless a process it started still holds it open.
    pub(crate) fn collect(&self) -> String {
        let _ = self.ended.recv_timeout(Duration::from_millis(200));
        let bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl TailWriter {
    /// Keeps `data` as the newest part of the tail.
    pub(crate) fn remember(&self, data: &[u8]) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        bytes.extend_from_slice(data);
        if bytes.len() > STDERR_TAIL {
            let excess = bytes.len() - STDERR_TAIL;
            bytes.drain(..excess);
        }
    }
}

/// Who can tell how a worker ended, and kill it.
pub(crate) enum Reaper {
    /// The fork server is its parent.
    ForkServer(std::sync::Arc<fork_server::ForkServer>),
    /// We are its parent, through `std::process::Child`; `tail` keeps the
    /// end of its stderr.
    Child {
        child: std::process::Child,
        tail: Option<StderrTail>,
    },
    /// We are its parent, through a raw fork.
    Forked,
}

impl Reaper {
    /// Lets go of a worker whose end nobody needs to hear about (it is
    /// exiting on its own): the fork server drops its report; a child of
    /// ours is still reaped, so none is left a zombie.
    pub(crate) fn release(&mut self, pid: u32) {
        match self {
            Reaper::ForkServer(server) => server.forget(pid),
            _ => {
                self.wait(pid, Duration::from_secs(1));
            }
        }
    }

    /// Like [`release`](Self::release), for a worker whose link is about to
    /// close: a child of ours is reaped off the caller's path (on a thread,
    /// or for a forked one, whose process must stay single-threaded, at a
    /// later fork).
    pub(crate) fn release_later(self, pid: u32) {
        match self {
            Reaper::ForkServer(server) => server.forget(pid),
            Reaper::Forked => fork::reap_later(pid),
            mut other => {
                let _ = std::thread::Builder::new()
                    .name("procpool-reaper".into())
                    .spawn(move || other.wait(pid, Duration::from_secs(60)));
            }
        }
    }

    /// Sends `signal` to the worker if it has not been reaped yet.
    pub(crate) fn kill(&mut self, pid: u32, signal: i32) {
        match self {
            Reaper::ForkServer(server) => server.kill(pid, signal),
            Reaper::Child { child, .. } => {
                if matches!(child.try_wait(), Ok(None)) {
                    // SAFETY: the child is unreaped, so `pid` is still ours.
                    unsafe { libc::kill(pid as libc::pid_t, signal) };
                }
            }
            Reaper::Forked => {
                let mut status = 0;
                // SAFETY: a non-blocking check of our own child; if it has not
                // been reaped the pid is still ours to signal.
                if unsafe {
                    libc::waitpid(
                        pid as libc::pid_t,
                        &mut status,
                        libc::WNOHANG | libc::WNOWAIT,
                    )
                } == 0
                {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid as libc::pid_t, signal) };
                }
            }
        }
    }

    /// Waits up to `timeout` for the worker to end and returns how it did.
    pub(crate) fn wait(&mut self, pid: u32, timeout: Duration) -> Option<Ended> {
        let deadline = std::time::Instant::now() + timeout;
        let ended = |exit| {
            Some(Ended {
                exit,
                stderr_tail: String::new(),
            })
        };
        match self {
            Reaper::ForkServer(server) => server.wait_exit(pid, timeout),
            Reaper::Child { child, tail } => loop {
                if let Ok(Some(status)) = child.try_wait() {
                    use std::os::unix::process::ExitStatusExt;
                    return Some(Ended {
                        exit: match status.signal() {
                            Some(signal) => ExitInfo::Signal {
                                signal,
                                core_dumped: status.core_dumped(),
                            },
                            None => ExitInfo::Code(status.code().unwrap_or(-1)),
                        },
                        stderr_tail: tail.as_ref().map(StderrTail::collect).unwrap_or_default(),
                    });
                }
                if std::time::Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            },
            Reaper::Forked => loop {
                let mut status = 0;
                // SAFETY: non-blocking wait for our own child.
                let ret = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
                if ret == pid as libc::pid_t {
                    return ended(ExitInfo::from_wait_status(status));
                }
                if ret < 0 || std::time::Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            },
        }
    }
}

/// What a new worker is given, whichever way it starts.
pub(crate) struct NewWorker<'a> {
    /// Prefix for its stderr lines.
    pub label: &'a str,
    /// Its ends of its link.
    pub link: LinkEnds,
    /// Its status page (a pool's worker).
    pub status: Option<BorrowedFd<'a>>,
    /// The model store (a map over a model).
    pub model: Option<BorrowedFd<'a>>,
}

impl<'a> NewWorker<'a> {
    /// Its label, link, status page and model store.
    pub(crate) fn into_parts(
        self,
    ) -> (
        &'a str,
        LinkEnds,
        Option<BorrowedFd<'a>>,
        Option<BorrowedFd<'a>>,
    ) {
        (self.label, self.link, self.status, self.model)
    }
}

/// Starts one worker with `method`, giving it its status page `status` (a
/// pool's worker has one; an isolated call's, running one task, has
/// nothing to tell apart) and the model store `model`, with `first_frames`
/// (its setup, and perhaps a batch) waiting in its pipe. They are taken by
/// value: an isolated call's argument may be large, and what the pipe does
/// not take yet waits in them. A pool's worker gets large pipes; an
/// isolated call's, default ones unless its first frames need more.
pub(crate) fn launch(
    method: StartMethod,
    status: Option<BorrowedFd<'_>>,
    label: &str,
    first_frames: Vec<u8>,
    model: Option<BorrowedFd<'_>>,
) -> Result<Launched, PoolError> {
    use std::os::fd::AsRawFd;
    if procpool_worker::role_pending() {
        return Err(PoolError::entry_not_run());
    }
    if !matches!(method, StartMethod::ForkServer) && sys::child_exits_discarded() {
        // The kernel would reap our worker the moment it dies, and with it
        // the signal or code that says why: every crash would read as an
        // unknown death. The fork server resets the disposition for itself.
        return Err(PoolError::refused(
            "SIGCHLD is ignored in this process (SIG_IGN or SA_NOCLDWAIT), so the exit status \
             of a worker started by StartMethod::Spawn or StartMethod::Fork would be lost; \
             restore SIGCHLD's default disposition or use the fork server (the default)",
        ));
    }
    let large = status.is_some() || first_frames.len() > sys::DEFAULT_PIPE_BYTES;
    let (ours, theirs) =
        sys::link_pair(large).map_err(|e| PoolError::io("create a worker link", e))?;
    // The frames wait in the pipe, so the worker finds them the moment it
    // starts. What does not fit waits for the worker to read: a blocking
    // write here would wait for a reader that does not exist yet.
    sys::set_nonblocking(ours.write.as_raw_fd(), true)
        .map_err(|e| PoolError::io("configure a worker link", e))?;
    let first_sent = sys::write_some(ours.write.as_raw_fd(), &first_frames)
        .map_err(|e| PoolError::io("write a worker's setup", e))?;
    let new_worker = NewWorker {
        label,
        link: theirs,
        status,
        model,
    };
    let (pid, reaper) = match method {
        StartMethod::ForkServer => {
            let server = fork_server::get()?;
            let pid = server.spawn(new_worker)?;
            (pid, Reaper::ForkServer(server))
        }
        StartMethod::Spawn => {
            let (pid, reaper) = spawn::spawn(new_worker)?;
            (Some(pid), reaper)
        }
        StartMethod::Fork(_) => {
            let (pid, reaper) = fork::fork(new_worker)?;
            (Some(pid), reaper)
        }
    };
    Ok(Launched {
        pid,
        link: ours,
        reaper,
        first_frames,
        first_sent,
    })
}
