"""Rounds over a git repository and a TOML baseline, and runs that know which code made them.

The trainer is the stand-in of tests/integrate_sim/trainer_repo.py (stdlib only, milliseconds
a run): branches `gain`, `gelu` and `lr` help, `silu` conflicts textually with `gelu` and
hurts, `comment` changes no number.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from integrate_sim.trainer_repo import commit_on, edit, git, make_repo, write_round
from stacklab.integrate import gitrepo
from stacklab.integrate.engine import integrate
from stacklab.integrate.record import DecisionRecord, FilesCode
from stacklab.integrate.round import RoundError, load_round
from stacklab.integrate.store import RunStore
from stacklab.integrate.workspace import WorkspaceError


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def log_lines(log: Path) -> Counter[str]:
    return Counter(log.read_text().splitlines()) if log.exists() else Counter()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "trainer")


@pytest.fixture
def trainer_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "trained.log"
    monkeypatch.setenv("TRAINER_LOG", str(log))
    return log


def reasons(d: DecisionRecord) -> dict[str, str]:
    return {row.id: row.reason for row in d.decisions}


# --------------------------------------------------------------------------- a whole round


@pytest.mark.slow
def test_a_round_over_branches_decides_and_shows_the_code(
    tmp_path: Path, repo: Path, trainer_log: Path
) -> None:
    out = tmp_path / "out"
    d = integrate(write_round(tmp_path / "round", repo), out, console=quiet()).decision
    assert d.selected == ["gain", "gelu", "lr"]
    assert reasons(d)["silu"].startswith(
        "conflicts with gelu: both change model.py line 7 (a choice group)"
    )
    assert d.decision("comment").status == "shelved"
    # Which code: the base, each change's files and diffstat, and every run's tree.
    code = d.code
    assert code.base is not None and code.changes is not None
    assert code.base.ref == "main"
    assert code.base.commit == git(repo, "rev-parse", "main")
    assert code.changes["lr"].files == ["train.toml"]
    assert code.changes["gain"].insertions == 1 and "model.py" in code.changes["gain"].diffstat
    assert d.runs.stale == 0 and d.stale == {}
    # Every trained combination ran exactly once (the log names code and config).
    assert sum(log_lines(trainer_log).values()) == d.runs.executed
    assert max(log_lines(trainer_log).values()) == 1
    # The config each run read: TOML with its comments, lr patched by the `lr` branch's tree.
    for run_dir in (out / "runs").iterdir():
        text = (run_dir / "recipe.toml").read_text()
        assert text.startswith("# Stand-in trainer config (comments must survive patches)")
        assert "# learning rate multiplier" in text
    report = (out / "report.md").read_text()
    assert "| `gain` | `gain` (" in report and "| model.py | +1 -1 |" in report
    page = (out / "report.html").read_text()
    assert "<h2>Code</h2>" in page
    # The user's repository got no object from the merges, and its checkout is untouched.
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"


@pytest.mark.slow
def test_runs_execute_in_the_subsets_tree(tmp_path: Path, repo: Path, trainer_log: Path) -> None:
    """The command's working folder is the merged tree, also given as {tree}."""
    rnd_file = write_round(tmp_path / "round", repo)
    text = rnd_file.read_text().replace('{out}"}', '{out} {tree}"}')
    rnd_file.write_text(text)
    edit(
        repo,
        "train.py",
        "config_path, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]",
        "config_path, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]\n"
        "assert os.path.samefile(sys.argv[4], os.getcwd())",
    )
    git(repo, "commit", "-qam", "check the tree argument")
    for branch in ("gain", "gelu", "silu", "comment", "lr"):  # move every branch onto it
        git(repo, "checkout", "-q", branch)
        git(repo, "rebase", "-q", "main")
    git(repo, "checkout", "-q", "main")
    d = integrate(rnd_file, tmp_path / "out", console=quiet()).decision
    assert d.runs.failed == 0 and d.selected == ["gain", "gelu", "lr"]
    trees = {p.name for p in (tmp_path / "out" / "trees").iterdir()}
    runs = DecisionRecord.model_validate_json((tmp_path / "out" / "decision.json").read_text()).runs
    assert runs.executed > len(trees) > 5  # one export per tree, shared by its runs


# --------------------------------------------------------------------------- provenance


@pytest.mark.slow
def test_a_changed_line_reruns_what_it_can_affect_and_reuses_nothing_stale(
    tmp_path: Path, repo: Path, trainer_log: Path
) -> None:
    rnd_file = write_round(tmp_path / "round", repo)
    out = tmp_path / "out"
    first = integrate(rnd_file, out, console=quiet()).decision
    # One line on one branch: only subsets with `gain` can be affected.
    commit_on(repo, "gain", "model.py", "GAIN = 0.3", "GAIN = 0.31", start="gain")
    # A bad input on the second go is a one-line error, and what ran is kept.
    good = rnd_file.read_text()
    rnd_file.write_text(good.replace("base: main", "base: mian"))
    with pytest.raises(RoundError, match=r"round.yaml: base: no commit 'mian' in repository"):
        integrate(rnd_file, out, console=quiet())
    rnd_file.write_text(good)
    with RunStore(f"sqlite:///{out / 'runs.db'}", reset_stale=False) as store:
        assert len(store.runs(status="done")) == first.runs.executed
    second = integrate(rnd_file, out, console=quiet()).decision
    trained = log_lines(trainer_log)
    assert max(trained.values()) == 1  # no config and code trained twice: nothing re-run
    assert second.selected == first.selected
    assert second.runs.stale > 0
    (reason,) = second.stale
    assert reason.startswith("gain moved (") and " -> " in reason
    new = [line for line in trained if line.startswith("0.31 ")]
    assert len(new) >= second.runs.stale  # every stale run was trained again
    # Only runs of subsets with `gain` went stale: a stored run whose key is not what its
    # subset resolves to now was made by the old `gain`.
    rnd = load_round(rnd_file, out)
    back = {b: i for i, cid in enumerate(rnd.ids) for c, b in rnd.blind.items() if c == cid}
    with RunStore(f"sqlite:///{out / 'runs.db'}", reset_stale=False) as store:
        runs = store.runs()
    stale = [
        r
        for r in runs
        if rnd.workspace.resolve(frozenset(back[b] for b in r.subset)).run_hash != r.recipe_hash
    ]
    assert len(stale) == second.runs.stale
    assert all(rnd.blind["gain"] in r.subset for r in stale)


@pytest.mark.slow
def test_a_changed_trainer_without_git_sets_old_runs_aside(
    tmp_path: Path, trainer_log: Path
) -> None:
    """An external runner without a repository: the script and the local modules it imports
    name the code; a one-line change in model.py makes every run new, with the reason."""
    folder = tmp_path / "round"
    folder.mkdir()
    src = make_repo(tmp_path / "src")
    for name in ("train.py", "model.py", "train.toml"):
        shutil.copy(src / name, folder / name)
    (folder / "lr.yaml").write_text(
        "id: lr\narea: optimizer\nsummary: lr\nauthor: a\npatch: {train.lr: 3.0}\n"
    )
    (folder / "width.yaml").write_text(
        "id: width\narea: architecture\nsummary: width\nauthor: b\npatch: {model.width: 128}\n"
    )
    (folder / "round.yaml").write_text(
        textwrap.dedent(f"""\
        baseline: train.toml
        contributions: [lr.yaml, width.yaml]
        objectives: [{{metric: val_loss, direction: min}}]
        budget: 40
        runner: {{kind: external, command: "{sys.executable} train.py {{recipe}} {{seed}} {{out}}"}}
        executor: {{kind: local, workers: 2}}
        """)
    )
    out = tmp_path / "out"
    first = integrate(folder / "round.yaml", out, console=quiet()).decision
    assert isinstance(first.code.baseline, FilesCode)
    assert first.code.baseline.covers == "model.py, train.py + the command"
    again = integrate(folder / "round.yaml", out, console=quiet()).decision
    assert again.runs.stale == 0 and sum(log_lines(trainer_log).values()) == first.runs.executed
    before = trainer_log.read_text().splitlines()
    edit(folder, "model.py", "GAIN = 0.0", "GAIN = 0.01")
    third = integrate(folder / "round.yaml", out, console=quiet()).decision
    assert third.stale == {"model.py changed": third.runs.stale}
    assert third.runs.stale >= first.runs.executed - 6  # all but a few re-asked
    new = trainer_log.read_text().splitlines()[len(before) :]
    assert len(new) == third.runs.executed  # every run of the third trained anew...
    assert all(line.startswith("0.01 ") for line in new)  # ...with the new model.py


# --------------------------------------------------------------------------- bad input


def test_bad_git_rounds_are_one_line_errors_naming_file_and_key(tmp_path: Path, repo: Path) -> None:
    def load(folder: str, **kw) -> str:
        with pytest.raises(RoundError) as err:
            load_round(write_round(tmp_path / folder, repo, **kw), tmp_path / "work")
        message = str(err.value)
        assert "\n" not in message
        return message

    missing = load("a", contributions={"x": ("no-such-branch", None)})
    assert missing.endswith(
        "contribs/x.yaml: git: no commit 'no-such-branch' in repository ../trainer"
    )
    bad_key = load("b", contributions={"x": (None, {"train.lrr": 2.0})})
    assert "contribs/x.yaml: patch key 'train.lrr' is not in the baseline train.toml" in bad_key
    assert "did you mean 'train.lr'" in bad_key
    # A change that cannot be applied to the base at all.
    git(repo, "checkout", "-q", "-b", "old", "main")
    edit(repo, "model.py", "GAIN = 0.0", "GAIN = 0.5")
    git(repo, "commit", "-qam", "old")
    git(repo, "checkout", "-q", "main")
    edit(repo, "model.py", "GAIN = 0.0", "GAIN = 0.1")
    git(repo, "commit", "-qam", "main moves on")
    stale = load("c", contributions={"old": ("old", None)})
    assert "contribs/old.yaml: git: 'old' cannot be applied to base main" in stale
    assert "model.py line 3" in stale
    # Uncommitted changes while the base is checked out.
    edit(repo, "train.py", "import json", "import json  # edited")
    dirty = load("d")
    assert "round.yaml: base: " in dirty and "uncommitted changes at main (train.py)" in dirty
    git(repo, "checkout", "--", "train.py")
    # base without repo; then no baseline beside the round; then git without repo.
    folder = tmp_path / "e"
    plain = write_round(folder, repo)
    plain.write_text(plain.read_text().replace("repo: ../trainer\n", ""))
    with pytest.raises(RoundError, match=r"round.yaml: base: names a ref of repo:"):
        load_round(plain)
    plain.write_text(plain.read_text().replace("base: main\n", ""))
    with pytest.raises(RoundError, match=r"round.yaml: baseline: no file .*e/train.toml$"):
        load_round(plain)
    shutil.copy(repo / "train.toml", folder / "train.toml")
    with pytest.raises(RoundError, match=r"contribs/comment.yaml: git: 'comment' needs a repo:"):
        load_round(plain)


def test_git_older_than_2_38_is_refused_clearly(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gitrepo, "parse_git_version", lambda text: (2, 30, 1))
    with pytest.raises(RoundError, match=r"repo: git 2.30.1 found at .*needs git >= 2.38"):
        load_round(write_round(tmp_path / "r", repo), tmp_path / "work")


def test_a_conflicting_pair_is_a_choice_group_and_cannot_be_forced_together(
    tmp_path: Path, repo: Path
) -> None:
    rnd = load_round(write_round(tmp_path / "r", repo), tmp_path / "work")
    gelu, silu = rnd.ids.index("gelu"), rnd.ids.index("silu")
    assert rnd.groups == [sorted([gelu, silu])]
    assert rnd.conflict(gelu, silu) == "both change model.py line 7"
    with pytest.raises(WorkspaceError) as err:
        rnd.workspace.resolve(frozenset({gelu, silu}))
    assert str(err.value) == (
        "gelu + silu: 'silu' conflicts with 'gelu' in repository ../trainer: "
        "both change model.py line 7"
    )


def test_a_git_round_leaves_the_repository_as_it_was(tmp_path: Path, repo: Path) -> None:
    objects = sorted(p.name for p in (repo / ".git" / "objects").rglob("*") if p.is_file())
    refs = git(repo, "for-each-ref")
    load_round(write_round(tmp_path / "r", repo), tmp_path / "work")
    assert sorted(p.name for p in (repo / ".git" / "objects").rglob("*") if p.is_file()) == objects
    assert git(repo, "for-each-ref") == refs
    assert (
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True
        ).stdout.count("\n")
        == 1
    )
