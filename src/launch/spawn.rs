//! `StartMethod::Spawn`: re-execute this program as a worker.

use super::NewWorker;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use procpool_worker::sys;
use procpool_worker::wire::ROLE_ENV;

use super::{Reaper, StderrTail};
use crate::error::PoolError;

pub(super) fn spawn(new_worker: NewWorker<'_>) -> Result<(u32, Reaper), PoolError> {
    let (label, link, status, model) = new_worker.into_parts();
    let fds = [
        link.read.as_raw_fd(),
        link.write.as_raw_fd(),
        status.map_or(-1, |s| s.as_raw_fd()),
        model.map_or(-1, |m| m.as_raw_fd()),
    ];
    let role = format!(
        "worker:3:4:{}:{}:{}",
        if status.is_some() { "5" } else { "-1" },
        if model.is_some() { "6" } else { "-1" },
        std::process::id()
    );
    let death_signal = sys::on_main_thread();
    let mut command = Command::new("/proc/self/exe");
    command
        .env(ROLE_ENV, role)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the hook runs between fork and exec and calls only fcntl, dup2
    // and prctl, which are async-signal-safe. It moves the descriptors out
    // of the way, then places them at 3, 4, 5 and 6 (dup2 clears
    // close-on-exec), and asks for SIGKILL when the thread starting the
    // worker ends if that thread is the main one (else the worker watches
    // this process itself).
    unsafe {
        command.pre_exec(move || {
            if death_signal {
                sys::kill_with_creator_thread()?;
            }
            let mut high = [-1; 4];
            for (slot, fd) in high.iter_mut().zip(fds) {
                if fd < 0 {
                    continue;
                }
                // Close-on-exec: these copies only make room and must not
                // reach the worker.
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, fd) in (3..).zip(high) {
                if fd >= 0 && libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| PoolError::io("re-execute this program as a worker", e))?;
    drop(link);
    let mut tail = None;
    if let Some(mut stderr) = child.stderr.take() {
        let label = label.to_string();
        let (kept, writer) = StderrTail::new();
        let pump = move || {
            let mut partial = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            loop {
                match stderr.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        sys::write_prefixed(&label, &mut partial, &buf[..n], false);
                        writer.remember(&buf[..n]);
                    }
                }
            }
            sys::write_prefixed(&label, &mut partial, &[], true);
            drop(writer);
        };
        std::thread::Builder::new()
            .name("procpool-stderr".into())
            .spawn(pump)
            .map_err(|e| PoolError::io("start a stderr reader thread", e))?;
        tail = Some(kept);
    }
    Ok((child.id(), Reaper::Child { child, tail }))
}
