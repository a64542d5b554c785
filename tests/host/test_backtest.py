"""`gridshed backtest` (issue 16 item 5): the board's decision code over a price history, its
figures against a hand computation, its price-file errors and its report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent import market as M
from gridshed import backtest
from gridshed.cli import main

ROOT = Path(__file__).resolve().parents[2]
GRIDSHED = [sys.executable, "-m", "gridshed.cli"]


def approx(x):
    return pytest.approx(x, abs=2e-6)  # the figures are rounded to 6 decimals

SITE = """site = "bt"
device = "bt-1"
board = "unix-sim"
[meter]
model = "eastron_sdm630"
[[blocks]]
name = "cheap"
relays = ["relay1"]
miners = 10
kw_per_miner = 10.0
strike_usd_mwh = 40
[[blocks]]
name = "dear"
relays = ["relay2"]
miners = 5
kw_per_miner = 20.0
strike_usd_mwh = 100
revenue_usd_mwh = 120
[[blocks]]
name = "firm"
relays = ["relay3"]
miners = 1
kw_per_miner = 50.0
class = "firm"
"""
# 15-minute prices, the offset +01:00 (CET); one gap of 15 minutes before the last row
PRICES = [("2026-03-02T10:00:00+01:00", 30.0), ("2026-03-02T10:15:00+01:00", 55.5), ("2026-03-02T10:30:00+01:00", 150.0),
          ("2026-03-02T10:45:00+01:00", -20.0), ("2026-03-02T11:00:00+01:00", 99.0), ("2026-03-02T11:30:00+01:00", 101.0)]


def write(tmp_path: Path, rows=PRICES, header="interval_start,price_usd_mwh", site=SITE) -> tuple[Path, Path]:
    pf = tmp_path / "prices.csv"
    pf.write_text(header + "\n" + "".join(f"{t},{p}\n" for t, p in rows))
    sf = tmp_path / "site.toml"
    sf.write_text(site)
    return pf, sf


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDSHED, *args], capture_output=True, text=True, timeout=120)


def test_figures_match_a_hand_computation(tmp_path, capsys):
    pf, sf = write(tmp_path)
    assert main(["backtest", str(pf), "--site", str(sf), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    h = 0.25  # the interval, from the data (15 min); the 30-minute step is a gap, not a longer row
    assert res["prices"]["interval_s"] == 900 and res["prices"]["gaps"] == 1 and res["prices"]["intervals"] == 6
    kw = {"cheap": 100.0, "dear": 100.0, "firm": 50.0}
    strike = {"cheap": 40.0, "dear": 100.0, "firm": None}
    rev = {"cheap": 40.0, "dear": 120.0, "firm": 0.0}
    cost = mwh = revenue = cut = 0.0
    on_cost = on_mwh = on_rev = 0.0
    cut_h = 0.0
    for _, p in PRICES:
        off_any = False
        for b, k in kw.items():
            on_cost += p * k * h / 1000
            on_mwh += k * h / 1000
            on_rev += rev[b] * k * h / 1000
            if strike[b] is not None and p > strike[b]:
                cut += k * h / 1000
                off_any = True
            else:
                cost += p * k * h / 1000
                mwh += k * h / 1000
                revenue += rev[b] * k * h / 1000
        cut_h += h if off_any else 0
    a, s = res["always_on"], res["strategy"]
    assert a["energy_cost_usd"] == approx(on_cost) and a["energy_mwh"] == approx(on_mwh)
    assert a["mining_revenue_usd"] == approx(on_rev)
    assert s["energy_cost_usd"] == approx(cost) and s["energy_mwh"] == approx(mwh)
    assert s["mining_revenue_usd"] == approx(revenue)
    assert s["curtailed_mwh"] == approx(cut) and s["curtailed_hours"] == approx(cut_h)
    # cheap: off from 10:15 to 10:45, again 11:00 and 11:30 (the gap is no decision: still off);
    # dear: off at 10:30 and 11:30 (101 > 100; 99 is not)
    assert s["cycles"] == {"cheap": 2, "dear": 2, "firm": 0}
    # the hand figures, written out: energy cost = sum(price x kW on x 0.25 h)
    assert cost == approx((30 * 250 + 55.5 * 150 + 150 * 50 - 20 * 250 + 99 * 150 + 101 * 50) * 0.25 / 1000)
    assert set(a) == {"energy_cost_usd", "energy_mwh", "mining_revenue_usd", "net_usd"}
    assert {"curtailed_mwh", "curtailed_hours", "cycles"} <= set(s)


def test_min_off_and_cycle_cap_land_mid_interval_as_on_the_board(tmp_path, monkeypatch, capsys):
    site = SITE.replace('strike_usd_mwh = 40\n', 'strike_usd_mwh = 40\nmin_off_s = 1200\nmax_cycles_day = 1\n')
    rows = [("2026-03-02T10:00:00Z", 30.0), ("2026-03-02T10:15:00Z", 55.5), ("2026-03-02T10:30:00Z", 10.0),
            ("2026-03-02T10:45:00Z", 60.0), ("2026-03-02T11:00:00Z", 20.0)]
    pf, sf = write(tmp_path, rows=rows, site=site)
    calls = []
    real = M.Market.decide

    def spy(self, t, mode, val, closed):  # the board's decide() is what the backtest runs
        calls.append(t)
        return real(self, t, mode, val, closed)

    monkeypatch.setattr(M.Market, "decide", spy)
    assert main(["backtest", str(pf), "--site", str(sf), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["strategy"]
    t0 = backtest.load_prices(pf)["t"][0] - M.EPOCH
    # cheap: off at 10:15; 10 $/MWh at 10:30 but min off holds it until 10:35, a decision of its
    # own; at 10:45 (60 $/MWh) the cycle cap (1 a day) keeps it on
    assert t0 + 900 + 1200 in calls
    assert s["cycles"] == {"cheap": 1, "dear": 0, "firm": 0}
    assert s["curtailed_mwh"] == approx(100 * (20 / 60) / 1000)
    assert s["curtailed_hours"] == approx(20 / 60)
    cheap = 100 * (0.25 * 30 + (10 / 60) * 10 + 0.25 * 60 + 0.25 * 20) / 1000
    rest = 150 * 0.25 * sum(p for _, p in rows) / 1000
    assert s["energy_cost_usd"] == approx(cheap + rest)


@pytest.mark.parametrize("header,rows,msg", [
    ("start,price", PRICES, "column 'interval_start' missing"),
    ("interval_start,price_usd_mwh", [("2026-03-02T10:00:00", 1.0), ("2026-03-02T10:15:00", 2.0)], "has no UTC offset"),
    ("interval_start,price_usd_mwh", [("yesterday", 1.0)], "is not an ISO 8601 time"),
    ("interval_start,price_usd_mwh", [("2026-03-02T10:00:00Z", "cheap")], "is not a number"),
    ("interval_start,price_usd_mwh", [("2026-03-02T10:00:00Z", "nan")], "outside"),
    ("interval_start,price_usd_mwh", [("2026-03-02T10:15:00Z", 1), ("2026-03-02T10:00:00Z", 1)], "not after the row before"),
    ("interval_start,price_usd_mwh", [("2026-03-02T10:00:00Z", 1)], "need at least two price rows"),
    ("interval_start,price_usd_mwh", [("2026-03-02T10:00:00Z", 1), ("2026-03-02T10:15:00Z", 1),
                                      ("2026-03-02T10:30:00Z", 1), ("2026-03-02T10:35:00Z", 1)], "irregular intervals"),
])
def test_bad_price_files_give_one_line(tmp_path, header, rows, msg, capsys):
    pf, sf = write(tmp_path, rows=rows, header=header)
    assert main(["backtest", str(pf), "--site", str(sf)]) == 2
    out, err = capsys.readouterr()
    assert msg in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_report_png_and_html_and_the_shipped_example(tmp_path):
    png, page = tmp_path / "bt.png", tmp_path / "bt.html"
    r = run_cli("backtest", "scenarios/ercot_prices.csv", "--site", "scenarios/market-site.toml", "--report", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "always on" in r.stdout and "RRS 0.25 MW" in r.stdout
    r = run_cli("backtest", str(ROOT / "scenarios/ercot_prices.csv"), "--site", str(ROOT / "scenarios/market-site.toml"),
                "--report", str(page), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert "data:image/png;base64," in page.read_text()
    s = res["strategy"]
    # the example site: the miners curtail on the evening spike, the RRS hours keep 250 kW on
    # (row-c and the heat loop refused), the firm inference block never moves
    assert s["cycles"]["inference"] == 0 and s["cycles"]["row-a"] >= 1 and s["obligation_refusals"] >= 1
    assert s["energy_cost_usd"] < res["always_on"]["energy_cost_usd"]
    assert s["obligation_short_hours"] == 0
    r = run_cli("backtest", "scenarios/ercot_prices.csv", "--site", "scenarios/market-site.toml", "--report", str(tmp_path / "x.pdf"))
    assert r.returncode == 2 and "must end in .png or .html" in r.stderr


def test_gridshed_status_shows_the_market_and_its_warning():
    from rich.console import Console

    from gridshed.cli.board import _status_table

    def text(st):
        c = Console(record=True, width=300)
        c.print(_status_table(st))
        return c.export_text()

    st = {"device": "mkt-1", "site": "s", "blocks": ["row-a", "row-b", "row-c"], "mask": 6,
          "market": {"sid": 3, "intervals": 2, "mode": "p", "value": 120.0, "off": 1, "avail_kw": 295.0,
                     "program": "RRS", "obligation_kw": 250.0, "obligation_hour": True, "stored": False,
                     "warning": "economic curtailment refused: RRS obligation"}}
    out = text(st)
    assert "schedule 3 (2 intervals, NOT yet stored), now p 120.0, economics holds open: row-a; available 295.0 kW, " \
           "RRS 250.0 kW committed this hour" in out
    assert "WARNING: economic curtailment refused: RRS obligation" in out
    st["market"] = {"error": "no memory to start the market feature"}
    assert "market NOT running: no memory to start the market feature" in text(st)


def test_sim_price_column_becomes_schedule_intervals(tmp_path):
    from gridshed.errors import UserError
    from gridshed.sim.scenario import load_scenario
    from gridshed.sim.site import price_intervals

    f = tmp_path / "p.csv"
    f.write_text("t_s,hz,price\n0,60,30\n2,60,120\n2.4,60,120\n5.6,59.6,20\n8,60,20\n")
    sc = load_scenario(f)
    assert sc.value("price", 2.3) == 120 and sc.value("price", 5.0) == 120  # a step, never interpolated
    w = 1796083200
    # equal neighbours merged, whole seconds, the last one held a minute past the end
    assert price_intervals(sc, w) == [[w, w + 2, "p", 30.0], [w + 2, w + 6, "p", 120.0], [w + 6, w + 68, "p", 20.0]]
    f.write_text("t_s,hz,price\n" + "".join(f"{k},60,{k % 2}\n" for k in range(18)))
    with pytest.raises(UserError, match="18 price steps; one signed command carries a schedule of at most 16"):
        price_intervals(load_scenario(f), w)
