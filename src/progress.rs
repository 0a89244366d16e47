//! Progress of long work: tasks submitted, done and failed, reported to a
//! callback from this process as results arrive, at most ten times a
//! second and once at the end. Workers are never woken for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a map, a processor or a map-reduce stands.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// let last = Arc::new(Mutex::new(None));
/// let seen = Arc::clone(&last);
/// let mut pool = procpool::PoolBuilder::new(square)
///     .n_jobs(2)
///     .on_progress(move |p| *seen.lock().unwrap() = Some(*p))
///     .build()?;
/// assert_eq!(pool.map(0..1_000u64).count(), 1_000);
/// let last = last.lock().unwrap().unwrap();
/// assert_eq!((last.submitted, last.done, last.failed), (1_000, 1_000, 0));
/// assert!(last.rate() > 0.0);
/// # Ok::<(), procpool::PoolError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Tasks read from the input and sent (or run) so far.
    pub submitted: u64,
    /// Tasks whose result has arrived.
    pub done: u64,
    /// Tasks whose error has arrived.
    pub failed: u64,
    /// Time since the work began.
    pub elapsed: Duration,
    /// Whether this is the last report of the run.
    pub finished: bool,
}

impl Progress {
    /// Tasks finished (done or failed) per second so far.
    ///
    /// ```
    /// let p = procpool::Progress {
    ///     submitted: 10,
    ///     done: 8,
    ///     failed: 2,
    ///     elapsed: std::time::Duration::from_secs(2),
    ///     finished: true,
    /// };
    /// assert_eq!(p.rate(), 5.0);
    /// ```
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            (self.done + self.failed) as f64 / secs
        } else {
            0.0
        }
    }
}

/// A progress callback, as the builders keep it.
#[derive(Clone)]
pub(crate) struct ProgressFn(pub(crate) Arc<dyn Fn(&Progress) + Send + Sync>);

impl std::fmt::Debug for ProgressFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressFn")
    }
}

/// Counts one run's tasks and reports them, now and then, to a callback.
#[derive(Debug)]
pub(crate) struct Tracker {
    callback: Option<ProgressFn>,
    progress: Progress,
    started: Instant,
    last_report: Instant,
    /// Whether the last report went out.
    over: bool,
}

/// The least time between two reports.
const REPORT_EVERY: Duration = Duration::from_millis(100);

impl Tracker {
    /// A tracker reporting to `callback`, if any (else it counts nothing).
    pub(crate) fn new(callback: Option<ProgressFn>) -> Tracker {
        let now = Instant::now();
        Tracker {
            callback,
            progress: Progress {
                submitted: 0,
                done: 0,
                failed: 0,
                elapsed: Duration::ZERO,
                finished: false,
            },
            started: now,
            last_report: now,
            over: false,
        }
    }

    /// Whether anyone listens: without a callback the tracker counts
    /// nothing.
    #[inline]
    pub(crate) fn is_active(&self) -> bool {
        self.callback.is_some()
    }

    /// `n` more tasks were sent.
    #[inline]
    pub(crate) fn submitted(&mut self, n: u64) {
        if self.callback.is_some() {
            self.progress.submitted += n;
        }
    }

    /// One more task finished, with a value or an error.
    #[inline]
    pub(crate) fn finished(&mut self, ok: bool) {
        if self.callback.is_none() {
            return;
        }
        if ok {
            self.progress.done += 1;
        } else {
            self.progress.failed += 1;
        }
    }

    /// Reports if the last report is old enough. Called once per batch of
    /// results (a clock read costs more than a trivial task).
    #[inline]
    pub(crate) fn tick(&mut self) {
        if self.callback.is_none() {
            return;
        }
        let now = Instant::now();
        if now - self.last_report >= REPORT_EVERY {
            self.last_report = now;
            self.report(now);
        }
    }

    /// The last report, when the work is over.
    pub(crate) fn finish(&mut self) {
        if self.callback.is_some() && !self.over {
            self.over = true;
            self.progress.finished = true;
            self.report(Instant::now());
        }
    }

    fn report(&mut self, now: Instant) {
        self.progress.elapsed = now - self.started;
        if let Some(callback) = &self.callback {
            (callback.0)(&self.progress);
        }
    }
}

/// A progress callback that draws an [indicatif](https://docs.rs/indicatif)
/// bar on stderr (hidden when stderr is not a terminal), for a run of
/// `total` tasks if known. Behind the `progress-bar` feature.
///
/// ```
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// let mut pool = procpool::PoolBuilder::new(square)
///     .n_jobs(2)
///     .on_progress(procpool::progress_bar(Some(1_000)))
///     .build()?;
/// assert_eq!(pool.map(0..1_000u64).count(), 1_000);
/// # Ok::<(), procpool::PoolError>(())
/// ```
#[cfg(feature = "progress-bar")]
pub fn progress_bar(total: Option<u64>) -> impl Fn(&Progress) + Send + Sync + 'static {
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} tasks, {msg} [{elapsed_precise}]",
    ) {
        bar.set_style(style);
    }
    move |p: &Progress| {
        bar.set_position(p.done + p.failed);
        bar.set_message(format!("{:.0}/s, {} failed", p.rate(), p.failed));
        if p.finished {
            bar.finish();
        }
    }
}
