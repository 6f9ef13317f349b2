"""Which code made a run: fingerprints of external and built-in trainers, and why runs go stale."""

import shlex
from pathlib import Path

import pytest

import stacklab
from stacklab.errors import StacklabError
from stacklab.integrate.provenance import (
    COMMAND,
    VERSION,
    Provenance,
    builtin_fingerprint,
    external_fingerprint,
    stale_reason,
)

CMD = shlex.split("python train.py --config {recipe} --seed {seed} --out {out}")


@pytest.fixture
def trainer(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text("import model\n\nLR = 0.1\nprint(model.WIDTH)\n")
    (tmp_path / "model.py").write_text("from helpers import act\n\nWIDTH = 64\n")
    (tmp_path / "helpers.py").write_text("def act(x):\n    return x\n")
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "a.py").write_text("A = 1\n")
    (tmp_path / "net" / "b.py").write_text("B = 1\n")
    (tmp_path / "notes.txt").write_text("unrelated\n")
    return tmp_path


def test_default_depends_is_the_script_and_its_local_imports(trainer: Path) -> None:
    prov = external_fingerprint(CMD, trainer, None)
    assert set(prov.files) == {COMMAND, "train.py", "model.py", "helpers.py"}
    assert "train.py" in prov.note and "2 local module(s)" in prov.note
    assert prov.describe() == "helpers.py, model.py, train.py + the command"
    bare = external_fingerprint(CMD, trainer, None, follow_imports=False)
    assert set(bare.files) == {COMMAND, "train.py"}
    assert bare.describe() == "train.py + the command"


def test_one_changed_line_or_a_changed_command_changes_the_code(trainer: Path) -> None:
    before = external_fingerprint(CMD, trainer, None)
    assert external_fingerprint(CMD, trainer, None) == before  # stable

    (trainer / "notes.txt").write_text("edited, but the trainer does not read it\n")
    (trainer / "net" / "a.py").write_text("A = 2\n")  # not imported by train.py
    assert external_fingerprint(CMD, trainer, None).code == before.code

    (trainer / "helpers.py").write_text("def act(x):\n    return 2 * x\n")  # imported, deep
    after = external_fingerprint(CMD, trainer, None)
    assert after.code != before.code
    assert stale_reason(before.files, after.files) == "helpers.py changed"

    other = external_fingerprint([*CMD, "--fast"], trainer, None)
    assert other.code != after.code
    assert stale_reason(after.files, other.files) == "the command changed"


def test_script_choice_skips_placeholders_and_handles_modules(trainer: Path) -> None:
    (trainer / "{recipe}").write_text("a file named like a placeholder is never the script")
    prov = external_fingerprint(["python", "{recipe}", "train.py"], trainer, None)
    assert set(prov.files) == {COMMAND, "train.py", "model.py", "helpers.py"}
    # torchrun's options are not files; the first argument naming one is
    argv = shlex.split("torchrun --nproc_per_node 2 train.py --config {recipe}")
    assert "train.py" in external_fingerprint(argv, trainer, None).files
    # python -m: the module's file, under cwd
    (trainer / "pkg").mkdir()
    (trainer / "pkg" / "__init__.py").write_text("")
    (trainer / "pkg" / "run.py").write_text("from . import util\n")
    (trainer / "pkg" / "util.py").write_text("X = 1\n")
    prov = external_fingerprint(["python", "-m", "pkg.run", "{recipe}"], trainer, None)
    assert set(prov.files) == {COMMAND, "pkg/__init__.py", "pkg/run.py", "pkg/util.py"}
    # the program itself, when it is a file inside cwd
    (trainer / "train.sh").write_text("#!/bin/sh\n")
    assert "train.sh" in external_fingerprint(["./train.sh", "{recipe}"], trainer, None).files


def test_no_file_in_the_command_hashes_the_command_only(tmp_path: Path) -> None:
    prov = external_fingerprint(["trainer", "--config", "{recipe}"], tmp_path, None)
    assert set(prov.files) == {COMMAND}
    assert "only the command is hashed" in prov.note and "runner.depends" in prov.note
    assert prov.describe() == "the command"


def test_depends_paths_and_globs(trainer: Path) -> None:
    prov = external_fingerprint(CMD, trainer, ["train.py", "net/*.py"])
    assert set(prov.files) == {COMMAND, "train.py", "net/a.py", "net/b.py"}  # no imports
    assert prov.describe() == "net/a.py, net/b.py, train.py + the command"
    (trainer / "net" / "sub").mkdir()
    (trainer / "net" / "sub" / "c.py").write_text("C = 1\n")
    (trainer / "net" / "__pycache__").mkdir()
    (trainer / "net" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    deep = external_fingerprint(CMD, trainer, ["net/**"])
    assert set(deep.files) == {COMMAND, "net/a.py", "net/b.py", "net/sub/c.py"}
    (trainer / "net" / "b.py").unlink()
    assert stale_reason(deep.files, external_fingerprint(CMD, trainer, ["net/**"]).files) == (
        "net/b.py removed"
    )


def test_a_missing_depends_entry_is_a_clear_error(trainer: Path) -> None:
    with pytest.raises(StacklabError, match=r"'model/\*\.py' matches no file in .*") as err:
        external_fingerprint(CMD, trainer, ["train.py", "model/*.py"])
    assert str(trainer.resolve()) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StacklabError, match=r"'trian\.py' is not a file in "):
        external_fingerprint(CMD, trainer, ["trian.py"])
    with pytest.raises(StacklabError, match=r"'net' is a folder .* 'net/\*\*/\*\.py'"):
        external_fingerprint(CMD, trainer, ["net"])


def test_stale_reasons() -> None:
    old = {COMMAND: "c1", "train.py": "1", "model.py": "2"}
    assert stale_reason(old, {**old, "train.py": "9"}) == "train.py changed"
    assert stale_reason(old, {**old, "data.py": "3"}) == "data.py added"
    assert stale_reason(old, {COMMAND: "c1", "train.py": "1"}) == "model.py removed"
    assert stale_reason(old, {**old, COMMAND: "c2"}) == "the command changed"
    both = {COMMAND: "c2", "train.py": "9", "model.py": "8", "x.py": "0"}
    assert stale_reason(old, both) == (
        "the command changed; model.py and train.py changed; x.py added"
    )
    many = {f"f{i}.py": str(i) for i in range(6)}
    assert stale_reason({COMMAND: "c"}, {COMMAND: "c", **many}) == (
        "f0.py, f1.py and 4 more files added"
    )
    built = {VERSION: "0.1.0", "stacklab/train/pretrain.py": "1"}
    assert stale_reason(built, {**built, VERSION: "0.2.0"}) == "stacklab 0.1.0 → 0.2.0"
    assert stale_reason(built, old) == "another runner made it (built-in vs external)"
    assert stale_reason({}, old) == "the code it ran was not recorded"
    assert stale_reason({}, {}) == "the code changed"  # git trees: the hash says it all


def test_builtin_fingerprint_is_stable_and_covers_the_build_code() -> None:
    prov = builtin_fingerprint()
    assert builtin_fingerprint() is prov  # once per process
    assert builtin_fingerprint.__wrapped__() == prov  # and the same when computed again
    assert prov.files[VERSION] == stacklab.__version__
    assert prov.describe().startswith(f"stacklab {stacklab.__version__} + ")
    for module in ["stacklab/train/pretrain.py", "stacklab/recipe.py", "stacklab/cli.py"]:
        assert module in prov.files
    for module in ["stacklab/integrate/engine.py", "stacklab/bench.py", "stacklab/chat.py"]:
        assert module not in prov.files
    assert not any(name.startswith("stacklab/interop/") for name in prov.files)


def test_provenance_is_hashable_and_describes_a_git_tree() -> None:
    tree = Provenance("4b825dc642cb6eb9a060e54bf8d69288fbee4904")
    assert {tree: 1}[tree] == 1
    assert tree.describe() == "code 4b825dc642cb6eb9a060e54bf8d69288fbee4904"
