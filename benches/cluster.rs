//! Cluster mode on one machine: a local nats-server (JetStream, a fresh
//! store), node agents that are this program run again, and a client.
//!
//! `cargo bench --features cluster --bench cluster` (needs `nats-server` on
//! the PATH) prints a few lines, then as its last line one JSON object:
//! `{"bench":"cluster","items_per_s_1_agent":…,"items_per_s_2_agents":…,
//! "round_trip_ms":…,"first_result_ms":…,"agent_kill_recovery_s":…}`:
//!
//! - 1,000,000 trivial tasks (`x * x`) in batches of 1,000, with 1 agent and
//!   with 2 (each agent a pool of 1 worker: 2 CPUs in all), median of 3;
//! - one task's round trip with idle agents: a map of one argument, median
//!   of 1,000;
//! - from the client's start (connect) to its first result, agents running,
//!   median of 20;
//! - 2 agents, 4,000 tasks of 2 ms: the time from killing one agent (1 s
//!   into the job) to the job's end, every result checked (the server gives
//!   the dead agent's batches to the other after `ack_wait`, 2 s here).

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use procpool::cluster::{AgentOptions, Cluster, Registry};

const AGENT_URL: &str = "PROCPOOL_BENCH_AGENT_URL";

fn square(x: u64) -> u64 {
    x * x
}

fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(2));
    x * x
}

fn registry() -> Registry {
    Registry::new()
        .map("square", square)
        .map("slow_square", slow_square)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(url: &str) -> Killed {
    let child = Command::new(std::env::current_exe().expect("this program"))
        .env(AGENT_URL, url)
        .stdout(Stdio::null())
        .spawn()
        .expect("an agent");
    Killed(child)
}

fn main() {
    procpool::init();
    if let Ok(url) = std::env::var(AGENT_URL) {
        let options = AgentOptions {
            n_jobs: Some(1),
            ack_wait: Duration::from_secs(2),
            max_deliver: 5,
            ..AgentOptions::default()
        };
        let outcome = procpool::cluster::run_agent(&url, &registry(), &options);
        eprintln!("agent ended: {outcome:?}");
        std::process::exit(1);
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = tempfile::tempdir().unwrap();
    let _server = Killed(
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on the PATH"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nats://127.0.0.1:{port}");
    let registry = registry();
    let connect = || {
        Cluster::connect(&url)
            .unwrap()
            .timeout(Duration::from_secs(300))
    };

    let mut rates = [0.0; 2];
    let mut agents = vec![agent(&url)];
    for (slot, n) in [(0, 1), (1, 2)] {
        while agents.len() < n {
            agents.push(agent(&url));
        }
        let mut cluster = connect();
        // Warm-up: the agents start their pools.
        cluster
            .map::<u64, u64>(&registry, "square", 0..10_000u64)
            .unwrap();
        let mut runs = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let results = cluster
                .map::<u64, u64>(&registry, "square", 0..1_000_000u64)
                .unwrap();
            runs.push(1e6 / started.elapsed().as_secs_f64());
            assert!(
                results
                    .iter()
                    .enumerate()
                    .all(|(x, r)| *r == Ok((x * x) as u64))
            );
        }
        rates[slot] = median(runs);
    }

    let mut cluster = connect();
    let mut trips = Vec::new();
    for x in 0..1_000u64 {
        let started = Instant::now();
        let results = cluster.map::<u64, u64>(&registry, "square", [x]).unwrap();
        trips.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(results, [Ok(x * x)]);
    }
    let round_trip_ms = median(trips);

    let mut firsts = Vec::new();
    for x in 0..20u64 {
        let started = Instant::now();
        let mut cluster = connect();
        let results = cluster.map::<u64, u64>(&registry, "square", [x]).unwrap();
        firsts.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(results, [Ok(x * x)]);
    }
    let first_result_ms = median(firsts);

    let doomed = agents.remove(0);
    let job_url = url.clone();
    let job = std::thread::spawn(move || {
        let mut cluster = Cluster::connect(&job_url).unwrap().chunk_size(20);
        let results = cluster
            .map::<u64, u64>(&registry, "slow_square", 0..4_000u64)
            .unwrap();
        (results, Instant::now())
    });
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    drop(doomed);
    let (results, ended) = job.join().unwrap();
    assert!(
        results
            .iter()
            .enumerate()
            .all(|(x, r)| *r == Ok((x * x) as u64))
    );
    let recovery_s = (ended - killed).as_secs_f64();

    println!("cluster mode, one machine, local nats-server");
    println!(
        "  1,000,000 trivial tasks: {:.0} items/s with 1 agent, {:.0} with 2",
        rates[0], rates[1]
    );
    println!("  one task's round trip, idle agents: {round_trip_ms:.2} ms (median of 1,000)");
    println!("  client start to first result: {first_result_ms:.1} ms (median of 20)");
    println!(
        "  an agent killed 1 s into a 4,000 × 2 ms job: done {recovery_s:.2} s later, every result once"
    );
    println!(
        "{{\"bench\":\"cluster\",\"items_per_s_1_agent\":{:.0},\"items_per_s_2_agents\":{:.0},\"round_trip_ms\":{round_trip_ms:.3},\"first_result_ms\":{first_result_ms:.2},\"agent_kill_recovery_s\":{recovery_s:.2}}}",
        rates[0], rates[1]
    );
}
