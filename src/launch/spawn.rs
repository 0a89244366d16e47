//! `StartMethod::Spawn`: re-execute this program as a worker.

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use procpool_worker::protocol::ROLE_ENV;
use procpool_worker::sys;

use super::Reaper;
use crate::error::PoolError;

pub(super) fn spawn(
    label: &str,
    link: OwnedFd,
    model: BorrowedFd<'_>,
) -> Result<(u32, Reaper), PoolError> {
    let (link_fd, model_fd) = (link.as_raw_fd(), model.as_raw_fd());
    let mut command = Command::new("/proc/self/exe");
    command
        .env(ROLE_ENV, "worker:3:4")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the hook runs between fork and exec and calls only dup2 and
    // fcntl, which are async-signal-safe. It places the link at 3 and the
    // model at 4 (moving the link out of the way first if it sits at 4).
    unsafe {
        command.pre_exec(move || {
            let mut link = link_fd;
            if link == 4 {
                link = libc::fcntl(link, libc::F_DUPFD, 10);
                if link < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::dup2(model_fd, 4) < 0 || libc::dup2(link, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 onto the same number keeps close-on-exec; clear it.
            libc::fcntl(3, libc::F_SETFD, 0);
            libc::fcntl(4, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| PoolError::io("re-execute this program as a worker", e))?;
    drop(link);
    if let Some(mut stderr) = child.stderr.take() {
        let label = label.to_string();
        let pump = move || {
            let mut partial = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            loop {
                match stderr.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sys::write_prefixed(&label, &mut partial, &buf[..n], false),
                }
            }
            sys::write_prefixed(&label, &mut partial, &[], true);
        };
        std::thread::Builder::new()
            .name("procpool-stderr".into())
            .spawn(pump)
            .map_err(|e| PoolError::io("start a stderr reader thread", e))?;
    }
    Ok((child.id(), Reaper::Child(child)))
}
