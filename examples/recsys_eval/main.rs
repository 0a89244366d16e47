//! Recommender batch evaluation: train an implicit-feedback factor model,
//! persist it once, score every test user against it in worker processes,
//! and compare ranking metrics with a popularity baseline.
//!
//! `cargo run --release --example recsys_eval` runs on a synthetic data set
//! with the shape of MovieLens 100K; `--preset ml-1m` / `ml-10m` for larger
//! shapes, `--ratings PATH` for a real MovieLens file (`u.data`,
//! `ratings.dat` or `ratings.csv`). The last line is one JSON object.

mod als;
mod data;
mod metrics;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Preset {
    #[value(name = "ml-100k")]
    Ml100k,
    #[value(name = "ml-1m")]
    Ml1m,
    #[value(name = "ml-10m")]
    Ml10m,
}

/// Batch evaluation of a recommender with procpool.
#[derive(Debug, Parser)]
struct Args {
    /// Worker processes for the parallel run (default: procpool::proc_count).
    #[arg(long)]
    jobs: Option<usize>,
    /// Seed for the data, the split and the model.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Shape of the synthetic data set.
    #[arg(long, value_enum, default_value = "ml-100k")]
    preset: Preset,
    /// A MovieLens ratings file to use instead of synthetic data.
    #[arg(long)]
    ratings: Option<PathBuf>,
    /// Length of each recommendation list.
    #[arg(long, default_value_t = 10)]
    top_n: usize,
    /// Also write the split to DIR/train.csv and DIR/test.csv (user,item[,rating]),
    /// so other tools can be evaluated on the same data.
    #[arg(long)]
    export: Option<PathBuf>,
}

fn export(dir: &std::path::Path, split: &data::Split) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut train = std::io::BufWriter::new(std::fs::File::create(dir.join("train.csv"))?);
    writeln!(train, "user,item,rating")?;
    for &(u, i, r) in &split.train.triples {
        writeln!(train, "{u},{i},{r}")?;
    }
    train.flush()?;
    let mut test = std::io::BufWriter::new(std::fs::File::create(dir.join("test.csv"))?);
    writeln!(test, "user,item")?;
    for (u, items) in split.test.iter().enumerate() {
        for i in items {
            writeln!(test, "{u},{i}")?;
        }
    }
    test.flush()
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

struct Run {
    users_per_s: f64,
    seconds: f64,
    lists: Vec<Vec<(u32, f32)>>,
}

/// Scores every test user with `jobs` processes (1: in this process).
fn score(
    store: &procpool::ModelStore<als::MfModel>,
    users: &[u32],
    top_n: u32,
    jobs: usize,
) -> Result<Run, Box<dyn std::error::Error>> {
    let bar = progress(users.len() as u64, &format!("{jobs} job(s)"));
    // The invoker reports its progress from this process as results
    // arrive; the bar (hidden when stderr is not a terminal) follows it.
    let follower = bar.clone();
    let mut invoker = procpool::InvokerBuilder::new(store, als::recommend)
        .n_jobs(jobs)
        .on_progress(move |p| follower.set_position(p.done + p.failed))
        .build()?;
    let start = Instant::now();
    let mut lists = Vec::with_capacity(users.len());
    for list in invoker.map(users.iter().map(|&u| (u, top_n))) {
        lists.push(list?);
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(Run {
        users_per_s: users.len() as f64 / seconds,
        seconds,
        lists,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    let args = Args::parse();
    if args.top_n == 0 {
        return Err("--top-n must be at least 1".into());
    }
    let (ratings, source) = match &args.ratings {
        Some(path) => (data::read_movielens(path)?, path.display().to_string()),
        None => {
            let (shape, name) = match args.preset {
                Preset::Ml100k => (data::ML_100K, "ml-100k"),
                Preset::Ml1m => (data::ML_1M, "ml-1m"),
                Preset::Ml10m => (data::ML_10M, "ml-10m"),
            };
            (
                data::synthetic(shape, args.seed),
                format!("synthetic {name}"),
            )
        }
    };
    let split = data::holdout(&ratings, 0.2, args.seed);
    if let Some(dir) = &args.export {
        export(dir, &split)
            .map_err(|e| format!("cannot export the split to {}: {e}", dir.display()))?;
    }
    let test_users: Vec<u32> = (0..ratings.n_users as u32)
        .filter(|&u| !split.test[u as usize].is_empty())
        .collect();

    let cfg = als::AlsConfig {
        dim: 32,
        iterations: 10,
        regularization: 0.05,
        alpha: 20.0,
        threads: procpool::available_cpus(),
        seed: args.seed,
    };
    let bar = progress(cfg.iterations as u64, "training");
    let start = Instant::now();
    let model = als::train(&split, &cfg, |_| bar.inc(1));
    let train_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let start = Instant::now();
    let store = procpool::persist(&model)?;
    let persist_ms = start.elapsed().as_secs_f64() * 1e3;
    drop(model);

    let n_jobs = args
        .jobs
        .unwrap_or(procpool::proc_count(1, None, 0)?.max(2));
    let top_n = args.top_n as u32;
    let serial = score(&store, &test_users, top_n, 1)?;
    let parallel = score(&store, &test_users, top_n, n_jobs)?;
    if serial.lists != parallel.lists {
        return Err("recommendations differ between 1 and n jobs".into());
    }

    let mut seen: Vec<Vec<u32>> = vec![Vec::new(); ratings.n_users];
    for &(u, i, _) in &split.train.triples {
        seen[u as usize].push(i);
    }
    seen.iter_mut().for_each(|s| s.sort_unstable());
    let popular = metrics::popularity_order(ratings.n_items, &split.train.triples);
    let mut model_scores = Vec::new();
    let mut popular_scores = Vec::new();
    for (list, &user) in parallel.lists.iter().zip(&test_users) {
        let relevant = &split.test[user as usize];
        let ranked: Vec<u32> = list.iter().map(|&(i, _)| i).collect();
        model_scores.push(metrics::score_list(&ranked, relevant, args.top_n));
        let baseline = metrics::popular_unseen(&popular, &seen[user as usize], args.top_n);
        popular_scores.push(metrics::score_list(&baseline, relevant, args.top_n));
    }
    let m = metrics::mean(&model_scores);
    let p = metrics::mean(&popular_scores);
    let k = args.top_n;

    println!("recommender batch evaluation with procpool");
    println!(
        "  data         {source}: {} users, {} items, {} ratings",
        ratings.n_users,
        ratings.n_items,
        ratings.triples.len()
    );
    println!(
        "  split        20% of each user's ratings held out; {} test users",
        test_users.len()
    );
    println!(
        "  model        implicit ALS, {} factors, {} iterations: trained in {train_s:.2} s",
        cfg.dim, cfg.iterations
    );
    println!(
        "  store        {:.1} MiB archive, persisted in {persist_ms:.1} ms",
        store.archive_len() as f64 / (1 << 20) as f64
    );
    println!();
    println!("  scoring top-{k}      seconds    users/s");
    println!(
        "  n_jobs = 1        {:>9.3} {:>10.0}",
        serial.seconds, serial.users_per_s
    );
    println!(
        "  n_jobs = {n_jobs:<2}       {:>9.3} {:>10.0}   ({:.2}× n_jobs = 1)",
        parallel.seconds,
        parallel.users_per_s,
        parallel.users_per_s / serial.users_per_s
    );
    println!();
    println!("  metric @{k:<3}      ALS   popularity");
    println!("  nDCG           {:>7.4}   {:>7.4}", m.ndcg, p.ndcg);
    println!("  recall         {:>7.4}   {:>7.4}", m.recall, p.recall);
    println!(
        "  precision      {:>7.4}   {:>7.4}",
        m.precision, p.precision
    );
    println!(
        "  MRR            {:>7.4}   {:>7.4}",
        m.reciprocal_rank, p.reciprocal_rank
    );
    println!(
        "{{\"users\":{},\"items\":{},\"ratings\":{},\"test_users\":{},\"top_n\":{k},\"train_s\":{train_s:.3},\"ndcg_at_10\":{:.5},\"recall_at_10\":{:.5},\"precision_at_10\":{:.5},\"mrr\":{:.5},\"popularity_ndcg_at_10\":{:.5},\"popularity_recall_at_10\":{:.5},\"users_per_s_1_job\":{:.0},\"users_per_s_n_jobs\":{:.0},\"n_jobs\":{n_jobs}}}",
        ratings.n_users,
        ratings.n_items,
        ratings.triples.len(),
        test_users.len(),
        m.ndcg,
        m.recall,
        m.precision,
        m.reciprocal_rank,
        p.ndcg,
        p.recall,
        serial.users_per_s,
        parallel.users_per_s,
    );
    Ok(())
}
