"""An installed stacklab carries what it needs: the wheel ships the built-in recipes, rounds
and contributions, and what it does not ship (benchmarks/) fails with a clear message.

`.ci/wheel.sh` goes further: it installs the wheel into a fresh venv and runs a round with it.
"""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stacklab import bench
from stacklab.builtin import BUILTIN_DIR, CONTRIBUTIONS_DIR, RECIPES_DIR, ROUNDS_DIR
from stacklab.errors import StacklabError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_builtin_files(tmp_path: Path) -> None:
    # Built from a copy, so the checkout gets no build/ and no stale build/lib file ships.
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree)
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        check=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("stacklab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    builtin = [p for d in (RECIPES_DIR, ROUNDS_DIR, CONTRIBUTIONS_DIR) for p in d.glob("*.yaml")]
    assert {"tiny.yaml", "demo.yaml", "muon.yaml"} <= {p.name for p in builtin}
    missing = [
        p.relative_to(BUILTIN_DIR) for p in builtin
        if f"stacklab/builtin/{p.relative_to(BUILTIN_DIR).as_posix()}" not in names
    ]  # fmt: skip
    assert missing == []


def test_bench_outside_a_checkout_names_what_it_looked_for(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path / "benchmarks")
    message = f"the benchmark suite runs from a source checkout: no {tmp_path / 'benchmarks'}"
    with pytest.raises(StacklabError, match=f"^{re.escape(message)}$"):
        bench.run_suite(quick=True)
