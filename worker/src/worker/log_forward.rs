//! A `log::Log` that forwards every record to the parent over the worker's
//! link, in order with the task results, so none is lost at shutdown.

use crate::wire::{LogRecord, from_worker};
use crate::worker::link;

struct Forwarder;

static FORWARDER: Forwarder = Forwarder;

impl log::Log for Forwarder {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if link::is_fork_copy() {
            // A copy of the worker forked by a task has no link: its records
            // go to stderr, which still reaches the parent's, prefixed.
            let line = format!(
                "{} {}: {}\n",
                record.level(),
                record.target(),
                record.args()
            );
            // Not through `std::io::stderr()`, whose lock another thread may
            // have held at the fork. A failed write has nowhere to go.
            let _ = crate::sys::write_all(2, line.as_bytes());
            return;
        }
        let forwarded = LogRecord {
            level: crate::wire::level_to_wire(record.level()),
            target: record.target().to_string(),
            module_path: record.module_path().map(str::to_string),
            file: record.file().map(str::to_string),
            line: record.line(),
            message: record.args().to_string(),
            task_index: crate::worker::task::current_task().map(|t| t.index),
        };
        if let Ok(body) = postcard::to_allocvec(&forwarded) {
            // A dead parent cannot receive it; the worker is about to end anyway.
            let _ = link::send_frame(from_worker::LOG, &body);
        }
    }

    fn flush(&self) {}
}

/// Installs the forwarder as this process's logger at `max_level`.
pub fn install(max_level: log::LevelFilter) {
    // Fails only if user code installed a logger first; theirs stays.
    let _ = log::set_logger(&FORWARDER);
    log::set_max_level(max_level);
}
