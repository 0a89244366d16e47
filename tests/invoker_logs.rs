//! Worker log records reach the parent's logger, all of them, in order.

mod common;

use common::*;

fn log_each(_: &ArchivedSmall, x: u64) -> u64 {
    log::info!(target: "score", "record {x}");
    log::debug!("debug records are filtered out in the worker");
    x
}

#[test]
fn four_workers_times_ten_thousand_records_all_arrive_in_order() {
    capture_logs(log::LevelFilter::Info);
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::invoker(&store, log_each, 4).unwrap();
    let total = 40_000u64;
    let got: Vec<u64> = inv.map(0..total).collect::<Result<_, _>>().unwrap();
    assert_eq!(got.len() as u64, total);
    inv.shutdown();
    let records: Vec<Captured> = take_logs()
        .into_iter()
        .filter(|r| r.target == "score")
        .collect();
    assert_eq!(records.len() as u64, total, "every record arrives");
    let mut seen = vec![false; total as usize];
    let mut last_per_worker = std::collections::HashMap::new();
    for r in &records {
        assert_eq!(r.level, log::Level::Info);
        let task = r.task.expect("task key-value");
        let worker = r.worker.expect("worker key-value");
        assert_eq!(r.message, format!("record {task}"));
        assert!(!seen[task as usize], "record {task} twice");
        seen[task as usize] = true;
        if let Some(prev) = last_per_worker.insert(worker, task) {
            assert!(prev < task, "worker {worker}: record {task} after {prev}");
        }
    }
    assert!(
        last_per_worker.len() >= 2,
        "records came from several workers: {last_per_worker:?}"
    );
    assert!(take_logs().iter().all(|r| r.level <= log::Level::Info));
}
