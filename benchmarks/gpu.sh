#!/usr/bin/env bash
# The benchmark suite in bf16 on one CUDA device, as one table (under 8 minutes on one H200).
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default OUT_DIR: runs/bench-gpu
#
# Runs the same scripts as `stacklab bench` (training step vs transformers, MoE layer vs a
# per-expert loop, rollout sampling vs transformers generate) with
# `--device cuda --dtype bfloat16`, GPU-sized settings, and a time limit per script. Degrades
# cleanly: no CUDA device, or a script whose package is missing, is reported and skipped, and
# the table shows what ran. Not run here: the RL step (its trainer path is CPU-only so far)
# and the integration-engine search (no GPU part).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-gpu}
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu.sh: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)); nothing to run" >&2
    exit 2
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"

# name | time limit (s) | arguments
BENCHES=(
    "train_step|150|benchmarks/train_step.py --batch 32 --seq 1024 --repeats 10 --no-memory"
    "moe_dispatch|60|benchmarks/moe_dispatch.py --tokens 32768"
    "sampling|150|benchmarks/sampling.py --batch 32 --new-tokens 256"
)
failed=()
for entry in "${BENCHES[@]}"; do
    IFS='|' read -r name limit args <<<"$entry"
    echo "== $name" >&2
    # shellcheck disable=SC2086
    if ! timeout "$limit" "$PY" $args --device cuda --dtype bfloat16 --json "$OUT/$name.json" \
        >"$OUT/$name.log" 2>&1; then
        echo "gpu.sh: $name failed or ran past ${limit} s (log: $OUT/$name.log):" >&2
        tail -n 5 "$OUT/$name.log" >&2
        failed+=("$name")
        rm -f "$OUT/$name.json"
    fi
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from stacklab.bench import markdown_table
rows = []
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    rows += json.loads(path.read_text()).get("table", [])
print(markdown_table(rows), end="")
PY
if ((${#failed[@]})); then
    echo "gpu.sh: not measured: ${failed[*]}" >&2
    exit 1
fi
