//! A plain fork of a program that uses procpool gets a fork server of its
//! own. Its parent's server would report how the copy's workers ended to
//! the parent, and the copy would take the spare processes the parent
//! holds.
//!
//! One test per binary: it forks the test program.

mod common;

use std::time::Duration;

fn my_pid(_: ()) -> u32 {
    std::process::id()
}

fn abort(_: ()) {
    std::process::abort();
}

fn sleep_then_my_pid(ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    std::process::id()
}

#[test]
fn a_plain_fork_of_the_parent_starts_its_own_fork_server() {
    common::no_core_dumps();
    procpool::init();
    let mut seen = vec![procpool::run_sp(my_pid, ()).unwrap()];
    // Let the server offer its next spares, so the copy inherits them.
    std::thread::sleep(Duration::from_millis(100));

    // SAFETY: the copy calls only procpool, which starts its own fork server
    // (a process and a thread) there, and then `_exit`. No other thread of
    // this test binary holds a lock the copy needs: the harness's threads
    // wait for this test, and procpool's reader thread holds none while it
    // waits for the server.
    let copy = unsafe { libc::fork() };
    assert!(copy >= 0, "fork failed");
    if copy == 0 {
        // A crash is reported with its signal, which only the server that
        // forked the process can tell.
        let crash_seen =
            procpool::run_sp(abort, ()).is_err_and(|e| e.signal() == Some(libc::SIGABRT));
        let ok = crash_seen
            && procpool::run_sp(sleep_then_my_pid, 500).is_ok()
            && (0..3).all(|_| procpool::run_sp(my_pid, ()).is_ok());
        // SAFETY: ends the copy without running the harness's exit code.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }

    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..10 {
        let pid = procpool::run_sp(my_pid, ()).unwrap();
        assert!(!seen.contains(&pid), "process {pid} served two calls");
        seen.push(pid);
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(copy, &mut status, 0) }, copy);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the forked copy's calls failed (wait status {status:#x})"
    );
}
