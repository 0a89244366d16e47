#!/usr/bin/env bash
# procpool and its peers on the same workloads, side by side. Writes
# benches/results/raw.jsonl, results.md and chart.png.
#
# Needs cargo, python3 with venv, and the Python package index (the peers'
# virtual environment holds LensKit 2025.8.1 and PyTorch: about 6 GB, once).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benches/results
raw="$out/raw.jsonl"
venv="${PROCPOOL_PEERS_VENV:-$HOME/.cache/procpool-peers-venv}"
mkdir -p "$out"
: > "$raw"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# LensKit 2025.8 is the last line with a process-pool invoker.
"$venv/bin/pip" install -q "lenskit==2025.8.1" joblib matplotlib pyrallel.lib toolz blllib==1.0.4

echo "== procpool" >&2
cargo build -q --release --benches --examples
for bench in throughput run_sp model_share patterns pipeline; do
    cargo bench -q --bench "$bench" | tail -n 1 >> "$raw"
done

echo "== procspawn" >&2
(cd benches/compare/procspawn && cargo build -q --release)
benches/compare/procspawn/target/release/compare-procspawn 20000 >> "$raw"

echo "== Python peers" >&2
for workload in throughput round_trip isolated model_share; do
    if ! "$venv/bin/python" benches/compare/peers.py "$workload" >> "$raw"; then
        echo "{\"tool\":\"Python peers\",\"workload\":\"$workload\",\"error\":\"the run failed\"}" >> "$raw"
    fi
done

echo "== pyrallel and toolz on the streaming patterns" >&2
if ! "$venv/bin/python" benches/compare/patterns_peers.py >> "$raw"; then
    echo '{"tool":"pyrallel and toolz","workload":"processor","error":"the run failed"}' >> "$raw"
fi

echo "== blllib on the pipeline" >&2
if ! "$venv/bin/python" benches/compare/pipeline_peers.py >> "$raw"; then
    echo '{"tool":"blllib","workload":"pipeline","error":"the run failed"}' >> "$raw"
fi

echo "== cluster mode: procpool on a local nats-server, then dask.distributed and Ray" >&2
if command -v nats-server >/dev/null 2>&1; then
    cargo bench -q --features cluster --bench cluster | tail -n 1 >> "$raw"
else
    echo '{"tool":"procpool cluster","workload":"cluster","error":"nats-server is not installed"}' >> "$raw"
fi
"$venv/bin/pip" install -q "dask[distributed]"
# Ray only where it installs (it has no wheels for every platform).
"$venv/bin/pip" install -q ray || echo "Ray did not install; left out" >&2
if ! "$venv/bin/python" benches/compare/cluster_peers.py >> "$raw"; then
    echo '{"tool":"dask.distributed and Ray","workload":"cluster","error":"the run failed"}' >> "$raw"
fi

echo "== recommender experiment, ML-1M-shaped folds, then LensKit on them" >&2
export_dir=$(mktemp -d)
trap 'rm -rf "$export_dir"' EXIT
cargo run -q --release --example recsys_eval -- --preset ml-1m --jobs 2 \
    --export "$export_dir" --out "$export_dir" | tail -n 1 >> "$raw"
(cd benches/compare && "$venv/bin/python" peers.py recsys "$export_dir" 2) >> "$raw"

"$venv/bin/python" benches/compare/report.py "$raw" "$out"
echo "wrote $out/results.md and $out/chart.png" >&2
