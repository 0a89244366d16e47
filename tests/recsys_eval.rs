//! The recommender experiment's parts: metrics, MovieLens readers, the
//! folds, each algorithm on hand-made data, isolated training that fails
//! alone, and scoring with 1 and 2 jobs.

#[allow(dead_code)]
#[path = "../examples/recsys_eval/als.rs"]
mod als;
#[allow(dead_code)]
#[path = "../examples/recsys_eval/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "../examples/recsys_eval/knn.rs"]
mod knn;
#[allow(dead_code)]
#[path = "../examples/recsys_eval/metrics.rs"]
mod metrics;
#[allow(dead_code)]
#[path = "../examples/recsys_eval/mf.rs"]
mod mf;
#[allow(dead_code)]
#[path = "../examples/recsys_eval/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "../examples/recsys_eval/train.rs"]
mod train;

use train::{Algorithm, Sabotage, TrainData, TrainJob};

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
    // More relevant items than k: recall counts against k (LensKit's
    // definition), and so does the ideal list.
    let s = metrics::score_list(&[1, 2], &[1, 2, 3], 2);
    assert!(
        close(s.recall, 1.0) && close(s.ndcg, 1.0) && close(s.precision, 1.0),
        "{s:?}"
    );
    // A list shorter than k: precision counts against its length.
    let s = metrics::score_list(&[1], &[1, 9], 3);
    assert!(close(s.precision, 1.0) && close(s.recall, 0.5), "{s:?}");
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
fn reads_u_data_and_ratings_csv() {
    let udata = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n";
    let r = parse(udata).unwrap();
    assert_eq!((r.n_users, r.n_items), (2, 3));
    assert_eq!(r.triples, vec![(0, 0, 3.0), (1, 1, 3.0), (0, 2, 1.0)]);
    let csv = "userId,movieId,rating,timestamp\r\n1,31,2.5,1260759144\r\n1,1029,3.0,1260759179\r\n2,31,4.5,1260759185\r\n";
    let r = parse(csv).unwrap();
    assert_eq!((r.n_users, r.n_items), (2, 2));
    assert_eq!(r.triples, vec![(0, 0, 2.5), (0, 1, 3.0), (1, 0, 4.5)]);
    let dat = "1::1193::5::978300760\n1::661::3::978302109\n";
    assert_eq!(parse(dat).unwrap().triples.len(), 2);
}

#[test]
fn malformed_lines_name_the_line() {
    let err = parse("1\t2\t3\t4\n5\t6\n").unwrap_err();
    assert_eq!(err.line, 2);
    assert!(
        err.to_string()
            .starts_with("line 2: expected user, item and rating"),
        "{err}"
    );
    let err = parse("userId,movieId,rating,timestamp\n1,2,3,4\nx,2,3,4\n").unwrap_err();
    assert_eq!(err.to_string(), "line 3: bad user id \"x\"");
    let err = parse("1\t2\tgood\t4\n").unwrap_err();
    assert_eq!(err.to_string(), "line 1: bad rating \"good\"");
    assert!(parse("").is_err());
    assert!(
        data::read_movielens(std::path::Path::new("/nonexistent/u.data"))
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/u.data")
    );
}

fn parse(text: &str) -> Result<data::Ratings, data::ParseError> {
    data::parse_reader(text.as_bytes())
}

#[test]
fn folds_test_each_user_once_and_hold_out_a_fraction() {
    let ratings = data::synthetic(
        data::Shape {
            users: 200,
            items: 300,
            ratings: 8_000,
        },
        7,
    );
    let folds = data::Folds::new(&ratings, 5, 0.2, 1);
    let mut rated = vec![0usize; ratings.n_users];
    for &(u, _, _) in &ratings.triples {
        rated[u as usize] += 1;
    }
    let mut tested_in = vec![Vec::new(); ratings.n_users];
    for f in 0..5 {
        let split = folds.split(f);
        let held: usize = split.test.iter().map(Vec::len).sum();
        assert_eq!(
            held + split.train.triples.len(),
            ratings.triples.len(),
            "fold {f}"
        );
        for u in split.test_users() {
            let n = rated[u as usize];
            let expected = ((n as f64 * 0.2).round() as usize).clamp(1, n - 1);
            assert_eq!(split.test[u as usize].len(), expected, "user {u} fold {f}");
            tested_in[u as usize].push(f);
            // Held-out items are not in training.
            for &item in &split.test[u as usize] {
                assert!(
                    !split
                        .train
                        .triples
                        .iter()
                        .any(|&(tu, ti, _)| tu == u && ti == item)
                );
            }
        }
    }
    for (u, folds_of_u) in tested_in.iter().enumerate() {
        let expected = usize::from(rated[u] >= data::MIN_TEST_USER_RATINGS);
        assert_eq!(
            folds_of_u.len(),
            expected,
            "user {u} with {} ratings",
            rated[u]
        );
    }
    // Folds are balanced and seeded.
    let sizes: Vec<usize> = (0..5).map(|f| folds.split(f).test_users().len()).collect();
    assert!(
        sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
        "{sizes:?}"
    );
    let again = data::Folds::new(&ratings, 5, 0.2, 1);
    assert_eq!(again.split(3).test, folds.split(3).test);
    assert_ne!(
        data::Folds::new(&ratings, 5, 0.2, 2).split(3).test,
        folds.split(3).test
    );
    // One fold tests every testable user.
    let one = data::Folds::new(&ratings, 1, 0.2, 1).split(0);
    assert_eq!(
        one.test_users().len(),
        rated.iter().filter(|&&n| n >= 5).count()
    );
}

/// Two tastes: users 0..4 like items 0..3 (rate them 5, and items 3..6 1),
/// users 4..8 the other way round, so every item has the same mean. User
/// 8 rated items 0 and 1 highly and items 4 and 5 low; 2 and 3 are left.
fn two_tastes() -> data::Ratings {
    let mut triples = Vec::new();
    for u in 0..8u32 {
        for i in 0..6u32 {
            let likes = (u < 4) == (i < 3);
            triples.push((u, i, if likes { 5.0 } else { 1.0 }));
        }
    }
    triples.extend([(8, 0, 5.0), (8, 1, 5.0), (8, 4, 1.0), (8, 5, 1.0)]);
    data::Ratings {
        n_users: 9,
        n_items: 6,
        triples,
    }
}

fn trained(algorithm: Algorithm, ratings: &data::Ratings) -> procpool::ModelStore<model::Model> {
    let job = TrainJob {
        algorithm,
        data: "unused".into(),
        model: "unused".into(),
        dim: 4,
        iterations: 30,
        neighbours: 5,
        threads: 2,
        seed: 1,
        sabotage: None,
    };
    procpool::persist(&train::train(ratings, &job)).unwrap()
}

fn top(store: &procpool::ModelStore<model::Model>, user: u32, n: u32) -> Vec<u32> {
    model::recommend(store.archived(), (user, n))
        .into_iter()
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn most_popular_recommends_the_most_rated_unseen_items() {
    // Counts: item 0: 3, item 1: 2, item 2: 1; user 0 has seen item 0.
    let ratings = data::Ratings {
        n_users: 3,
        n_items: 3,
        triples: vec![
            (0, 0, 5.0),
            (1, 0, 4.0),
            (2, 0, 1.0),
            (1, 1, 3.0),
            (2, 1, 2.0),
            (2, 2, 2.0),
        ],
    };
    let store = trained(Algorithm::MostPopular, &ratings);
    assert_eq!(top(&store, 0, 10), [1, 2]);
    assert_eq!(top(&store, 1, 1), [2]);
    assert_eq!(
        top(&store, 2, 10),
        Vec::<u32>::new(),
        "user 2 has seen everything"
    );
}

#[test]
fn item_knn_scores_by_cosine_similarity_to_the_users_items() {
    // Item 0's users {0, 1, 2, 4}, item 1's {0, 1}, item 2's {2, 3}, item 3's {3}.
    let ratings = data::Ratings {
        n_users: 5,
        n_items: 4,
        triples: vec![
            (0, 0, 1.0),
            (1, 0, 1.0),
            (2, 0, 1.0),
            (0, 1, 1.0),
            (1, 1, 1.0),
            (2, 2, 1.0),
            (3, 2, 1.0),
            (3, 3, 1.0),
            (4, 0, 1.0),
        ],
    };
    let store = trained(Algorithm::ItemKnn, &ratings);
    // User 4 has seen item 0: cos(0, 1) = 2 / (√4 √2), cos(0, 2) =
    // 1 / (√4 √2), cos(0, 3) = 0 (no common user: not a neighbour).
    let got = model::recommend(store.archived(), (4, 10));
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 2]);
    assert!((got[0].1 - 2.0 / 8f32.sqrt()).abs() < 1e-6, "{got:?}");
    assert!((got[1].1 - 1.0 / 8f32.sqrt()).abs() < 1e-6, "{got:?}");
}

#[test]
fn the_factor_models_find_the_users_taste() {
    let ratings = two_tastes();
    for algorithm in [Algorithm::ImplicitAls, Algorithm::BiasedMf] {
        let store = trained(algorithm, &ratings);
        // User 8 likes what users 0..4 like: item 2 before item 3.
        assert_eq!(top(&store, 8, 10), [2, 3], "{algorithm:?}");
        // User 0 has seen everything.
        assert!(top(&store, 0, 10).is_empty(), "{algorithm:?}");
    }
}

/// The training of one algorithm on `ratings`, in its own process.
fn train_isolated(
    algorithm: Algorithm,
    ratings: &data::Ratings,
    sabotage: Option<Sabotage>,
    dir: &std::path::Path,
) -> Result<Result<f64, String>, procpool::TaskError> {
    let data_path = dir.join("train.data");
    procpool::persist_to_path(&TrainData::from_ratings(ratings), &data_path).unwrap();
    let job = TrainJob {
        algorithm,
        data: data_path,
        model: dir.join(format!("{}.model", algorithm.name())),
        dim: 4,
        iterations: 5,
        neighbours: 5,
        threads: 1,
        seed: 1,
        sabotage,
    };
    procpool::Isolated::new(train::train_job)
        .memory_limit(1 << 30)
        .run(job)
}

#[test]
fn a_training_that_panics_or_runs_out_of_memory_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = two_tastes();
    let err = train_isolated(
        Algorithm::ItemKnn,
        &ratings,
        Some(Sabotage::Panic),
        dir.path(),
    )
    .unwrap_err();
    assert!(err.is_panic(), "{err}");
    assert_eq!(err.panic_message(), Some("item-knn was told to fail"));
    let err = train_isolated(
        Algorithm::BiasedMf,
        &ratings,
        Some(Sabotage::OutOfMemory),
        dir.path(),
    )
    .unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    // The next one trains and its model loads.
    let secs = train_isolated(Algorithm::ImplicitAls, &ratings, None, dir.path())
        .unwrap()
        .unwrap();
    assert!(secs >= 0.0);
    let store =
        procpool::ModelStore::<model::Model>::load(dir.path().join("implicit-als.model")).unwrap();
    assert_eq!(
        top(&store, 8, 1),
        top(&trained(Algorithm::ImplicitAls, &ratings), 8, 1)
    );
}

/// The example program, as `cargo test` built it.
fn example_program() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let program = dir.join("examples").join("recsys_eval");
    // `cargo test` builds the examples (a single `--test` does not): the
    // program must be newer than its sources.
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let sources = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/recsys_eval");
    let newest_source = std::fs::read_dir(&sources)
        .unwrap()
        .filter_map(|entry| modified(&entry.ok()?.path()))
        .max();
    let fresh = modified(&program).is_some_and(|built| Some(built) >= newest_source);
    assert!(
        fresh,
        "{} is missing or older than its sources: run `cargo test` or `cargo build --example recsys_eval`",
        program.display()
    );
    program
}

#[test]
fn the_experiment_reports_failed_trainings_and_goes_on() {
    let out = tempfile::tempdir().unwrap();
    let run = |keep_going: bool| {
        let mut command = std::process::Command::new(example_program());
        command.args([
            "--folds",
            "2",
            "--train-memory-mb",
            "1024",
            "--fail-training",
            "item-knn=panic",
            "--fail-training",
            "biased-mf=oom",
            "--out",
        ]);
        command.arg(out.path());
        if keep_going {
            command.arg("--keep-going");
        }
        command.output().unwrap()
    };
    let output = run(false);
    assert!(!output.status.success(), "two trainings failed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("2 of 4 algorithms failed to train"),
        "{stderr}"
    );
    let output = run(true);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("item-knn      failed: fold 0:"), "{stdout}");
    assert!(stdout.contains("item-knn was told to fail"), "{stdout}");
    assert!(
        stdout.contains("out of memory") || stdout.contains("memory"),
        "{stdout}"
    );
    let json = stdout.lines().last().unwrap();
    assert!(
        json.contains(r#""name":"implicit-als","folds":2"#),
        "{json}"
    );
    assert!(json.contains(r#""name":"item-knn","folds":0"#), "{json}");
    assert!(
        json.contains(r#""name":"most-popular","folds":2"#),
        "{json}"
    );
    // Every test user of both folds has a list from the algorithms that trained.
    let recs = std::fs::read_to_string(out.path().join("recommendations.csv")).unwrap();
    assert!(recs.lines().any(|l| l.starts_with("implicit-als,1,")));
    assert!(!recs.lines().any(|l| l.starts_with("item-knn,")));
    // Every test user of both folds has a row per algorithm that trained.
    let metrics = std::fs::read_to_string(out.path().join("metrics.csv")).unwrap();
    let test = std::fs::read_to_string(out.path().join("truth.csv")).unwrap();
    let test_users: std::collections::BTreeSet<String> = test
        .lines()
        .skip(1)
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect();
    let scored: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("most-popular,"))
        .map(|l| l.splitn(3, ',').take(2).collect::<Vec<_>>().join(","))
        .collect();
    assert_eq!(test_users, scored);
}

fn small_fold() -> data::Split {
    let ratings = data::synthetic(
        data::Shape {
            users: 300,
            items: 400,
            ratings: 12_000,
        },
        3,
    );
    data::Folds::new(&ratings, 5, 0.2, 3).split(0)
}

#[test]
fn scoring_with_1_and_2_jobs_gives_identical_recommendations() {
    let split = small_fold();
    for algorithm in Algorithm::ALL {
        let store = trained(algorithm, &split.train);
        let users: Vec<(u32, u32)> = split.test_users().into_iter().map(|u| (u, 10)).collect();
        let mut lists = Vec::new();
        for jobs in [1, 2] {
            let mut inv = procpool::invoker(&store, model::recommend, jobs).unwrap();
            let got: Vec<Vec<(u32, f32)>> = inv
                .map(users.iter().copied())
                .collect::<Result<_, _>>()
                .unwrap();
            lists.push(got);
        }
        assert_eq!(lists[0], lists[1], "{algorithm:?}");
        // Each list holds distinct unseen items, best first.
        let model = store.archived();
        for (&(u, _), list) in users.iter().zip(&lists[0]) {
            assert!(list.len() <= 10 && !list.is_empty(), "{algorithm:?}");
            assert!(list.windows(2).all(|w| w[0].1 >= w[1].1), "{algorithm:?}");
            let (a, b) = (
                model.seen_offsets[u as usize].to_native(),
                model.seen_offsets[u as usize + 1].to_native(),
            );
            let seen: Vec<u32> = model.seen_items[a as usize..b as usize]
                .iter()
                .map(|s| s.to_native())
                .collect();
            assert!(
                list.iter().all(|(i, _)| seen.binary_search(i).is_err()),
                "{algorithm:?}"
            );
        }
    }
}

#[test]
fn the_personalised_models_beat_popularity() {
    let split = small_fold();
    let ndcg = |algorithm| {
        let store = trained(algorithm, &split.train);
        let scores: Vec<metrics::Scores> = split
            .test_users()
            .into_iter()
            .map(|u| metrics::score_list(&top(&store, u, 10), &split.test[u as usize], 10))
            .collect();
        metrics::mean(&scores).ndcg
    };
    let popular = ndcg(Algorithm::MostPopular);
    for algorithm in [Algorithm::ItemKnn, Algorithm::ImplicitAls] {
        let ours = ndcg(algorithm);
        assert!(
            ours > popular,
            "{algorithm:?} nDCG {ours} vs popularity {popular}"
        );
    }
}
