//! Running one batch of tasks: decoding arguments, calling the user's
//! function under `catch_unwind`, encoding each outcome. The same code runs in
//! worker processes and, for `n_jobs = 1`, in the parent itself, so both give
//! the same results and the same errors.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use rkyv::Portable;
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::stamps::{Step, stamp};
use crate::wire::{
    MAX_RESULTS_BYTES, RESULT_FAILURE_RESERVE, RESULT_TOO_LARGE, TaskFailure, begin_item,
    encode_into, end_item, split_item,
};

/// A batch as it arrives: where it starts, its seed root, and its arguments.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    /// Index of the first task in the whole `map`.
    pub first_index: u64,
    /// The root seed every task seed derives from.
    pub root_seed: u64,
    /// Number of arguments.
    pub count: u32,
    /// The postcard-encoded arguments, each framed as an item (see
    /// [`crate::wire::begin_item`]).
    pub items: &'a [u8],
}

/// Checks that `archive` holds a valid `T` (rkyv's structural validation).
pub fn validate_archive<T>(archive: &[u8]) -> Result<(), String>
where
    T: Portable + for<'a> CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>,
{
    rkyv::access::<T, rancor::Error>(archive)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs each task of `batch` through `call` and appends each outcome to
/// `out`, as a framed item.
///
/// Every piece of user code a task runs here (the argument's `Deserialize`,
/// the function, the result's `Serialize` and `Drop`) runs under
/// `catch_unwind`: its panic or error is that task's failure, and the other
/// tasks of the batch are untouched. The task counts as started (in the
/// status page) before its argument is decoded, so a worker that dies while
/// decoding names that task, not another.
pub fn run_items<A, R>(batch: BatchView<'_>, out: &mut Vec<u8>, mut call: impl FnMut(A) -> R)
where
    A: DeserializeOwned,
    R: Serialize,
{
    install_panic_hook();
    let was_capturing = CAPTURE.with(|c| c.replace(true));
    let base = out.len();
    let mut rest = batch.items;
    let count = u64::from(batch.count);
    // Whether the next result is expected to take 128 bytes or more (see
    // `begin_item`): the first is; then each is like the one before.
    let mut large = true;
    for i in 0..count {
        let index = batch.first_index + i;
        let later = (count - i - 1) as usize;
        let Some(item) = split_item(&mut rest) else {
            // Only a bug or a corrupted message leaves a body without its
            // items; nothing after this point can be found.
            let failure =
                format!("malformed batch: task {index} (item {i} of {count}) is not a whole item");
            fail_from(i, count, TaskFailure::BadArgument(failure), out, base);
            break;
        };
        run_one(
            &mut call,
            item,
            (index, batch.root_seed),
            out,
            (base, later),
            &mut large,
        );
    }
    CURRENT.with(|c| c.set(None));
    CAPTURE.with(|c| c.set(was_capturing));
}

/// Fails every task of `batch` with `failure`, as its outcomes in `out`.
pub(crate) fn fail_all(batch: BatchView<'_>, out: &mut Vec<u8>, failure: TaskFailure) {
    let base = out.len();
    fail_from(0, u64::from(batch.count), failure, out, base);
}

/// Appends `failure` as the outcome of tasks `first..count` of a batch
/// whose outcomes start at `base` in `out`.
fn fail_from(first: u64, count: u64, failure: TaskFailure, out: &mut Vec<u8>, base: usize) {
    let outcome: Result<(), TaskFailure> = Err(failure);
    for j in first..count {
        encode_outcome(&outcome, out, base, (count - j - 1) as usize, &mut false);
    }
}

/// Appends a map-reduce batch's partial result after its outcomes: one
/// more item, within what one message carries.
pub(crate) fn push_partial<R: Serialize>(
    partial: &Result<Option<R>, TaskFailure>,
    out: &mut Vec<u8>,
) {
    // Measured from the start of `out`, which holds the frame and results
    // headers too: a little less room than a message has, never more.
    encode_outcome_within(partial, out, (0, 0, MAX_RESULTS_BYTES), &mut true);
}

/// Runs one task whose encoded argument is `item` and appends its outcome.
fn run_one<A, R>(
    call: &mut impl FnMut(A) -> R,
    item: &[u8],
    (index, root_seed): (u64, u64),
    out: &mut Vec<u8>,
    (base, later): (usize, usize),
    large: &mut bool,
) where
    A: DeserializeOwned,
    R: Serialize,
{
    crate::worker::status::task_started(index);
    CURRENT.with(|c| {
        c.set(Some(TaskContext {
            index,
            seed: task_seed(root_seed, index),
        }))
    });
    let mark = out.len();
    // One `catch_unwind` for the whole task: whichever step panics, the
    // task fails with that panic, and what it had encoded gives way.
    let ran = catch(|| {
        stamp(Step::CallStart);
        let outcome: Result<R, TaskFailure> = match postcard::from_bytes::<A>(item) {
            Ok(arg) => Ok(call(arg)),
            Err(e) => Err(TaskFailure::BadArgument(format!(
                "cannot decode argument: {e}"
            ))),
        };
        stamp(Step::CallDone);
        if crate::worker::link::is_fork_copy() {
            // A copy of the worker that the task forked, returning from the
            // task: the worker itself answers for it. The copy has no link
            // and must not run the rest of the batch a second time. Stdout
            // is not flushed: another thread may have held its lock at the
            // fork, and what its buffer held then is the worker's to write.
            // SAFETY: _exit ends the process without running any more code.
            unsafe { libc::_exit(0) };
        }
        encode_outcome(&outcome, out, base, later, large);
        // The result's `Drop` is the task's too.
        drop(outcome);
    });
    if let Err(failure) = ran {
        out.truncate(mark);
        encode_outcome(&Err::<(), _>(failure), out, base, later, large);
    }
}

/// Runs `f`, turning a panic into a [`TaskFailure::Panicked`] with the
/// panic's own message and, when [`capturing`] panics, its location.
///
/// ```
/// use procpool_worker::worker::task::{capturing, catch};
/// let failure = capturing(|| catch(|| panic!("no {}", 7))).unwrap_err();
/// assert!(format!("{failure:?}").contains("no 7"));
/// assert_eq!(capturing(|| catch(|| 7)), Ok(7));
/// ```
#[inline]
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, TaskFailure> {
    let seen = PANICS_SEEN.with(Cell::get);
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_failure(payload, seen))
}

/// Runs `f` with the panics of this thread recorded for [`catch`] rather
/// than printed: a panic caught there becomes a task's error, and printing
/// it too would report it twice. A panic that escapes `f` is printed by the
/// hook that was there before.
///
/// ```
/// use procpool_worker::worker::task::{capturing, catch};
/// let failure = capturing(|| catch(|| panic!("quiet"))).unwrap_err();
/// assert!(format!("{failure:?}").contains("quiet"));
/// ```
#[inline]
pub fn capturing<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        #[inline]
        fn drop(&mut self) {
            CAPTURE.with(|c| c.set(self.0));
        }
    }
    install_panic_hook();
    let _restore = Restore(CAPTURE.with(|c| c.replace(true)));
    f()
}

/// The failure of a panic whose payload is `payload`; `seen` is what
/// [`PANICS_SEEN`] held when the code that panicked started.
#[cold]
fn panic_failure(payload: Box<dyn std::any::Any + Send>, seen: u64) -> TaskFailure {
    let message = payload_message(&*payload);
    // The location is known if the hook recorded this panic: one recorded
    // since the code started, with the same message. `resume_unwind` does
    // not call the hook, and a panic the task caught itself is older.
    let location = LAST_PANIC
        .with(|p| p.borrow_mut().take())
        .filter(|last| last.number > seen && last.message == message)
        .and_then(|last| last.location);
    // A payload whose own `Drop` panics must not unwind out of here.
    if let Err(second) = panic::catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(second);
    }
    TaskFailure::Panicked { message, location }
}

/// Appends one encoded outcome to the outcomes that start at `base` in
/// `out`, `later` tasks before the end of the batch. If `R` cannot be
/// encoded, or would leave too little room of what one message carries for
/// a short failure of each later task, the partial bytes are dropped and a
/// [`TaskFailure::BadResult`] takes their place: so every task of a batch
/// gets an outcome, and the batch's outcomes always fit in a message.
fn encode_outcome<R: Serialize>(
    outcome: &Result<R, TaskFailure>,
    out: &mut Vec<u8>,
    base: usize,
    later: usize,
    large: &mut bool,
) {
    encode_outcome_within(outcome, out, (base, later, MAX_RESULTS_BYTES), large);
}

/// [`encode_outcome`] for a message that carries `max` bytes of outcomes.
fn encode_outcome_within<R: Serialize>(
    outcome: &Result<R, TaskFailure>,
    out: &mut Vec<u8>,
    (base, later, max): (usize, usize, usize),
    large: &mut bool,
) {
    let limit = max.saturating_sub(later.saturating_mul(RESULT_FAILURE_RESERVE));
    let mark = out.len();
    let start = begin_item(out, *large);
    let encoded = encode_into(outcome, out);
    let failure = match encoded {
        Ok(()) => {
            *large = end_item(out, start);
            if out.len() - base <= limit {
                return;
            }
            format!(
                "result too large to send: {} bytes encoded, at most {} for a batch's results",
                out.len() - mark,
                limit.saturating_sub(mark - base)
            )
        }
        Err(e) => format!("cannot encode result: {e}"),
    };
    out.truncate(mark);
    push_failure(out, TaskFailure::BadResult(failure));
    if out.len() - base > limit {
        // No room for the long message: the short one fits in the room
        // kept for this task.
        out.truncate(mark);
        push_failure(out, TaskFailure::BadResult(RESULT_TOO_LARGE.to_string()));
    }
}

/// Appends the framed outcome `Err(failure)` to `out`.
fn push_failure(out: &mut Vec<u8>, failure: TaskFailure) {
    let start = begin_item(out, false);
    // Encoding a plain enum of strings into a Vec cannot fail.
    let _ = encode_into(&Err::<(), _>(failure), out);
    end_item(out, start);
}

fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// The task the current thread is running.
#[derive(Debug, Clone, Copy)]
pub struct TaskContext {
    /// The task's index in its `map`.
    pub index: u64,
    /// The task's derived seed.
    pub seed: u64,
}

/// A panic the hook recorded while [`capturing`].
struct RecordedPanic {
    /// Its number among the panics recorded on its thread, from 1.
    number: u64,
    message: String,
    location: Option<String>,
}

thread_local! {
    static CURRENT: Cell<Option<TaskContext>> = const { Cell::new(None) };
    static CAPTURE: Cell<bool> = const { Cell::new(false) };
    /// Panics the hook has recorded on this thread.
    static PANICS_SEEN: Cell<u64> = const { Cell::new(0) };
    static LAST_PANIC: RefCell<Option<RecordedPanic>> = const { RefCell::new(None) };
}

/// This worker's number in its pool, set once from its setup.
static WORKER_ID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Records this process's number in its pool (a worker's setup does).
pub fn set_worker_id(id: u32) {
    let _ = WORKER_ID.set(id);
}

/// This process's number in its pool, if it is a pool's worker.
///
/// ```
/// assert_eq!(procpool_worker::worker::task::worker_id(), None);
/// ```
pub fn worker_id() -> Option<u32> {
    WORKER_ID.get().copied()
}

/// The task this thread is running, if any.
pub fn current_task() -> Option<TaskContext> {
    CURRENT.with(|c| c.get())
}

/// Installs, once per process, a panic hook that records the message and
/// location of panics inside tasks (they become task errors and are not
/// printed) and defers to the previous hook for every other panic.
#[inline]
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURE.with(|c| c.get()) {
                let message = payload_message(info.payload());
                let location = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
                let number = PANICS_SEEN.with(|n| n.get() + 1);
                PANICS_SEEN.with(|n| n.set(number));
                LAST_PANIC.with(|p| {
                    *p.borrow_mut() = Some(RecordedPanic {
                        number,
                        message,
                        location,
                    })
                });
            } else {
                previous(info);
            }
        }));
    });
}

/// The seed of task `index` under `root_seed`.
///
/// Two rounds of the SplitMix64 finaliser: the index is mixed first, so
/// neighbouring indices land far apart, then combined with the root and mixed
/// again. The result depends only on `(root_seed, index)`, never on which
/// worker ran the task, so it is the same for any `n_jobs`.
///
/// ```
/// let a = procpool_worker::worker::task::task_seed(42, 0);
/// assert_eq!(a, procpool_worker::worker::task::task_seed(42, 0));
/// assert_ne!(a, procpool_worker::worker::task::task_seed(42, 1));
/// assert_ne!(a, procpool_worker::worker::task::task_seed(43, 0));
/// ```
#[inline]
pub fn task_seed(root_seed: u64, index: u64) -> u64 {
    splitmix64(root_seed ^ splitmix64(index.wrapping_add(0x9E37_79B9_7F4A_7C15)))
}

#[inline]
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_failure_fits_in_the_room_kept_for_it() {
        let mut bytes = Vec::new();
        push_failure(
            &mut bytes,
            TaskFailure::BadResult(RESULT_TOO_LARGE.to_string()),
        );
        assert!(
            bytes.len() <= RESULT_FAILURE_RESERVE,
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn every_task_gets_an_outcome_and_the_batch_stays_in_its_limit() {
        // The room kept is 50 short failures (1,400 bytes): every `max` here
        // holds it, as a message holds it for the most tasks a batch has.
        let count = 50;
        for (max, size) in [
            (2000, 100),
            (2000, 10),
            (1450, 1),
            (20_000, 4000),
            (1400, 3000),
        ] {
            let mut out = vec![9u8; 7];
            let base = out.len();
            let mut large = true;
            for i in 0..count {
                let value: Result<Vec<u8>, TaskFailure> = Ok(vec![1; size]);
                encode_outcome_within(&value, &mut out, (base, count - i - 1, max), &mut large);
            }
            assert!(
                out.len() - base <= max,
                "max {max}, size {size}: {} bytes",
                out.len() - base
            );
            let mut rest = &out[base..];
            let mut fitted = 0;
            for _ in 0..count {
                let item = split_item(&mut rest).unwrap();
                let outcome = postcard::from_bytes::<Result<Vec<u8>, TaskFailure>>(item).unwrap();
                match outcome {
                    Ok(v) => {
                        assert_eq!(v.len(), size);
                        fitted += 1;
                    }
                    Err(TaskFailure::BadResult(msg)) => assert!(msg.starts_with(RESULT_TOO_LARGE)),
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            assert!(rest.is_empty());
            // A result that fits beside the room kept for the others is kept.
            let mut alone = Vec::new();
            let value: Result<Vec<u8>, TaskFailure> = Ok(vec![1; size]);
            encode_outcome_within(&value, &mut alone, (0, 0, usize::MAX), &mut true);
            let first_fits = alone.len() <= max - (count - 1) * RESULT_FAILURE_RESERVE;
            assert_eq!(fitted > 0, first_fits, "max {max}, size {size}");
        }
    }
}
