"""End-to-end evidence: the real agent on a virtual board writes its journal; the host pulls it.

1. `gridshed sim --keep DIR --report out.png` on a short dip: the report of the run, then
   `gridshed events --dir DIR` and `gridshed report` from the board's own journal files.
2. A virtual board running the agent against a pymodbus meter whose frequency the test sets:
   `gridshed events --port` pulls over the console while the agent keeps polling, and a second
   pull after a trip gets only the new records.
The firmware is built as .mpy like a deploy; the sim runs at -X heapsize=64wK (64 KB on a 32-bit
board), the console pull at CONSOLE_HEAP (see below).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gridshed import siteconfig
from gridshed.sim.meter import Reading, SimMeter
from gridshed.sim.site import GpioServer, install_firmware
from gridshed.sim.wire import Wire
from gridshed.vboard import VirtualBoard

from rig import check_board, check_summary

ROOT = Path(__file__).resolve().parents[2]
DEMO_SITE = ROOT / "scenarios" / "demo-site.toml"
HEAP = "64wK"
# The console pull: @status and @config answer at the 64wK budget, but a long @events pull (the
# journal reader and a JSON line per record on top of the running agent) measured unreliable
# there, so this runs at 72wK; GS_CONSOLE_HEAP=64wK re-checks the budget.
CONSOLE_HEAP = os.environ.get("GS_CONSOLE_HEAP", "72wK")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "gridshed.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def png_ok(p: Path) -> None:
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert int.from_bytes(data[16:20], "big") >= 1000 and 30_000 < len(data) < 600_000


def test_sim_report_then_events_from_board_dir(tmp_path):
    site = tmp_path / "site.toml"
    text = DEMO_SITE.read_text()
    for k, v in {"min_off_s": "3", "restore_hold_s": "1", "stagger_s": "0.5", "jitter_s": "0.1"}.items():
        text = text.replace(next(line for line in text.splitlines() if line.startswith(k + " =")), f"{k} = {v}")
    site.write_text(text)
    scn = tmp_path / "dip.csv"
    scn.write_text("t_s,hz\n0,60\n1.0,59.98\n1.4,59.6\n2.5,59.65\n3.0,59.95\n8.5,60\n")
    board = tmp_path / "board"
    out_png = tmp_path / "sim.png"
    r = cli("sim", str(scn), "--site", str(site), "--keep", str(board), "--report", str(out_png), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    check_summary(summary)
    assert 50 < len(summary["trace"]) <= 2000
    assert all(len(p) == 3 for p in summary["trace"])
    png_ok(out_png)

    # the board's own journal files, as a technician copies them off a board
    ev_json = tmp_path / "events.json"
    r = cli("events", "--dir", str(board), "-o", str(ev_json))
    assert r.returncode == 0, r.stderr
    doc = json.loads(ev_json.read_text())
    assert doc["site"] == "demo-site" and doc["device"] == "ctl-1"
    evs = [x.get("ev") for x in doc["records"] if x["k"] == "ctl"]
    assert evs[:2] == ["pickup_start", "trip_uf"] and evs.count("restore_block") == 4 and "restore_done" in evs
    r = cli("events", "--dir", str(board), "-o", str(tmp_path / "events.csv"))
    assert r.returncode == 0
    assert (tmp_path / "events.csv").read_text().splitlines()[0].startswith("n,t,ms,kind,ev,reason,hz,kw,mask")

    page = tmp_path / "report.html"
    r = cli("report", str(ev_json), "-o", str(page), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    trip = rep["trips"][0]
    assert trip["cause"] == "underfrequency" and trip["response_ms"] is not None and trip["response_ms"] >= 0
    # the meter saw the whole load go: kW before = the nameplate of the shed blocks
    assert trip["kw_before"] > 300 and trip["kw_after"] < 1 and trip["kw_shed"] > 300
    assert [x["block"] for x in rep["restores"]] == ["hvac-aux", "row-c", "row-b", "row-a"]
    html = page.read_text()
    assert "data:image/png;base64," in html and "restore sequence" in html and "trip_uf" in html


# ---- pulling over the console from a running board ---------------------------------------------
class Rig:
    """A virtual board with the agent, a pymodbus meter on a paced RS-485 pty, GPIO on loopback."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "board"
        self.dir.mkdir()
        self.cfg = siteconfig.load_site(DEMO_SITE)
        self.hz = 60.0
        self.pins: list[tuple[float, int, int]] = []

    async def start(self) -> None:
        m = self.cfg["meter"]
        self.gpio = GpioServer(lambda t, p, lv: self.pins.append((t, p, lv)))
        port = await self.gpio.start()
        self.wire = Wire(m["baud"]).start()
        self.meter = SimMeter(m["map"], lambda t: Reading(self.hz, 300.0), unit=m["unit"])
        self.task = asyncio.create_task(self.meter.serve_rtu(self.wire.meter_path, m["baud"]))
        await asyncio.sleep(0.2)
        install_firmware(self.dir, self.cfg, {"gpio": f"127.0.0.1:{port}", "uarts": {"meter": self.wire.board_path}})
        self.board = VirtualBoard(self.dir, heapsize=CONSOLE_HEAP).start()
        await asyncio.wait_for(self.gpio.connected.wait(), 60)
        deadline = time.monotonic() + 60
        while len([p for p in self.meter.polls if p.hz is not None]) < 3:
            assert time.monotonic() < deadline, f"board never polled; log {self.board.log_path}"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.board.stop()
        await self.gpio.stop()
        await self.meter.stop()
        self.task.cancel()
        self.wire.stop()

    async def events(self, *args: str) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(cli, "events", "--port", self.board.port, *args, timeout=60)


def test_incremental_pull_over_console_while_running(tmp_path):
    async def main() -> None:
        rig = Rig(tmp_path)
        await rig.start()
        state = tmp_path / "state.json"
        try:
            # 1st pull: everything so far (the boot record)
            r = await rig.events("--state", str(state), "-o", str(tmp_path / "a.json"), "--json")
            assert r.returncode == 0, r.stderr
            info = json.loads(r.stdout)
            assert info["since"] == 0 and info["count"] >= 1 and info["device"] == "ctl-1"
            a = json.loads((tmp_path / "a.json").read_text())
            assert a["records"][0]["k"] == "boot" and a["config"]["trip"]["pickup_hz"] == 59.7
            first_last = info["last_seq"]
            polls_before = len(rig.meter.polls)

            # the agent kept running during the pull; now a dip trips it
            rig.hz = 59.5
            deadline = time.monotonic() + 30
            while not any(lv == 0 for _, _, lv in rig.pins[-8:]):
                assert time.monotonic() < deadline, "no relay opened"
                await asyncio.sleep(0.05)
            # and it keeps polling the meter (machine-speed independent: wait, bounded)
            deadline = time.monotonic() + 20
            while len(rig.meter.polls) <= polls_before + 5:
                assert time.monotonic() < deadline, "agent stopped polling after the pull"
                await asyncio.sleep(0.05)

            # 2nd pull: only the records written since the first one
            r = await rig.events("--state", str(state), "-o", str(tmp_path / "b.csv"), "--json")
            assert r.returncode == 0, r.stderr
            info = json.loads(r.stdout)
            lines = (tmp_path / "b.csv").read_text().splitlines()
            seqs = [int(line.split(",")[0]) for line in lines[1:]]
            # exactly the records after the first pull: contiguous, none lost, none repeated
            assert info["since"] == first_last and seqs == list(range(first_last + 1, info["last_seq"] + 1))
            assert info["count"] == len(seqs) >= 2
            assert "trip_uf" in (tmp_path / "b.csv").read_text() and ",boot," not in (tmp_path / "b.csv").read_text()

            # 3rd pull: nothing new
            r = await rig.events("--state", str(state), "--json")
            assert r.returncode == 0 and json.loads(r.stdout)["records"] == []

            # a state file ahead of the board (journal erased / board swapped): warn, pull everything
            st = json.loads(state.read_text())
            st["devices"]["demo-site/ctl-1"]["last_seq"] = 10_000
            state.write_text(json.dumps(st))
            r = await rig.events("--state", str(state), "--json")
            assert r.returncode == 0 and "pulling everything" in r.stderr
            every = json.loads(r.stdout)["records"]
            assert every[0]["n"] == 1

            # another board with this device id, its journal already past the seq pulled last
            # (the walk: a new board's first records skipped in silence): the record at that
            # seq is not the one pulled then (kind, uptime): say so, pull everything
            def last_pulled(seq: int, mark: dict) -> None:
                st = json.loads(state.read_text())
                assert st["devices"]["demo-site/ctl-1"]["mark"] == {"k": every[-1]["k"], "ms": every[-1]["ms"]}
                st["devices"]["demo-site/ctl-1"].update(last_seq=seq, mark=mark)
                state.write_text(json.dumps(st))

            last_pulled(2, {"k": every[1]["k"], "ms": every[1]["ms"] + 1})
            r = await rig.events("--state", str(state), "--json")
            assert r.returncode == 0 and "is not the one pulled last time from demo-site/ctl-1" in r.stderr, r.stderr
            assert json.loads(r.stdout)["records"][0]["n"] == 1
            last_pulled(2, {"k": every[1]["k"], "ms": every[1]["ms"]})  # the same board: only what is new
            r = await rig.events("--state", str(state), "--json")
            assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
            assert json.loads(r.stdout)["records"][0]["n"] == 3

            # the agent kept running through all the pulls (no restart, no MemoryError, no
            # traceback, @status answers, still polling)
            await asyncio.to_thread(check_board, rig.board)
            assert len(rig.meter.polls) > polls_before + 5
        finally:
            await rig.stop()

    asyncio.run(main())
