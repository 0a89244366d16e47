//! Map-reduce: mapper and reducer in the workers, partials combined here;
//! the seed's example, empty input, failures of the mapper and the reducer,
//! and a worker killed mid-job, for n_jobs 1, 2 and 4.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};

fn identity(x: u64) -> u64 {
    x
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[test]
fn the_seeds_sum_of_0_to_10000_for_1_2_and_4_jobs() {
    for n_jobs in [1, 2, 4] {
        for chunk in [None, Some(1), Some(7), Some(10_000)] {
            let mut builder = procpool::MapReduceBuilder::new(identity, add).n_jobs(n_jobs);
            if let Some(chunk) = chunk {
                builder = builder.chunk_size(chunk);
            }
            let mut sum = builder.build().unwrap();
            assert_eq!(
                sum.run(0..10_000u64).unwrap(),
                Some(49_995_000),
                "n_jobs {n_jobs}, chunk {chunk:?}"
            );
            // Reusable, and lazy: an endless input cut short.
            assert_eq!(sum.run((0..).take(100)).unwrap(), Some(4_950));
        }
    }
}

#[test]
fn empty_input_gives_none_not_an_error_or_a_hang() {
    for n_jobs in [1, 2, 4] {
        let mut sum = procpool::map_reduce(identity, add, n_jobs).unwrap();
        assert_eq!(sum.run(std::iter::empty::<u64>()).unwrap(), None);
    }
}

fn max(a: u64, b: u64) -> u64 {
    a.max(b)
}

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn an_associative_commutative_reducer_gives_one_answer_for_any_split() {
    let want = (0..5_000u64).map(square).max();
    for n_jobs in [1, 2, 4] {
        for chunk in [1, 3, 64, 5_000] {
            let mut biggest = procpool::MapReduceBuilder::new(square, max)
                .n_jobs(n_jobs)
                .chunk_size(chunk)
                .build()
                .unwrap();
            // Shuffled input: arrival order is not input order either way.
            let input = (0..5_000u64).map(|i| (i * 7_919) % 5_000);
            assert_eq!(biggest.run(input).unwrap(), want);
        }
    }
}

fn panic_on_3000_and_7000(x: u64) -> u64 {
    if x == 3_000 || x == 7_000 {
        panic!("mapper fails on {x}");
    }
    x
}

#[test]
fn a_mapper_panic_ends_the_run_with_the_lowest_failing_task() {
    for n_jobs in [1, 2, 4] {
        let mut sum = procpool::map_reduce(panic_on_3000_and_7000, add, n_jobs).unwrap();
        let err = sum.run(0..10_000u64).unwrap_err();
        assert_eq!(err.task_index(), 3_000, "n_jobs {n_jobs}: {err}");
        assert_eq!(err.panic_message(), Some("mapper fails on 3000"));
        // The workers live on: the next run succeeds.
        assert_eq!(sum.run(0..10u64).unwrap(), Some(45));
    }
}

fn add_until_a_million(a: u64, b: u64) -> u64 {
    assert!(a + b < 1_000_000, "the sum passed a million");
    a + b
}

#[test]
fn a_reducer_panic_fails_the_job_with_a_typed_error() {
    for n_jobs in [1, 2, 4] {
        let mut sum = procpool::map_reduce(identity, add_until_a_million, n_jobs).unwrap();
        let err = sum.run(0..10_000u64).unwrap_err();
        assert!(err.is_panic(), "n_jobs {n_jobs}: {err}");
        assert_eq!(err.panic_message(), Some("the sum passed a million"));
    }
}

/// Kills its worker the first time any worker sees 5,000: the marker file
/// named in the argument says a kill happened.
fn kill_once_at_5000((x, marker): (u64, String)) -> u64 {
    static SEEN: AtomicBool = AtomicBool::new(false);
    if x == 5_000
        && !SEEN.swap(true, Ordering::SeqCst)
        && std::fs::File::create_new(&marker).is_ok()
    {
        // SAFETY: kill on our own pid only ends this worker.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    x
}

fn kill_always_at_5000(x: u64) -> u64 {
    if x == 5_000 {
        // SAFETY: as above.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    x
}

#[test]
fn a_worker_killed_mid_job_loses_nothing_and_counts_nothing_twice() {
    no_core_dumps();
    let dir = tempfile::tempdir().unwrap();
    for n_jobs in [2, 4] {
        let marker = dir.path().join(format!("killed-{n_jobs}"));
        let named = marker.to_string_lossy().into_owned();
        let mut sum = procpool::MapReduceBuilder::new(kill_once_at_5000, add)
            .n_jobs(n_jobs)
            .chunk_size(100)
            .build()
            .unwrap();
        let pids = sum.worker_pids();
        let input = (0..10_000u64).map(|x| (x, named.clone()));
        assert_eq!(sum.run(input).unwrap(), Some(49_995_000));
        assert!(marker.exists(), "a worker was killed");
        assert_ne!(sum.worker_pids(), pids, "the dead worker was replaced");

        let mut sum = procpool::MapReduceBuilder::new(kill_always_at_5000, add)
            .n_jobs(n_jobs)
            .build()
            .unwrap();
        let err = sum.run(0..10_000u64).unwrap_err();
        assert_eq!(err.task_index(), 5_000, "{err}");
        assert_eq!(err.signal(), Some(libc::SIGKILL), "{err}");
    }
}
