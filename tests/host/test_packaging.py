"""The wheel a technician installs (`pip install gridshed-*.whl`, `pipx install .`) works outside
the checkout: board files, meter maps, scenarios and the firmware ship inside it, and it installs
no top-level package but `gridshed`.

The wheel is built once from this tree and installed into a fresh temporary venv with pip
(`--no-deps`); its `gridshed` console script then runs from a directory outside the checkout:
boards, meters, build, sim with a shipped scenario by name, and deploy to a virtual board started
with the installed `gridshed vboard`. The wheel's dependencies are not downloaded again (that
would cost a minute per run): a .pth file in the temp venv puts this checkout's installed
libraries on the path *after* the venv's own site-packages, so `gridshed` and its firmware come
from the wheel and only the third-party libraries come from the checkout's venv (.pth files
there, such as the editable install's hook, are not run). The unix-port `micropython` is found
on PATH after the venv's own bin/, as a full install finds it in its own bin/.

`pipx install .` (a venv of its own with every dependency installed, about 15 s with a warm pip
cache) runs the same commands in `make pipx-check` and `make bench` (bench/install.py), not here.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("gridshed-*.whl")
    return whl


class Installed:
    """The wheel installed in a fresh venv; runs its console script from a directory elsewhere."""

    def __init__(self, venv: Path, cwd: Path, env: dict[str, str]) -> None:
        self.venv, self.cwd, self.env = venv, cwd, env
        self.script = venv / "bin" / "gridshed"
        self.python = venv / "bin" / "python"
        self.sim: subprocess.Popen | None = None

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.script), *args], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([str(self.script), *args], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    base = tmp_path_factory.mktemp("installed")
    venv = base / "venv"
    r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the checkout venv's third-party libraries, after the venv's own site-packages
    Path(purelib, "zz_checkout_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GRIDSHED_ROOT", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    env["GRIDSHED_INVENTORY"] = str(base / "inventory.sqlite")
    env["XDG_DATA_HOME"] = str(base / "xdg-data")
    env["XDG_CONFIG_HOME"] = str(base / "xdg-config")
    inst = Installed(venv, elsewhere, env)
    # the shipped scenario plays in real time (26 s): started now, checked by test_installed_cli_simulates
    inst.sim = inst.popen("sim", "ercot_ffr_dip.csv", "--site", "demo-site.toml", "--json")
    yield inst
    if inst.sim is not None and inst.sim.poll() is None:
        inst.sim.kill()
        inst.sim.communicate(timeout=30)


def test_wheel_has_one_top_level_package_and_the_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"gridshed", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for folder, pattern in (("boards", ".json"), ("meters", ".json"), ("scenarios", ".csv"),
                            ("scenarios", ".toml")):
        here = {p.name for p in (ROOT / folder).glob("*" + pattern)}
        shipped = {n.rsplit("/", 1)[1] for n in names
                   if n.startswith(f"gridshed/_data/{folder}/") and n.count("/") == folder.count("/") + 3
                   and n.endswith(pattern)}
        assert here and here == shipped, folder
    assert "gridshed/_data/firmware/main.py" in names
    # every firmware source, in every subpackage (agent/hal, agent/features, ...)
    fw = {p.relative_to(ROOT).as_posix() for p in (ROOT / "firmware").rglob("*.py") if "__pycache__" not in p.parts}
    shipped = {n[len("gridshed/_data/"):] for n in names if n.startswith("gridshed/_data/firmware/") and n.endswith(".py")}
    assert len(fw) > 40 and fw == shipped, sorted(fw ^ shipped)


def test_console_script_runs_the_installed_copy(installed):
    assert installed.script.exists(), "the wheel installed no gridshed console script"
    first = installed.script.read_text().splitlines()[0]
    assert first == "#!" + str(installed.python), first
    # gridshed and the firmware's pure modules it imports come from the venv, not the checkout
    r = subprocess.run([str(installed.python), "-c", "import gridshed, agent.cbor; print(gridshed.__file__); "
                                                     "print(agent.cbor.__file__)"],
                       cwd=installed.cwd, env=installed.env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.split():
        assert line.startswith(str(installed.venv)) and not line.startswith(str(ROOT)), r.stdout
    r = installed("--help")
    assert r.returncode == 0 and "vboard" in r.stdout and "exporter" in r.stdout, r.stderr


def test_installed_cli_reads_its_own_data(installed):
    r = installed("boards", "--json")
    assert r.returncode == 0, r.stderr
    names = {b["name"] for b in json.loads(r.stdout)}
    assert names == {p.stem for p in (ROOT / "boards").glob("*.json")}
    r = installed("meters", "--json")
    assert r.returncode == 0, r.stderr
    assert {m["model"] for m in json.loads(r.stdout)} == {p.stem for p in (ROOT / "meters").glob("*.json")}
    # the Grafana dashboard ships too
    r = installed("exporter", "--dashboard")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((ROOT / "docs" / "grafana" / "gridshed.json").read_text())


def test_installed_cli_builds(installed):
    r = installed("build", "--board", "unix-sim")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((installed.cwd / "build" / "unix-sim" / "manifest.json").read_text())
    assert any(e["file"] == "main.py" for e in manifest["files"])
    assert any(e["file"].startswith("agent/") for e in manifest["files"])


class Lines:
    """stdout of a long-running command, line by line, with a bounded wait for a marker."""

    def __init__(self, p: subprocess.Popen) -> None:
        self.p = p
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put("")

    def wait(self, event: str, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if not line:
                raise AssertionError(f"gridshed vboard exited: {self.seen}")
            ev = json.loads(line)
            if ev.get("event") == event:
                return ev
        raise AssertionError(f"no {event!r} event from gridshed vboard; got {self.seen}")


def test_installed_cli_deploys_to_a_virtual_board(installed):
    """vboard start -> deploy --port <pty> -> status -> stop, each with the installed console script."""
    vb = installed.popen("vboard", "--json", "--dir", str(installed.cwd / "vboard"))
    lines = Lines(vb)
    try:
        port = lines.wait("port", 60)["port"]
        assert port.startswith("/dev/pts/")
        lines.wait("ready")
        r = installed("deploy", "--port", port, "--board", "unix-sim", "--json", timeout=180)
        assert r.returncode == 0, r.stderr
        dep = json.loads(r.stdout)
        r = installed("status", "--port", port, "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["build"] == dep["build_id"], (st, dep)
        assert st["state"] == "normal" and st["meter_ok"], st
    finally:
        vb.send_signal(signal.SIGINT)  # Ctrl-C
        rc = vb.wait(60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not lines.seen or lines.seen[-1] != ""):
        try:
            lines.seen.append(lines.q.get(timeout=1))
        except queue.Empty:
            pass
    err = vb.stderr.read() if vb.stderr else ""
    assert rc == 0 and "Traceback" not in err, err
    stopped = json.loads([x for x in lines.seen if x][-1])
    assert stopped["event"] == "stopped" and stopped["health"]["memory_errors"] == 0, stopped
    assert stopped["health"]["tracebacks"] == 0, stopped


def test_installed_cli_simulates_a_shipped_scenario(installed):
    # started by the fixture (a shipped scenario and site by name, from a directory that has neither)
    assert installed.sim is not None
    out, err = installed.sim.communicate(timeout=240)
    assert installed.sim.returncode == 0, err[-2000:]
    summary = json.loads(out)
    assert summary["trips"] and summary["trips"][0]["cause"] == "under-frequency"
