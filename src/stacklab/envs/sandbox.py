"""Run model-written Python in a jail, and turn whatever happens into text the model can read.

The agent's Python tool executes code that nobody has reviewed, so the code runs in a separate
process that can hurt neither this machine nor the project, and every way it can go wrong
(an exception, an endless loop, a memory or fork bomb, an output flood) comes back as a
`SandboxResult` instead of an exception in the caller.

How the jail is built (Linux, run as root): a small wrapper script, started in its own session,
unshares new mount, PID and network namespaces and forks the child that becomes PID 1 of the new
PID namespace. That child builds a fresh root on a tmpfs holding only read-only bind mounts of
/usr, the Python installation and four /dev nodes, plus a small writable tmpfs at /sandbox (the
working directory, HOME and TMPDIR), chroots into it, sets resource limits, drops to the
`nobody` user with no supplementary groups and no way to regain privileges, and execs
`python -I -S -B` on the code. So:

- no network: the new network namespace has only a loopback device, and it is down;
- no project files, no home directories, no /tmp, no /etc: they are not in the jail's file tree
  at all, and every path outside /sandbox is read-only. One exception: when the Python
  installation lives under one of them (pyenv under /root, say), the directories leading to it
  exist in the jail, new and empty but for that path, and the code cannot list them (mode
  0711). The installation keeps its own path in the jail: an interpreter may find its shared
  library by an absolute path (pyenv's builds do);
- no runaway processes: RLIMIT_NPROC applies because the code is not root, and when PID 1 exits
  (or its parent, the wrapper, is killed on timeout) the kernel kills everything in the PID
  namespace, even processes that left the process group;
- bounded CPU time, address space, file size, and disk (the /sandbox tmpfs);
- bounded output: stdout and stderr go to files capped by RLIMIT_FSIZE, and only the first
  (stdout) or last (stderr) `max_output` characters are read back.

If any step of the setup fails (no root, a kernel without namespaces), nothing runs: the result
says "sandbox unavailable: ..." (fail closed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
OUTPUT_FILE_BYTES = 1 << 20  # RLIMIT_FSIZE: any file the code writes, stdout and stderr included
DISK_MB = 16  # size of the /sandbox tmpfs

# Runs as root in a fresh `python -I -S`; argv[1] is a JSON config written by `run_python`.
_WRAPPER = r"""
import ctypes, json, os, resource, signal, sys

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if s else None
    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {dst}")


def bind_ro(src, dst):
    mount(src, dst, None, MS_BIND | MS_REC)
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


# Makes root + path. The directories on the way (/root for a Python under /root/.pyenv) are new
# and empty but for the path, and traverse-only (0711): the code cannot list them.
def mount_point(root, path):
    current = root
    for part in path.strip("/").split("/"):
        current += "/" + part
        if not os.path.isdir(current):
            os.mkdir(current)
            os.chmod(current, 0o711)


def build_jail(root):
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in cfg["binds"]:
        mount_point(root, path)
        bind_ro(path, root + path)
    for path, target in cfg["links"]:
        os.symlink(target, root + path)
    os.mkdir(root + "/dev")
    for name in ("null", "zero", "random", "urandom"):
        open(root + "/dev/" + name, "w").close()
        mount("/dev/" + name, root + "/dev/" + name, None, MS_BIND)
    work = root + "/sandbox"
    os.mkdir(work)
    opts = f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700,uid={cfg['uid']},gid={cfg['uid']}"
    mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    with open(work + "/main.py", "w", encoding="utf-8") as f:
        f.write(cfg["code"])
    os.chown(work + "/main.py", cfg["uid"], cfg["uid"])
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir("/sandbox")


def become_code():
    build_jail(cfg["root"])
    for limit, value in cfg["limits"].items():
        resource.setrlimit(getattr(resource, limit), (value, value))
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # Set again: changing the user cleared it. It kills the code if the wrapper is killed.
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    home = "/sandbox"
    env = {"HOME": home, "TMPDIR": home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    python = cfg["python"]
    os.execve(python, [python, "-I", "-S", "-B", "-X", "utf8", "main.py"], env)


report = os.open(cfg["setup_error"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
except OSError as e:
    os.write(report, f"no network/pid/mount namespaces ({e})".encode())
    os._exit(1)
# SIGTERM (the timeout) must find the handler below; until then it waits blocked.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
pid = os.fork()
if pid == 0:
    try:
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        become_code()
    except BaseException as e:
        os.write(report, f"{type(e).__name__}: {e}".encode())
    os._exit(1)
# Killing the code ourselves lets us reap it, so no zombie is left to the host's init.
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
_, status, usage = os.wait4(pid, 0)
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    # The code is PID 1 of its namespace, which ignores SIGXCPU: the CPU limit arrives as SIGKILL.
    if sig == signal.SIGKILL and usage.ru_utime + usage.ru_stime >= cfg["cpu_s"] - 0.05:
        sig = signal.SIGXCPU
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
os._exit(os.waitstatus_to_exitcode(status))
"""


@dataclass
class SandboxResult:
    """What came of one run: `ok` only when the code exited 0 within every limit."""

    ok: bool
    stdout: str
    stderr: str
    error: str | None  # short reason: "timeout", "memory limit", "exit code 1", ...
    truncated: bool
    max_output: int = 2000

    def as_tool_text(self) -> str:
        """The text the model is shown: output, then stderr and the error, cut to max_output."""
        parts = [self.stdout] if self.stdout else []
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr)
        if self.error:
            parts.append(f"[error: {self.error}]")
        text = "\n".join(parts) or "[no output]"
        truncated = self.truncated or len(text) > self.max_output
        if len(text) > self.max_output:
            text = text[: self.max_output]
        return text + "\n[output truncated]" if truncated else text


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    cpu_s: int = 2,
    memory_mb: int = 256,
    max_output: int = 2000,
    max_procs: int = 32,
) -> SandboxResult:
    """Run `code` as a script in the jail; never raises for anything the code does.

    `max_procs` caps the processes (and threads) of the `nobody` user, which concurrent runs share.
    """
    unavailable = _unavailable_reason()
    if unavailable:
        return _failure(f"sandbox unavailable: {unavailable}", max_output)
    base = Path(tempfile.mkdtemp(prefix="stacklab-sandbox-"))
    try:
        return _run_in(base, code, timeout_s, cpu_s, memory_mb, max_output, max_procs)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _unavailable_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (namespaces, chroot, switching to an unprivileged user)"
    return None


def _failure(error: str, max_output: int) -> SandboxResult:
    return SandboxResult(False, "", "", error, False, max_output)


def _jail_layout() -> tuple[list[str], list[tuple[str, str]]]:
    """Directories to bind read-only into the jail, and top-level symlinks to recreate."""
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    binds = {"/usr"} | {p for p in prefixes if not p.startswith("/usr/")}
    links = []
    for top in ("/bin", "/lib", "/lib64"):
        if os.path.islink(top):
            links.append((top, os.readlink(top)))
        elif os.path.isdir(top):
            binds.add(top)
    return sorted(binds), links


def _run_in(
    base: Path,
    code: str,
    timeout_s: float,
    cpu_s: int,
    memory_mb: int,
    max_output: int,
    max_procs: int,
) -> SandboxResult:
    (base / "root").mkdir()
    binds, links = _jail_layout()
    config = {
        "code": code,
        "root": str(base / "root"),
        "setup_error": str(base / "setup_error"),
        "binds": binds,
        "links": links,
        "python": os.path.realpath(sys.executable),
        "uid": NOBODY,
        "disk_mb": DISK_MB,
        "cpu_s": cpu_s,
        "limits": {
            "RLIMIT_CPU": cpu_s,
            "RLIMIT_AS": memory_mb << 20,
            "RLIMIT_FSIZE": OUTPUT_FILE_BYTES,
            "RLIMIT_NPROC": max_procs,
            "RLIMIT_CORE": 0,
        },
    }
    out_path, err_path = base / "stdout", base / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WRAPPER, json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={},
            cwd=base,
            start_new_session=True,
        )
        timed_out = False
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()  # the wrapper kills and reaps the jail's PID 1, and all dies with it
            try:
                returncode = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the jail's PID 1 follows by PDEATHSIG
                returncode = proc.wait()

    setup_error = (base / "setup_error").read_text(errors="replace").strip()
    if setup_error:
        return _failure(f"sandbox unavailable: {setup_error}", max_output)
    stdout, out_cut = _read_head(out_path, max_output)
    stderr, err_cut = _read_tail(err_path, max_output)
    error = _classify(timed_out, returncode, stderr)
    return SandboxResult(error is None, stdout, stderr, error, out_cut or err_cut, max_output)


def _read_head(path: Path, max_chars: int) -> tuple[str, bool]:
    """The first max_chars characters of a file, and whether there was more."""
    limit = 4 * max_chars + 4  # UTF-8 needs at most 4 bytes a character
    with path.open("rb") as f:
        text = f.read(limit).decode("utf-8", errors="replace")
    cut = len(text) > max_chars or path.stat().st_size > limit
    return text[:max_chars], cut


def _read_tail(path: Path, max_chars: int) -> tuple[str, bool]:
    """The last max_chars characters of a file (a traceback ends with its point), and whether
    there was more."""
    limit = 4 * max_chars + 4
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - limit))
        text = f.read(limit).decode("utf-8", errors="replace")
    cut = len(text) > max_chars or size > limit
    return text[-max_chars:] if max_chars else "", cut


def _classify(timed_out: bool, returncode: int, stderr: str) -> str | None:
    """A short reason for a failed run, None for success."""
    if timed_out:
        return "timeout"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        return "cpu time limit" if sig == signal.SIGXCPU else f"killed by {sig.name}"
    if returncode == 0:
        return None
    last_line = stderr.rstrip().rpartition("\n")[2]
    if last_line.startswith("MemoryError"):
        return "memory limit"
    if "File too large" in last_line:
        return "file size limit"
    if "Network is unreachable" in last_line:
        return "network unavailable"
    return f"exit code {returncode}"
