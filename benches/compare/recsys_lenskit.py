"""LensKit 2025.8's batch recommend on a split exported by
`examples/recsys_eval --export DIR`: implicit ALS with the example's
settings (32 factors, 10 epochs), top-10 for every test user, timed with 1
job and with N jobs; nDCG@10 computed exactly as the example does."""

import json
import math
import time

import pandas as pd


def ndcg_at(ranked, relevant, k=10):
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(r + 2) for r, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(relevant))))
    return dcg / ideal


def recsys(export_dir, n_jobs):
    import lenskit
    from lenskit.als import ImplicitMFScorer
    from lenskit.batch import recommend
    from lenskit.data import from_interactions_df
    from lenskit.pipeline import topn_pipeline

    train = pd.read_csv(f"{export_dir}/train.csv")
    test = pd.read_csv(f"{export_dir}/test.csv")
    relevant = {u: set(g["item"]) for u, g in test.groupby("user")}
    users = sorted(relevant)
    data = from_interactions_df(train, user_col="user", item_col="item", rating_col="rating")
    pipe = topn_pipeline(ImplicitMFScorer(embedding_size=32, epochs=10), n=10)
    t = time.perf_counter()
    pipe.train(data)
    train_s = time.perf_counter() - t
    rates = {}
    recs = None
    for jobs in (1, n_jobs):
        t = time.perf_counter()
        recs = recommend(pipe, users, n=10, n_jobs=jobs)
        rates[jobs] = len(users) / (time.perf_counter() - t)
    scores = []
    for key, items in recs:
        user = getattr(key, "user_id", key[0] if isinstance(key, tuple) else key)
        scores.append(ndcg_at(list(items.ids()), relevant.get(int(user), set())))
    print(json.dumps({
        "tool": f"LensKit {lenskit.__version__} batch.recommend (ImplicitMF)",
        "workload": "recsys",
        "n_jobs": n_jobs,
        "users_per_s": round(rates[n_jobs]),
        "users_per_s_1_job": round(rates[1]),
        "ndcg_at_10": round(sum(scores) / max(len(scores), 1), 5),
        "train_s": round(train_s, 2),
    }), flush=True)
