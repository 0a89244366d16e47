//! Pipelines (blllib's pattern) with real worker processes: every item
//! through every kind of stage, in order, never dropped; failures end the
//! output with the stage and item named; dropping the output stops
//! everything.

mod common;

use std::time::{Duration, Instant};

use common::*;
use procpool::{PipelineError, StageKind};

// The seed's callables.

fn accumulator_init() -> i64 {
    0
}

fn accumulator(acc: &mut i64, x: i64) -> i64 {
    *acc += x;
    *acc
}

fn difference2(window: &[i64]) -> i64 {
    let [x, _, z] = window else {
        panic!("a window of {} items", window.len());
    };
    z - x
}

fn negate(x: i64) -> i64 {
    -x
}

fn square(x: i64) -> i64 {
    x * x
}

fn id(x: i64) -> i64 {
    x
}

fn accumulate_sequentially(input: impl Iterator<Item = i64>) -> Vec<i64> {
    input
        .scan(0i64, |acc, x| {
            *acc += x;
            Some(*acc)
        })
        .collect()
}

#[test]
fn the_seeds_callables_accumulator_difference2_negation() {
    let run = |xs: Vec<i64>| -> Vec<i64> {
        procpool::pipeline()
            .stateful(accumulator_init, accumulator)
            .windowed(3, difference2)
            .map(negate)
            .seed(1)
            .apply(xs)
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let input: Vec<i64> = (0..1_000).collect();
    let sums = accumulate_sequentially(input.iter().copied());
    let expected: Vec<i64> = sums.windows(3).map(|w| -(w[2] - w[0])).collect();
    assert_eq!(run(input), expected);
    assert_eq!(
        run(vec![5, 6]),
        Vec::<i64>::new(),
        "two items make no window of 3"
    );
}

#[test]
fn an_accumulator_loses_no_item_whatever_the_bound() {
    // blllib's stateful stage drops inputs when its queue is full: an
    // accumulator over range(20) returned 12 values.
    const N: i64 = 1_000_000;
    let expected = accumulate_sequentially(0..N);
    let sequential: Vec<i64> = procpool::pipeline()
        .stateful(accumulator_init, accumulator)
        .apply_sequential(0..N)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(sequential, expected);
    // Every power of two from 1 to 1,024 (every bound in between is
    // checked on a shorter input below).
    for bound in (0..=10).map(|p| 1usize << p) {
        let out: Vec<i64> = procpool::pipeline()
            .stateful(accumulator_init, accumulator)
            .in_flight(bound)
            .apply(0..N)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(out.len() as i64, N, "in_flight {bound}");
        assert!(out == expected, "in_flight {bound}: wrong sums");
    }
}

#[test]
fn every_bound_from_1_to_1024_keeps_every_item() {
    // Each bound over a short input, through a stateless and a stateful
    // stage: in-flight limits change only the pace.
    let expected = accumulate_sequentially((0..300).map(|x| x * x));
    for bound in 1..=1024 {
        let out: Vec<i64> = procpool::pipeline()
            .map(square)
            .in_flight(bound)
            .stateful(accumulator_init, accumulator)
            .in_flight(bound)
            .apply(0..300i64)
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(out == expected, "in_flight {bound}");
    }
}

fn sleep_a_little(x: i64) -> i64 {
    // 0 to 2 ms, scrambled, so later items often finish first.
    let micros = (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 53;
    std::thread::sleep(Duration::from_micros(micros));
    x
}

#[test]
fn order_is_kept_through_a_stateless_stage_with_random_delays() {
    for bound in [3, 64] {
        let out: Vec<i64> = procpool::pipeline()
            .map(sleep_a_little)
            .n_jobs(4)
            .in_flight(bound)
            .apply(0..1_000i64)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(out, (0..1_000).collect::<Vec<_>>(), "in_flight {bound}");
    }
}

fn window_items(w: &[i64]) -> Vec<i64> {
    w.to_vec()
}

#[test]
fn windows_slide_by_one_and_chunks_tumble_with_a_short_last() {
    let windows: Vec<Vec<i64>> = procpool::pipeline()
        .windowed(3, window_items)
        .apply(0..6i64)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(windows, [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]);
    let chunks: Vec<Vec<i64>> = procpool::pipeline()
        .chunked(4, window_items)
        .apply(0..10i64)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(chunks, [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
    // Many chunks, with a bound smaller than a batch.
    let sums: Vec<i64> = procpool::pipeline()
        .chunked(7, |c: &[i64]| c.iter().sum::<i64>())
        .in_flight(3)
        .apply(0..10_000i64)
        .collect::<Result<_, _>>()
        .unwrap();
    let expected: Vec<i64> = (0..10_000i64)
        .collect::<Vec<_>>()
        .chunks(7)
        .map(|c| c.iter().sum())
        .collect();
    assert_eq!(sums, expected);
}

fn evens_halved(x: i64) -> Option<i64> {
    (x % 2 == 0).then_some(x / 2)
}

fn repeat_by_value(x: i64) -> Vec<i64> {
    vec![x; (x % 4) as usize]
}

#[test]
fn flatten_drops_and_expands_only_as_told() {
    let out: Vec<i64> = procpool::pipeline()
        .map(evens_halved)
        .flatten()
        .map(repeat_by_value)
        .flatten()
        .apply(0..1_000i64)
        .collect::<Result<_, _>>()
        .unwrap();
    let expected: Vec<i64> = (0..1_000i64)
        .filter_map(evens_halved)
        .flat_map(repeat_by_value)
        .collect();
    assert_eq!(out, expected);
}

// A panic in each kind of stage, at input item 700 (after a stateless
// stage that passes items on, so the failing stage is stage 1).

fn panic_at_700(x: i64) -> i64 {
    assert!(x != 700, "stateless panic");
    x
}

fn panic_at_700_stateful(acc: &mut i64, x: i64) -> i64 {
    assert!(x != 700, "stateful panic");
    *acc += 1;
    x
}

fn panic_on_window_at_700(w: &[i64]) -> i64 {
    assert!(w[0] != 700, "window panic");
    w[0]
}

fn panic_on_chunk_with_700(c: &[i64]) -> i64 {
    assert!(!c.contains(&700), "chunk panic");
    c[0]
}

/// Runs `0..1000` through `id`, then the stage under test; checks the
/// items before the failure and the error.
fn check_panic<Z>(
    add: impl Fn(procpool::Pipeline<i64, i64>) -> procpool::Pipeline<i64, Z>,
    kind: StageKind,
    item: u64,
    message: &str,
    good: usize,
) where
    Z: serde::Serialize + serde::de::DeserializeOwned + 'static,
{
    for sequential in [false, true] {
        let p = add(procpool::pipeline().map(id).in_flight(50)).seed(3);
        let out: Vec<Result<Z, PipelineError>> = if sequential {
            p.apply_sequential(0..1_000i64).collect()
        } else {
            p.apply(0..1_000i64).collect()
        };
        let what = format!("{kind}, sequential {sequential}");
        assert_eq!(
            out.len(),
            good + 1,
            "{what}: the items before, then the error"
        );
        assert!(out[..good].iter().all(Result::is_ok), "{what}");
        let err = out[good].as_ref().err().unwrap();
        assert_eq!(err.stage(), 1, "{what}: {err}");
        assert_eq!(err.stage_kind(), kind, "{what}");
        assert_eq!(err.item(), Some(item), "{what}: {err}");
        assert!(err.is_panic(), "{what}: {err}");
        let task = err.task_error().unwrap();
        assert_eq!(task.panic_message(), Some(message), "{what}");
        assert!(
            err.to_string()
                .contains(&format!("stage 1 ({kind}) failed at item {item}")),
            "{err}"
        );
    }
}

#[test]
fn a_panic_in_each_kind_of_stage_ends_the_output_naming_stage_and_item() {
    check_panic(
        |p| p.map(panic_at_700),
        StageKind::Stateless,
        700,
        "stateless panic",
        700,
    );
    check_panic(
        |p| p.stateful(accumulator_init, panic_at_700_stateful),
        StageKind::Stateful,
        700,
        "stateful panic",
        700,
    );
    check_panic(
        |p| p.windowed(3, panic_on_window_at_700),
        StageKind::Windowed(3),
        700,
        "window panic",
        700,
    );
    // Chunks of 8: the chunk 696..704 is chunk 87.
    check_panic(
        |p| p.chunked(8, panic_on_chunk_with_700),
        StageKind::Chunked(8),
        696,
        "chunk panic",
        87,
    );
    check_panic(
        |p| {
            p.in_parent(|x: i64| {
                assert!(x != 700, "in-parent panic");
                x
            })
        },
        StageKind::InParent,
        700,
        "in-parent panic",
        700,
    );
}

/// An item whose `Deserialize` refuses 3, with a panic.
#[derive(Debug, serde::Serialize)]
struct Picky(i64);

impl<'de> serde::Deserialize<'de> for Picky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        assert!(v != 3, "picky about 3");
        Ok(Picky(v))
    }
}

fn wrap(x: i64) -> Vec<Picky> {
    vec![Picky(x)]
}

fn unwrap_picky(p: Picky) -> i64 {
    p.0
}

#[test]
fn a_panic_while_flattening_is_the_stages_failure_at_its_item() {
    // The worker encodes each `Vec<Picky>`; this process decodes it to
    // flatten it, and panics on 3.
    for sequential in [false, true] {
        let p = procpool::pipeline().map(wrap).flatten().map(unwrap_picky);
        let out: Vec<Result<i64, PipelineError>> = if sequential {
            p.apply_sequential(0..10i64).collect()
        } else {
            p.apply(0..10i64).collect()
        };
        assert_eq!(out.len(), 4, "0, 1, 2, then the error");
        let err = out[3].as_ref().unwrap_err();
        assert_eq!((err.stage(), err.item()), (0, Some(3)), "{err}");
        assert_eq!(
            err.task_error().and_then(|e| e.panic_message()),
            Some("picky about 3")
        );
    }
}

fn kill_at(x: i64, at: i64) -> i64 {
    if x == at {
        // SAFETY: kill takes no pointers; this worker ends here.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    x
}

fn kill_at_500(x: i64) -> i64 {
    kill_at(x, 500)
}

fn kill_at_500_stateful(acc: &mut i64, x: i64) -> i64 {
    *acc += x;
    kill_at(x, 500)
}

fn kill_once_at_500((x, marker): (i64, String)) -> i64 {
    if x == 500 && std::fs::File::create_new(&marker).is_ok() {
        return kill_at(x, 500);
    }
    x
}

#[test]
fn a_worker_killed_in_a_stateless_stage_is_replaced_and_its_task_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("killed").to_string_lossy().into_owned();
    let out: Vec<i64> = procpool::pipeline()
        .map(kill_once_at_500)
        .n_jobs(2)
        .stateful(accumulator_init, accumulator)
        .apply((0..2_000i64).map(|x| (x, marker.clone())))
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        std::path::Path::new(&marker).exists(),
        "the worker was killed"
    );
    assert_eq!(out, accumulate_sequentially(0..2_000));
}

#[test]
fn a_stateless_task_that_always_kills_its_worker_ends_the_output() {
    no_core_dumps();
    let out: Vec<Result<i64, PipelineError>> = procpool::pipeline()
        .map(id)
        .map(kill_at_500)
        .in_flight(100)
        .apply(0..2_000i64)
        .collect();
    assert_eq!(out.len(), 501);
    let err = out[500].as_ref().unwrap_err();
    assert!(err.is_crash(), "{err}");
    assert_eq!(err.signal(), Some(libc::SIGKILL));
    assert_eq!((err.stage(), err.item()), (1, Some(500)), "{err}");
    assert_eq!(out[499].as_ref().ok(), Some(&499));
}

#[test]
fn a_stateful_stage_killed_mid_stream_loses_its_state_and_ends_the_output() {
    no_core_dumps();
    let started = Instant::now();
    let output = procpool::pipeline()
        .map(id)
        .stateful(accumulator_init, kill_at_500_stateful)
        .apply(0..100_000i64);
    let pids = output.worker_pids().to_vec();
    let out: Vec<Result<i64, PipelineError>> = output.collect();
    // The outputs of the batch the process was running died with it: the
    // output ends at the first of them, and the error names the item that
    // was running.
    let (err, good) = out.split_last().unwrap();
    let err = err.as_ref().unwrap_err();
    assert!(err.is_crash(), "{err}");
    assert_eq!(err.signal(), Some(libc::SIGKILL));
    assert_eq!(err.stage_kind(), StageKind::Stateful);
    assert_eq!(err.stage(), 1);
    assert_eq!(err.item(), Some(good.len() as u64), "{err}");
    assert_eq!(err.task_error().unwrap().task_index(), 500, "{err}");
    assert!(good.len() <= 500);
    let good: Vec<i64> = good.iter().map(|r| *r.as_ref().unwrap()).collect();
    assert_eq!(good, (0..good.len() as i64).collect::<Vec<_>>());
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_all_exit(&pids, "the stateful stage failed");
}

fn slow_from_20(x: i64) -> i64 {
    if x >= 20 {
        std::thread::sleep(Duration::from_secs(20));
    }
    x
}

fn slow_stateful(_: &mut i64, x: i64) -> i64 {
    slow_from_20(x)
}

#[test]
fn dropping_the_output_half_way_returns_at_once_and_leaves_no_process() {
    for stateful in [false, true] {
        let p = procpool::pipeline().map(id);
        let p = if stateful {
            p.stateful(accumulator_init, slow_stateful).map(id)
        } else {
            p.map(slow_from_20).map(id)
        };
        let mut output = p.in_flight(8).apply(0..);
        let pids = output.worker_pids().to_vec();
        assert!(pids.len() >= 3, "{pids:?}");
        for x in 0..5 {
            assert_eq!(output.next().unwrap().unwrap(), x);
        }
        // Items 20 and on are sleeping in their workers by now.
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        drop(output);
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "drop took {took:?} (stateful {stateful})"
        );
        assert_all_exit(&pids, "the output was dropped");
    }
}

#[test]
fn dropping_the_output_after_the_end_leaves_no_process() {
    let mut output = procpool::pipeline()
        .map(square)
        .stateful(accumulator_init, accumulator)
        .apply(0..1_000i64);
    let pids = output.worker_pids().to_vec();
    let n = output.by_ref().count();
    assert_eq!(n, 1_000);
    let started = Instant::now();
    drop(output);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_all_exit(&pids, "the output ended");
}

#[test]
fn the_input_is_read_lazily() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let read = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&read);
    let input = (0..).inspect(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let mut output = procpool::pipeline()
        .map(id)
        .in_flight(16)
        .stateful(accumulator_init, accumulator)
        .in_flight(16)
        .apply(input);
    for _ in 0..10 {
        output.next().unwrap().unwrap();
    }
    // Bounded: the stages' in-flight tasks and the chunks between them.
    let ahead = read.load(Ordering::Relaxed);
    assert!(ahead < 10 + 5 * 1024, "read {ahead} items for 10 outputs");
}

#[test]
fn the_cpu_budget_is_shared_among_the_parallel_stages() {
    fn sum(w: &[i64]) -> i64 {
        w.iter().sum()
    }
    let count = |p: procpool::Pipeline<i64, i64>| p.apply(0..10i64).worker_pids().len();
    // Two parallel stages share 4 CPUs; the stateful one has its own.
    let p = procpool::pipeline()
        .map(id)
        .windowed(2, sum)
        .stateful(accumulator_init, accumulator);
    assert_eq!(count(p.n_cpu(4)), 2 + 2 + 1);
    // An explicit n_jobs is outside the budget.
    let p = procpool::pipeline().map(id).n_jobs(3).chunked(2, sum);
    assert_eq!(count(p.n_cpu(2)), 3 + 2);
    // At least one worker each, whatever the budget.
    let p = procpool::pipeline().map(id).map(id).map(id);
    assert_eq!(count(p.n_cpu(1)), 3);
    // The default budget is the CPUs this process may use.
    let cpus = procpool::proc_count(1, None, 0).unwrap();
    let p = procpool::pipeline().map(id);
    assert_eq!(count(p), cpus);
}

#[test]
fn bad_settings_are_the_outputs_only_error() {
    let first_error = |out: Vec<Result<i64, PipelineError>>| {
        assert_eq!(out.len(), 1);
        out.into_iter().next().unwrap().unwrap_err()
    };
    let err = first_error(
        procpool::pipeline()
            .map(id)
            .in_flight(0)
            .apply(0..3i64)
            .collect(),
    );
    assert!(
        err.to_string().contains("in_flight must be at least 1"),
        "{err}"
    );
    assert!(
        err.start_error()
            .is_some_and(procpool::PoolError::is_refused)
    );
    let err = first_error(
        procpool::pipeline()
            .windowed(0, difference2)
            .apply(0..3i64)
            .collect(),
    );
    assert!(
        err.to_string()
            .contains("windowed(0) needs k of at least 1"),
        "{err}"
    );
    let err = first_error(
        procpool::pipeline()
            .stateful(accumulator_init, accumulator)
            .n_jobs(2)
            .apply_sequential(0..3i64)
            .collect(),
    );
    assert!(
        err.to_string()
            .contains("a stateful stage runs in one process"),
        "{err}"
    );
    let err = first_error(
        procpool::pipeline::<i64>()
            .n_jobs(2)
            .map(id)
            .apply(0..3i64)
            .collect(),
    );
    assert!(
        err.to_string().contains("n_jobs set before any stage"),
        "{err}"
    );
    let err = first_error(procpool::pipeline::<i64>().apply(0..3i64).collect());
    assert!(err.to_string().contains("at least one stage"), "{err}");
}

/// A small deterministic generator for the random pipelines.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn plus_seed_bit(x: i64) -> i64 {
    // Uses the task's seed, so runners must agree on seeds too.
    x.wrapping_add((procpool::seed().unwrap_or(0) % 7) as i64)
}

fn sum_slice(w: &[i64]) -> i64 {
    w.iter().fold(0i64, |a, b| a.wrapping_add(*b))
}

fn drop_multiples_of_5(x: i64) -> Option<i64> {
    (x % 5 != 0).then_some(x)
}

fn mix(acc: &mut i64, x: i64) -> i64 {
    *acc = acc.wrapping_mul(31).wrapping_add(x) % 1_000_003;
    *acc
}

fn panic_on_777(x: i64) -> i64 {
    assert!(x != 777, "777");
    x
}

/// Adds stage `choice` (with `k` for a window or chunk) to `p`.
fn add_stage(
    p: procpool::Pipeline<i64, i64>,
    choice: u64,
    k: usize,
) -> procpool::Pipeline<i64, i64> {
    match choice {
        0 => p.map(plus_seed_bit),
        1 => p.stateful(accumulator_init, mix),
        2 => p.windowed(k, sum_slice),
        3 => p.chunked(k, sum_slice),
        4 => p.in_parent(|x: i64| x.wrapping_mul(3)),
        5 => p.map(drop_multiples_of_5).flatten(),
        6 => p.map(repeat_by_value).flatten(),
        _ => p.map(panic_on_777),
    }
}

/// The items of an output, and its error as (stage, item, message).
type Summary = (Vec<i64>, Option<(usize, Option<u64>, String)>);

fn summary(output: impl Iterator<Item = Result<i64, PipelineError>>) -> Summary {
    let mut items = Vec::new();
    for item in output {
        match item {
            Ok(x) => items.push(x),
            Err(e) => {
                let message = e.task_error().map(ToString::to_string).unwrap_or_default();
                return (items, Some((e.stage(), e.item(), message)));
            }
        }
    }
    (items, None)
}

#[test]
fn the_sequential_runner_equals_the_process_runner_on_random_pipelines() {
    let mut rng = Rng(0x5eed);
    let mut failures = 0;
    for case in 0..40 {
        let plan: Vec<(u64, usize, usize)> = (0..1 + rng.below(4))
            .map(|_| {
                (
                    rng.below(8),
                    1 + rng.below(5) as usize,
                    1 + rng.below(100) as usize,
                )
            })
            .collect();
        let n = rng.below(3_000) as i64;
        // A pipeline is used once: each runner gets its own.
        let build = |bounded: bool| {
            let mut p = procpool::pipeline::<i64>().map(id).in_flight(64);
            for &(choice, k, bound) in &plan {
                p = add_stage(p, choice, k);
                if bounded {
                    p = p.in_flight(bound);
                }
            }
            p.seed(case)
        };
        let here = summary(build(false).apply_sequential(0..n));
        let there = summary(build(true).apply(0..n));
        assert_eq!(here, there, "case {case}: {plan:?} over {n} items");
        failures += usize::from(here.1.is_some());
    }
    assert!(failures > 0, "no case failed: errors were not compared");
}

fn nap_at_3(acc: &mut i64, x: i64) -> i64 {
    if x == 3 {
        std::thread::sleep(Duration::from_secs(20));
    }
    *acc += x;
    *acc
}

#[test]
fn a_task_past_its_time_limit_ends_the_output_in_any_process_stage() {
    let started = Instant::now();
    let out: Vec<Result<i64, PipelineError>> = procpool::pipeline()
        .map(id)
        .stateful(accumulator_init, nap_at_3)
        .task_timeout(Duration::from_millis(300))
        .apply(0..10i64)
        .collect();
    let (err, good) = out.split_last().unwrap();
    let err = err.as_ref().unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(err.stage(), 1);
    assert_eq!(err.task_error().unwrap().task_index(), 3, "{err}");
    assert!(good.len() <= 3 && good.iter().all(Result::is_ok));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the 20 s nap was cut short"
    );
    let err = procpool::pipeline()
        .map(id)
        .task_timeout(Duration::ZERO)
        .apply(0..3i64)
        .find_map(Result::err)
        .unwrap();
    assert!(
        err.to_string()
            .contains("task_timeout must be longer than zero"),
        "{err}"
    );
}
