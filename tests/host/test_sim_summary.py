"""The simulator's summary tells the truth (gridshed.sim.summary), scenario CSV edge cases, and
`gridshed sim`'s guards (--keep, nominal mismatch).

The summary is computed here from a recorded run built with the simulator's own types (Scenario
from a CSV, SimMeter poll records, BlockEvents as the GPIO server records them, LoadModel): every
timeline a real board could produce, including the ones that are hard to provoke on demand
(a trip before the scenario clock starts, a miss). tests/e2e/test_sim_truth.py runs the real
firmware through the same code.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from gridshed import siteconfig
from gridshed.cli import main
from gridshed.errors import UserError
from gridshed.sim.meter import PollRecord, SimMeter
from gridshed.sim.scenario import load_scenario
from gridshed.sim.site import BlockEvent, LoadModel, SiteRun
from gridshed.sim.summary import failure_line, render_text, summarize

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scenarios" / "demo-site.toml"
T0 = 1000.0  # host monotonic time of the scenario start


def scenario(tmp_path: Path, text: str, name: str = "s.csv"):
    p = tmp_path / name
    p.write_text(text)
    return load_scenario(p)


def recorded(cfg, sc, opens=(), closes=(), polls=()):
    """A run as site.py records it: boot closes every block at -2 s; opens/closes at scenario s."""
    run = SiteRun(cfg, sc, Path("/nonexistent"))
    run.t0 = T0
    meter = SimMeter(cfg["meter"]["map"], lambda t: None)
    for t, hz in polls:
        meter.polls.append(PollRecord(T0 + t, hz, 300.0, T0 + t - 0.02))
    run.meter = meter
    load = LoadModel(cfg)
    nb = len(cfg["blocks"])
    evs = [(-2.0, i, True) for i in range(nb)]
    evs += [(t, i, False) for t in opens for i in range(nb)]
    evs += [(t, i, True) for t in closes for i in range(nb)]
    for t, i, closed in sorted(evs):
        load.closed[i] = closed
        run.block_events.append(BlockEvent(t if t >= 0 else -1.0, i, closed, T0 + t))
    return summarize(run, load)


@pytest.fixture
def cfg():
    return siteconfig.load_site(DEMO)


def test_trip_on_the_first_sample_is_reported(tmp_path, cfg):
    sc = scenario(tmp_path, "t_s,hz\n0,59.5\n3,59.5\n3,60\n10,60\n")
    s = recorded(cfg, sc, opens=[-0.9], closes=[8.0], polls=[(-1.2, 60.0), (-0.95, 59.5), (0.5, 59.5)])
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    assert len(uf) == 1 and uf[0]["at_start"] and uf[0]["relay_open_s"] == -0.9
    assert uf[0]["latency_from_poll_ms"] == 50.0
    assert set(s["opens_per_block"].values()) == {1}
    assert s["failures"] == [] and failure_line(s) is None
    assert "below pickup from the first sample" in render_text(s)


def test_crossings_and_silence_while_shed_are_already_shed(tmp_path, cfg):
    # trip at 2 s; a second dip at 5 s and the meter silent 7..12 s while every block is open
    sc = scenario(tmp_path, "t_s,hz,meter_ok\n0,60,1\n2,59.6,1\n3,59.8,1\n4,59.8,1\n5,59.6,1\n6,59.8,1\n"
                            "7,59.8,1\n7,59.8,0\n12,59.8,0\n12,59.8,1\n14,59.8,1\n")
    s = recorded(cfg, sc, opens=[2.05], polls=[(2.02, 59.6)])
    assert [t["cause"] for t in s["trips"]] == ["under-frequency"]
    assert [a["cause"] for a in s["already_shed"]] == ["under-frequency", "meter silent"]
    assert s["failures"] == []
    text = render_text(s)
    assert "NO RELAY OPENED" not in text and "already shed" in text


def test_a_miss_fails_with_one_line(tmp_path, cfg):
    sc = scenario(tmp_path, "t_s,hz\n0,60\n2,59.5\n6,59.5\n6,60\n8,60\n")
    s = recorded(cfg, sc, polls=[(2.1, 59.5)])
    assert s["trips"][0]["relay_open_s"] is None
    line = failure_line(s)
    assert line.startswith("expectation failed: under-frequency from 1.200 s") and "no relay opened" in line
    assert "None" not in render_text(s)


def test_a_relay_opening_on_bad_data_fails(tmp_path, cfg):
    # 0 Hz with the hold fail-safe: nothing may open
    cfg["failsafe"]["meter_loss"] = "hold"
    sc = scenario(tmp_path, "t_s,hz\n0,60\n2,60\n2,0\n8,0\n8,60\n10,60\n")
    s = recorded(cfg, sc, opens=[4.0])
    assert s["not_expected"][0]["cause"] == "meter invalid" and "hold" in s["not_expected"][0]["why"]
    assert any("opened at 4.000 s with no trip condition" in f for f in s["failures"])


def test_zero_hz_and_nan_follow_the_fail_safe(tmp_path, cfg):
    for hz, detail in (("0", "meter reports 0 Hz"), ("nan", "meter answers NaN")):
        sc = scenario(tmp_path, f"t_s,hz\n0,60\n2,60\n2,{hz}\n9,{hz}\n9,60\n12,60\n")
        s = recorded(cfg, sc, opens=[5.05])
        t = s["trips"][0]
        assert (t["cause"], t["detail"], t["relay_open_s"]) == ("meter invalid", detail, 5.05), s["trips"]
        assert s["failures"] == []
        missed = recorded(cfg, sc)
        assert any(detail in f for f in missed["failures"])


def test_a_dip_too_short_for_the_delay_is_not_a_miss(tmp_path, cfg):
    cfg["trip"]["delay_ms"] = 2000
    sc = scenario(tmp_path, "t_s,hz\n0,60\n2,60\n2,59.5\n2.5,59.5\n2.5,60\n5,60\n")
    s = recorded(cfg, sc)
    assert s["failures"] == [] and s["not_expected"][0]["cause"] == "under-frequency"


def test_scenario_csv_accepts_bom_zero_and_nan(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbft_s,hz,meter_ok\n0,60,1\n1,0,1\n2,nan,1\n3,60,1\n")
    sc = load_scenario(p)
    assert sc.value("hz", 1.0) == 0.0 and sc.value("hz", 2.5) != sc.value("hz", 2.5)
    assert sc.value("hz", 1.5) == 0.0  # next to a nan row the value steps, never interpolates
    for bad, why in (("t_s,hz\n0,60\n1,-1\n", "not a grid frequency"), ("t_s,hz,meter_ok\n0,60,nan\n1,60,1\n", "only hz")):
        q = tmp_path / "bad.csv"
        q.write_text(bad)
        with pytest.raises(UserError, match=why):
            load_scenario(q)


def test_sim_warns_when_scenario_nominal_differs(tmp_path, capsys):
    from gridshed.cli.sim import scenario_warnings

    sc = load_scenario(ROOT / "scenarios" / "gb_50hz_event.csv")
    w = scenario_warnings(sc, siteconfig.load_site(DEMO), "demo-site.toml")
    assert len(w) == 1 and "50 Hz grid" in w[0] and "60 Hz site" in w[0]
    assert scenario_warnings(sc, siteconfig.load_site(ROOT / "scenarios" / "gb-site.toml"), "gb") == []


def test_keep_dir_refuses_a_dir_in_use_and_clears_an_old_board(tmp_path, capsys):
    from gridshed.cli.sim import LOCK, keep_dir

    d = tmp_path / "board"
    d.mkdir()
    (d / "config.cbor").write_bytes(b"old")
    (d / "state.cbor").write_bytes(b"tripped")
    with keep_dir(str(d)) as k:
        assert k == d and sorted(p.name for p in d.iterdir()) == [LOCK]
        assert "cleared the board files of an earlier run" in capsys.readouterr().err
        # a second run on the same directory while the first holds it: refused, nothing touched
        (d / "journal.0").write_bytes(b"live")
        rc = main(["sim", str(ROOT / "scenarios" / "ercot_ffr_dip.csv"), "--keep", str(d)])
        assert rc == 2 and "another gridshed sim is using this directory" in capsys.readouterr().err
        assert (d / "journal.0").read_bytes() == b"live"
    # a directory that is not a board is never cleared
    other = tmp_path / "docs"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a board"):
        with keep_dir(str(other)):
            pass
    assert (other / "notes.txt").read_text() == "mine"
    fd = os.open(d / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after the run
    os.close(fd)
