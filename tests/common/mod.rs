//! Models and functions shared by the integration tests.
#![allow(dead_code)]

use std::sync::{Mutex, OnceLock};

/// A small model: a vector and an offset.
#[derive(rkyv::Archive, rkyv::Serialize, Debug)]
pub(crate) struct Small {
    pub(crate) offset: u64,
    pub(crate) values: Vec<f32>,
}

pub(crate) fn small() -> Small {
    Small {
        offset: 7,
        values: (0..100).map(|i| i as f32).collect(),
    }
}

pub(crate) fn add_offset(model: &ArchivedSmall, x: u64) -> u64 {
    x * 3 + model.offset.to_native() + model.values.len() as u64
}

pub(crate) fn add_offset_serial(x: u64) -> u64 {
    x * 3 + 7 + 100
}

pub(crate) fn panic_on_13(model: &ArchivedSmall, x: u64) -> u64 {
    if x == 13 {
        panic!("thirteen is unlucky");
    }
    x + model.offset.to_native()
}

/// The fields of `/proc/PID/stat` after the command name, from the state
/// on; `None` once the process is gone.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    Some(
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// The parent of process `pid`, from `/proc`; `None` once it is gone.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Every process id in `/proc`.
pub(crate) fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .collect()
}

/// The children of process `parent`.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|pid| parent_of(*pid) == Some(parent))
        .collect()
}

/// Whether process `pid` has exited: a zombie, or gone.
pub(crate) fn has_exited(pid: u32) -> bool {
    stat_fields(pid).is_none_or(|fields| fields.first().is_some_and(|state| state == "Z"))
}

/// Waits up to 2 s for every process in `pids` to exit; fails the test,
/// naming those still running and `after` what, if some do not.
pub(crate) fn assert_all_exit(pids: &[u32], after: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while pids.iter().any(|&pid| !has_exited(pid)) {
        assert!(
            std::time::Instant::now() < deadline,
            "still running 2 s after {after}: {:?}",
            pids.iter().filter(|&&p| !has_exited(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// One record a capturing logger saw.
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    pub(crate) level: log::Level,
    pub(crate) target: String,
    pub(crate) message: String,
    pub(crate) worker: Option<u64>,
    pub(crate) task: Option<u64>,
}

struct Capture;

static RECORDS: Mutex<Vec<Captured>> = Mutex::new(Vec::new());

struct Visitor(Option<u64>, Option<u64>);

impl<'kvs> log::kv::VisitSource<'kvs> for Visitor {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        match key.as_str() {
            "worker" => self.0 = value.to_u64(),
            "task" => self.1 = value.to_u64(),
            _ => {}
        }
        Ok(())
    }
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let mut v = Visitor(None, None);
        let _ = record.key_values().visit(&mut v);
        RECORDS.lock().unwrap().push(Captured {
            level: record.level(),
            target: record.target().to_string(),
            message: record.args().to_string(),
            worker: v.0,
            task: v.1,
        });
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (once) at `level` and returns its records so far.
pub(crate) fn capture_logs(level: log::LevelFilter) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = log::set_logger(&Capture);
    });
    log::set_max_level(level);
}

pub(crate) fn take_logs() -> Vec<Captured> {
    std::mem::take(&mut *RECORDS.lock().unwrap())
}

/// Turns core dumps off for this process and the workers it starts, before
/// tests that crash workers on purpose.
pub(crate) fn no_core_dumps() {
    let rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one struct we own; it only lowers a limit.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &rlim) };
}
