//! The engine driven by hand, with real worker processes: each job kind
//! runs in workers as it does in this process.

use procpool_worker::wire::{JobKind, TaskFailure, split_item};
use procpool_worker::worker::jobs::{self, BatchRunner, JobFns};

use super::batch::{Batch, encode_argument};
use super::dispatch::{Engine, Sink};
use super::{JobSpec, Policy, PoolSpec, Workers};
use crate::batching::BatchSizer;
use crate::error::TaskError;
use crate::launch::StartMethod;

/// Everything that came back: each batch's outcome items, and failures.
#[derive(Default)]
struct Collected {
    batches: Vec<(u64, Vec<Vec<u8>>)>,
    failed: Vec<(u64, TaskError)>,
}

impl Sink for Collected {
    fn outcomes(&mut self, first_index: u64, _count: u32, mut items: &[u8]) {
        let mut all = Vec::new();
        while let Some(item) = split_item(&mut items) {
            all.push(item.to_vec());
        }
        assert!(items.is_empty(), "a whole number of items");
        self.batches.push((first_index, all));
    }

    fn failed(&mut self, index: u64, error: TaskError) {
        self.failed.push((index, error));
    }
}

fn batch_of(first: u64, args: impl IntoIterator<Item = u64>) -> Batch {
    let mut batch = Batch::new(first);
    for arg in args {
        let mark = batch.items.len();
        encode_argument(arg, &mut batch.items, &mut false).unwrap();
        batch.offsets.push(mark as u32);
    }
    batch
}

fn workers(n_jobs: usize, job: JobSpec) -> Workers {
    let policy = Policy {
        task_timeout: None,
        memory_limit: None,
        max_tries: 2,
        replace_dead: true,
    };
    Workers::start(PoolSpec::new(
        StartMethod::ForkServer,
        n_jobs,
        None,
        job,
        policy,
    ))
    .unwrap()
}

/// Waits until `batches` batches have come back.
fn wait_for(engine: &mut Engine<'_>, sink: &mut Collected, batches: usize) {
    let mut rounds = 0;
    while sink.batches.len() < batches {
        assert!(
            engine.in_flight(),
            "nothing in flight, {} batches back",
            sink.batches.len()
        );
        engine.wait(sink);
        rounds += 1;
        assert!(rounds < 10_000, "the batches do not come back");
    }
}

fn decode<T: serde::de::DeserializeOwned>(item: &[u8]) -> Result<T, TaskFailure> {
    postcard::from_bytes::<Result<T, TaskFailure>>(item).unwrap()
}

fn start_at_100() -> u64 {
    100
}

fn accumulate_with_pid(sum: &mut u64, x: u64) -> (u64, u32) {
    *sum += x;
    (*sum, std::process::id())
}

#[test]
fn a_stateful_stage_keeps_its_state_in_its_worker_across_batches() {
    let job = JobSpec {
        kind: JobKind::Stateful,
        runner: jobs::stateful::<u64, u64, (u64, u32)> as BatchRunner,
        fns: JobFns {
            task: accumulate_with_pid as fn(&mut u64, u64) -> (u64, u32) as usize,
            helper: start_at_100 as fn() -> u64 as usize,
        },
    };
    let mut workers = workers(1, job);
    let pid = workers.pids()[0];
    let mut sizer = BatchSizer::new(Some(3));
    let mut engine = Engine::new(&mut workers, &mut sizer, 1);
    let mut sink = Collected::default();
    for (n, first) in [0u64, 3, 6].into_iter().enumerate() {
        assert!(engine.wants_batch());
        engine.submit(batch_of(first, first..first + 3));
        wait_for(&mut engine, &mut sink, n + 1);
    }
    let sums: Vec<(u64, u32)> = sink
        .batches
        .iter()
        .flat_map(|(_, items)| items.iter().map(|i| decode::<(u64, u32)>(i).unwrap()))
        .collect();
    let want: Vec<(u64, u32)> = (0..9u64).map(|i| (100 + i * (i + 1) / 2, pid)).collect();
    assert_eq!(sums, want);
    assert_ne!(pid, std::process::id(), "the stage ran in a worker");
}

fn square(x: u64) -> u64 {
    if x == 13 {
        panic!("thirteen");
    }
    x * x
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[test]
fn a_map_reduce_sends_partials_that_add_up_across_workers() {
    let job = JobSpec {
        kind: JobKind::MapReduce,
        runner: jobs::map_reduce::<u64, u64> as BatchRunner,
        fns: JobFns {
            task: square as fn(u64) -> u64 as usize,
            helper: add as fn(u64, u64) -> u64 as usize,
        },
    };
    let mut workers = workers(2, job);
    let mut sizer = BatchSizer::new(Some(100));
    let mut engine = Engine::new(&mut workers, &mut sizer, 1);
    let mut sink = Collected::default();
    let mut next = 0u64;
    let mut sent = 0;
    while next < 1000 || engine.in_flight() {
        while next < 1000 && engine.wants_batch() {
            engine.submit(batch_of(next, next..next + 100));
            next += 100;
            sent += 1;
        }
        engine.wait(&mut sink);
    }
    assert_eq!(sink.batches.len(), sent);
    assert!(sink.failed.is_empty());
    let mut total = 0u64;
    let mut failed = Vec::new();
    for (first, items) in &sink.batches {
        assert_eq!(items.len(), 101, "100 outcomes and the partial");
        for (i, item) in items[..100].iter().enumerate() {
            if decode::<()>(item).is_err() {
                failed.push(first + i as u64);
            }
        }
        total += decode::<Option<u64>>(&items[100]).unwrap().unwrap_or(0);
    }
    assert_eq!(failed, [13]);
    assert_eq!(
        total,
        (0..1000u64)
            .filter(|&x| x != 13)
            .map(|x| x * x)
            .sum::<u64>()
    );
}
