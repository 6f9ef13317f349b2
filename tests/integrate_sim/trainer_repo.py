"""A small git repository with a stand-in trainer (no torch: runs take milliseconds) and
contribution branches, for the engine's tests of git rounds.

The trainer reads a TOML config and writes `val_loss`: a base value, minus `GAIN` from
model.py, plus the activation's effect (model.py `ACT`), minus 0.05 per unit of `train.lr`
above 1, plus noise (sd 0.01) seeded by the seed and the settings. Every run appends
"GAIN ACT lr seed folder" to the log named by `$TRAINER_LOG` (the folder is the run's tree in
a git round), so a test can count which code trained which run.

Branches of `main`:
- `gain`: GAIN 0.0 -> 0.3 (a large gain)
- `gelu`, `silu`: rewrite the same `ACT` line (they conflict textually); gelu gains 0.2,
  silu loses 0.1
- `comment`: a comment in train.py (no effect on any number)
- `lr`: train.lr 1.0 -> 3.0 in train.toml (a config-only branch: gains 0.1)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TRAIN_PY = '''\
"""Stand-in trainer: python train.py CONFIG SEED OUT"""
import json
import os
import random
import sys
import tomllib

import model

config_path, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(config_path, "rb") as f:
    config = tomllib.load(f)
rng = random.Random(f"{seed} {model.GAIN} {model.ACT} {config['train']['lr']}")
loss = 2.0 - model.GAIN + model.ACT_EFFECT[model.ACT]
loss -= 0.05 * (config["train"]["lr"] - 1.0)
loss += rng.gauss(0.0, 0.01) + 0.02 * (seed % 3)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump({"val_loss": loss, "tokens_per_s": 1000.0}, f)
log = os.environ.get("TRAINER_LOG")
if log:
    with open(log, "a") as f:
        here = os.path.basename(os.getcwd())
        f.write(f"{model.GAIN} {model.ACT} {config['train']['lr']} {seed} {here}\\n")
'''

MODEL_PY = '''\
"""The model's knobs, as code."""

GAIN = 0.0

ACT_EFFECT = {"relu": 0.0, "gelu": -0.2, "silu": 0.1}

ACT = "relu"
'''

TRAIN_TOML = """\
# Stand-in trainer config (comments must survive patches)
[train]
lr = 1.0      # learning rate multiplier
steps = 10

[model]
width = 64
"""

ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
    "GIT_AUTHOR_DATE": "1700000000 +0000",
    "GIT_COMMITTER_DATE": "1700000000 +0000",
}


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **ENV}
    done = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def edit(repo: Path, file: str, old: str, new: str) -> None:
    path = repo / file
    text = path.read_text()
    assert old in text, f"{old!r} not in {file}"
    path.write_text(text.replace(old, new, 1))


def commit_on(repo: Path, branch: str, file: str, old: str, new: str, start: str = "main") -> None:
    git(repo, "checkout", "-q", "-B", branch, start)
    edit(repo, file, old, new)
    git(repo, "commit", "-qam", branch)
    git(repo, "checkout", "-q", "main")


def make_repo(repo: Path) -> Path:
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text(TRAIN_PY)
    (repo / "model.py").write_text(MODEL_PY)
    (repo / "train.toml").write_text(TRAIN_TOML)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "trainer")
    commit_on(repo, "gain", "model.py", "GAIN = 0.0", "GAIN = 0.3")
    commit_on(repo, "gelu", "model.py", 'ACT = "relu"', 'ACT = "gelu"')
    commit_on(repo, "silu", "model.py", 'ACT = "relu"', 'ACT = "silu"')
    commit_on(repo, "comment", "train.py", "import model\n", "import model  # the knobs\n")
    commit_on(repo, "lr", "train.toml", "lr = 1.0 ", "lr = 3.0 ")
    return repo


CONTRIBUTIONS = {  # id -> (git ref, patch)
    "gain": ("gain", None),
    "gelu": ("gelu", None),
    "silu": ("silu", None),
    "comment": ("comment", None),
    "lr": ("lr", None),
}


def write_round(
    folder: Path,
    repo: Path,
    contributions: dict[str, tuple[str | None, dict | None]] | None = None,
    budget: int = 90,
    executor: str = "{kind: local, workers: 2}",
    extra: str = "",
) -> Path:
    """A round over `repo` (contribution files under folder/contribs); returns round.yaml."""
    contribs = folder / "contribs"
    contribs.mkdir(parents=True)
    for cid, (ref, patch) in (contributions or CONTRIBUTIONS).items():
        lines = [f"id: {cid}", "area: architecture", f"summary: {cid}", "author: someone"]
        if ref is not None:
            lines.append(f"git: {ref}")
        if patch is not None:
            lines.append(f"patch: {patch}")
        (contribs / f"{cid}.yaml").write_text("\n".join(lines) + "\n")
    rel = os.path.relpath(repo, folder)
    text = textwrap.dedent(f"""\
        repo: {rel}
        base: main
        baseline: train.toml
        contributions: [contribs]
        objectives: [{{metric: val_loss, direction: min}}]
        seeds: 3
        confirm_seeds: 3
        budget: {budget}
        runner: {{kind: external, command: "{sys.executable} train.py {{recipe}} {{seed}} {{out}}"}}
        executor: {executor}
        """)
    (folder / "round.yaml").write_text(text + extra)
    return folder / "round.yaml"
