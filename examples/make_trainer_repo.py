"""Make the git repository of the chartrainer example: `python examples/make_trainer_repo.py DEST`.

DEST gets `main` (one commit: the files of examples/chartrainer/) and one branch per
contribution, each one commit on top of `main` that edits the files by exact string
replacement; an edit whose target text is missing stops the script, so a change to the
trainer cannot silently turn a branch into something else. Authors, committers and dates are
fixed, and the user's git configuration is ignored, so the commit hashes are the same on every
machine. Standard library and the git CLI only. The branches (examples/README.md has their
measured effects):

    deeper     model.py: a second hidden layer, residual (helps)
    gelu       model.py: GELU instead of tanh (helps)
    softsign   model.py: the same line, softsign instead (hurts; conflicts with gelu)
    bigger-lr  train.toml: peak lr 0.005 -> 0.01 (helps)
    tidy-data  data.py: a refactor, no change in any run's result
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "chartrainer"
FILES = ("data.py", "model.py", "train.py", "train.toml")
GITIGNORE = "__pycache__/\nruns/\n"


@dataclass(frozen=True)
class Branch:
    name: str
    author: str
    message: str
    edits: tuple[tuple[str, str, str], ...]  # (file, old text, new text)


BRANCHES = (
    Branch(
        "deeper",
        "Ada Layer <ada@example.org>",
        "model.py: a second hidden layer, residual, with the same activation and dropout",
        (
            (
                "model.py",
                "        self.dropout = nn.Dropout(dropout)\n",
                "        self.dropout = nn.Dropout(dropout)\n"
                "        self.fc_mid = nn.Linear(hidden, hidden)\n",
            ),
            (
                "model.py",
                "        h = self.dropout(self.act(self.fc1(e)))\n",
                "        h = self.dropout(self.act(self.fc1(e)))\n"
                "        h = h + self.dropout(self.act(self.fc_mid(h)))\n",
            ),
        ),
    ),
    Branch(
        "gelu",
        "Gus Elu <gus@example.org>",
        "model.py: GELU instead of tanh (Hendrycks & Gimpel 2016)",
        (("model.py", "        return torch.tanh(x)\n", "        return F.gelu(x)\n"),),
    ),
    Branch(
        "softsign",
        "Sofia Sign <sofia@example.org>",
        "model.py: softsign instead of tanh, the same shape without the exponentials",
        (("model.py", "        return torch.tanh(x)\n", "        return F.softsign(x)\n"),),
    ),
    Branch(
        "bigger-lr",
        "Lars Rate <lars@example.org>",
        "train.toml: double the peak learning rate",
        (("train.toml", "lr = 0.005        # peak", "lr = 0.01         # peak"),),
    ),
    Branch(
        "tidy-data",
        "Tidy Coder <tidy@example.org>",
        "data.py: split the encoding out of load(); no change in behaviour",
        (
            (
                "data.py",
                '    """The encoded training and held-out characters, and the vocabulary."""\n'
                "    text = make_text()\n"
                "    vocab = sorted(set(text))\n"
                "    index = {ch: i for i, ch in enumerate(vocab)}\n"
                "    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)\n",
                '    """The encoded training and held-out characters, and the vocabulary."""\n'
                "    ids, vocab = encode(make_text())\n",
            ),
            (
                "data.py",
                "def load(",
                "def encode(text: str) -> tuple[torch.Tensor, list[str]]:\n"
                '    """`text` as a tensor of character ids, and the sorted vocabulary."""\n'
                "    vocab = sorted(set(text))\n"
                "    index = {ch: i for i, ch in enumerate(vocab)}\n"
                "    return torch.tensor([index[ch] for ch in text], dtype=torch.long), vocab\n"
                "\n\n"
                "def load(",
            ),
        ),
    ),
)


def git_env(author: str, date: str) -> dict[str, str]:
    name, email = author.rsplit(" <", 1)
    email = email.rstrip(">")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME=name,
        GIT_AUTHOR_EMAIL=email,
        GIT_AUTHOR_DATE=date,
        GIT_COMMITTER_NAME="stacklab example",
        GIT_COMMITTER_EMAIL="example@stacklab.invalid",
        GIT_COMMITTER_DATE=date,
    )
    return env


def run_git(dest: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(dest), *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.exit(f"git {' '.join(args)} failed in {dest}:\n{result.stderr}")
    return result.stdout.strip()


def _commit(dest: Path, env: dict[str, str], message: str) -> str:
    run_git(dest, env, "add", "--all")
    run_git(dest, env, "commit", "--quiet", "--no-verify", "-m", message)
    return run_git(dest, env, "rev-parse", "HEAD")


def _apply(dest: Path, branch: Branch) -> None:
    for file, old, new in branch.edits:
        path = dest / file
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            raise SystemExit(
                f"branch {branch.name}: expected the text {old!r} once in {file}, found it "
                f"{count} times; examples/chartrainer/{file} changed, update this script"
            )
        path.write_text(text.replace(old, new))


def make_repo(dest: Path) -> dict[str, str]:
    """Create the repository at `dest`; return each branch's commit."""
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"{dest} exists and is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    base_env = git_env("Main Tainer <main@example.org>", "2026-01-01T12:00:00+00:00")
    run_git(dest, base_env, "init", "--quiet", "--initial-branch=main")
    for name in FILES:
        shutil.copyfile(SOURCE / name, dest / name)
    (dest / ".gitignore").write_text(GITIGNORE)
    commits = {"main": _commit(dest, base_env, "chartrainer: a character MLP language model")}
    for day, branch in enumerate(BRANCHES, start=2):
        env = git_env(branch.author, f"2026-01-{day:02d}T12:00:00+00:00")
        run_git(dest, env, "checkout", "--quiet", "-b", branch.name, "main")
        _apply(dest, branch)
        commits[branch.name] = _commit(dest, env, branch.message)
    run_git(dest, base_env, "checkout", "--quiet", "main")
    return commits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="where to create the repository (new or empty)")
    args = parser.parse_args()
    for name, commit in make_repo(args.dest).items():
        print(f"{commit}  {name}")


if __name__ == "__main__":
    main()
