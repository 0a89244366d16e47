//! `invoker(..).map(..)` against real worker processes.

mod common;

use common::*;

#[test]
fn map_matches_serial_for_1_2_and_4_jobs() {
    let store = procpool::persist(&small()).unwrap();
    let expected: Vec<u64> = (0..10_000u64).map(add_offset_serial).collect();
    for n_jobs in [1, 2, 4] {
        let mut inv = procpool::invoker(&store, add_offset, n_jobs).unwrap();
        let got: Vec<u64> = inv.map(0..10_000u64).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, expected, "n_jobs = {n_jobs}");
    }
}

#[test]
fn map_over_an_endless_iterator_takes_ten() {
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::invoker(&store, add_offset, 2).unwrap();
    let got: Vec<u64> = inv.map(0u64..).take(10).collect::<Result<_, _>>().unwrap();
    assert_eq!(got, (0..10).map(add_offset_serial).collect::<Vec<_>>());
    // The invoker is still usable after the half-consumed map was dropped.
    let again: Vec<u64> = inv.map(vec![5u64]).collect::<Result<_, _>>().unwrap();
    assert_eq!(again, vec![add_offset_serial(5)]);
}

#[test]
fn endless_map_reads_the_input_lazily() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PULLED: AtomicU64 = AtomicU64::new(0);
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::invoker(&store, add_offset, 2).unwrap();
    let input = (0u64..).inspect(|_| {
        PULLED.fetch_add(1, Ordering::Relaxed);
    });
    let got: Vec<u64> = inv.map(input).take(10).collect::<Result<_, _>>().unwrap();
    assert_eq!(got.len(), 10);
    // Two batches per worker in flight, and batches start at one task: far
    // fewer than a million inputs were read to produce ten results.
    let pulled = PULLED.load(Ordering::Relaxed);
    assert!(pulled < 1_000_000, "pulled {pulled} inputs for 10 results");
}

#[test]
fn map_unordered_returns_every_index_once() {
    let store = procpool::persist(&small()).unwrap();
    for n_jobs in [1, 3] {
        let mut inv = procpool::invoker(&store, add_offset, n_jobs).unwrap();
        let mut seen = vec![false; 5_000];
        for (index, result) in inv.map_unordered(0..5_000u64) {
            assert!(!seen[index], "index {index} seen twice");
            seen[index] = true;
            assert_eq!(result.unwrap(), add_offset_serial(index as u64));
        }
        assert!(
            seen.iter().all(|s| *s),
            "n_jobs = {n_jobs}: some index missing"
        );
    }
}

#[test]
fn a_panic_fails_only_its_item_and_the_worker_lives_on() {
    let store = procpool::persist(&small()).unwrap();
    for n_jobs in [1, 2] {
        let mut inv = procpool::invoker(&store, panic_on_13, n_jobs).unwrap();
        let pids = inv.worker_pids();
        let results: Vec<_> = inv.map(0..100u64).collect();
        for (i, r) in results.iter().enumerate() {
            if i == 13 {
                let err = r.as_ref().unwrap_err();
                assert!(err.is_panic(), "{err}");
                assert!(!err.is_crash());
                assert_eq!(err.task_index(), 13);
                assert_eq!(err.panic_message(), Some("thirteen is unlucky"));
                let location = err.panic_location().unwrap();
                assert!(location.starts_with("tests/common/mod.rs:"), "{location}");
                assert!(
                    err.to_string()
                        .starts_with("task 13 panicked at tests/common/mod.rs:"),
                    "{err}"
                );
            } else {
                assert_eq!(*r.as_ref().unwrap(), i as u64 + 7);
            }
        }
        assert_eq!(
            inv.worker_pids(),
            pids,
            "no worker was replaced after a panic"
        );
    }
}

#[test]
fn explicit_chunk_size_and_reuse_across_many_maps() {
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::InvokerBuilder::new(&store, add_offset)
        .n_jobs(2)
        .chunk_size(7)
        .build()
        .unwrap();
    for round in 0..20u64 {
        let got: Vec<u64> = inv
            .map(round..round + 50)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            got,
            (round..round + 50)
                .map(add_offset_serial)
                .collect::<Vec<_>>()
        );
    }
    inv.shutdown();
}

#[test]
fn spawn_start_method_gives_the_same_results() {
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::InvokerBuilder::new(&store, add_offset)
        .n_jobs(2)
        .start_method(procpool::StartMethod::Spawn)
        .build()
        .unwrap();
    let got: Vec<u64> = inv.map(0..1_000u64).collect::<Result<_, _>>().unwrap();
    assert_eq!(got, (0..1_000).map(add_offset_serial).collect::<Vec<_>>());
}

#[test]
fn fork_start_method_is_refused_in_a_multithreaded_process() {
    // The test harness runs this test on a thread of its own.
    let store = procpool::persist(&small()).unwrap();
    // SAFETY: the pool refuses to fork here, which is what this test checks.
    let method = unsafe { procpool::StartMethod::fork() };
    let err = procpool::InvokerBuilder::new(&store, add_offset)
        .n_jobs(2)
        .start_method(method)
        .build()
        .unwrap_err();
    assert!(err.is_refused(), "{err}");
    assert!(err.to_string().contains("threads"), "{err}");
}

#[test]
fn bad_settings_are_errors() {
    let store = procpool::persist(&small()).unwrap();
    let err = procpool::invoker(&store, add_offset, 0).unwrap_err();
    assert!(err.is_refused());
    assert_eq!(err.to_string(), "n_jobs must be at least 1");
    let err = procpool::InvokerBuilder::new(&store, add_offset)
        .n_jobs(2)
        .chunk_size(0)
        .build()
        .unwrap_err();
    assert_eq!(err.to_string(), "chunk_size must be at least 1");
    let err = procpool::InvokerBuilder::new(&store, add_offset)
        .n_jobs(1)
        .chunk_size((1 << 24) + 1)
        .build()
        .unwrap_err();
    assert!(err.is_refused());
    assert_eq!(
        err.to_string(),
        "chunk_size must be at most 16777216, got 16777217"
    );
    let fine = procpool::InvokerBuilder::new(&store, add_offset)
        .n_jobs(1)
        .chunk_size(1 << 24)
        .build();
    assert!(fine.is_ok());
}

fn kill_self_on_5(_: &ArchivedSmall, x: u64) -> u64 {
    if x == 5 {
        // SAFETY: ends this worker process on purpose.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    x
}

#[test]
fn a_dead_worker_gives_errors_not_a_hang() {
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::InvokerBuilder::new(&store, kill_self_on_5)
        .n_jobs(2)
        .chunk_size(1)
        .build()
        .unwrap();
    let results: Vec<_> = inv.map(0..20u64).collect();
    let err = results[5].as_ref().unwrap_err();
    assert!(err.is_crash(), "{err}");
    assert_eq!(err.signal(), Some(libc::SIGKILL));
    assert!(err.to_string().contains("SIGKILL"), "{err}");
    for (i, r) in results.iter().enumerate() {
        if let Ok(v) = r {
            assert_eq!(*v, i as u64);
        }
    }
    // A replacement worker took over: the pool still works.
    let again: Vec<u64> = inv.map(10..15u64).collect::<Result<_, _>>().unwrap();
    assert_eq!(again, vec![10, 11, 12, 13, 14]);
}

/// A result that refuses to be serialised.
#[derive(Debug, serde::Deserialize)]
struct Unsendable;

impl serde::Serialize for Unsendable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this value stays here"))
    }
}

fn unsendable(_: &ArchivedSmall, _: u64) -> Unsendable {
    Unsendable
}

#[test]
fn a_result_that_cannot_be_encoded_is_a_serialization_error() {
    let store = procpool::persist(&small()).unwrap();
    for n_jobs in [1, 2] {
        let mut inv = procpool::invoker(&store, unsendable, n_jobs).unwrap();
        let results: Vec<_> = inv.map(0..3u64).collect();
        for r in results {
            let err = r.unwrap_err();
            assert!(err.is_serialization() && !err.is_panic(), "{err}");
            // postcard reports custom serde errors without their text.
            assert!(err.to_string().contains("cannot encode result"), "{err}");
        }
    }
}
