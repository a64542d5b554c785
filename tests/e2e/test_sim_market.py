"""`gridshed sim` with a price column (issue 16 item 6): one run of the real agent shows economic
curtailment and a frequency dip together, with the RRS obligation held."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_price_column_economic_curtailment_and_a_dip_with_the_obligation_held(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gridshed.cli", "sim", "scenarios/market_dip.csv",
                          "--site", "scenarios/market-sim-site.toml", "--json"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr + out.stdout[-2000:]
    assert "the virtual board runs at 84wK" in out.stderr  # the market feature's measured heap
    import json

    s = json.loads(out.stdout)
    m = s["market"]
    # the price (120 $/MWh from 2 s) curtails the two cheap miner rows: economic, not a trip
    assert sorted(o["block"] for o in m["economic_opens"]) == ["row-a", "row-b"]
    assert all(2.0 <= o["t_s"] <= 4.5 for o in m["economic_opens"]), m
    # the dip trips the miner stage (row-c, the one the obligation kept on) ...
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    assert len(uf) == 1 and uf[0]["relay_open_s"] is not None
    # ... which protection restores; the priced-out rows come back only when the price falls
    back = {r["block"]: r["t_s"] for r in s["restores"]}
    assert back["row-c"] < 9.5 <= back["row-a"] and back["row-b"] >= 9.5
    # the obligation: 250 kW sheddable on outside the frequency event; the board refused row-c
    assert m["obligation_kw"] == 250.0 and m["obligation_held"] is True and m["min_available_kw"] >= 250.0
    bm = s["board_status"]["market"]
    assert bm["refused"] >= 1 and bm["clock"] is True and bm["sid"] == 1
    assert s["failures"] == [] and s["all_restored"] and s["opens_per_block"]["inference"] == 0
