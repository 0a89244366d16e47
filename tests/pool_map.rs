//! A pool without a model: `fn(A) -> R` in worker processes, with the
//! invoker's guarantees (order, laziness, crash isolation, seeds, logs,
//! timeouts, memory limit, `n_jobs = 1` in this process).

mod common;

use common::*;
use std::time::{Duration, Instant};

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn results_come_in_input_order_for_1_2_and_4_jobs() {
    for n_jobs in [1, 2, 4] {
        for chunk in [None, Some(1), Some(100)] {
            let mut builder = procpool::PoolBuilder::new(square).n_jobs(n_jobs);
            if let Some(chunk) = chunk {
                builder = builder.chunk_size(chunk);
            }
            let mut pool = builder.build().unwrap();
            let got: Vec<u64> = pool.map(0..5_000u64).collect::<Result<_, _>>().unwrap();
            let want: Vec<u64> = (0..5_000u64).map(square).collect();
            assert_eq!(got, want, "n_jobs {n_jobs}, chunk {chunk:?}");
            let mut unordered: Vec<(usize, u64)> = pool
                .map_unordered(0..1_000u64)
                .map(|(i, r)| (i, r.unwrap()))
                .collect();
            unordered.sort_unstable();
            assert!(
                unordered
                    .iter()
                    .enumerate()
                    .all(|(i, &(j, v))| i == j && v == square(i as u64))
            );
        }
    }
}

fn whose_pid(_: u64) -> u32 {
    std::process::id()
}

#[test]
fn one_job_runs_here_and_more_run_in_workers() {
    let mut here = procpool::pool(whose_pid, 1).unwrap();
    assert!(here.worker_pids().is_empty());
    assert!(here.map(0..10u64).all(|p| p.unwrap() == std::process::id()));
    let mut pool = procpool::pool(whose_pid, 2).unwrap();
    let workers = pool.worker_pids();
    assert_eq!(workers.len(), 2);
    assert!(pool.map(0..1_000u64).all(|p| workers.contains(&p.unwrap())));
}

#[test]
fn the_input_is_read_lazily() {
    let mut pool = procpool::PoolBuilder::new(square)
        .n_jobs(2)
        .chunk_size(10)
        .build()
        .unwrap();
    let taken = std::cell::Cell::new(0u64);
    let endless = (0u64..).inspect(|_| taken.set(taken.get() + 1));
    let first: Vec<u64> = pool.map(endless).take(5).map(Result::unwrap).collect();
    assert_eq!(first, [0, 1, 4, 9, 16]);
    // A few batches ahead of what was taken, never the whole input.
    assert!(taken.get() < 1_000, "read {} arguments", taken.get());
}

fn crash_on_7(x: u64) -> u64 {
    if x == 7 {
        std::process::abort();
    }
    if x == 8 {
        panic!("eight panics");
    }
    x
}

#[test]
fn a_crash_or_a_panic_fails_its_task_alone() {
    no_core_dumps();
    for n_jobs in [2, 4] {
        let mut pool = procpool::PoolBuilder::new(crash_on_7)
            .n_jobs(n_jobs)
            .build()
            .unwrap();
        let results: Vec<_> = pool.map(0..100u64).collect();
        for (i, r) in results.iter().enumerate() {
            match i {
                7 => {
                    let e = r.as_ref().unwrap_err();
                    assert!(e.is_crash(), "{e}");
                    assert_eq!(e.signal(), Some(libc::SIGABRT), "{e}");
                }
                8 => {
                    let e = r.as_ref().unwrap_err();
                    assert_eq!(e.panic_message(), Some("eight panics"), "{e}");
                }
                _ => assert_eq!(*r.as_ref().unwrap(), i as u64),
            }
        }
        assert_eq!(
            pool.worker_pids().len(),
            n_jobs,
            "the dead worker was replaced"
        );
    }
}

fn seeded(x: u64) -> (u64, u64) {
    (x, procpool::seed().expect("a task has a seed"))
}

#[test]
fn seeds_are_the_same_for_any_n_jobs() {
    let run = |n_jobs| {
        let mut pool = procpool::PoolBuilder::new(seeded)
            .n_jobs(n_jobs)
            .seed(7)
            .build()
            .unwrap();
        pool.map(0..500u64).collect::<Result<Vec<_>, _>>().unwrap()
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(4));
    let distinct: std::collections::HashSet<u64> = one.iter().map(|&(_, s)| s).collect();
    assert_eq!(distinct.len(), one.len());
}

fn log_it(x: u64) -> u64 {
    log::warn!(target: "pool_map", "task {x} logs");
    x
}

#[test]
fn worker_logs_reach_this_process() {
    capture_logs(log::LevelFilter::Info);
    let mut pool = procpool::pool(log_it, 2).unwrap();
    assert_eq!(pool.map(0..50u64).filter(Result::is_ok).count(), 50);
    pool.shutdown();
    let mut tasks: Vec<u64> = take_logs()
        .into_iter()
        .filter(|r| r.target == "pool_map")
        .map(|r| {
            assert_eq!(r.message, format!("task {} logs", r.task.unwrap()));
            r.task.unwrap()
        })
        .collect();
    tasks.sort_unstable();
    assert_eq!(tasks, (0..50).collect::<Vec<_>>());
}

fn sleep_or_allocate(x: u64) -> u64 {
    match x {
        1 => std::thread::sleep(Duration::from_secs(30)),
        2 => {
            let v: Vec<u8> = Vec::with_capacity(8 << 30);
            std::hint::black_box(&v);
        }
        _ => {}
    }
    x
}

#[test]
fn timeouts_and_memory_limits_fail_their_task_alone() {
    no_core_dumps();
    let started = Instant::now();
    let mut pool = procpool::PoolBuilder::new(sleep_or_allocate)
        .n_jobs(2)
        .chunk_size(1)
        .task_timeout(Duration::from_millis(300))
        .memory_limit(2 << 30)
        .build()
        .unwrap();
    let results: Vec<_> = pool.map(0..6u64).collect();
    assert!(
        results[1].as_ref().unwrap_err().is_timeout(),
        "{:?}",
        results[1]
    );
    assert!(
        results[2].as_ref().unwrap_err().is_out_of_memory(),
        "{:?}",
        results[2]
    );
    for i in [0, 3, 4, 5] {
        assert_eq!(*results[i].as_ref().unwrap(), i as u64);
    }
    // The sleeper was stopped, not waited for.
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn bad_options_are_refused_with_a_reason() {
    let err = procpool::pool(square, 0).unwrap_err();
    assert!(
        err.is_refused() && err.to_string().contains("n_jobs"),
        "{err}"
    );
    let err = procpool::PoolBuilder::new(square)
        .chunk_size(0)
        .build()
        .unwrap_err();
    assert!(
        err.is_refused() && err.to_string().contains("chunk_size"),
        "{err}"
    );
}
