"""`gridshed sim` tells the truth about the real firmware (run as a technician runs it).

A scenario that starts below pickup (the trip happens before the scenario clock starts), dips
again while shed, then plays 0 Hz and NaN while still shed: every condition is reported, none
as a miss, exit 0. A meter whose registers never show the dip: a real miss, exit 1 with one
line naming it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gridshed.boards import budget_heapsize, load_board

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scenarios" / "demo-site.toml"
HEAP = budget_heapsize(load_board("unix-sim"))


def sim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gridshed.cli", "sim", *args, "--heapsize", HEAP],
                          capture_output=True, text=True, timeout=240)


def test_first_sample_trip_and_conditions_while_shed(tmp_path):
    scn = tmp_path / "start_low.csv"
    # below pickup from the first sample; a dip while shed; 0 Hz then NaN while shed (demo site:
    # fail-safe shed after 3 s, but every block is already open)
    scn.write_text("t_s,hz\n0,59.5\n1,59.5\n1.5,59.8\n2.0,59.6\n2.5,59.8\n3,59.8\n3,0\n7,0\n7,nan\n11,nan\n11,59.8\n12,59.8\n")
    r = sim(str(scn), "--site", str(DEMO), "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    s = json.loads(r.stdout)
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    assert len(uf) == 1 and uf[0]["at_start"] and uf[0]["relay_open_s"] is not None
    # opened by the first below-pickup run (0..1.5 s of the scenario), not by the later dip at 2.0 s
    assert uf[0]["relay_open_s"] < 1.5
    assert set(s["opens_per_block"].values()) == {1}
    causes = sorted(a["cause"] for a in s["already_shed"])
    assert causes == ["meter invalid", "under-frequency"], s["already_shed"]  # 0 Hz then NaN: one run
    assert s["failures"] == []
    r = sim(str(scn), "--site", str(DEMO))
    assert r.returncode == 0, r.stderr
    assert "below pickup from the first sample" in r.stdout and "already shed" in r.stdout
    assert "NO RELAY OPENED" not in r.stdout and "None" not in r.stdout


def test_a_real_miss_exits_1_with_one_line(tmp_path):
    scn = tmp_path / "dip.csv"
    scn.write_text("t_s,hz\n0,60\n1,60\n1.2,59.5\n4,59.5\n4.2,60\n5,60\n")
    # the meter refreshes its registers once every 11 days: the board never sees the dip
    r = sim(str(scn), "--site", str(DEMO), "--meter-update-ms", "1e9")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("gridshed:")]
    assert len(err) == 1 and err[0].startswith("gridshed: sim: expectation failed: under-frequency from 1.120 s "
                                               "(below 59.7 Hz for "), r.stderr
    assert err[0].endswith("no relay opened")
    assert "NO RELAY OPENED (miss)" in r.stdout and "Traceback" not in r.stderr
