//! Would another way of waking a worker make a lone task faster? The same
//! lone round trip as `throughput` measures, done bare (no procpool) over
//! three mechanisms a parent can use to wake a blocked child and be woken
//! back:
//!
//! - a pipe pair carrying the 64-byte message (what procpool uses);
//! - two eventfds as doorbells, the message in a shared page;
//! - two futex words in a shared page, the message beside them.
//!
//! `cargo bench --bench doorbells` prints a table, then as its last line one
//! JSON object: `{"bench":"doorbells","idle_us":…,"pipe_us":…,
//! "pipe_p99_us":…,"eventfd_us":…,"eventfd_p99_us":…,"futex_us":…,
//! "futex_p99_us":…}` (medians; p99 over all trips). The mechanisms take
//! turns in blocks of 100 trips, so all three see the same minutes of the
//! machine. Each trip follows 1 ms of idleness; `LONE_IDLE_US` sets another
//! length.

mod echo;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Bytes of the message each trip carries each way.
const MESSAGE: usize = 64;
/// Where the message lies in the shared page, past the futex words.
const MESSAGE_AT: usize = 64;
/// Where the child copies its reply.
const REPLY_AT: usize = 128;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One shared, zeroed page, mapped before the fork so both processes see it.
struct SharedPage(*mut u8);

impl SharedPage {
    fn new() -> std::io::Result<SharedPage> {
        // SAFETY: a fresh anonymous shared mapping of one page; nothing else
        // refers to that address range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SharedPage(ptr.cast()))
    }

    /// The futex word at byte `at` (a multiple of 4 below 64).
    fn word(&self, at: usize) -> &AtomicU32 {
        // SAFETY: the page is mapped for the life of `self`, zero-filled
        // (a valid AtomicU32), and `at` is aligned and inside it.
        unsafe { &*(self.0.add(at) as *const AtomicU32) }
    }

    /// Copies the message to where the child reads it.
    fn put_message(&self, message: &[u8; MESSAGE]) {
        // SAFETY: MESSAGE_AT..MESSAGE_AT + MESSAGE lies inside the page, and
        // the child reads it only after the doorbell that follows.
        unsafe { std::ptr::copy_nonoverlapping(message.as_ptr(), self.0.add(MESSAGE_AT), MESSAGE) };
    }

    /// Copies the message to the reply's place, as the echoing child does.
    fn echo_message(&self) {
        // SAFETY: both ranges lie inside the page and do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.0.add(MESSAGE_AT), self.0.add(REPLY_AT), MESSAGE)
        };
    }

    /// Copies the reply out.
    fn take_reply(&self, message: &mut [u8; MESSAGE]) {
        // SAFETY: REPLY_AT..REPLY_AT + MESSAGE lies inside the page, written
        // by the child before the doorbell we waited for.
        unsafe {
            std::ptr::copy_nonoverlapping(self.0.add(REPLY_AT), message.as_mut_ptr(), MESSAGE)
        };
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `new`; no reference to it
        // outlives `self`.
        unsafe { libc::munmap(self.0.cast(), 4096) };
    }
}

/// Forks a child that runs `body` and then exits; the child also dies with
/// this process, so a failed benchmark leaves nothing behind.
fn fork_child(body: impl FnOnce()) -> std::io::Result<libc::pid_t> {
    // SAFETY: this benchmark starts no threads before forking, and the
    // child runs only `body`, which makes system calls and touches memory
    // mapped before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: prctl and _exit are plain system calls.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        body();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    Ok(pid)
}

/// A child blocked in `read` on an eventfd; the message is in a shared page.
struct EventfdEcho {
    page: SharedPage,
    ring: libc::c_int,
    answer: libc::c_int,
    pid: libc::pid_t,
}

impl EventfdEcho {
    fn start() -> std::io::Result<EventfdEcho> {
        let page = SharedPage::new()?;
        // SAFETY: eventfd creates a descriptor or returns -1.
        let ring = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        // SAFETY: as above.
        let answer = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if ring < 0 || answer < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pid = fork_child(|| {
            let mut count = 0u64;
            loop {
                // SAFETY: reading 8 bytes into a u64 we own.
                if unsafe { libc::read(ring, (&raw mut count).cast(), 8) } != 8 {
                    return;
                }
                page.echo_message();
                count = 1;
                // SAFETY: writing 8 bytes from a u64 we own.
                unsafe { libc::write(answer, (&raw const count).cast(), 8) };
            }
        })?;
        Ok(EventfdEcho {
            page,
            ring,
            answer,
            pid,
        })
    }

    fn trip(&self) -> f64 {
        let mut message = [7u8; MESSAGE];
        let mut count = 1u64;
        let start = Instant::now();
        self.page.put_message(&message);
        // SAFETY: 8-byte reads and writes of a u64 we own, on our eventfds.
        unsafe {
            libc::write(self.ring, (&raw const count).cast(), 8);
            libc::read(self.answer, (&raw mut count).cast(), 8);
        }
        self.page.take_reply(&mut message);
        start.elapsed().as_secs_f64() * 1e6
    }
}

impl Drop for EventfdEcho {
    fn drop(&mut self) {
        // SAFETY: the child never ends its loop on its own, so kill it, reap
        // it, then close our descriptors.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            libc::close(self.ring);
            libc::close(self.answer);
        }
    }
}

/// Word counting the parent's requests; `u32::MAX` tells the child to end.
const REQUESTS: usize = 0;
/// Word counting the child's replies.
const REPLIES: usize = 4;

fn futex_wait(word: &AtomicU32, seen: u32) {
    // SAFETY: FUTEX_WAIT reads the word at a valid, aligned address and
    // sleeps only while it still holds `seen`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            seen,
            std::ptr::null::<libc::timespec>(),
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned address wakes at most one waiter.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1) };
}

/// A child blocked in `FUTEX_WAIT` on a word of a shared page.
struct FutexEcho {
    page: SharedPage,
    pid: libc::pid_t,
}

impl FutexEcho {
    fn start() -> std::io::Result<FutexEcho> {
        let page = SharedPage::new()?;
        let pid = fork_child(|| {
            let requests = page.word(REQUESTS);
            let mut seen = 0;
            loop {
                let now = requests.load(Ordering::Acquire);
                if now == seen {
                    futex_wait(requests, seen);
                    continue;
                }
                if now == u32::MAX {
                    return;
                }
                seen = now;
                page.echo_message();
                page.word(REPLIES).fetch_add(1, Ordering::Release);
                futex_wake(page.word(REPLIES));
            }
        })?;
        Ok(FutexEcho { page, pid })
    }

    fn trip(&self) -> f64 {
        let mut message = [7u8; MESSAGE];
        let (requests, replies) = (self.page.word(REQUESTS), self.page.word(REPLIES));
        let start = Instant::now();
        let before = replies.load(Ordering::Acquire);
        self.page.put_message(&message);
        requests.fetch_add(1, Ordering::Release);
        futex_wake(requests);
        while replies.load(Ordering::Acquire) == before {
            futex_wait(replies, before);
        }
        self.page.take_reply(&mut message);
        start.elapsed().as_secs_f64() * 1e6
    }
}

impl Drop for FutexEcho {
    fn drop(&mut self) {
        self.page.word(REQUESTS).store(u32::MAX, Ordering::Release);
        futex_wake(self.page.word(REQUESTS));
        // SAFETY: reaping our own child, which now ends its loop.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let trips = 2_000;
    let block = 100;
    let idle = std::env::var("LONE_IDLE_US")
        .ok()
        .map(|v| v.parse().map_err(|e| format!("LONE_IDLE_US={v}: {e}")))
        .transpose()?
        .map_or(Duration::from_millis(1), Duration::from_micros);
    // Every child is forked before anything else runs: no thread exists.
    // The pipe's child comes last, so no other child holds a copy of its
    // pipe and it sees end of file when `pipe` is dropped.
    let eventfd = EventfdEcho::start()?;
    let futex = FutexEcho::start()?;
    let pipe = echo::PipeEcho::start()?;
    let names = ["pipe", "eventfd", "futex"];
    let mechanisms: [&dyn Fn() -> f64; 3] = [&|| pipe.trip(), &|| eventfd.trip(), &|| futex.trip()];
    // Unmeasured warm-up, as in `throughput`: the scheduler settles each
    // child on the vCPU it shares with this process.
    for _ in 0..200 {
        for trip in &mechanisms {
            std::thread::sleep(idle);
            trip();
        }
    }
    let mut times: [Vec<f64>; 3] = Default::default();
    for _ in (0..trips).step_by(block) {
        for (trip, times) in mechanisms.iter().zip(&mut times) {
            for _ in 0..block {
                std::thread::sleep(idle);
                times.push(trip());
            }
        }
    }
    drop((pipe, eventfd, futex));

    println!(
        "lone round trip, {trips} per mechanism, each after {idle:?} idle, alternating blocks of {block}"
    );
    println!("µs               median      p90      p99   median / pipe's");
    let mut figures = Vec::new();
    let mut pipe_median = f64::NAN;
    for (name, times) in names.iter().zip(&mut times) {
        let (median, p90, p99) = (
            percentile(times, 0.5),
            percentile(times, 0.9),
            percentile(times, 0.99),
        );
        if *name == "pipe" {
            pipe_median = median;
        }
        println!(
            "{name:<12} {median:>10.2} {p90:>8.2} {p99:>8.2} {:>12.2}",
            median / pipe_median
        );
        figures.push(format!(
            "\"{name}_us\":{median:.2},\"{name}_p99_us\":{p99:.1}"
        ));
    }
    println!(
        "{{\"bench\":\"doorbells\",\"idle_us\":{},{}}}",
        idle.as_micros(),
        figures.join(",")
    );
    Ok(())
}
