"""LensKit 2025.8 beside `examples/recsys_eval`, on the same folds.

`recsys(DIR, N)`: DIR holds what `recsys_eval --export DIR --out DIR`
wrote: fold 0's split (train.csv, test.csv) and the experiment's
recommendations.csv, metrics.csv and truth.csv (fold,user,item). It prints
JSON lines:

- LensKit's `batch.recommend` on fold 0 for ImplicitMF (the example's
  settings: 32 factors, 10 epochs) and ItemKNN (20 neighbours, implicit),
  top-10 for every test user, with 1 job and with N: users/s;
- procpool's recommendations re-measured by LensKit's own metric code
  (`NDCG(n=10)` with the `lg(rank + 1)` discount, `Recall(n=10)`) against
  procpool's metrics.csv, user by user: the largest difference.
"""

import json
import time

import pandas as pd


def speed(export_dir, n_jobs):
    import lenskit
    from lenskit.als import ImplicitMFScorer
    from lenskit.batch import recommend
    from lenskit.data import from_interactions_df
    from lenskit.knn import ItemKNNScorer
    from lenskit.pipeline import topn_pipeline

    train = pd.read_csv(f"{export_dir}/train.csv")
    test = pd.read_csv(f"{export_dir}/test.csv")
    users = sorted(set(test["user"]))
    data = from_interactions_df(train, user_col="user", item_col="item", rating_col="rating")
    scorers = [
        ("ImplicitMF", ImplicitMFScorer(embedding_size=32, epochs=10)),
        ("ItemKNN", ItemKNNScorer(max_nbrs=20, feedback="implicit")),
    ]
    for name, scorer in scorers:
        pipe = topn_pipeline(scorer, n=10)
        t = time.perf_counter()
        pipe.train(data)
        train_s = time.perf_counter() - t
        rates = {}
        for jobs in (1, n_jobs):
            t = time.perf_counter()
            recommend(pipe, users, n=10, n_jobs=jobs)
            rates[jobs] = len(users) / (time.perf_counter() - t)
        print(json.dumps({
            "tool": f"LensKit {lenskit.__version__} batch.recommend ({name})",
            "workload": "recsys",
            "n_jobs": n_jobs,
            "users_per_s": round(rates[n_jobs]),
            "users_per_s_1_job": round(rates[1]),
            "train_s": round(train_s, 2),
        }), flush=True)


def metrics(export_dir):
    import lenskit
    from lenskit.data import ItemList
    from lenskit.metrics import NDCG, LogRankWeight, Recall

    recs = pd.read_csv(f"{export_dir}/recommendations.csv")
    truth = pd.read_csv(f"{export_dir}/truth.csv")
    ours = pd.read_csv(f"{export_dir}/metrics.csv").set_index(["algorithm", "fold", "user"])
    ndcg = NDCG(n=10, weight=LogRankWeight(offset=1))
    recall = Recall(n=10)
    relevant = {key: ItemList(item_ids=g["item"].to_numpy()) for key, g in truth.groupby(["fold", "user"])}
    lists = {key: g.sort_values("rank")["item"].to_numpy() for key, g in recs.groupby(["algorithm", "fold", "user"])}
    worst = {"ndcg": 0.0, "recall": 0.0}
    measured = 0
    for (algorithm, fold, user), row in ours.iterrows():
        items = lists.get((algorithm, fold, user), [])
        ranked = ItemList(item_ids=items, ordered=True)
        test = relevant[(fold, user)]
        worst["ndcg"] = max(worst["ndcg"], abs(float(ndcg.measure_list(ranked, test)) - row["ndcg"]))
        worst["recall"] = max(worst["recall"], abs(float(recall.measure_list(ranked, test)) - row["recall"]))
        measured += 1
    print(json.dumps({
        "tool": f"LensKit {lenskit.__version__} metrics on procpool's recommendations",
        "workload": "recsys_metrics",
        "lists": measured,
        "max_abs_diff_ndcg_at_10": worst["ndcg"],
        "max_abs_diff_recall_at_10": worst["recall"],
        "agree": bool(max(worst.values()) <= 1e-6),
    }), flush=True)


def recsys(export_dir, n_jobs):
    metrics(export_dir)
    speed(export_dir, n_jobs)
