//! Top-N ranking metrics with binary relevance.

/// Metrics of one ranked list against the relevant items (sorted).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Scores {
    pub(crate) ndcg: f64,
    pub(crate) recall: f64,
    pub(crate) precision: f64,
    pub(crate) reciprocal_rank: f64,
}

/// Scores the first `k` items of `ranked` against `relevant` (sorted ids),
/// with LensKit's definitions: nDCG with the `1 / lg(rank + 1)` discount
/// and the ideal list of `min(|relevant|, k)` hits; recall as hits over
/// `min(|relevant|, k)`; precision as hits over the list's length (`k`, or
/// fewer if the list is shorter); the reciprocal rank of the first hit.
pub(crate) fn score_list(ranked: &[u32], relevant: &[u32], k: usize) -> Scores {
    if relevant.is_empty() || k == 0 {
        return Scores::default();
    }
    let top = &ranked[..ranked.len().min(k)];
    let mut dcg = 0.0;
    let mut hits = 0usize;
    let mut first_hit = None;
    for (rank, item) in top.iter().enumerate() {
        if relevant.binary_search(item).is_ok() {
            dcg += 1.0 / (rank as f64 + 2.0).log2();
            hits += 1;
            first_hit.get_or_insert(rank);
        }
    }
    let ideal_hits = relevant.len().min(k);
    let ideal: f64 = (0..ideal_hits)
        .map(|rank| 1.0 / (rank as f64 + 2.0).log2())
        .sum();
    Scores {
        ndcg: dcg / ideal,
        recall: hits as f64 / ideal_hits as f64,
        precision: if top.is_empty() {
            0.0
        } else {
            hits as f64 / top.len() as f64
        },
        reciprocal_rank: first_hit.map_or(0.0, |r| 1.0 / (r as f64 + 1.0)),
    }
}

/// The mean of per-user scores.
pub(crate) fn mean(scores: &[Scores]) -> Scores {
    let n = scores.len().max(1) as f64;
    let mut m = Scores::default();
    for s in scores {
        m.ndcg += s.ndcg / n;
        m.recall += s.recall / n;
        m.precision += s.precision / n;
        m.reciprocal_rank += s.reciprocal_rank / n;
    }
    m
}
