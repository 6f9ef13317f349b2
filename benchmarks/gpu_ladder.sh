#!/usr/bin/env bash
# A scale ladder on one CUDA device: benchmarks/ladder_gpu.yaml (the demo's techniques on
# depth 4 / 8 / 12) through `stacklab integrate`, then the transfer table from decision.json.
# Not yet run on a GPU. Resumable: run it again with the same OUT_DIR after a kill.
#
#   bash benchmarks/gpu_ladder.sh [OUT_DIR]      # default OUT_DIR: runs/ladder-gpu
#
# Exit status 2 when torch sees no CUDA device (the round would train on the CPU for days).
# PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == -* ]]; then
    echo "usage: bash benchmarks/gpu_ladder.sh [OUT_DIR]" >&2
    exit 64
fi
OUT=${1:-runs/ladder-gpu}
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_ladder.sh: no CUDA device visible to torch; nothing to run" >&2
    exit 2
fi
"$PY" -m stacklab.cli integrate benchmarks/ladder_gpu.yaml --out "$OUT"
"$PY" - "$OUT/decision.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rungs = [r["name"] for r in d["ladder"]["rungs"]]
print("| contribution | decision | " + " | ".join(rungs) + " | pattern |")
print("|---|---|" + "---|" * len(rungs) + "---|")
for x in d["decisions"]:
    cells = {e["rung"]: e for e in x["transfer"]["rungs"]}
    def cell(name):
        e = cells.get(name)
        if e is None:
            return "-"
        est, low, high = e["utility"]
        fmt = lambda v: "n/a" if v is None else f"{v:+.3g}"
        return f"{fmt(est)} [{fmt(low)}, {fmt(high)}] {e['verdict']}"
    row = " | ".join(cell(n) for n in rungs)
    print(f"| {x['id']} | {x['status']} at {x['rung']} | {row} | {x['transfer']['pattern']} |")
for a in d["ladder"]["agreement"]:
    print(f"Kendall's tau {a['from']} -> {a['to']}: {a['kendall_tau']} over {a['subsets']} recipes; "
          f"{a['verdicts_confirmed']} of {a['verdicts_compared']} verdicts confirmed")
PY
