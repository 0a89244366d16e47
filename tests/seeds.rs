//! Task seeds depend on the root seed and the task index only.

mod common;

use common::*;
use std::time::Duration;

/// A randomised task: sleeps a seed-dependent while (so tasks finish in a
/// different order on each run) and returns a value drawn from its seed.
fn randomised(_: &ArchivedSmall, x: u64) -> (u64, u64) {
    let seed = procpool::seed().expect("inside a task");
    std::thread::sleep(Duration::from_micros(seed % 300));
    // xorshift64*: a named generator seeded with the task seed.
    let mut s = seed | 1;
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    (x, s.wrapping_mul(0x2545_F491_4F6C_DD1D))
}

fn run(n_jobs: usize, seed: u64) -> Vec<(u64, u64)> {
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::InvokerBuilder::new(&store, randomised)
        .n_jobs(n_jobs)
        .seed(seed)
        .build()
        .unwrap();
    inv.map(0..300u64).collect::<Result<_, _>>().unwrap()
}

#[test]
fn identical_for_1_2_and_4_jobs_and_across_runs() {
    let one = run(1, 7);
    assert_eq!(one, run(2, 7));
    assert_eq!(one, run(4, 7));
    assert_eq!(one, run(4, 7), "a second run");
    assert_ne!(one, run(2, 8), "another root seed gives other values");
    let distinct: std::collections::HashSet<u64> = one.iter().map(|p| p.1).collect();
    assert_eq!(distinct.len(), one.len(), "tasks get distinct seeds");
}

#[test]
fn the_root_seed_comes_from_procpool_seed() {
    // SAFETY: only this test in this binary touches the variable, and the
    // invokers below read it on this thread.
    unsafe { std::env::set_var("PROCPOOL_SEED", "7") };
    let store = procpool::persist(&small()).unwrap();
    let inv = procpool::InvokerBuilder::new(&store, randomised)
        .n_jobs(1)
        .build()
        .unwrap();
    assert_eq!(inv.root_seed(), 7);
    // SAFETY: this test alone changes the environment, on this thread.
    unsafe { std::env::set_var("PROCPOOL_SEED", "seven") };
    let err = procpool::InvokerBuilder::new(&store, randomised)
        .n_jobs(1)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("PROCPOOL_SEED"), "{err}");
    // SAFETY: this test alone changes the environment, on this thread.
    unsafe { std::env::remove_var("PROCPOOL_SEED") };
}
