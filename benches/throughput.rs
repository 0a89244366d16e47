//! Trivial-task throughput and one-task round trip, 2 workers, auto batching.
//!
//! `cargo bench --bench throughput` prints a table, then as its last line one
//! JSON object: `{"bench":"throughput","tasks_per_s":…,"us_per_task":…,
//! "round_trip_us":…,"round_trip_p99_us":…,"floor_us":…,"floor_p99_us":…}`
//! (medians; p99 over all lone tasks). The floor is the same lone round trip
//! over a bare pipe pair to a forked child that echoes 64 bytes, measured in
//! blocks alternating with the pool's, so both see the same machine: on a
//! shared VM the wake-ups that dominate a lone round trip vary from minute
//! to minute. Both are measured after 200 unmeasured lone trips each (see
//! the warm-up in `main`).
//!
//! Before and after the lone trips, the benchmark also measures for 2 s how
//! often the machine stops a thread that never blocks (see `common`), and
//! adds to the JSON object `"stalls_over_100us_per_s":…,"stalled_pct":…`
//! (the mean of both measurements).
//!
//! Each lone trip follows 1 ms of idleness; `LONE_IDLE_US` sets another
//! length (0: back to back, with every cache warm).

mod common;
mod echo;

use std::time::{Duration, Instant};

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Tiny {
    one: u64,
}

fn add_one(model: &ArchivedTiny, x: u64) -> u64 {
    x + model.one.to_native()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    let tasks: u64 = 100_000;
    let reps = 15;
    let lone = 2_000;
    let store = procpool::persist(&Tiny { one: 1 })?;
    let mut inv = procpool::invoker(&store, add_one, 2)?;

    // Warm up: workers running, batch size settled.
    for _ in 0..3 {
        inv.map(0..tasks).try_for_each(|r| r.map(drop))?;
    }
    let mut rates = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        let mut sum = 0u64;
        for r in inv.map(0..tasks) {
            sum = sum.wrapping_add(r?);
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(sum, tasks * (tasks + 1) / 2);
        rates.push(tasks as f64 / secs);
    }
    let tasks_per_s = median(&mut rates);

    // One task alone while the workers are idle (blocked waiting for work),
    // and the bare mechanism's round trip, in alternating blocks: both see
    // the same minutes of the machine, and each trip follows the same 1 ms
    // of idleness (a longer idle makes the next wake-up slower on a VM).
    let idle = std::env::var("LONE_IDLE_US")
        .ok()
        .map(|v| v.parse().map_err(|e| format!("LONE_IDLE_US={v}: {e}")))
        .transpose()?
        .map_or(Duration::from_millis(1), Duration::from_micros);
    let before = common::machine_stalls(Duration::from_secs(2));
    let echo = echo::PipeEcho::start()?;
    // Warm-up, unmeasured, for both: the throughput runs leave the worker
    // last run on either vCPU, and a woken process goes back to its last
    // vCPU if that one is idle. Until the scheduler puts the worker and
    // this thread on one vCPU again (about 30 trips), every trip pays two
    // wake-ups of a halted vCPU (100-170 µs) instead of none.
    for i in 0..200 {
        std::thread::sleep(idle);
        inv.map(std::iter::once(i)).next().ok_or("no result")??;
        std::thread::sleep(idle);
        echo.trip();
    }
    let mut trips = Vec::new();
    let mut floor = Vec::new();
    let block = 100;
    for first in (0..lone).step_by(block) {
        for i in first..(first + block as u64).min(lone) {
            std::thread::sleep(idle);
            let start = Instant::now();
            let r = inv.map(std::iter::once(i)).next().ok_or("no result")??;
            trips.push(start.elapsed().as_secs_f64() * 1e6);
            assert_eq!(r, i + 1);
        }
        for _ in first..(first + block as u64).min(lone) {
            std::thread::sleep(idle);
            floor.push(echo.trip());
        }
    }
    drop(echo);
    let after = common::machine_stalls(Duration::from_secs(2));
    let stalls_per_s = (before.over_100us_per_s + after.over_100us_per_s) / 2.0;
    let stalled_pct = (before.stalled_pct + after.stalled_pct) / 2.0;
    let round_trip_us = median(&mut trips);
    let round_trip_p99_us = percentile(&mut trips, 0.99);
    let floor_us = median(&mut floor);
    let floor_p99_us = percentile(&mut floor, 0.99);

    println!("throughput: {tasks} trivial tasks, 2 workers, auto batching, {reps} runs");
    println!("  tasks/s (median)        {tasks_per_s:>14.0}");
    println!("  µs/task                 {:>14.4}", 1e6 / tasks_per_s);
    println!(
        "  lone task round trip µs {round_trip_us:>14.1} median, {round_trip_p99_us:.1} p99 ({lone} tasks, each after {idle:?} idle)"
    );
    println!(
        "  bare pipe round trip µs {floor_us:>14.1} median, {floor_p99_us:.1} p99 ({lone}, alternating blocks)"
    );
    println!("  {}", common::Stalls::describe_pair(&before, &after));
    println!(
        "{{\"bench\":\"throughput\",\"tasks_per_s\":{:.0},\"us_per_task\":{:.5},\"round_trip_us\":{:.1},\"round_trip_p99_us\":{:.1},\"floor_us\":{:.1},\"floor_p99_us\":{:.1},\"stalls_over_100us_per_s\":{:.1},\"stalled_pct\":{:.2}}}",
        tasks_per_s,
        1e6 / tasks_per_s,
        round_trip_us,
        round_trip_p99_us,
        floor_us,
        floor_p99_us,
        stalls_per_s,
        stalled_pct
    );
    Ok(())
}
