//! `run_sp`: one call in a fresh process, every way it can end.

mod common;

use common::no_core_dumps;
use std::time::{Duration, Instant};

fn double(n: u64) -> u64 {
    n * 2
}

fn fragile(n: u64) -> u64 {
    assert!(n < 10, "{n} is too big");
    n
}

fn crash(kind: String) -> u64 {
    match kind.as_str() {
        // SAFETY: none; a real invalid write, on purpose.
        "segv" => unsafe { std::ptr::write_volatile(16 as *mut u64, 1) },
        "abort" => std::process::abort(),
        "exit" => std::process::exit(7),
        "oom" => {
            eprintln!("about to allocate too much");
            let v: Vec<u8> = Vec::with_capacity(16 << 30);
            std::hint::black_box(&v);
        }
        "sleep" => std::thread::sleep(Duration::from_secs(60)),
        _ => {}
    }
    0
}

#[test]
fn returns_the_value() {
    assert_eq!(procpool::run_sp(double, 21).unwrap(), 42);
    let parts: Vec<String> = procpool::run_sp(
        |s: String| s.split(',').map(str::to_string).collect(),
        "a,b".to_string(),
    )
    .unwrap();
    assert_eq!(parts, vec!["a", "b"]);
}

fn double_with_pid(n: u64) -> (u64, u32) {
    (n * 2, std::process::id())
}

#[test]
fn calls_from_many_threads_each_get_a_fresh_process() {
    // More threads than spares: some calls take a spare, some wait for the
    // fork server to fork, and each gets a process of its own.
    let started = Instant::now();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            std::thread::spawn(move || {
                (0..25u64)
                    .map(|i| {
                        let n = t * 100 + i;
                        let (doubled, pid) = procpool::run_sp(double_with_pid, n).unwrap();
                        assert_eq!(doubled, n * 2);
                        pid
                    })
                    .collect::<Vec<u32>>()
            })
        })
        .collect();
    let mut pids: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(pids.len(), 200);
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 200, "a process served two calls");
    assert!(!pids.contains(&std::process::id()));
    assert!(started.elapsed() < Duration::from_secs(30));
}

fn reversed(v: Vec<u32>) -> Vec<u32> {
    v.into_iter().rev().collect()
}

#[test]
fn arguments_and_results_larger_than_a_pipe_go_through() {
    // Several MiB each way: more than a pipe holds before the process
    // exists, and more than it holds when the result comes back.
    let v: Vec<u32> = (0..2_000_000).collect();
    let sent = v.clone();
    // On a thread, so that a hang fails the test instead of stalling it.
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(procpool::run_sp(reversed, sent)));
    let r = outcome
        .recv_timeout(Duration::from_secs(30))
        .expect("the call hung")
        .unwrap();
    assert!(r.iter().eq(v.iter().rev()));
}

#[test]
fn a_panic_is_an_error_with_message_and_location() {
    let err = procpool::run_sp(fragile, 11).unwrap_err();
    assert!(err.is_panic(), "{err}");
    assert_eq!(err.panic_message(), Some("11 is too big"));
    assert!(
        err.panic_location()
            .unwrap()
            .starts_with("tests/run_sp.rs:"),
        "{err}"
    );
}

#[test]
fn signals_and_exit_codes_are_reported() {
    no_core_dumps();
    let err = procpool::run_sp(crash, "segv".to_string()).unwrap_err();
    assert!(err.is_crash());
    assert_eq!(err.signal(), Some(libc::SIGSEGV), "{err}");
    assert!(err.to_string().contains("SIGSEGV"), "{err}");
    let err = procpool::run_sp(crash, "abort".to_string()).unwrap_err();
    assert_eq!(err.signal(), Some(libc::SIGABRT), "{err}");
    let err = procpool::run_sp(crash, "exit".to_string()).unwrap_err();
    assert_eq!(err.exit_code(), Some(7), "{err}");
}

/// An allocation past the memory limit, in a process started by `method`,
/// is out-of-memory, with the stderr lines the process wrote before it.
fn assert_out_of_memory_with_stderr_tail(method: procpool::StartMethod) {
    no_core_dumps();
    let err = procpool::Isolated::new(crash)
        .start_method(method)
        .memory_limit(2 << 30)
        .run("oom".to_string())
        .unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    let tail = err.stderr_tail().unwrap();
    assert!(
        tail.contains("about to allocate too much") && tail.contains("memory allocation of"),
        "{tail}"
    );
}

#[test]
fn memory_limit_failure_is_out_of_memory_with_the_stderr_tail() {
    assert_out_of_memory_with_stderr_tail(procpool::StartMethod::default());
}

#[test]
fn a_spawned_process_reports_out_of_memory_with_its_stderr_tail_too() {
    assert_out_of_memory_with_stderr_tail(procpool::StartMethod::Spawn);
}

#[test]
fn a_timeout_stops_the_call() {
    let started = Instant::now();
    let err = procpool::Isolated::new(crash)
        .timeout(Duration::from_millis(200))
        .run("sleep".to_string())
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

fn my_seed(_: ()) -> Option<u64> {
    procpool::seed()
}

#[test]
fn each_call_gets_a_derived_seed() {
    let a = procpool::run_sp(my_seed, ()).unwrap().unwrap();
    let b = procpool::run_sp(my_seed, ()).unwrap().unwrap();
    assert_ne!(a, b, "calls get different seeds");
    let fixed = procpool::Isolated::new(my_seed).seed(42);
    assert_eq!(fixed.run(()).unwrap(), fixed.run(()).unwrap());
    assert_eq!(
        fixed.run(()).unwrap(),
        Some(procpool_worker::worker::task::task_seed(42, 0))
    );
}

fn log_and_return(n: u64) -> u64 {
    log::warn!(target: "isolated", "hello from the child {n}");
    n
}

#[test]
fn logs_reach_the_parent() {
    common::capture_logs(log::LevelFilter::Info);
    assert_eq!(procpool::run_sp(log_and_return, 5).unwrap(), 5);
    let logs = common::take_logs();
    assert!(
        logs.iter()
            .any(|r| r.target == "isolated" && r.message == "hello from the child 5"),
        "{logs:?}"
    );
}
