//! A pipeline of three stages across processes (blllib's pattern): a
//! stateless square, a windowed(3) difference, a stateful accumulator.
//!
//! `cargo bench --bench pipeline` prints a few lines, then as its last line
//! one JSON object: `{"bench":"pipeline","items_per_s":…,
//! "sequential_items_per_s":…,"stage_hop_us":…}`:
//!
//! - `items_per_s`: 1,000,000 `i64` through the three stages with the
//!   default budget (`n_cpu` = the CPUs this process may use: one worker
//!   for each parallel stage on 2 CPUs, one process for the stateful one),
//!   from the first input item read to the last output taken;
//! - `sequential_items_per_s`: the same through `apply_sequential`, every
//!   stage in this process;
//! - `stage_hop_us`: the time one item takes to cross one process stage
//!   and come back when nothing else is in flight: 2,000 items through a
//!   one-stage pipeline with `in_flight(1)`, wall time over items.
//!
//! Each figure is the median of 5 repetitions. Every run checks its output
//! against the sequential result.

use std::time::Instant;

const ITEMS: i64 = 1_000_000;
const HOP_ITEMS: i64 = 2_000;

fn square(x: i64) -> i64 {
    x * x
}

fn difference2(w: &[i64]) -> i64 {
    w[2] - w[0]
}

fn start() -> i64 {
    0
}

fn accumulate(acc: &mut i64, x: i64) -> i64 {
    *acc = acc.wrapping_add(x);
    *acc
}

fn identity(x: i64) -> i64 {
    x
}

fn three_stages() -> procpool::Pipeline<i64, i64> {
    procpool::pipeline()
        .map(square)
        .windowed(3, difference2)
        .stateful(start, accumulate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    procpool::init();
    let expected: Vec<i64> = three_stages()
        .apply_sequential(0..ITEMS)
        .collect::<Result<_, _>>()
        .expect("the sequential run");
    assert_eq!(expected.len() as i64, ITEMS - 2);
    let mut processes = Vec::new();
    let mut sequential = Vec::new();
    let mut hops = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let out: Vec<i64> = three_stages()
            .apply(0..ITEMS)
            .collect::<Result<_, _>>()
            .expect("the process run");
        processes.push(ITEMS as f64 / started.elapsed().as_secs_f64());
        assert!(
            out == expected,
            "the process run differs from the sequential one"
        );

        let started = Instant::now();
        let out: Vec<i64> = three_stages()
            .apply_sequential(0..ITEMS)
            .collect::<Result<_, _>>()
            .expect("the sequential run");
        sequential.push(ITEMS as f64 / started.elapsed().as_secs_f64());
        assert!(out == expected);

        let output = procpool::pipeline()
            .map(identity)
            .in_flight(1)
            .apply(0..HOP_ITEMS);
        let started = Instant::now();
        let mut taken = 0;
        for item in output {
            item.expect("a hop");
            taken += 1;
        }
        assert_eq!(taken, HOP_ITEMS);
        hops.push(started.elapsed().as_secs_f64() * 1e6 / HOP_ITEMS as f64);
    }
    let items_per_s = median(processes);
    let sequential_items_per_s = median(sequential);
    let stage_hop_us = median(hops);
    println!("square → windowed(3) difference → stateful accumulator, {ITEMS} items");
    println!("  processes:  {:>12.0} items/s", items_per_s);
    println!("  sequential: {:>12.0} items/s", sequential_items_per_s);
    println!("  one stage hop, nothing else in flight: {stage_hop_us:.1} µs");
    println!(
        "{{\"bench\":\"pipeline\",\"items_per_s\":{items_per_s:.0},\"sequential_items_per_s\":{sequential_items_per_s:.0},\"stage_hop_us\":{stage_hop_us:.2}}}"
    );
}
