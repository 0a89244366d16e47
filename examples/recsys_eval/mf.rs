//! Explicit biased matrix factorisation (funk SVD): a rating is predicted
//! as `mean + user bias + item bias + user · item`, fitted by stochastic
//! gradient descent on the training ratings.

use super::data::{Ratings, Rng};
use super::model::Scorer;

/// Training settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MfConfig {
    pub(crate) dim: usize,
    pub(crate) epochs: usize,
    pub(crate) learning_rate: f32,
    pub(crate) regularization: f32,
    pub(crate) seed: u64,
}

/// Trains biases and factors on `train`; `progress` is called after each
/// epoch.
pub(crate) fn train(train: &Ratings, cfg: &MfConfig, mut progress: impl FnMut(usize)) -> Scorer {
    let (n_users, n_items, k) = (train.n_users, train.n_items, cfg.dim);
    let mut rng = Rng::new(cfg.seed ^ 0x5D);
    let mut users = rng.factors(n_users, k);
    let mut items = rng.factors(n_items, k);
    let mut user_bias = vec![0f32; n_users];
    let mut item_bias = vec![0f32; n_items];
    let n = train.triples.len().max(1);
    let mean = (train.triples.iter().map(|t| f64::from(t.2)).sum::<f64>() / n as f64) as f32;
    // A seeded order, the same every epoch: reproducible, and not sorted
    // by user.
    let mut order: Vec<u32> = (0..train.triples.len() as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let (lr, reg) = (cfg.learning_rate, cfg.regularization);
    for epoch in 0..cfg.epochs {
        for &t in &order {
            let (u, i, r) = train.triples[t as usize];
            let (u, i) = (u as usize, i as usize);
            let p = &mut users[u * k..][..k];
            let q = &mut items[i * k..][..k];
            let dot: f32 = p.iter().zip(q.iter()).map(|(a, b)| a * b).sum();
            let err = r - (mean + user_bias[u] + item_bias[i] + dot);
            user_bias[u] += lr * (err - reg * user_bias[u]);
            item_bias[i] += lr * (err - reg * item_bias[i]);
            for (pf, qf) in p.iter_mut().zip(q.iter_mut()) {
                let (pv, qv) = (*pf, *qf);
                *pf += lr * (err * qv - reg * pv);
                *qf += lr * (err * pv - reg * qv);
            }
        }
        progress(epoch + 1);
    }
    Scorer::Factors {
        dim: k as u32,
        user_factors: users,
        item_factors: items,
        item_bias,
    }
}
