"""The Python peers on the workloads of benches/compare.

Run by run.sh inside its virtual environment; prints one JSON object per
measurement. Usage: peers.py WORKLOAD [ARGS]; workloads: throughput,
round_trip, isolated, model_share, recsys EXPORT_DIR N_JOBS.
"""

import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor


def emit(**fields):
    print(json.dumps(fields), flush=True)


def add_one(x):
    return x + 1


def model_add(model, x):
    return x + model["one"]


# ---------------------------------------------------------------- throughput
def throughput():
    n = 100_000
    xs = list(range(n))
    with ProcessPoolExecutor(2, mp.get_context("fork")) as ex:
        list(ex.map(add_one, xs[:10_000], chunksize=1000))
        rates = []
        for _ in range(3):
            t = time.perf_counter()
            out = list(ex.map(add_one, xs, chunksize=1000))
            rates.append(n / (time.perf_counter() - t))
            assert out[-1] == n
    emit(tool="ProcessPoolExecutor (fork, chunksize 1000)", workload="throughput", tasks_per_s=round(statistics.median(rates)))

    import joblib

    with joblib.Parallel(n_jobs=2) as par:
        par(joblib.delayed(add_one)(x) for x in xs[:10_000])
        rates = []
        for _ in range(3):
            t = time.perf_counter()
            out = par(joblib.delayed(add_one)(x) for x in xs)
            rates.append(n / (time.perf_counter() - t))
            assert out[-1] == n
    emit(tool=f"joblib {joblib.__version__} (loky, auto batching)", workload="throughput", tasks_per_s=round(statistics.median(rates)))

    try:
        import lenskit
        from lenskit.parallel import invoker
    except ImportError as e:
        emit(tool="LensKit invoker", workload="throughput", error=f"not installed: {e}")
        return
    m = 20_000
    with invoker({"one": 1}, model_add, 2) as inv:
        list(inv.map(range(100)))
        t = time.perf_counter()
        out = list(inv.map(range(m)))
        rate = m / (time.perf_counter() - t)
        assert out[-1] == m
    emit(tool=f"LensKit {lenskit.__version__} invoker", workload="throughput", tasks_per_s=round(rate))


# ---------------------------------------------------------------- round trip
def round_trip():
    with ProcessPoolExecutor(2, mp.get_context("fork")) as ex:
        ex.submit(add_one, 0).result()
        trips = []
        for x in range(500):
            time.sleep(0.001)
            t = time.perf_counter()
            assert ex.submit(add_one, x).result() == x + 1
            trips.append((time.perf_counter() - t) * 1e6)
    trips.sort()
    emit(tool="ProcessPoolExecutor (fork)", workload="round_trip", median_us=round(statistics.median(trips), 1), p99_us=round(trips[int(len(trips) * 0.99) - 1], 1))


# ---------------------------------------------------------------- isolated call
def _child(conn, x):
    conn.send(x + 1)
    conn.close()


def isolated():
    for method, calls in (("fork", 100), ("forkserver", 50), ("spawn", 20)):
        ctx = mp.get_context(method)
        times = []
        for x in range(calls + 2):
            t = time.perf_counter()
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child, args=(child, x))
            p.start()
            assert parent.recv() == x + 1
            p.join()
            if x >= 2:
                times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        emit(tool=f"multiprocessing {method} Process", workload="isolated", median_ms=round(statistics.median(times), 3), p99_ms=round(times[max(int(len(times) * 0.99) - 1, 0)], 3))


# ---------------------------------------------------------------- model share
def _pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            out.append(c)
            todo.append(c)
    return out


def _sum_and_hold(model, i):
    s = float(model.sum(dtype="float64"))
    time.sleep(1.0)
    return s


class _PssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = False

    def run(self):
        me = os.getpid()
        while not self.stop:
            pss = sum(_pss_kib(p) for p in _descendants(me))
            self.peak = max(self.peak, pss)
            time.sleep(0.1)


def model_share():
    import numpy as np

    def run(tool, start_pool, run_tasks):
        model = np.ones(2**28, dtype=np.float32)
        sampler = _PssSampler()
        t = time.perf_counter()
        handle = start_pool(model)
        sampler.start()
        first_ms = None
        try:
            for r in run_tasks(handle, model):
                if first_ms is None:
                    first_ms = (time.perf_counter() - t) * 1e3
                assert r == 2**28
        finally:
            sampler.stop = True
            sampler.join()
        emit(tool=tool, workload="model_share", first_result_ms=round(first_ms, 1), workers_pss_mib=round(sampler.peak / 1024, 1))

    import joblib

    def joblib_tasks(par, model):
        return par(joblib.delayed(_sum_and_hold)(model, i) for i in range(4))

    par = joblib.Parallel(n_jobs=4, max_nbytes="1M")
    run(f"joblib {joblib.__version__} (memmapping)", lambda m: par, joblib_tasks)

    try:
        import lenskit
        from lenskit.parallel import invoker
    except ImportError as e:
        emit(tool="LensKit invoker", workload="model_share", error=f"not installed: {e}")
        return
    holder = {}

    def lk_start(model):
        holder["inv"] = invoker(model, _sum_and_hold, 4)
        return holder["inv"]

    def lk_tasks(inv, model):
        try:
            yield from inv.map(range(4))
        finally:
            inv.shutdown()

    run(f"LensKit {lenskit.__version__} invoker", lk_start, lk_tasks)


if __name__ == "__main__":
    workload = sys.argv[1]
    if workload == "recsys":
        from recsys_lenskit import recsys

        recsys(sys.argv[2], int(sys.argv[3]))
    else:
        {"throughput": throughput, "round_trip": round_trip, "isolated": isolated, "model_share": model_share}[workload]()
