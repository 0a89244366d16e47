//! Bare echo children: the mechanism a lone task's round trip is made of,
//! without procpool, for benchmarks to measure beside procpool's own.

use std::time::Instant;

/// A forked child that echoes 64-byte messages over a pipe pair: the bare
/// mechanism a lone task's round trip is made of.
pub(crate) struct PipeEcho {
    to_child: libc::c_int,
    from_child: libc::c_int,
    pid: libc::pid_t,
}

impl PipeEcho {
    pub(crate) fn start() -> std::io::Result<PipeEcho> {
        let mut a = [0; 2];
        let mut b = [0; 2];
        // SAFETY: pipe writes two descriptors into each array.
        if unsafe { libc::pipe(a.as_mut_ptr()) } != 0 || unsafe { libc::pipe(b.as_mut_ptr()) } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the child calls only read, write and _exit, which are
        // async-signal-safe, so forking this multi-threaded process is sound.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            let mut buf = [0u8; 64];
            // SAFETY: async-signal-safe calls on descriptors this process
            // owns: keep our two pipe ends as 3 and 4, close the rest (so
            // closing the parent's ends is seen here, and nobody else's
            // descriptors stay open), then echo until end of file.
            unsafe {
                libc::dup2(a[0], 100);
                libc::dup2(b[1], 101);
                libc::dup2(100, 3);
                libc::dup2(101, 4);
                libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32);
                loop {
                    if libc::read(3, buf.as_mut_ptr().cast(), 64) <= 0 {
                        libc::_exit(0);
                    }
                    libc::write(4, buf.as_ptr().cast(), 64);
                }
            }
        }
        // SAFETY: closing the child's ends, which this process no longer needs.
        unsafe {
            libc::close(a[0]);
            libc::close(b[1]);
        }
        Ok(PipeEcho {
            to_child: a[1],
            from_child: b[0],
            pid,
        })
    }

    /// One round trip, in µs.
    pub(crate) fn trip(&self) -> f64 {
        let mut buf = [7u8; 64];
        let start = Instant::now();
        // SAFETY: writing and reading a buffer we own on our pipe ends.
        unsafe {
            libc::write(self.to_child, buf.as_ptr().cast(), 64);
            libc::read(self.from_child, buf.as_mut_ptr().cast(), 64);
        }
        start.elapsed().as_secs_f64() * 1e6
    }
}

impl Drop for PipeEcho {
    fn drop(&mut self) {
        // SAFETY: closing our ends ends the child's loop; then reap it.
        unsafe {
            libc::close(self.to_child);
            libc::close(self.from_child);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}
