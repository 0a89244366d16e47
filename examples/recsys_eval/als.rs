//! Implicit-feedback matrix factorisation: alternating least squares (Hu,
//! Koren and Volinsky 2008).

use super::data::{Ratings, Rng};
use super::model::Scorer;

/// Training settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AlsConfig {
    pub(crate) dim: usize,
    pub(crate) iterations: usize,
    pub(crate) regularization: f32,
    /// Confidence of an observed rating: `1 + alpha * rating`.
    pub(crate) alpha: f32,
    pub(crate) threads: usize,
    pub(crate) seed: u64,
}

/// Solves `a x = b` for a symmetric positive definite `a` (`n × n`,
/// row-major) by Cholesky factorisation, in place.
fn cholesky_solve(a: &mut [f64], b: &mut [f64], n: usize) {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        let d = d.max(1e-12).sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * n + k] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in i + 1..n {
            s -= a[k * n + i] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
}

/// One half-step: recompute every row of `solve` from the fixed `other`
/// factors and each row's `(column, rating)` list.
fn update(solve: &mut [f32], other: &[f32], rows: &[Vec<(u32, f32)>], cfg: &AlsConfig) {
    let k = cfg.dim;
    // Gram matrix of the fixed side, shared by every row.
    let mut gram = vec![0f64; k * k];
    for v in other.chunks_exact(k) {
        for a in 0..k {
            for b in 0..k {
                gram[a * k + b] += f64::from(v[a]) * f64::from(v[b]);
            }
        }
    }
    let chunk_rows = rows.len().div_ceil(cfg.threads.max(1)).max(1);
    std::thread::scope(|scope| {
        for (block, out) in rows
            .chunks(chunk_rows)
            .zip(solve.chunks_mut(chunk_rows * k))
        {
            let gram = &gram;
            scope.spawn(move || {
                let mut a = vec![0f64; k * k];
                let mut b = vec![0f64; k];
                for (row, x) in block.iter().zip(out.chunks_exact_mut(k)) {
                    a.copy_from_slice(gram);
                    b.iter_mut().for_each(|v| *v = 0.0);
                    for d in 0..k {
                        a[d * k + d] += f64::from(cfg.regularization) * (row.len().max(1) as f64);
                    }
                    for &(col, rating) in row {
                        let y = &other[col as usize * k..][..k];
                        let confidence = 1.0 + f64::from(cfg.alpha * rating);
                        for p in 0..k {
                            let yp = f64::from(y[p]);
                            b[p] += confidence * yp;
                            for q in 0..k {
                                a[p * k + q] += (confidence - 1.0) * yp * f64::from(y[q]);
                            }
                        }
                    }
                    cholesky_solve(&mut a, &mut b, k);
                    for (xi, bi) in x.iter_mut().zip(&b) {
                        *xi = *bi as f32;
                    }
                }
            });
        }
    });
}

/// Trains factors on `train`; `progress` is called after each iteration.
pub(crate) fn train(train: &Ratings, cfg: &AlsConfig, mut progress: impl FnMut(usize)) -> Scorer {
    let (n_users, n_items, k) = (train.n_users, train.n_items, cfg.dim);
    let mut by_user: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n_users];
    let mut by_item: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n_items];
    for &(u, i, r) in &train.triples {
        // Ratings on 1–5 scaled to 0.2–1 before the confidence weight.
        by_user[u as usize].push((i, r / 5.0));
        by_item[i as usize].push((u, r / 5.0));
    }
    let mut rng = Rng::new(cfg.seed);
    let mut users = rng.factors(n_users, k);
    let mut items = rng.factors(n_items, k);
    for iteration in 0..cfg.iterations {
        update(&mut users, &items, &by_user, cfg);
        update(&mut items, &users, &by_item, cfg);
        progress(iteration + 1);
    }
    Scorer::Factors {
        dim: k as u32,
        user_factors: users,
        item_factors: items,
        item_bias: vec![0.0; n_items],
    }
}
