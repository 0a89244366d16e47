//! A parent that ignores SIGCHLD, as some servers and daemons do. The
//! disposition is inherited across `exec`; the fork server resets it, so a
//! crash is still reported with its signal and its stderr, and a start
//! method whose workers this process reaps itself refuses to start rather
//! than report every crash as an unknown death.
//!
//! One test alone in its binary: the disposition is the whole process's.

mod common;

use common::*;

fn abort_at_7(_: &ArchivedSmall, x: u64) -> u64 {
    if x == 7 {
        eprintln!("task 7 aborts now");
        std::process::abort();
    }
    x
}

fn abort_now(_: u64) -> u64 {
    eprintln!("the isolated call aborts now");
    std::process::abort();
}

fn reap_status_of_own_child(_: u64) -> Option<i32> {
    // A task's own children report how they ended, as in any program.
    let status = std::process::Command::new("sh")
        .args(["-c", "exit 5"])
        .status()
        .ok()?;
    status.code()
}

#[test]
fn a_parent_that_ignores_sigchld_still_learns_how_workers_died() {
    no_core_dumps();
    // SAFETY: signal with a constant disposition, before this test starts
    // any thread or process.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    assert!(procpool_worker::sys::child_exits_discarded());

    let store = procpool::persist(&small()).unwrap();
    for n_jobs in [2, 4] {
        let mut inv = procpool::InvokerBuilder::new(&store, abort_at_7)
            .n_jobs(n_jobs)
            .max_tries(1)
            .build()
            .unwrap();
        let outcomes: Vec<_> = inv.map(0..20u64).collect();
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                Ok(v) => assert_eq!(*v, i as u64),
                Err(e) => {
                    assert_eq!(i, 7, "{e}");
                    assert!(e.is_crash(), "{e}");
                    assert_eq!(e.signal(), Some(libc::SIGABRT), "{e}");
                    assert!(
                        e.stderr_tail()
                            .unwrap_or_default()
                            .contains("task 7 aborts now"),
                        "{e}: {:?}",
                        e.stderr_tail()
                    );
                }
            }
        }
        assert!(outcomes[7].is_err());
    }

    let err = procpool::run_sp(abort_now, 1).unwrap_err();
    assert_eq!(err.signal(), Some(libc::SIGABRT), "{err}");
    assert!(
        err.stderr_tail()
            .unwrap_or_default()
            .contains("the isolated call aborts now"),
        "{err}"
    );

    assert_eq!(
        procpool::run_sp(reap_status_of_own_child, 0).unwrap(),
        Some(5)
    );

    // Spawned workers are this process's children: their status would be
    // lost, so the pool says why it will not start them.
    let err = procpool::InvokerBuilder::new(&store, abort_at_7)
        .n_jobs(2)
        .start_method(procpool::StartMethod::Spawn)
        .build()
        .unwrap_err();
    assert!(err.is_refused(), "{err}");
    assert!(err.to_string().contains("SIGCHLD is ignored"), "{err}");
    let err = procpool::Isolated::new(abort_now)
        .start_method(procpool::StartMethod::Spawn)
        .run(1)
        .unwrap_err();
    assert!(err.to_string().contains("SIGCHLD is ignored"), "{err}");
}
