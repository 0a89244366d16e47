//! The seeds' streaming patterns: a processor with a collector, map-reduce,
//! and a fold on each backend.
//!
//! `cargo bench --bench patterns` prints a table, then as its last line one
//! JSON object: `{"bench":"patterns","processor_tasks_per_s":…,
//! "processor_parent_cpu_pct_waiting":…,"map_reduce_items_per_s":…,
//! "map_then_sum_items_per_s":…,"fold_items_per_s_processes":…,
//! "fold_items_per_s_threads":…,"fold_items_per_s_sequential":…,
//! "processor_speedup_1ms":…,"map_reduce_speedup_1ms":…}`:
//!
//! - the processor with 1,000,000 trivial tasks added one by one, 2 workers;
//! - this process's CPU time over wall time while a processor's 2 workers
//!   run 200 tasks of 10 ms of sleep;
//! - map-reduce summing 10,000,000 `u64`, 2 workers, against a `Pool` map
//!   of the same items summed here, in the same run;
//! - a fold of 10,000,000 `u64` by `+`, chunks of 100,000, on each backend;
//! - with 1 ms of CPU work per item (400 items), the processor's and
//!   map-reduce's rate with 2 jobs over their rate with 1.
//!
//! Each figure is the median of 5 repetitions.

use std::time::{Duration, Instant};

use procpool::{Processes, Sequential, Threads};

fn identity(x: u64) -> u64 {
    x
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

fn nap(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(10));
    x
}

/// About 1 ms of CPU work.
fn work_1ms(x: u64) -> u64 {
    let start = Instant::now();
    let mut h = x;
    while start.elapsed() < Duration::from_millis(1) {
        for _ in 0..100 {
            h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
        }
    }
    std::hint::black_box(h) & 1
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU seconds this process has used (all its threads).
fn cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe_zeroed_rusage();
    // SAFETY: getrusage writes one rusage we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn unsafe_zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

fn processor_rate(mapper: fn(u64) -> u64, n_jobs: usize, tasks: u64) -> f64 {
    let mut sum = 0u64;
    let started = Instant::now();
    let mut pp = procpool::processor(mapper, n_jobs, |_, r: Result<u64, _>| {
        sum = sum.wrapping_add(r.unwrap_or(0));
    })
    .unwrap();
    for x in 0..tasks {
        pp.add_task(x).unwrap();
    }
    pp.join().unwrap();
    std::hint::black_box(sum);
    tasks as f64 / started.elapsed().as_secs_f64()
}

fn map_reduce_rate(mapper: fn(u64) -> u64, n_jobs: usize, items: u64) -> f64 {
    let mut mr = procpool::map_reduce(mapper, add, n_jobs).unwrap();
    let started = Instant::now();
    std::hint::black_box(mr.run(0..items).unwrap());
    items as f64 / started.elapsed().as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    let reps = 5;
    let processor_tasks_per_s = median(
        (0..reps)
            .map(|_| processor_rate(identity, 2, 1_000_000))
            .collect(),
    );

    let mut cpu_pct = Vec::new();
    for _ in 0..reps {
        let mut pp = procpool::ProcessorBuilder::new(nap)
            .n_jobs(2)
            .chunk_size(1)
            .build(|_, r: Result<u64, _>| {
                r.unwrap();
            })?;
        let (cpu0, wall0) = (cpu_seconds(), Instant::now());
        for x in 0..200 {
            pp.add_task(x)?;
        }
        pp.join()?;
        cpu_pct.push(100.0 * (cpu_seconds() - cpu0) / wall0.elapsed().as_secs_f64());
    }
    let processor_parent_cpu_pct_waiting = median(cpu_pct);

    let items = 10_000_000u64;
    let map_reduce_items_per_s = median(
        (0..reps)
            .map(|_| map_reduce_rate(identity, 2, items))
            .collect(),
    );
    let mut pool = procpool::pool(identity, 2)?;
    let map_then_sum_items_per_s = median(
        (0..reps)
            .map(|_| {
                let started = Instant::now();
                let sum: u64 = pool.map(0..items).map(|r| r.unwrap()).sum();
                std::hint::black_box(sum);
                items as f64 / started.elapsed().as_secs_f64()
            })
            .collect(),
    );

    let fold_rate = |run: &mut dyn FnMut() -> u64| {
        median(
            (0..reps)
                .map(|_| {
                    let started = Instant::now();
                    assert_eq!(run(), items * (items - 1) / 2);
                    items as f64 / started.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let mut processes = Processes::new(2);
    let fold_items_per_s_processes =
        fold_rate(&mut || procpool::fold(&mut processes, add, 0..items, 0, 100_000, add).unwrap());
    let mut threads = Threads::new(2);
    let fold_items_per_s_threads =
        fold_rate(&mut || procpool::fold(&mut threads, add, 0..items, 0, 100_000, add).unwrap());
    let fold_items_per_s_sequential =
        fold_rate(&mut || procpool::fold(&mut Sequential, add, 0..items, 0, 100_000, add).unwrap());

    let speedup = |rate: &dyn Fn(usize) -> f64| median((0..3).map(|_| rate(2) / rate(1)).collect());
    let processor_speedup_1ms = speedup(&|n| processor_rate(work_1ms, n, 400));
    let map_reduce_speedup_1ms = speedup(&|n| map_reduce_rate(work_1ms, n, 400));

    println!("patterns, 2 workers, medians of {reps}");
    println!(
        "  processor, 1,000,000 trivial tasks     {:>14.0} tasks/s",
        processor_tasks_per_s
    );
    println!(
        "  processor, parent CPU while waiting    {:>14.2} % of a core",
        processor_parent_cpu_pct_waiting
    );
    println!(
        "  map-reduce sum of 10,000,000 u64       {:>14.0} items/s",
        map_reduce_items_per_s
    );
    println!(
        "  pool map, summed here, same items      {:>14.0} items/s",
        map_then_sum_items_per_s
    );
    println!(
        "  fold, processes                        {:>14.0} items/s",
        fold_items_per_s_processes
    );
    println!(
        "  fold, threads                          {:>14.0} items/s",
        fold_items_per_s_threads
    );
    println!(
        "  fold, sequential                       {:>14.0} items/s",
        fold_items_per_s_sequential
    );
    println!(
        "  1 ms per item, 2 jobs over 1: processor {processor_speedup_1ms:.2}, map-reduce {map_reduce_speedup_1ms:.2}"
    );
    println!(
        "{{\"bench\":\"patterns\",\"processor_tasks_per_s\":{processor_tasks_per_s:.0},\
         \"processor_parent_cpu_pct_waiting\":{processor_parent_cpu_pct_waiting:.2},\
         \"map_reduce_items_per_s\":{map_reduce_items_per_s:.0},\
         \"map_then_sum_items_per_s\":{map_then_sum_items_per_s:.0},\
         \"fold_items_per_s_processes\":{fold_items_per_s_processes:.0},\
         \"fold_items_per_s_threads\":{fold_items_per_s_threads:.0},\
         \"fold_items_per_s_sequential\":{fold_items_per_s_sequential:.0},\
         \"processor_speedup_1ms\":{processor_speedup_1ms:.2},\
         \"map_reduce_speedup_1ms\":{map_reduce_speedup_1ms:.2}}}"
    );
    Ok(())
}
