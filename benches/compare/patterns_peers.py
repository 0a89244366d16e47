"""The seeds' streaming patterns in their Python peers, on the workloads of
`cargo bench --bench patterns`: pyrallel's ParallelProcessor and MapReduce,
and toolz's parallel fold over multiprocessing.Pool(2).map. Prints one JSON
line per tool and workload (medians of --reps runs, end to end: create, run,
join). Usage: patterns_peers.py [--reps N]."""

import argparse
import json
import multiprocessing as mp
import operator
import statistics
import time


def heavy_calculation(x, y):
    return x * x, y + 5


def identity(x):
    return x


def add(a, b):
    return a + b


def processor_rate(n):
    import pyrallel

    result = []

    def output_handler(r1, r2):
        result.append(r1 if r1 > r2 else r2)

    start = time.perf_counter()
    pp = pyrallel.ParallelProcessor(2, mapper=heavy_calculation, collector=output_handler)
    pp.start()
    for i in range(n):
        pp.add_task(i, i + 1)
    pp.task_done()
    pp.join()
    elapsed = time.perf_counter() - start
    assert len(result) == n
    return n / elapsed


def map_reduce_rate(n):
    import pyrallel

    start = time.perf_counter()
    mr = pyrallel.MapReduce(2, identity, operator.add)
    mr.start()
    for i in range(n):
        mr.add_task(i)
    mr.task_done()
    total = mr.join()
    elapsed = time.perf_counter() - start
    assert total == n * (n - 1) // 2, total
    return n / elapsed


def fold_rate(n):
    from toolz.sandbox.parallel import fold

    start = time.perf_counter()
    with mp.Pool(2) as pool:
        total = fold(add, range(n), 0, map=pool.map, chunksize=100_000, combine=add)
    elapsed = time.perf_counter() - start
    assert total == n * (n - 1) // 2
    return n / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    runs = [
        ("pyrallel ParallelProcessor", "processor", "tasks_per_s", processor_rate, 100_000),
        ("pyrallel MapReduce", "map_reduce", "items_per_s", map_reduce_rate, 100_000),
        ("toolz fold over Pool(2).map", "fold", "items_per_s", fold_rate, 10_000_000),
    ]
    for tool, workload, field, run, n in runs:
        try:
            rate = statistics.median(run(n) for _ in range(args.reps))
            print(json.dumps({"tool": tool, "workload": workload, field: round(rate), "n": n}), flush=True)
        except Exception as e:  # a peer that fails is reported, not fatal
            print(json.dumps({"tool": tool, "workload": workload, "error": repr(e)}), flush=True)


if __name__ == "__main__":
    main()
