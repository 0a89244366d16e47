//! The recommender example's parts: metrics, MovieLens readers, the split,
//! and scoring with 1 and 2 jobs.

#[allow(dead_code)]
#[path = "../examples/recsys_eval/als.rs"]
mod als;
#[allow(dead_code)]
#[path = "../examples/recsys_eval/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "../examples/recsys_eval/metrics.rs"]
mod metrics;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn metrics_match_hand_computed_values() {
    // Relevant {1, 5}; the list hits item 1 at rank 2 of 3.
    let s = metrics::score_list(&[3, 1, 2], &[1, 5], 3);
    let dcg = 1.0 / 3f64.log2();
    let idcg = 1.0 + 1.0 / 3f64.log2();
    assert!(close(s.ndcg, dcg / idcg), "{s:?}");
    assert!(
        close(s.recall, 0.5) && close(s.precision, 1.0 / 3.0) && close(s.reciprocal_rank, 0.5),
        "{s:?}"
    );
    // A perfect list, one relevant item.
    let s = metrics::score_list(&[7, 8], &[7], 2);
    assert!(
        close(s.ndcg, 1.0)
            && close(s.recall, 1.0)
            && close(s.precision, 0.5)
            && close(s.reciprocal_rank, 1.0)
    );
    // No hit, and hits beyond k do not count.
    assert_eq!(
        metrics::score_list(&[1, 2, 3], &[9], 3),
        metrics::Scores::default()
    );
    assert_eq!(
        metrics::score_list(&[1, 2, 9], &[9], 2),
        metrics::Scores::default()
    );
    // Mean over users.
    let m = metrics::mean(&[
        metrics::score_list(&[7], &[7], 1),
        metrics::Scores::default(),
    ]);
    assert!(close(m.ndcg, 0.5) && close(m.reciprocal_rank, 0.5));
}

#[test]
fn popularity_baseline_skips_seen_items() {
    let train = [
        (0, 2, 5.0),
        (1, 2, 4.0),
        (1, 0, 3.0),
        (2, 2, 1.0),
        (2, 0, 2.0),
        (2, 1, 2.0),
    ];
    let order = metrics::popularity_order(3, &train);
    assert_eq!(order, vec![2, 0, 1]);
    assert_eq!(metrics::popular_unseen(&order, &[2], 2), vec![0, 1]);
}

#[test]
fn reads_u_data_and_ratings_csv() {
    let udata = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n";
    let r = data::parse_movielens(udata).unwrap();
    assert_eq!((r.n_users, r.n_items), (2, 3));
    assert_eq!(r.triples, vec![(0, 0, 3.0), (1, 1, 3.0), (0, 2, 1.0)]);
    let csv = "userId,movieId,rating,timestamp\r\n1,31,2.5,1260759144\r\n1,1029,3.0,1260759179\r\n2,31,4.5,1260759185\r\n";
    let r = data::parse_movielens(csv).unwrap();
    assert_eq!((r.n_users, r.n_items), (2, 2));
    assert_eq!(r.triples, vec![(0, 0, 2.5), (0, 1, 3.0), (1, 0, 4.5)]);
    let dat = "1::1193::5::978300760\n1::661::3::978302109\n";
    assert_eq!(data::parse_movielens(dat).unwrap().triples.len(), 2);
}

#[test]
fn malformed_lines_name_the_line() {
    let err = data::parse_movielens("1\t2\t3\t4\n5\t6\n").unwrap_err();
    assert_eq!(err.line, 2);
    assert!(
        err.to_string()
            .starts_with("line 2: expected user, item and rating"),
        "{err}"
    );
    let err =
        data::parse_movielens("userId,movieId,rating,timestamp\n1,2,3,4\nx,2,3,4\n").unwrap_err();
    assert_eq!(err.to_string(), "line 3: bad user id \"x\"");
    let err = data::parse_movielens("1\t2\tgood\t4\n").unwrap_err();
    assert_eq!(err.to_string(), "line 1: bad rating \"good\"");
    assert!(data::parse_movielens("").is_err());
    assert!(
        data::read_movielens(std::path::Path::new("/nonexistent/u.data"))
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/u.data")
    );
}

#[test]
fn the_split_is_seeded_and_partitions_each_user() {
    let ratings = data::synthetic(
        data::Shape {
            users: 50,
            items: 200,
            ratings: 2_000,
        },
        7,
    );
    assert_eq!(ratings.triples.len(), 2_000);
    let a = data::holdout(&ratings, 0.2, 1);
    let b = data::holdout(&ratings, 0.2, 1);
    assert_eq!(a.test, b.test);
    assert_eq!(a.train, b.train);
    assert_ne!(a.test, data::holdout(&ratings, 0.2, 2).test);
    let held: usize = a.test.iter().map(Vec::len).sum();
    assert_eq!(held + a.train.triples.len(), ratings.triples.len());
    for (u, test) in a.test.iter().enumerate() {
        for &item in test {
            assert!(
                !a.train
                    .triples
                    .iter()
                    .any(|&(tu, ti, _)| tu as usize == u && ti == item)
            );
        }
    }
}

fn small_model() -> (data::Split, als::MfModel) {
    let ratings = data::synthetic(
        data::Shape {
            users: 300,
            items: 400,
            ratings: 12_000,
        },
        3,
    );
    let split = data::holdout(&ratings, 0.2, 3);
    let cfg = als::AlsConfig {
        dim: 16,
        iterations: 6,
        regularization: 0.05,
        alpha: 20.0,
        threads: 2,
        seed: 3,
    };
    let model = als::train(&split, &cfg, |_| {});
    (split, model)
}

#[test]
fn scoring_with_1_and_2_jobs_gives_identical_recommendations() {
    let (split, model) = small_model();
    let store = procpool::persist(&model).unwrap();
    let users: Vec<(u32, u32)> = (0..split.train.n_users as u32).map(|u| (u, 10)).collect();
    let mut lists = Vec::new();
    for jobs in [1, 2] {
        let mut inv = procpool::invoker(&store, als::recommend, jobs).unwrap();
        let got: Vec<Vec<(u32, f32)>> = inv
            .map(users.iter().copied())
            .collect::<Result<_, _>>()
            .unwrap();
        lists.push(got);
    }
    assert_eq!(lists[0], lists[1]);
    // Each list has 10 distinct unseen items, best first.
    for (u, list) in lists[0].iter().enumerate() {
        assert_eq!(list.len(), 10);
        assert!(list.windows(2).all(|w| w[0].1 >= w[1].1));
        let seen =
            &model.seen_items[model.seen_offsets[u] as usize..model.seen_offsets[u + 1] as usize];
        assert!(list.iter().all(|(i, _)| seen.binary_search(i).is_err()));
    }
}

#[test]
fn the_factor_model_beats_popularity() {
    let (split, model) = small_model();
    let store = procpool::persist(&model).unwrap();
    let popular = metrics::popularity_order(split.train.n_items, &split.train.triples);
    let (mut ours, mut baseline) = (Vec::new(), Vec::new());
    for u in 0..split.train.n_users {
        let relevant = &split.test[u];
        if relevant.is_empty() {
            continue;
        }
        let ranked: Vec<u32> = als::recommend(store.archived(), (u as u32, 10))
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        ours.push(metrics::score_list(&ranked, relevant, 10));
        let seen =
            &model.seen_items[model.seen_offsets[u] as usize..model.seen_offsets[u + 1] as usize];
        baseline.push(metrics::score_list(
            &metrics::popular_unseen(&popular, seen, 10),
            relevant,
            10,
        ));
    }
    let (m, p) = (metrics::mean(&ours), metrics::mean(&baseline));
    assert!(
        m.ndcg > p.ndcg,
        "ALS nDCG {} vs popularity {}",
        m.ndcg,
        p.ndcg
    );
}
