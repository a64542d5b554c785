"""The technician's chain on the real agent, on a virtual board at the budget heap:

blank board -> `gridshed build` -> `deploy` -> `provision --check` -> `provision` -> `status` ->
`monitor` (with the meter failing and coming back) -> re-deploy over the running, provisioned
agent (unchanged, then forced) -> re-provision (a new key), plus the refusals on the way: a
site for another board, a board that runs a build for another board, and writes that do not
verify (a flaky cable flipping bytes: nothing switched, the agent keeps running its old files).

Every step is the real CLI in its own process (`python -m gridshed.cli ...`), as a technician
runs it; the board is the real agent (mpy-cross build) on the unix port, its console a pty, a
pymodbus meter on a paced RS-485 wire, GPIO served by the rig. The inventory records the build
the board runs (never None after a deploy).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from gridshed import siteconfig
from gridshed.inventory import Inventory
from gridshed.vboard import VirtualBoard

from rig import HEAP, Rig, _Gpio, check_board

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "scenarios" / "demo-site.toml"
DEV = "site1-ctl9"


def gs(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "host_tools"), str(ROOT / "firmware")]))
    return subprocess.run([sys.executable, "-m", "gridshed.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line_error(r: subprocess.CompletedProcess, needle: str) -> str:
    # progress lines ("stopping the agent...") may come first; the error is one line, the last
    err = r.stderr.strip().splitlines()
    errors = [x for x in err if x.startswith("gridshed: error:")]
    assert r.returncode == 2 and errors == err[-1:] and needle in err[-1] and "Traceback" not in r.stderr, \
        (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    return err[-1]


FLAKY = r"""
import sys
from gridshed import cli, transport
real = transport.Board.put
def put(self, path, data, progress=None):
    if path.endswith(%r):   # a cable that flips a byte in every write of this file
        data = bytes(data[:-1]) + bytes([data[-1] ^ 0x55])
    return real(self, path, data, progress)
transport.Board.put = put
sys.exit(cli.main(sys.argv[1:]))
"""


def gs_flaky(suffix: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "host_tools"), str(ROOT / "firmware")]))
    return subprocess.run([sys.executable, "-c", FLAKY % suffix, *args], capture_output=True, text=True,
                          timeout=180, env=env)


def test_build_deploy_provision_status_monitor_redeploy_reprovision(tmp_path):
    async def main() -> None:
        cfg = siteconfig.load_site(SITE)
        rig = Rig(cfg, tmp_path / "board", heapsize=HEAP)
        # the rig's site (GPIO, meter on its wire) around a blank board: no agent, no config
        rig.gpio = _Gpio(rig)
        gport = await rig.gpio.start()
        from gridshed.sim.wire import Wire

        rig.wire = Wire(cfg["meter"]["baud"]).start()
        await rig.start_meter()
        bdir = tmp_path / "board"
        bdir.mkdir()
        (bdir / "sim.json").write_text(json.dumps({"gpio": f"127.0.0.1:{gport}",
                                                   "uarts": {"meter": rig.wire.board_path}}))
        rig.board = board = VirtualBoard(bdir, heapsize=HEAP).start()
        port = board.port
        inv = tmp_path / "inv.sqlite"
        try:
            await chain(rig, board, port, inv, tmp_path)
        finally:
            await rig.close()

    asyncio.run(main())


async def agent_up(rig: Rig, board: VirtualBoard, n: int) -> None:
    """Until the console has said "agent up" n times since the board was blank."""
    await rig.until(lambda: board.output().count(b"agent up") >= n, 90, f"'agent up' #{n}")


async def chain(rig: Rig, board: VirtualBoard, port: str, inv: Path, tmp: Path) -> None:
    run = asyncio.to_thread
    # ---- build ------------------------------------------------------------------------------
    out = tmp / "build"
    r = await run(gs, "build", "--board", "unix-sim", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    build_id, nfiles = m["build_id"], len(m["files"])
    assert re.fullmatch(r"[0-9a-f]{8,}", build_id) and nfiles > 20

    # ---- deploy onto the blank board ----------------------------------------------------------
    r = await run(gs, "deploy", "--port", port, "--build", str(out), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["build_id"] == build_id and sorted(s["written"]) == sorted(e["file"] for e in m["files"])
    assert s["unchanged"] == [] and s["removed"] == [] and s["restarted"] is True
    # no config yet: the agent refuses and says why, touching no relay
    assert await run(board.wait_output, "config: ", 60), board.output()[-800:]
    assert rig.pin_log == []

    # ---- provision --check: the site file against the board, nothing touched ------------------
    r = await run(gs, "provision", "--check", "--site", str(SITE), "--device-id", DEV, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ok": True, "device": DEV, "board": "unix-sim", "warnings": []}
    r = await run(gs, "provision", "--check", "--site", str(SITE), "--board", "rpi-pico", "--device-id", DEV)
    one_line_error(r, "board: 'unix-sim' but the board is a rpi-pico")
    assert not (board.fs_dir / "config.cbor").exists()

    # ---- a site for a Pico on this unix-sim build: refused before anything is written -------------
    pico_site = tmp / "pico-site.toml"
    text = SITE.read_text().replace('board = "unix-sim"\n', "")
    pico_site.write_text(text.split("[[blocks]]")[0] + "[[blocks]]" + "[[blocks]]".join(text.split("[[blocks]]")[1:4]))
    r = await run(gs, "provision", "--check", "--site", str(pico_site), "--board", "rpi-pico", "--device-id", DEV)
    assert r.returncode == 0, r.stderr  # a valid Pico site
    r = await run(gs, "provision", "--port", port, "--site", str(pico_site), "--board", "rpi-pico",
                  "--device-id", DEV, "--inventory", str(inv))
    one_line_error(r, f"{port}: the board runs a build for unix-sim, not rpi-pico")
    assert not (board.fs_dir / "config.cbor").exists()
    if inv.exists():
        with Inventory(inv) as i:
            assert i.get(DEV) is None
    # the first deploy's restart, and the refused provision put the agent back to work
    assert await run(board.wait_restarts, 2, 60), board.restarts

    # ---- provision: config + key, recorded with the build the board runs ------------------------
    r = await run(gs, "provision", "--port", port, "--site", str(SITE), "--device-id", DEV,
                  "--inventory", str(inv), "--json")
    assert r.returncode == 0, r.stderr
    p1 = json.loads(r.stdout)
    assert p1["device_id"] == DEV and p1["board"] == "unix-sim" and p1["firmware_build"] == build_id
    assert p1["agent"] == {"state": "normal", "device": DEV} and p1["warnings"] == []
    cfg = siteconfig.read_settings((board.fs_dir / "config.cbor").read_bytes())
    assert cfg["device"] == DEV and p1["config_hash"] == siteconfig.config_hash(cfg)
    with Inventory(inv) as i:
        rec = i.get(DEV)
        assert rec["firmware_build"] == build_id and rec["key_id"] == p1["key_id"]
    await rig.until(rig.all_closed, 60, "relays closed by the provisioned agent")
    await rig.until(lambda: rig.good_polls() > 5, 60, "meter polls")

    # ---- status: the real agent's answer -------------------------------------------------------
    r = await run(gs, "status", "--port", port, "--json", "--inventory", str(inv))
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["device"] == DEV and st["build"] == build_id and st["state"] == "normal"
    import hashlib

    raw_hash = hashlib.sha256((board.fs_dir / "config.cbor").read_bytes()).hexdigest()[:16]
    assert st["config_hash"] == p1["config_hash"] == raw_hash, (st["config_hash"], p1["config_hash"], raw_hash)
    assert st["meter_ok"] is True and st["mask"] == 15
    assert st["inventory_updated"] is True and any(e.get("k") == "boot" for e in st["events"]), st["events"]
    r = await run(gs, "status", "--port", port)
    assert r.returncode == 0 and DEV in r.stdout and build_id in r.stdout, r.stdout

    # ---- monitor, with the meter failing and coming back ----------------------------------------
    await rig.stop_meter()
    await rig.until(rig.all_open, 60, "meter-loss shed (failsafe meter_loss = shed)")
    r = await run(gs, "monitor", "--port", port, "--json", "--count", "2", "--interval", "0.1")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(lines) == 2 and all(x["meter_ok"] is False and x["reason"] == "meter_loss" and x["mask"] == 0
                                   for x in lines), lines
    await rig.start_meter()
    await rig.until(rig.all_closed, 90, "restore once the meter is back")
    r = await run(gs, "monitor", "--port", port, "--count", "1", "--interval", "0.1")
    assert r.returncode == 0 and "Hz" in r.stdout, r.stdout + r.stderr

    # ---- re-deploy over the running, provisioned agent ------------------------------------------
    r = await run(gs, "deploy", "--port", port, "--build", str(out), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["written"] == [] and len(s["unchanged"]) == nfiles and s["bytes_written"] == 0
    await agent_up(rig, board, 2)  # the deploy restarted the agent, with its config
    r = await run(gs, "deploy", "--port", port, "--build", str(out), "--force", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert len(s["written"]) == nfiles and s["restarted"] is True
    # the provisioned config and key survived; the agent is back with them
    assert siteconfig.read_settings((board.fs_dir / "config.cbor").read_bytes()) == cfg
    r = await run(gs, "status", "--port", port, "--json", timeout=180)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["device"] == DEV and st["build"] == build_id and st["config_hash"] == p1["config_hash"]

    # ---- writes that do not verify: nothing switched, the old files keep running -----------------
    keys_before = (board.fs_dir / "keys.cbor").read_bytes()
    r = await run(gs_flaky, "keys.cbor.gsnew", "provision", "--port", port, "--site", str(SITE),
                  "--device-id", DEV, "--inventory", str(inv))
    one_line_error(r, "keys.cbor does not verify after writing; nothing was changed")
    assert (board.fs_dir / "keys.cbor").read_bytes() == keys_before
    # and the agent was put back to work (a host operation never leaves protection off)
    assert await run(board.wait_restarts, 6, 60), board.restarts
    await agent_up(rig, board, 4)
    with Inventory(inv) as i:
        assert i.get(DEV)["key_id"] == p1["key_id"]  # the inventory did not move either
    r = await run(gs_flaky, "agent/app.mpy.gsnew", "deploy", "--port", port, "--build", str(out), "--force")
    one_line_error(r, "agent/app.mpy does not verify after writing (hash differs); nothing was switched")
    await agent_up(rig, board, 5)  # the old files back at work
    r = await run(gs, "status", "--port", port, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["build"] == build_id, r.stdout + r.stderr

    # ---- re-provision: a new key, the history kept ----------------------------------------------
    r = await run(gs, "provision", "--port", port, "--site", str(SITE), "--device-id", DEV,
                  "--inventory", str(inv), "--json")
    assert r.returncode == 0, r.stderr
    p2 = json.loads(r.stdout)
    assert p2["key_id"] != p1["key_id"] and p2["firmware_build"] == build_id and p2["agent"]["device"] == DEV
    with Inventory(inv) as i:
        assert [h["action"] for h in i.history(DEV)] == ["provision", "reprovision"]
        assert i.get(DEV)["key_id"] == p2["key_id"]
    (kid, _), = siteconfig.read_settings((board.fs_dir / "keys.cbor").read_bytes()).items()
    assert kid.hex() == p2["key_id"]
    await rig.until(rig.all_closed, 60, "relays closed after the re-provision")

    # every reboot was asked for: 4 deploys (the refused one puts the old agent back to work) and
    # 4 provisions (the two refused ones too); no MemoryError, no traceback, @status answers
    check_board(board, restarts=8)
