//! One isolated call (`run_sp`) of a trivial function, from a parent that
//! holds 1 GiB of its own memory (forking such a parent directly costs
//! about 30 ms; the fork server does not grow with it).
//!
//! `cargo bench --bench run_sp` prints a summary, then as its last line one
//! JSON object: `{"bench":"run_sp","median_ms":…,"p99_ms":…,
//! "floor_median_ms":…,"floor_p99_ms":…}`. The floor is the bare mechanism,
//! measured interleaved with the calls so both see the same machine: a
//! minimal fork server (forked before anything else, from this program)
//! that forks a child per request; the child computes the same function and
//! writes 8 bytes into a pipe whose write end came with the request.
//!
//! Before and after the calls, the benchmark also measures for 2 s how often
//! the machine stops a thread that never blocks (see `common`), and adds to
//! the JSON object `"stalls_over_1ms_per_s":…,"stalled_pct":…` (the mean of
//! both measurements): on a shared VM such stops, not the program, make
//! most of the p99.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use procpool_worker::sys;

fn add_one(x: u64) -> u64 {
    x + 1
}

/// The bare mechanism: a fork server that knows one function and nothing
/// about errors, logs, seeds, timeouts or memory limits.
struct BareForkServer {
    link: OwnedFd,
}

impl BareForkServer {
    /// Forks the server. Call it while this process has one thread.
    fn start() -> std::io::Result<BareForkServer> {
        let (ours, theirs) = sys::socket_pair(libc::SOCK_SEQPACKET)?;
        // SAFETY: the process is single-threaded here (nothing has started a
        // thread yet), so the child may run any code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            drop(ours);
            // SAFETY: plain libc calls on our own state; SIGCHLD ignored
            // makes the kernel reap the children.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            }
            let mut arg = [0u8; 8];
            loop {
                let Ok((8, fds)) = sys::recv_with_fds(theirs.as_raw_fd(), &mut arg) else {
                    // SAFETY: _exit ends the process at once.
                    unsafe { libc::_exit(0) };
                };
                // SAFETY: as above, single-threaded.
                if unsafe { libc::fork() } == 0 {
                    let reply = add_one(u64::from_le_bytes(arg)).to_le_bytes();
                    // SAFETY: writing our buffer to the pipe we were given.
                    unsafe {
                        libc::write(fds[0].as_raw_fd(), reply.as_ptr().cast(), 8);
                        libc::_exit(0);
                    }
                }
            }
        }
        Ok(BareForkServer { link: ours })
    }

    fn call(&self, x: u64) -> std::io::Result<u64> {
        let (read, write) = sys::pipe()?;
        sys::send_with_fds(
            self.link.as_raw_fd(),
            &x.to_le_bytes(),
            &[write.as_raw_fd()],
        )?;
        drop(write);
        let mut reply = [0u8; 8];
        // SAFETY: reading into our buffer from our pipe end.
        let n = unsafe { libc::read(read.as_raw_fd(), reply.as_mut_ptr().cast(), 8) };
        if n != 8 {
            return Err(std::io::Error::other("the bare fork server did not answer"));
        }
        Ok(u64::from_le_bytes(reply))
    }
}

fn median_and_p99(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let p99 = times[(times.len() as f64 * 0.99) as usize - 1];
    (median, p99)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bare = BareForkServer::start()?;
    procpool::init();
    // 1 GiB of private memory, every page touched.
    let ballast: Vec<u8> = vec![1u8; 1 << 30];
    let calls = 1_000;
    for i in 0..20 {
        procpool::run_sp(add_one, i)?;
        bare.call(i)?;
    }
    let before = common::machine_stalls(Duration::from_secs(2));
    let mut times = Vec::with_capacity(calls);
    let mut floor = Vec::with_capacity(calls);
    for i in 0..calls as u64 {
        let start = Instant::now();
        let r = procpool::run_sp(add_one, i)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r, i + 1);
        let start = Instant::now();
        let r = bare.call(i)?;
        floor.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r, i + 1);
    }
    let after = common::machine_stalls(Duration::from_secs(2));
    let stalls_per_s = (before.over_1ms_per_s + after.over_1ms_per_s) / 2.0;
    let stalled_pct = (before.stalled_pct + after.stalled_pct) / 2.0;
    let (median, p99) = median_and_p99(times);
    let (floor_median, floor_p99) = median_and_p99(floor);
    println!(
        "run_sp: {calls} isolated calls of a trivial function, parent holding {} MiB",
        ballast.len() >> 20
    );
    println!("  run_sp            median {median:.3} ms, p99 {p99:.3} ms");
    println!(
        "  bare fork server  median {floor_median:.3} ms, p99 {floor_p99:.3} ms (interleaved)"
    );
    println!("  {}", common::Stalls::describe_pair(&before, &after));
    println!(
        "{{\"bench\":\"run_sp\",\"median_ms\":{median:.3},\"p99_ms\":{p99:.3},\"floor_median_ms\":{floor_median:.3},\"floor_p99_ms\":{floor_p99:.3},\"stalls_over_1ms_per_s\":{stalls_per_s:.2},\"stalled_pct\":{stalled_pct:.2}}}"
    );
    std::hint::black_box(&ballast);
    Ok(())
}
