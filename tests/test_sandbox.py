"""The Python sandbox: every way model-written code can misbehave comes back as a result.

The tests that run code in the jail need root on Linux. Elsewhere they skip, unless
STACKLAB_REQUIRE_SANDBOX=1 (CI), which turns a jail that cannot run into a failure.
"""

import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from helpers import skip_or_fail
from stacklab.envs import sandbox
from stacklab.envs.sandbox import NOBODY, SandboxResult, run_python

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def jail() -> None:
    """Skip (or fail, under STACKLAB_REQUIRE_SANDBOX=1) where the jail cannot be built."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        skip_or_fail("STACKLAB_REQUIRE_SANDBOX", "the sandbox needs root on Linux")


needs_jail = pytest.mark.usefixtures("jail")


@pytest.fixture
def jail_dirs(monkeypatch) -> list[str]:
    """The temporary directories the sandbox makes, recorded as they are made."""
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(**kwargs):
        made.append(real_mkdtemp(**kwargs))
        return made[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    return made


def jailed_pids(dirs: list[str]) -> list[int]:
    """Processes of `nobody` whose root is one of our jails (other sessions may run jails too)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            uid = os.stat(proc).st_uid
            root = os.readlink(proc / "root")
        except OSError:
            continue
        if uid == NOBODY and any(root.startswith(d) for d in dirs):
            pids.append(int(proc.name))
    return pids


def leftovers(dirs: list[str], seconds: float = 1.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := jailed_pids(dirs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@needs_jail
def test_hello_world():
    r = run_python("print('hello', 6 * 7)")
    assert r == SandboxResult(True, "hello 42\n", "", None, False)
    assert r.as_tool_text() == "hello 42\n"


@needs_jail
def test_exception_gives_traceback():
    r = run_python("x = 1\nprint('before')\nraise ValueError('bad value')")
    assert not r.ok and r.error == "exit code 1"
    assert r.stdout == "before\n"
    assert 'File "/sandbox/main.py", line 3' in r.stderr
    assert r.stderr.rstrip().endswith("ValueError: bad value")
    assert "[error: exit code 1]" in r.as_tool_text()


@needs_jail
def test_exit_code_and_stdin_closed():
    assert run_python("import sys; sys.exit(3)").error == "exit code 3"
    r = run_python("input()")
    assert r.stderr.rstrip().endswith("EOFError: EOF when reading a line")


@needs_jail
def test_busy_loop_hits_cpu_limit():
    start = time.monotonic()
    r = run_python("while True: pass", cpu_s=1, timeout_s=5)
    assert (r.ok, r.error) == (False, "cpu time limit")
    assert time.monotonic() - start < 3


@needs_jail
def test_sleep_hits_wall_clock_timeout(jail_dirs):
    start = time.monotonic()
    r = run_python("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout_s=1)
    assert (r.ok, r.error, r.stdout) == (False, "timeout", "started\n")
    assert time.monotonic() - start < 2.5
    assert leftovers(jail_dirs) == []


@needs_jail
@pytest.mark.parametrize(
    "code", ["x = bytearray(2 * 1024**3)", "x = []\nwhile True: x.append(' ' * 10**6)"]
)
def test_memory_bomb_hits_memory_limit(code):
    r = run_python(code, memory_mb=128)
    assert (r.ok, r.error) == (False, "memory limit")
    assert r.stderr.rstrip().endswith("MemoryError")


@needs_jail
def test_fork_bomb_is_contained(jail_dirs):
    start = time.monotonic()
    r = run_python("import os\nwhile True: os.fork()", timeout_s=2, max_procs=16)
    assert not r.ok and r.error in ("exit code 1", "timeout")
    assert time.monotonic() - start < 3
    assert leftovers(jail_dirs) == []


@needs_jail
def test_processes_that_leave_the_session_die_too(jail_dirs):
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\ntime.sleep(60)"
    assert run_python(code, timeout_s=1).error == "timeout"
    assert leftovers(jail_dirs) == []


@needs_jail
def test_no_network_even_loopback():
    code = (
        "import socket\n"
        "for addr in [('127.0.0.1', 8080), ('1.1.1.1', 80)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=3)\n"
        "    except OSError as e:\n"
        "        print(addr[0], type(e).__name__, e.errno)\n"
        "socket.create_connection(('8.8.8.8', 53), timeout=3)\n"
    )
    start = time.monotonic()
    r = run_python(code)
    assert time.monotonic() - start < 2
    assert r.stdout == "127.0.0.1 OSError 101\n1.1.1.1 OSError 101\n"  # ENETUNREACH
    assert (r.ok, r.error) == (False, "network unavailable")


@needs_jail
def test_cannot_write_outside_or_read_the_project():
    name = f"escape-{uuid.uuid4().hex}.txt"
    targets = [f"/tmp/{name}", str(REPO / name), f"/usr/{name}", f"/{name}"]
    code = (
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
        f"open({str(REPO / 'pyproject.toml')!r}).read()\n"
    )
    r = run_python(code)
    assert "wrote" not in r.stdout
    assert r.stdout.count("Error") == len(targets)
    assert r.stderr.rstrip().endswith(f"No such file or directory: '{REPO / 'pyproject.toml'}'")
    for path in targets:
        assert not os.path.exists(path)


def jail_listing(paths: list[str]) -> dict[str, list[str] | str]:
    """What the code in the jail sees at each path: its entries, or the error listing raises."""
    code = (
        "import json, os\n"
        "def entries(path):\n"
        "    try:\n"
        "        return sorted(os.listdir(path))\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
        f"print(json.dumps({{path: entries(path) for path in {paths!r}}}))\n"
    )
    r = run_python(code, max_output=1_000_000)
    assert r.ok and not r.truncated, r.as_tool_text()
    return json.loads(r.stdout)


def on_the_way(bind: str, top: str) -> list[str]:
    """The directories from `top` (included) down to `bind` (excluded)."""
    return [str(d) for d in Path(bind).parents if str(d) == top or str(d).startswith(top + "/")]


@needs_jail
def test_root_of_the_jail_holds_only_its_binds():
    binds, links = sandbox._jail_layout()
    tops = {b.split("/")[1] for b in binds} | {link.lstrip("/") for link, _ in links}
    listing = jail_listing(["/", "/dev", "/sandbox"])
    assert listing["/"] == sorted(tops | {"dev", "sandbox"})
    assert listing["/dev"] == ["null", "random", "urandom", "zero"]
    assert listing["/sandbox"] == ["main.py"]


@needs_jail
@pytest.mark.parametrize("path", ["/etc", "/home", "/tmp", "/root", str(REPO)])
def test_host_directories_are_absent(path):
    """Absent, unless the Python install lives below `path` (pyenv under /root): then the
    directories from `path` down to it hold nothing of the host's but that way, and the code
    cannot list them."""
    binds, _ = sandbox._jail_layout()
    way = sorted({d for bind in binds for d in on_the_way(bind, path)})
    if not way:
        assert jail_listing([path]) == {path: "FileNotFoundError"}
        return
    host = [str(Path(d, name)) for d in way for name in os.listdir(d)]
    others = [p for p in host if p not in way and p not in binds]
    assert others, f"nothing else in {way} on the host: the test shows nothing"
    listing = jail_listing(way + others)
    assert {d: listing[d] for d in way} == dict.fromkeys(way, "PermissionError")
    assert {p: listing[p] for p in others} == dict.fromkeys(others, "FileNotFoundError")


@needs_jail
def test_directories_leading_to_a_bind_show_nothing_else(monkeypatch, tmp_path):
    """Whatever is bound (the Python install is), the directories on its way into the jail are
    new, hold only that way, and cannot be listed: here a folder below /tmp."""
    bound = tmp_path / "bound"
    bound.mkdir()
    (bound / "shown.txt").write_text("shown")
    (tmp_path / "host-secret.txt").write_text("secret")
    binds, links = sandbox._jail_layout()
    monkeypatch.setattr(sandbox, "_jail_layout", lambda: ([*binds, str(bound)], links))
    way = on_the_way(str(bound), "/tmp")
    secret = str(tmp_path / "host-secret.txt")
    listing = jail_listing([*way, str(bound), secret])
    assert {d: listing[d] for d in way} == dict.fromkeys(way, "PermissionError")
    assert listing[str(bound)] == ["shown.txt"]
    assert listing[secret] == "FileNotFoundError"


@needs_jail
def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("STACKLAB_SECRET", "hunter2")
    r = run_python("import os, sys\nprint(sorted(os.environ), sys.flags.isolated, os.getuid())")
    assert r.stdout == "['HOME', 'LANG', 'PATH', 'TMPDIR'] 1 65534\n"


@needs_jail
def test_output_flood_is_truncated():
    r = run_python("while True: print('x' * 10**6)", max_output=100)
    assert r.truncated and r.stdout == "x" * 100
    assert (r.ok, r.error) == (False, "file size limit")
    text = r.as_tool_text()
    assert len(text) <= 100 + len("\n[output truncated]") and text.endswith("[output truncated]")


@needs_jail
def test_stderr_keeps_its_tail():
    r = run_python(
        "import sys\nsys.stderr.write('noise ' * 5000)\nraise KeyError('end')", max_output=50
    )
    assert r.truncated and len(r.stderr) == 50 and r.stderr.rstrip().endswith("KeyError: 'end'")


@needs_jail
def test_temp_dir_is_removed(jail_dirs):
    run_python("open('junk.txt', 'w').write('y' * 1000)")
    run_python("import time; time.sleep(60)", timeout_s=0.5)
    assert len(jail_dirs) == 2 and not any(os.path.exists(p) for p in jail_dirs)


@needs_jail
def test_failed_setup_fails_closed(monkeypatch):
    monkeypatch.setattr(sandbox, "_jail_layout", lambda: (["/no/such/dir"], []))
    r = run_python("print('ran')")
    assert not r.ok and r.stdout == ""
    assert r.error.startswith("sandbox unavailable: ")


def test_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    r = run_python("print('ran')")
    assert (r.ok, r.stdout) == (False, "")
    assert r.error.startswith("sandbox unavailable: needs root")


def test_tool_text_rendering():
    r = SandboxResult(False, "out\n", "err\n", "exit code 2", False)
    assert r.as_tool_text() == "out\n\n[stderr]\nerr\n\n[error: exit code 2]"
    assert SandboxResult(True, "", "", None, False).as_tool_text() == "[no output]"
    long = SandboxResult(True, "y" * 30, "", None, False, max_output=10)
    assert long.as_tool_text() == "y" * 10 + "\n[output truncated]"
