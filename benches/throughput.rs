//! Trivial-task throughput and one-task round trip, 2 workers, auto batching.
//!
//! `cargo bench --bench throughput` prints a table, then as its last line one
//! JSON object: `{"bench":"throughput","tasks_per_s":…,"us_per_task":…,
//! "round_trip_us":…,"round_trip_p99_us":…}` (medians; p99 over all lone tasks).

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

    // One task alone while the workers are idle (blocked waiting for work).
    let mut trips = Vec::new();
    for i in 0..lone {
        std::thread::sleep(Duration::from_millis(1));
        let start = Instant::now();
        let r = inv.map(std::iter::once(i)).next().ok_or("no result")??;
        trips.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(r, i + 1);
    }
    let round_trip_us = median(&mut trips);
    let round_trip_p99_us = percentile(&mut trips, 0.99);

    println!("throughput: {tasks} trivial tasks, 2 workers, auto batching, {reps} runs");
    println!("  tasks/s (median)        {tasks_per_s:>14.0}");
    println!("  µs/task                 {:>14.4}", 1e6 / tasks_per_s);
    println!(
        "  lone task round trip µs {round_trip_us:>14.1} median, {round_trip_p99_us:.1} p99 ({lone} tasks)"
    );
    println!(
        "{{\"bench\":\"throughput\",\"tasks_per_s\":{:.0},\"us_per_task\":{:.5},\"round_trip_us\":{:.1},\"round_trip_p99_us\":{:.1}}}",
        tasks_per_s,
        1e6 / tasks_per_s,
        round_trip_us,
        round_trip_p99_us
    );
    Ok(())
}
