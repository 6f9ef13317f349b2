"""Atomic, durable writes: a reader sees the old output or the complete new one, never half.

Every output that a later step trusts (documents, shards, the tokenizer, metrics, a stage's
folder, a checkpoint, an exported model, a run's folder) is built under a temporary sibling
name, flushed to disk, and renamed into place. A rename alone is atomic but not durable: after
a power cut the new name can point at empty or truncated files unless their data was flushed
first, and the rename itself can be lost unless the parent folder is flushed after it. Doing
this right takes four steps in a fixed order, so it lives here once and every writer calls it:

- `atomic_open` / `write_atomic`: one file (fsync the file, rename, fsync the folder);
- `staging_dir` / `publish_dir`: a folder (fsync every file and folder inside, rename, fsync
  the parent);
- `replace_symlink`: point a link somewhere else without a moment where it is missing.

Temporary siblings are named `.NAME.tmp-RANDOM` (`tmp_sibling`), so a writer that finds one
left by a killed process knows what it is and can remove it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def tmp_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """A fresh temporary name next to `path`: `.NAME.TAG-RANDOM`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (the names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and folder under `root` (and `root` itself) to disk.

    Symbolic links are not followed. Raises FileNotFoundError if `root` is gone.
    """
    root = Path(root)

    def fail(exc: OSError) -> None:
        raise exc

    fsync_dir(root)  # first, so a missing root raises instead of walking nothing
    for folder, dirs, names in os.walk(root, onerror=fail):
        for name in names:
            file = os.path.join(folder, name)
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_dir(os.path.join(folder, name))


# --------------------------------------------------------------------------- one file


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on success flush it, rename it over
    `path` and flush the folder. On an exception nothing is left behind and `path` is as it
    was."""
    path = Path(path)
    tmp = tmp_sibling(path)
    encoding = None if "b" in mode else "utf-8"
    try:
        with tmp.open(mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically and durably."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


# --------------------------------------------------------------------------- one folder


def publish_dir(tmp: str | Path, final: str | Path, *, replace: bool = True) -> None:
    """Move the finished folder `tmp` to `final` durably: flush everything inside `tmp`,
    rename it, flush `final`'s parent.

    `replace=True` removes an older `final` first (for a single writer, such as a checkpoint
    being rewritten). `replace=False` never touches an existing `final`: the rename fails with
    OSError if a non-empty folder is there, which tells concurrent writers that another one
    won. FileNotFoundError means `tmp` is gone.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if replace and (final.exists() or final.is_symlink()):
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        else:
            final.unlink()
    os.rename(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def staging_dir(final: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder of `final`; publish it as `final` on success
    (see `publish_dir`), remove it on an exception.

    Folders left by a process killed mid-write (`.NAME.tmp-*`) are the caller's to remove:
    only a caller that knows it is the sole writer may.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_symlink(link: str | Path, target: str | Path) -> None:
    """Point the symbolic link `link` at `target` atomically: readers see the old target or
    the new one, never a missing link."""
    link, target = Path(link), Path(target)
    tmp = tmp_sibling(link, "link")
    tmp.symlink_to(target, target_is_directory=target.is_dir())
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
