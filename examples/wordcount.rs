//! PyToolz's parallel word count, `merge_with(sum, pmap(wordcount,
//! filenames))`, on a backend chosen by a flag: the same domain code runs
//! in this process, on threads, or on worker processes.
//!
//! ```sh
//! cargo run --release --example wordcount -- --backend processes --files 64
//! ```

use std::collections::HashMap;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use procpool::{Mapper, ParallelMap, Processes, Sequential, Threads};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    Sequential,
    Threads,
    Processes,
}

/// Word count over generated text files.
#[derive(Debug, Parser)]
struct Args {
    /// Where the map runs.
    #[arg(long, value_enum, default_value = "processes")]
    backend: Backend,
    /// How many text files to generate and count.
    #[arg(long, default_value_t = 32)]
    files: usize,
    /// Words per file.
    #[arg(long, default_value_t = 200_000)]
    words: usize,
    /// Threads or processes (default: procpool::proc_count).
    #[arg(long)]
    jobs: Option<usize>,
}

/// The words of one file, counted: the function every backend runs.
fn wordcount(path: String) -> HashMap<String, u64> {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let mut counts = HashMap::new();
    for word in text.split_whitespace() {
        *counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    counts
}

/// Merges counts by summing them, as toolz's `merge_with(sum, ...)`.
fn merge_with_sum(maps: Vec<HashMap<String, u64>>) -> HashMap<String, u64> {
    let mut total = HashMap::new();
    for map in maps {
        for (word, n) in map {
            *total.entry(word).or_insert(0) += n;
        }
    }
    total
}

/// Writes `files` files of `words` words drawn from a small vocabulary with
/// a skewed, seeded distribution.
fn generate(dir: &std::path::Path, files: usize, words: usize) -> std::io::Result<Vec<String>> {
    const VOCABULARY: [&str; 12] = [
        "the", "model", "process", "worker", "batch", "result", "pool", "fork", "seed", "task",
        "crash", "shared",
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut paths = Vec::new();
    for f in 0..files {
        let mut text = String::with_capacity(words * 7);
        for w in 0..words {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Skewed: low indices far more often.
            let i = ((state % 144) as f64).sqrt() as usize;
            text.push_str(VOCABULARY[i.min(VOCABULARY.len() - 1)]);
            text.push(if w % 12 == 11 { '\n' } else { ' ' });
        }
        let path = dir.join(format!("text-{f:04}.txt"));
        std::fs::write(&path, text)?;
        paths.push(path.to_string_lossy().into_owned());
    }
    Ok(paths)
}

fn count_on(
    backend: &mut impl ParallelMap,
    paths: Vec<String>,
) -> Result<HashMap<String, u64>, procpool::TaskError> {
    Ok(merge_with_sum(backend.map(Mapper::new(wordcount), paths)?))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    let args = Args::parse();
    let jobs = match args.jobs {
        Some(n) => n,
        None => procpool::proc_count(1, None, 0)?,
    };
    let dir = tempfile::tempdir()?;
    let paths = generate(dir.path(), args.files, args.words)?;
    let started = Instant::now();
    let counts = match args.backend {
        Backend::Sequential => count_on(&mut Sequential, paths)?,
        Backend::Threads => count_on(&mut Threads::new(jobs), paths)?,
        Backend::Processes => count_on(&mut Processes::new(jobs), paths)?,
    };
    let secs = started.elapsed().as_secs_f64();
    let mut top: Vec<(&String, &u64)> = counts.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let total: u64 = counts.values().sum();
    println!(
        "word count with the {:?} backend, {jobs} jobs",
        args.backend
    );
    println!(
        "  {} files, {total} words, {} distinct, {secs:.3} s",
        args.files,
        counts.len()
    );
    for (word, n) in top.iter().take(5) {
        println!("  {word:>10} {n}");
    }
    println!(
        "{{\"backend\":\"{:?}\",\"jobs\":{jobs},\"files\":{},\"words\":{total},\"distinct\":{},\"seconds\":{secs:.4}}}",
        args.backend,
        args.files,
        counts.len()
    );
    Ok(())
}
