//! The kinds of job a worker runs, as its setup names them
//! ([`crate::wire::JobKind`]), and the entry point of each: a function
//! monomorphised for the user's types in the parent, named by its offset,
//! and called here once per batch.
//!
//! - a **map** (with a model or without): one call per task, one outcome
//!   each ([`map_with_model`], [`map`]);
//! - a **map-reduce**: one call per task, the results folded by a reducer
//!   in the worker; each task sends only whether it failed, and the batch
//!   one partial result ([`map_reduce`]);
//! - a **map over runs of items**: a pipeline's window or chunk, decoded
//!   as a `Vec` and lent to the function as a slice ([`map_slices`]);
//! - a **stateful stage**: `init` once in the worker, then `step` on every
//!   item in order, the state kept from batch to batch in the worker and
//!   never sent anywhere ([`stateful`]).

use std::any::Any;

use rkyv::Portable;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::TaskFailure;
use crate::worker::task::{BatchView, capturing, catch, fail_all, push_partial, run_items};

/// The user's functions of a job, as addresses in this process: what each
/// means depends on the kind (see the entry points). An unused one is 0 and
/// never called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobFns {
    /// The function each task calls: a map's, a map-reduce's mapper, a
    /// stateful stage's `step`.
    pub task: usize,
    /// A map-reduce's reducer, or a stateful stage's `init`.
    pub helper: usize,
}

/// What a job keeps in one worker from batch to batch: a stateful stage's
/// state, once its `init` has run.
pub type JobState = Option<Box<dyn Any>>;

/// What a runner works on: the job's state in this worker, the model's
/// archive (empty without a model), the batch, and where its outcomes go.
#[derive(Debug)]
pub struct BatchJob<'a> {
    /// The job's state, kept from batch to batch.
    pub state: &'a mut JobState,
    /// The model's archive.
    pub archive: &'a [u8],
    /// The batch to run.
    pub batch: BatchView<'a>,
    /// Where the batch's outcomes are appended.
    pub out: &'a mut Vec<u8>,
}

/// Type-erased entry point of a monomorphised job runner: runs the batch
/// and appends its outcomes.
pub type BatchRunner = unsafe fn(fns: JobFns, job: BatchJob<'_>);

/// A map over a model: `fns.task` is a `fn(&T, A) -> R`; one postcard
/// `Result<R, TaskFailure>` per task.
///
/// # Safety
///
/// `fns.task` must be the address of a `fn(&T, A) -> R` with exactly these
/// type parameters, and `archive` must hold a `T` that
/// [`validate_archive::<T>`](crate::worker::task::validate_archive)
/// accepted and that nobody can modify while it is borrowed.
pub unsafe fn map_with_model<T, A, R>(fns: JobFns, job: BatchJob<'_>)
where
    T: Portable,
    A: DeserializeOwned,
    R: Serialize,
{
    // SAFETY: the caller promises `fns.task` is a `fn(&T, A) -> R`.
    let func = unsafe { std::mem::transmute::<usize, fn(&T, A) -> R>(fns.task) };
    // SAFETY: the caller promises the archive was validated as a `T` and is
    // immutable.
    let model: &T = unsafe { rkyv::access_unchecked::<T>(job.archive) };
    run_items(job.batch, job.out, |arg| func(model, arg));
}

/// A map without a model: `fns.task` is a `fn(A) -> R`; one postcard
/// `Result<R, TaskFailure>` per task.
///
/// # Safety
///
/// `fns.task` must be the address of a `fn(A) -> R` with exactly these type
/// parameters.
pub unsafe fn map<A, R>(fns: JobFns, job: BatchJob<'_>)
where
    A: DeserializeOwned,
    R: Serialize,
{
    // SAFETY: the caller promises `fns.task` is a `fn(A) -> R`.
    let func = unsafe { std::mem::transmute::<usize, fn(A) -> R>(fns.task) };
    run_items(job.batch, job.out, func);
}

/// A map whose task folds a chunk: `fns.task` is a binary operation, a
/// `fn(R, T) -> R`, and each task's argument an `(R, Vec<T>)`, the chunk
/// and the value its fold starts from; one postcard `Result<R,
/// TaskFailure>` per task.
///
/// # Safety
///
/// `fns.task` must be the address of a `fn(R, T) -> R` with exactly these
/// type parameters.
pub unsafe fn fold_chunks<T, R>(fns: JobFns, job: BatchJob<'_>)
where
    T: DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    // SAFETY: the caller promises `fns.task` is a `fn(R, T) -> R`.
    let binop = unsafe { std::mem::transmute::<usize, fn(R, T) -> R>(fns.task) };
    run_items(job.batch, job.out, |(start, chunk): (R, Vec<T>)| {
        chunk.into_iter().fold(start, binop)
    });
}

/// A map whose task reads a run of items: `fns.task` is a `fn(&[B]) -> C`,
/// each task's argument a `Vec<B>` (a pipeline's window or chunk); one
/// postcard `Result<C, TaskFailure>` per task.
///
/// # Safety
///
/// `fns.task` must be the address of a `fn(&[B]) -> C` with exactly these
/// type parameters.
pub unsafe fn map_slices<B, C>(fns: JobFns, job: BatchJob<'_>)
where
    B: DeserializeOwned,
    C: Serialize,
{
    // SAFETY: the caller promises `fns.task` is a `fn(&[B]) -> C`.
    let func = unsafe { std::mem::transmute::<usize, fn(&[B]) -> C>(fns.task) };
    run_items(job.batch, job.out, |items: Vec<B>| func(&items));
}

/// A map-reduce: `fns.task` is the mapper, a `fn(A) -> R`, and
/// `fns.helper` the reducer, a `fn(R, R) -> R`, which folds the batch's
/// results here. Outcomes: one postcard `Result<(), TaskFailure>` per task,
/// then the batch's partial, a `Result<Option<R>, TaskFailure>` (`None` when
/// no task succeeded; a failure when the reducer panicked, and then that
/// task fails too).
///
/// # Safety
///
/// `fns.task` must be the address of a `fn(A) -> R` and `fns.helper` of a
/// `fn(R, R) -> R`, with exactly these type parameters.
pub unsafe fn map_reduce<A, R>(fns: JobFns, job: BatchJob<'_>)
where
    A: DeserializeOwned,
    R: Serialize,
{
    // SAFETY: the caller promises `fns.task` is a `fn(A) -> R`.
    let mapper = unsafe { std::mem::transmute::<usize, fn(A) -> R>(fns.task) };
    // SAFETY: the caller promises `fns.helper` is a `fn(R, R) -> R`.
    let reducer = unsafe { std::mem::transmute::<usize, fn(R, R) -> R>(fns.helper) };
    let mut partial: Result<Option<R>, TaskFailure> = Ok(None);
    // Set while the reducer runs: if it panics, the fold so far is gone.
    let mut folding_at: Option<u64> = None;
    let BatchJob { batch, out, .. } = job;
    run_items(batch, out, |arg| {
        let result = mapper(arg);
        // After a reducer's panic the fold is gone: fold nothing more.
        if let (Ok(acc), None) = (&mut partial, folding_at) {
            let index = crate::worker::task::current_task().map_or(0, |t| t.index);
            folding_at = Some(index);
            *acc = Some(match acc.take() {
                Some(sum) => reducer(sum, result),
                None => result,
            });
            folding_at = None;
        }
    });
    if let Some(index) = folding_at {
        partial = Err(TaskFailure::Panicked {
            message: format!("the reducer panicked folding the result of task {index}"),
            location: None,
        });
    }
    push_partial(&partial, out);
}

/// A stateful stage: `fns.helper` is its `init`, a `fn() -> S`, run once in
/// this worker before its first item; `fns.task` its `step`, a
/// `fn(&mut S, A) -> B`, run on every item in order. The state stays in the
/// worker from batch to batch. Outcomes: one postcard `Result<B,
/// TaskFailure>` per item; if `init` panics, every item of the batch fails
/// with that panic (and the next batch tries `init` again).
///
/// # Safety
///
/// `fns.helper` must be the address of a `fn() -> S` and `fns.task` of a
/// `fn(&mut S, A) -> B`, with exactly these type parameters, and `state`
/// must be this job's own (only ever given to this runner).
pub unsafe fn stateful<S, A, B>(fns: JobFns, job: BatchJob<'_>)
where
    S: 'static,
    A: DeserializeOwned,
    B: Serialize,
{
    // SAFETY: the caller promises `fns.helper` is a `fn() -> S`.
    let init = unsafe { std::mem::transmute::<usize, fn() -> S>(fns.helper) };
    // SAFETY: the caller promises `fns.task` is a `fn(&mut S, A) -> B`.
    let step = unsafe { std::mem::transmute::<usize, fn(&mut S, A) -> B>(fns.task) };
    let BatchJob {
        state, batch, out, ..
    } = job;
    if state.is_none() {
        match capturing(|| catch(init)) {
            Ok(s) => *state = Some(Box::new(s)),
            Err(failure) => return fail_all(batch, out, failure),
        }
    }
    match state.as_mut().and_then(|s| s.downcast_mut::<S>()) {
        Some(s) => run_items(batch, out, |arg| step(s, arg)),
        // Only a job given another job's state gets here.
        None => fail_all(
            batch,
            out,
            TaskFailure::BadArgument("the stage's state has another type".into()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode_into, push_item, split_item};

    /// Runs one batch of `args` (tasks `first..`) through `runner` here, as
    /// a worker does, and returns the outcomes' items.
    fn run<A: Serialize>(
        runner: BatchRunner,
        fns: JobFns,
        state: &mut JobState,
        first: u64,
        args: &[A],
    ) -> Vec<Vec<u8>> {
        let mut items = Vec::new();
        for arg in args {
            let mut bytes = Vec::new();
            encode_into(arg, &mut bytes).unwrap();
            push_item(&mut items, &bytes);
        }
        let batch = BatchView {
            first_index: first,
            root_seed: 7,
            count: args.len() as u32,
            items: &items,
        };
        let mut out = Vec::new();
        let job = BatchJob {
            state,
            archive: &[],
            batch,
            out: &mut out,
        };
        // SAFETY: every test passes a runner instantiated for its functions.
        unsafe { runner(fns, job) };
        let mut rest = &out[..];
        let mut outcomes = Vec::new();
        while !rest.is_empty() {
            outcomes.push(split_item(&mut rest).unwrap().to_vec());
        }
        outcomes
    }

    fn decode<T: serde::de::DeserializeOwned>(item: &[u8]) -> Result<T, TaskFailure> {
        postcard::from_bytes::<Result<T, TaskFailure>>(item).unwrap()
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

    fn add_but_not_past_1000(a: u64, b: u64) -> u64 {
        assert!(a + b <= 1000, "past 1000");
        a + b
    }

    fn reduce_fns(reducer: fn(u64, u64) -> u64) -> JobFns {
        JobFns {
            task: square as fn(u64) -> u64 as usize,
            helper: reducer as usize,
        }
    }

    #[test]
    fn a_map_reduce_batch_sends_one_partial_and_each_tasks_failure() {
        let runner = map_reduce::<u64, u64> as BatchRunner;
        let outcomes = run(runner, reduce_fns(add), &mut None, 10, &[1u64, 2, 13, 4]);
        assert_eq!(outcomes.len(), 5, "four outcomes, then the partial");
        assert_eq!(decode::<()>(&outcomes[0]), Ok(()));
        assert!(matches!(
            decode::<()>(&outcomes[2]),
            Err(TaskFailure::Panicked { message, .. }) if message == "thirteen"
        ));
        assert_eq!(decode::<Option<u64>>(&outcomes[4]), Ok(Some(1 + 4 + 16)));
        // No task succeeds: no partial, not an error.
        let outcomes = run(runner, reduce_fns(add), &mut None, 0, &[13u64]);
        assert_eq!(decode::<Option<u64>>(&outcomes[1]), Ok(None));
        let outcomes = run(runner, reduce_fns(add), &mut None, 0, &[] as &[u64]);
        assert_eq!(outcomes.len(), 1);
        assert_eq!(decode::<Option<u64>>(&outcomes[0]), Ok(None));
    }

    #[test]
    fn a_reducer_that_panics_fails_the_partial_and_its_task() {
        let runner = map_reduce::<u64, u64> as BatchRunner;
        let fns = reduce_fns(add_but_not_past_1000);
        // 100 + 400 + 900: the third fold passes 1000.
        let outcomes = run(runner, fns, &mut None, 0, &[10u64, 20, 30, 1]);
        assert_eq!(decode::<()>(&outcomes[0]), Ok(()));
        assert_eq!(decode::<()>(&outcomes[1]), Ok(()));
        assert!(matches!(
            decode::<()>(&outcomes[2]),
            Err(TaskFailure::Panicked { .. })
        ));
        assert_eq!(decode::<()>(&outcomes[3]), Ok(()));
        match decode::<Option<u64>>(&outcomes[4]) {
            Err(TaskFailure::Panicked { message, .. }) => {
                assert!(message.contains("task 2"), "{message}")
            }
            other => panic!("the partial survived a reducer's panic: {other:?}"),
        }
    }

    fn spread(items: &[u64]) -> u64 {
        assert!(items.len() > 1, "one item has no spread");
        items.iter().max().unwrap() - items.iter().min().unwrap()
    }

    #[test]
    fn a_map_over_slices_lends_each_decoded_vec_to_the_function() {
        let runner = map_slices::<u64, u64> as BatchRunner;
        let fns = JobFns {
            task: spread as fn(&[u64]) -> u64 as usize,
            helper: 0,
        };
        let args = [vec![3u64, 9, 4], vec![7], vec![1, 100]];
        let outcomes = run(runner, fns, &mut None, 0, &args);
        assert_eq!(decode::<u64>(&outcomes[0]), Ok(6));
        assert!(matches!(
            decode::<u64>(&outcomes[1]),
            Err(TaskFailure::Panicked { message, .. }) if message == "one item has no spread"
        ));
        assert_eq!(decode::<u64>(&outcomes[2]), Ok(99));
    }

    static INITS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    fn start_at_100() -> u64 {
        INITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        100
    }

    fn accumulate(sum: &mut u64, x: u64) -> u64 {
        *sum += x;
        *sum
    }

    fn no_init() -> u64 {
        panic!("no state today");
    }

    #[test]
    fn a_stateful_stage_inits_once_and_keeps_its_state_across_batches() {
        let runner = stateful::<u64, u64, u64> as BatchRunner;
        let fns = JobFns {
            task: accumulate as fn(&mut u64, u64) -> u64 as usize,
            helper: start_at_100 as fn() -> u64 as usize,
        };
        let mut state: JobState = None;
        let before = INITS.load(std::sync::atomic::Ordering::SeqCst);
        let first = run(runner, fns, &mut state, 0, &[1u64, 2, 3]);
        let second = run(runner, fns, &mut state, 3, &[4u64]);
        let sums: Vec<u64> = first
            .iter()
            .chain(&second)
            .map(|o| decode::<u64>(o).unwrap())
            .collect();
        assert_eq!(sums, [101, 103, 106, 110]);
        assert_eq!(INITS.load(std::sync::atomic::Ordering::SeqCst), before + 1);
    }

    #[test]
    fn a_stateful_stage_whose_init_panics_fails_every_item_of_the_batch() {
        let runner = stateful::<u64, u64, u64> as BatchRunner;
        let fns = JobFns {
            task: accumulate as fn(&mut u64, u64) -> u64 as usize,
            helper: no_init as fn() -> u64 as usize,
        };
        let mut state: JobState = None;
        let outcomes = run(runner, fns, &mut state, 0, &[1u64, 2]);
        assert_eq!(outcomes.len(), 2);
        for o in &outcomes {
            assert!(matches!(
                decode::<u64>(o),
                Err(TaskFailure::Panicked { message, .. }) if message == "no state today"
            ));
        }
        assert!(state.is_none());
    }
}
