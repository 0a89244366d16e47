//! The fork server killed from outside (the OOM killer, an operator): its
//! workers die with it, and the program goes on with a new server, as if
//! each worker had crashed between tasks.
//!
//! One test per binary: it kills the fork server the whole program shares.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn my_pid(_: ()) -> u32 {
    std::process::id()
}

fn slow_add_offset(model: &ArchivedSmall, x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(2));
    add_offset(model, x)
}

/// The fork server, this process's only child.
fn fork_server() -> u32 {
    match children_of(std::process::id()).as_slice() {
        [server] => *server,
        other => panic!("expected one fork server, found {other:?}"),
    }
}

/// Kills the fork server and waits until `workers` have died with it.
fn kill_fork_server(workers: &[u32]) -> u32 {
    let server = fork_server();
    // SAFETY: kill with a pid we just read and a constant signal.
    let killed = unsafe { libc::kill(server as libc::pid_t, libc::SIGKILL) };
    assert_eq!(killed, 0);
    let started = Instant::now();
    while workers.iter().any(|pid| !has_exited(*pid)) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the workers outlived their fork server"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    server
}

#[test]
fn a_killed_fork_server_is_replaced_and_its_workers_too() {
    procpool::init();
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::invoker(&store, add_offset, 2).unwrap();
    let expected: Vec<u64> = (0..1000).map(add_offset_serial).collect();
    let got: Vec<u64> = inv.map(0..1000u64).map(|r| r.unwrap()).collect();
    assert_eq!(got, expected);
    assert_eq!(procpool::run_sp(my_pid, ()).map(|_| ()), Ok(()));

    // Between maps.
    let old_workers = inv.worker_pids();
    let old_server = kill_fork_server(&old_workers);

    let started = Instant::now();
    let got: Vec<u64> = inv.map(0..1000u64).map(|r| r.unwrap()).collect();
    assert_eq!(got, expected);
    let new_workers = inv.worker_pids();
    assert_eq!(new_workers.len(), 2);
    assert!(new_workers.iter().all(|pid| !old_workers.contains(pid)));
    let pid = procpool::run_sp(my_pid, ()).unwrap();
    assert!(!old_workers.contains(&pid));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_ne!(fork_server(), old_server);

    // In the middle of a map: the tasks the workers were running fail once,
    // like any task whose worker died, and run again on new workers.
    let mut inv = procpool::InvokerBuilder::new(&store, slow_add_offset)
        .n_jobs(2)
        .chunk_size(5)
        .build()
        .unwrap();
    let workers = inv.worker_pids();
    let mut got = Vec::new();
    let mut killed = false;
    for r in inv.map(0..300u64) {
        got.push(r.unwrap());
        if got.len() == 100 {
            kill_fork_server(&workers);
            killed = true;
        }
    }
    assert!(killed);
    let expected: Vec<u64> = (0..300).map(add_offset_serial).collect();
    assert_eq!(got, expected);
}
