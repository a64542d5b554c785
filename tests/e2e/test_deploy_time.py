"""`gridshed deploy` gives the restarted agent its signed time (docs/security.md, section 4), the
same exchange provision and rotate-key make (gridshed.provision.send_time): on a virtual board at
the budget heap, after a plain deploy a signed restore that carries no nonce (accepted only by a
board whose clock is trusted) works without any other step; a time step that fails never fails
the deploy: one warning line, the agent runs."""
from __future__ import annotations

import json

from gridshed.fleet_client import seq_file
from gridshed.inventory import Inventory
from gridshed.signing import SeqCounter, make_command
from test_signed_commands import agent_build, cli, console, meter, rig, send  # noqa: F401


def test_deploy_sends_the_signed_time_then_a_failed_time_step_is_one_warning(rig, agent_build):  # noqa: F811
    inv, port = str(rig.inventory), rig.board.port
    assert console(rig, "nonce")["time_trusted"] is False
    seqs = SeqCounter(seq_file(inv))  # the CLI's own seq counter (the time-sync takes one too)
    no_nonce = make_command(rig.key, rig.kid, "restore", seqs.next(rig.kid), target_device=rig.dev)
    assert send(rig, no_nonce) == {"ok": False, "refused": "stale"}  # untrusted clock: needs a nonce
    r = cli("deploy", "--port", port, "--build", str(agent_build), "--inventory", inv, "--json", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout)
    assert s["signed_time"] == {"sent": True, "device": rig.dev, "why": None}, s
    assert s["restart"] == ("agent restarted: it answers @status (state normal); "
                            "signed time sent (its clock is trusted)") and s["warnings"] == [], s
    with Inventory(inv) as i:  # the inventory knows the build the board now runs
        assert i.get(rig.dev)["firmware_build"] == s["build_id"] == s["agent_status"]["build"]
    # nothing else sent: a signed shed, then a restore without a nonce, are accepted
    assert send(rig, make_command(rig.key, rig.kid, "shed", seqs.next(rig.kid), target_device=rig.dev))["ok"]
    assert rig.gpio.wait(lambda: not any(rig.closed()), 20), "relays did not open"
    assert send(rig, make_command(rig.key, rig.kid, "restore", seqs.next(rig.kid), target_device=rig.dev))["ok"]
    assert rig.gpio.wait(lambda: all(rig.closed()), 40), "relays did not close"
    # the inventory's key for the board's key id is wrong: the board refuses the time (bad-mac);
    # the deploy still succeeds, says so in one warning line, the agent runs
    with Inventory(inv) as i:
        i.record_provision(rig.dev, "unix-sim", rig.cfg["site"], rig.kid.hex(), bytes(32), None, "x")
    r = cli("deploy", "--port", port, "--build", str(agent_build), "--inventory", inv, timeout=180)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith("; agent restarted: it answers @status (state normal)"), r.stdout
    warns = [x for x in r.stderr.splitlines() if x.startswith("gridshed: warning:")]
    assert len(warns) == 1 and "could not send the signed time (the board refused it: bad-mac)" in warns[0] \
        and f"gridshed time-sync --device {rig.dev} --port {port}" in warns[0], r.stderr
    st = console(rig, "status")
    assert st["state"] == "normal" and st["armed"] is True and st["time_trusted"] is False, st
    # an inventory without the device (the board's key is elsewhere): no time, one warning saying so
    other = str(rig.inventory.with_name("other.sqlite"))
    r = cli("deploy", "--port", port, "--build", str(agent_build), "--inventory", other, "--json", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout)
    assert s["signed_time"] == {"sent": False, "device": rig.dev,
                                "why": f"device {rig.dev} is not in the inventory {other}"}, s
    assert len(s["warnings"]) == 1 and f"`gridshed time-sync --device {rig.dev}` from the host that holds its key" \
        in s["warnings"][0], s
    rig.expect_restarts = 3  # the three deploys


CTRL_C_AT_TIME = r"""
import os, signal, sys
from gridshed import cli, fleet_client
def time_sync_serial(*a, **k):  # the technician's Ctrl-C lands while the signed time is being sent
    os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt raised here, as from a terminal
    raise AssertionError("no KeyboardInterrupt")
fleet_client.time_sync_serial = time_sync_serial
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_during_the_time_step_then_a_build_that_refuses_the_config(rig, agent_build):  # noqa: F811
    """Ctrl-C once the deploy is done (the agent back, the time step running) skips only the time
    step: the one-line result, rc 0, a warning naming the time-sync; the agent runs. Then a build
    that refuses the board's config: exit 1, PROTECTION IS OFF said, the way back works."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "host_tools"), str(root / "firmware")]))
    r = subprocess.run([sys.executable, "-c", CTRL_C_AT_TIME, "deploy", "--port", rig.board.port, "--build",
                        str(agent_build), "--inventory", str(rig.inventory)], capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("deployed build ") and \
        r.stdout.strip().endswith("; agent restarted: it answers @status (state normal)"), r.stdout
    warns = [x for x in r.stderr.splitlines() if x.startswith("gridshed: warning:")]
    assert len(warns) == 1 and "could not send the signed time (interrupted (Ctrl-C))" in warns[0], r.stderr
    assert console(rig, "status")["state"] == "normal"

    # a build that refuses the board's config (an older build: its validator does not know a key
    # the config has): the write is done but the agent does not run: exit 1, one error line
    # saying PROTECTION IS OFF and the way back (the walk: exit 0, the restart line only)
    import shutil

    from gridshed.build import build

    src = rig.dir.parent / "old-firmware"
    shutil.copytree(root / "firmware", src, ignore=shutil.ignore_patterns("__pycache__"))
    boot = src / "agent" / "boot.py"
    text = boot.read_text()
    assert "    errors = config.validate(cfg)\n" in text
    boot.write_text(text.replace("    errors = config.validate(cfg)\n",
                                 "    errors = config.validate(cfg) + ['meter.poll_mode: unknown key']\n", 1))
    old = build("unix-sim", src=src, out=rig.dir.parent / "old-build")["path"]
    r = cli("deploy", "--port", rig.board.port, "--build", str(old), timeout=180)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert err[-1].startswith(f"gridshed: error: {rig.board.port}: build ") and \
        "refuses the board's config (meter.poll_mode: unknown key): the agent does not run, PROTECTION IS OFF" \
        in err[-1] and "`gridshed deploy --board unix-sim`" in err[-1], err
    assert r.stdout.strip().endswith("PROTECTION IS OFF"), r.stdout
    assert console(rig, "status")["state"] == "refused"
    r = cli("deploy", "--port", rig.board.port, "--build", str(agent_build), timeout=180)  # the way back
    assert r.returncode == 0 and console(rig, "status")["state"] == "normal", r.stdout + r.stderr
    rig.expect_restarts = 3
