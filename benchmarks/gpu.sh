#!/usr/bin/env bash
# The benchmark suite in bf16 on one CUDA device, as one table (meant to take under 8 minutes
# on one H200; not yet run on a GPU).
#
#   bash benchmarks/gpu.sh [OUT_DIR]            # default OUT_DIR: runs/bench-gpu
#   bash benchmarks/gpu.sh --quick [OUT_DIR]    # default OUT_DIR: runs/bench-gpu-quick
#
# Runs the same scripts as `stacklab bench` (training step vs transformers, MoE layer vs a
# per-expert loop, rollout sampling vs transformers generate) with
# `--device cuda --dtype bfloat16`, GPU-sized settings, and a time limit per script. Degrades
# cleanly: no CUDA device is reported (exit status 2), a script that fails or runs past its
# limit is reported and skipped, and the table shows what ran (exit status 1 if any failed).
# Not run here: the RL step (its trainer path is CPU-only so far) and the integration-engine
# search (no GPU part).
#
# --quick checks the plumbing, not the speed: the same scripts with `--device cpu --dtype
# float32` and tiny sizes (two training cases at batch 2 x 32, three MoE grid points at 256
# tokens, sampling 4 rows x 16 tokens; one timed round each), no CUDA needed; under a minute
# on 2 CPU cores. tests/test_bench.py runs it. The table it prints has every script's rows,
# but its timings mean nothing.
#
# PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
if [[ ${1:-} == --quick ]]; then
    QUICK=1
    shift
fi
if [[ ${1:-} == -* ]]; then
    echo "usage: bash benchmarks/gpu.sh [--quick] [OUT_DIR]" >&2
    exit 64
fi
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ((QUICK)); then
    OUT=${1:-runs/bench-gpu-quick}
    DEVICE=cpu DTYPE=float32
    # name | time limit (s) | arguments
    BENCHES=(
        "train_step|300|benchmarks/train_step.py --quick --cases dense,moe8 --batch 2 --seq 32 --repeats 1"
        "moe_dispatch|300|benchmarks/moe_dispatch.py --quick --tokens 256 --repeats 1"
        "sampling|300|benchmarks/sampling.py --batch 4 --new-tokens 16 --check-tokens 8 --repeats 1"
    )
    echo "gpu.sh --quick: $DEVICE, $DTYPE, tiny sizes (checks the plumbing; the timings mean nothing)"
else
    OUT=${1:-runs/bench-gpu}
    DEVICE=cuda DTYPE=bfloat16
    BENCHES=(
        "train_step|150|benchmarks/train_step.py --batch 32 --seq 1024 --repeats 10 --no-memory"
        "moe_dispatch|60|benchmarks/moe_dispatch.py --tokens 32768"
        "sampling|150|benchmarks/sampling.py --batch 32 --new-tokens 256"
    )
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu.sh: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)); nothing to run (--quick runs the plumbing on CPU)" >&2
        exit 2
    fi
    "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
fi
mkdir -p "$OUT"

failed=()
ran=()
for entry in "${BENCHES[@]}"; do
    IFS='|' read -r name limit args <<<"$entry"
    echo "== $name" >&2
    rm -f "$OUT/$name.json"
    # shellcheck disable=SC2086
    if timeout "$limit" "$PY" $args --device "$DEVICE" --dtype "$DTYPE" --json "$OUT/$name.json" \
        >"$OUT/$name.log" 2>&1 && [[ -s $OUT/$name.json ]]; then
        ran+=("$name")
    else
        echo "gpu.sh: $name failed or ran past ${limit} s (log: $OUT/$name.log):" >&2
        tail -n 5 "$OUT/$name.log" >&2
        failed+=("$name")
        rm -f "$OUT/$name.json"
    fi
done
"$PY" - "$OUT" "${ran[@]}" <<'PY'
import json, sys
from pathlib import Path
from stacklab.bench import markdown_table
rows = []
for name in sys.argv[2:]:
    rows += json.loads((Path(sys.argv[1]) / f"{name}.json").read_text()).get("table", [])
print(markdown_table(rows), end="")
PY
if ((${#failed[@]})); then
    echo "gpu.sh: not measured: ${failed[*]}" >&2
    exit 1
fi
