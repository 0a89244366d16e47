//! Every piece of user code that runs for a task — the argument's
//! `Serialize`, `Drop` and `Deserialize`, the function, the result's
//! `Serialize`, `Drop` and `Deserialize` — fails only its own task when it
//! panics or returns an error: the other tasks of the batch give their
//! results, the workers live on, and the outcome is the same for every
//! `n_jobs` and chunk size.

mod common;

use common::*;
use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const N: u64 = 300;
/// The one task whose user code misbehaves, in the middle of a batch.
const BAD: u64 = 150;

/// Where a value misbehaves, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Fault {
    None,
    ArgSerializePanics,
    ArgDropPanics,
    ArgDeserializeErrs,
    ArgDeserializePanics,
    ResultSerializePanics,
    ResultDropPanics,
    ResultDeserializeErrs,
    ResultDeserializePanics,
    /// Kills the worker outright while decoding the argument.
    ArgDeserializeAborts,
    /// Kills the worker outright while encoding the result.
    ResultSerializeAborts,
}

/// An argument or result that carries its fault along. Only a value made
/// by `new` (the argument as the caller made it, the result as the function
/// returned it) is armed: the copies decoding makes are not, so the value
/// the caller ends up with drops quietly.
#[derive(Debug)]
struct Value {
    x: u64,
    fault: Fault,
    armed: bool,
}

impl Value {
    fn new(x: u64, fault: Fault) -> Value {
        Value {
            x,
            fault,
            armed: true,
        }
    }

    /// Whether this is the faulty argument (`BAD`) or the faulty result
    /// (twice `BAD`) and misbehaves this way.
    fn faulty(&self, fault: Fault) -> bool {
        let at = match fault {
            Fault::ResultSerializePanics
            | Fault::ResultDropPanics
            | Fault::ResultDeserializeErrs
            | Fault::ResultDeserializePanics
            | Fault::ResultSerializeAborts => BAD * 2,
            _ => BAD,
        };
        self.x == at && self.fault == fault
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.faulty(Fault::ArgSerializePanics) || self.faulty(Fault::ResultSerializePanics) {
            panic!("serialize of {} panics", self.x);
        }
        if self.faulty(Fault::ResultSerializeAborts) {
            std::process::abort();
        }
        if self.x == u64::MAX {
            return Err(S::Error::custom("never"));
        }
        (self.x, self.fault).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        let (x, fault) = <(u64, Fault)>::deserialize(d)?;
        let value = Value {
            x,
            fault,
            armed: false,
        };
        if value.faulty(Fault::ArgDeserializeAborts) {
            std::process::abort();
        }
        if value.faulty(Fault::ArgDeserializeErrs) || value.faulty(Fault::ResultDeserializeErrs) {
            return Err(D::Error::custom(format!("{x} refuses to be decoded")));
        }
        if value.faulty(Fault::ArgDeserializePanics) || value.faulty(Fault::ResultDeserializePanics)
        {
            panic!("deserialize of {x} panics");
        }
        Ok(value)
    }
}

impl Drop for Value {
    fn drop(&mut self) {
        if self.armed && (self.faulty(Fault::ArgDropPanics) || self.faulty(Fault::ResultDropPanics))
        {
            panic!("drop of {} panics", self.x);
        }
    }
}

fn double(_: &ArchivedSmall, arg: Value) -> Value {
    // The argument's faults travel on to the result, where they apply.
    let fault = match arg.fault {
        Fault::ResultSerializePanics
        | Fault::ResultDropPanics
        | Fault::ResultDeserializeErrs
        | Fault::ResultDeserializePanics
        | Fault::ResultSerializeAborts => arg.fault,
        _ => Fault::None,
    };
    Value::new(arg.x * 2, fault)
}

/// What a run gave: each task's value or error, in order.
type Outcomes = Vec<Result<u64, procpool::TaskError>>;

/// An invoker of `f` with `n_jobs` workers, a fixed chunk size or automatic
/// batching, and `max_tries` tries per task.
fn invoker<A, R>(
    store: &procpool::ModelStore<Small>,
    f: procpool::TaskFn<Small, A, R>,
    (n_jobs, chunk, max_tries): (usize, Option<usize>, u32),
) -> procpool::Invoker<Small, A, R>
where
    A: serde::Serialize + serde::de::DeserializeOwned + 'static,
    R: serde::Serialize + serde::de::DeserializeOwned + 'static,
{
    let mut builder = procpool::InvokerBuilder::new(store, f)
        .n_jobs(n_jobs)
        .max_tries(max_tries);
    if let Some(chunk) = chunk {
        builder = builder.chunk_size(chunk);
    }
    builder.build().unwrap()
}

fn run(fault: Fault, n_jobs: usize, chunk: Option<usize>) -> (Outcomes, Vec<u32>, Vec<u32>) {
    let store = procpool::persist(&small()).unwrap();
    let mut inv = invoker(&store, double, (n_jobs, chunk, 2));
    let before = inv.worker_pids();
    let outcomes: Outcomes = inv
        .map((0..N).map(|x| Value::new(x, fault)))
        .map(|r| r.map(|v| v.x))
        .collect();
    let after = inv.worker_pids();
    (outcomes, before, after)
}

/// Runs `fault` for n_jobs 1, 2 and 4 and automatic, small and whole-input
/// chunks; every task but `BAD` succeeds, and `check` approves `BAD`'s error.
fn check_fault(fault: Fault, check: impl Fn(&procpool::TaskError)) {
    for n_jobs in [1, 2, 4] {
        for chunk in [None, Some(7), Some(N as usize)] {
            let what = format!("{fault:?}, n_jobs {n_jobs}, chunk {chunk:?}");
            let (outcomes, before, after) = run(fault, n_jobs, chunk);
            assert_eq!(outcomes.len(), N as usize, "{what}");
            for (i, outcome) in outcomes.iter().enumerate() {
                let i = i as u64;
                match outcome {
                    Ok(v) => {
                        assert_ne!(i, BAD, "{what}: the faulty task succeeded");
                        assert_eq!(*v, i * 2, "{what}: task {i}");
                    }
                    Err(e) => {
                        assert_eq!(i, BAD, "{what}: task {i} failed: {e}");
                        assert_eq!(e.task_index(), BAD, "{what}");
                        assert!(!e.is_crash(), "{what}: {e}");
                        check(e);
                    }
                }
            }
            assert!(outcomes[BAD as usize].is_err(), "{what}");
            // No worker died: the same processes ran every batch.
            assert_eq!(before, after, "{what}");
        }
    }
}

fn is_panic_with(e: &procpool::TaskError, message: &str) {
    assert!(e.is_panic(), "{e}");
    assert_eq!(e.panic_message(), Some(message), "{e}");
    let location = e.panic_location().unwrap_or_default();
    assert!(
        location.contains("invoker_user_code.rs"),
        "{e}: location {location:?}"
    );
}

#[test]
fn an_argument_that_cannot_be_decoded_fails_alone() {
    check_fault(Fault::ArgDeserializeErrs, |e| {
        assert!(e.is_serialization(), "{e}");
        assert!(e.to_string().contains("cannot decode argument"), "{e}");
    });
}

/// A panic in each piece of serde code that runs for a task, in the
/// caller or in a worker, with the message it must be reported with.
const PANICS: [(Fault, &str); 5] = [
    (Fault::ArgSerializePanics, "serialize of 150 panics"),
    (Fault::ArgDropPanics, "drop of 150 panics"),
    (Fault::ArgDeserializePanics, "deserialize of 150 panics"),
    (Fault::ResultSerializePanics, "serialize of 300 panics"),
    (Fault::ResultDropPanics, "drop of 300 panics"),
];

#[test]
fn a_panic_in_an_arguments_or_results_serde_code_or_drop_fails_alone() {
    for (fault, message) in PANICS {
        check_fault(fault, |e| is_panic_with(e, message));
    }
}

#[test]
fn a_result_that_cannot_be_decoded_fails_alone() {
    check_fault(Fault::ResultDeserializeErrs, |e| {
        assert!(e.is_serialization(), "{e}");
        assert!(e.to_string().contains("cannot decode result"), "{e}");
    });
}

#[test]
fn a_panic_in_a_results_deserialize_in_the_caller_fails_alone() {
    check_fault(Fault::ResultDeserializePanics, |e| {
        is_panic_with(e, "deserialize of 300 panics")
    });
}

/// Task 3 catches a panic of its own and succeeds; task 5 fails by
/// `resume_unwind`, which reports to no hook.
fn catch_then_resume(_: &ArchivedSmall, x: u64) -> u64 {
    if x == 3 {
        let caught = std::panic::catch_unwind(|| panic!("caught by task 3"));
        assert!(caught.is_err());
    }
    if x == 5 {
        std::panic::resume_unwind(Box::new("resumed by task 5"));
    }
    x
}

#[test]
fn a_panic_a_task_caught_does_not_name_a_later_failure() {
    let store = procpool::persist(&small()).unwrap();
    for n_jobs in [1, 2, 4] {
        for chunk in [None, Some(1), Some(10)] {
            let mut inv = invoker(&store, catch_then_resume, (n_jobs, chunk, 2));
            let outcomes: Vec<_> = inv.map(0..10u64).collect();
            for (i, outcome) in outcomes.iter().enumerate() {
                match outcome {
                    Ok(v) => assert_eq!(*v, i as u64),
                    Err(e) => {
                        assert_eq!(i, 5, "{e}");
                        assert_eq!(e.panic_message(), Some("resumed by task 5"), "{e}");
                        assert_eq!(e.panic_location(), None, "{e}");
                    }
                }
            }
            assert!(outcomes[5].is_err());
        }
    }
}

/// Runs `fault`, which kills its worker, for n_jobs 2 and 4 and automatic,
/// small and whole-input chunks, with two tries per task: every task but
/// `BAD` succeeds (none is charged for `BAD`'s deaths), and `BAD` fails
/// with `signal`.
fn check_death(fault: Fault, signal: i32) {
    no_core_dumps();
    for n_jobs in [2, 4] {
        for chunk in [None, Some(7), Some(N as usize)] {
            let what = format!("{fault:?}, n_jobs {n_jobs}, chunk {chunk:?}");
            let (outcomes, _, after) = run(fault, n_jobs, chunk);
            assert_eq!(outcomes.len(), N as usize, "{what}");
            for (i, outcome) in outcomes.iter().enumerate() {
                let i = i as u64;
                match outcome {
                    Ok(v) => assert_eq!(*v, i * 2, "{what}: task {i}"),
                    Err(e) => {
                        assert_eq!(i, BAD, "{what}: task {i} failed: {e}");
                        assert!(e.is_crash(), "{what}: {e}");
                        assert_eq!(e.signal(), Some(signal), "{what}: {e}");
                    }
                }
            }
            assert!(outcomes[BAD as usize].is_err(), "{what}");
            // The dead workers were replaced.
            assert_eq!(after.len(), n_jobs, "{what}");
        }
    }
}

#[test]
fn a_worker_killed_while_decoding_an_argument_blames_that_task_alone() {
    check_death(Fault::ArgDeserializeAborts, libc::SIGABRT);
}

#[test]
fn a_worker_killed_while_encoding_a_result_blames_that_task_alone() {
    check_death(Fault::ResultSerializeAborts, libc::SIGABRT);
}

/// Task `BAD` kills its worker after clearing the worker's record of a
/// running task, as if the worker had died between tasks.
fn die_between_tasks(_: &ArchivedSmall, x: u64) -> u64 {
    if x == BAD {
        procpool_worker::worker::status::idle();
        // SAFETY: kill on our own pid only ends this worker.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    x * 2
}

#[test]
fn a_worker_that_dies_with_no_task_running_blames_no_task_that_had_not_started() {
    let store = procpool::persist(&small()).unwrap();
    for n_jobs in [2, 4] {
        for chunk in [None, Some(7), Some(N as usize)] {
            let what = format!("n_jobs {n_jobs}, chunk {chunk:?}");
            let mut inv = invoker(&store, die_between_tasks, (n_jobs, chunk, 1));
            let outcomes: Vec<_> = inv.map(0..N).collect();
            for (i, outcome) in outcomes.iter().enumerate() {
                let i = i as u64;
                match outcome {
                    Ok(v) => assert_eq!(*v, i * 2, "{what}: task {i}"),
                    Err(e) => {
                        // Deaths with no task running are charged to none
                        // until the task is alone in its batch, and then
                        // only after repeated deaths.
                        assert_eq!(i, BAD, "{what}: task {i} failed: {e}");
                        assert!(e.is_crash(), "{what}: {e}");
                        assert_eq!(e.signal(), Some(libc::SIGKILL), "{what}: {e}");
                        assert!(e.to_string().contains("before it started"), "{what}: {e}");
                    }
                }
            }
            assert!(outcomes[BAD as usize].is_err(), "{what}");
        }
    }
}
