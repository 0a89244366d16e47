//! Fault injection: a task that kills its worker fails alone, every other
//! task's result arrives, and the pool goes on. The crashes are real: the
//! worker processes (re-executions of this test binary) really die, and each
//! case asserts the signal or exit code. Core dumps are turned off first.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Crash {
    /// A panic under an abort-on-panic policy.
    PanicAbort,
    Abort,
    Segfault,
    /// SIGKILL, as the OOM killer or an operator would send it.
    Kill,
    /// An allocation beyond the worker's memory limit.
    OutOfMemory,
    Exit3,
}

fn crash_at(_: &ArchivedSmall, (x, at, how): (u64, u64, Crash)) -> u64 {
    if x == at {
        match how {
            Crash::PanicAbort => {
                std::panic::set_hook(Box::new(|_| std::process::abort()));
                panic!("panic under abort");
            }
            Crash::Abort => std::process::abort(),
            Crash::Segfault => {
                // SAFETY: none; a real invalid write, on purpose.
                unsafe { std::ptr::write_volatile(16 as *mut u64, 1) };
            }
            // SAFETY: kill on our own pid only ends this worker.
            Crash::Kill => unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            },
            Crash::OutOfMemory => {
                let v: Vec<u8> = Vec::with_capacity(8 << 30);
                std::hint::black_box(&v);
            }
            Crash::Exit3 => std::process::exit(3),
        }
    }
    x * 2
}

fn check_case(how: Crash, at: u64, n_jobs: usize) {
    let started = Instant::now();
    let store = procpool::persist(&small()).unwrap();
    let mut builder = procpool::InvokerBuilder::new(&store, crash_at).n_jobs(n_jobs);
    if how == Crash::OutOfMemory {
        builder = builder.memory_limit(2 << 30);
    }
    let mut inv = builder.build().unwrap();
    let n = 200u64;
    let mut seen = vec![false; n as usize];
    let mut failed = Vec::new();
    for (index, result) in inv.map_unordered((0..n).map(|x| (x, at, how))) {
        assert!(!seen[index], "{how:?}@{at}: index {index} twice");
        seen[index] = true;
        match result {
            Ok(v) => assert_eq!(v, index as u64 * 2),
            Err(e) => failed.push(e),
        }
    }
    assert!(seen.iter().all(|s| *s), "{how:?}@{at}: results missing");
    assert_eq!(failed.len(), 1, "{how:?}@{at} n_jobs={n_jobs}: {failed:?}");
    let err = &failed[0];
    assert_eq!(err.task_index(), at);
    assert!(err.is_crash(), "{err}");
    assert!(err.worker_pid().is_some() && err.worker_id().is_some());
    match how {
        Crash::PanicAbort | Crash::Abort => assert_eq!(err.signal(), Some(libc::SIGABRT), "{err}"),
        Crash::Segfault => assert_eq!(err.signal(), Some(libc::SIGSEGV), "{err}"),
        Crash::Kill => assert_eq!(err.signal(), Some(libc::SIGKILL), "{err}"),
        Crash::OutOfMemory => {
            assert!(
                err.is_out_of_memory(),
                "{err}; stderr tail: {:?}",
                err.stderr_tail()
            );
            assert!(err.to_string().contains("ran out of memory"), "{err}");
        }
        Crash::Exit3 => assert_eq!(err.exit_code(), Some(3), "{err}"),
    }
    // The pool is whole again and runs another map.
    assert_eq!(inv.worker_pids().len(), n_jobs);
    let again: Vec<u64> = inv
        .map((0..50).map(|x| (x, u64::MAX, how)))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(again, (0..50).map(|x| x * 2).collect::<Vec<_>>());
    drop(inv);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{how:?}@{at}: took {:?}",
        started.elapsed()
    );
}

fn check_kind(how: Crash) {
    no_core_dumps();
    for n_jobs in [2, 4] {
        for at in [0, 100, 199] {
            check_case(how, at, n_jobs);
        }
    }
}

#[test]
fn panic_under_abort() {
    check_kind(Crash::PanicAbort);
}

#[test]
fn abort() {
    check_kind(Crash::Abort);
}

#[test]
fn segfault() {
    check_kind(Crash::Segfault);
}

#[test]
fn sigkill() {
    check_kind(Crash::Kill);
}

#[test]
fn out_of_memory_under_a_memory_limit() {
    check_kind(Crash::OutOfMemory);
}

#[test]
fn exit_code() {
    check_kind(Crash::Exit3);
}

/// Sleeps a minute when `x` is `slow`.
fn sleepy(_: &ArchivedSmall, (x, slow): (u64, u64)) -> u64 {
    if x == slow {
        std::thread::sleep(Duration::from_secs(60));
    }
    x
}

#[test]
fn a_task_past_its_time_limit_is_stopped_alone() {
    no_core_dumps();
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::InvokerBuilder::new(&store, sleepy)
        .n_jobs(2)
        .task_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    let results: Vec<_> = inv.map((0..40).map(|x| (x, 7))).collect();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    for (i, r) in results.iter().enumerate() {
        if i == 7 {
            let err = r.as_ref().unwrap_err();
            assert!(err.is_timeout(), "{err}");
            assert!(!err.is_crash());
            assert_eq!(err.signal(), Some(libc::SIGTERM), "{err}");
            assert!(
                err.to_string().starts_with("task 7 timed out after 300ms"),
                "{err}"
            );
        } else {
            assert_eq!(*r.as_ref().unwrap(), i as u64);
        }
    }
}

fn slow_panic(_: &ArchivedSmall, x: u64) -> u64 {
    if x == 10 {
        panic!("stop here");
    }
    std::thread::sleep(Duration::from_millis(20));
    x
}

#[test]
fn fail_fast_stops_at_the_first_error() {
    let store = procpool::persist(&small()).unwrap();
    for n_jobs in [1, 2] {
        let mut inv = procpool::InvokerBuilder::new(&store, slow_panic)
            .n_jobs(n_jobs)
            .fail_fast(true)
            .build()
            .unwrap();
        let started = Instant::now();
        let results: Vec<_> = inv.map(0..10_000u64).collect();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        let last = results.last().unwrap().as_ref().unwrap_err();
        assert!(last.is_panic() && last.task_index() == 10, "{last}");
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        assert!(
            results.len() < 1_000,
            "{} results after fail-fast",
            results.len()
        );
        // The invoker goes on with a fresh map.
        let again: Vec<u64> = inv.map(20..25u64).collect::<Result<_, _>>().unwrap();
        assert_eq!(again, vec![20, 21, 22, 23, 24]);
    }
}

fn slow_after_first(_: &ArchivedSmall, x: u64) -> u64 {
    if x > 0 {
        std::thread::sleep(Duration::from_secs(60));
    }
    x
}

#[test]
fn dropping_a_map_of_slow_tasks_stops_them_promptly() {
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::InvokerBuilder::new(&store, slow_after_first)
        .n_jobs(2)
        .chunk_size(1)
        .build()
        .unwrap();
    let before = inv.worker_pids();
    let started = Instant::now();
    {
        let mut map = inv.map_unordered(0..100u64);
        // Task 0 is quick; the others, already sent, would sleep a minute.
        let (index, first) = map.next().unwrap();
        assert_eq!((index, first.unwrap()), (0, 0));
    }
    // The busy workers were stopped and replaced; the invoker works at once.
    let after = inv.worker_pids();
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} -> {after:?}"
    );
    let mut it = inv.map(std::iter::once(0u64));
    assert_eq!(it.next().unwrap().unwrap(), 0);
    drop(it);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_worker_that_dies_before_it_is_ready_is_an_error_not_a_hang() {
    no_core_dumps();
    let store = procpool::persist(&small()).unwrap();
    let started = Instant::now();
    // 1 MiB of address space: the worker cannot even allocate its answer.
    let err = procpool::InvokerBuilder::new(&store, add_offset)
        .n_jobs(2)
        .memory_limit(1 << 20)
        .build()
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.to_string().contains("start-up") || err.is_worker_fatal(),
        "{err}"
    );
}

#[test]
fn a_panic_in_the_parent_mid_map_stops_the_work_promptly() {
    let store = procpool::persist(&small()).unwrap();
    let started = Instant::now();
    let mut pids = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut inv = procpool::InvokerBuilder::new(&store, slow_after_first)
            .n_jobs(2)
            .chunk_size(1)
            .build()
            .unwrap();
        pids = inv.worker_pids();
        for (i, r) in inv.map_unordered(0..100u64) {
            r.unwrap();
            if i == 0 {
                panic!("the parent gives up");
            }
        }
    }));
    assert!(outcome.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_all_exit(&pids, "the panic");
}
