//! Progress reports: counts of tasks submitted, done and failed, reported
//! from this process as results arrive and once at the end.

use std::sync::{Arc, Mutex};

use procpool::Progress;

fn fail_on_multiples_of_100(x: u64) -> u64 {
    if x.is_multiple_of(100) {
        panic!("{x} fails");
    }
    x
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// A callback that keeps every report, and the reports it kept.
fn recorder() -> (
    impl Fn(&Progress) + Send + Sync + 'static,
    Arc<Mutex<Vec<Progress>>>,
) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&reports);
    (move |p: &Progress| kept.lock().unwrap().push(*p), reports)
}

/// The reports only grow, and the last counts every task.
fn check(reports: &[Progress], tasks: u64, failed: u64, what: &str) {
    let last = reports
        .last()
        .unwrap_or_else(|| panic!("{what}: no report"));
    assert_eq!(
        (last.submitted, last.done, last.failed),
        (tasks, tasks - failed, failed),
        "{what}"
    );
    for pair in reports.windows(2) {
        assert!(
            pair[0].done <= pair[1].done && pair[0].submitted <= pair[1].submitted,
            "{what}"
        );
        assert!(pair[0].elapsed <= pair[1].elapsed, "{what}");
    }
}

#[test]
fn a_pools_map_reports_its_progress_for_any_n_jobs() {
    for n_jobs in [1, 2, 4] {
        let (callback, reports) = recorder();
        let mut pool = procpool::PoolBuilder::new(fail_on_multiples_of_100)
            .n_jobs(n_jobs)
            .on_progress(callback)
            .build()
            .unwrap();
        assert_eq!(pool.map(0..20_000u64).count(), 20_000);
        check(
            &reports.lock().unwrap(),
            20_000,
            200,
            &format!("map, n_jobs {n_jobs}"),
        );
        // A second map starts from zero.
        reports.lock().unwrap().clear();
        assert_eq!(pool.map_unordered(0..50u64).count(), 50);
        check(&reports.lock().unwrap(), 50, 1, "second map");
    }
}

#[test]
fn a_processor_and_a_map_reduce_report_their_progress() {
    for n_jobs in [1, 2] {
        let (callback, reports) = recorder();
        let mut pp = procpool::ProcessorBuilder::new(fail_on_multiples_of_100)
            .n_jobs(n_jobs)
            .on_progress(callback)
            .build(|_, _| {})
            .unwrap();
        for x in 0..5_000u64 {
            pp.add_task(x).unwrap();
        }
        pp.join().unwrap();
        check(
            &reports.lock().unwrap(),
            5_000,
            50,
            &format!("processor, n_jobs {n_jobs}"),
        );

        let (callback, reports) = recorder();
        let mut sum = procpool::MapReduceBuilder::new(|x: u64| x, add)
            .n_jobs(n_jobs)
            .on_progress(callback)
            .build()
            .unwrap();
        assert_eq!(sum.run(0..10_000u64).unwrap(), Some(49_995_000));
        check(
            &reports.lock().unwrap(),
            10_000,
            0,
            &format!("map-reduce, n_jobs {n_jobs}"),
        );
    }
}
