"""The Ray executor on a local Ray instance: same outcomes and decisions as the local pool.

One small Ray instance (2 CPUs, loopback only, no dashboard, usage stats and token auth off)
serves the whole module. Its workers start in a scratch folder, not the test's, so a path
that is only right relative to the coordinator's working directory shows up as wrong.

Skipped when Ray is not installed, unless STACKLAB_REQUIRE_RAY=1 (CI with the extra), where a
missing Ray fails the module instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from integrate_sim.scenarios import small, write_round
from integrate_sim.trainer_repo import make_repo
from integrate_sim.trainer_repo import write_round as write_git_round
from stacklab.errors import StacklabError
from stacklab.integrate.engine import integrate
from stacklab.integrate.round import RayExecutor, load_round
from stacklab.integrate.runners import Job, LocalPool, Outcome, RayPool, make_executor
from test_integrate_engine import WRITES, job, py_runner

pytestmark = pytest.mark.slow  # every test starts a Ray cluster (seconds)

if os.environ.get("STACKLAB_REQUIRE_RAY") == "1":
    try:
        import ray
    except ImportError as exc:
        pytest.fail(f"STACKLAB_REQUIRE_RAY=1 but Ray does not import: {exc}", pytrace=False)
else:
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install ray")

# Ray's own settings for a sandbox: no usage report, no token file written to $HOME.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module", autouse=True)
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A 2-CPU local Ray instance for the module, started from a scratch folder."""
    if ray.is_initialized():  # pragma: no cover - someone else's instance
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in RAY_ENV.items():
            mp.setenv(name, value)
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.chdir(tmp_path_factory.mktemp("ray-workers-start-here"))
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            object_store_memory=80 * 1024**2,  # Ray's minimum is 75 MiB; outcomes are tiny
            _node_ip_address="127.0.0.1",  # loopback only: no network needed, none exposed
        )
    try:
        yield
    finally:
        ray.shutdown()


def metrics_by_key(outcomes: list[Outcome]) -> dict[str, dict[str, float] | None]:
    return {o.key: o.metrics for o in outcomes}


def test_ray_pool_gives_the_local_pool_outcomes(tmp_path: Path) -> None:
    runner = py_runner(tmp_path, WRITES)
    specs = [(f"k{i}", 0.5 * i, i) for i in range(4)]
    local = list(LocalPool(2).run(runner, [job(tmp_path / "local", k, x, s) for k, x, s in specs]))
    jobs = [job(tmp_path / "ray", k, x, s) for k, x, s in specs]
    remote = list(RayPool(None).run(runner, jobs))
    assert all(o.error is None for o in local + remote), [o.error for o in local + remote]
    expected = {"k0": {"q": 0.0}, "k1": {"q": 6.0}, "k2": {"q": 12.0}, "k3": {"q": 18.0}}
    assert metrics_by_key(remote) == metrics_by_key(local) == expected
    for j in jobs:  # the run folders are where the coordinator asked, finished and whole
        assert (j.run_dir / "stdout.log").read_text() == "trained\n"
    assert sorted(p.name for p in (tmp_path / "ray" / "runs").iterdir()) == ["k0", "k1", "k2", "k3"]
    assert list(RayPool(None).run(runner, [])) == []


def test_relative_paths_mean_the_coordinators_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out runs/x` and a round file's folder are relative to where the engine runs."""
    code = "import json, os, sys; json.dump({'q': float(os.path.exists('marker'))}, open(sys.argv[3] + '/metrics.json', 'w'))"  # noqa: E501
    (tmp_path / "marker").touch()
    runner = dataclasses.replace(py_runner(tmp_path, code), cwd=Path("."))
    monkeypatch.chdir(tmp_path)
    outs = list(RayPool(None).run(runner, [Job("rel", {"x": 1}, 0, Path("runs") / "rel")]))
    assert [(o.key, o.metrics, o.error) for o in outs] == [("rel", {"q": 1.0}, None)]
    assert (tmp_path / "runs" / "rel" / "metrics.json").is_file()


FAILS_BY_SEED = """
import json, sys
seed = int(sys.argv[2])
if seed == 1:
    print("bad lr", file=sys.stderr)
    sys.exit(3)
if seed == 2:
    sys.exit(0)  # no metrics.json
json.dump({"q": 1}, open(sys.argv[3] + "/metrics.json", "w"))
"""


def test_failing_runs_come_back_as_failed_outcomes(tmp_path: Path) -> None:
    runner = py_runner(tmp_path, FAILS_BY_SEED)
    jobs = [job(tmp_path, f"s{seed}", 1.0, seed) for seed in range(3)]
    (tmp_path / "not-a-folder").write_text("")  # the task itself raises: cannot make the run dir
    jobs.append(Job("broken", {"x": 1}, 0, tmp_path / "not-a-folder" / "broken"))
    outs = {o.key: o for o in RayPool(None).run(runner, jobs)}
    assert set(outs) == {"s0", "s1", "s2", "broken"}
    assert outs["s0"].metrics == {"q": 1.0} and outs["s0"].error is None
    expected = {
        "s1": r"^exit status 3; stderr ends: bad lr \(logs: .*s1\.failed\)",
        "s2": r"^the runner wrote no metrics\.json",
        "broken": r"^ray task failed: .*FileExistsError",
    }
    for key, pattern in expected.items():
        out = outs[key]
        assert out.metrics is None and out.error is not None
        assert re.search(pattern, out.error, re.DOTALL), out.error
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["s0", "s1.failed", "s2.failed"]


SLEEPS_ON_SEED_1 = """
import json, os, subprocess, sys, time
if sys.argv[2] == "1":  # a trainer that trains in a child process, as launchers do
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[3] + "/../trainer.pid", "w").write(str(child.pid))
    child.wait()
json.dump({"q": 1}, open(sys.argv[3] + "/metrics.json", "w"))
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped training


def wait_for(check: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def test_stopping_the_coordinator_kills_running_trainers(tmp_path: Path) -> None:
    """Ctrl-C (or any exception) in the coordinator must not leave a trainer running.

    Ray's forced cancel kills the task's worker and its direct child, but not the trainer's
    own children; the task must kill the trainer's whole process group, as LocalPool does.
    """
    runner = py_runner(tmp_path, SLEEPS_ON_SEED_1)
    jobs = [job(tmp_path, "quick", 1.0, 0), job(tmp_path, "slow", 1.0, 1)]
    outcomes = RayPool(None).run(runner, jobs)
    first = next(outcomes)
    assert (first.key, first.metrics) == ("quick", {"q": 1.0})
    pid_file = tmp_path / "runs" / "trainer.pid"
    assert wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 20)
    pid = int(pid_file.read_text())
    assert alive(pid)
    start = time.monotonic()
    try:
        outcomes.close()  # what a KeyboardInterrupt in the coordinator does to the generator
        # The trainer would sleep 120 s: dying within 60 s can only be the cancellation; the
        # margin is for a loaded machine (30 s was once too short with other jobs running).
        assert wait_for(lambda: not alive(pid), 60), "the trainer outlived its cancelled task"
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # when failing, do not leave it running either
    assert time.monotonic() - start < 70
    # The stopped run failed like any other, its logs kept; no temporary folder is left.
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["quick", "slow.failed", "trainer.pid"]
    assert (runs / "slow.failed" / "recipe.yaml").is_file()


def test_a_ray_client_address_needs_the_client_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray://` needs grpcio (ray[client]): say so when the round starts, not at its first batch."""
    spec = RayExecutor(kind="ray", address="ray://head:10001", cpus_per_run=2)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "grpc" else find_spec(name, *a),
    )
    with pytest.raises(StacklabError, match=r"ray://head:10001 .* pip install 'ray\[client\]'"):
        make_executor(spec, 1)
    monkeypatch.undo()
    assert make_executor(RayExecutor(kind="ray", address="head:6379"), 1) == RayPool("head:6379")
    if find_spec("grpc") is not None:
        assert make_executor(spec, 1) == RayPool("ray://head:10001", 2.0)


def decision_without_paths(decision: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in decision.items() if k != "round_file"}


def test_a_round_on_ray_decides_as_on_the_local_pool(tmp_path: Path) -> None:
    rounds = {
        kind: write_round(
            tmp_path / kind, small(), budget=40, seeds=2, confirm_seeds=2, executor=executor
        )
        for kind, executor in [("local", {"kind": "local", "workers": 2}), ("ray", {"kind": "ray"})]
    }
    assert isinstance(make_executor(load_round(rounds["ray"]).spec.executor, 1), RayPool)
    decisions = {}
    for kind, round_file in rounds.items():
        result = integrate(
            round_file, tmp_path / f"out-{kind}", console=Console(file=io.StringIO())
        )
        decisions[kind] = json.loads((tmp_path / f"out-{kind}" / "decision.json").read_text())
        assert decisions[kind] == result.decision.model_dump(mode="json")
    local, remote = decisions["local"], decisions["ray"]
    assert remote["runs"]["failed"] == 0 and remote["runs"]["executed"] > 10
    assert {"alpha", "beta"} <= set(remote["selected"]) and "delta" not in remote["selected"]
    assert decision_without_paths(remote) == decision_without_paths(local)


def test_a_git_round_on_ray_decides_as_on_the_local_pool(tmp_path: Path) -> None:
    """Contributions as branches and a TOML baseline: the Ray tasks run in the exported trees."""
    repo = make_repo(tmp_path / "trainer")
    decisions = {}
    for kind, executor in [("local", "{kind: local, workers: 2}"), ("ray", "{kind: ray}")]:
        round_file = write_git_round(tmp_path / kind, repo, budget=60, executor=executor)
        integrate(round_file, tmp_path / f"out-{kind}", console=Console(file=io.StringIO()))
        decisions[kind] = json.loads((tmp_path / f"out-{kind}" / "decision.json").read_text())
    local, remote = decisions["local"], decisions["ray"]
    assert remote["runs"]["failed"] == 0 and remote["selected"] == ["gain", "gelu", "lr"]
    assert decision_without_paths(remote) == decision_without_paths(local)


def test_a_ladder_on_ray_decides_as_on_the_local_pool(tmp_path: Path) -> None:
    """A round with scale rungs (given costs, so both split the budget alike)."""
    rungs = [
        {"name": "s", "patch": {"model.depth": 2}},
        {"name": "m", "patch": {"model.depth": 4}, "cost": 2},
    ]
    decisions = {}
    for kind, executor in [("local", {"kind": "local", "workers": 2}), ("ray", {"kind": "ray"})]:
        round_file = write_round(
            tmp_path / kind, small(), budget=100, seeds=2, confirm_seeds=2, executor=executor,
            scales=rungs,
        )  # fmt: skip
        integrate(round_file, tmp_path / f"out-{kind}", console=Console(file=io.StringIO()))
        decisions[kind] = json.loads((tmp_path / f"out-{kind}" / "decision.json").read_text())
    local, remote = decisions["local"], decisions["ray"]
    assert remote["runs"]["failed"] == 0
    assert [r["runs"] > 0 for r in remote["ladder"]["rungs"]] == [True, True]
    assert {d["rung"] for d in remote["decisions"]} >= {"m"}
    assert decision_without_paths(remote) == decision_without_paths(local)
