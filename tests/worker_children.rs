//! A task may start processes of its own, by `Command` or by a plain
//! `fork`. They must not inherit the worker's links to the parent: a child
//! that outlives a crashed worker would otherwise hold its link open and
//! hide the death, and any child could read batches meant for the worker.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a child process of the task holds of the worker's own descriptors:
/// its link to the parent (at 3 and 4) and its shared memory.
fn worker_descriptors_in_a_child() -> Vec<String> {
    let target = |path: String| {
        std::fs::read_link(path)
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let link = [
        target("/proc/self/fd/3".into()),
        target("/proc/self/fd/4".into()),
    ];
    assert!(link.iter().all(|t| t.starts_with("pipe:")), "{link:?}");
    let mut child = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("cannot start sleep");
    let mut held: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .map(|d| {
            d.flatten()
                .map(|e| target(e.path().to_string_lossy().into_owned()))
                .filter(|t| link.contains(t) || t.contains("procpool"))
                .collect()
        })
        .unwrap_or_else(|e| vec![format!("cannot list: {e}")]);
    let _ = child.kill();
    let _ = child.wait();
    held.sort();
    held
}

fn pool_child_descriptors(_: &ArchivedSmall, _: u64) -> Vec<String> {
    worker_descriptors_in_a_child()
}

fn isolated_child_descriptors(_: ()) -> Vec<String> {
    worker_descriptors_in_a_child()
}

/// What the programs left behind by crashed tasks call themselves.
const ORPHAN_NAME: &str = "procpool-test-orphan";

/// Starts a program that outlives this process, then aborts.
fn leave_an_orphan_and_abort() -> ! {
    let _ = Command::new("sleep")
        .arg0(ORPHAN_NAME)
        .arg("20")
        .stdin(Stdio::null())
        .spawn();
    std::process::abort();
}

fn orphan_then_abort(_: &ArchivedSmall, x: u64) -> u64 {
    if x == 1 {
        leave_an_orphan_and_abort();
    }
    x
}

fn isolated_orphan_then_abort(_: ()) {
    leave_an_orphan_and_abort();
}

/// What the forked copies left behind by crashed tasks call themselves
/// (their `comm`: they run this test program, so share its command line).
const FORKED_ORPHAN_COMM: &str = "pp-fork-orphan";

/// Forks a copy of the worker that outlives it, then aborts.
fn fork_an_orphan_and_abort() -> ! {
    // SAFETY: the copy makes only async-signal-safe calls (prctl, nanosleep,
    // _exit) before it ends.
    if unsafe { libc::fork() } == 0 {
        // SAFETY: as above; the name is a NUL-terminated literal.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, c"pp-fork-orphan".as_ptr());
            libc::sleep(20);
            libc::_exit(0);
        }
    }
    std::process::abort();
}

fn fork_then_abort(_: &ArchivedSmall, x: u64) -> u64 {
    if x == 1 {
        fork_an_orphan_and_abort();
    }
    x
}

fn isolated_fork_then_abort(_: ()) {
    fork_an_orphan_and_abort();
}

/// Forks, and both processes return from the task; the worker waits up to
/// 5 s for the copy and returns its own result with the copy's wait status
/// (-1 if it was still running).
fn fork_and_return_in_both(_: &ArchivedSmall, x: u64) -> (u64, i32) {
    // SAFETY: the copy returns from this function into the worker's code,
    // which is what the test checks; nothing here holds a lock.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        log::warn!("from the forked copy of task {x}");
        return (x * 1000, 0);
    }
    for _ in 0..500 {
        let mut status = 0;
        // SAFETY: a non-blocking wait for our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            return (x * 2, status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: our own child, still unreaped.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    (x * 2, -1)
}

/// Kills every process for which `left_behind` says yes, given its pid;
/// returns how many.
/// Waits up to 5 s for `expected` living processes that `left_behind`
/// matches (one that a crashed task left may not have run far enough to be
/// told apart when the crash is reported), then kills them; returns how
/// many there were.
fn kill_processes(expected: usize, left_behind: impl Fn(libc::pid_t) -> bool) -> usize {
    let started = Instant::now();
    let mut found = living_processes(&left_behind);
    while found.len() < expected && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
        found = living_processes(&left_behind);
    }
    for &pid in &found {
        // SAFETY: a plain kill of a process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    found.len()
}

/// The processes, zombies aside, that `matches`.
fn living_processes(matches: impl Fn(libc::pid_t) -> bool) -> Vec<libc::pid_t> {
    all_pids()
        .into_iter()
        .filter(|pid| !has_exited(*pid) && matches(*pid as libc::pid_t))
        .map(|pid| pid as libc::pid_t)
        .collect()
}

/// Ends the forked copies `fork_an_orphan_and_abort` left, once `expected`
/// are there; returns how many there were.
fn kill_forked_orphans(expected: usize) -> usize {
    kill_processes(expected, |pid| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        comm.trim_end() == FORKED_ORPHAN_COMM
    })
}

/// Ends the programs `leave_an_orphan_and_abort` left, once `expected` are
/// there; returns how many there were.
fn kill_orphans(expected: usize) -> usize {
    kill_processes(expected, |pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        cmdline.split(|b| *b == 0).next() == Some(ORPHAN_NAME.as_bytes())
    })
}

fn methods() -> [(&'static str, procpool::StartMethod); 2] {
    [
        ("fork server", procpool::StartMethod::ForkServer),
        ("spawn", procpool::StartMethod::Spawn),
    ]
}

#[test]
fn a_task_child_inherits_none_of_the_worker_descriptors() {
    let store = procpool::persist(&small()).unwrap();
    for (name, method) in methods() {
        let mut inv = procpool::InvokerBuilder::new(&store, pool_child_descriptors)
            .n_jobs(2)
            .start_method(method)
            .build()
            .unwrap();
        for fds in inv.map(0..2u64) {
            assert_eq!(fds.unwrap(), Vec::<String>::new(), "{name}");
        }
    }
    let fds = procpool::run_sp(isolated_child_descriptors, ()).unwrap();
    assert_eq!(fds, Vec::<String>::new(), "run_sp");
}

/// Runs `pool_task`, whose item 1 leaves a process behind and aborts, in a
/// pool of each start method, and `isolated_task` (the same) in `run_sp`:
/// each abort must be reported as SIGABRT within 10 s, and the pool's other
/// items must succeed.
fn assert_crash_seen_at_once(pool_task: fn(&ArchivedSmall, u64) -> u64, isolated_task: fn(())) {
    no_core_dumps();
    let store = procpool::persist(&small()).unwrap();
    for (name, method) in methods() {
        let started = Instant::now();
        let mut inv = procpool::InvokerBuilder::new(&store, pool_task)
            .n_jobs(2)
            .max_tries(1)
            .start_method(method)
            .build()
            .unwrap();
        let results: Vec<_> = inv.map(0..4u64).collect();
        let err = results[1].as_ref().unwrap_err();
        assert_eq!(err.signal(), Some(libc::SIGABRT), "{name}: {err}");
        for (i, r) in results.iter().enumerate().filter(|(i, _)| *i != 1) {
            assert_eq!(r.as_ref().unwrap(), &(i as u64), "{name}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: took {:?}",
            started.elapsed()
        );
    }
    let started = Instant::now();
    let err = procpool::run_sp(isolated_task, ()).unwrap_err();
    assert_eq!(err.signal(), Some(libc::SIGABRT), "run_sp: {err}");
    assert!(started.elapsed() < Duration::from_secs(10), "run_sp");
}

#[test]
fn a_crash_is_seen_at_once_while_a_child_of_the_task_lives() {
    assert_crash_seen_at_once(orphan_then_abort, isolated_orphan_then_abort);
    // One per pool (the crashing task is not retried) and one for run_sp:
    // the case really had a program outlive the crash.
    assert_eq!(kill_orphans(3), 3);
}

#[test]
fn a_crash_is_seen_at_once_while_a_forked_copy_of_the_worker_lives() {
    assert_crash_seen_at_once(fork_then_abort, isolated_fork_then_abort);
    // The copies really outlived the crashes.
    assert_eq!(kill_forked_orphans(3), 3);
}

#[test]
fn a_forked_copy_returning_from_a_task_ends_without_touching_the_batch() {
    let store = procpool::persist(&small()).unwrap();
    for (name, method) in methods() {
        let mut inv = procpool::InvokerBuilder::new(&store, fork_and_return_in_both)
            .n_jobs(2)
            .chunk_size(4)
            .start_method(method)
            .build()
            .unwrap();
        for _ in 0..2 {
            let results: Vec<_> = inv.map(0..12u64).map(|r| r.unwrap()).collect();
            for (i, (value, copy_status)) in results.into_iter().enumerate() {
                assert_eq!(value, i as u64 * 2, "{name}: task {i}");
                // The copy exited 0 on its own, at once.
                assert!(
                    libc::WIFEXITED(copy_status) && libc::WEXITSTATUS(copy_status) == 0,
                    "{name}: task {i}: the copy ended with status {copy_status}"
                );
            }
        }
    }
}
