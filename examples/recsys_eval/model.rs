//! The trained recommender every algorithm persists, and the function the
//! scoring workers run on it, reading it in place.

/// A trained model: how it scores items, and what each user has seen.
#[derive(rkyv::Archive, rkyv::Serialize, Debug, Clone, PartialEq)]
pub(crate) struct Model {
    pub(crate) n_items: u32,
    /// User `u`'s training items are `seen_items[seen_offsets[u]..seen_offsets[u + 1]]`, sorted.
    pub(crate) seen_offsets: Vec<u32>,
    pub(crate) seen_items: Vec<u32>,
    pub(crate) scorer: Scorer,
}

/// How a model scores a user's candidate items.
#[derive(rkyv::Archive, rkyv::Serialize, Debug, Clone, PartialEq)]
pub(crate) enum Scorer {
    /// The same score for every user: the item's number of training
    /// ratings.
    Popular { counts: Vec<f32> },
    /// Item-item: an item's score is the sum of its similarities to the
    /// user's items, over the neighbourhoods of those items. Item `j`'s
    /// neighbours are `neighbours[offsets[j]..offsets[j + 1]]` with
    /// `similarities` alongside.
    ItemKnn {
        offsets: Vec<u32>,
        neighbours: Vec<u32>,
        similarities: Vec<f32>,
    },
    /// Latent factors: `item_bias[i] + user · item`, `dim` per row (zero
    /// biases for implicit ALS; a user's own bias and the global mean do
    /// not change their ranking).
    Factors {
        dim: u32,
        user_factors: Vec<f32>,
        item_factors: Vec<f32>,
        item_bias: Vec<f32>,
    },
}

/// Each user's sorted, distinct items, as offsets and items (CSR).
pub(crate) fn seen_lists(n_users: usize, triples: &[(u32, u32, f32)]) -> (Vec<u32>, Vec<u32>) {
    let mut by_user: Vec<Vec<u32>> = vec![Vec::new(); n_users];
    for &(u, i, _) in triples {
        by_user[u as usize].push(i);
    }
    let mut offsets = Vec::with_capacity(n_users + 1);
    let mut items = Vec::with_capacity(triples.len());
    offsets.push(0);
    for mut seen in by_user {
        seen.sort_unstable();
        seen.dedup();
        items.extend(seen);
        offsets.push(items.len() as u32);
    }
    (offsets, items)
}

/// The `top_n` highest-scoring items `user` has not seen, best first (ties:
/// lower item id). Runs in a worker, reading the model in place.
pub(crate) fn recommend(model: &ArchivedModel, (user, top_n): (u32, u32)) -> Vec<(u32, f32)> {
    let n_items = model.n_items.to_native() as usize;
    let u = user as usize;
    let start = model.seen_offsets[u].to_native() as usize;
    let end = model.seen_offsets[u + 1].to_native() as usize;
    let seen = &model.seen_items[start..end];
    let mut scores = vec![f32::NEG_INFINITY; n_items];
    match &model.scorer {
        ArchivedScorer::Popular { counts } => {
            for (score, count) in scores.iter_mut().zip(counts.iter()) {
                *score = count.to_native();
            }
        }
        ArchivedScorer::ItemKnn {
            offsets,
            neighbours,
            similarities,
        } => {
            for j in seen {
                let j = j.to_native() as usize;
                let (a, b) = (
                    offsets[j].to_native() as usize,
                    offsets[j + 1].to_native() as usize,
                );
                for (i, s) in neighbours[a..b].iter().zip(&similarities[a..b]) {
                    let score = &mut scores[i.to_native() as usize];
                    *score = score.max(0.0) + s.to_native();
                }
            }
        }
        ArchivedScorer::Factors {
            dim,
            user_factors,
            item_factors,
            item_bias,
        } => {
            let k = dim.to_native() as usize;
            let factors = &user_factors[u * k..][..k];
            for ((score, row), bias) in scores
                .iter_mut()
                .zip(item_factors.chunks_exact(k))
                .zip(item_bias.iter())
            {
                let dot: f32 = row
                    .iter()
                    .zip(factors)
                    .map(|(a, b)| a.to_native() * b.to_native())
                    .sum();
                *score = bias.to_native() + dot;
            }
        }
    }
    let mut scored: Vec<(f32, u32)> = Vec::with_capacity(n_items);
    let mut seen = seen.iter().map(|s| s.to_native()).peekable();
    for (item, &score) in scores.iter().enumerate() {
        let item = item as u32;
        while seen.next_if(|&s| s < item).is_some() {}
        if seen.peek() == Some(&item) || score == f32::NEG_INFINITY {
            continue;
        }
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
