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

    /// Starting factors for `rows` users or items of `k` dimensions, row by
    /// row: small normals, N(0, 0.1 / √k).
    pub(crate) fn factors(&mut self, rows: usize, k: usize) -> Vec<f32> {
        let scale = 0.1 / (k as f64).sqrt();
        (0..rows * k)
            .map(|_| (self.normal() * scale) as f32)
            .collect()
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
pub(crate) const ML_25M: Shape = Shape {
    users: 162_541,
    items: 59_047,
    ratings: 25_000_095,
};

/// Above this many (user, item) pairs, each user's items are drawn from a
/// popularity-weighted sample of candidates rather than from every item.
const EXHAUSTIVE_PAIRS: usize = 1_000_000_000;
/// Candidates drawn per rating a user will give, in the sampled mode.
const CANDIDATES_PER_RATING: usize = 8;

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
    // For large shapes, candidates come from the cumulative popularity.
    let sampled = shape.users.saturating_mul(shape.items) > EXHAUSTIVE_PAIRS;
    let cumulative: Vec<f64> = if sampled {
        popularity
            .iter()
            .scan(0.0, |acc, p| {
                *acc += p;
                Some(*acc)
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut candidates: Vec<usize> = Vec::new();
    for (user, &count) in counts.iter().enumerate() {
        let uv = &users[user * dim..][..dim];
        keyed.clear();
        candidates.clear();
        if sampled {
            let total = cumulative.last().copied().unwrap_or(0.0);
            let target = (count * CANDIDATES_PER_RATING).min(shape.items);
            while candidates.len() < target {
                let x = rng.uniform() * total;
                candidates.push(cumulative.partition_point(|&c| c < x).min(shape.items - 1));
                if candidates.len() == target {
                    candidates.sort_unstable();
                    candidates.dedup();
                }
            }
        } else {
            candidates.extend(0..shape.items);
        }
        for &item in &candidates {
            let iv = &items[item * dim..][..dim];
            let affinity: f64 = uv.iter().zip(iv).map(|(a, b)| a * b).sum::<f64>() * scale_dot;
            // Sampled candidates were drawn by popularity already.
            let prior = if sampled { 1.0 } else { popularity[item] };
            let weight = prior * (1.5 * affinity).exp();
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

/// Dense indices for external ids, in order of first appearance: a table
/// for the small ids MovieLens uses, a map for the rest.
#[derive(Default)]
struct DenseIds {
    small: Vec<u32>,
    large: HashMap<u64, u32>,
    count: u32,
}

impl DenseIds {
    const SMALL: u64 = 1 << 24;

    fn index(&mut self, id: u64) -> u32 {
        let next = self.count;
        let index = if id < Self::SMALL {
            let slot = id as usize;
            if slot >= self.small.len() {
                self.small.resize(slot + 1, u32::MAX);
            }
            if self.small[slot] == u32::MAX {
                self.small[slot] = next;
            }
            self.small[slot]
        } else {
            *self.large.entry(id).or_insert(next)
        };
        if index == next {
            self.count += 1;
        }
        index
    }
}

/// An unsigned integer field, without allocating.
fn parse_id(field: &[u8]) -> Option<u64> {
    let field = field.trim_ascii();
    if field.is_empty() {
        return None;
    }
    field.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Splits a ratings line on its separator: tabs (`u.data`), `::`
/// (`ratings.dat`) or commas (`ratings.csv`); the first three fields.
fn three_fields(line: &[u8]) -> Option<[&[u8]; 3]> {
    let sep: &[u8] = if line.contains(&b'\t') {
        b"\t"
    } else if line.windows(2).any(|w| w == b"::") {
        b"::"
    } else {
        b","
    };
    let mut rest = line;
    let mut fields = [&[][..]; 3];
    for (n, field) in fields.iter_mut().enumerate() {
        match rest.windows(sep.len()).position(|w| w == sep) {
            Some(at) => {
                *field = &rest[..at];
                rest = &rest[at + sep.len()..];
            }
            None if n == 2 => *field = rest,
            None => return None,
        }
    }
    Some(fields)
}

/// Reads MovieLens ratings line by line from `reader`, into one buffer
/// reused for every line: `u.data` (tab-separated `user item rating
/// timestamp`), `ratings.dat` (`::`-separated) or `ratings.csv` (with a
/// `userId,movieId,rating,timestamp` header). Ids become dense indices in
/// order of first appearance.
pub(crate) fn parse_reader(mut reader: impl std::io::BufRead) -> Result<Ratings, ParseError> {
    let mut users = DenseIds::default();
    let mut items = DenseIds::default();
    let mut triples = Vec::new();
    let mut line = Vec::with_capacity(128);
    let mut number = 0;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                return Err(ParseError {
                    line: number + 1,
                    message: format!("cannot read: {e}"),
                });
            }
        }
        number += 1;
        let text = line.trim_ascii_end();
        if text.trim_ascii().is_empty() || (number == 1 && text.starts_with(b"userId")) {
            continue;
        }
        let Some([user, item, rating]) = three_fields(text) else {
            return Err(ParseError {
                line: number,
                message: format!(
                    "expected user, item and rating separated by tabs, '::' or commas, found {:?}",
                    String::from_utf8_lossy(text)
                ),
            });
        };
        let id = |field: &[u8], what: &str| {
            parse_id(field).ok_or_else(|| ParseError {
                line: number,
                message: format!(
                    "bad {what} id {:?}",
                    String::from_utf8_lossy(field.trim_ascii())
                ),
            })
        };
        let (user, item) = (id(user, "user")?, id(item, "item")?);
        let value: f32 = std::str::from_utf8(rating.trim_ascii())
            .ok()
            .and_then(|r| r.parse().ok())
            .filter(|r: &f32| r.is_finite() && *r > 0.0)
            .ok_or_else(|| ParseError {
                line: number,
                message: format!(
                    "bad rating {:?}",
                    String::from_utf8_lossy(rating.trim_ascii())
                ),
            })?;
        triples.push((users.index(user), items.index(item), value));
    }
    if triples.is_empty() {
        return Err(ParseError {
            line: 0,
            message: "no ratings found".into(),
        });
    }
    Ok(Ratings {
        n_users: users.count as usize,
        n_items: items.count as usize,
        triples,
    })
}

/// Reads a MovieLens ratings file; see [`parse_reader`].
pub(crate) fn read_movielens(path: &Path) -> Result<Ratings, Box<dyn std::error::Error>> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    parse_reader(reader).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// Training ratings and each user's held-out items: one fold of a
/// cross-validation.
#[derive(Debug, Clone)]
pub(crate) struct Split {
    pub(crate) train: Ratings,
    /// Held-out items per user, sorted (empty for users not tested here).
    pub(crate) test: Vec<Vec<u32>>,
}

impl Split {
    /// The users with held-out items.
    pub(crate) fn test_users(&self) -> Vec<u32> {
        (0..self.test.len() as u32)
            .filter(|&u| !self.test[u as usize].is_empty())
            .collect()
    }
}

/// Users with fewer ratings are never tested (they always train).
pub(crate) const MIN_TEST_USER_RATINGS: usize = 5;

/// A user-based k-fold cross-validation, as LensKit's `crossfold_users`
/// with `SampleFrac`: users with at least [`MIN_TEST_USER_RATINGS`]
/// ratings are shuffled (seeded) and dealt into `k` folds, so each is
/// tested in exactly one (`k = 1`: all in the one fold); in its fold, a
/// user holds out `fraction` of their ratings (rounded, at least one),
/// chosen by a seeded shuffle of their own; every other rating trains.
#[derive(Debug, Clone)]
pub(crate) struct Folds {
    k: usize,
    fraction: f64,
    n_items: usize,
    /// Each user's ratings, in the order their holdout takes them.
    by_user: Vec<Vec<(u32, f32)>>,
    /// The fold each user is tested in, if any.
    fold_of: Vec<Option<usize>>,
}

impl Folds {
    pub(crate) fn new(ratings: &Ratings, k: usize, fraction: f64, seed: u64) -> Folds {
        let mut by_user: Vec<Vec<(u32, f32)>> = vec![Vec::new(); ratings.n_users];
        for &(u, i, r) in &ratings.triples {
            by_user[u as usize].push((i, r));
        }
        for (user, rated) in by_user.iter_mut().enumerate() {
            rated.sort_by_key(|&(i, _)| i);
            let mut rng = Rng::new(seed ^ 0x7E57 ^ (user as u64).wrapping_mul(0x9E37_79B9));
            for i in (1..rated.len()).rev() {
                rated.swap(i, rng.below(i + 1));
            }
        }
        let mut testable: Vec<usize> = (0..ratings.n_users)
            .filter(|&u| by_user[u].len() >= MIN_TEST_USER_RATINGS)
            .collect();
        let mut rng = Rng::new(seed ^ 0xF01D);
        for i in (1..testable.len()).rev() {
            testable.swap(i, rng.below(i + 1));
        }
        let mut fold_of = vec![None; ratings.n_users];
        for (n, &user) in testable.iter().enumerate() {
            fold_of[user] = Some(n % k.max(1));
        }
        Folds {
            k: k.max(1),
            fraction,
            n_items: ratings.n_items,
            by_user,
            fold_of,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.k
    }

    /// Fold `f`: its users' held-out items, and everything else to train.
    pub(crate) fn split(&self, f: usize) -> Split {
        let mut train = Vec::new();
        let mut test = vec![Vec::new(); self.by_user.len()];
        for (user, rated) in self.by_user.iter().enumerate() {
            let n_test = if self.fold_of[user] == Some(f) {
                ((rated.len() as f64 * self.fraction).round() as usize).clamp(1, rated.len() - 1)
            } else {
                0
            };
            for (k, &(item, rating)) in rated.iter().enumerate() {
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
                n_users: self.by_user.len(),
                n_items: self.n_items,
                triples: train,
            },
            test,
        }
    }
}
