//! Where a lone task's round trip spends its time, step by step, in both
//! processes: `cargo bench --features stamps --bench trip_stamps`.
//!
//! The trips are those of `benches/throughput.rs`: one task (`x + 1`) at a
//! time, 2 workers, each trip after 1 ms of idleness (`LONE_IDLE_US` sets
//! another), after 200 unmeasured ones. With the `stamps` feature the
//! parent and the workers stamp each step (see `worker/src/stamps.rs`);
//! the workers write theirs when they leave, and this program lines up each
//! trip's stamps from both processes. It prints the median and p90 of each
//! step, for all trips and apart for those whose worker ran on the caller's
//! CPU and those whose worker ran on the other one, then one JSON line.
//!
//! Two of the steps are the kernel's: a write on one side until the read
//! on the other returns, which includes waking the reader. The others are
//! procpool's own code, each a few hundred instructions; what they cost
//! after the idleness is mostly cache and TLB misses.

use std::path::Path;
use std::time::Duration;

use procpool_worker::stamps::{self, Stamp, Step};

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Tiny {
    one: u64,
}

fn add_one(model: &ArchivedTiny, x: u64) -> u64 {
    x + model.one.to_native()
}

/// The steps of a trip in the order they happen, and which process stamps
/// each (true: the worker).
const PATH: [(Step, bool); 11] = [
    (Step::CallerStart, false),
    (Step::MapStart, false),
    (Step::BatchBuilt, false),
    (Step::Write, false),
    (Step::ReadDone, true),
    (Step::CallStart, true),
    (Step::CallDone, true),
    (Step::Write, true),
    (Step::ReadDone, false),
    (Step::ResultsDecoded, false),
    (Step::CallerDone, false),
];

/// Where in [`PATH`] the parent writes the batch, the worker's read of it
/// returns, and the parent's read of the results returns.
const PARENT_WRITES: usize = 3;
const WORKER_READ_DONE: usize = 4;
const PARENT_READ_DONE: usize = 8;

/// What happens between each step of [`PATH`] and the next, with a JSON key
/// and whether the kernel does it.
const SEGMENTS: [(&str, &str, bool); 10] = [
    ("caller: map starts", "map_start_us", false),
    ("parent: encodes the batch", "encode_us", false),
    ("parent: frames it, calls write", "frame_us", false),
    (
        "kernel: write, wake the worker, switch to it",
        "wake_worker_us",
        true,
    ),
    ("worker: decodes, sets the task up", "task_setup_us", false),
    ("worker: the user's function", "call_us", false),
    ("worker: encodes, calls write", "task_end_us", false),
    (
        "kernel: write, wake the parent, switch to it",
        "wake_parent_us",
        true,
    ),
    ("parent: decodes the result", "decode_us", false),
    ("parent: hands it to the caller", "return_us", false),
];

/// One trip: the time of each step of [`PATH`], and whether the worker ran
/// on the CPU the caller wrote from.
struct Trip {
    ns: [u64; PATH.len()],
    same_cpu: bool,
    /// From the parent's write to its (blocking) read of the result: on
    /// one CPU the worker runs only after that.
    write_to_read: u64,
    /// The parent's `write` call, from entry to return.
    write: u64,
}

/// Finds each trip's steps: the caller's stamps bound it, and each step is
/// the first of its kind and process after the one before.
fn trips(parent: &[Stamp], worker: &[Stamp]) -> (Vec<Trip>, usize) {
    let mut found = Vec::new();
    let mut irregular = 0;
    let starts = parent.iter().filter(|s| s.step == Step::CallerStart);
    for start in starts {
        let mut ns = [0u64; PATH.len()];
        let mut cpus = [0u32; PATH.len()];
        let mut after = start.ns;
        let mut complete = true;
        for (i, &(step, in_worker)) in PATH.iter().enumerate() {
            let side = if in_worker { worker } else { parent };
            let from = side.partition_point(|s| s.ns < after);
            match side[from..].iter().find(|s| s.step == step) {
                Some(s) => {
                    ns[i] = s.ns;
                    cpus[i] = s.cpu;
                    after = s.ns;
                }
                None => {
                    complete = false;
                    break;
                }
            }
        }
        // A trip must end before the next one starts.
        let next_start = parent[parent.partition_point(|s| s.ns <= start.ns)..]
            .iter()
            .find(|s| s.step == Step::CallerStart)
            .map_or(u64::MAX, |s| s.ns);
        let after_write = &parent[parent.partition_point(|s| s.ns <= ns[PARENT_WRITES])..];
        let read = after_write
            .iter()
            .find(|s| s.step == Step::Read && s.ns <= ns[PARENT_READ_DONE]);
        let write_done = after_write.iter().find(|s| s.step == Step::WriteDone);
        if let (true, true, Some(read), Some(write_done)) =
            (complete, ns[PATH.len() - 1] < next_start, read, write_done)
        {
            found.push(Trip {
                ns,
                same_cpu: cpus[PARENT_WRITES] == cpus[WORKER_READ_DONE],
                write_to_read: read.ns - ns[PARENT_WRITES],
                write: write_done.ns - ns[PARENT_WRITES],
            });
        } else {
            irregular += 1;
        }
    }
    (found, irregular)
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() as f64 - 1.0) * q).round() as usize]
}

/// Median and p90 (µs) of `f` over `trips`.
fn stats(trips: &[&Trip], f: impl Fn(&Trip) -> u64) -> (f64, f64) {
    let mut v: Vec<f64> = trips.iter().map(|t| f(t) as f64 / 1e3).collect();
    (quantile(&mut v, 0.5), quantile(&mut v, 0.9))
}

fn segment(t: &Trip, i: usize) -> u64 {
    t.ns[i + 1].saturating_sub(t.ns[i])
}

fn ours(t: &Trip) -> u64 {
    (0..SEGMENTS.len())
        .filter(|&i| !SEGMENTS[i].2)
        .map(|i| segment(t, i))
        .sum()
}

fn total(t: &Trip) -> u64 {
    t.ns[PATH.len() - 1] - t.ns[0]
}

fn read_worker_stamps(dir: &Path) -> Result<Vec<Stamp>, Box<dyn std::error::Error>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        all.extend(stamps::read_file(&entry?.path())?);
    }
    all.sort_by_key(|s| s.ns);
    Ok(all)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // SAFETY: the first statement of `main`: no other thread exists yet to
    // read the environment. The fork server, started next, passes it on to
    // every worker.
    unsafe { std::env::set_var(stamps::DIR_ENV, dir.path()) };
    procpool::init();
    let idle = std::env::var("LONE_IDLE_US")
        .ok()
        .map(|v| v.parse().map_err(|e| format!("LONE_IDLE_US={v}: {e}")))
        .transpose()?
        .map_or(Duration::from_millis(1), Duration::from_micros);
    let lone = 2_000u64;
    let store = procpool::persist(&Tiny { one: 1 })?;
    let mut inv = procpool::invoker(&store, add_one, 2)?;
    // As in the throughput benchmark: busy maps, then unmeasured lone trips
    // until the scheduler has put the worker back beside the caller.
    for _ in 0..3 {
        inv.map(0..100_000u64).try_for_each(|r| r.map(drop))?;
    }
    for i in 0..200 {
        std::thread::sleep(idle);
        inv.map(std::iter::once(i)).next().ok_or("no result")??;
    }
    stamps::take();
    for i in 0..lone {
        std::thread::sleep(idle);
        stamps::stamp(Step::CallerStart);
        let r = inv.map(std::iter::once(i)).next().ok_or("no result")??;
        stamps::stamp(Step::CallerDone);
        assert_eq!(r, i + 1);
    }
    let mut parent = stamps::take();
    // In the order of the clock, should another thread have stamped too.
    parent.sort_by_key(|s| s.ns);
    // The workers write their stamps as they leave.
    inv.shutdown();
    let worker = read_worker_stamps(dir.path())?;
    let (trips, irregular) = trips(&parent, &worker);
    if trips.is_empty() {
        return Err(format!("no complete trip among {lone} ({irregular} irregular)").into());
    }

    let all: Vec<&Trip> = trips.iter().collect();
    let same: Vec<&Trip> = trips.iter().filter(|t| t.same_cpu).collect();
    let other: Vec<&Trip> = trips.iter().filter(|t| !t.same_cpu).collect();
    println!(
        "lone trips after {idle:?} idle: {} complete ({} with the worker on the caller's CPU, {} on the other), {irregular} not",
        all.len(),
        same.len(),
        other.len()
    );
    println!(
        "{:48} {:>17} {:>17} {:>17}",
        "µs, median / p90", "all", "same CPU", "other CPU"
    );
    let row = |name: &str, f: &dyn Fn(&Trip) -> u64| {
        let cell = |group: &[&Trip]| {
            let (m, p) = stats(group, f);
            format!("{m:>8.2} / {p:>6.2}")
        };
        println!(
            "{name:48} {:>17} {:>17} {:>17}",
            cell(&all),
            cell(&same),
            cell(&other)
        );
    };
    for (i, (name, _, _)) in SEGMENTS.iter().enumerate() {
        row(name, &|t| segment(t, i));
    }
    println!("below: not steps of the trip, but parts of or sums of them");
    row("parent: its write", &|t| t.write);
    row("parent: from its write to its read", &|t| t.write_to_read);
    row("procpool's code (all but the kernel's two steps)", &ours);
    row("whole trip", &total);

    let mut json = format!(
        "{{\"bench\":\"trip_stamps\",\"idle_us\":{},\"trips\":{},\"same_cpu\":{}",
        idle.as_micros(),
        all.len(),
        same.len()
    );
    for (i, (_, key, _)) in SEGMENTS.iter().enumerate() {
        json += &format!(",\"{key}\":{:.2}", stats(&all, |t| segment(t, i)).0);
    }
    json += &format!(
        ",\"write_to_read_us\":{:.2},\"procpool_code_us\":{:.2},\"total_us\":{:.2}}}",
        stats(&all, |t| t.write_to_read).0,
        stats(&all, ours).0,
        stats(&all, total).0
    );
    println!("{json}");
    Ok(())
}
