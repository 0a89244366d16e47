//! Score items against a shared model in worker processes.
//!
//! `cargo run --release --example quickstart`

use std::time::Instant;

/// A small factor model: one vector per item.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct Factors {
    dim: u32,
    items: Vec<f32>,
}

/// The top-scoring item for one user vector, read straight from shared memory.
fn best_item(model: &ArchivedFactors, user: Vec<f32>) -> (u32, f32) {
    let dim = model.dim.to_native() as usize;
    let mut best = (0, f32::MIN);
    for (item, row) in model.items.chunks_exact(dim).enumerate() {
        let score: f32 = row.iter().zip(&user).map(|(a, b)| a.to_native() * b).sum();
        if score > best.1 {
            best = (item as u32, score);
        }
    }
    best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    let (dim, n_items, n_users) = (32usize, 20_000usize, 2_000usize);
    let value = |i: usize| ((i * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5;
    let store = procpool::persist(&Factors {
        dim: dim as u32,
        items: (0..dim * n_items).map(value).collect(),
    })?;
    let users: Vec<Vec<f32>> = (0..n_users)
        .map(|u| (0..dim).map(|d| value(u * 31 + d * 7 + 1)).collect())
        .collect();

    let n_jobs = procpool::proc_count(1, None, 0)?;
    let mut results = Vec::new();
    for jobs in [1, n_jobs.max(2)] {
        let mut invoker = procpool::invoker(&store, best_item, jobs)?;
        let start = Instant::now();
        let best: Vec<(u32, f32)> = invoker
            .map(users.iter().cloned())
            .collect::<Result<_, _>>()?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "n_jobs = {jobs}: {n_users} users × {n_items} items in {:.3} s ({:.0} users/s)",
            secs,
            n_users as f64 / secs
        );
        results.push(best);
    }
    assert_eq!(results[0], results[1], "same answers for every n_jobs");
    println!(
        "user 0's best item: {} (score {:.3})",
        results[0][0].0, results[0][0].1
    );
    Ok(())
}
