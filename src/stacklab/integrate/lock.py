"""The round folder's lock: which engines may work in one `--out` folder at the same time.

An engine holds an OS lock (`flock`) on `OUT/.integrate.lock` for its whole life; the kernel
releases it when the process ends, however it ends, so a killed engine never leaves a stale
lock behind, and the next engine on the folder resumes the round.

* With the round folder's own SQLite store (no `store:` in the round file) the lock is
  exclusive: the store and the run folders are that engine's alone, so a second engine on the
  folder stops at once, before it touches anything, naming the process that holds it.
* With a shared store (`store:` set, e.g. PostgreSQL), engines cooperate through the store's
  claims and leases, so they take the lock shared: any number of them may use one folder, but
  never together with an engine that holds it exclusively.

The holder writes its pid, host and start time into the file, for the message of the engine
that is refused. `flock` is Linux and macOS; on NFS, Linux emulates it with POSIX locks, which
the server arbitrates between machines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from stacklab.errors import StacklabError

LOCK_NAME = ".integrate.lock"

log = logging.getLogger(__name__)


class RoundFolderInUse(StacklabError):
    """Another engine works in this round folder, in a way that excludes this one."""


@contextlib.contextmanager
def hold_round_folder(out: Path, shared: bool) -> Iterator[None]:
    """Hold the lock on round folder `out` (which must exist) while the block runs.

    Raises RoundFolderInUse at once, having changed nothing, when it is held in a mode that
    excludes this one.
    """
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the trainers
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RoundFolderInUse(_refusal(out, path, shared)) from None
        except OSError as exc:  # a filesystem without locks: run, unguarded, as before
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("round folder %s cannot be locked (%s): run one engine at a time", out, exc)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "mode": "shared" if shared else "exclusive",
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _refusal(out: Path, path: Path, shared: bool) -> str:
    """The one-line error for an engine refused the folder, naming the holder if it can."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    pid, since, host = holder.get("pid"), holder.get("since"), holder.get("host")
    who = f"pid {pid}" if isinstance(pid, int) else "another process"
    if isinstance(host, str) and host != socket.gethostname():
        who += f" on {host}"
    if isinstance(since, int | float):
        who += f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    if shared:  # refused by an exclusive holder
        why = (
            "an engine with the folder's own SQLite store, which it keeps to itself; "
            "wait for it to end, or give this round another --out"
        )
    elif holder.get("mode") == "shared":
        why = (
            "an engine whose round names a shared store; with the default SQLite store a "
            "round folder takes one engine at a time: give this round another --out"
        )
    else:
        why = (
            "another `stacklab integrate` on this folder: wait for it to end, or stop it and "
            "re-run to resume the round, or give another --out"
        )
    return f"round folder {out} in use by {who} ({why})"
