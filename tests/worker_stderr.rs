//! A worker's stderr reaches the parent's stderr, each line prefixed.

mod common;

use common::*;
use std::process::Command;

fn shout(_: &ArchivedSmall, x: u64) -> u64 {
    eprintln!("hello from task {x}");
    x
}

#[test]
fn child_program_with_a_shouting_worker() {
    if std::env::var_os("STDERR_CHILD").is_none() {
        return;
    }
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::invoker(&store, shout, 2).unwrap();
    let got: Vec<u64> = inv.map(0..4u64).collect::<Result<_, _>>().unwrap();
    assert_eq!(got, vec![0, 1, 2, 3]);
}

#[test]
fn worker_stderr_is_forwarded_with_a_prefix() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_program_with_a_shouting_worker",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STDERR_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stderr}");
    for x in 0..4 {
        let found = stderr.lines().any(|l| {
            l.starts_with("[procpool worker ") && l.ends_with(&format!("] hello from task {x}"))
        });
        assert!(found, "line for task {x} missing in:\n{stderr}");
    }
}
