"""What a subset of a round's contributions becomes: the config the trainer reads, the code it
runs, and one hash that names both.

A round's baseline is a stacklab recipe or any YAML/JSON/TOML file (`configs.py`); its
contributions are patches of that file's keys, git refs of the round's repository
(`gitrepo.py`), or both. For a subset, `Workspace.resolve` gives:

- the code: with a repository, `base` with the members' refs merged in, in the round's order
  (a tree hash); without one, a fingerprint of the trainer (`provenance.py`): the built-in
  runner's stacklab version and stage code, or an external command and the files it depends on;
- the config: the baseline file (read from the subset's tree when the round has a repository,
  so a branch may edit it) with the members' patches applied, as plain data and as the text
  `{recipe}` receives;
- `run_hash`, a hash of both: the store keys a run by it and the seed, so a run made by other
  code is never reused for this one.

Trees are exported once each, under `<work>/trees/<tree hash>/`, and runs execute there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stacklab.errors import StacklabError
from stacklab.integrate.configs import Baseline, FileBaseline
from stacklab.integrate.contributions import Contribution
from stacklab.integrate.gitrepo import Change, GitError, Repo
from stacklab.integrate.provenance import Provenance, builtin_fingerprint, external_fingerprint
from stacklab.recipe import canonical_hash

Subset = frozenset[int]


class WorkspaceError(StacklabError):
    """A subset cannot be made into a config and code (a merge or a patch fails)."""

    def __init__(self, names: str, detail: str):
        super().__init__(f"{names}: {detail}")
        self.detail = detail  # the message without the subset's names


@dataclass(frozen=True)
class Resolved:
    """One subset, ready to run on any seed."""

    run_hash: str  # names config and code together: the store's key is (run_hash, seed)
    data: dict[str, Any]  # the resolved config as plain data (a recipe without its seed)
    text: str | None  # what {recipe} receives; None: a recipe, written per seed with its seed
    filename: str  # recipe.yaml, recipe.toml, ... in the run's folder
    code: str  # the code fingerprint (a tree hash in a git round)
    provenance: dict[str, Any] = field(default_factory=dict)  # what `code` covers
    tree: str | None = None  # the git tree to run in, if the round has a repository


@dataclass
class Workspace:
    """Resolves subsets of one round (memoised: the engine asks for the same ones often)."""

    baseline: Baseline  # the baseline as loaded (from the base tree in a git round)
    contributions: list[Contribution]
    is_recipe: bool
    command: Sequence[str] | None  # the external runner's argv template; None: built-in
    root: Path  # the round file's folder: where an external command runs without git
    depends: Sequence[str] | None = None
    repo: Repo | None = None
    base: str | None = None  # the resolved base commit
    baseline_path: str | None = None  # the baseline's path inside the repository
    changes: dict[int, Change] = field(default_factory=dict)  # contribution index -> change
    work: Path | None = None  # where trees are exported (the round's --out)
    _resolved: dict[tuple[Subset, str], Resolved] = field(default_factory=dict, repr=False)
    _fingerprint: Provenance | None = field(default=None, repr=False)
    _baselines: dict[str, Baseline] = field(default_factory=dict, repr=False)

    def resolve(
        self,
        subset: Subset,
        extra: Mapping[str, Any] | None = None,
        tag: Mapping[str, Any] | None = None,
    ) -> Resolved:
        """The config and code of the baseline with `subset` applied (WorkspaceError if a
        merge conflicts or the patches do not apply).

        `extra` is a patch applied after the members' (a scale rung's, with a tuned learning
        rate); `tag` says which rung (and learning rate) in the provenance, so runs of one
        subset and seed at two rungs are told apart. Without them: the plain subset.
        """
        memo = (subset, canonical_hash([dict(extra or {}), dict(tag or {})]))
        if memo not in self._resolved:
            self._resolved[memo] = self._resolve(subset, extra, tag)
        return self._resolved[memo]

    def tree_of(self, subset: Subset) -> str | None:
        """The merged tree of the subset's code changes (no config work), or None without git."""
        if self.repo is None or self.base is None:
            return None
        members = [self.changes[i] for i in sorted(subset) if i in self.changes]
        return self.repo.merge(self.base, members) if members else self.repo.tree(self.base)

    def _resolve(
        self, subset: Subset, extra: Mapping[str, Any] | None, tag: Mapping[str, Any] | None
    ) -> Resolved:
        members = sorted(subset)  # the round's order
        names = " + ".join(self.contributions[i].id for i in members) or "the baseline"
        tree = None
        baseline = self.baseline
        if self.repo is not None:
            try:
                tree = self.tree_of(subset)
            except GitError as exc:
                raise WorkspaceError(names, str(exc)) from None
            assert tree is not None and self.baseline_path is not None
            baseline = self._baseline_in(tree, names)
            refs = {
                self.changes[i].ref: self.changes[i].commit for i in members if i in self.changes
            }
            provenance = {"kind": "git", "tree": tree, "base": self.base, "refs": refs}
            code = tree
        else:
            fp = self._code()
            kind = "stacklab" if self.command is None else "files"
            provenance = {"kind": kind, "files": dict(fp.files), "covers": fp.describe()}
            code = fp.code
        patches = [self.contributions[i].patch for i in members if self.contributions[i].patch]
        if extra:
            patches.append(dict(extra))
        if tag:
            provenance = {**provenance, **tag}
        try:
            data, text = baseline.apply(patches)
        except StacklabError as exc:
            raise WorkspaceError(names, str(exc)) from None
        if self.is_recipe:
            data = {k: v for k, v in data.items() if k != "seed"}
            text = None
        run_hash = canonical_hash({"config": data, "code": code})
        return Resolved(run_hash, data, text, f"recipe{baseline.suffix}", code, provenance, tree)

    def _baseline_in(self, tree: str, names: str) -> Baseline:
        """The baseline file as it is in `tree` (a branch may have edited it)."""
        assert self.repo is not None and self.baseline_path is not None
        text = self.repo.read(tree, self.baseline_path)
        if text is None:
            raise WorkspaceError(
                names, f"the baseline {self.baseline_path} is not in the merged tree {tree[:12]}"
            )
        if text not in self._baselines:
            try:
                self._baselines[text] = FileBaseline.load(Path(self.baseline_path), text)
            except StacklabError as exc:
                raise WorkspaceError(names, str(exc)) from None
        return self._baselines[text]

    def _code(self) -> Provenance:
        if self._fingerprint is None:
            if self.command is None:
                self._fingerprint = builtin_fingerprint()
            else:
                self._fingerprint = external_fingerprint(self.command, self.root, self.depends)
        return self._fingerprint

    def cwd(self, resolved: Resolved) -> Path | None:
        """Where the run's command executes: its exported tree, or None (the round's folder)."""
        if resolved.tree is None or self.repo is None:
            return None
        if self.work is None:
            raise WorkspaceError("a git round", "needs a work folder to export its trees into")
        return self.repo.export(resolved.tree, self.work / "trees")
