//! How many processes to use, and what workers inherit about it.

use std::fs;

use crate::error::ConfigError;

/// The environment variable that sets process counts: `"8"`, or `"8,2"` for
/// 8 processes at level 0 and 2 in each of them at level 1.
///
/// ```
/// assert_eq!(procpool::NUM_PROCS_ENV, "PROCPOOL_NUM_PROCS");
/// ```
pub const NUM_PROCS_ENV: &str = procpool_worker::wire::NUM_PROCS_ENV;

/// Thread-count variables of common native libraries (and rayon) that
/// workers get set to their share of the CPUs, unless already set.
///
/// ```
/// assert!(procpool::THREAD_ENV_VARS.contains(&"OMP_NUM_THREADS"));
/// ```
pub const THREAD_ENV_VARS: [&str; 4] = procpool_worker::wire::THREAD_ENV_VARS;

/// How many processes to use at nesting `level` (0 = the outermost pool).
///
/// - If `PROCPOOL_NUM_PROCS` is set, it is a comma-separated list of positive
///   counts, one per level; levels past its end get 1. `max_default` does not
///   apply: an explicit setting wins.
/// - Otherwise level 0 gets the CPUs this process may use (its affinity mask
///   and any cgroup CPU quota) divided by `core_div`, at least 1 and at most
///   `max_default`; level 1 gets the CPUs divided by the level-0 count (the
///   threads each worker may use); deeper levels get 1.
///
/// `core_div` must be at least 1. Bad settings are errors, never guesses.
///
/// ```
/// let n = procpool::proc_count(2, Some(4), 0).unwrap();
/// assert!((1..=4).contains(&n));
/// assert!(procpool::proc_count(0, None, 0).is_err());
/// ```
pub fn proc_count(
    core_div: usize,
    max_default: Option<usize>,
    level: usize,
) -> Result<usize, ConfigError> {
    if core_div == 0 {
        return Err(ConfigError {
            source: "core_div".into(),
            value: "0".into(),
            reason: "must be at least 1",
        });
    }
    if max_default == Some(0) {
        return Err(ConfigError {
            source: "max_default".into(),
            value: "0".into(),
            reason: "must be at least 1",
        });
    }
    if let Some(list) = env_counts()? {
        return Ok(list.get(level).copied().unwrap_or(1));
    }
    let cpus = available_cpus();
    let outer = (cpus / core_div)
        .max(1)
        .min(max_default.unwrap_or(usize::MAX));
    Ok(match level {
        0 => outer,
        1 => (cpus / outer).max(1),
        _ => 1,
    })
}

/// Parses `PROCPOOL_NUM_PROCS`, if set.
pub(crate) fn env_counts() -> Result<Option<Vec<usize>>, ConfigError> {
    match std::env::var(NUM_PROCS_ENV) {
        Ok(value) => parse_counts(&value).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(ConfigError {
            source: NUM_PROCS_ENV.into(),
            value: v.to_string_lossy().into_owned(),
            reason: "not valid UTF-8",
        }),
    }
}

fn parse_counts(value: &str) -> Result<Vec<usize>, ConfigError> {
    let err = |reason| ConfigError {
        source: NUM_PROCS_ENV.into(),
        value: value.to_string(),
        reason,
    };
    if value.trim().is_empty() {
        return Err(err("expected a positive count such as \"8\" or \"8,2\""));
    }
    value
        .split(',')
        .map(|part| {
            let part = part.trim();
            if part.starts_with('-') {
                return Err(err("counts must be positive"));
            }
            match part.parse::<usize>() {
                Ok(0) => Err(err("counts must be at least 1")),
                Ok(n) => Ok(n),
                Err(_) => Err(err(
                    "expected comma-separated positive integers such as \"8,2\"",
                )),
            }
        })
        .collect()
}

/// The CPUs this process may really use: its affinity mask, lowered by a
/// cgroup (v2 `cpu.max` or v1 `cpu.cfs_quota_us`) CPU quota, at least 1.
///
/// ```
/// let cpus = procpool::available_cpus();
/// assert!(cpus >= 1 && cpus <= std::thread::available_parallelism().map_or(1024, |n| n.get()));
/// ```
pub fn available_cpus() -> usize {
    let affinity = affinity_cpus()
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // A quota rarely changes while a program runs; reading it means several
    // files under /sys, so once per process is enough.
    static QUOTA: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    match *QUOTA.get_or_init(cgroup_quota_cpus) {
        Some(quota) => affinity.min(quota).max(1),
        None => affinity.max(1),
    }
}

fn affinity_cpus() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some(libc::CPU_COUNT(&set) as usize)
    }
}

/// CPUs allowed by a cgroup quota, rounded up; `None` when unlimited.
fn cgroup_quota_cpus() -> Option<usize> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        if controllers.is_empty() {
            // cgroup v2: walk from our group up to the root; the tightest limit wins.
            let mut best: Option<usize> = None;
            let mut dir = std::path::PathBuf::from(format!("/sys/fs/cgroup{path}"));
            loop {
                if let Ok(max) = fs::read_to_string(dir.join("cpu.max"))
                    && let Some(n) = parse_cpu_max(&max)
                {
                    best = Some(best.map_or(n, |b| b.min(n)));
                }
                if !dir.pop() || !dir.starts_with("/sys/fs/cgroup") {
                    break;
                }
            }
            if best.is_some() {
                return best;
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            let base = format!("/sys/fs/cgroup/cpu,cpuacct{path}");
            for dir in [
                base.as_str(),
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/cpu",
            ] {
                let quota = fs::read_to_string(format!("{dir}/cpu.cfs_quota_us")).ok();
                let period = fs::read_to_string(format!("{dir}/cpu.cfs_period_us")).ok();
                if let (Some(q), Some(p)) = (quota, period) {
                    return quota_to_cpus(q.trim(), p.trim());
                }
            }
        }
    }
    None
}

/// Parses cgroup v2 `cpu.max` ("max 100000" or "150000 100000").
fn parse_cpu_max(text: &str) -> Option<usize> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period = parts.next().unwrap_or("100000");
    quota_to_cpus(quota, period)
}

fn quota_to_cpus(quota: &str, period: &str) -> Option<usize> {
    let quota: i64 = quota.parse().ok()?;
    let period: i64 = period.parse().ok()?;
    if quota <= 0 || period <= 0 {
        return None;
    }
    Some(((quota + period - 1) / period).max(1) as usize)
}

/// The environment a worker of a level-0 pool with `n_jobs` workers gets:
/// `PROCPOOL_NUM_PROCS` shifted one level down, and the thread-count
/// variables set to the inner count unless the parent set them.
pub(crate) fn worker_env(n_jobs: usize) -> Vec<(String, String)> {
    let list = env_counts().ok().flatten();
    let inner = match &list {
        Some(list) => list.get(1).copied().unwrap_or(1),
        None => (available_cpus() / n_jobs.max(1)).max(1),
    };
    let nested = match &list {
        Some(list) if list.len() > 1 => list[1..]
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        _ => inner.to_string(),
    };
    let mut env = vec![(NUM_PROCS_ENV.to_string(), nested)];
    for var in THREAD_ENV_VARS {
        let value = std::env::var(var).unwrap_or_else(|_| inner.to_string());
        env.push((var.to_string(), value));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists() {
        assert_eq!(parse_counts("8").unwrap(), vec![8]);
        assert_eq!(parse_counts("8, 2").unwrap(), vec![8, 2]);
        for bad in ["0", "abc", "-1", "", "8,", "8,0", "1.5"] {
            let err = parse_counts(bad).unwrap_err();
            assert_eq!(err.value(), bad);
            assert!(
                err.to_string()
                    .starts_with("invalid PROCPOOL_NUM_PROCS value"),
                "{err}"
            );
        }
    }

    #[test]
    fn parses_cgroup_limits() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("100000 100000"), Some(1));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(quota_to_cpus("-1", "100000"), None);
        assert_eq!(quota_to_cpus("400000", "100000"), Some(4));
    }
}
