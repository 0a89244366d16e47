//! The fork server keeps spare children forked ahead of need, and hands
//! them to the parent. Each call must still get a fresh process, and a spare
//! that dies before anyone asked for it must cost nothing but the head
//! start, even when the parent tries to hand a call to it after its death.
//!
//! One test per binary: it kills the fork server's idle children, which
//! would break other tests' workers running at the same time.

mod common;

use common::{children_of, has_exited};
use procpool_worker::fork_server::SPARES;
use std::time::{Duration, Instant};

fn my_pid(_: ()) -> u32 {
    std::process::id()
}

/// The fork server's spares, once the processes of finished calls (`seen`)
/// have exited and it has forked [`SPARES`].
fn spares_of(server: u32, seen: &[u32]) -> Vec<u32> {
    let mut spares = Vec::new();
    eventually("the finished calls' processes exit and spares wait", || {
        spares = children_of(server);
        spares.len() == SPARES && spares.iter().all(|pid| !seen.contains(pid))
    });
    spares
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

    // Between calls, the fork server's only living children are its spares
    // (each call's process exits once it has answered).
    let spares = spares_of(server, &seen);
    for &spare in &spares {
        // SAFETY: kill with a pid we just read and a constant signal.
        let sent = unsafe { libc::kill(spare as libc::pid_t, libc::SIGKILL) };
        assert_eq!(sent, 0);
    }
    eventually("the spares exit", || {
        spares.iter().all(|&pid| has_exited(pid))
    });
    // At once, perhaps before the parent hears of the deaths: a call handed
    // to a dead spare is started by a fork instead.
    for _ in 0..3 {
        let pid = procpool::run_sp(my_pid, ()).unwrap();
        assert!(!seen.contains(&pid), "process {pid} served two calls");
        assert!(!spares.contains(&pid), "a killed spare {pid} answered");
        seen.push(pid);
    }
    eventually("new spares wait", || {
        let now = children_of(server);
        now.len() == SPARES && now.iter().all(|pid| !spares.contains(pid))
    });
    for _ in 0..3 {
        let pid = procpool::run_sp(my_pid, ()).unwrap();
        assert!(!seen.contains(&pid), "process {pid} served two calls");
        seen.push(pid);
    }

    // With the server stopped, it cannot report the spares' deaths: the
    // parent hands calls to dead spares it still holds, finds them gone, and
    // asks the server, which answers once it runs again.
    let spares = spares_of(server, &seen);
    // The server offers each spare to the parent right after forking it.
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: kill with pids we just read and constant signals.
    unsafe {
        assert_eq!(libc::kill(server as libc::pid_t, libc::SIGSTOP), 0);
        for &spare in &spares {
            assert_eq!(libc::kill(spare as libc::pid_t, libc::SIGKILL), 0);
        }
    }
    eventually("the spares exit", || {
        spares.iter().all(|&pid| has_exited(pid))
    });
    let calls = std::thread::spawn(|| {
        (0..SPARES + 1)
            .map(|_| procpool::run_sp(my_pid, ()).unwrap())
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let sent = unsafe { libc::kill(server as libc::pid_t, libc::SIGCONT) };
    assert_eq!(sent, 0);
    for pid in calls.join().unwrap() {
        assert!(!seen.contains(&pid), "process {pid} served two calls");
        assert!(!spares.contains(&pid), "a killed spare {pid} answered");
        seen.push(pid);
    }
}
