"""blllib's Pipeline on the workload of `cargo bench --bench pipeline`: a
stateless square, a windowed(3) difference (blllib's "conditionally
stateless" with k = 3), a stateful accumulator. Prints one JSON line per
variant: items/s (median of --reps runs, from the first item asked for to
the last output), outputs received, and whether the output equals the
sequential result. Usage: pipeline_peers.py [--items N] [--reps N]."""

import argparse
import json
import statistics
import time


class Square:
    stateful = False
    batch_size = 100

    def __call__(self, x):
        return x * x


class Window3Diff:
    stateful = 3
    batch_size = 100

    def __call__(self, window):
        x, _, z = window
        return z - x


class Accumulator:
    # A batch at least this large: smaller ones drop items (blllib 1.0.4).
    batch_size = 1000

    def __init__(self):
        self.acc = 0

    def __call__(self, x):
        self.acc += x
        return self.acc


def expected(n):
    sums, acc = [], 0
    squares = [x * x for x in range(n)]
    for i in range(2, n):
        acc += squares[i] - squares[i - 2]
        sums.append(acc)
    return sums


def run(kind, n):
    import blllib

    stages = [Square(), Window3Diff(), Accumulator()]
    # n_cpu=3: a pool of 2 for the parallel stages, on 2 cores.
    pipeline = blllib.Pipeline(stages, n_cpu=3) if kind == "Pipeline" else blllib.SequentialPipeline(stages)
    start = time.perf_counter()
    out = list(pipeline.apply(range(n)))
    elapsed = time.perf_counter() - start
    # Not closed: blllib's close() hangs after full consumption.
    return n / elapsed, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    want = expected(args.items)
    for kind in ["Pipeline", "SequentialPipeline"]:
        tool = f"blllib {kind}"
        try:
            rates, exact, outputs = [], True, 0
            for _ in range(args.reps):
                rate, out = run(kind, args.items)
                rates.append(rate)
                exact = exact and out == want
                outputs = len(out)
            record = {"tool": tool, "workload": "pipeline", "items_per_s": round(statistics.median(rates)),
                      "outputs": outputs, "expected_outputs": len(want), "exact": exact, "n": args.items}
        except Exception as e:  # a peer that fails is reported, not fatal
            record = {"tool": tool, "workload": "pipeline", "error": repr(e)}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
