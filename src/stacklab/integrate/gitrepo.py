"""Contributions as code: the git layer of a round (docs/integrate.md, "round format").

A round may name a git repository whose branches, tags or commits are the contributions. This
module answers the questions the engine asks of that repository, through the git command line
(`git -C REPO ...`, never a shell, never a patch applied by hand):

* **What does a contribution change?** `Repo.change(base, ref)`: the diff from the merge base
  of `base` and `ref` to `ref` (files, `--stat` text, line counts, and per file the base-side
  line ranges of each hunk, from `git diff-tree -U0`).
* **What code does a subset run?** `Repo.merge(base, changes)`: `base` with each change merged
  in turn, in the order given, exactly as `git merge` would. git 2.39's `merge-tree
  --write-tree A B` finds the merge base itself (there is no `--merge-base` option before
  2.40), so the merges are built as real merge commits in sequence: C0 = base; C_k = a merge
  commit, parents C_{k-1} and the change's commit, of the tree `merge-tree` writes. The merge
  commits have a fixed author, committer, date and message, so the same subset in the same
  order gives the same commit and tree hash on every machine with the same git settings;
  results are memoised on (base, prefix of commits), so subsets sharing a prefix share work.
  The tree hash names the code a run ran.
* **Which contributions cannot go together?** `Repo.conflict(base, a, b)`: whether merging a
  then b conflicts; the `Conflict` names the files and the line ranges both change (the
  overlap of their hunks, comparable when both changes start from the same merge base; when
  they do not, the ranges are a's and the description says so). `Repo.can_apply(base, change)`
  is an error when a change alone does not merge into `base`.
* **Where does a run execute?** `Repo.export(tree, root)`: `root/<tree hash>/` holding the
  tree's files (`git archive` of the tree, extracted with `tarfile`), written to a temporary
  folder and renamed into place, so two processes exporting the same tree both end with one
  complete copy, and reused when it is already there.

**The user's repository is never written to.** Every git command runs with
`GIT_OBJECT_DIRECTORY` set to the round's own object folder (`OUT/git/`), and
`GIT_ALTERNATE_OBJECT_DIRECTORIES` set to the repository's object store, so git reads the
repository's objects and writes new ones (merge trees, merge commits) to the round's folder.
`git status` runs with `--no-optional-locks`, so it does not refresh the index file either.
Environment variables that would point git elsewhere (`GIT_DIR`, `GIT_INDEX_FILE`, ...) are
removed. The user's git configuration is otherwise kept: a merge behaves as the user's own
`git merge` would (rename detection, merge drivers in `.gitattributes`); output that is parsed
comes from plumbing commands with `-z` or fixed options, which ignore colour and prefix
settings. `git archive` honours `export-ignore` in the tree's `.gitattributes`.

Errors are `GitError` (a `StacklabError`): one line naming the repository, the ref and, when
the caller passes `source` (e.g. "contribs/rope.yaml: git"), that prefix. A merge that
conflicts raises `MergeConflict`, a `GitError` carrying the `Conflict`.

git >= 2.38 is required (`merge-tree --write-tree`); `check_git()` says so clearly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from stacklab.errors import StacklabError
from stacklab.fileio import publish_dir

MIN_GIT = (2, 38)  # merge-tree --write-tree

# Fixed identity and date of the merge commits, so their hashes are deterministic.
_IDENTITY = {
    "GIT_AUTHOR_NAME": "stacklab",
    "GIT_AUTHOR_EMAIL": "stacklab@localhost",
    "GIT_AUTHOR_DATE": "@1700000000 +0000",
    "GIT_COMMITTER_NAME": "stacklab",
    "GIT_COMMITTER_EMAIL": "stacklab@localhost",
    "GIT_COMMITTER_DATE": "@1700000000 +0000",
}
_MERGE_MESSAGE = "stacklab merge"

# `git rev-parse --local-env-vars` (git 2.39), plus the object-store variables we set ourselves:
# inherited, they would point git at another repository, index or object store.
_DROPPED_ENV = (
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_OBJECT_DIRECTORY",
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_IMPLICIT_WORK_TREE",
    "GIT_GRAFT_FILE",
    "GIT_INDEX_FILE",
    "GIT_NO_REPLACE_OBJECTS",
    "GIT_REPLACE_REF_BASE",
    "GIT_PREFIX",
    "GIT_INTERNAL_SUPER_PREFIX",
    "GIT_SHALLOW_FILE",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
)

# Settings that would make git write to the repository or change the bytes of a merge commit.
_CONFIG = (
    "-c",
    "gc.auto=0",
    "-c",
    "maintenance.auto=false",
    "-c",
    "i18n.commitEncoding=UTF-8",
)

_HUNK = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")

Ranges = list[tuple[int, int]]


class GitError(StacklabError):
    """A git repository, ref or merge a round names is unusable, explained in one line."""


def parse_git_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) from `git --version` output ("git version 2.39.5")."""
    found = _VERSION.search(text)
    if found is None:
        raise GitError(f"cannot read git's version from {text.strip()!r}")
    return int(found[1]), int(found[2]), int(found[3] or 0)


def check_git() -> str:
    """git's version string; GitError if git is missing or older than `MIN_GIT`."""
    where = shutil.which("git")
    if where is None:
        raise GitError(
            "git not found on PATH; stacklab needs git >= 2.38 for merge-tree --write-tree"
        )
    try:
        done = subprocess.run(
            [where, "--version"], capture_output=True, text=True, check=True, env=_clean_env()
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise GitError(f"cannot run {where} --version: {_one_line(str(exc))}") from None
    version = parse_git_version(done.stdout)
    shown = ".".join(map(str, version))
    if version[:2] < MIN_GIT:
        need = ".".join(map(str, MIN_GIT))
        raise GitError(
            f"git {shown} found at {where}; stacklab needs git >= {need} "
            "for merge-tree --write-tree"
        )
    return shown


@dataclass(frozen=True)
class Change:
    """One contribution's code change: the diff from merge_base(base, ref) to ref."""

    ref: str  # as written
    commit: str  # full hash of ref
    merge_base: str  # merge-base(base, ref)
    files: tuple[str, ...]  # paths changed between merge_base and commit (no rename pairing)
    diffstat: str  # `git diff --stat merge_base commit`
    insertions: int
    deletions: int
    # Per file, the merge-base-side line ranges (1-based, inclusive) each hunk touches; a pure
    # insertion after line n counts as (n, n) (line 1 for the top of a file); [] for binary,
    # mode-only or otherwise unknown changes.
    hunks: dict[str, Ranges] = field(compare=False)
    source: str | None = field(default=None, compare=False)  # error prefix, e.g. "x.yaml: git"


@dataclass(frozen=True)
class Conflict:
    """Two refs whose changes conflict: the files, and the lines both change where known."""

    a: str
    b: str
    files: dict[str, Ranges]  # file -> overlapping line ranges; [] if unknown (rename/delete)
    ranges_from: str | None = None  # None: common base-side lines; else the ref they come from

    def describe(self) -> str:
        """'both change train.py lines 40-52' (files joined with '; ', ranges with ', ')."""
        parts = []
        for path, ranges in self.files.items():
            if not ranges:
                parts.append(path)
            elif len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
                parts.append(f"{path} line {ranges[0][0]}")
            else:
                shown = ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ranges)
                parts.append(f"{path} lines {shown}")
        text = "both change " + "; ".join(parts)
        if self.ranges_from is not None and any(self.files.values()):
            text += (
                f" (line numbers as {self.ranges_from} changes them: "
                "the two start from different commits)"
            )
        return text


class MergeConflict(GitError):
    """A merge conflicted; `conflict` says which refs and which lines."""

    def __init__(self, message: str, conflict: Conflict, others: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.conflict = conflict
        self.others = others  # every earlier ref that touched a conflicted file


class Repo:
    """A git repository read through the git CLI; new objects go to `objects_dir` only."""

    def __init__(self, path: Path, objects_dir: Path, name: str | None = None) -> None:
        """`name`: how messages show the repository (default: `path` as given)."""
        check_git()
        self.path = Path(path)
        self.name = name if name is not None else str(path)
        if not self.path.is_dir():
            raise GitError(f"repository {self.name} not found (no folder {self.path})")
        lines = self._probe("--git-common-dir", "--is-bare-repository")
        if len(lines) != 2:
            raise GitError(f"{self.name} is not a git repository")
        common, bare = Path(lines[0]), lines[1] == "true"
        if not bare:
            top = self._probe("--show-toplevel")
            if len(top) != 1 or Path(top[0]).resolve() != self.path.resolve():
                shown = top[0] if len(top) == 1 else "unknown"
                raise GitError(
                    f"{self.name} is not the top folder of a git repository (its top is {shown})"
                )
        self.bare = bare
        self.objects_dir = Path(objects_dir).resolve()
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        own = common / "objects"
        self._env = _clean_env()
        self._env.update(
            GIT_OBJECT_DIRECTORY=str(self.objects_dir),
            GIT_ALTERNATE_OBJECT_DIRECTORIES=str(own),
            GIT_TERMINAL_PROMPT="0",
            LC_ALL="C",
        )
        self._names: dict[str, str] = {}  # commit -> the first ref resolved to it
        # (base, commits prefix) -> the merge commit, or the conflicted paths
        self._merges: dict[tuple[str, tuple[str, ...]], str | tuple[str, ...]] = {}

    # -- plumbing -------------------------------------------------------------------------

    def _probe(self, *options: str) -> list[str]:
        """`git rev-parse` of `options` in the repository, without our object folder; [] if
        git fails there."""
        done = subprocess.run(
            ["git", "-C", str(self.path), "rev-parse", "--path-format=absolute", *options],
            capture_output=True,
            env=_clean_env(),
        )
        if done.returncode != 0:
            return []
        return done.stdout.decode("utf-8", "surrogateescape").splitlines()

    def _git(self, *args: str, ok: tuple[int, ...] = (0,), what: str = "") -> tuple[int, bytes]:
        cmd = ["git", "-C", str(self.path), *_CONFIG, *args]
        try:
            done = subprocess.run(cmd, capture_output=True, env=self._env)
        except OSError as exc:
            raise GitError(f"cannot run git in repository {self.name}: {exc}") from None
        if done.returncode not in ok:
            detail = _one_line(done.stderr.decode("utf-8", "replace")) or f"exit {done.returncode}"
            raise GitError(f"git {args[0]}{what} failed in repository {self.name}: {detail}")
        return done.returncode, done.stdout

    def _out(self, *args: str, what: str = "") -> str:
        return self._git(*args, what=what)[1].decode("utf-8", "surrogateescape").strip()

    def _label(self, commit: str) -> str:
        return self._names.get(commit, commit[:12])

    # -- questions ------------------------------------------------------------------------

    def resolve(self, ref: str, source: str | None = None) -> str:
        """Full commit hash of `ref`; GitError naming the ref and repository if there is none."""
        if not ref:
            raise GitError(_at(source, f"no commit {ref!r} in repository {self.name}"))
        code, out = self._git(
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            f"{ref}^{{commit}}",
            ok=(0, 1, 128),
        )
        if code != 0:
            raise GitError(_at(source, f"no commit {ref!r} in repository {self.name}"))
        commit = out.decode().strip()
        self._names.setdefault(commit, ref)
        return commit

    def tree(self, commit: str) -> str:
        """The tree hash of a commit."""
        return self._out(
            "rev-parse", "--verify", "--end-of-options", f"{commit}^{{tree}}", what=f" {commit}"
        )

    def uncommitted_at(self, commit: str) -> list[str]:
        """Tracked files with uncommitted changes (staged or not) if HEAD is `commit`, else []."""
        if self.bare:
            return []
        code, out = self._git("rev-parse", "--verify", "--quiet", "HEAD", ok=(0, 1, 128))
        if code != 0 or out.decode().strip() != commit:
            return []
        _, out = self._git(
            "--no-optional-locks",
            "status",
            "--porcelain=v1",
            "-z",
            "--untracked-files=no",
            "--ignore-submodules=none",
        )
        entries = out.split(b"\0")
        paths: list[str] = []
        i = 0
        while i < len(entries):
            entry = entries[i]
            i += 1
            if len(entry) < 4:
                continue
            paths.append(entry[3:].decode("utf-8", "surrogateescape"))
            if entry[:1] in (b"R", b"C") and i < len(entries) and entries[i]:
                if entry[:1] == b"R":  # a staged rename also changes its source path
                    paths.append(entries[i].decode("utf-8", "surrogateescape"))
                i += 1
        return sorted(set(paths))

    def change(self, base: str, ref: str, source: str | None = None) -> Change:
        """The change `ref` makes relative to its merge base with `base` (a resolved commit)."""
        commit = self.resolve(ref, source)
        code, out = self._git("merge-base", base, commit, ok=(0, 1))
        if code != 0:
            raise GitError(
                _at(
                    source,
                    f"{ref!r} shares no history with base {self._label(base)} "
                    f"in repository {self.name}",
                )
            )
        merge_base = out.decode().strip()
        _, names = self._git(
            "diff-tree", "-r", "--no-renames", "--name-only", "-z", merge_base, commit
        )
        files = tuple(_split_z(names))
        _, numstat = self._git(
            "diff-tree", "-r", "--no-renames", "--numstat", "-z", merge_base, commit
        )
        insertions = deletions = 0
        for entry in _split_z(numstat):
            added, deleted = entry.split("\t")[:2]
            insertions += int(added) if added.isdigit() else 0
            deletions += int(deleted) if deleted.isdigit() else 0
        diffstat = self._out("diff", "--stat", "--no-color", "--no-ext-diff", merge_base, commit)
        return Change(
            ref=ref,
            commit=commit,
            merge_base=merge_base,
            files=files,
            diffstat=diffstat,
            insertions=insertions,
            deletions=deletions,
            hunks=self._hunks(merge_base, commit, files),
            source=source,
        )

    def _hunks(self, old: str, new: str, files: Sequence[str]) -> dict[str, Ranges]:
        _, patch = self._git(
            "diff-tree",
            "-r",
            "-p",
            "-U0",
            "--no-renames",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--src-prefix=a/",
            "--dst-prefix=b/",
            old,
            new,
        )
        hunks: dict[str, Ranges] = {path: [] for path in files}
        current: str | None = None
        minus: str | None = None
        for line in patch.split(b"\n"):
            if line.startswith(b"diff --git "):
                current = minus = None
            elif line.startswith(b"--- ") and current is None:
                minus = _patch_path(line[4:], b"a/")
            elif line.startswith(b"+++ ") and current is None:
                current = minus or _patch_path(line[4:], b"b/")
            elif line.startswith(b"@@ ") and current is not None:
                found = _HUNK.match(line)
                if found is None:
                    continue
                start, count = int(found[1]), int(found[2] or b"1")
                if count == 0:
                    spot = max(start, 1)
                    hunks.setdefault(current, []).append((spot, spot))
                else:
                    hunks.setdefault(current, []).append((start, start + count - 1))
        return hunks

    # -- merges ---------------------------------------------------------------------------

    def _step(self, base: str, commits: tuple[str, ...]) -> str | tuple[str, ...]:
        """Memoised merge of commits into base, in order: the merge commit, or the conflicted
        paths of the first merge that conflicts."""
        key = (base, commits)
        if key in self._merges:
            return self._merges[key]
        if not commits:
            return base
        parent = self._step(base, commits[:-1])
        result = parent if isinstance(parent, tuple) else self._merge_one(parent, commits[-1])
        self._merges[key] = result
        return result

    def _merge_one(self, parent: str, commit: str) -> str | tuple[str, ...]:
        code, out = self._git(
            "merge-tree",
            "--write-tree",
            "--name-only",
            "--no-messages",
            "-z",
            parent,
            commit,
            ok=(0, 1),
            what=f" {self._label(parent)} {self._label(commit)}",
        )
        fields = _split_z(out)
        if code == 1:
            return tuple(dict.fromkeys(fields[1:]))
        env = dict(self._env, **_IDENTITY)
        done = subprocess.run(
            [
                "git",
                "-C",
                str(self.path),
                *_CONFIG,
                "commit-tree",
                "--no-gpg-sign",
                "-p",
                parent,
                "-p",
                commit,
                "-m",
                _MERGE_MESSAGE,
                fields[0],
            ],
            capture_output=True,
            env=env,
        )
        if done.returncode != 0:
            detail = _one_line(done.stderr.decode("utf-8", "replace"))
            raise GitError(f"git commit-tree failed in repository {self.name}: {detail}")
        return done.stdout.decode().strip()

    def merge_commit(self, base: str, changes: Sequence[Change]) -> str:
        """The merge commit of base with each change merged in turn (base itself if none)."""
        commits = tuple(c.commit for c in changes)
        for k in range(1, len(commits) + 1):
            result = self._step(base, commits[:k])
            if isinstance(result, tuple):
                raise self._conflict_error(base, changes[: k - 1], changes[k - 1], result)
        result = self._step(base, commits)
        assert isinstance(result, str)
        return result

    def merge(self, base: str, changes: Sequence[Change]) -> str:
        """Tree hash of base with each change merged in turn, in the order given.

        MergeConflict when a merge conflicts, naming the change being merged and the earlier
        change(s) that touched the conflicted files (or base, if none did).
        """
        return self.tree(self.merge_commit(base, changes))

    def conflict(self, base: str, a: Change, b: Change) -> Conflict | None:
        """Whether merging a then b into base conflicts (None: a clean merge).

        Each change must merge into base alone (GitError as `can_apply` otherwise), so a
        Conflict is always between a and b.
        """
        self.can_apply(base, a)
        self.can_apply(base, b)
        paths = self._step(base, (a.commit, b.commit))
        if isinstance(paths, str):
            return None
        if set(a.files) & set(paths):
            return self._pair(a, b, paths)
        # a touched none of the conflicted files (a rename seen only in combination): honest
        # about knowing the files, not the lines.
        return Conflict(a=a.ref, b=b.ref, files={p: [] for p in paths})

    def can_apply(self, base: str, change: Change) -> None:
        """GitError (a MergeConflict) if the change alone does not merge into base."""
        self.merge_commit(base, [change])

    def _conflict_error(
        self, base: str, earlier: Sequence[Change], change: Change, paths: tuple[str, ...]
    ) -> MergeConflict:
        touched = [e for e in earlier if set(e.files) & set(paths)]
        if not touched:
            # Nothing merged before touched these files: the change conflicts with base, whose
            # own edits since the change's merge base share its numbering.
            ours = self._hunks(change.merge_base, base, paths)
            files = {p: _overlap(change.hunks.get(p, []), ours.get(p, [])) for p in paths}
            conflict = Conflict(a=change.ref, b=self._label(base), files=files)
            message = (
                f"{change.ref!r} cannot be applied to base {self._label(base)} "
                f"in repository {self.name}: {conflict.describe()}"
            )
            return MergeConflict(_at(change.source, message), conflict)

        pairs = [self._pair(e, change, paths) for e in touched]
        # The earlier changes whose lines overlap the merged one's in a conflicted file, if
        # line numbers tell (same merge base); else every earlier change touching those files.
        overlapping = [p for p in pairs if p.ranges_from is None and any(p.files.values())]
        pairs = overlapping or pairs
        best = max(pairs, key=lambda c: (sum(1 for r in c.files.values() if r), len(c.files)))
        others = tuple(c.a for c in pairs)
        named = " and ".join(repr(r) for r in others)
        message = (
            f"{change.ref!r} conflicts with {named} in repository {self.name}: {best.describe()}"
        )
        return MergeConflict(_at(change.source, message), best, others)

    @staticmethod
    def _pair(a: Change, b: Change, paths: Sequence[str]) -> Conflict:
        """The Conflict of a with b over the conflicted `paths` that a touched."""
        shared = [p for p in paths if p in a.files]
        if a.merge_base == b.merge_base:
            files = {p: _overlap(a.hunks.get(p, []), b.hunks.get(p, [])) for p in shared}
            return Conflict(a=a.ref, b=b.ref, files=files)
        files = {p: list(a.hunks.get(p, [])) for p in shared}
        return Conflict(a=a.ref, b=b.ref, files=files, ranges_from=a.ref)

    # -- files ----------------------------------------------------------------------------

    def read(self, tree: str, path: str) -> str | None:
        """The text of the file at `path` in `tree`; None if there is no such file."""
        clean = PurePosixPath(path).as_posix().lstrip("/")
        _, out = self._git("ls-tree", "-z", "--full-tree", tree, "--", clean)
        entries = [e for e in _split_z(out) if e.split("\t", 1)[-1] == clean]
        if not entries:
            return None
        meta = entries[0].split("\t", 1)[0].split()
        if meta[1] != "blob":
            raise GitError(f"{path} is not a file in tree {tree[:12]} of repository {self.name}")
        _, data = self._git("cat-file", "blob", meta[2])
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise GitError(
                f"{path} in tree {tree[:12]} of repository {self.name} is not UTF-8 text"
            ) from None

    def export(self, tree: str, root: Path) -> Path:
        """root/<tree> holding the tree's files, written atomically and reused if present."""
        root = Path(root)
        dest = root / tree
        if dest.is_dir():
            return dest
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{tree}.tmp-"))
        try:
            archive = tmp / ".archive.tar"
            with archive.open("wb") as sink:
                done = subprocess.run(
                    ["git", "-C", str(self.path), *_CONFIG, "archive", "--format=tar", tree],
                    stdout=sink,
                    stderr=subprocess.PIPE,
                    env=self._env,
                )
            if done.returncode != 0:
                detail = _one_line(done.stderr.decode("utf-8", "replace"))
                raise GitError(
                    f"git archive {tree[:12]} failed in repository {self.name}: {detail}"
                )
            files = tmp / "files"
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "tar_filter"):
                    tar.extractall(files, filter="tar")
                else:  # Python < 3.11.4; git writes no absolute or '..' member names
                    tar.extractall(files)
            files.mkdir(exist_ok=True)  # an empty tree
            try:
                publish_dir(files, dest, replace=False)
            except OSError:
                if not dest.is_dir():  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


# -- helpers ------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _at(source: str | None, message: str) -> str:
    return f"{source}: {message}" if source else message


def _split_z(data: bytes) -> list[str]:
    return [p.decode("utf-8", "surrogateescape") for p in data.split(b"\0") if p]


_ESCAPES = {b"a": 7, b"b": 8, b"t": 9, b"n": 10, b"v": 11, b"f": 12, b"r": 13}


def _patch_path(raw: bytes, prefix: bytes) -> str | None:
    """The path of a '--- a/x' or '+++ b/x' line (C-quoted if odd); None for /dev/null."""
    if raw.endswith(b"\t"):  # git adds a tab after names holding a space
        raw = raw[:-1]
    if raw == b"/dev/null":
        return None
    if raw.startswith(b'"') and raw.endswith(b'"'):
        raw = _unquote(raw[1:-1])
    if raw.startswith(prefix):
        raw = raw[len(prefix) :]
    return raw.decode("utf-8", "surrogateescape")


def _unquote(body: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i : i + 1]
        if ch != b"\\" or i + 1 >= len(body):
            out += ch
            i += 1
            continue
        nxt = body[i + 1 : i + 2]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt.isdigit():
            out.append(int(body[i + 1 : i + 4], 8))
            i += 4
        else:
            out += nxt
            i += 2
    return bytes(out)


def _overlap(a: Ranges, b: Ranges) -> Ranges:
    """Line ranges both touch: the intersections, or for hunks that only abut (git treats
    changes on adjacent lines as a conflict) the span of the two; sorted and merged."""
    found: Ranges = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            if lo1 <= hi2 + 1 and lo2 <= hi1 + 1:
                lo, hi = max(lo1, lo2), min(hi1, hi2)
                found.append((lo, hi) if lo <= hi else (min(lo1, lo2), max(hi1, hi2)))
    merged: Ranges = []
    for lo, hi in sorted(found):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged
