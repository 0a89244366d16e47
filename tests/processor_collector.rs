//! The processor with a collector (pyrallel's ParallelProcessor): tasks
//! added one by one, results collected here as they complete.

mod common;

use common::*;
use std::cell::RefCell;
use std::time::Duration;

fn heavy_calculation((x, y): (u64, u64)) -> (u64, u64) {
    (x * x, y + 5)
}

#[test]
fn the_seeds_example_for_1_2_and_4_jobs() {
    for n_jobs in [1, 2, 4] {
        let mut result = Vec::new();
        let mut pp = procpool::processor(heavy_calculation, n_jobs, |_, r: Result<_, _>| {
            let (r1, r2) = r.unwrap();
            result.push(r1.max(r2));
        })
        .unwrap();
        for i in 0..8 {
            pp.add_task((i, i + 1)).unwrap();
        }
        assert_eq!(pp.join().unwrap().done, 8);
        result.sort_unstable();
        assert_eq!(result, [6, 7, 8, 9, 16, 25, 36, 49], "n_jobs {n_jobs}");
    }
}

fn square(x: u64) -> u64 {
    if x == 500 {
        panic!("500 fails");
    }
    x * x
}

#[test]
fn every_task_is_collected_once_with_its_index() {
    for n_jobs in [1, 2, 4] {
        for chunk in [None, Some(1), Some(64)] {
            let mut seen = vec![0u32; 10_000];
            let mut errors = Vec::new();
            let mut builder = procpool::ProcessorBuilder::new(square).n_jobs(n_jobs);
            if let Some(chunk) = chunk {
                builder = builder.chunk_size(chunk);
            }
            let mut pp = builder
                .build(|i, r: Result<u64, procpool::TaskError>| {
                    seen[i as usize] += 1;
                    match r {
                        Ok(v) => assert_eq!(v, i * i),
                        Err(e) => errors.push((i, e.panic_message().map(str::to_string))),
                    }
                })
                .unwrap();
            for x in 0..10_000u64 {
                assert_eq!(pp.add_task(x).unwrap(), x);
            }
            let summary = pp.join().unwrap();
            assert_eq!(
                summary,
                procpool::Summary {
                    done: 9_999,
                    failed: 1
                }
            );
            assert!(
                seen.iter().all(|&n| n == 1),
                "n_jobs {n_jobs}, chunk {chunk:?}"
            );
            assert_eq!(errors, [(500, Some("500 fails".to_string()))]);
        }
    }
}

fn slow(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(5));
    x
}

#[test]
fn add_task_blocks_while_the_workers_are_full() {
    let collected = RefCell::new(0u64);
    let mut pp = procpool::ProcessorBuilder::new(slow)
        .n_jobs(2)
        .chunk_size(1)
        .build(|_, r: Result<u64, _>| {
            r.unwrap();
            *collected.borrow_mut() += 1;
        })
        .unwrap();
    let mut most_ahead = 0;
    for x in 0..200u64 {
        pp.add_task(x).unwrap();
        most_ahead = most_ahead.max(x + 1 - *collected.borrow());
    }
    // Two workers hold two batches of one task each, and one waits here.
    assert!(most_ahead <= 6, "{most_ahead} tasks ahead of the collector");
    pp.join().unwrap();
    assert_eq!(*collected.borrow(), 200);
}

fn double(x: u64) -> u64 {
    x * 2
}

#[test]
fn a_panic_in_the_collector_ends_join_with_its_error() {
    for n_jobs in [1, 2] {
        let mut pp = procpool::processor(double, n_jobs, |i, _: Result<u64, _>| {
            if i == 30 {
                panic!("the collector gives up");
            }
        })
        .unwrap();
        let mut refused = None;
        for x in 0..1_000u64 {
            if let Err(e) = pp.add_task(x) {
                refused = Some(e);
                break;
            }
        }
        let err = match refused {
            Some(e) => e,
            None => pp.join().unwrap_err(),
        };
        assert_eq!(err.task_index(), 30, "{err}");
        assert_eq!(err.panic_message(), Some("the collector gives up"));
    }
}

fn kill_at_77(x: u64) -> u64 {
    if x == 77 {
        // SAFETY: kill on our own pid only ends this worker.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    x
}

#[test]
fn a_worker_killed_mid_job_fails_its_task_alone() {
    no_core_dumps();
    let mut seen = vec![0u32; 300];
    let mut failed = Vec::new();
    let mut pp = procpool::processor(kill_at_77, 2, |i, r: Result<u64, procpool::TaskError>| {
        seen[i as usize] += 1;
        if let Err(e) = r {
            failed.push((i, e.signal()));
        }
    })
    .unwrap();
    for x in 0..300u64 {
        pp.add_task(x).unwrap();
    }
    let summary = pp.join().unwrap();
    assert_eq!(
        summary,
        procpool::Summary {
            done: 299,
            failed: 1
        }
    );
    assert!(seen.iter().all(|&n| n == 1));
    assert_eq!(failed, [(77, Some(libc::SIGKILL))]);
}

fn sleepy(x: u64) -> u64 {
    std::thread::sleep(Duration::from_secs(30));
    x
}

#[test]
fn dropping_it_without_join_stops_the_workers_promptly() {
    let started = std::time::Instant::now();
    let mut pp = procpool::processor(sleepy, 2, |_, _: Result<u64, _>| {}).unwrap();
    let pids = pp.worker_pids();
    assert_eq!(pids.len(), 2);
    for x in 0..2u64 {
        pp.add_task(x).unwrap();
    }
    drop(pp);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_all_exit(&pids, "the processor was dropped");
}

static INITS_HERE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Per-worker state: which worker, and how many tasks it has seen.
fn open_worker() -> (Option<u32>, u64, u32) {
    let inits = INITS_HERE.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    (procpool::worker_id(), 0, inits)
}

fn count_in_worker(state: &mut (Option<u32>, u64, u32), _: u64) -> (Option<u32>, u64, u32, u32) {
    state.1 += 1;
    (state.0, state.1, std::process::id(), state.2)
}

#[test]
fn per_worker_state_is_set_up_once_in_each_worker_and_kept() {
    for n_jobs in [1, 2, 4] {
        let mut per_process: std::collections::HashMap<u32, (Option<u32>, u64, u32)> =
            std::collections::HashMap::new();
        let mut pp = procpool::ProcessorBuilder::with_state(open_worker, count_in_worker)
            .n_jobs(n_jobs)
            .chunk_size(10)
            .build(|_, r: Result<_, procpool::TaskError>| {
                let (id, seen, pid, inits) = r.unwrap();
                let entry = per_process.entry(pid).or_insert((id, 0, inits));
                // Counts only grow within a process: its state is kept.
                entry.1 = entry.1.max(seen);
                assert_eq!(entry.2, inits, "init ran once in process {pid}");
                assert_eq!(entry.0, id);
            })
            .unwrap();
        for x in 0..1_000u64 {
            pp.add_task(x).unwrap();
        }
        assert_eq!(pp.join().unwrap().done, 1_000);
        let total: u64 = per_process.values().map(|v| v.1).sum();
        assert_eq!(
            total, 1_000,
            "n_jobs {n_jobs}: each task counted once in one state"
        );
        assert!(per_process.len() <= n_jobs.max(1));
        if n_jobs > 1 {
            assert!(per_process.values().all(|v| v.0.is_some() && v.2 == 1));
            assert!(!per_process.contains_key(&std::process::id()));
        } else {
            assert_eq!(
                per_process.keys().collect::<Vec<_>>(),
                [&std::process::id()]
            );
            assert_eq!(per_process.values().next().unwrap().0, None);
        }
    }
}

/// A per-worker "connection" whose teardown leaves a file behind.
struct Connection {
    dir: Option<String>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let path = format!("{dir}/closed-by-{}", std::process::id());
            std::fs::write(path, b"closed").unwrap();
        }
    }
}

fn connect() -> Connection {
    Connection { dir: None }
}

fn use_connection(conn: &mut Connection, (x, dir): (u64, String)) -> u64 {
    conn.dir = Some(dir);
    x
}

#[test]
fn per_worker_state_is_torn_down_when_the_processor_joins() {
    for n_jobs in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let named = dir.path().to_string_lossy().into_owned();
        let mut pp = procpool::ProcessorBuilder::with_state(connect, use_connection)
            .n_jobs(n_jobs)
            .chunk_size(1)
            .build(|_, r: Result<u64, _>| {
                r.unwrap();
            })
            .unwrap();
        let pids = pp.worker_pids();
        for x in 0..100u64 {
            pp.add_task((x, named.clone())).unwrap();
        }
        assert_eq!(pp.join().unwrap().done, 100);
        let closed: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        if n_jobs == 1 {
            assert_eq!(closed, [format!("closed-by-{}", std::process::id())]);
        } else {
            // Every worker that set a connection up closed it as it ended.
            assert!(!closed.is_empty(), "no teardown ran");
            for name in &closed {
                let pid: u32 = name.trim_start_matches("closed-by-").parse().unwrap();
                assert!(pids.contains(&pid), "{name} is not one of {pids:?}");
            }
        }
    }
}

fn offset_plus(model: &ArchivedSmall, x: u64) -> u64 {
    x + model.offset.to_native()
}

#[test]
fn a_mapper_may_read_a_shared_model() {
    let store = procpool::persist(&small()).unwrap();
    for n_jobs in [1, 2] {
        let mut sum = 0;
        let mut pp = procpool::ProcessorBuilder::with_model(&store, offset_plus)
            .n_jobs(n_jobs)
            .build(|_, r: Result<u64, _>| sum += r.unwrap())
            .unwrap();
        for x in 0..100u64 {
            pp.add_task(x).unwrap();
        }
        assert_eq!(pp.join().unwrap().done, 100);
        assert_eq!(sum, 4_950 + 100 * 7, "n_jobs {n_jobs}");
    }
}
