"""`stacklab bench` gathers the scripts' tables and reports, never hides, a failed script."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stacklab import bench
from stacklab.errors import StacklabError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ("train_step", "moe_dispatch", "sampling")  # what benchmarks/gpu.sh runs

ROW = {
    "benchmark": "fake",
    "case": "c",
    "unit": "tokens/s",
    "ours": 1500.0,
    "peer": 1000.0,
    "peer_name": "hf",
    "ratio": 1.5,
    "goal": ">= 1.2x",
    "met": True,
    "note": "",
}


def _script(folder: Path, name: str, body: str) -> None:
    (folder / name).write_text(
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "out = args[args.index('--json') + 1]\n"
        "quick = '--quick' in args\n" + body
    )


def test_suite_runs_in_order_and_collects_rows(tmp_path: Path, monkeypatch) -> None:
    rows = repr([ROW, {**ROW, "case": "d", "met": False}])
    _script(
        tmp_path, "good.py", f"json.dump({{'table': {rows}, 'quick': quick}}, open(out, 'w'))\n"
    )
    _script(tmp_path, "crash.py", "sys.exit(3)\n")
    _script(tmp_path, "notable.py", "json.dump({'x': 1}, open(out, 'w'))\n")
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(
        bench,
        "SUITE",
        (
            bench.Benchmark("good", "good.py"),
            bench.Benchmark("crash", "crash.py"),
            bench.Benchmark("notable", "notable.py"),
        ),
    )
    got, failures = bench.run_suite(quick=True)
    assert [r["case"] for r in got] == ["c", "d"]
    assert failures == ["crash: exit status 3", "notable: no result table in its JSON ('table')"]
    got, failures = bench.run_suite(["good"])
    assert len(got) == 2 and failures == []
    with pytest.raises(StacklabError, match="unknown benchmark 'nope'; the benchmarks are: good"):
        bench.run_suite(["nope"])


def test_markdown_table() -> None:
    text = bench.markdown_table([ROW, {**ROW, "peer": None, "ratio": None, "met": None}])
    assert "| fake | c | tokens/s | 1,500 | 1,000 (hf) | 1.50× | >= 1.2x | yes |" in text
    assert "| fake | c | tokens/s | 1,500 |  |  | >= 1.2x |  |" in text


def test_every_suite_script_exists() -> None:
    for b in bench.SUITE:
        assert (bench.BENCH_DIR / b.script).is_file(), b.script


def test_engine_options_reach_the_engine_benchmark(tmp_path: Path, monkeypatch) -> None:
    """`stacklab bench --scenarios N --samplers S --calibration` replaces the suite's values
    in the engine benchmark's arguments, and passes them to no other script."""
    from stacklab.cli import main

    # Each fake script reports the arguments it got as its row's note.
    body = "json.dump({'table': [dict(ROW, note=' '.join(args))]}, open(out, 'w'))\n"
    _script(tmp_path, "record.py", f"ROW = {ROW!r}\n" + body)
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    engine = bench.Benchmark(
        "engine",
        "record.py",
        args=("--scenarios", "4", "--samplers", "nsga2"),
        threaded=False,
        options=("--scenarios", "--samplers", "--calibration"),
    )
    monkeypatch.setattr(bench, "SUITE", (bench.Benchmark("other", "record.py"), engine))

    options = {"--scenarios": 10, "--samplers": "nsga2,tpe", "--calibration": False}
    rows, failures = bench.run_suite(threads=1, options=options)
    assert failures == []
    other, got = (r["note"].split() for r in rows)
    assert "--scenarios" not in other and "--threads" in other
    assert got[got.index("--scenarios") + 1] == "10" and got.count("--scenarios") == 1
    assert got[got.index("--samplers") + 1] == "nsga2,tpe" and "--calibration" not in got
    assert "--threads" not in got  # the engine benchmark is not threaded

    out = tmp_path / "rows.json"
    argv = ["bench", "engine", "--scenarios", "20", "--samplers", "tpe", "--calibration"]
    assert main([*argv, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    got = row["note"].split()
    assert got[got.index("--scenarios") + 1] == "20" and got[got.index("--samplers") + 1] == "tpe"
    assert "--calibration" in got

    with pytest.raises(StacklabError, match="--scenarios applies to engine, which is not"):
        bench.run_suite(["other"], options={"--scenarios": 10})
    assert main(["bench", "other", "--samplers", "tpe"]) == 2


def test_suite_engine_search_takes_the_options() -> None:
    (engine,) = [b for b in bench.SUITE if b.name == "engine_search"]
    source = (bench.BENCH_DIR / engine.script).read_text()
    for flag in ("--scenarios", "--samplers", "--calibration"):
        assert flag in engine.options and f'"{flag}"' in source


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_dispatch_peer_computes_the_same_layer(monkeypatch) -> None:
    """The per-expert loop of benchmarks/moe_dispatch.py gives our MoE layer's output and
    gradients, and the check the script makes before timing sees a difference."""
    import torch

    from stacklab.model.config import MoEConfig
    from stacklab.model.moe import MoE

    moe_dispatch = _load_benchmark("moe_dispatch")
    for experts, top_k in ((8, 2), (16, 8)):
        torch.manual_seed(0)
        cfg = MoEConfig(enabled=True, num_experts=experts, top_k=top_k)
        moe = MoE(32, 16, cfg, init_std=0.02).train()
        x = torch.randn(64, 32, requires_grad=True)
        assert moe_dispatch.check_same(moe, x, moe_dispatch.TOLERANCE["float32"]) is None
    loop = moe_dispatch.loop_forward
    monkeypatch.setattr(moe_dispatch, "loop_forward", lambda moe, x: loop(moe, x) * 1.001)
    assert moe_dispatch.check_same(moe, x, 1e-5).startswith("output differs by")


@pytest.mark.slow
def test_gpu_sh_quick_runs_every_script_with_device_and_dtype(tmp_path: Path) -> None:
    """benchmarks/gpu.sh --quick: each script it calls takes --device/--dtype (here cpu,
    float32, tiny sizes) and gives its rows to the one table (~30 s on 2 cores)."""
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--quick", str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| benchmark |") :].splitlines()
    cases = {name: [r for r in table if r.startswith(f"| {name} |")] for name in SCRIPTS}
    assert {k: len(v) for k, v in cases.items()} == {
        "train_step": 2,
        "moe_dispatch": 3,
        "sampling": 1,
    }
    # Each script says it ran on the device and in the dtype gpu.sh asked for.
    train = json.loads((out / "train_step.json").read_text())["results"]
    assert {(r["device"], r["dtype"]) for r in train} == {("cpu", "float32")}
    sampling = json.loads((out / "sampling.json").read_text())
    assert (sampling["device"], sampling["dtype"]) == ("cpu", "float32")
    moe = json.loads((out / "moe_dispatch.json").read_text())["table"]
    assert all("float32 on cpu" in row["note"] for row in moe)
