//! What runs in a worker process: its main loop (setup, then batches until
//! the parent says stop or goes away), running a batch's tasks under
//! `catch_unwind` ([`task`]), its link to the parent ([`link`]), forwarding
//! `log` records ([`log_forward`]) and its status page ([`status`]).

pub mod jobs;
pub mod link;
pub mod log_forward;
pub mod status;
pub mod task;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering, fence};

use crate::fnref;
use crate::store_format::{HEADER_LEN, Header};
use crate::sys::{self, WorkerFds};
use crate::wire::frame::{self, FrameReader};
use crate::wire::region::{self, ARENA_MIN_BYTES, Ring};
use crate::wire::{
    BatchHeader, NUM_PROCS_ENV, RESULTS_HEADER, Ready, ResultsHeader, Setup, THREAD_ENV_VARS,
    from_worker, level_filter_from_wire, to_worker,
};
use crate::worker::jobs::{BatchJob, BatchRunner, JobFns, JobState};
use crate::worker::task::BatchView;

fn fatal(message: String) -> ! {
    if let Ok(body) = postcard::to_allocvec(&message) {
        let _ = link::send_frame(from_worker::FATAL, &body);
    }
    leave(2);
}

/// Ends the worker process with `code`, after flushing what user code may
/// have left in Rust's and C's stdout buffers. Like the workers of Python's
/// multiprocessing, it skips C `atexit` handlers and library destructors:
/// they belong to the process the worker was forked from, and running them
/// costs every worker page faults for nothing.
pub fn leave(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    crate::stamps::write_on_exit();
    // SAFETY: fflush(NULL) flushes every C stdio stream; _exit ends the
    // process without running any more code of ours.
    unsafe {
        libc::fflush(std::ptr::null_mut());
        libc::_exit(code)
    }
}

/// Maps the model store read-only and returns its archive bytes, which live
/// as long as the process.
///
/// Only the header is checked here. The parent validated the archive once
/// (or wrote it from a real model) and the bytes cannot change since, so a
/// second structural validation per worker would only cost start-up time in
/// proportion to the model (over 30 s for 2 GiB of `u8` in a debug build).
fn map_model(fd: OwnedFd) -> Result<&'static [u8], String> {
    let file = File::from(fd);
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat the model store: {e}"))?
        .len();
    // SAFETY: the store is a sealed memfd (the kernel refuses every write) or
    // a file whose opener promised, through an unsafe constructor, that
    // nobody modifies it. Either way the mapping never changes under us.
    let map = unsafe { memmap_readonly(&file, len) }?;
    Header::decode(map, len).map_err(|e| e.to_string())?;
    Ok(&map[HEADER_LEN..])
}

/// # Safety
///
/// The file must not be modified for the life of the process.
unsafe fn memmap_readonly(file: &File, len: u64) -> Result<&'static [u8], String> {
    if len == 0 {
        return Err("the model store is empty".into());
    }
    // SAFETY: the caller guarantees the contents do not change.
    let ptr = unsafe { sys::map_shared(file.as_raw_fd(), len as usize, false) }
        .map_err(|e| format!("cannot map the model store: {e}"))?;
    // SAFETY: the mapping is `len` bytes, readable, and never unmapped.
    Ok(unsafe { std::slice::from_raw_parts(ptr as *const u8, len as usize) })
}

/// The variables every setup sets, which a spare adds ahead of time.
fn worker_env_vars() -> impl Iterator<Item = &'static str> {
    std::iter::once(NUM_PROCS_ENV).chain(THREAD_ENV_VARS)
}

/// Bit `i` set: the spare added the `i`-th of [`worker_env_vars`] with a
/// placeholder value.
static ENV_PLACEHOLDERS: AtomicU8 = AtomicU8::new(0);

/// In a spare, while it waits: runs the steps of a worker's start that do
/// not depend on the request, on placeholders. A forked process shares its
/// parent's pages copy-on-write and has none of the program's text mapped,
/// so whatever these steps touch first would cost the request a page fault
/// (about twenty in all); here the spare pays for them while it is idle. On
/// the machines we measure this took a worker from the hand-off to its
/// first result in 46–67 µs instead of 112–130 µs.
pub fn rehearse_start() {
    // The reader's buffer and the encoders' allocations reuse this memory.
    let mut buffer: Vec<u8> = Vec::with_capacity(64 * 1024);
    buffer.resize(4096, 0);
    std::hint::black_box(&buffer);
    drop(buffer);
    let _ = std::hint::black_box(postcard::to_allocvec(&Ready {
        pid: 0,
        fingerprint: 0,
    }));
    std::hint::black_box(std::time::Instant::now());
    link::register_fork_handler();
    // Replacing a variable costs a third of adding one, and the setup sets
    // all of these.
    let mut added = 0u8;
    for (i, key) in worker_env_vars().enumerate() {
        if std::env::var_os(key).is_none() {
            // SAFETY: a spare runs one thread and no user code.
            unsafe { std::env::set_var(key, "0") };
            added |= 1 << i;
        }
    }
    ENV_PLACEHOLDERS.store(added, Ordering::Relaxed);
}

/// Removes the placeholders [`rehearse_start`] added that `env` did not
/// replace.
fn drop_env_placeholders(env: &[(String, String)]) {
    let added = ENV_PLACEHOLDERS.swap(0, Ordering::Relaxed);
    for (i, key) in worker_env_vars().enumerate() {
        if added & (1 << i) != 0 && !env.iter().any(|(k, _)| k == key) {
            // SAFETY: as in `run_adopted`, before any user code or thread.
            unsafe { std::env::remove_var(key) };
        }
    }
}

/// Runs the worker on its link, recording progress in its status page (if
/// it has one), with its model store (if any), all of which it inherited
/// across `exec`. Never returns.
pub fn run(fds: WorkerFds) -> ! {
    // They sit at fixed numbers, put there without close-on-exec. A program
    // a task starts must not inherit them: it would see the parent's
    // batches, and, outliving a crashed worker, hold the link open and hide
    // the death from the parent.
    for fd in fds.raw() {
        if let Err(e) = sys::set_cloexec(fd, true) {
            fatal(format!("cannot mark descriptor {fd} close-on-exec: {e}"));
        }
    }
    run_adopted(fds)
}

/// Like [`run`], for descriptors that are close-on-exec already.
pub fn run_adopted(fds: WorkerFds) -> ! {
    let WorkerFds {
        link: link_ends,
        status,
        model,
    } = fds;
    let fd = link_ends.read.as_raw_fd();
    let out_fd = link_ends.write.as_raw_fd();
    // Both ends live as long as the process.
    std::mem::forget(link_ends);
    link::set(fd, out_fd);
    // The parent wrote the setup into the pipe before this process existed.
    let mut reader = FrameReader::default();
    let setup: Setup = match reader.read_frame(fd) {
        Ok(Some((to_worker::SETUP, body))) => match postcard::from_bytes(body) {
            Ok(s) => s,
            Err(e) => fatal(format!("cannot decode setup: {e}")),
        },
        Ok(Some((to_worker::SHUTDOWN, _))) | Ok(None) => leave(0),
        Ok(Some((tag, _))) => fatal(format!("expected setup, got frame tag {tag}")),
        Err(e) => fatal(format!("cannot read setup: {e}")),
    };
    let fingerprint = fnref::fingerprint();
    if setup.fingerprint != fingerprint {
        // Offsets from another build would point anywhere: use none of them.
        fatal(crate::wire::BUILD_MISMATCH.to_string());
    }
    for (key, value) in &setup.env {
        // SAFETY: no user code has run in this process yet and the worker
        // started no threads, so nothing reads the environment concurrently.
        unsafe { std::env::set_var(key, value) };
    }
    drop_env_placeholders(&setup.env);
    crate::worker::log_forward::install(level_filter_from_wire(setup.max_log_level));
    crate::worker::task::set_worker_id(setup.worker_id);
    if let Some(status) = status
        && let Err(e) = crate::worker::status::install(status, setup.timed)
    {
        fatal(e);
    }
    if let Some(limit) = setup.memory_limit {
        let rlim = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: setrlimit reads one rlimit struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &rlim) } != 0 {
            fatal(format!(
                "cannot set the memory limit: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let archive: &'static [u8] = match model {
        Some(m) => match map_model(m) {
            Ok(a) => a,
            Err(e) => fatal(e),
        },
        None => &[],
    };
    // SAFETY: the parent computed this offset from a `BatchRunner` in the
    // same executable image, which the fingerprint exchanged above confirmed.
    let runner =
        unsafe { std::mem::transmute::<usize, BatchRunner>(fnref::address_of(setup.job.runner)) };
    let fns = JobFns {
        task: fnref::address_of(setup.job.task),
        helper: setup.job.helper.map_or(0, fnref::address_of),
    };
    // A stateful stage's state, from its first batch to the worker's end.
    let mut state: JobState = None;
    let ready = Ready {
        pid: std::process::id(),
        fingerprint,
    };
    match postcard::to_allocvec(&ready) {
        Ok(body) => {
            if link::send_frame(from_worker::READY, &body).is_err() {
                leave(0);
            }
        }
        Err(e) => fatal(format!("cannot encode ready: {e}")),
    }
    let mut out = Vec::new();
    let mut arena = WorkerArena::install();
    loop {
        let (tag, body) = match reader.read_frame(fd) {
            Ok(Some(frame)) => frame,
            Ok(None) => finish(state),
            Err(e) => fatal(format!("cannot read from the parent: {e}")),
        };
        let body = match tag {
            to_worker::BATCH => body,
            to_worker::BATCH_IN_ARENA => match arena.as_ref().and_then(|a| a.batch_body(body)) {
                Some(body) => body,
                None => fatal(format!("bad arena span ({} bytes)", body.len())),
            },
            to_worker::SHUTDOWN => finish(state),
            other => fatal(format!(
                "unexpected frame tag {other} ({} bytes)",
                body.len()
            )),
        };
        let Some((header, items)) = BatchHeader::decode(body) else {
            fatal(format!("batch of {} bytes, too short", body.len()));
        };
        let batch = BatchView {
            first_index: header.first_index,
            root_seed: header.root_seed,
            count: header.count,
            items,
        };
        let mut results = ResultsHeader {
            first_index: header.first_index,
            count: header.count,
            elapsed_ns: 0,
        };
        out.clear();
        let start = frame::begin_frame(&mut out, from_worker::RESULTS);
        let header_at = out.len();
        out.extend_from_slice(&results.encode());
        let started = std::time::Instant::now();
        // SAFETY: `runner` was monomorphised for the user's function type,
        // and the parent validated `archive`, which is immutable (see
        // `map_model`).
        unsafe {
            runner(
                fns,
                BatchJob {
                    state: &mut state,
                    archive,
                    batch,
                    out: &mut out,
                },
            )
        };
        crate::worker::status::idle();
        results.elapsed_ns = started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        out[header_at..header_at + RESULTS_HEADER].copy_from_slice(&results.encode());
        frame::end_frame(&mut out, start);
        let body_start = start + frame::FRAME_HEADER;
        let sent = match arena
            .as_mut()
            .and_then(|a| a.put_results(&out[body_start..]))
        {
            Some(span) => link::send_frame(from_worker::RESULTS_IN_ARENA, &span),
            None => link::send_raw(&out),
        };
        if sent.is_err() || setup.one_batch {
            leave(0);
        }
        if out.capacity() > frame::RETAINED_BUFFER_BYTES {
            out = Vec::new();
        }
    }
}

/// Ends a worker that was asked to stop, or whose parent closed its link:
/// a stateful stage's state is dropped first, so that its `Drop` (the
/// stage's teardown: a file flushed, a connection closed) runs. A panic
/// there is printed to stderr (which the parent forwards); the worker
/// exits all the same.
fn finish(state: JobState) -> ! {
    if state.is_some()
        && let Err(failure) =
            crate::worker::task::capturing(|| crate::worker::task::catch(move || drop(state)))
    {
        eprintln!("the stage's state panicked when dropped: {failure:?}");
    }
    leave(0)
}

/// The worker's side of its bulk arena (see [`crate::wire::region`]).
struct WorkerArena {
    /// The start of the shared region (the status page).
    base: *mut u8,
    half: usize,
    /// Spans of the worker's half holding results the parent has not
    /// decoded yet.
    results: Ring,
    /// Results spans released so far, as counted here.
    released: u64,
    words: &'static crate::wire::region::StatusWords,
}

impl WorkerArena {
    fn install() -> Option<WorkerArena> {
        let (base, half) = crate::worker::status::arena()?;
        Some(WorkerArena {
            base,
            half,
            results: Ring::new(half),
            released: 0,
            words: crate::worker::status::words()?,
        })
    }

    /// The batch body an arena frame points at, if the span is valid. The
    /// borrow of `self` keeps it from outliving the batch: the next results
    /// (which take `self` mutably) free the span for the parent to reuse.
    fn batch_body(&self, frame_body: &[u8]) -> Option<&[u8]> {
        let (offset, len) = region::parse_span_frame_body(frame_body, self.half)?;
        // The parent wrote the span before it sent the frame we just read.
        fence(Ordering::Acquire);
        // SAFETY: the span lies inside the parent's half of a mapping that
        // lives as long as the process. The parent does not write it again
        // until it has this batch's results, which go out through
        // `put_results` (a mutable borrow, so after the last use of this one)
        // or the pipe, after the last read of it.
        Some(unsafe {
            std::slice::from_raw_parts(self.base.add(region::to_worker_offset() + offset), len)
        })
    }

    /// Copies a results body into the arena and returns the frame body that
    /// points at it, or `None` if it is small or finds no room (then it
    /// goes through the pipe).
    fn put_results(&mut self, body: &[u8]) -> Option<[u8; 16]> {
        if body.len() < ARENA_MIN_BYTES {
            return None;
        }
        let released = self.words.results_released.load(Ordering::Acquire);
        while self.released < released && self.results.in_use() > 0 {
            self.results.release_oldest();
            self.released += 1;
        }
        let offset = self.results.alloc(body.len())?;
        // SAFETY: `alloc` returned a span of `body.len()` bytes inside the
        // worker's half, which nobody reads until the frame that names it
        // arrives, and which the parent released if it held it before.
        unsafe {
            std::ptr::copy_nonoverlapping(
                body.as_ptr(),
                self.base
                    .add(region::from_worker_offset(self.half) + offset),
                body.len(),
            );
        }
        // The bytes are in place before the frame that names them goes out.
        fence(Ordering::Release);
        Some(region::span_frame_body(offset, body.len()))
    }
}
