//! What the machine itself does to a running program, measured beside the
//! figures of a benchmark so that a reader can tell the two apart.

use std::time::{Duration, Instant};

/// How often the machine stopped a thread that never blocks: on a shared
/// VM, the host (or a kernel thread) now and then runs in its place for up
/// to a few milliseconds, whatever the program does.
pub(crate) struct Stalls {
    /// Stops of over 100 µs, per second, per CPU.
    pub over_100us_per_s: f64,
    /// Stops of over 1 ms, per second, per CPU.
    pub over_1ms_per_s: f64,
    /// Share of the time the threads did not run, in percent (gaps of over
    /// 20 µs between two readings of the clock).
    pub(crate) stalled_pct: f64,
    /// The longest stop, in ms.
    pub(crate) longest_ms: f64,
}

impl Stalls {
    /// One line comparing two measurements, one taken before and one after
    /// a benchmark's figures.
    pub(crate) fn describe_pair(before: &Stalls, after: &Stalls) -> String {
        format!(
            "machine (2 s before and after): stops of over 100 µs {:.1} and {:.1} per s per CPU, \
             over 1 ms {:.1} and {:.1}; {:.1}% and {:.1}% of the time stopped; longest {:.1} and {:.1} ms",
            before.over_100us_per_s,
            after.over_100us_per_s,
            before.over_1ms_per_s,
            after.over_1ms_per_s,
            before.stalled_pct,
            after.stalled_pct,
            before.longest_ms,
            after.longest_ms
        )
    }
}

/// One thread per CPU this process may use, each held to its CPU, reads the
/// clock for `duration` without ever blocking; a gap between two readings is
/// time the machine gave to someone else. The CPUs are busy meanwhile, so
/// call this between measurements, not during one.
pub(crate) fn machine_stalls(duration: Duration) -> Stalls {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, which
    // sched_getaffinity fills in.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size passed is that of `allowed`.
    let got = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) };
    let mut cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| got == 0 && unsafe { libc::CPU_ISSET(cpu, &allowed) })
        .collect();
    if cpus.is_empty() {
        // No affinity to read: spin on as many threads as there are CPUs,
        // wherever they run.
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        cpus = (0..n).collect();
    }
    let per_cpu: Vec<Spun> = std::thread::scope(|s| {
        let threads: Vec<_> = cpus
            .iter()
            .map(|&cpu| s.spawn(move || spin_on(cpu, duration)))
            .collect();
        threads.into_iter().filter_map(|t| t.join().ok()).collect()
    });
    let cpu_secs = duration.as_secs_f64() * per_cpu.len().max(1) as f64;
    let per_s = |count: fn(&Spun) -> u64| per_cpu.iter().map(count).sum::<u64>() as f64 / cpu_secs;
    Stalls {
        over_100us_per_s: per_s(|p| p.over_100us),
        over_1ms_per_s: per_s(|p| p.over_1ms),
        stalled_pct: 100.0 * per_cpu.iter().map(|p| p.stalled.as_secs_f64()).sum::<f64>()
            / cpu_secs,
        longest_ms: per_cpu
            .iter()
            .map(|p| p.longest)
            .max()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3,
    }
}

/// What one spinning thread saw.
#[derive(Default)]
struct Spun {
    over_100us: u64,
    over_1ms: u64,
    stalled: Duration,
    longest: Duration,
}

/// Spins on `cpu` for `duration`, counting the gaps. If the thread cannot
/// be held to `cpu`, it spins wherever the scheduler puts it.
fn spin_on(cpu: usize, duration: Duration) -> Spun {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET adds to it a
    // CPU below CPU_SETSIZE.
    unsafe {
        let mut only: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut only);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &only);
    }
    let mut spun = Spun::default();
    let start = Instant::now();
    let mut last = start;
    while last - start < duration {
        let now = Instant::now();
        let gap = now - last;
        if gap > Duration::from_micros(20) {
            spun.stalled += gap;
            spun.longest = spun.longest.max(gap);
            spun.over_100us += u64::from(gap > Duration::from_micros(100));
            spun.over_1ms += u64::from(gap > Duration::from_millis(1));
        }
        last = now;
    }
    spun
}
