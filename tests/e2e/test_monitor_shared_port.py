"""docs/bring-up.md step 5: `gridshed monitor` in one window, `gridshed shed` / `restore` in
another, on the same serial port (one USB board). The monitor holds the port only while it asks
(once per refresh) and the other commands wait for it (transport.BUSY_WAIT); before, the shed
failed with "Could not exclusively lock port" for as long as the monitor ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_signed_commands import agent_build, cli, console, meter, rig  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def test_shed_and_restore_while_monitor_runs_on_the_port(rig):  # noqa: F811
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "host_tools"), str(ROOT / "firmware")]))
    mon = subprocess.Popen([sys.executable, "-m", "gridshed.cli", "monitor", "--port", rig.board.port, "--count",
                            "40", "--interval", "0.1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
    try:
        assert mon.stdout is not None
        first = json.loads(mon.stdout.readline())  # the monitor is running (it answered once)
        assert first.get("state") == "normal", first
        inv = str(rig.inventory)
        for verb in ("shed", "restore"):
            r = cli(verb, "--device", rig.dev, "--port", rig.board.port, "--inventory", inv, "--json", timeout=90)
            assert r.returncode == 0, r.stdout + r.stderr
            assert json.loads(r.stdout)["ok"], r.stdout
            if verb == "shed":
                assert rig.gpio.wait(lambda: not any(rig.closed()), 20), "relays did not open"
        assert mon.poll() is None, "the monitor ended before the commands were done"
        out, err = mon.communicate(timeout=120)
    finally:
        if mon.poll() is None:
            mon.kill()
    assert mon.returncode == 0 and "Traceback" not in err, err
    recs = [first] + [json.loads(x) for x in out.splitlines()]
    assert len(recs) == 40 and all("state" in x for x in recs), [x for x in recs if "state" not in x][:2]
    assert "tripped" in {x["state"] for x in recs}  # it saw the shed it shared the port with
    assert console(rig, "status")["commands"]["accepted"] == 2
