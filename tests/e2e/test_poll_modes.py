"""End-to-end: `[meter] poll_mode = "back_to_back"` (docs/modbus.md "Read plan") with the real
firmware on a virtual board at the budget heap, against the simulated pymodbus RTU meter on the
paced RS-485 wire (tests/e2e/test_sim_site.py's simulator).

What is asserted is structure, on the agent's own clock and counters, never a speed: with
`poll_ms` 1000 a period poller could have made at most uptime/1000 + 1 frequency reads; back to
back makes many times that. The slow reads (kW) are extra transactions beside the frequency
reads, the kW the board shows is the meter's, and a dip still trips every block once and comes
back.
"""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from gridshed import siteconfig
from gridshed.boards import budget_heapsize
from gridshed.sim.scenario import load_scenario
from gridshed.sim.site import run_site
from gridshed.transport import Console

from rig import check_summary

ROOT = Path(__file__).resolve().parents[2]
DEMO_SITE = ROOT / "scenarios" / "demo-site.toml"


def _status(port: str) -> dict:
    with Console(port) as con:
        return con.request("status", timeout=30)[-1]


def test_back_to_back_polls_at_the_line_rate_with_slow_kw_reads(tmp_path):
    text = DEMO_SITE.read_text()
    for k, v in {"min_off_s": 1, "restore_hold_s": 0.5, "stagger_s": 0.1, "jitter_s": 0}.items():
        text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {json.dumps(v)}", text)
        assert n == 1, k
    p = tmp_path / "site.toml"
    p.write_text(text)
    cfg = siteconfig.load_site(p)
    cfg["meter"] = dict(cfg["meter"], poll_mode="back_to_back", poll_ms=1000, slow_ms=200, baud=19200)
    scn = tmp_path / "dip.csv"
    scn.write_text("t_s,hz\n0,60\n2.0,60\n2.001,59.5\n2.6,59.5\n2.601,60\n6,60\n")
    s = asyncio.run(run_site(load_scenario(scn), cfg, heapsize=budget_heapsize(), settle_s=0.3,
                             transport="rtu", baud=19200, before_status=_status))
    check_summary(s)  # no restart, MemoryError or traceback; the final @status answered
    st = s["before_status"]
    assert "error" not in st, st
    # back to back: far more frequency reads than one per poll_ms on the agent's clock
    bound = st["uptime_ms"] // 1000 + 1
    assert st["samples"] > 5 * bound, (st["samples"], st["uptime_ms"])
    # slow reads: transactions beyond the frequency reads, fewer than one per frequency read
    mb = st["modbus"]
    assert mb["timeouts"] == 0 and mb["crc_errors"] == 0 and mb["bad_frames"] == 0
    assert st["samples"] < mb["ok"] < 2 * st["samples"], (mb, st["samples"])
    # the kW the board shows came from the meter (the slow read of the demo map's kW register)
    assert st["kw"] is not None and st["kw_stale"] is False
    assert st["kw"] == pytest.approx(s["kw_before"], rel=0.02)
    # the dip: every block opened once, all came back
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    assert len(uf) == 1 and uf[0]["meter_update_s"] <= uf[0]["poll_s"] <= uf[0]["relay_open_s"]
    assert set(s["opens_per_block"].values()) == {1}
    assert s["all_restored"]
