"""The wheel a technician installs (`pip install gridshed-*.whl`, `pipx install .`) works outside
the checkout: board files, meter maps, scenarios and the firmware ship inside it, and it installs
no top-level package but `gridshed`.

The wheel is built from this tree and installed with --no-deps into a folder of its own; the
commands then run from another directory with `python -S` (no site-packages .pth files, so the
checkout's editable install is not on the path) and only the installed wheel plus the libraries
it depends on importable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
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


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]))
    env.pop("GRIDSHED_ROOT", None)

    def gridshed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", "-c", "from gridshed.cli import main; main()", *args],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)

    gridshed.target = target  # type: ignore[attr-defined]
    gridshed.cwd = elsewhere  # type: ignore[attr-defined]
    return gridshed


def test_wheel_has_one_top_level_package_and_the_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"gridshed", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for folder, pattern in (("boards", ".json"), ("meters", ".json"), ("scenarios", ".csv"),
                            ("scenarios", ".toml"), ("firmware/agent", ".py"), ("firmware/agent/hal", ".py")):
        here = {p.name for p in (ROOT / folder).glob("*" + pattern)}
        shipped = {n.rsplit("/", 1)[1] for n in names
                   if n.startswith(f"gridshed/_data/{folder}/") and n.count("/") == folder.count("/") + 3
                   and n.endswith(pattern)}
        assert here and here == shipped, folder
    assert "gridshed/_data/firmware/main.py" in names


def test_installed_cli_reads_its_own_data(installed):
    r = installed("boards", "--json")
    assert r.returncode == 0, r.stderr
    names = {b["name"] for b in json.loads(r.stdout)}
    assert names == {p.stem for p in (ROOT / "boards").glob("*.json")}
    r = installed("meters", "--json")
    assert r.returncode == 0, r.stderr
    assert {m["model"] for m in json.loads(r.stdout)} == {p.stem for p in (ROOT / "meters").glob("*.json")}
    # the firmware's pure modules come from the installed copy, not the checkout
    r = subprocess.run([sys.executable, "-S", "-c", "import gridshed, agent.cbor; print(agent.cbor.__file__)"],
                       cwd=installed.cwd, env=dict(os.environ, PYTHONPATH=str(installed.target)),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(installed.target)), r.stdout


def test_installed_cli_builds_and_simulates(installed):
    r = installed("build", "--board", "unix-sim")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((installed.cwd / "build" / "unix-sim" / "manifest.json").read_text())
    assert any(e["file"] == "main.py" for e in manifest["files"])
    assert any(e["file"].startswith("agent/") for e in manifest["files"])
    # a shipped scenario and site by name, from a directory that has neither
    r = installed("sim", "ercot_ffr_dip.csv", "--site", "demo-site.toml", "--json", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["trips"] and summary["trips"][0]["cause"] == "under-frequency"
