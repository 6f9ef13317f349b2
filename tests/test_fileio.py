"""The atomic writers: content lands whole, is flushed to disk, and a failure leaves nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stacklab import fileio
from stacklab.fileio import (
    atomic_open,
    publish_dir,
    replace_symlink,
    staging_dir,
    write_atomic,
)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count os.fsync calls, by what the descriptor points at."""
    seen: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self") else "?")
        real(fd)

    monkeypatch.setattr(fileio.os, "fsync", counting)
    return seen


def test_write_atomic_text_and_bytes(tmp_path: Path, fsyncs: list[str]) -> None:
    write_atomic(tmp_path / "a.txt", "héllo\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    write_atomic(tmp_path / "a.txt", "again")
    assert (tmp_path / "a.txt").read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]
    # each write flushes its file and then the folder that holds the new name
    assert len(fsyncs) == 6
    assert fsyncs.count(str(tmp_path)) == 3


def test_atomic_open_failure_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_atomic_of_a_new_file_that_fails_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "x.txt", 42)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_staging_dir_publishes_and_flushes_everything(tmp_path: Path, fsyncs: list[str]) -> None:
    final = tmp_path / "ckpt"
    with staging_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-")
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "state.json").write_text("{}")
    assert (final / "weights.bin").read_bytes() == b"w"
    assert (final / "sub" / "state.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    flushed = {Path(p).name for p in fsyncs}
    # both files, both folders inside, and the parent after the rename
    assert {"weights.bin", "state.json", "sub", tmp_path.name} <= flushed
    assert fsyncs[-1] == str(tmp_path)


def test_staging_dir_replaces_an_older_folder(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with staging_dir(final) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    assert [p.name for p in final.iterdir()] == ["new.bin"]


def test_staging_dir_failure_keeps_the_old_folder_and_removes_the_temporary(
    tmp_path: Path,
) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), staging_dir(final) as tmp:
        (tmp / "new.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in final.iterdir()] == ["old.bin"]


def test_publish_without_replace_never_touches_a_finished_folder(tmp_path: Path) -> None:
    final = tmp_path / "run"
    final.mkdir()
    (final / "metrics.json").write_text("{}")
    tmp = tmp_path / ".run.tmp-1"
    tmp.mkdir()
    (tmp / "metrics.json").write_text('{"loss": 1}')
    with pytest.raises(OSError):
        publish_dir(tmp, final, replace=False)
    assert (final / "metrics.json").read_text() == "{}"
    with pytest.raises(FileNotFoundError):
        publish_dir(tmp_path / "gone", tmp_path / "elsewhere")


def test_replace_symlink(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    link = tmp_path / "link"
    replace_symlink(link, a)
    assert link.resolve() == a
    replace_symlink(link, b)
    assert link.resolve() == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "link"]
