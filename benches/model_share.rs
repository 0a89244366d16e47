//! A 1 GiB model shared by 4 workers: start-up, whole-model passes, memory.
//!
//! `cargo bench --bench model_share` prints a table, then as its last line
//! one JSON object: `{"bench":"model_share","model_mib":1024,"workers":4,
//! "first_result_ms":…,"full_pass_ms":…,"workers_pss_mib":…,
//! "total_pss_mib":…,"persist_ms":…}`. PSS comes from
//! `/proc/PID/smaps_rollup` after the whole-model tasks; total = parent +
//! workers, the parent having persisted the model and dropped its own copy.

use std::time::Instant;

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Dense {
    cols: u32,
    values: Vec<f32>,
}

/// Reads one row: the first task, which must not need the whole model.
fn row_sum(model: &ArchivedDense, row: u32) -> f32 {
    let cols = model.cols.to_native() as usize;
    model.values[row as usize * cols..][..cols]
        .iter()
        .map(|v| v.to_native())
        .sum()
}

/// Reads the whole model.
fn full_sum(model: &ArchivedDense, _: u32) -> f64 {
    let mut acc = [0f32; 16];
    let values = model.values.as_slice();
    let chunks = values.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().map(|v| v.to_native()).sum();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v.to_native();
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + rest as f64
}

fn pss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    let floats = 1usize << 28; // 1 GiB of f32
    let cols = 1024u32;
    let workers = 4;

    let model = Dense {
        cols,
        values: (0..floats).map(|i| (i % 2) as f32).collect(),
    };
    let start = Instant::now();
    let store = procpool::persist(&model)?;
    let persist_ms = start.elapsed().as_secs_f64() * 1e3;
    drop(model);

    let start = Instant::now();
    let mut inv = procpool::InvokerBuilder::new(&store, row_sum)
        .n_jobs(workers)
        .build()?;
    let first = inv.map(std::iter::once(3)).next().ok_or("no result")??;
    let first_result_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        first,
        (0..cols as usize)
            .map(|c| ((3 * cols as usize + c) % 2) as f32)
            .sum::<f32>()
    );
    drop(inv);

    let mut inv = procpool::InvokerBuilder::new(&store, full_sum)
        .n_jobs(workers)
        .chunk_size(1)
        .build()?;
    let start = Instant::now();
    let sums: Vec<f64> = inv.map(0..workers as u32).collect::<Result<_, _>>()?;
    let full_pass_ms = start.elapsed().as_secs_f64() * 1e3;
    let expected: f64 = (0..floats).map(|i| (i % 2) as f64).sum();
    for s in &sums {
        assert!(
            (s - expected).abs() / expected < 1e-3,
            "sum {s} vs {expected}"
        );
    }
    let worker_pss: u64 = inv.worker_pids().iter().map(|&p| pss_kib(p)).sum();
    let parent_pss = pss_kib(std::process::id());
    let workers_pss_mib = worker_pss as f64 / 1024.0;
    let total_pss_mib = (worker_pss + parent_pss) as f64 / 1024.0;

    println!("model_share: 1 GiB f32 model, {workers} workers");
    println!("  persist                      {persist_ms:>9.1} ms");
    println!("  pool creation → first result {first_result_ms:>9.1} ms (a one-row task)");
    println!(
        "  {workers} whole-model passes        {full_pass_ms:>9.1} ms (one per worker, pages faulted in)"
    );
    println!("  workers' PSS                 {workers_pss_mib:>9.1} MiB");
    println!("  parent + workers PSS         {total_pss_mib:>9.1} MiB");
    println!(
        "{{\"bench\":\"model_share\",\"model_mib\":1024,\"workers\":{workers},\"first_result_ms\":{first_result_ms:.1},\"full_pass_ms\":{full_pass_ms:.1},\"workers_pss_mib\":{workers_pss_mib:.1},\"total_pss_mib\":{total_pss_mib:.1},\"persist_ms\":{persist_ms:.1}}}"
    );
    Ok(())
}
