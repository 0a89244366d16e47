//! Cluster mode with a real nats-server on a free loopback port and node
//! agents in separate processes (this test binary, run again as an agent),
//! each stopped by pid. Every wait is bounded.

#![cfg(feature = "cluster")]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use procpool::cluster::{AgentOptions, Cluster, NatsOptions, Registry};

/// The ids-not-records example's functions, run here as its users would.
#[allow(dead_code)]
#[path = "../examples/cluster_ids.rs"]
mod cluster_ids;

const AGENT_URL: &str = "PROCPOOL_TEST_AGENT_URL";
/// `user:password` for the agent, when the server asks for them.
const AGENT_LOGIN: &str = "PROCPOOL_TEST_AGENT_LOGIN";

fn square(x: u64) -> u64 {
    assert!(x != 13, "thirteen");
    x * x
}

fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(2));
    x * x
}

fn abort_on_7(x: u64) -> u64 {
    if x == 7 {
        std::process::abort();
    }
    x
}

/// Kills the process group it runs in (its agent, the agent's fork server
/// and workers: a whole node) on 7.
fn kill_node_on_7(x: u64) -> u64 {
    if x == 7 {
        // SAFETY: kill(2) with pid 0 signals this process's group; it has
        // no memory-safety preconditions.
        unsafe { libc::kill(0, libc::SIGKILL) };
    }
    x
}

/// Sleeps 5 s (longer than the agents' ack_wait of 2 s) and leaves a mark
/// in the directory `MARKS` names, one per run.
fn slow_with_mark(x: u64) -> u64 {
    if let Ok(dir) = std::env::var(MARKS) {
        let path = std::path::Path::new(&dir).join(format!("{x}-{}", std::process::id()));
        let _ = std::fs::write(path, b"");
    }
    std::thread::sleep(Duration::from_secs(5));
    x + 1
}

/// Where [`slow_with_mark`] leaves its marks.
const MARKS: &str = "PROCPOOL_TEST_MARKS";
/// The model cache of an agent (its node's).
const CACHE: &str = "PROCPOOL_TEST_CACHE";

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Table {
    values: Vec<u64>,
}

fn look_up(table: &ArchivedTable, i: u64) -> u64 {
    table.values[i as usize].to_native()
}

fn registry() -> Registry {
    Registry::new()
        .map("square", square)
        .map("slow_square", slow_square)
        .map("abort_on_7", abort_on_7)
        .map("kill_node_on_7", kill_node_on_7)
        .map("slow_with_mark", slow_with_mark)
        .map_with_model::<Table, _, _>("look_up", look_up)
        .map_reduce("sum_of_squares", square, add)
        .map_reduce("sum_aborting_on_7", abort_on_7, add)
        .mapper("sum_chunk", procpool::Mapper::fold_chunks(add))
        .map("mean_rating", cluster_ids::mean_rating)
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// In a process started by [`Agent::start`]: runs the agent and never
/// returns.
fn agent_role() {
    if let Ok(url) = std::env::var(CLIENT_URL) {
        client_role(&url);
    }
    let Ok(url) = std::env::var(AGENT_URL) else {
        return;
    };
    let options = AgentOptions {
        n_jobs: Some(2),
        ack_wait: Duration::from_secs(2),
        max_deliver: 3,
        cache_dir: std::env::var_os(CACHE).map(Into::into),
        ..AgentOptions::default()
    };
    let mut nats = NatsOptions::new(url);
    if let Ok(login) = std::env::var(AGENT_LOGIN) {
        let (user, password) = login.split_once(':').unwrap();
        nats = nats.user_and_password(user, password);
    }
    let outcome = procpool::cluster::run_agent_with(&nats, &registry(), &options);
    eprintln!("agent ended: {outcome:?}");
    std::process::exit(3);
}

/// Where a client started by a test sends its job.
const CLIENT_URL: &str = "PROCPOOL_TEST_CLIENT_URL";

/// In a process started as a client: starts a long job of 5 s tasks, one
/// per batch, and never returns (the test kills it).
fn client_role(url: &str) -> ! {
    let mut cluster = Cluster::connect(url).unwrap().chunk_size(1);
    let outcome = cluster.map::<u64, u64>(&registry(), "slow_with_mark", 0..200u64);
    eprintln!("client ended: {outcome:?}");
    std::process::exit(3);
}

/// A nats-server with JetStream on a free loopback port, its store in a
/// temporary directory; killed by pid when dropped.
struct Server {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
    login: Option<(String, String)>,
}

impl Server {
    fn start() -> Server {
        Server::start_as(None)
    }

    /// A server that asks for `user` and `password`.
    fn start_with_login(user: &str, password: &str) -> Server {
        Server::start_as(Some((user.to_owned(), password.to_owned())))
    }

    /// Picks a free port and starts a server on it; picks another port when
    /// something took this one between the pick and the server's bind (tests
    /// run in parallel, each with its servers and clients).
    fn start_as(login: Option<(String, String)>) -> Server {
        let store = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(child) = Server::spawn(port, store.path(), login.as_ref()) {
                return Server {
                    child,
                    port,
                    store,
                    login,
                };
            }
        }
        panic!("nats-server did not start on any of 5 free ports");
    }

    /// Starts a server on `port` and waits, at most 10 s, until this very
    /// server answers there (its INFO names the server, so another test's
    /// server on the same port is not mistaken for it). `None` when it exits
    /// first, as it does when the port is taken.
    fn spawn(
        port: u16,
        store: &std::path::Path,
        login: Option<&(String, String)>,
    ) -> Option<Child> {
        let name = format!("procpool-test-{}-{port}", std::process::id());
        let mut command = Command::new("nats-server");
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-n", &name])
            .args(["-js", "-sd"])
            .arg(store);
        if let Some((user, password)) = login {
            command.args(["--user", user, "--pass", password]);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed (apt-get install nats-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            if server_name_at(port).is_some_and(|answer| answer == name) {
                return Some(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nats-server did not answer on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL and starts it again on the same port
    /// and store.
    fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Server::spawn(self.port, self.store.path(), self.login.as_ref())
            .expect("nats-server restarts on its port");
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// The `server_name` in the INFO line of whatever NATS server answers on
/// `port`, if one does within a second.
fn server_name_at(port: u16) -> Option<String> {
    use std::io::{BufRead, BufReader};
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    // The INFO payload is JSON; names here are plain ASCII without quotes.
    let (_, rest) = line
        .strip_prefix("INFO ")?
        .split_once("\"server_name\":\"")?;
    Some(rest.split_once('"')?.0.to_owned())
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This test binary run again as a node agent, running `test`; killed by
/// pid when dropped.
struct Agent(Child);

impl Agent {
    fn start(server: &Server, test: &str) -> Agent {
        Agent::start_with_login(server, test, None)
    }

    fn start_with_login(server: &Server, test: &str, login: Option<&str>) -> Agent {
        Agent::start_with_env(server, test, login.map(|l| (AGENT_LOGIN, l)))
    }

    /// An agent whose environment also has `var`; the leader of a process
    /// group of its own (its node: itself, its fork server and workers).
    fn start_with_env(server: &Server, test: &str, var: Option<(&str, &str)>) -> Agent {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env(AGENT_URL, server.url())
            .process_group(0)
            .stdout(Stdio::null());
        if let Some((name, value)) = var {
            command.env(name, value);
        }
        Agent(command.spawn().unwrap())
    }

    /// Whether it has exited.
    fn has_exited(&mut self) -> bool {
        self.0.try_wait().unwrap().is_some()
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn a_map_runs_on_the_agents_and_comes_back_in_order() {
    agent_role();
    let server = Server::start();
    let _agents = [
        Agent::start(&server, "a_map_runs_on_the_agents_and_comes_back_in_order"),
        Agent::start(&server, "a_map_runs_on_the_agents_and_comes_back_in_order"),
    ];
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .chunk_size(500)
        .timeout(Duration::from_secs(60));
    let results = cluster
        .map::<u64, u64>(&registry(), "square", 0..20_000u64)
        .unwrap();
    assert_eq!(results.len(), 20_000);
    for (x, result) in results.iter().enumerate() {
        match result {
            Ok(value) => assert_eq!(*value, (x * x) as u64),
            Err(e) => {
                assert_eq!(x, 13);
                assert!(e.is_panic(), "{e}");
                assert_eq!(e.panic_message(), Some("thirteen"));
            }
        }
    }
    // A function the agents do not expose, and the wrong types, are refused
    // before anything is sent.
    let err = cluster
        .map::<u64, u64>(&registry(), "cube", 0..3u64)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no function is exposed as \"cube\""),
        "{err}"
    );
    let err = cluster
        .map::<u32, u64>(&registry(), "square", 0..3u32)
        .unwrap_err();
    assert!(
        err.to_string().contains("other argument or result types"),
        "{err}"
    );
}

#[test]
fn an_agent_killed_mid_job_loses_nothing_and_repeats_nothing() {
    agent_role();
    let server = Server::start();
    let test = "an_agent_killed_mid_job_loses_nothing_and_repeats_nothing";
    let mut doomed = Agent::start(&server, test);
    let _survivor = Agent::start(&server, test);
    let url = server.url();
    let job = std::thread::spawn(move || {
        let mut cluster = Cluster::connect(&url)
            .unwrap()
            .chunk_size(20)
            .timeout(Duration::from_secs(90));
        let started = Instant::now();
        let results = cluster.map::<u64, u64>(&registry(), "slow_square", 0..6_000u64);
        (results, started.elapsed())
    });
    // 6,000 tasks of 2 ms on 4 workers take 3 s: the agent dies holding
    // batches, which the server gives the other agent after ack_wait (2 s).
    std::thread::sleep(Duration::from_millis(1_000));
    doomed.kill();
    let (results, took) = job.join().unwrap();
    let results = results.unwrap();
    let expected: Vec<Result<u64, procpool::TaskError>> =
        (0..6_000u64).map(|x| Ok(x * x)).collect();
    assert!(results == expected, "every result exactly once, in order");
    assert!(
        took > Duration::from_secs(3),
        "the job finished before the kill mattered: {took:?}"
    );
}

#[test]
fn the_server_killed_and_restarted_mid_job_loses_nothing_and_repeats_nothing() {
    agent_role();
    let mut server = Server::start();
    let test = "the_server_killed_and_restarted_mid_job_loses_nothing_and_repeats_nothing";
    let _agents = [Agent::start(&server, test), Agent::start(&server, test)];
    let url = server.url();
    let job = std::thread::spawn(move || {
        let mut cluster = Cluster::connect(&url)
            .unwrap()
            .chunk_size(20)
            .timeout(Duration::from_secs(120));
        cluster.map::<u64, u64>(&registry(), "slow_square", 0..4_000u64)
    });
    std::thread::sleep(Duration::from_millis(800));
    server.kill_and_restart();
    let results = job.join().unwrap().unwrap();
    let expected: Vec<Result<u64, procpool::TaskError>> =
        (0..4_000u64).map(|x| Ok(x * x)).collect();
    assert!(results == expected, "every result exactly once, in order");
}

#[test]
fn a_task_that_kills_its_worker_on_every_agent_fails_alone_with_the_crash() {
    agent_role();
    let server = Server::start();
    let test = "a_task_that_kills_its_worker_on_every_agent_fails_alone_with_the_crash";
    let _agents = [Agent::start(&server, test), Agent::start(&server, test)];
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .chunk_size(4)
        .timeout(Duration::from_secs(60));
    let results = cluster
        .map::<u64, u64>(&registry(), "abort_on_7", 0..20u64)
        .unwrap();
    for (x, result) in results.iter().enumerate() {
        if x == 7 {
            let err = result.as_ref().unwrap_err();
            assert_eq!(err.task_index(), 7);
            assert!(err.is_crash(), "{err}");
            assert_eq!(err.signal(), Some(libc::SIGABRT), "{err}");
            assert!(err.worker_pid().is_some_and(|pid| pid > 0));
        } else {
            assert_eq!(*result, Ok(x as u64));
        }
    }
}

#[test]
fn credentials_pass_through_and_are_required_when_the_server_asks() {
    agent_role();
    let server = Server::start_with_login("alice", "s3cret");
    let test = "credentials_pass_through_and_are_required_when_the_server_asks";
    let _agent = Agent::start_with_login(&server, test, Some("alice:s3cret"));
    let err = Cluster::connect(&server.url()).unwrap_err();
    assert!(
        err.to_string().starts_with("cannot connect to NATS at"),
        "{err}"
    );
    let wrong = NatsOptions::new(server.url()).user_and_password("alice", "guess");
    assert!(Cluster::connect_with(&wrong).is_err());
    let nats = NatsOptions::new(server.url()).user_and_password("alice", "s3cret");
    let mut cluster = Cluster::connect_with(&nats)
        .unwrap()
        .timeout(Duration::from_secs(60));
    let results = cluster
        .map::<u64, u64>(&registry(), "square", 20..30u64)
        .unwrap();
    assert_eq!(results, (20..30u64).map(|x| Ok(x * x)).collect::<Vec<_>>());
    assert!(
        !format!("{nats:?}").contains("s3cret"),
        "no secret in Debug"
    );
}

#[test]
fn a_malformed_task_message_is_dropped_and_the_agent_lives_on() {
    agent_role();
    let server = Server::start();
    let _agent = Agent::start(
        &server,
        "a_malformed_task_message_is_dropped_and_the_agent_lives_on",
    );
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .timeout(Duration::from_secs(60));
    // Make the streams, then publish garbage on the agents' subject.
    assert_eq!(
        cluster
            .map::<u64, u64>(&registry(), "square", [3u64])
            .unwrap(),
        [Ok(9)]
    );
    let fingerprint = procpool_worker::fnref::fingerprint();
    let subject = format!("procpool.tasks.{fingerprint:016x}");
    publish(server.port, &subject, &[0xff, 0x00, 0x13]);
    // A batch that decodes but whose task indices run past u64::MAX, and
    // one that says it holds more tasks than it does.
    #[derive(serde::Serialize)]
    struct Forged {
        client: u64,
        job: u64,
        batch: u64,
        function: String,
        first_index: u64,
        count: u32,
        root_seed: u64,
        model: Option<String>,
        items: Vec<u8>,
    }
    let forged = |first_index: u64, count: u32| {
        let batch = Forged {
            client: 1,
            job: 2,
            batch: 0,
            function: "square".into(),
            first_index,
            count,
            root_seed: 0,
            model: None,
            // Two arguments, 3 and 4, each framed by its length.
            items: vec![1, 3, 1, 4],
        };
        postcard::to_allocvec(&batch).unwrap()
    };
    // From a client the agents take for alive.
    let (rt, js) = jetstream(server.port);
    rt.block_on(async {
        let clients = js.get_key_value("procpool_clients").await.unwrap();
        clients
            .put(format!("{:016x}", 1), Vec::new().into())
            .await
            .unwrap();
    });
    publish(server.port, &subject, &forged(u64::MAX, 2));
    publish(server.port, &subject, &forged(0, 5));
    let results = cluster
        .map::<u64, u64>(&registry(), "square", 0..100u64)
        .unwrap();
    assert_eq!(results.len(), 100);
    assert!(
        results
            .iter()
            .enumerate()
            .all(|(x, r)| x == 13 || *r == Ok((x * x) as u64))
    );
}

/// Publishes `bytes` to `subject` on the server at `port` with the plain
/// NATS protocol, as anyone who can reach the server could.
fn publish(port: u16, subject: &str, bytes: &[u8]) {
    use std::io::{BufRead, BufReader, Write};
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("INFO"), "{line}");
    let mut out = stream;
    write!(
        out,
        "CONNECT {{\"verbose\":false}}\r\nPUB {subject} {}\r\n",
        bytes.len()
    )
    .unwrap();
    out.write_all(bytes).unwrap();
    out.write_all(b"\r\nPING\r\n").unwrap();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.starts_with("-ERR"), "{line}");
        if line.starts_with("PONG") {
            return;
        }
    }
}

#[test]
fn a_task_that_kills_every_agent_running_it_fails_alone_after_max_deliver() {
    agent_role();
    let server = Server::start();
    let test = "a_task_that_kills_every_agent_running_it_fails_alone_after_max_deliver";
    let url = server.url();
    let job = std::thread::spawn(move || {
        let mut cluster = Cluster::connect(&url)
            .unwrap()
            .chunk_size(10)
            .timeout(Duration::from_secs(60));
        cluster.map::<u64, u64>(&registry(), "kill_node_on_7", 0..40u64)
    });
    // Two nodes, each started again whenever it dies, as a supervisor
    // (systemd, Slurm) would.
    let mut agents = [Agent::start(&server, test), Agent::start(&server, test)];
    let mut restarts = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job.is_finished() {
        assert!(Instant::now() < deadline, "the job did not end within 60 s");
        for agent in &mut agents {
            if agent.has_exited() {
                restarts += 1;
                *agent = Agent::start(&server, test);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let results = job.join().unwrap().unwrap();
    assert_eq!(results.len(), 40);
    for (x, result) in results.iter().enumerate() {
        if x == 7 {
            let err = result.as_ref().unwrap_err();
            assert_eq!(err.task_index(), 7);
            let text = err.to_string();
            assert!(text.contains("no agent finished this task"), "{text}");
            assert!(text.contains("delivered 3 times"), "{text}");
            // The deliveries after the first run it alone, each on an agent
            // that then died and that is named (under load, the full suite
            // once saw one name where two were expected).
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
            assert!(
                text.contains(&format!("run alone by {} (pid ", host.trim())),
                "{text}"
            );
            assert!((1..=2).contains(&text.matches("(pid ").count()), "{text}");
        } else {
            assert_eq!(*result, Ok(x as u64), "task {x}");
        }
    }
    // The batch was taken 3 times (max_deliver), and each time its node died.
    assert_eq!(restarts, 3, "nodes killed by the poison task");
}

#[test]
fn a_batch_longer_than_ack_wait_runs_once() {
    agent_role();
    let server = Server::start();
    let test = "a_batch_longer_than_ack_wait_runs_once";
    let marks = tempfile::tempdir().unwrap();
    let marks_dir = marks.path().to_str().unwrap();
    let _agents = [
        Agent::start_with_env(&server, test, Some((MARKS, marks_dir))),
        Agent::start_with_env(&server, test, Some((MARKS, marks_dir))),
    ];
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .timeout(Duration::from_secs(60));
    // One batch of two 5 s tasks, against an ack_wait of 2 s: the agent
    // that has it says it is busy, so the other never gets it.
    let results = cluster
        .map::<u64, u64>(&registry(), "slow_with_mark", [1u64, 2])
        .unwrap();
    assert_eq!(results, [Ok(2), Ok(3)]);
    let runs = std::fs::read_dir(marks.path()).unwrap().count();
    assert_eq!(runs, 2, "each task ran once");
}

#[test]
fn an_unordered_map_reads_an_endless_input_lazily_and_dropping_it_cancels_the_job() {
    agent_role();
    let server = Server::start();
    let test = "an_unordered_map_reads_an_endless_input_lazily_and_dropping_it_cancels_the_job";
    let _agents = [Agent::start(&server, test), Agent::start(&server, test)];
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .chunk_size(100)
        .in_flight(4)
        .timeout(Duration::from_secs(60));
    let read = std::cell::Cell::new(0u64);
    let endless = (0u64..).inspect(|_| read.set(read.get() + 1));
    let mut seen = std::collections::HashSet::new();
    for item in cluster
        .map_unordered::<u64, u64, _>(&registry(), "slow_square", endless)
        .unwrap()
        .take(1_000)
    {
        let (index, result) = item.unwrap();
        assert_eq!(result, Ok((index * index) as u64));
        assert!(seen.insert(index), "task {index} came twice");
        // Never more than the batches in flight ahead of what was taken.
        assert!(
            read.get() <= seen.len() as u64 + 4 * 100 + 100,
            "read {}",
            read.get()
        );
    }
    // Dropped: the batches no agent took are deleted from the work queue.
    let left = stored_messages(server.port, "PROCPOOL_TASKS");
    assert_eq!(left, 0, "batches left in the work queue");
    // The connection serves the next job.
    let results = cluster
        .map::<u64, u64>(&registry(), "square", 0..10u64)
        .unwrap();
    assert_eq!(results, (0..10u64).map(|x| Ok(x * x)).collect::<Vec<_>>());
}

/// The files of a node's model cache, with their inode and modification
/// time (a file downloaded again is a new inode).
fn cached(dir: &std::path::Path) -> Vec<(String, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".store"))
                .map(|e| {
                    let meta = e.metadata().unwrap();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        meta.ino(),
                        meta.modified().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_model_goes_to_each_node_once_checked_against_its_digest() {
    agent_role();
    let server = Server::start();
    let test = "a_model_goes_to_each_node_once_checked_against_its_digest";
    let nodes = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let start_node = |node: &tempfile::TempDir| {
        Agent::start_with_env(&server, test, Some((CACHE, node.path().to_str().unwrap())))
    };
    let mut agents = [start_node(&nodes[0]), start_node(&nodes[1])];
    let table = Table {
        values: (0..2_000u64).map(|x| x * 3).collect(),
    };
    let store = procpool::persist(&table).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    store.save(file.path()).unwrap();
    let store_bytes = std::fs::read(file.path()).unwrap();
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .chunk_size(50)
        .timeout(Duration::from_secs(60));
    let model = cluster.publish_model(&store).unwrap();
    assert_eq!(model.digest(), sha256_hex(&store_bytes));
    // Published again: the same object, not a second upload.
    assert_eq!(
        cluster.publish_model(&store).unwrap().digest(),
        model.digest()
    );
    let expected: Vec<Result<u64, procpool::TaskError>> =
        (0..2_000u64).map(|x| Ok(x * 3)).collect();
    let run = |cluster: &mut Cluster| {
        cluster
            .map_with_model::<Table, u64, u64>(&registry(), "look_up", &model, 0..2_000u64)
            .unwrap()
    };
    assert!(run(&mut cluster) == expected);
    let name = format!("sha256-{}.store", model.digest());
    let first: Vec<_> = nodes.iter().map(|n| cached(n.path())).collect();
    for files in &first {
        assert!(files.len() <= 1, "{files:?}");
        assert!(files.iter().all(|(file, _, _)| *file == name), "{files:?}");
    }
    assert!(
        first.iter().any(|f| f.len() == 1),
        "no node fetched the model"
    );
    for node in &nodes {
        if let Ok(bytes) = std::fs::read(node.path().join(&name)) {
            assert!(bytes == store_bytes, "a node's copy differs");
        }
    }
    // A second job: no node downloads again.
    assert!(run(&mut cluster) == expected);
    for (node, before) in nodes.iter().zip(&first) {
        let after = cached(node.path());
        if !before.is_empty() {
            assert_eq!(&after, before, "a node downloaded the model again");
        }
    }
    // A node whose copy went bad (a byte flipped while its agent was
    // down) notices, fetches it again and answers right.
    for agent in &mut agents {
        agent.kill();
    }
    let bad = nodes
        .iter()
        .find(|n| n.path().join(&name).exists())
        .unwrap();
    let path = bad.path().join(&name);
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let _agent = start_node(bad);
    assert!(run(&mut cluster) == expected);
    assert!(
        std::fs::read(&path).unwrap() == store_bytes,
        "the copy was not replaced"
    );
}

#[test]
fn a_model_whose_bytes_do_not_match_its_digest_is_refused() {
    agent_role();
    let server = Server::start();
    let test = "a_model_whose_bytes_do_not_match_its_digest_is_refused";
    let node = tempfile::tempdir().unwrap();
    let _agent = Agent::start_with_env(&server, test, Some((CACHE, node.path().to_str().unwrap())));
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .timeout(Duration::from_secs(60));
    let store = procpool::persist(&Table {
        values: vec![1, 2, 3],
    })
    .unwrap();
    let model = cluster.publish_model(&store).unwrap();
    // Someone who can write to the bucket puts other bytes under the name.
    let other = procpool::persist(&Table {
        values: vec![7, 8, 9],
    })
    .unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    other.save(file.path()).unwrap();
    let other_bytes = std::fs::read(file.path()).unwrap();
    let (rt, js) = jetstream(server.port);
    rt.block_on(async {
        let bucket = js.get_object_store("procpool_models").await.unwrap();
        let name = format!("sha256-{}", model.digest());
        bucket
            .put(name.as_str(), &mut &other_bytes[..])
            .await
            .unwrap();
    });
    let results = cluster
        .map_with_model::<Table, u64, u64>(&registry(), "look_up", &model, 0..3u64)
        .unwrap();
    for result in results {
        let err = result.unwrap_err();
        assert!(err.to_string().contains("not what its name says"), "{err}");
    }
    assert!(cached(node.path()).is_empty(), "a bad download was kept");
    // Deleted from the server, the model is gone for new nodes.
    cluster.delete_model(&model).unwrap();
    let results = cluster
        .map_with_model::<Table, u64, u64>(&registry(), "look_up", &model, 0..1u64)
        .unwrap();
    let err = results[0].as_ref().unwrap_err();
    assert!(err.to_string().contains("cannot get the model"), "{err}");
    // Functions and models are checked by type before anything is sent.
    let err = cluster
        .map_with_model::<Table, u64, u64>(&registry(), "square", &model, 0..3u64)
        .unwrap_err();
    assert!(err.to_string().contains("takes no model"), "{err}");
    let err = cluster
        .map::<u64, u64>(&registry(), "look_up", 0..3u64)
        .unwrap_err();
    assert!(err.to_string().contains("takes a model"), "{err}");
}

/// A copy of this test binary with another GNU build-id: the same code, but
/// to procpool another build (its fingerprint differs).
fn binary_of_another_build(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let mut bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    // The note's header: name size 4, descriptor size 20, NT_GNU_BUILD_ID,
    // then "GNU\0" and the 20-byte id.
    let header: &[u8] = &[4, 0, 0, 0, 20, 0, 0, 0, 3, 0, 0, 0, b'G', b'N', b'U', 0];
    let at = bytes
        .windows(header.len())
        .position(|w| w == header)
        .expect("the test binary has a GNU build-id");
    bytes[at + header.len()] ^= 0xff;
    let path = dir.join("another-build");
    std::fs::write(&path, &bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn an_agent_of_another_build_never_runs_this_builds_batches() {
    agent_role();
    let server = Server::start();
    let test = "an_agent_of_another_build_never_runs_this_builds_batches";
    let dir = tempfile::tempdir().unwrap();
    let foreign = binary_of_another_build(dir.path());
    let _foreign = Agent(
        Command::new(&foreign)
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env(AGENT_URL, server.url())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_agent_consumers(server.port, 1);
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .timeout(Duration::from_secs(3));
    let err = cluster
        .map::<u64, u64>(&registry(), "square", 0..10u64)
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(
        err.to_string()
            .contains("no agent of this build (fingerprint"),
        "{err}"
    );
    assert!(
        err.to_string().contains("agents of 1 other build(s)"),
        "{err}"
    );
    // An agent of this build takes the next job.
    let _ours = Agent::start(&server, test);
    let mut cluster = cluster.timeout(Duration::from_secs(60));
    let results = cluster
        .map::<u64, u64>(&registry(), "square", 0..10u64)
        .unwrap();
    assert_eq!(results, (0..10u64).map(|x| Ok(x * x)).collect::<Vec<_>>());
}

/// Waits, at most 20 s, until `n` builds' agents have come to the server at
/// `port` (each build's agents share a consumer).
fn wait_for_agent_consumers(port: u16, n: usize) {
    use futures_util::StreamExt;
    let (rt, js) = jetstream(port);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(stream) = js.get_stream("PROCPOOL_TASKS").await {
                let names: Vec<String> = stream
                    .consumer_names()
                    .filter_map(|name| async move { name.ok() })
                    .collect()
                    .await;
                if names.iter().filter(|n| n.starts_with("agents-")).count() >= n {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "no agent came within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn a_processor_a_map_reduce_and_a_fold_run_on_the_agents_as_they_do_locally() {
    agent_role();
    let server = Server::start();
    let test = "a_processor_a_map_reduce_and_a_fold_run_on_the_agents_as_they_do_locally";
    let _agents = [Agent::start(&server, test), Agent::start(&server, test)];
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .chunk_size(100)
        .timeout(Duration::from_secs(60));
    let registry = registry();

    // The processor: RLTK's Task, the collector as its output handler.
    let mut total = 0u64;
    let mut failed = Vec::new();
    let mut tasks = cluster
        .processor(
            &registry,
            "square",
            |i, r: Result<u64, procpool::TaskError>| match r {
                Ok(v) => total += v,
                Err(e) => failed.push((i, e.is_panic())),
            },
        )
        .unwrap();
    for x in 0..2_000u64 {
        assert_eq!(tasks.add_task(x).unwrap(), x);
    }
    let summary = tasks.join().unwrap();
    assert_eq!((summary.done, summary.failed), (1_999, 1));
    assert_eq!(failed, [(13, true)]);
    assert_eq!(total, (0..2_000u64).map(|x| x * x).sum::<u64>() - 13 * 13);
    // A collector that panics stops the processor with its error.
    let mut tasks = cluster
        .processor(
            &registry,
            "square",
            |i, _: Result<u64, procpool::TaskError>| {
                assert!(i != 50, "collector gave up");
            },
        )
        .unwrap();
    let mut stopped = None;
    for x in 100..400u64 {
        if let Err(e) = tasks.add_task(x) {
            stopped = Some(e);
            break;
        }
    }
    let err = match stopped {
        Some(e) => {
            drop(tasks);
            e
        }
        None => tasks.join().unwrap_err(),
    };
    let task = err.task_error().expect("a task's error");
    assert_eq!(task.task_index(), 50);
    assert_eq!(task.panic_message(), Some("collector gave up"));

    // Map-reduce: folded on the agents, the same value as here.
    let sum = cluster
        .map_reduce::<u64, u64>(&registry, "sum_of_squares", 0..13u64)
        .unwrap();
    assert_eq!(sum, Some((0..13u64).map(|x| x * x).sum()));
    assert_eq!(
        cluster
            .map_reduce::<u64, u64>(&registry, "sum_of_squares", std::iter::empty())
            .unwrap(),
        None
    );
    let big = cluster
        .map_reduce::<u64, u64>(&registry, "sum_of_squares", 14..20_000u64)
        .unwrap();
    assert_eq!(big, Some((14..20_000u64).map(|x| x * x).sum()));
    // A panic and a crash end it with the same error as local work.
    let err = cluster
        .map_reduce::<u64, u64>(&registry, "sum_of_squares", 0..1_000u64)
        .unwrap_err();
    let task = err.task_error().unwrap();
    assert_eq!((task.task_index(), task.is_panic()), (13, true));
    let local = procpool::map_reduce(square, add, 2)
        .unwrap()
        .run(0..1_000u64)
        .unwrap_err();
    assert_eq!(
        (local.task_index(), local.is_panic(), local.panic_message()),
        (task.task_index(), task.is_panic(), task.panic_message())
    );
    let err = cluster
        .map_reduce::<u64, u64>(&registry, "sum_aborting_on_7", 0..100u64)
        .unwrap_err();
    let task = err.task_error().unwrap();
    assert_eq!(task.task_index(), 7);
    assert!(task.is_crash(), "{task}");
    assert_eq!(task.signal(), Some(libc::SIGABRT));
    // The wrong shape is refused before anything is sent.
    let err = cluster
        .map::<u64, u64>(&registry, "sum_of_squares", 0..3u64)
        .unwrap_err();
    assert!(err.to_string().contains("is a map-reduce"), "{err}");

    // The fold of the patterns, the cluster as its backend.
    let here = procpool::fold(
        &mut procpool::Sequential,
        add,
        1..=100_000u64,
        0,
        1_000,
        add,
    )
    .unwrap();
    let there = procpool::fold(
        &mut cluster.backend(&registry),
        add,
        1..=100_000u64,
        0,
        1_000,
        add,
    )
    .unwrap();
    assert_eq!(there, here);
    // A function the registry does not expose is an error, not a hang.
    fn times(a: u64, b: u64) -> u64 {
        a * b
    }
    let err = procpool::fold(
        &mut cluster.backend(&registry),
        times,
        1..=10u64,
        1,
        3,
        times,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not exposed"), "{err}");
}

#[test]
fn two_clients_running_many_small_jobs_at_once_each_get_every_result() {
    agent_role();
    let server = Server::start();
    let test = "two_clients_running_many_small_jobs_at_once_each_get_every_result";
    let _agents = [Agent::start(&server, test), Agent::start(&server, test)];
    let clients: Vec<_> = (0..2u64)
        .map(|client| {
            let url = server.url();
            std::thread::spawn(move || {
                let mut cluster = Cluster::connect(&url)
                    .unwrap()
                    .timeout(Duration::from_secs(30));
                // Each job's results are purged as it ends; the next job's
                // must not be lost to that, nor the other client's.
                for x in 0..500u64 {
                    let arg = 100 + client * 10_000 + 2 * x;
                    let results = cluster
                        .map::<u64, u64>(&registry(), "square", [arg, arg + 1])
                        .unwrap();
                    assert_eq!(results, [Ok(arg * arg), Ok((arg + 1) * (arg + 1))]);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
}

#[test]
fn tasks_carry_ids_and_workers_read_the_records_from_the_shared_store() {
    agent_role();
    let server = Server::start();
    let test = "tasks_carry_ids_and_workers_read_the_records_from_the_shared_store";
    // The example's workers find the bucket where NATS_URL says.
    let _agents = [
        Agent::start_with_env(&server, test, Some(("NATS_URL", &server.url()))),
        Agent::start_with_env(&server, test, Some(("NATS_URL", &server.url()))),
    ];
    let record_bytes = cluster_ids::publish_records(&server.url()).unwrap();
    assert!(record_bytes > 1_000_000, "{record_bytes}");
    let mut cluster = Cluster::connect(&server.url())
        .unwrap()
        .chunk_size(100)
        .timeout(Duration::from_secs(60));
    let users = 0..2_000u32;
    let means = cluster
        .map::<u32, f32>(&registry(), "mean_rating", users.clone())
        .unwrap();
    for (user, mean) in users.zip(&means) {
        let ratings = cluster_ids::ratings_of(user);
        let expected = ratings.iter().map(|(_, r)| r).sum::<f32>() / ratings.len() as f32;
        assert_eq!(*mean, Ok(expected), "user {user}");
    }
    // A missing record is that task's error, with the worker's words.
    let missing = cluster
        .map::<u32, f32>(&registry(), "mean_rating", [5, 999_999])
        .unwrap();
    assert!(missing[0].is_ok());
    let err = missing[1].as_ref().unwrap_err();
    assert_eq!(err.panic_message(), Some("no record for user 999999"));
}

#[test]
fn a_client_that_dies_leaves_no_work_and_no_results_behind() {
    agent_role();
    let server = Server::start();
    let test = "a_client_that_dies_leaves_no_work_and_no_results_behind";
    let marks = tempfile::tempdir().unwrap();
    let marks_dir = marks.path().to_str().unwrap();
    let _agent = Agent::start_with_env(&server, test, Some((MARKS, marks_dir)));
    let mut client = Agent(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env(CLIENT_URL, server.url())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let runs = || std::fs::read_dir(marks.path()).unwrap().count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while runs() < 2 {
        assert!(
            Instant::now() < deadline,
            "the job did not start within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client sends 64 batches ahead of its results.
    assert!(stored_messages(server.port, "PROCPOOL_TASKS") > 50);
    client.kill();
    // Those 64 tasks of 5 s on 2 workers would take 160 s; the agent drops
    // the dead client's batches once its key expires (30 s).
    let deadline = Instant::now() + Duration::from_secs(90);
    while stored_messages(server.port, "PROCPOOL_TASKS") > 0 {
        assert!(
            Instant::now() < deadline,
            "the dead client's batches are still queued"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ran = runs();
    assert!(ran < 40, "{ran} of 200 tasks ran for a dead client");
    // Its results went with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored_messages(server.port, "PROCPOOL_RESULTS") > 0 {
        assert!(
            Instant::now() < deadline,
            "the dead client's results are still stored"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A connection of the test's own to the server at `port`, to look at (or
/// tamper with) what it stores, and the runtime it runs on.
fn jetstream(port: u16) -> (tokio::runtime::Runtime, async_nats::jetstream::Context) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(async_nats::connect(format!("nats://127.0.0.1:{port}")))
        .unwrap();
    let js = {
        let _inside = rt.enter();
        async_nats::jetstream::new(client)
    };
    (rt, js)
}

/// Messages in the stream `name` of the server at `port`.
fn stored_messages(port: u16, name: &str) -> u64 {
    let (rt, js) = jetstream(port);
    rt.block_on(async {
        let mut stream = js.get_stream(name).await.unwrap();
        stream.info().await.unwrap().state.messages
    })
}
