//! Ratings: a deterministic synthetic data set with MovieLens shapes, readers
//! for real MovieLens files, and a seeded per-user holdout split.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// A small, fast, seedable generator (SplitMix64), so the data set is the
/// same on every machine and every run for a given seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform in 0..n.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// Ratings with dense user and item indices.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ratings {
    pub(crate) n_users: usize,
    pub(crate) n_items: usize,
    /// `(user, item, rating)`.
    pub(crate) triples: Vec<(u32, u32, f32)>,
}

/// Shapes of the MovieLens data sets the synthetic generator imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) users: usize,
    pub(crate) items: usize,
    pub(crate) ratings: usize,
}

pub(crate) const ML_100K: Shape = Shape {
    users: 943,
    items: 1_682,
    ratings: 100_000,
};
pub(crate) const ML_1M: Shape = Shape {
    users: 6_040,
    items: 3_706,
    ratings: 1_000_209,
};
pub(crate) const ML_10M: Shape = Shape {
    users: 69_878,
    items: 10_677,
    ratings: 10_000_054,
};

/// Generates ratings with the given shape: long-tail item popularity
/// (Zipf-like), a heavy-tailed number of ratings per user (at least 20, as
/// in MovieLens), and latent user/item factors that drive both which items a
/// user rates and how, so a factor model has real structure to find.
pub(crate) fn synthetic(shape: Shape, seed: u64) -> Ratings {
    let mut rng = Rng::new(seed);
    let dim = 8;
    let users: Vec<f64> = (0..shape.users * dim).map(|_| rng.normal()).collect();
    let items: Vec<f64> = (0..shape.items * dim).map(|_| rng.normal()).collect();
    // Popularity by a random rank, so item ids carry no information.
    let mut order: Vec<usize> = (0..shape.items).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut popularity = vec![0.0; shape.items];
    for (rank, &item) in order.iter().enumerate() {
        popularity[item] = 1.0 / (rank as f64 + 10.0).powf(0.9);
    }
    // Ratings per user: log-normal around the mean, at least 20, scaled to the total.
    let mean = shape.ratings as f64 / shape.users as f64;
    let raw: Vec<f64> = (0..shape.users)
        .map(|_| (0.9 * rng.normal()).exp())
        .collect();
    let scale = mean / (raw.iter().sum::<f64>() / shape.users as f64);
    let cap = shape.items / 2;
    let mut counts: Vec<usize> = raw
        .iter()
        .map(|r| ((r * scale).round() as usize).clamp(20, cap))
        .collect();
    let mut total: isize = counts.iter().sum::<usize>() as isize - shape.ratings as isize;
    let mut u = 0;
    while total != 0 && shape.users > 0 {
        if total > 0 && counts[u] > 20 {
            counts[u] -= 1;
            total -= 1;
        } else if total < 0 && counts[u] < cap {
            counts[u] += 1;
            total += 1;
        }
        u = (u + 1) % shape.users;
    }
    let scale_dot = 1.0 / (dim as f64).sqrt();
    let mut triples = Vec::with_capacity(shape.ratings);
    let mut keyed: Vec<(f64, usize)> = Vec::with_capacity(shape.items);
    for (user, &count) in counts.iter().enumerate() {
        let uv = &users[user * dim..][..dim];
        keyed.clear();
        for item in 0..shape.items {
            let iv = &items[item * dim..][..dim];
            let affinity: f64 = uv.iter().zip(iv).map(|(a, b)| a * b).sum::<f64>() * scale_dot;
            let weight = popularity[item] * (1.5 * affinity).exp();
            // Weighted sampling without replacement (Efraimidis–Spirakis keys).
            keyed.push((rng.uniform().ln() / weight, item));
        }
        keyed.select_nth_unstable_by(count - 1, |a, b| b.0.total_cmp(&a.0));
        for &(_, item) in &keyed[..count] {
            let iv = &items[item * dim..][..dim];
            let affinity: f64 = uv.iter().zip(iv).map(|(a, b)| a * b).sum::<f64>() * scale_dot;
            let rating = (3.2 + 1.1 * affinity + 0.7 * rng.normal())
                .round()
                .clamp(1.0, 5.0);
            triples.push((user as u32, item as u32, rating as f32));
        }
    }
    Ratings {
        n_users: shape.users,
        n_items: shape.items,
        triples,
    }
}

/// A line of a ratings file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    /// 1-based line number.
    pub(crate) line: usize,
    pub(crate) message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Reads MovieLens ratings: `u.data` (tab-separated `user item rating
/// timestamp`), `ratings.dat` (`::`-separated) or `ratings.csv` (with a
/// `userId,movieId,rating,timestamp` header). Ids become dense indices in
/// order of first appearance.
pub(crate) fn parse_movielens(text: &str) -> Result<Ratings, ParseError> {
    let mut users: HashMap<u64, u32> = HashMap::new();
    let mut items: HashMap<u64, u32> = HashMap::new();
    let mut triples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if i == 0 && line.starts_with("userId") {
            continue;
        }
        let fields: Vec<&str> = if line.contains('\t') {
            line.split('\t').collect()
        } else if line.contains("::") {
            line.split("::").collect()
        } else {
            line.split(',').collect()
        };
        if fields.len() < 3 {
            return Err(ParseError {
                line: number,
                message: format!(
                    "expected user, item and rating separated by tabs, '::' or commas, found {:?}",
                    line
                ),
            });
        }
        let id = |field: &str, what: &str| {
            field.trim().parse::<u64>().map_err(|_| ParseError {
                line: number,
                message: format!("bad {what} id {field:?}"),
            })
        };
        let user = id(fields[0], "user")?;
        let item = id(fields[1], "item")?;
        let rating: f32 = fields[2]
            .trim()
            .parse()
            .ok()
            .filter(|r: &f32| r.is_finite() && *r > 0.0)
            .ok_or_else(|| ParseError {
                line: number,
                message: format!("bad rating {:?}", fields[2]),
            })?;
        let next_user = users.len() as u32;
        let user = *users.entry(user).or_insert(next_user);
        let next_item = items.len() as u32;
        let item = *items.entry(item).or_insert(next_item);
        triples.push((user, item, rating));
    }
    if triples.is_empty() {
        return Err(ParseError {
            line: 0,
            message: "no ratings found".into(),
        });
    }
    Ok(Ratings {
        n_users: users.len(),
        n_items: items.len(),
        triples,
    })
}

/// Reads a MovieLens ratings file; see [`parse_movielens`].
pub(crate) fn read_movielens(path: &Path) -> Result<Ratings, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_movielens(&text).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// A per-user holdout: each user with at least 5 ratings gives
/// `fraction` of them (at least one) to the test set, chosen by a seeded
/// shuffle; the rest is training data.
#[derive(Debug, Clone)]
pub(crate) struct Split {
    pub(crate) train: Ratings,
    /// Held-out items per user (empty for users without a test set).
    pub(crate) test: Vec<Vec<u32>>,
}

pub(crate) fn holdout(ratings: &Ratings, fraction: f64, seed: u64) -> Split {
    let mut by_user: Vec<Vec<(u32, f32)>> = vec![Vec::new(); ratings.n_users];
    for &(u, i, r) in &ratings.triples {
        by_user[u as usize].push((i, r));
    }
    let mut rng = Rng::new(seed ^ 0x7E57);
    let mut train = Vec::with_capacity(ratings.triples.len());
    let mut test = vec![Vec::new(); ratings.n_users];
    for (user, mut rated) in by_user.into_iter().enumerate() {
        rated.sort_by_key(|&(i, _)| i);
        for i in (1..rated.len()).rev() {
            rated.swap(i, rng.below(i + 1));
        }
        let n_test = if rated.len() >= 5 {
            ((rated.len() as f64 * fraction).round() as usize).max(1)
        } else {
            0
        };
        for (k, (item, rating)) in rated.into_iter().enumerate() {
            if k < n_test {
                test[user].push(item);
            } else {
                train.push((user as u32, item, rating));
            }
        }
        test[user].sort_unstable();
    }
    Split {
        train: Ratings {
            n_users: ratings.n_users,
            n_items: ratings.n_items,
            triples: train,
        },
        test,
    }
}
