//! Nothing is left behind: after a program that used pools exits, none of
//! its processes (fork server, workers) remain, and no file was created.

mod common;

use common::*;
use std::process::Command;
use std::sync::Mutex;

/// The parent-side tests look for stray processes of this binary, so they
/// must not see each other's: they run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn child_program_using_pools() {
    if std::env::var_os("CLEANUP_CHILD").is_none() {
        return;
    }
    let store = procpool::persist(&small()).unwrap();
    let mut kept = procpool::invoker(&store, add_offset, 2).unwrap();
    let got: Vec<u64> = kept.map(0..1000u64).collect::<Result<_, _>>().unwrap();
    assert_eq!(got.len(), 1000);
    for pid in kept.worker_pids() {
        println!("worker-pid {pid}");
    }
    {
        let mut dropped = procpool::invoker(&store, add_offset, 2).unwrap();
        assert_eq!(dropped.map(0..10u64).count(), 10);
    }
    // `kept` is still alive when the program ends: its workers must go too.
    std::mem::forget(kept);
}

/// A zombie waiting for a reaper we do not control has released everything.
fn alive(pid: u32) -> bool {
    !has_exited(pid)
}

/// Processes running this test binary that are not us or our descendants.
fn strays() -> Vec<u32> {
    let me = std::process::id();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me
            || std::fs::read_link(format!("/proc/{pid}/exe")).ok().as_ref() != Some(&exe)
            || !alive(pid)
        {
            continue;
        }
        let mut p = pid;
        let mut ours = false;
        while let Some(pp) = parent_of(p) {
            if pp == me {
                ours = true;
                break;
            }
            if pp <= 1 {
                break;
            }
            p = pp;
        }
        if !ours {
            found.push(pid);
        }
    }
    found
}

fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.retain(|n| n.contains("procpool"));
    names.sort();
    names
}

/// Within 2 s, none of `workers` and no stray process of this binary but
/// `bystander` is alive, and /dev/shm and the temp dir list what they did before.
fn assert_nothing_left(
    workers: &[u32],
    bystander: Option<u32>,
    (shm_before, tmp_before): (&[String], &[String]),
    context: &str,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let left: Vec<u32> = workers
            .iter()
            .copied()
            .filter(|p| alive(*p))
            .chain(strays())
            .filter(|p| Some(*p) != bystander)
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes left behind {context}: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(listing("/dev/shm".as_ref()), shm_before, "{context}");
    assert_eq!(listing(&std::env::temp_dir()), tmp_before, "{context}");
}

#[test]
fn no_process_or_file_outlives_the_program() {
    let _serial = one_at_a_time();
    let shm_before = listing("/dev/shm".as_ref());
    let tmp_before = listing(&std::env::temp_dir());
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_program_using_pools",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CLEANUP_CHILD", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let workers: Vec<u32> = stdout
        .lines()
        .filter_map(|l| l.split("worker-pid ").nth(1)?.trim().parse().ok())
        .collect();
    assert_eq!(workers.len(), 2, "{stdout}");
    assert_nothing_left(
        &workers,
        None,
        (&shm_before, &tmp_before),
        "after a normal exit",
    );
}

fn forever(_: &ArchivedSmall, _: u64) -> u64 {
    std::thread::sleep(std::time::Duration::from_secs(600));
    0
}

fn sleep_long(_: ()) {
    std::thread::sleep(std::time::Duration::from_secs(600));
}

#[test]
fn child_program_killed_mid_work() {
    if std::env::var_os("KILLED_CHILD").is_none() {
        return;
    }
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::invoker(&store, forever, 2).unwrap();
    // The workers must neither die with the thread that started them nor
    // outlive this process.
    let mut spawned = spawn_pool_on_a_thread_that_ends(&store, forever);
    for pid in inv.worker_pids().into_iter().chain(spawned.worker_pids()) {
        println!("worker-pid {pid}");
    }
    std::thread::spawn(move || inv.map(0..10u64).next());
    std::thread::spawn(move || spawned.map(0..10u64).next());
    std::thread::spawn(|| procpool::run_sp(sleep_long, ()));
    std::thread::sleep(std::time::Duration::from_millis(500));
    if std::env::var_os("WITH_BYSTANDER").is_some() {
        // A plain fork that outlives us and holds a copy of every descriptor
        // we had, the links to the fork server and to the workers among them.
        // SAFETY: the child calls only pause, which is async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            loop {
                // SAFETY: as above.
                unsafe { libc::pause() };
            }
        }
        println!("bystander-pid {pid}");
    }
    println!("ready");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(600));
}

/// A `Spawn` pool of 2 workers, built on a thread that has ended by the time
/// this returns.
fn spawn_pool_on_a_thread_that_ends(
    store: &procpool::ModelStore<Small>,
    func: procpool::TaskFn<Small, u64, u64>,
) -> procpool::Invoker<Small, u64, u64> {
    let store = store.clone();
    std::thread::spawn(move || {
        procpool::InvokerBuilder::new(&store, func)
            .n_jobs(2)
            .start_method(procpool::StartMethod::Spawn)
            .build()
            .unwrap()
    })
    .join()
    .unwrap()
}

/// Kills a process we cannot reap (its parent was killed) when dropped.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: a plain kill of a process this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Runs `child_program_killed_mid_work`, kills it with SIGKILL once its
/// work is in flight, and checks that nothing of it is left.
fn kill_parent_mid_work(with_bystander: bool) {
    use std::io::BufRead;
    let _serial = one_at_a_time();
    let shm_before = listing("/dev/shm".as_ref());
    let tmp_before = listing(&std::env::temp_dir());
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "child_program_killed_mid_work",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILLED_CHILD", "1")
        .stdout(std::process::Stdio::piped());
    if with_bystander {
        command.env("WITH_BYSTANDER", "1");
    }
    let mut child = command.spawn().unwrap();
    let mut workers = Vec::new();
    let mut bystander = KillOnDrop(None);
    let stdout = child.stdout.take().unwrap();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(pid) = line.split("worker-pid ").nth(1) {
            workers.push(pid.trim().parse::<u32>().unwrap());
        }
        if let Some(pid) = line.split("bystander-pid ").nth(1) {
            bystander.0 = Some(pid.trim().parse::<u32>().unwrap());
        }
        if line.contains("ready") {
            break;
        }
    }
    assert_eq!(workers.len(), 4);
    assert_eq!(bystander.0.is_some(), with_bystander);
    // Its descendants now: the fork server, the pools' workers, the isolated call.
    let before_kill = strays();
    child.kill().unwrap();
    child.wait().unwrap();
    let context = format!("after SIGKILL (its descendants before: {before_kill:?})");
    assert_nothing_left(&workers, bystander.0, (&shm_before, &tmp_before), &context);
    if let Some(pid) = bystander.0 {
        assert!(alive(pid), "the bystander itself must still be running");
    }
}

#[test]
fn sigkill_of_the_parent_leaves_nothing_behind() {
    kill_parent_mid_work(false);
}

#[test]
fn sigkill_of_the_parent_leaves_nothing_behind_while_a_fork_of_it_lives() {
    kill_parent_mid_work(true);
}

fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn workers_started_from_a_thread_that_ended_live_on() {
    let store = procpool::persist(&small()).unwrap();
    let mut inv = spawn_pool_on_a_thread_that_ends(&store, add_offset);
    // The starting thread is gone; a death signal tied to it would have
    // killed the workers by now.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let pids = inv.worker_pids();
    assert_eq!(pids.len(), 2);
    for pid in &pids {
        assert!(
            alive(*pid),
            "worker {pid} died with the thread that started it"
        );
        // It watches this process instead.
        assert!(
            thread_names(*pid).contains(&"procpool-parent".to_string()),
            "worker {pid} threads: {:?}",
            thread_names(*pid)
        );
    }
    let got: Vec<u64> = inv.map(0..100u64).collect::<Result<_, _>>().unwrap();
    let want: Vec<u64> = (0..100).map(add_offset_serial).collect();
    assert_eq!(got, want);
    assert_eq!(inv.worker_pids(), pids, "no worker was replaced");
}
