"""End-to-end: the real firmware on a virtual board against a pymodbus meter, through the simulator.

Scenarios here are compressed versions of the shipped ones so the suite stays fast; the
assertions are about behaviour (what opened, when relative to what, what came back), never
about wall-clock speed.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gridshed import siteconfig
from gridshed.sim.scenario import load_scenario
from gridshed.boards import budget_heapsize
from gridshed.sim.site import run_site

from rig import check_summary

ROOT = Path(__file__).resolve().parents[2]
DEMO_SITE = ROOT / "scenarios" / "demo-site.toml"
HEAP = budget_heapsize()  # the smallest board's budget (boards/*.json "memory"), word-scaled


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def site(tmp_path: Path, extra: str = "", **trip: object) -> dict:
    text = DEMO_SITE.read_text()
    for k, v in trip.items():
        import re

        text = re.sub(rf"(?m)^{k} = .*$", f"{k} = {json.dumps(v)}", text)
    p = write(tmp_path, "site.toml", text + "\n" + extra)
    return siteconfig.load_site(p)


def run(scn: Path, cfg: dict, **kw) -> dict:
    s = asyncio.run(run_site(load_scenario(scn), cfg, settle_s=0.3, **kw))
    check_summary(s)  # no restart, MemoryError or traceback; the final @status answered
    return s


def block_kw(cfg: dict) -> float:
    return sum(b["miners"] * b["kw_per_miner"] for b in cfg["blocks"])


def test_ercot_dip_trips_and_restores_staggered(tmp_path):
    scn = write(tmp_path, "dip.csv", "t_s,hz\n0,60\n1.5,59.98\n2.0,59.62\n3.0,59.65\n4.0,59.95\n14,60\n")
    cfg = site(tmp_path, min_off_s=4, restore_hold_s=2, stagger_s=1.0, jitter_s=0.2)
    s = run(scn, cfg, heapsize=HEAP, keep_dir=tmp_path / "board")
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    assert len(uf) == 1
    t = uf[0]
    # causality: crossing -> meter update -> poll -> relay open
    assert t["crossing_s"] <= t["meter_update_s"] + 0.06
    assert t["meter_update_s"] <= t["poll_s"] <= t["relay_open_s"]
    # each block opened exactly once; meter kW dropped by the whole nameplate load
    assert set(s["opens_per_block"].values()) == {1}
    assert s["kw_shed"] == pytest.approx(block_kw(cfg), abs=0.5)
    # restore: after min-off, most important (highest priority number) first, staggered
    assert s["all_restored"]
    first_close = s["restores"][0]["t_s"]
    assert first_close - t["relay_open_s"] >= 4.0 - 0.05
    assert [r["block"] for r in s["restores"]] == ["hvac-aux", "row-c", "row-b", "row-a"]
    assert all(g >= 1.0 - 0.05 for g in s["restore_gaps_s"])
    # evidence on the board: journal and persisted state
    board = tmp_path / "board"
    assert (board / "state.cbor").exists()
    from agent.journal_host import parse_stream

    recs = []
    for seg in sorted(board.glob("journal.*")):
        r, errs = parse_stream(seg.read_bytes())
        assert not errs
        recs += r
    evs = [r.get("ev") for r in recs if r["k"] == "ctl"]
    assert "trip_uf" in evs and "restore_done" in evs


def test_noise_at_pickup_trips_once_and_never_chatters(tmp_path):
    rows = ["t_s,hz", "0,60", "1,59.95"]
    t = 1.5
    import math

    while t < 9:
        rows.append(f"{t:.2f},{59.71 + 0.03 * math.sin(t * 9.1):.3f}")
        t += 0.15
    scn = write(tmp_path, "noise.csv", "\n".join(rows) + "\n")
    cfg = site(tmp_path, min_off_s=1, restore_hold_s=1)
    s = run(scn, cfg, heapsize=HEAP)
    assert set(s["opens_per_block"].values()) == {1}
    assert s["restores"] == []  # restore_hz never reached: no relay ever closes again


def test_meter_dropout_follows_failsafe_policy(tmp_path):
    scn = write(tmp_path, "drop.csv", "t_s,hz,meter_ok\n0,60,1\n1.5,60,1\n1.5,60,0\n6,60,0\n6,60,1\n9,60,1\n")
    cfg = site(tmp_path, meter_loss_after_s=2, min_off_s=30)
    s = run(scn, cfg, heapsize=HEAP)
    ms = [t for t in s["trips"] if t["cause"] == "meter silent"]
    assert ms and ms[0]["relay_open_s"] is not None
    # not before the configured delay, counted (as the agent does) from the last answer it got:
    # that answer can come up to a poll period before the scenario's silence starts
    t_open = ms[0]["relay_open_s"]
    last_good = max(t for t, hz, _ in s["trace"] if hz is not None and t <= t_open)
    assert t_open - last_good >= 2.0 - 0.05, (last_good, ms[0])
    assert s["unanswered_polls"] > 0
    status = s["board_status"]
    assert status["meter_errors"] > 0 and status["reason"] == "meter_loss"


def test_meter_dropout_hold_policy_keeps_relays(tmp_path):
    scn = write(tmp_path, "drop.csv", "t_s,hz,meter_ok\n0,60,1\n1,60,1\n1,60,0\n5,60,0\n5,60,1\n6,60,1\n")
    text = DEMO_SITE.read_text().replace('meter_loss = "shed"', 'meter_loss = "hold"')
    cfg = siteconfig.load_site(write(tmp_path, "hold.toml", text))
    s = run(scn, cfg, heapsize=HEAP)
    assert s["transitions"] == []
    assert s["board_status"]["meter_errors"] > 0


def test_gb_50hz_over_modbus_tcp(tmp_path):
    scn = write(tmp_path, "gb.csv", "t_s,hz\n0,50\n1.5,49.95\n2.2,49.6\n3.5,49.7\n5,49.95\n7,50\n")
    cfg = siteconfig.load_site(ROOT / "scenarios" / "gb-site.toml")
    s = run(scn, cfg, transport="tcp", heapsize=HEAP)
    assert s["transport"] == "tcp"
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    assert uf and uf[0]["relay_open_s"] is not None
    assert uf[0]["relay_open_s"] >= uf[0]["crossing_s"]


def test_utility_dry_contact_signal(tmp_path):
    scn = write(tmp_path, "sig.csv", "t_s,hz,signal\n0,60,0\n1.5,60,0\n1.5,60,1\n4,60,1\n4,60,0\n9,60,0\n")
    cfg = site(tmp_path, extra="[signals]\ndry_contact = true\ndebounce_ms = 30\n", min_off_s=1, restore_hold_s=1,
               stagger_s=0.5)
    s = run(scn, cfg, heapsize=HEAP)
    sig = [t for t in s["trips"] if t["cause"] == "utility signal"]
    assert sig and sig[0]["relay_open_s"] is not None
    assert sig[0]["relay_open_s"] >= 1.5 + 0.03 - 0.02  # debounced, never before the contact
    closes = [r["t_s"] for r in s["restores"]]
    assert closes and min(closes) > 4.0  # restored only after the release
    assert s["all_restored"]


# ---- CLI: bad input gives one clear line and a non-zero exit ----------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gridshed.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_unknown_scenario_column(tmp_path):
    scn = write(tmp_path, "bad.csv", "t_s,hz,voltage\n0,60,1\n1,60,1\n")
    r = cli("sim", str(scn))
    assert r.returncode == 2
    assert "unknown column 'voltage'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("mutation,needle", [
    (("pickup_hz = 59.7", "pickup_hz = 59.95"), "trip.pickup_hz"),
    (("relays = [\"relay3\"]", "relays = [\"relay99\"]"), "no relay 'relay99'"),
    (("model = \"eastron_sdm630\"", "model = \"acme_x\""), "acme_x"),
    (("[trip]", "[trip\n"), "not valid TOML"),
    (("baud = 19200", "baud = \"fast\""), "meter.baud"),
])
def test_cli_bad_site_toml(tmp_path, mutation, needle):
    text = DEMO_SITE.read_text().replace(*mutation)
    p = write(tmp_path, "site.toml", text)
    scn = ROOT / "scenarios" / "ercot_ffr_dip.csv"
    r = cli("sim", str(scn), "--site", str(p))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


# ---- a crash mid-scenario is never a pass ------------------------------------------------------
def crashing_firmware(tmp_path: Path) -> Path:
    """A copy of firmware/ whose agent fails once the frequency is low (an injected bug, an
    exception the agent's task guard does not absorb: a MemoryError is counted and the cycle
    dropped, agent.app Agent.keep): the board prints the traceback, resets and boots again with
    the trip persisted, so the relays alone would look right."""
    import shutil

    fw = tmp_path / "fw"
    shutil.copytree(ROOT / "firmware", fw)
    app = fw / "agent" / "app.py"
    text = app.read_text()
    hook = "        sig = self.shed_requested()\n"
    assert text.count(hook) == 1
    app.write_text(text.replace(hook, hook + "        if sample and self.hz is not None and self.hz < 59.65 and not self.ctrl.closed_mask:\n"
                                             "            raise ValueError('injected')\n"))
    return fw


CRASH_DIP = "t_s,hz\n0,60\n1.0,60\n1.5,59.6\n9.0,59.6\n9.5,59.62\n"  # main.py resets 5 s after a crash


def test_run_site_reports_a_crash(tmp_path):
    scn = write(tmp_path, "dip.csv", CRASH_DIP)
    cfg = site(tmp_path, min_off_s=30)
    s = asyncio.run(run_site(load_scenario(scn), cfg, settle_s=0.3, heapsize=HEAP,
                             firmware_dir=crashing_firmware(tmp_path)))
    h = s["health"]
    assert s["trips"][0]["relay_open_s"] is not None  # the relays alone look fine
    assert h["restarts"] >= 1 and h["tracebacks"] >= 1 and h["crashes"] >= 1, h
    with pytest.raises(AssertionError, match="board restarted"):
        check_summary(s)


def test_cli_sim_fails_on_a_crash_with_one_line(tmp_path):
    scn = write(tmp_path, "dip.csv", CRASH_DIP)
    r = cli("sim", str(scn), "--firmware", str(crashing_firmware(tmp_path)))
    assert r.returncode == 1, r.stdout[-1500:] + r.stderr
    assert "(last: ValueError: injected)" in r.stdout and "board was NOT healthy" in r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gridshed: error: the board was not healthy: board restarted"), err
    assert "ValueError" in err[0] and "Traceback" not in r.stderr


def test_cli_sim_refuses_a_firmware_dir_that_is_not_one(tmp_path):
    r = cli("sim", str(ROOT / "scenarios" / "ercot_ffr_dip.csv"), "--firmware", str(tmp_path))
    assert r.returncode == 2 and "is not a firmware tree" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_console_health_tells_a_ctrl_c_from_a_crash():
    from gridshed.sim.site import console_health

    stop = ("agent stopped (Ctrl-C): REPL\nTraceback (most recent call last):\n  File \"main.py\", line 51, "
            "in <module>\nKeyboardInterrupt: \nMicroPython v1\n>>> ")
    crash = ("Traceback (most recent call last):\n  File \"agent/app.py\", line 9, in decide\n"
             "MemoryError: memory allocation failed\nE agent crashed; resetting in 5 s\n")
    assert console_health(stop, 0) == {"restarts": 0, "memory_errors": 0, "tracebacks": 0, "interrupts": 1,
                                       "crashes": 0, "last_exception": None}
    assert console_health((stop + crash).encode(), 1) == {"restarts": 1, "memory_errors": 1, "tracebacks": 1,
                                                           "interrupts": 1, "crashes": 1,
                                                           "last_exception": "MemoryError: memory allocation failed"}
