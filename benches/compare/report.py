"""Turns the JSON lines run.sh collected into benches/results/results.md
and benches/results/chart.png. Usage: report.py RESULTS.jsonl OUT_DIR."""

import json
import os
import platform
import subprocess
import sys


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} × {cpu}, {mem_gib:.0f} GiB, Linux {platform.release()}, {rustc}, Python {platform.python_version()}"


def normalise(rec):
    """procpool's own benchmark lines use `bench`; turn them into rows."""
    if "bench" in rec:
        b = rec["bench"]
        if b == "throughput":
            return [
                {"tool": "procpool", "workload": "throughput", "tasks_per_s": rec["tasks_per_s"]},
                {"tool": "procpool", "workload": "round_trip", "median_us": rec["round_trip_us"], "p99_us": rec["round_trip_p99_us"]},
            ]
        if b == "run_sp":
            return [{"tool": "procpool run_sp", "workload": "isolated", "median_ms": rec["median_ms"], "p99_ms": rec["p99_ms"]}]
        if b == "model_share":
            return [{"tool": "procpool", "workload": "model_share", "first_result_ms": rec["first_result_ms"], "workers_pss_mib": rec["workers_pss_mib"]}]
        if b == "patterns":
            return [
                {"tool": "procpool processor", "workload": "processor", "tasks_per_s": rec["processor_tasks_per_s"]},
                {"tool": "procpool map_reduce", "workload": "map_reduce", "items_per_s": rec["map_reduce_items_per_s"]},
                {"tool": "procpool fold on Processes(2)", "workload": "fold", "items_per_s": rec["fold_items_per_s_processes"]},
            ]
        if b == "pipeline":
            return [
                {"tool": "procpool pipeline", "workload": "pipeline", "items_per_s": rec["items_per_s"], "exact": True},
                {"tool": "procpool apply_sequential", "workload": "pipeline", "items_per_s": rec["sequential_items_per_s"], "exact": True},
            ]
        if b == "cluster":
            return [{"tool": "procpool cluster (local nats-server, 2 agents)", "workload": "cluster", "items_per_s": rec["items_per_s_2_agents"],
                     "round_trip_ms": rec["round_trip_ms"], "first_result_ms": rec["first_result_ms"]}]
        return []
    if "users_per_s_n_jobs" in rec:
        rows = [{
            "tool": f"procpool (examples/recsys_eval, {rec.get('best_algorithm', 'ALS')})", "workload": "recsys", "n_jobs": rec["n_jobs"],
            "users_per_s": rec["users_per_s_n_jobs"], "users_per_s_1_job": rec["users_per_s_1_job"], "ndcg_at_10": rec["ndcg_at_10"],
        }]
        for algo in rec.get("algorithms", []):
            if algo.get("failed") is None and algo["name"] == "item-knn":
                rows.append({"tool": "procpool (examples/recsys_eval, item-knn)", "workload": "recsys", "n_jobs": rec["n_jobs"],
                             "users_per_s": algo["users_per_s"], "ndcg_at_10": algo["ndcg_at_10"]["mean"]})
        return rows
    return [rec]


def cell(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:,}"
    return "—"


WORKLOADS = [
    ("throughput", "100,000 trivial tasks (`x + 1`), 2 workers", [("tasks_per_s", "tasks/s")]),
    ("round_trip", "one task alone, worker idle", [("median_us", "median µs"), ("p99_us", "p99 µs")]),
    ("isolated", "one isolated call of a trivial function", [("median_ms", "median ms"), ("p99_ms", "p99 ms")]),
    ("model_share", "1 GiB float32 model, 4 workers, each sums it", [("first_result_ms", "start → first result ms"), ("workers_pss_mib", "workers' PSS MiB")]),
    ("processor", "processor with a collector, trivial tasks added one by one, 2 workers", [("tasks_per_s", "tasks/s")]),
    ("map_reduce", "map-reduce sum, 2 workers", [("items_per_s", "items/s")]),
    ("fold", "fold of 10,000,000 integers by +, chunks of 100,000, 2 processes", [("items_per_s", "items/s")]),
    ("pipeline", "pipeline: stateless square → windowed(3) difference → stateful accumulator, 2 cores", [("items_per_s", "items/s"), ("exact", "every output, exact")]),
    ("cluster", "cluster mode on one machine, 2 worker processes: 1,000,000 trivial tasks in batches of 1,000; one task's round trip; a new client to its first result",
     [("items_per_s", "items/s"), ("round_trip_ms", "round trip ms"), ("first_result_ms", "first result ms"), ("first_result_ms_cold_start", "first result ms, cold start")]),
    ("recsys_metrics", "procpool's recommendations re-measured by LensKit's metric code", [("lists", "lists"), ("max_abs_diff_ndcg_at_10", "largest nDCG@10 difference"), ("max_abs_diff_recall_at_10", "largest recall@10 difference"), ("agree", "agree to 1e-6")]),
    ("recsys", "recommender scoring on the same ML-1M-shaped fold, top-10 per test user", [("n_jobs", "n_jobs"), ("users_per_s", "users/s"), ("users_per_s_1_job", "users/s, 1 job"), ("ndcg_at_10", "nDCG@10")]),
]


def main():
    src, out_dir = sys.argv[1], sys.argv[2]
    rows = []
    with open(src) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.extend(normalise(json.loads(line)))
    os.makedirs(out_dir, exist_ok=True)
    md = ["# procpool against its peers", "", f"Machine: {machine()}.", "",
          "Regenerate with `bash benches/compare/run.sh` (it builds procpool's benches, installs the Python peers into a virtual environment, and builds the procspawn comparison).", ""]
    for key, title, cols in WORKLOADS:
        group = [r for r in rows if r.get("workload") == key]
        if not group:
            continue
        md += [f"## {title}", "", "| tool | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
        for r in group:
            if "error" in r:
                md.append(f"| {r['tool']} | " + " | ".join(["—"] * len(cols)) + f" |  *({r['error']})*")
                continue
            md.append(f"| {r['tool']} | " + " | ".join(cell(r.get(c[0])) for c in cols) + " |")
        md.append("")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return
    panels = [("throughput", "tasks_per_s", "tasks/s (higher is better)"), ("round_trip", "median_us", "lone task µs (lower is better)"),
              ("isolated", "median_ms", "isolated call ms (lower is better)"), ("model_share", "first_result_ms", "1 GiB model: first result ms (lower is better)")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (key, field, label) in zip(axes.flat, panels):
        group = [r for r in rows if r.get("workload") == key and isinstance(r.get(field), (int, float))]
        ax.barh([r["tool"] for r in group], [r[field] for r in group], color=["#c0392b" if r["tool"].startswith("procpool") else "#7f8c8d" for r in group])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"procpool against its peers — {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "chart.png"), dpi=110)


if __name__ == "__main__":
    main()
