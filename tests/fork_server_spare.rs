//! The fork server keeps a spare child forked ahead of need. Each call must
//! still get a fresh process, and a spare that dies before anyone asked for
//! it must cost nothing but the head start.
//!
//! One test per binary: it kills the fork server's idle children, which
//! would break other tests' workers running at the same time.

mod common;

use common::parent_of;
use std::time::{Duration, Instant};

fn my_pid(_: ()) -> u32 {
    std::process::id()
}

fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| parent_of(*pid) == Some(parent))
        .collect()
}

/// Waits until `f` holds, for at most 5 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn every_call_gets_a_fresh_process_even_after_its_spare_is_killed() {
    procpool::init();
    let me = std::process::id();
    let first = procpool::run_sp(my_pid, ()).unwrap();
    // The fork server is this process's only child.
    let server = match children_of(me).as_slice() {
        [server] => *server,
        other => panic!("expected one fork server, found {other:?}"),
    };

    let mut seen = vec![me, server, first];
    for _ in 0..5 {
        let pid = procpool::run_sp(my_pid, ()).unwrap();
        assert!(!seen.contains(&pid), "process {pid} served two calls");
        seen.push(pid);
    }

    // Between calls, the fork server's only living child is its spare
    // (each call's process exits once it has answered).
    eventually("the finished calls' processes exit", || {
        children_of(server).len() == 1
    });
    let spare = match children_of(server).as_slice() {
        [spare] => *spare,
        other => panic!("expected one spare, found {other:?}"),
    };
    // SAFETY: kill with a pid we just read and a constant signal.
    assert_eq!(
        unsafe { libc::kill(spare as libc::pid_t, libc::SIGKILL) },
        0
    );
    eventually("the spare is reaped", || {
        !children_of(server).contains(&spare)
    });

    // Without a spare the next call forks, and a new spare follows it.
    for _ in 0..3 {
        let pid = procpool::run_sp(my_pid, ()).unwrap();
        assert!(!seen.contains(&pid), "process {pid} served two calls");
        seen.push(pid);
    }
    eventually(
        "a new spare waits",
        || matches!(children_of(server).as_slice(), [new] if *new != spare),
    );
}
