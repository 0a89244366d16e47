//! Thin, checked wrappers over the Linux calls both sides need: pipes and
//! sockets, reads and writes, datagrams with attached file descriptors on
//! `SOCK_SEQPACKET` sockets, the clock, signals and process hygiene. System
//! calls only: what travels over them is [`crate::wire`]'s.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors one datagram on the fork-server link carries.
pub const MAX_FDS: usize = 4;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[inline]
fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A connected pair of close-on-exec Unix sockets of the given type.
pub fn socket_pair(kind: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: on success both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: on success both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A close-on-exec, non-blocking eventfd: a doorbell one thread rings
/// ([`ring_event`]) and another polls and clears ([`clear_event`]).
pub fn event_fd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: on success the descriptor is fresh and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes an eventfd readable (its counter grows by one).
pub fn ring_event(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of `one`, which lives across the call. A
    // full counter (EAGAIN) is still readable, which is all a ring needs.
    let _ = unsafe { libc::write(fd, (&raw const one).cast(), 8) };
}

/// Resets an eventfd's counter, so it is no longer readable.
pub fn clear_event(fd: RawFd) {
    let mut count: u64 = 0;
    // SAFETY: reads at most 8 bytes into `count`, which lives across the
    // call; a counter already at zero fails with EAGAIN (non-blocking).
    let _ = unsafe { libc::read(fd, (&raw mut count).cast(), 8) };
}

/// Sets or clears `O_NONBLOCK`.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set flags of a descriptor we were handed.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        cvt(libc::fcntl(fd, libc::F_SETFL, flags))?;
    }
    Ok(())
}

/// Sets or clears `FD_CLOEXEC`.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD only changes the descriptor flag of `fd`.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags) })?;
    Ok(())
}

/// The two ends one side holds of a link: frames arrive on `read`, leave by
/// `write`. A link is a pair of pipes, one per direction; on this kind of
/// machine a pipe wakes its reader about 10 µs sooner than a socket does.
#[derive(Debug)]
pub struct LinkEnds {
    /// Where the peer's frames arrive.
    pub read: OwnedFd,
    /// Where frames to the peer go.
    pub write: OwnedFd,
}

/// What a worker starts with, placed at fixed descriptors in the worker: its
/// link at 3 (read) and 4 (write), its status page at 5 and the model store
/// at 6, each if it has one.
#[derive(Debug)]
pub struct WorkerFds {
    /// The worker's ends of its link.
    pub link: LinkEnds,
    /// The page where it records the task it runs. A worker that runs one
    /// batch of one task (an isolated call) has none: there is nothing to
    /// tell apart.
    pub status: Option<OwnedFd>,
    /// The model store, if the function has a model.
    pub model: Option<OwnedFd>,
}

impl WorkerFds {
    /// The descriptors in the order a spawn request carries them: link read
    /// end, link write end, then the status page and the model if present.
    pub fn raw(&self) -> Vec<RawFd> {
        let mut fds = vec![self.link.read.as_raw_fd(), self.link.write.as_raw_fd()];
        fds.extend(self.status.as_ref().map(AsRawFd::as_raw_fd));
        fds.extend(self.model.as_ref().map(AsRawFd::as_raw_fd));
        fds
    }

    /// Takes descriptors in the order of [`raw`](Self::raw); `None` unless
    /// there are exactly as many as the flags say.
    pub fn from_received(fds: Vec<OwnedFd>, has_status: bool, has_model: bool) -> Option<Self> {
        if fds.len() != 2 + usize::from(has_status) + usize::from(has_model) {
            return None;
        }
        let mut fds = fds.into_iter();
        let link = LinkEnds {
            read: fds.next()?,
            write: fds.next()?,
        };
        let status = if has_status { fds.next() } else { None };
        let model = if has_model { fds.next() } else { None };
        Some(WorkerFds {
            link,
            status,
            model,
        })
    }
}

/// Bytes a link pipe holds before a writer waits (the default cap of
/// `/proc/sys/fs/pipe-max-size`); larger frames simply take several wakeups.
pub const LINK_PIPE_BYTES: libc::c_int = 1 << 20;

/// Bytes a new pipe holds (Linux's default): a frame larger than this takes
/// a wakeup of both processes per pipeful, so links carrying one grow first.
pub const DEFAULT_PIPE_BYTES: usize = 64 << 10;

/// A new link: `(parent's ends, worker's ends)`, all close-on-exec. With
/// `large`, each pipe holds [`LINK_PIPE_BYTES`] (for a pool's batches, or
/// first frames that would not fit); otherwise the system's default, which
/// costs less to set up.
pub fn link_pair(large: bool) -> io::Result<(LinkEnds, LinkEnds)> {
    let (to_worker_read, to_worker_write) = pipe()?;
    let (from_worker_read, from_worker_write) = pipe()?;
    if large {
        grow_pipe(to_worker_write.as_raw_fd());
        grow_pipe(from_worker_write.as_raw_fd());
    }
    Ok((
        LinkEnds {
            read: from_worker_read,
            write: to_worker_write,
        },
        LinkEnds {
            read: to_worker_read,
            write: from_worker_write,
        },
    ))
}

/// Makes the pipe of `fd` (either end) hold [`LINK_PIPE_BYTES`].
pub fn grow_pipe(fd: RawFd) {
    // SAFETY: F_SETPIPE_SZ only resizes the pipe's buffer; failure (a lower
    // system limit) leaves the size it had, which still works, only slower.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, LINK_PIPE_BYTES) };
}

/// Writes all of `buf` (blocking descriptors only). A closed reader gives
/// `EPIPE`: procpool processes, like every Rust program, ignore SIGPIPE.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match write_some(fd, buf)? {
            // Full (a descriptor that is non-blocking after all): wait.
            0 => {
                wait_fd(fd, libc::POLLOUT, -1)?;
            }
            n => buf = &buf[n..],
        }
    }
    Ok(())
}

/// One write of as much of `buf` as `fd` (non-blocking) takes now; `Ok(0)`
/// when full.
#[inline]
pub fn write_some(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid readable slice for its length.
        let ret = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        match cvt_size(ret) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}

/// Maps `len` bytes of `fd` shared, readable, and writable too if
/// `writable`, for the life of the process (it is never unmapped).
///
/// # Safety
///
/// A read-only mapping is read as plain bytes: nobody may modify the file
/// for the life of the process. A writable one is shared with other
/// processes: its contents must be read and written only through atomics,
/// or as the protocol that shares it says.
pub unsafe fn map_shared(fd: RawFd, len: usize, writable: bool) -> io::Result<*mut u8> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh mapping at an address the kernel picks; it overlaps
    // nothing of ours.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(ptr.cast())
}

/// Appends to `buf` what one read of `fd` gives, at most `max` bytes; `Ok(0)`
/// at end of file. Blocks only if `fd` does.
#[inline]
pub fn read_append(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.capacity() - buf.len();
    loop {
        // SAFETY: we pass the spare capacity of `buf`, which is writable for
        // `spare` bytes; only the bytes the kernel reports are exposed.
        let ret = unsafe { libc::read(fd, buf.as_mut_ptr().add(buf.len()).cast(), spare) };
        match cvt_size(ret) {
            Ok(n) => {
                // SAFETY: the kernel initialised `n <= spare` bytes past the
                // old length.
                unsafe { buf.set_len(buf.len() + n) };
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Nanoseconds on the system-wide monotonic clock, comparable across processes.
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sends one datagram with descriptors attached (`SCM_RIGHTS`).
pub fn send_with_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS} descriptors per datagram"),
        ));
    }
    let iov = [io::IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one datagram and the descriptors attached to it (close-on-exec).
/// An empty datagram with no descriptors means the peer closed.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_with_fds_flags(fd, buf, nix::sys::socket::MsgFlags::empty())
}

/// Like [`recv_with_fds`], but `None` at once when no datagram is waiting.
pub fn try_recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    match recv_with_fds_flags(fd, buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
        Ok(got) => Ok(Some(got)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

fn recv_with_fds_flags(
    fd: RawFd,
    buf: &mut [u8],
    flags: nix::sys::socket::MsgFlags,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (bytes, truncated, raw_fds) = loop {
        match recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC | flags,
        ) {
            Ok(msg) => {
                let mut raw = Vec::new();
                for cmsg in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(fds) = cmsg {
                        raw.extend(fds);
                    }
                }
                break (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC), raw);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    // SAFETY: each SCM_RIGHTS descriptor was just installed in this process
    // by the kernel and is owned by nobody else.
    let fds: Vec<OwnedFd> = raw_fds
        .into_iter()
        .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
        .collect();
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were truncated",
        ));
    }
    Ok((bytes, fds))
}

/// Waits until `fd` is readable or `timeout_ms` passes (`-1`: forever).
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    wait_fd(fd, libc::POLLIN, timeout_ms)
}

/// Waits until `fd` has one of `events` (or an error) or `timeout_ms` passes.
pub fn wait_fd(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        match cvt(ret) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Asks the kernel to send `SIGKILL` to this process when its parent dies,
/// then checks the parent has not died already (the request races with it).
pub fn die_with_parent(expected_parent: libc::pid_t) {
    // It cannot fail for SIGKILL; the check below stands either way.
    let _ = kill_with_creator_thread();
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != expected_parent {
        // SAFETY: _exit ends the process without running any Rust code.
        unsafe { libc::_exit(1) };
    }
}

/// Whether the calling thread is its process's main thread. The kernel
/// sends `PR_SET_PDEATHSIG`'s signal when the *thread* that started a child
/// ends, so a child may ask for it only when the main thread, whose end is
/// the process's end, started it.
pub fn on_main_thread() -> bool {
    // SAFETY: gettid and getpid have no preconditions.
    unsafe { libc::gettid() == libc::getpid() }
}

/// Asks for `SIGKILL` when the thread that started this process ends. Only
/// an async-signal-safe call, so it may run between fork and exec.
pub fn kill_with_creator_thread() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
    cvt(unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    })
    .map(drop)
}

/// Whether the kernel reaps this process's children as they die, discarding
/// their exit status: SIGCHLD is ignored (`SIG_IGN`) or has `SA_NOCLDWAIT`.
pub fn child_exits_discarded() -> bool {
    // SAFETY: a zeroed sigaction is a valid value to write into; with a
    // null new action, sigaction only reads the current one into it.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `current` is ours.
    let ret = unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut current) };
    ret == 0
        && (current.sa_sigaction == libc::SIG_IGN || current.sa_flags & libc::SA_NOCLDWAIT != 0)
}

/// Gives SIGCHLD its default disposition, so that this process's children
/// stay until reaped and their exit status can be read, whatever the parent
/// had set (`SIG_IGN` and `SA_NOCLDWAIT` are inherited across `exec`).
pub fn keep_child_exits() {
    // SAFETY: signal with a constant disposition; no handler runs our code.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
}

/// Whether this process has asked for a signal when its parent thread ends.
pub fn has_parent_death_signal() -> bool {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer we pass.
    let ret = unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int) };
    ret == 0 && signal != 0
}

/// A descriptor that becomes readable when `expected_parent`, this
/// process's parent, has exited (all its threads, not only the one that
/// started us). Exits at once if that process is no longer our parent: it
/// died before we could watch it. `None` on kernels without `pidfd_open`
/// (before Linux 5.3).
pub fn watch_parent(expected_parent: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, expected_parent, 0) };
    // Checked after opening: if the parent is still ours now, the descriptor
    // is the parent's and not a later process's that reused its pid.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != expected_parent {
        // SAFETY: _exit ends the process without running any Rust code.
        unsafe { libc::_exit(1) };
    }
    // SAFETY: a non-negative return is a new descriptor owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Restores default signal handling that a fork server changed, so user code
/// in a worker sees what an ordinary Rust program sees.
pub fn reset_signals_for_child() {
    // SAFETY: sigset operations on a local set, then sigprocmask and signal
    // with constant arguments; no handlers run Rust code.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // A task's own children must report how they ended, as in any
        // program, whatever the pool's parent set for itself.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        // Rust programs run with SIGPIPE ignored; keep it that way.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Duplicates `fd` onto `target`, keeping it open across exec.
pub fn dup_to(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        return set_cloexec(fd, false);
    }
    // SAFETY: dup2 on descriptors we own; `target` is replaced atomically.
    cvt(unsafe { libc::dup2(fd, target) })?;
    Ok(())
}

/// Duplicates `fd` onto `target`, close-on-exec.
pub fn dup_cloexec_to(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        return set_cloexec(fd, true);
    }
    // SAFETY: dup3 on descriptors we own; `target` is replaced atomically.
    cvt(unsafe { libc::dup3(fd, target, libc::O_CLOEXEC) })?;
    Ok(())
}

/// Closes every descriptor from `first` upwards.
pub fn close_from(first: RawFd) {
    close_range(first as u32..=u32::MAX);
}

/// Closes every descriptor in `range`.
pub fn close_range(range: std::ops::RangeInclusive<u32>) {
    let (first, last) = (*range.start(), *range.end());
    if first > last {
        return;
    }
    // SAFETY: close_range only closes descriptors; callers have moved the ones
    // they keep out of the range.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if ret != 0 {
        for fd in first..=last.min(1023) {
            // SAFETY: closing a descriptor that may not exist is harmless.
            unsafe { libc::close(fd as RawFd) };
        }
    }
}

/// An owned descriptor duplicated from a borrowed one.
pub fn dup_owned(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    dup_at_least(fd, 3)
}

/// An owned, close-on-exec duplicate of `fd` numbered `lowest` or more.
pub fn dup_at_least(fd: &impl AsRawFd, lowest: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor that we then own.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, lowest) })?;
    // SAFETY: `new` is fresh and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Appends `data` to `partial` and writes each complete line to our stderr
/// with `label` in front; with `flush`, an unfinished last line too.
pub fn write_prefixed(label: &str, partial: &mut Vec<u8>, data: &[u8], flush: bool) {
    partial.extend_from_slice(data);
    let mut out = Vec::new();
    let mut start = 0;
    while let Some(pos) = partial[start..].iter().position(|&b| b == b'\n') {
        out.extend_from_slice(label.as_bytes());
        out.extend_from_slice(&partial[start..start + pos + 1]);
        start += pos + 1;
    }
    if flush && start < partial.len() {
        out.extend_from_slice(label.as_bytes());
        out.extend_from_slice(&partial[start..]);
        out.push(b'\n');
        start = partial.len();
    }
    partial.drain(..start);
    if !out.is_empty() {
        let _ = std::io::stderr().lock().write_all(&out);
    }
}
