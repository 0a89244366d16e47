//! Item-item nearest neighbours on the implicit matrix: the cosine
//! similarity of two items' sets of users, each item keeping its
//! `neighbours` most similar items.

use super::data::Ratings;
use super::model::Scorer;

/// Computes every item's `neighbours` most similar items (cosine on who
/// rated them), on `threads` threads.
pub(crate) fn train(train: &Ratings, neighbours: usize, threads: usize) -> Scorer {
    let (n_users, n_items) = (train.n_users, train.n_items);
    let mut by_user: Vec<Vec<u32>> = vec![Vec::new(); n_users];
    let mut by_item: Vec<Vec<u32>> = vec![Vec::new(); n_items];
    for &(u, i, _) in &train.triples {
        by_user[u as usize].push(i);
        by_item[i as usize].push(u);
    }
    for list in by_user.iter_mut().chain(by_item.iter_mut()) {
        list.sort_unstable();
        list.dedup();
    }
    let norms: Vec<f32> = by_item
        .iter()
        .map(|users| (users.len() as f32).sqrt())
        .collect();
    let per_thread = n_items.div_ceil(threads.max(1)).max(1);
    let mut lists: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n_items];
    std::thread::scope(|scope| {
        for (block, out) in lists.chunks_mut(per_thread).enumerate() {
            let (by_user, by_item, norms) = (&by_user, &by_item, &norms);
            scope.spawn(move || {
                // Co-occurrence counts of one item with every other.
                let mut counts = vec![0u32; n_items];
                let mut touched = Vec::new();
                for (offset, list) in out.iter_mut().enumerate() {
                    let i = block * per_thread + offset;
                    for &u in &by_item[i] {
                        for &j in &by_user[u as usize] {
                            if j as usize != i {
                                if counts[j as usize] == 0 {
                                    touched.push(j);
                                }
                                counts[j as usize] += 1;
                            }
                        }
                    }
                    let mut similar: Vec<(u32, f32)> = touched
                        .iter()
                        .map(|&j| {
                            let c = counts[j as usize] as f32;
                            (j, c / (norms[i] * norms[j as usize]))
                        })
                        .collect();
                    for &j in &touched {
                        counts[j as usize] = 0;
                    }
                    touched.clear();
                    let better =
                        |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
                    if similar.len() > neighbours && neighbours > 0 {
                        similar.select_nth_unstable_by(neighbours - 1, better);
                        similar.truncate(neighbours);
                    }
                    similar.sort_by(better);
                    *list = similar;
                }
            });
        }
    });
    let mut offsets = Vec::with_capacity(n_items + 1);
    let mut neighbour_ids = Vec::new();
    let mut similarities = Vec::new();
    offsets.push(0);
    for list in lists {
        for (j, s) in list {
            neighbour_ids.push(j);
            similarities.push(s);
        }
        offsets.push(neighbour_ids.len() as u32);
    }
    Scorer::ItemKnn {
        offsets,
        neighbours: neighbour_ids,
        similarities,
    }
}
