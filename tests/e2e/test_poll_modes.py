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


def test_a_dip_after_a_restore_meets_no_slow_read(tmp_path):
    """The read plan's slow reads around a frequency event (docs/modbus.md "Slow reads during an
    event"): before it they run at slow_ms; after an opening kW is read at every poll until the
    restore (the evidence of what the shed took off); from a restore to the next trip the bus
    carries only frequency reads, so a dip right after a restore waits for no kW read; due slow
    reads wait while the event lasts; one kW read follows the last restore by about a second, so
    `@status` shows the load that came back."""
    text = DEMO_SITE.read_text()
    trip = {"pickup_hz": 59.7, "delay_ms": 0, "samples": 1, "restore_hz": 59.9, "restore_hold_s": 0.15,
            "min_off_s": 0.25, "stagger_s": 0.04, "jitter_s": 0}
    for k, v in trip.items():
        text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {json.dumps(v)}", text)
        assert n == 1, k
    p = tmp_path / "site.toml"
    p.write_text(text)
    cfg = siteconfig.load_site(p)
    cfg["meter"] = dict(cfg["meter"], poll_mode="back_to_back", slow_ms=200, baud=19200)
    dips = [2.0, 2.8, 3.6, 4.4]
    rows = ["t_s,hz", "0,60"]
    for d in dips:
        rows += [f"{d},60", f"{d + 0.001},59.5", f"{d + 0.25},59.5", f"{d + 0.251},60"]
    rows.append("8,60")
    scn = tmp_path / "dips.csv"
    scn.write_text("\n".join(rows) + "\n")
    s = asyncio.run(run_site(load_scenario(scn), cfg, heapsize=budget_heapsize(), settle_s=0.3,
                             transport="rtu", baud=19200, before_status=_status))
    check_summary(s)
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    assert len(uf) == len(dips) and all("relay_open_s" in t for t in uf), s["trips"]
    slow = s["slow_read_s"]
    tr = s["transitions"]
    # before the event: slow reads at their cadence (about 5 a second with slow_ms 200)
    assert len([t for t in slow if 0.5 <= t < 1.9]) >= 3, slow
    for k, t in enumerate(uf):
        # evidence: kW read between the opening and the first close after it
        close = min(x["t_s"] for x in tr if x["state"] == "closed" and x["t_s"] > t["relay_open_s"])
        assert any(t["relay_open_s"] < r < close for r in slow), (k, t, slow)
        if k:  # from the previous restore's last close to this trip's relay: frequency reads only
            last_close = max(x["t_s"] for x in tr if x["state"] == "closed" and x["t_s"] < t["relay_open_s"])
            met = [r for r in slow if last_close < r < t["relay_open_s"]]
            assert not met, (k, last_close, t, met)
    # after the last restore: one kW read about a second later, then no slow read while the
    # event holds (10 s), although slow_ms (200 ms) says they are due
    end_close = max(x["t_s"] for x in tr if x["state"] == "closed")
    after = [r for r in slow if r > end_close]
    assert len(after) == 1 and 0.8 <= after[0] - end_close <= 2.0, (end_close, after)
    st = s["before_status"]
    assert st["kw"] == pytest.approx(s["kw_before"], rel=0.02) and st["kw_stale"] is False, st
