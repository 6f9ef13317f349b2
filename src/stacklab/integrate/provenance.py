"""Which code made a run: a fingerprint of the trainer, part of a run's identity.

A stored run is only worth reusing if the same code would make it again. A git round names
its code by tree hash; this module names it everywhere else:

* `external_fingerprint`: an external trainer without git is its command template (as
  written, placeholders unfilled) and the content of the files it depends on: those of
  `runner.depends`, else the command's script and the local modules it imports.
* `builtin_fingerprint`: the built-in runner (`stacklab build`) is the stacklab version and the
  source of every module a build can run (see `BUILD_CODE_EXCLUDES`).

A `Provenance` keeps, besides the hash, one entry per file (path → sha256 of its bytes), so
`stale_reason` can say which file changed when stored runs are set aside. The command and the
stacklab version are entries too, under the names `COMMAND` and `VERSION`, which no file has.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import stacklab
from stacklab.errors import StacklabError
from stacklab.pipeline import import_closure
from stacklab.recipe import canonical_hash

COMMAND = "<command>"  # `files` entry: sha256 of the command template
VERSION = "<stacklab>"  # `files` entry: the stacklab version itself (not a hash)
_NOT_FILES = frozenset({COMMAND, VERSION})

# Parts of the stacklab package that `stacklab build` never runs, left out of the built-in
# fingerprint (paths relative to the package folder; a folder covers everything under it).
BUILD_CODE_EXCLUDES = (
    "integrate/",  # the engine: it picks runs, it does not change what a run measures
    "interop/",  # Hugging Face export/import (`stacklab export`, `stacklab import`)
    "bench.py",  # `stacklab bench`
    "chat.py",  # `stacklab chat`
)


@dataclass(frozen=True)
class Provenance:
    """The code a run ran: `code` is its hash, `files` what went into it.

    `files` maps each file's path (relative to the runner's working folder where it lies
    inside it) to the sha256 of its content, plus the `COMMAND` and `VERSION` entries. A git
    round may leave `files` empty: `code` is then the tree hash. `note` says how the files
    were chosen, in words, for the report.
    """

    code: str
    files: dict[str, str] = field(default_factory=dict, hash=False)
    note: str = ""

    def describe(self) -> str:
        """What the hash covers, in a few words: "train.py, model/net.py + the command"."""
        real = sorted(k for k in self.files if k not in _NOT_FILES)
        parts = []
        if VERSION in self.files:
            parts.append(f"stacklab {self.files[VERSION]}")
        if real:
            parts.append(_file_list(real))
        if COMMAND in self.files:
            parts.append("the command")
        return " + ".join(parts) or f"code {self.code}"


def external_fingerprint(
    argv: Sequence[str],
    cwd: Path,
    depends: Sequence[str] | None,
    *,
    follow_imports: bool = True,
) -> Provenance:
    """The fingerprint of an external trainer run as `argv` (a template) in `cwd`.

    `depends` lists the files whose content names the trainer's code: paths or glob patterns
    relative to `cwd` (`train.py`, `model/*.py`, `src/**/*.py`; `__pycache__` folders never
    match). An entry matching no file, or a folder, is a `StacklabError`. Without `depends`,
    the command's script stands for the code: the first argument after the program that names
    an existing file and holds no `{placeholder}` (for `python -m pkg.mod`, the module's file
    under `cwd`), else the program itself when it is a path to a file inside `cwd`
    (`./train.sh`). With `follow_imports`, a Python script brings the modules it imports from
    its own folder along, transitively (`import model` → `model.py`), as `import_closure`
    finds them. With no file at all, only the command counts, and `note` says so.
    """
    cwd = Path(cwd).resolve()
    argv = [str(a) for a in argv]
    paths: list[Path]
    if depends is not None:
        paths = [p for entry in depends for p in _depends_entry(entry, cwd)]
        note = f"runner.depends: {len(set(paths))} file(s)" if paths else "runner.depends is empty"
    else:
        script, module = _command_script(argv, cwd)
        if script is None:
            paths = []
            note = (
                "no file named in the command: only the command is hashed "
                "(list the trainer's files in runner.depends)"
            )
        else:
            paths = [script]
            note = f"the command's script {_relative(script, cwd)}"
            if follow_imports and script.suffix == ".py":
                root = cwd if module else script.parent
                paths = sorted(import_closure(script, module, [(root, None)]))
                if len(paths) > 1:
                    note += f" and the {len(paths) - 1} local module(s) it imports"
    files = {COMMAND: _sha256(json.dumps(argv).encode())}
    for path in paths:
        try:
            files[_relative(path, cwd)] = _sha256(path.read_bytes())
        except OSError as exc:
            raise StacklabError(f"cannot read {path} for the runner's fingerprint: {exc}") from None
    return Provenance(canonical_hash(files), files, note)


@functools.cache
def builtin_fingerprint() -> Provenance:
    """The fingerprint of the built-in runner: the stacklab version and its build code.

    The code is every `.py` file of the installed stacklab package except
    `BUILD_CODE_EXCLUDES` (the engine and the other subcommands), by content and sorted by
    path, so an edit to any stage, model, data or training module, to `recipe.py` or to the
    `stacklab build` command (`cli.py`, `pipeline.py`) makes new runs, and an edit to the
    engine does not. Computed once per process.
    """
    package = Path(stacklab.__file__).resolve().parent
    files = {VERSION: _stacklab_version()}
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if "__pycache__" in path.parts or any(
            relative == ex or (ex.endswith("/") and relative.startswith(ex))
            for ex in BUILD_CODE_EXCLUDES
        ):
            continue
        files[f"stacklab/{relative}"] = _sha256(path.read_bytes())
    count = len(files) - 1
    note = f"stacklab {files[VERSION]}: {count} modules, without {', '.join(BUILD_CODE_EXCLUDES)}"
    return Provenance(canonical_hash(files), files, note)


def stale_reason(old: dict[str, str], new: dict[str, str]) -> str:
    """Why runs made by `old` code are not `new` runs, in one line ("train.py changed").

    Parts, joined by "; ": "the command changed", "stacklab 0.1.0 → 0.2.0", then the files
    changed, added and removed ("train.py and model/net.py changed", "a.py, b.py and 3 more
    files added"). Old code with no files recorded gives "the code it ran was not recorded";
    maps that name no difference (both empty, for git trees) give "the code changed".
    """
    if old == new:
        return "the code changed"
    if not old:
        return "the code it ran was not recorded"
    if (VERSION in old) != (VERSION in new):
        return "another runner made it (built-in vs external)"
    parts = []
    if old.get(COMMAND) != new.get(COMMAND):
        parts.append("the command changed")
    if old.get(VERSION) != new.get(VERSION):
        parts.append(f"stacklab {old[VERSION]} → {new[VERSION]}")
    common = (old.keys() & new.keys()) - _NOT_FILES
    for names, verb in (
        (sorted(k for k in common if old[k] != new[k]), "changed"),
        (sorted(new.keys() - old.keys() - _NOT_FILES), "added"),
        (sorted(old.keys() - new.keys() - _NOT_FILES), "removed"),
    ):
        if names:
            parts.append(f"{_names(names)} {verb}")
    return "; ".join(parts) or "the code changed"


# --------------------------------------------------------------------------- helpers


def _depends_entry(entry: str, cwd: Path) -> list[Path]:
    """The files one `runner.depends` entry names, sorted; an error if none."""
    if glob.has_magic(entry):
        found = sorted(
            path
            for match in glob.glob(entry, root_dir=cwd, recursive=True)
            if (path := (cwd / match)).is_file() and "__pycache__" not in path.parts
        )
        if not found:
            raise StacklabError(f"runner.depends: {entry!r} matches no file in {cwd}")
        return found
    path = cwd / entry
    if path.is_dir():
        raise StacklabError(
            f"runner.depends: {entry!r} is a folder in {cwd}; name its files with a glob "
            f"such as '{entry.rstrip('/')}/**/*.py'"
        )
    if not path.is_file():
        raise StacklabError(f"runner.depends: {entry!r} is not a file in {cwd}")
    return [path]


def _command_script(argv: Sequence[str], cwd: Path) -> tuple[Path | None, str]:
    """(the file standing for the command's code, its module name for `-m`, else "")."""
    if not argv:
        return None, ""
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if "{" in arg:
            continue
        if arg == "-m" and i + 1 < len(args) and "{" not in args[i + 1]:
            module = args[i + 1]
            for name in (f"{module}.__main__", module):
                path = _module_path(name, cwd)
                if path is not None:
                    return path, name
            continue
        path = cwd / arg
        if path.is_file():
            return path.resolve(), ""
    program = argv[0]
    if "{" not in program and os.sep in program:
        path = (cwd / program).resolve()
        if path.is_file() and path.is_relative_to(cwd):
            return path, ""
    return None, ""


def _module_path(name: str, cwd: Path) -> Path | None:
    base = cwd.joinpath(*name.split("."))
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _relative(path: Path, cwd: Path) -> str:
    path = path.resolve()
    return path.relative_to(cwd).as_posix() if path.is_relative_to(cwd) else str(path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stacklab_version() -> str:
    version = getattr(stacklab, "__version__", None)
    if version:
        return str(version)
    try:
        return metadata.version("stacklab")
    except metadata.PackageNotFoundError:
        return "unknown"


def _names(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    if len(names) <= 3:
        return f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{names[0]}, {names[1]} and {len(names) - 2} more files"


def _file_list(names: list[str]) -> str:
    if len(names) <= 4:
        return ", ".join(names)
    tops = {name.split("/")[0] for name in names}
    if len(tops) == 1 and all("/" in name for name in names):
        return f"{len(names)} files under {tops.pop()}/"
    return f"{names[0]}, {names[1]} and {len(names) - 2} more files"
