"""dask.distributed (and Ray, if it is installed) on the workloads of
`cargo bench --features cluster --bench cluster`, on one machine with 2
worker processes of one thread each.

- 1,000,000 trivial tasks (`x * x`), sent in batches of 1,000 as RLTK's
  remote mode sends them (one remote call per batch), median of 3;
- one task's round trip with idle workers: submit one call and wait for
  its result, median of 1,000 (dask), 200 (Ray);
- from the client's start (connecting to a running cluster) to its first
  result, median of 10.

Prints one JSON object per tool as its last lines:
{"tool":"dask.distributed","version":…,"items_per_s":…,"round_trip_ms":…,"first_result_ms":…}
"""

import json
import statistics
import sys
import time


def square_batch(xs):
    return [x * x for x in xs]


def square(x):
    return x * x


BATCH = 1_000
ITEMS = 1_000_000


def batches():
    return [list(range(i, min(i + BATCH, ITEMS))) for i in range(0, ITEMS, BATCH)]


def check(results):
    flat = [y for batch in results for y in batch]
    assert len(flat) == ITEMS and flat[12345] == 12345 * 12345


def dask_run():
    import distributed
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    client.gather(client.map(square_batch, batches()[:10]))  # warm-up
    rates = []
    for _ in range(3):
        work = batches()
        started = time.perf_counter()
        futures = client.map(square_batch, work, pure=False)
        check(client.gather(futures))
        rates.append(ITEMS / (time.perf_counter() - started))
        del futures
    trips = []
    for x in range(1_000):
        started = time.perf_counter()
        assert client.submit(square, x, pure=False).result() == x * x
        trips.append((time.perf_counter() - started) * 1e3)
    firsts = []
    for x in range(10):
        started = time.perf_counter()
        other = Client(cluster.scheduler_address)
        assert other.submit(square, x, pure=False).result() == x * x
        firsts.append((time.perf_counter() - started) * 1e3)
        other.close()
    client.close()
    cluster.close()
    return {
        "tool": "dask.distributed",
        "version": distributed.__version__,
        "items_per_s": round(statistics.median(rates)),
        "round_trip_ms": round(statistics.median(trips), 3),
        "first_result_ms": round(statistics.median(firsts), 2),
    }


def ray_run():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    remote_batch = ray.remote(square_batch)
    remote_one = ray.remote(square)
    ray.get([remote_batch.remote(b) for b in batches()[:10]])  # warm-up
    rates = []
    for _ in range(3):
        work = batches()
        started = time.perf_counter()
        check(ray.get([remote_batch.remote(b) for b in work]))
        rates.append(ITEMS / (time.perf_counter() - started))
    trips = []
    for x in range(200):
        started = time.perf_counter()
        assert ray.get(remote_one.remote(x)) == x * x
        trips.append((time.perf_counter() - started) * 1e3)
    ray.shutdown()
    # A client starting against a running cluster: `ray.init` of a new
    # driver is what that costs; measured as a fresh local start instead,
    # which is Ray's only mode here.
    firsts = []
    for x in range(3):
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        assert ray.get(ray.remote(square).remote(x)) == x * x
        firsts.append((time.perf_counter() - started) * 1e3)
        ray.shutdown()
    return {
        "tool": "Ray",
        "version": ray.__version__,
        "items_per_s": round(statistics.median(rates)),
        "round_trip_ms": round(statistics.median(trips), 3),
        "first_result_ms_cold_start": round(statistics.median(firsts), 1),
    }


if __name__ == "__main__":
    which = sys.argv[1:] or ["dask", "ray"]
    for tool in which:
        run = {"dask": dask_run, "ray": ray_run}[tool]
        try:
            row = run()
        except ImportError as e:
            row = {"tool": tool, "error": f"not installed: {e}"}
        row["workload"] = "cluster"
        print(json.dumps(row), flush=True)
