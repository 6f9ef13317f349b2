#!/usr/bin/env bash
# CI: stacklab as a user installs it, not as the checkout runs it. Builds the wheel, installs it
# into a fresh venv outside the checkout, and from another directory validates the built-in
# recipes, loads the built-in round and runs a tiny integration round by built-in names: any
# file the package needs but does not ship fails here.
#
# Nothing is downloaded: the wheel builds with the repo venv's setuptools, and the fresh venv
# finds the dependencies (torch, ...) in the repo venv's site-packages through a .pth line. A
# path added that way is not a site dir, so the editable install's own .pth in it is not read
# and the checkout's src/ stays off sys.path (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=$repo/.venv/bin/python
tmp=$(mktemp -d "${TMPDIR:-/tmp}/stacklab-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
unset PYTHONPATH

# Build from a copy, so no build/ is left in the checkout and no stale build/lib file ships.
mkdir "$tmp/tree"
cp -r pyproject.toml README.md src "$tmp/tree/"
find "$tmp/tree" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$py" -m pip wheel "$tmp/tree" --no-deps --no-build-isolation -q -w "$tmp/dist"

"$py" -m venv "$tmp/venv"
vpy=$tmp/venv/bin/python
"$vpy" -m pip install -q --no-deps --no-index "$tmp"/dist/stacklab-*.whl
site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
site "$py" >"$(site "$vpy")/stacklab-ci-deps.pth"

mkdir "$tmp/work"
cd "$tmp/work"
"$vpy" - "$repo" <<'EOF'
import sys
from pathlib import Path

import stacklab
from stacklab.integrate.round import load_round

repo = Path(sys.argv[1]).resolve()
here = Path(stacklab.__file__).resolve()
assert here.is_relative_to(Path(sys.prefix).resolve()), f"stacklab imported from {here}"
assert repo / "src" not in [Path(p).resolve() for p in sys.path if p], sys.path
assert load_round("demo").ids == ["muon", "qk-norm", "wsd-schedule"]
print(f"wheel: stacklab from {here.parent}")
EOF
stacklab=$tmp/venv/bin/stacklab
for name in tiny tiny-moe tiny-baseline demo-baseline; do
  "$stacklab" recipe "$name" >/dev/null
done
if out=$("$stacklab" bench 2>&1); then
  echo "wheel: stacklab bench should refuse without benchmarks/" >&2
  exit 1
fi
grep -q "runs from a source checkout" <<<"$out" || { echo "$out" >&2; exit 1; }

# The demo's baseline shrunk to 3 pretraining steps (as tests/test_integrate_builtin.py does).
cat >nano.yaml <<'EOF'
base: demo-baseline
name: nano
data: {mixture: {token_budget: 40000, val_token_budget: 4000}}
tokenizer: {vocab_size: 384, train_chars: 60000}
pretrain: {steps: 3, batch_size: 2, ckpt_every: 3}
eval: {task_problems: 4}
EOF
cat >round.yaml <<'EOF'
baseline: nano.yaml
contributions: [muon, wsd-schedule]
objectives: [{metric: val_bpb, direction: min, weight: 1.0}]
seeds: 1
confirm_seeds: 1
budget: 10
runner: {kind: builtin, cache_dir: cache, timeout_s: 300}
executor: {kind: local, workers: 2}
EOF
"$stacklab" integrate round.yaml --out out >/dev/null
"$vpy" -c '
import json
d = json.load(open("out/decision.json"))
assert d["runs"]["failed"] == 0 and d["runs"]["executed"] >= 4, d["runs"]
assert {row["id"] for row in d["decisions"]} == {"muon", "wsd-schedule"}
'
echo "wheel: ok"
