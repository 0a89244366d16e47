//! procpool used from inside a task: an isolated call and a whole pool,
//! each started by a worker, and nothing of theirs outliving that worker.

mod common;

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Factor {
    k: u64,
}

fn double_with_pid(n: u64) -> (u64, u32) {
    (n * 2, std::process::id())
}

/// Doubles `n` in an isolated call made by the worker itself.
fn isolated_inside(_: &ArchivedFactor, n: u64) -> Result<(u64, u32, u32), String> {
    let (doubled, inner_pid) = procpool::run_sp(double_with_pid, n).map_err(|e| e.to_string())?;
    Ok((doubled, inner_pid, std::process::id()))
}

fn times_k_with_pid(model: &ArchivedFactor, x: u64) -> (u64, u32) {
    (x * model.k.to_native(), std::process::id())
}

/// What a task that ran a pool of its own reports.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct InnerRun {
    sum: u64,
    /// The inner pool's workers, and the fork server they came from.
    inner_pids: Vec<u32>,
    worker_pid: u32,
}

/// Sums `x * k` over `0..n` on a pool of two workers started by the worker.
fn pool_inside(model: &ArchivedFactor, n: u64) -> Result<InnerRun, String> {
    let k = model.k.to_native();
    let store = procpool::persist(&Factor { k }).map_err(|e| e.to_string())?;
    let mut inner = procpool::invoker(&store, times_k_with_pid, 2).map_err(|e| e.to_string())?;
    let mut sum = 0;
    let mut inner_pids = Vec::new();
    for result in inner.map(0..n) {
        let (value, pid) = result.map_err(|e| e.to_string())?;
        sum += value;
        if !inner_pids.contains(&pid) {
            inner_pids.push(pid);
        }
    }
    let servers: Vec<u32> = inner_pids
        .iter()
        .filter_map(|&pid| common::parent_of(pid))
        .collect();
    inner_pids.extend(servers);
    Ok(InnerRun {
        sum,
        inner_pids,
        worker_pid: std::process::id(),
    })
}

#[test]
fn a_task_makes_isolated_calls() {
    let store = procpool::persist(&Factor { k: 1 }).unwrap();
    let mut inv = procpool::invoker(&store, isolated_inside, 2).unwrap();
    let mut inner_pids = Vec::new();
    for (i, result) in inv.map(0..6u64).enumerate() {
        let (doubled, inner_pid, worker_pid) = result.unwrap().unwrap();
        assert_eq!(doubled, i as u64 * 2);
        assert_ne!(inner_pid, worker_pid, "the call ran in the worker itself");
        inner_pids.push(inner_pid);
    }
    inner_pids.sort_unstable();
    inner_pids.dedup();
    assert_eq!(inner_pids.len(), 6, "each call gets a process of its own");
}

#[test]
fn a_task_runs_a_pool_and_nothing_of_it_outlives_the_worker() {
    let store = procpool::persist(&Factor { k: 3 }).unwrap();
    let mut inv = procpool::invoker(&store, pool_inside, 2).unwrap();
    let runs: Vec<InnerRun> = inv
        .map([100u64, 1_000])
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(runs[0].sum, 3 * (0..100).sum::<u64>());
    assert_eq!(runs[1].sum, 3 * (0..1_000).sum::<u64>());
    let mut inner = Vec::new();
    for run in &runs {
        assert!(
            run.inner_pids.len() >= 2,
            "the inner pool's workers and fork server: {:?}",
            run.inner_pids
        );
        assert!(!run.inner_pids.contains(&run.worker_pid));
        assert!(!run.inner_pids.contains(&std::process::id()));
        inner.extend(run.inner_pids.iter().copied());
    }
    // The inner pools' workers are gone with their invokers; their fork
    // servers stay for the workers' next calls, and go with those workers.
    assert!(
        inner.iter().any(|&pid| !common::has_exited(pid)),
        "no inner fork server left running before shutdown: {inner:?}"
    );
    inv.shutdown();
    common::assert_all_exit(&inner, "shutdown");
}

#[test]
fn an_inner_fork_server_dies_with_a_killed_worker() {
    let store = procpool::persist(&Factor { k: 2 }).unwrap();
    let mut inv = procpool::invoker(&store, pool_inside, 2).unwrap();
    let run = inv.map([50u64]).next().unwrap().unwrap().unwrap();
    assert_eq!(run.sum, 2 * (0..50).sum::<u64>());
    let alive: Vec<u32> = run
        .inner_pids
        .iter()
        .copied()
        .filter(|&pid| !common::has_exited(pid))
        .collect();
    assert!(!alive.is_empty(), "no inner fork server running");
    // SAFETY: kill sends a signal; the pid is a worker of this test's pool.
    let sent = unsafe { libc::kill(run.worker_pid as i32, libc::SIGKILL) };
    assert_eq!(sent, 0);
    common::assert_all_exit(&alive, "its worker's SIGKILL");
    // The pool replaces the worker and goes on.
    let again = inv.map([10u64]).next().unwrap().unwrap().unwrap();
    assert_eq!(again.sum, 2 * (0..10).sum::<u64>());
}
