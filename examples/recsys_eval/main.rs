//! A recommender experiment as researchers run it: user-based k-fold
//! cross-validation, several algorithms, each trained in a process of its
//! own under a memory limit, the trained model persisted once and every
//! test user scored against it in worker processes; recommendations and
//! metrics written to files, and a table of metrics per algorithm (mean ±
//! standard deviation over folds).
//!
//! `cargo run --release --example recsys_eval` runs 5 folds of the four
//! algorithms on a synthetic data set shaped like MovieLens 100K;
//! `--preset ml-1m` / `ml-10m` / `ml-25m` for larger shapes, `--ratings
//! PATH` for a real MovieLens file (`u.data`, `ratings.dat` or
//! `ratings.csv`). The last line is one JSON object.

mod als;
mod data;
mod knn;
mod metrics;
mod mf;
mod model;
mod train;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use train::{Algorithm, Sabotage, TrainData, TrainJob};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Preset {
    #[value(name = "ml-100k")]
    Ml100k,
    #[value(name = "ml-1m")]
    Ml1m,
    #[value(name = "ml-10m")]
    Ml10m,
    #[value(name = "ml-25m")]
    Ml25m,
}

/// A recommender experiment with procpool: k-fold cross-validation of
/// several algorithms, each trained in isolation, scored in parallel.
#[derive(Debug, Parser)]
struct Args {
    /// Worker processes for scoring (default: the CPUs this process may use, at least 2).
    #[arg(long)]
    jobs: Option<usize>,
    /// Seed for the data, the folds and the models.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Shape of the synthetic data set.
    #[arg(long, value_enum, default_value = "ml-100k")]
    preset: Preset,
    /// A MovieLens ratings file to use instead of synthetic data.
    #[arg(long)]
    ratings: Option<PathBuf>,
    /// Folds of the user-based cross-validation (1: every testable user in one).
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Fraction of each test user's ratings held out.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Algorithms to compare, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Algorithm::ALL)]
    algorithms: Vec<Algorithm>,
    /// Length of each recommendation list.
    #[arg(long, default_value_t = 10)]
    top_n: usize,
    /// Neighbours each item keeps (item-knn).
    #[arg(long, default_value_t = 20)]
    neighbours: usize,
    /// Latent factors (implicit-als, biased-mf).
    #[arg(long, default_value_t = 32)]
    factors: usize,
    /// Iterations of implicit-als (biased-mf runs twice as many epochs).
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// Address-space limit of each training process, in MiB.
    #[arg(long, default_value_t = 16_384)]
    train_memory_mb: u64,
    /// Where recommendations.csv, metrics.csv and truth.csv (the held-out items) go.
    #[arg(long, default_value = "target/recsys_eval")]
    out: PathBuf,
    /// Exit with success even if some training failed.
    #[arg(long)]
    keep_going: bool,
    /// Also write fold 0's split to DIR/train.csv and DIR/test.csv
    /// (user,item[,rating]), so other tools can be run on the same data.
    #[arg(long)]
    export: Option<PathBuf>,
    /// Make a training fail, to see the experiment go on without it:
    /// ALGORITHM=panic or ALGORITHM=oom.
    #[arg(long, hide = true, value_parser = parse_sabotage)]
    fail_training: Vec<(Algorithm, Sabotage)>,
}

fn parse_sabotage(text: &str) -> Result<(Algorithm, Sabotage), String> {
    let (algorithm, how) = text
        .split_once('=')
        .ok_or_else(|| format!("expected ALGORITHM=panic or ALGORITHM=oom, got {text:?}"))?;
    let algorithm = Algorithm::from_str(algorithm, false)?;
    let how = match how {
        "panic" => Sabotage::Panic,
        "oom" => Sabotage::OutOfMemory,
        other => return Err(format!("expected panic or oom, got {other:?}")),
    };
    Ok((algorithm, how))
}

fn export(dir: &Path, split: &data::Split) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut train = BufWriter::new(File::create(dir.join("train.csv"))?);
    writeln!(train, "user,item,rating")?;
    for &(u, i, r) in &split.train.triples {
        writeln!(train, "{u},{i},{r}")?;
    }
    train.flush()?;
    let mut test = BufWriter::new(File::create(dir.join("test.csv"))?);
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
    if let Ok(style) = ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Recommendations for every test user, and how fast they came.
struct Scored {
    users_per_s: f64,
    lists: Vec<Vec<(u32, f32)>>,
}

/// Scores `users` with `jobs` processes (1: in this process).
fn score(
    store: &procpool::ModelStore<model::Model>,
    users: &[u32],
    top_n: u32,
    jobs: usize,
    label: &str,
) -> Result<Scored, Box<dyn std::error::Error>> {
    let bar = progress(users.len() as u64, label);
    // The invoker reports its progress from this process as results
    // arrive; the bar (hidden when stderr is not a terminal) follows it.
    let follower = bar.clone();
    let mut invoker = procpool::InvokerBuilder::new(store, model::recommend)
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
    Ok(Scored {
        users_per_s: users.len() as f64 / seconds.max(1e-9),
        lists,
    })
}

/// An algorithm's fold 0: its model file and its lists.
type FirstFold = (PathBuf, Vec<Vec<(u32, f32)>>);

/// One algorithm on one fold.
struct FoldResult {
    scores: metrics::Scores,
    train_s: f64,
    users_per_s: f64,
}

/// One algorithm over all folds.
struct AlgorithmResult {
    algorithm: Algorithm,
    folds: Vec<FoldResult>,
    /// Why a training failed, if one did.
    failed: Option<String>,
}

/// Trains each of `jobs` in a process of its own, `concurrent` at a time;
/// each training's seconds, or why it failed.
fn train_all(
    jobs: &[TrainJob],
    concurrent: usize,
    memory_limit: u64,
    seed: u64,
    bar: &ProgressBar,
) -> Vec<Result<f64, String>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (done, results) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        for _ in 0..concurrent {
            let done = done.clone();
            let next = &next;
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    bar.set_message(format!("training {}", job.algorithm.name()));
                    let trained = procpool::Isolated::new(train::train_job)
                        .memory_limit(memory_limit)
                        .seed(seed)
                        .run(job.clone());
                    bar.inc(1);
                    let outcome = match trained {
                        Ok(outcome) => outcome,
                        Err(error) => Err(error.to_string()),
                    };
                    if done.send((i, outcome)).is_err() {
                        break;
                    }
                }
            });
        }
    });
    drop(done);
    let mut outcomes: Vec<Result<f64, String>> = vec![Err("not trained".into()); jobs.len()];
    for (i, outcome) in results {
        outcomes[i] = outcome;
    }
    outcomes
}

/// Mean and sample standard deviation.
fn mean_sd(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = values.collect();
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// A number for the JSON line (`null` if it is not one).
fn json_number(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "null".into()
    }
}

impl AlgorithmResult {
    fn stat(&self, f: impl Fn(&FoldResult) -> f64) -> (f64, f64) {
        mean_sd(self.folds.iter().map(f))
    }

    fn json(&self) -> String {
        let pair = |(m, s): (f64, f64)| {
            format!(
                "{{\"mean\":{},\"sd\":{}}}",
                json_number(m, 5),
                json_number(s, 5)
            )
        };
        let failed = match &self.failed {
            Some(why) => format!("{why:?}"),
            None => "null".into(),
        };
        format!(
            "{{\"name\":\"{}\",\"folds\":{},\"ndcg_at_10\":{},\"recall_at_10\":{},\"precision_at_10\":{},\"mrr\":{},\"train_s\":{},\"users_per_s\":{},\"failed\":{failed}}}",
            self.algorithm.name(),
            self.folds.len(),
            pair(self.stat(|f| f.scores.ndcg)),
            pair(self.stat(|f| f.scores.recall)),
            pair(self.stat(|f| f.scores.precision)),
            pair(self.stat(|f| f.scores.reciprocal_rank)),
            json_number(self.stat(|f| f.train_s).0, 3),
            json_number(self.stat(|f| f.users_per_s).0, 0),
        )
    }
}

/// The experiment's output files.
struct Outputs {
    recommendations: BufWriter<File>,
    metrics: BufWriter<File>,
    test: BufWriter<File>,
}

impl Outputs {
    fn create(dir: &Path) -> std::io::Result<Outputs> {
        std::fs::create_dir_all(dir)?;
        let open = |name: &str, header: &str| -> std::io::Result<BufWriter<File>> {
            let mut file = BufWriter::new(File::create(dir.join(name))?);
            writeln!(file, "{header}")?;
            Ok(file)
        };
        Ok(Outputs {
            recommendations: open("recommendations.csv", "algorithm,fold,user,rank,item,score")?,
            metrics: open(
                "metrics.csv",
                "algorithm,fold,user,ndcg,recall,precision,reciprocal_rank",
            )?,
            test: open("truth.csv", "fold,user,item")?,
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.recommendations.flush()?;
        self.metrics.flush()?;
        self.test.flush()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    let args = Args::parse();
    if args.top_n == 0 {
        return Err("--top-n must be at least 1".into());
    }
    if args.folds == 0 {
        return Err("--folds must be at least 1".into());
    }
    if !(args.holdout > 0.0 && args.holdout < 1.0) {
        return Err(format!("--holdout must be between 0 and 1, got {}", args.holdout).into());
    }
    if args.neighbours == 0 || args.factors == 0 || args.iterations == 0 {
        return Err("--neighbours, --factors and --iterations must be at least 1".into());
    }
    if args.algorithms.is_empty() {
        return Err("--algorithms names none".into());
    }
    let read_started = Instant::now();
    let (ratings, source) = match &args.ratings {
        Some(path) => (data::read_movielens(path)?, path.display().to_string()),
        None => {
            let (shape, name) = match args.preset {
                Preset::Ml100k => (data::ML_100K, "ml-100k"),
                Preset::Ml1m => (data::ML_1M, "ml-1m"),
                Preset::Ml10m => (data::ML_10M, "ml-10m"),
                Preset::Ml25m => (data::ML_25M, "ml-25m"),
            };
            (
                data::synthetic(shape, args.seed),
                format!("synthetic {name}"),
            )
        }
    };
    let read_s = read_started.elapsed().as_secs_f64();
    let folds = data::Folds::new(&ratings, args.folds, args.holdout, args.seed);
    // The CPU budget, by nesting level: level 0 is how many trainings run
    // at once (and the scoring workers), level 1 the threads each uses.
    let cpus = procpool::proc_count(1, None, 0)?;
    let concurrent = cpus.min(args.algorithms.len()).max(1);
    let training_threads = procpool::proc_count(1, None, 1)?;
    let n_jobs = args.jobs.unwrap_or(cpus.max(2));
    let top_n = args.top_n as u32;
    let scratch = tempfile::tempdir()?;
    let mut outputs = Outputs::create(&args.out)
        .map_err(|e| format!("cannot write to {}: {e}", args.out.display()))?;

    let mut results: Vec<AlgorithmResult> = args
        .algorithms
        .iter()
        .map(|&algorithm| AlgorithmResult {
            algorithm,
            folds: Vec::new(),
            failed: None,
        })
        .collect();
    // Fold 0's model and lists per algorithm, to score again with 1 job.
    let mut first_fold: Vec<Option<FirstFold>> = vec![None; results.len()];
    let mut first_users = Vec::new();
    let mut test_users_total = 0;
    let training_bar = progress((folds.len() * results.len()) as u64, "training");
    for f in 0..folds.len() {
        let split = folds.split(f);
        let users = split.test_users();
        test_users_total += users.len();
        for &u in &users {
            for i in &split.test[u as usize] {
                writeln!(outputs.test, "{f},{u},{i}")?;
            }
        }
        if f == 0 {
            if let Some(dir) = &args.export {
                export(dir, &split)
                    .map_err(|e| format!("cannot export the split to {}: {e}", dir.display()))?;
            }
            first_users = users.clone();
        }
        let data_path = scratch.path().join(format!("fold-{f}.train"));
        procpool::persist_to_path(&TrainData::from_ratings(&split.train), &data_path)?;
        let jobs: Vec<TrainJob> = results
            .iter()
            .map(|result| TrainJob {
                algorithm: result.algorithm,
                data: data_path.clone(),
                model: scratch
                    .path()
                    .join(format!("{}-{f}.model", result.algorithm.name())),
                dim: args.factors,
                iterations: args.iterations,
                neighbours: args.neighbours,
                threads: training_threads,
                seed: args.seed,
                sabotage: args
                    .fail_training
                    .iter()
                    .find(|(a, _)| *a == result.algorithm)
                    .map(|(_, s)| *s),
            })
            .collect();
        let limit = args.train_memory_mb << 20;
        let trained = train_all(&jobs, concurrent, limit, args.seed, &training_bar);
        for (slot, (result, trained)) in results.iter_mut().zip(trained).enumerate() {
            let algorithm = result.algorithm;
            let model_path = jobs[slot].model.clone();
            let train_s = match trained {
                Ok(seconds) => seconds,
                Err(why) => {
                    result.failed.get_or_insert(format!("fold {f}: {why}"));
                    continue;
                }
            };
            let store = procpool::ModelStore::<model::Model>::load(&model_path)?;
            let label = format!("{} fold {f}", algorithm.name());
            let scored = score(&store, &users, top_n, n_jobs, &label)?;
            let mut per_user = Vec::with_capacity(users.len());
            for (list, &user) in scored.lists.iter().zip(&users) {
                let relevant = &split.test[user as usize];
                let ranked: Vec<u32> = list.iter().map(|&(i, _)| i).collect();
                let s = metrics::score_list(&ranked, relevant, args.top_n);
                per_user.push(s);
                let name = algorithm.name();
                for (rank, (item, score)) in list.iter().enumerate() {
                    writeln!(
                        outputs.recommendations,
                        "{name},{f},{user},{},{item},{score}",
                        rank + 1
                    )?;
                }
                writeln!(
                    outputs.metrics,
                    "{name},{f},{user},{},{},{},{}",
                    s.ndcg, s.recall, s.precision, s.reciprocal_rank
                )?;
            }
            result.folds.push(FoldResult {
                scores: metrics::mean(&per_user),
                train_s,
                users_per_s: scored.users_per_s,
            });
            drop(store);
            if f == 0 {
                first_fold[slot] = Some((model_path, scored.lists));
            } else {
                let _ = std::fs::remove_file(&model_path);
            }
        }
        let _ = std::fs::remove_file(&data_path);
    }
    training_bar.finish_and_clear();
    outputs.flush()?;

    // The best algorithm's fold 0 again, with 1 job: the same lists, and
    // how much the workers gained.
    let best = (0..results.len())
        .filter(|&i| results[i].failed.is_none() && first_fold[i].is_some())
        .max_by(|&a, &b| {
            results[a]
                .stat(|f| f.scores.ndcg)
                .0
                .total_cmp(&results[b].stat(|f| f.scores.ndcg).0)
        });
    let mut one_job = None;
    if let Some(b) = best
        && let Some((path, lists)) = &first_fold[b]
    {
        let store = procpool::ModelStore::<model::Model>::load(path)?;
        let serial = score(&store, &first_users, top_n, 1, "1 job")?;
        if &serial.lists != lists {
            return Err("recommendations differ between 1 and n jobs".into());
        }
        let parallel = results[b].folds[0].users_per_s;
        one_job = Some((results[b].algorithm, serial.users_per_s, parallel));
    }

    let k = args.top_n;
    println!("recommender experiment with procpool");
    println!(
        "  data     {source}: {} users, {} items, {} ratings (read in {read_s:.2} s)",
        ratings.n_users,
        ratings.n_items,
        ratings.triples.len()
    );
    println!(
        "  folds    {} user-based folds, {:.0}% of each test user's ratings held out; {test_users_total} test users",
        folds.len(),
        args.holdout * 100.0
    );
    println!(
        "  budget   training: {concurrent} processes at a time, {training_threads} thread(s) and {} MiB each; scoring: {n_jobs} workers",
        args.train_memory_mb
    );
    println!(
        "  files    {}/{{recommendations,metrics,truth}}.csv",
        args.out.display()
    );
    println!();
    println!(
        "  {:<13} {:>17} {:>17} {:>17} {:>17} {:>9} {:>9}",
        "algorithm",
        format!("nDCG@{k}"),
        format!("recall@{k}"),
        format!("precision@{k}"),
        "MRR",
        "train s",
        "users/s"
    );
    for r in &results {
        if let Some(why) = &r.failed {
            println!("  {:<13} failed: {why}", r.algorithm.name());
            continue;
        }
        let cell = |(m, s): (f64, f64)| format!("{m:.4} ± {s:.4}");
        println!(
            "  {:<13} {:>17} {:>17} {:>17} {:>17} {:>9.2} {:>9.0}",
            r.algorithm.name(),
            cell(r.stat(|f| f.scores.ndcg)),
            cell(r.stat(|f| f.scores.recall)),
            cell(r.stat(|f| f.scores.precision)),
            cell(r.stat(|f| f.scores.reciprocal_rank)),
            r.stat(|f| f.train_s).0,
            r.stat(|f| f.users_per_s).0,
        );
    }
    let (mut best_ndcg, mut users_1, mut users_n) = (f64::NAN, f64::NAN, f64::NAN);
    if let Some((algorithm, serial, parallel)) = one_job {
        println!();
        println!(
            "  scoring {} fold 0: {serial:.0} users/s with 1 job, {parallel:.0} with {n_jobs} ({:.2}×)",
            algorithm.name(),
            parallel / serial
        );
        if let Some(r) = results.iter().find(|r| r.algorithm == algorithm) {
            best_ndcg = r.stat(|f| f.scores.ndcg).0;
        }
        (users_1, users_n) = (serial, parallel);
    }
    let popular_ndcg = results
        .iter()
        .find(|r| r.algorithm == Algorithm::MostPopular && r.failed.is_none())
        .map_or(f64::NAN, |r| r.stat(|f| f.scores.ndcg).0);
    let algorithms: Vec<String> = results.iter().map(AlgorithmResult::json).collect();
    println!(
        "{{\"users\":{},\"items\":{},\"ratings\":{},\"folds\":{},\"test_users\":{test_users_total},\"top_n\":{k},\"read_s\":{read_s:.3},\"ndcg_at_10\":{},\"popularity_ndcg_at_10\":{},\"users_per_s_1_job\":{},\"users_per_s_n_jobs\":{},\"n_jobs\":{n_jobs},\"best_algorithm\":{},\"algorithms\":[{}]}}",
        ratings.n_users,
        ratings.n_items,
        ratings.triples.len(),
        folds.len(),
        json_number(best_ndcg, 5),
        json_number(popular_ndcg, 5),
        json_number(users_1, 0),
        json_number(users_n, 0),
        one_job.map_or("null".to_string(), |(a, _, _)| format!("\"{}\"", a.name())),
        algorithms.join(","),
    );
    let failed = results.iter().filter(|r| r.failed.is_some()).count();
    if failed > 0 && !args.keep_going {
        return Err(format!(
            "{failed} of {} algorithms failed to train (--keep-going to exit with success)",
            results.len()
        )
        .into());
    }
    Ok(())
}
