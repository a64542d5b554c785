"""9: the install a technician does on a laptop: `pipx install .` from this checkout into a private
PIPX_HOME / PIPX_BIN_DIR (dependencies from the package registry or pip's cache), then the
installed `gridshed` from a directory outside the checkout: boards, meters, build, sim with a
shipped scenario, and deploy to a virtual board (vboard started, deploy --port, status, Ctrl-C).

`make test` checks the same commands on the wheel installed with pip into a temporary venv
(tests/host/test_packaging.py); pipx downloads or unpacks every dependency into its own venv,
which takes longer than the test budget, so it runs here and in `make pipx-check`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, say

SECTIONS = ("install",)  # the names `--only` takes for this module
DEFAULT = True  # part of a plain `make bench`


def add_args(ap: argparse.ArgumentParser) -> None:
    pass


def _pipx() -> list[str]:
    exe = Path(sys.executable).with_name("pipx")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("pipx")
    if not found:
        raise RuntimeError("pipx not found: `make setup` installs it (the test extra of pyproject.toml)")
    return [found]


def pipx_check(work: Path) -> dict[str, Any]:
    """pipx install . and the technician's commands with the installed script; raises on a failure."""
    home, bindir, elsewhere = work / "pipx-home", work / "pipx-bin", work / "elsewhere"
    elsewhere.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "GRIDSHED_ROOT")}
    env.update(PIPX_HOME=str(home), PIPX_BIN_DIR=str(bindir), PIPX_MAN_DIR=str(work / "pipx-man"),
               GRIDSHED_INVENTORY=str(work / "inventory.sqlite"), XDG_DATA_HOME=str(work / "xdg"))
    # the checkout's own venv is not on PATH: the installed script must find everything in its own venv
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([str(bindir)] + [p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin])
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    r = subprocess.run(_pipx() + ["install", str(ROOT)], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError("pipx install . failed: " + (r.stderr or r.stdout)[-1500:])
    out["pipx_install_s"] = round(time.monotonic() - t0, 1)
    gs = bindir / "gridshed"
    if not gs.exists():
        raise RuntimeError("pipx put no gridshed in PIPX_BIN_DIR")

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        res = subprocess.run([str(gs), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode:
            raise RuntimeError("gridshed %s failed (%d): %s" % (" ".join(args), res.returncode, res.stderr[-800:]))
        return res

    out["boards"] = len(json.loads(run("boards", "--json").stdout))
    out["meters"] = len(json.loads(run("meters", "--json").stdout))
    run("build", "--board", "unix-sim")
    out["build_files"] = len(json.loads((elsewhere / "build" / "unix-sim" / "manifest.json").read_text())["files"])
    s = json.loads(run("sim", "ercot_ffr_dip.csv", "--site", "demo-site.toml", "--json", timeout=300).stdout)
    out["sim_trips"] = [t["cause"] for t in s["trips"]]
    if not out["sim_trips"]:
        raise RuntimeError("the shipped scenario tripped nothing")
    vb = subprocess.Popen([str(gs), "vboard", "--json", "--dir", str(work / "vboard")], cwd=elsewhere, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert vb.stdout is not None
        port = None
        for line in vb.stdout:
            ev = json.loads(line)
            if ev["event"] == "port":
                port = ev["port"]
            if ev["event"] == "ready":
                break
            if ev["event"] == "not-ready":
                raise RuntimeError("the installed agent did not poll the simulated meter: %s" % ev)
        if port is None:
            raise RuntimeError("gridshed vboard printed no port: " + (vb.stderr.read() if vb.stderr else "")[-800:])
        dep = json.loads(run("deploy", "--port", port, "--board", "unix-sim", "--json").stdout)
        st = json.loads(run("status", "--port", port, "--json").stdout)
        if st.get("build") != dep["build_id"]:
            raise RuntimeError("status shows build %s, deploy wrote %s" % (st.get("build"), dep["build_id"]))
        out["deploy_bytes"] = dep.get("bytes_written")
        out["status_state"] = st.get("state")
    finally:
        vb.send_signal(signal.SIGINT)
        try:
            vb.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            vb.kill()
            vb.communicate()
    if vb.returncode:
        raise RuntimeError("gridshed vboard exited %s after Ctrl-C" % vb.returncode)
    out["ok"] = True
    return out


def bench_install(res: dict[str, Any]) -> None:
    work = Path(tempfile.mkdtemp(prefix="gridshed-bench-pipx-"))
    say("install: pipx install . into %s, then boards/meters/build/sim/vboard+deploy" % work)
    try:
        res["install"] = pipx_check(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(res: dict[str, Any], a: argparse.Namespace) -> None:
    bench_install(res)


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """This section's rows of the table `make bench` prints (figure, value, vs reference / note)."""
    i = res.get("install")
    if not i:
        return []
    return [("9 pipx install . (fresh PIPX_HOME)", "%s s" % i["pipx_install_s"],
             "then boards %d, meters %d, build, sim (%s), deploy + status OK" % (
                 i["boards"], i["meters"], ",".join(i["sim_trips"][:1])))]
