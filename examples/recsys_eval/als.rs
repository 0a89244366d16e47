//! Implicit-feedback matrix factorisation (alternating least squares, Hu,
//! Koren and Volinsky 2008), the model workers read in place, and the
//! function they run.

use super::data::{Rng, Split};

/// The persisted recommender: factors and each user's seen items (CSR).
#[derive(rkyv::Archive, rkyv::Serialize, Debug, Clone, PartialEq)]
pub(crate) struct MfModel {
    pub(crate) dim: u32,
    pub(crate) n_items: u32,
    /// `n_users × dim`, row-major.
    pub(crate) user_factors: Vec<f32>,
    /// `n_items × dim`, row-major.
    pub(crate) item_factors: Vec<f32>,
    /// User `u`'s seen items are `seen_items[seen_offsets[u]..seen_offsets[u + 1]]`, sorted.
    pub(crate) seen_offsets: Vec<u32>,
    pub(crate) seen_items: Vec<u32>,
}

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

/// Trains the model on `split.train`; `progress` is called after each iteration.
pub(crate) fn train(split: &Split, cfg: &AlsConfig, mut progress: impl FnMut(usize)) -> MfModel {
    let (n_users, n_items, k) = (split.train.n_users, split.train.n_items, cfg.dim);
    let mut by_user: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n_users];
    let mut by_item: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n_items];
    for &(u, i, r) in &split.train.triples {
        // Ratings on 1–5 scaled to 0.2–1 before the confidence weight.
        by_user[u as usize].push((i, r / 5.0));
        by_item[i as usize].push((u, r / 5.0));
    }
    let mut rng = Rng::new(cfg.seed);
    let init = 0.1 / (k as f64).sqrt();
    let mut users: Vec<f32> = (0..n_users * k)
        .map(|_| (rng.normal() * init) as f32)
        .collect();
    let mut items: Vec<f32> = (0..n_items * k)
        .map(|_| (rng.normal() * init) as f32)
        .collect();
    for iteration in 0..cfg.iterations {
        update(&mut users, &items, &by_user, cfg);
        update(&mut items, &users, &by_item, cfg);
        progress(iteration + 1);
    }
    let mut seen_offsets = Vec::with_capacity(n_users + 1);
    let mut seen_items = Vec::new();
    seen_offsets.push(0);
    for row in &by_user {
        let mut seen: Vec<u32> = row.iter().map(|&(i, _)| i).collect();
        seen.sort_unstable();
        seen.dedup();
        seen_items.extend(seen);
        seen_offsets.push(seen_items.len() as u32);
    }
    MfModel {
        dim: k as u32,
        n_items: n_items as u32,
        user_factors: users,
        item_factors: items,
        seen_offsets,
        seen_items,
    }
}

/// The `top_n` highest-scoring items `user` has not seen, best first (ties:
/// lower item id). Runs in a worker, reading the model in place.
pub(crate) fn recommend(model: &ArchivedMfModel, (user, top_n): (u32, u32)) -> Vec<(u32, f32)> {
    let k = model.dim.to_native() as usize;
    let u = user as usize;
    let factors = &model.user_factors[u * k..][..k];
    let start = model.seen_offsets[u].to_native() as usize;
    let end = model.seen_offsets[u + 1].to_native() as usize;
    let seen = &model.seen_items[start..end];
    let mut scored: Vec<(f32, u32)> = Vec::with_capacity(model.n_items.to_native() as usize);
    for (item, row) in model.item_factors.chunks_exact(k).enumerate() {
        let item = item as u32;
        if seen.binary_search_by(|s| s.to_native().cmp(&item)).is_ok() {
            continue;
        }
        let score: f32 = row
            .iter()
            .zip(factors)
            .map(|(a, b)| a.to_native() * b.to_native())
            .sum();
        scored.push((score, item));
    }
    let n = (top_n as usize).min(scored.len());
    let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if n > 0 && n < scored.len() {
        scored.select_nth_unstable_by(n - 1, better);
    }
    scored.truncate(n);
    scored.sort_by(better);
    scored.into_iter().map(|(s, i)| (i, s)).collect()
}
