//! Training one algorithm on one fold, in a process of its own: the
//! training data goes to it as a store file, the trained model comes back
//! as another, and a failure (a panic, running out of its memory limit)
//! ends that process alone.

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::data::Ratings;
use super::model::{Model, Scorer, seen_lists};
use super::{als, knn, mf};

/// The algorithms an experiment can compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub(crate) enum Algorithm {
    /// Items by number of ratings, the same list for everyone (unseen).
    #[value(name = "most-popular")]
    MostPopular,
    /// Item-item kNN, cosine on the implicit matrix.
    #[value(name = "item-knn")]
    ItemKnn,
    /// Implicit-feedback ALS (Hu, Koren and Volinsky).
    #[value(name = "implicit-als")]
    ImplicitAls,
    /// Explicit biased matrix factorisation by SGD (funk SVD).
    #[value(name = "biased-mf")]
    BiasedMf,
}

impl Algorithm {
    pub(crate) const ALL: [Algorithm; 4] = [
        Algorithm::MostPopular,
        Algorithm::ItemKnn,
        Algorithm::ImplicitAls,
        Algorithm::BiasedMf,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Algorithm::MostPopular => "most-popular",
            Algorithm::ItemKnn => "item-knn",
            Algorithm::ImplicitAls => "implicit-als",
            Algorithm::BiasedMf => "biased-mf",
        }
    }
}

/// A fold's training ratings, as the training process maps them.
#[derive(rkyv::Archive, rkyv::Serialize, Debug)]
pub(crate) struct TrainData {
    pub(crate) n_users: u32,
    pub(crate) n_items: u32,
    pub(crate) users: Vec<u32>,
    pub(crate) items: Vec<u32>,
    pub(crate) ratings: Vec<f32>,
}

impl TrainData {
    pub(crate) fn from_ratings(train: &Ratings) -> TrainData {
        TrainData {
            n_users: train.n_users as u32,
            n_items: train.n_items as u32,
            users: train.triples.iter().map(|t| t.0).collect(),
            items: train.triples.iter().map(|t| t.1).collect(),
            ratings: train.triples.iter().map(|t| t.2).collect(),
        }
    }
}

/// A failure to inject into a training, to see the experiment go on
/// without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Sabotage {
    Panic,
    /// Allocates far past any memory limit.
    OutOfMemory,
}

/// What a training process is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TrainJob {
    pub(crate) algorithm: Algorithm,
    pub(crate) data: PathBuf,
    pub(crate) model: PathBuf,
    pub(crate) dim: usize,
    pub(crate) iterations: usize,
    pub(crate) neighbours: usize,
    pub(crate) threads: usize,
    pub(crate) seed: u64,
    pub(crate) sabotage: Option<Sabotage>,
}

/// Trains `job.algorithm` on the data at `job.data`, writes the model to
/// `job.model`; returns the training time in seconds, or what went wrong.
/// Runs in the training process.
pub(crate) fn train_job(job: TrainJob) -> Result<f64, String> {
    let data = procpool::ModelStore::<TrainData>::load(&job.data).map_err(|e| e.to_string())?;
    let data = data.archived();
    let ratings = Ratings {
        n_users: data.n_users.to_native() as usize,
        n_items: data.n_items.to_native() as usize,
        triples: data
            .users
            .iter()
            .zip(data.items.iter())
            .zip(data.ratings.iter())
            .map(|((u, i), r)| (u.to_native(), i.to_native(), r.to_native()))
            .collect(),
    };
    let started = Instant::now();
    match job.sabotage {
        Some(Sabotage::Panic) => panic!("{} was told to fail", job.algorithm.name()),
        Some(Sabotage::OutOfMemory) => {
            let hog: Vec<u8> = vec![1; 1 << 40];
            std::hint::black_box(&hog);
        }
        None => {}
    }
    let model = train(&ratings, &job);
    procpool::persist_to_path(&model, &job.model).map_err(|e| e.to_string())?;
    Ok(started.elapsed().as_secs_f64())
}

/// Trains `job.algorithm` on `train`.
pub(crate) fn train(train: &Ratings, job: &TrainJob) -> Model {
    let scorer = match job.algorithm {
        Algorithm::MostPopular => {
            let mut counts = vec![0f32; train.n_items];
            for &(_, i, _) in &train.triples {
                counts[i as usize] += 1.0;
            }
            Scorer::Popular { counts }
        }
        Algorithm::ItemKnn => knn::train(train, job.neighbours, job.threads),
        Algorithm::ImplicitAls => {
            let cfg = als::AlsConfig {
                dim: job.dim,
                iterations: job.iterations,
                regularization: 0.05,
                alpha: 20.0,
                threads: job.threads,
                seed: job.seed,
            };
            als::train(train, &cfg, |_| {})
        }
        Algorithm::BiasedMf => {
            let cfg = mf::MfConfig {
                dim: job.dim,
                epochs: job.iterations * 2,
                learning_rate: 0.01,
                regularization: 0.05,
                seed: job.seed,
            };
            mf::train(train, &cfg, |_| {})
        }
    };
    let (seen_offsets, seen_items) = seen_lists(train.n_users, &train.triples);
    Model {
        n_items: train.n_items as u32,
        seen_offsets,
        seen_items,
        scorer,
    }
}
