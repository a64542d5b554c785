"""The market host commands through the real `gridshed` CLI (in process; no network):

- breakeven against hand computations (hashprice, and BTC price + network hashrate + fees),
  per block from a site.toml, and its user errors (one line, exit 2);
- the price CSV reader: interval length from the data, a time without offset, a duplicate,
  a bad number (each one line naming the line);
- the 4CP predictor on a small synthetic forecast (months, local hours across a DST offset,
  threshold, padding, merging);
- dispatch --dry-run --json: the schedule rows (past dropped, equal neighbours merged, 4CP kW
  rows after the price rows), the 96-interval cap refused with a clear line and --horizon as
  the way out; the signed schedule a board would verify (agent.cmd_mac0 with the inventory key),
  ids per device monotonic in the inventory, seqs fresh;
- `gridshed prices` without gridstatus: the one install line.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from agent import cbor
from agent import cmd_mac0 as mac0
from gridshed import breakeven as be
from gridshed import dispatch as dp
from gridshed import fourcp
from gridshed.cli import main
from gridshed.errors import UserError
from gridshed.inventory import Inventory
from gridshed.prices import read_series
from gridshed.signing import new_key

ROOT = Path(__file__).resolve().parents[2]
T0 = 1815627600  # 2027-07-15T00:00:00-05:00 (CDT) = 05:00Z


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    return run(capsys, *argv)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def js(capsys, *argv: str) -> dict:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


# ---- breakeven ------------------------------------------------------------------------------
def test_breakeven_hand_computation(capsys):
    # 20 J/TH at $0.05/TH/day: a TH/s draws 20 W, 20 x 86400 J = 1.728e6 J = 0.00048 MWh a day;
    # 0.05 / 0.00048 = 104.1666 $/MWh
    assert be.strike(20, 0.05) == pytest.approx(104.1666667, rel=1e-9)
    d = js(capsys, "breakeven", "--efficiency", "20", "--hashprice", "0.05")
    assert d["strike_usd_mwh"] == 104.17
    # from the network: $100,000 x (3.125 + 0.1) BTC x 144 / 800e6 TH/s = $0.05805/TH/day;
    # at 20 J/TH: 0.05805 / 0.00048 = 120.9375 $/MWh; a 2 % pool fee: x 0.98 = 118.51875
    assert be.hashprice(100000, 800, btc_per_block=3.225) == pytest.approx(0.05805)
    d = js(capsys, "breakeven", "--efficiency", "20", "--btc-price", "100000", "--network-eh", "800",
           "--btc-per-block", "3.225")
    assert d["hashprice_usd_th_day"] == pytest.approx(0.05805) and d["strike_usd_mwh"] == 120.94
    d = js(capsys, "breakeven", "--efficiency", "20", "--btc-price", "100000", "--network-eh", "800",
           "--btc-per-day", str(3.225 * 144), "--pool-fee", "2")
    assert d["strike_usd_mwh"] == pytest.approx(118.52, abs=0.005)


def test_breakeven_help_shows_the_formula(capsys):
    with pytest.raises(SystemExit):
        main(["breakeven", "--help"])
    out = capsys.readouterr().out
    assert "86400 / 3.6e9" in out and "$104.17/MWh" in out


def test_breakeven_per_block(tmp_path, capsys):
    site = tmp_path / "site.toml"
    text = (ROOT / "scenarios" / "demo-site.toml").read_text()
    # row-a: 17.5 J/TH in the file; row-b and row-c take --efficiency; hvac-aux has no miners
    text = text.replace('name = "row-a"\n', 'name = "row-a"\nefficiency_j_th = 17.5\nstrike_usd_mwh = 110\n', 1)
    site.write_text(text)
    d = js(capsys, "breakeven", "--hashprice", "0.05", "--site", str(site), "--efficiency", "25")
    b = {r["block"]: r for r in d["blocks"]}
    assert b["row-a"]["strike_usd_mwh"] == round(0.05 / (17.5 * 86400 / 3.6e9), 2) == 119.05
    assert b["row-a"]["configured_strike_usd_mwh"] == 110
    assert b["row-b"]["strike_usd_mwh"] == round(0.05 / (25 * 86400 / 3.6e9), 2) == 83.33
    assert b["row-b"]["kw"] == pytest.approx(132.0)
    assert b["hvac-aux"]["strike_usd_mwh"] is None
    # the example market site: a heat block's miners get their mining strike, the firm block none
    d = js(capsys, "breakeven", "--hashprice", "0.05", "--site", str(ROOT / "scenarios" / "market-site.toml"),
           "--efficiency", "20")
    b = {r["block"]: r for r in d["blocks"]}
    assert b["heat-loop"]["class"] == "heat" and b["heat-loop"]["strike_usd_mwh"] == 104.17
    assert b["inference"]["class"] == "firm" and b["inference"]["strike_usd_mwh"] is None
    assert b["row-a"]["configured_strike_usd_mwh"] == 45
    # the host-only key does not reach the board's config, and the site file still provisions
    from gridshed.siteconfig import load_site

    site.write_text(text.replace("strike_usd_mwh = 110\n", ""))
    cfg = load_site(site)
    assert cfg["blocks"][0]["name"] == "row-a" and all("efficiency_j_th" not in blk for blk in cfg["blocks"])


@pytest.mark.parametrize("argv,msg", [
    (["breakeven", "--hashprice", "0.05"], "--efficiency"),
    (["breakeven", "--efficiency", "20"], "--hashprice"),
    (["breakeven", "--efficiency", "0", "--hashprice", "0.05"], "efficiency (J/TH) must be > 0"),
    (["breakeven", "--efficiency", "20", "--hashprice", "0.05", "--btc-price", "1"], "not both"),
    (["breakeven", "--efficiency", "20", "--btc-price", "1e5", "--network-eh", "800"], "--btc-per-block"),
    (["breakeven", "--efficiency", "20", "--hashprice", "0.05", "--pool-fee", "100"], "pool fee"),
    (["breakeven", "--efficiency", "nan", "--hashprice", "0.05"], "must be a number"),
    (["breakeven", "--hashprice", "0.05", "--site", "demo-site.toml"], "efficiency_j_th"),
])
def test_breakeven_user_errors(capsys, argv, msg):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gridshed: error:") and msg in err, err


# ---- price CSV --------------------------------------------------------------------------------
def _csv(path: Path, rows: list[tuple[str, str]], col: str = "price_usd_mwh") -> Path:
    path.write_text("interval_start," + col + "\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


def test_price_csv_reader(tmp_path):
    # offsets mixed; the interval is the most common step (15 min); the 45-minute step is a gap
    p = _csv(tmp_path / "p.csv", [("2027-07-15T00:00:00-05:00", "20.5"), ("2027-07-15T00:15:00-05:00", "30"),
                                  ("2027-07-15T05:30:00Z", "-3"), ("2027-07-15T07:30:00+01:00", "7")])
    s = read_series(p)
    assert [(iv.start - T0, iv.end - T0, iv.value) for iv in s] == [(0, 900, 20.5), (900, 1800, 30.0),
                                                                   (1800, 2700, -3.0), (5400, 6300, 7.0)]
    # a gap is no interval in the schedule (the board runs there), never the price before it stretched
    assert dp.price_intervals(s, now=T0) == [[T0, T0 + 900, "p", 20.5], [T0 + 900, T0 + 1800, "p", 30],
                                             [T0 + 1800, T0 + 2700, "p", -3], [T0 + 5400, T0 + 6300, "p", 7]]
    for rows, msg in (([("2027-07-15T00:00:00", "1"), ("2027-07-15T01:00:00", "2")], ":2: bad time|no UTC offset"),
                      ([("2027-07-15T01:00:00Z", "1"), ("2027-07-15T00:00:00+00:00", "2")], "time order"),
                      ([("2027-07-15T00:00:00Z", "1"), ("2027-07-15T00:00:00+00:00", "2")], "time order"),
                      ([("2027-07-15T00:00:00Z", "1"), ("2027-07-15T01:00:00Z", "x")], ":3: price_usd_mwh 'x'"),
                      ([("2027-07-15T00:00:00Z", "1"), ("2027-07-15T01:00:00Z", "inf")], "finite"),
                      ([("2027-07-15T00:00:00Z", "1"), ("2027-07-15T01:00:00Z", "1"), ("2027-07-15T02:00:00Z", "1"),
                        ("2027-07-15T02:10:00Z", "1")], "irregular intervals: a 600 s step"),
                      ([("2027-07-15T00:00:00Z", "1")], "at least two rows")):
        with pytest.raises(UserError, match=msg):
            read_series(_csv(tmp_path / "bad.csv", rows))
    (tmp_path / "cols.csv").write_text("time,price\n")
    with pytest.raises(UserError, match="needs columns interval_start,price_usd_mwh"):
        read_series(tmp_path / "cols.csv")


# ---- 4CP --------------------------------------------------------------------------------------
def test_fourcp_predictor_on_a_synthetic_forecast(tmp_path, capsys):
    # 15-minute forecast: July 15 (CDT, UTC-5) and December 15 (CST, UTC-6) at the same local hours
    rows = []
    for day, off in (("2027-07-15", "-05:00"), ("2027-12-15", "-06:00")):
        for h in range(13, 20):
            for q in (0, 15, 30, 45):
                mw = 70000 + (h - 13) * 2000 + q * 10        # rises through the afternoon
                if h == 16 and q == 30:
                    mw = 60000                               # one dip below the threshold inside the hours
                rows.append((f"{day}T{h:02d}:{q:02d}:00{off}", str(mw)))
    fc = _csv(tmp_path / "fc.csv", rows, "forecast_mw")
    cfg = tmp_path / "4cp.toml"
    cfg.write_text('months = [6, 7, 8, 9]\nhours = [16, 17]\ntz = "America/Chicago"\nthreshold_mw = 76000\n'
                   'pad_min = 0\nshed_kw = 500\n')
    d = js(capsys, "fourcp", str(cfg), "--forecast", str(fc))
    # July only (December is not a 4CP month); 16:00..16:30 and 16:45..18:00 local (the dip splits
    # them; 15:xx is below the threshold and outside the hours, 18:xx outside the hours)
    assert [(w["start"], w["end"]) for w in d["windows"]] == [("2027-07-15T21:00:00Z", "2027-07-15T21:30:00Z"),
                                                              ("2027-07-15T21:45:00Z", "2027-07-15T23:00:00Z")]
    assert d["windows"][1]["peak_forecast_mw"] == 70000 + 4 * 2000 + 450
    # padding 15 min joins them across the dip
    c = fourcp.parse_config({"months": [7], "hours": [16, 17], "threshold_mw": 76000, "pad_min": 15})
    w = fourcp.predict(c, read_series(fc, "forecast_mw"))
    assert [(x["start"] - T0, x["end"] - T0) for x in w] == [(16 * 3600 - 900, 18 * 3600 + 900)]
    assert c.shed_kw is None  # "all" by default
    for bad, msg in (({"months": [13], "hours": [1], "threshold_mw": 1}, "months"),
                     ({"months": [7], "hours": [24], "threshold_mw": 1}, "hours"),
                     ({"months": [7], "hours": [1]}, "threshold_mw missing"),
                     ({"months": [7], "hours": [1], "threshold_mw": 1, "tz": "Mars/Olympus"}, "time zone"),
                     ({"months": [7], "hours": [1], "threshold_mw": 1, "kw": 3}, "unknown key 'kw'"),
                     ({"months": [7], "hours": [1], "threshold_mw": 1, "shed_kw": "most"}, "shed_kw")):
        with pytest.raises(UserError, match=msg):
            fourcp.parse_config(bad)


def test_fourcp_shipped_example(capsys):
    d = js(capsys, "fourcp", str(ROOT / "scenarios" / "ercot-4cp.toml"))
    # the synthetic day peaks 16:00..18:59 CDT above 78 GW: 21:00Z..00:00Z, padded 15 min
    assert [(w["start"], w["end"]) for w in d["windows"]] == [("2027-07-15T20:45:00Z", "2027-07-16T00:15:00Z")]
    assert d["windows"][0]["start_local"] == "2027-07-15T15:45:00-05:00"


# ---- dispatch ---------------------------------------------------------------------------------
@pytest.fixture
def inv(tmp_path) -> tuple[Path, dict[str, tuple[bytes, bytes]]]:
    path = tmp_path / "inv.sqlite"
    keys = {}
    with Inventory(path) as db:
        for dev, site in (("ctl-1", "demo-site"), ("ctl-2", "demo-site"), ("other-1", "other"), ("mkt-1", "market-site")):
            kid, key = os.urandom(8), new_key()
            db.record_provision(dev, "unix-sim", site, kid.hex(), key, "b1", "c1")
            keys[dev] = (kid, key)
    return path, keys


def _prices(tmp_path: Path, n: int, step: int = 900, price=lambda i: 20 + (i // 2)) -> Path:
    from gridshed.prices import iso

    return _csv(tmp_path / "prices.csv", [(iso(T0 + i * step), f"{price(i):.2f}") for i in range(n)])


def test_dispatch_dry_run_schedule(tmp_path, capsys, inv):
    db, _ = inv
    prices = _prices(tmp_path, 8)  # 20,20,21,21,22,22,23,23 each 15 min
    site = ROOT / "scenarios" / "demo-site.toml"
    now = "2027-07-15T00:20:00-05:00"  # the first interval is over, the second one runs
    d = js(capsys, "dispatch", str(prices), "--site", str(site), "--inventory", str(db), "--now", now, "--dry-run")
    assert d["dry_run"] is True and d["site"] == "demo-site"
    assert [(r["start_unix"] - T0, r["end_unix"] - T0, r["price_usd_mwh"]) for r in d["schedule"]] == [
        (900, 1800, 20), (1800, 3600, 21), (3600, 5400, 22), (5400, 7200, 23)]
    assert sorted(b["device"] for b in d["boards"]) == ["ctl-1", "ctl-2"]
    assert all(b["schedule_id"] == T0 + 1200 for b in d["boards"])  # the first id: now in unix seconds
    with Inventory(db) as x:  # a dry run reserves nothing
        assert x.schedule_info("ctl-1") is None
    # with 4CP: the kW rows come after the price rows ("all" = the demo site's 369 kW + 0)
    cfg = tmp_path / "4cp.toml"
    cfg.write_text('months = [7]\nhours = [0]\ntz = "America/Chicago"\nthreshold_mw = 100\n')
    fc = _csv(tmp_path / "fc.csv", [("2027-07-15T00:30:00-05:00", "150"), ("2027-07-15T00:45:00-05:00", "90")],
              "forecast_mw")
    d = js(capsys, "dispatch", str(prices), "--site", str(site), "--inventory", str(db), "--now", now,
           "--dry-run", "--4cp", str(cfg), "--forecast", str(fc), "--device", "ctl-1")
    assert d["schedule"][-1] == {"start": "2027-07-15T05:30:00Z", "end": "2027-07-15T05:45:00Z",
                                 "start_unix": T0 + 1800, "end_unix": T0 + 2700, "curtail_kw": 369}
    assert len(d["schedule"]) == 5 and [b["device"] for b in d["boards"]] == ["ctl-1"]
    # the demo site has no strikes: said once on stderr, stdout stays the JSON
    rc, out, err = run(capsys, "dispatch", str(prices), "--site", str(site), "--inventory", str(db), "--now", now,
                       "--dry-run", "--json")
    assert rc == 0 and json.loads(out)["dry_run"] and "no [[blocks]] has strike_usd_mwh" in err
    rc, _, err = run(capsys, "dispatch", str(prices), "--site", str(ROOT / "scenarios" / "market-site.toml"),
                     "--inventory", str(db), "--now", now, "--dry-run")
    assert rc == 0 and err == ""
    # a dry run needs no inventory: sized for the site file's device
    rc, out, err = run(capsys, "dispatch", str(prices), "--site", str(ROOT / "scenarios" / "market-site.toml"),
                       "--inventory", str(tmp_path / "empty.sqlite"), "--now", now, "--dry-run", "--json")
    assert rc == 0 and [b["device"] for b in json.loads(out)["boards"]] == ["mkt-1"] and "dry run sized" in err
    rc, _, err = run(capsys, "dispatch", str(prices), "--site", str(ROOT / "scenarios" / "market-site.toml"),
                     "--inventory", str(tmp_path / "empty.sqlite"), "--now", now)
    assert rc == 2 and "no device of site 'market-site'" in err
    # a person's text says it is a dry run
    rc, out, _ = run(capsys, "dispatch", str(prices), "--site", str(site), "--inventory", str(db), "--now", now,
                     "--dry-run")
    assert rc == 0 and "dry run" in out and "23.00 $/MWh" in out and ": fits" in out


def test_dispatch_interval_cap(tmp_path, capsys, inv):
    db, _ = inv
    prices = _prices(tmp_path, 200, price=lambda i: 20 + i * 1.37)  # 200 different cent prices: 50 h
    site = ROOT / "scenarios" / "demo-site.toml"
    now = "2027-07-15T00:00:00-05:00"
    rc, out, err = run(capsys, "dispatch", str(prices), "--site", str(site), "--inventory", str(db), "--now", now,
                       "--dry-run")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "has 200 intervals" in err and f"at most {dp.MAX_INTERVALS}" in err and "--horizon" in err
    d = js(capsys, "dispatch", str(prices), "--site", str(site), "--inventory", str(db), "--now", now,
           "--dry-run", "--horizon", "24h")
    assert len(d["schedule"]) == 96 and d["schedule"][-1]["end_unix"] == T0 + 86400
    # a day of 96 15-minute cent prices: one signed command as a compact series ("ts")
    assert all(b["bytes"] <= dp.MAX_SIGNED_BYTES and b["form"] == "ts" and b["fits"] == {"serial": True, "mqtt": True}
               for b in d["boards"]), d["boards"]
    # 96 prices above 655.35 $/MWh (5 CBOR bytes each) are more than the board verifies in one
    # signed command (512 bytes): the dry run says so
    dear = _prices(tmp_path, 96, price=lambda i: 700 + i * 1.37)
    d = js(capsys, "dispatch", str(dear), "--site", str(site), "--inventory", str(db), "--now", now, "--dry-run")
    assert all(b["bytes"] > dp.MAX_SIGNED_BYTES and b["fits"] == {"serial": False, "mqtt": False} for b in d["boards"])
    # out of what a board takes: one line naming the row (the backtest's reader, the same CSV)
    bad = _prices(tmp_path, 4, price=lambda i: 200000 if i == 2 else 10)
    rc, _, err = run(capsys, "dispatch", str(bad), "--site", str(site), "--inventory", str(db), "--now", now,
                     "--dry-run")
    assert rc == 2 and "prices.csv:4:" in err and "outside -10000..100000" in err
    with pytest.raises(UserError, match=r"interval 1 \(.*\): kW to curtail 2e\+07 is outside"):
        dp.check_rows([[T0, T0 + 900, "p", 1], [T0 + 900, T0 + 1800, "kw", 2e7]])
    # everything in the past
    rc, _, err = run(capsys, "dispatch", str(_prices(tmp_path, 4)), "--site", str(site), "--inventory", str(db),
                     "--dry-run", "--now", "2030-01-01T00:00:00Z")
    assert rc == 2 and "no interval from now on" in err


def test_transport_limits_and_fit(tmp_path, capsys, inv):
    import re

    # the board's limits, read from the firmware: the console line and the fleet channel's buffer
    src = (ROOT / "firmware" / "agent" / "base.py").read_text()
    assert int(re.search(r"^LINE_MAX = (\d+)", src, re.M).group(1)) == dp.CONSOLE_LINE_MAX
    src = (ROOT / "firmware" / "agent" / "features" / "mqtt.py").read_text()
    assert int(re.search(r"max_packet=(\d+)", src).group(1)) == dp.FLEET_MAX_PACKET
    db, _ = inv
    site = ROOT / "scenarios" / "market-site.toml"
    now = "2027-07-15T00:00:00-05:00"
    base = ["dispatch", "--site", str(site), "--inventory", str(db), "--now", now]
    # 40 cent prices with a gap (no uniform series: rows) fit neither a console line nor the
    # board's MQTT buffer: refused before anything is reserved or sent (the port and the broker
    # are never opened)
    from gridshed.prices import iso

    prices = str(_csv(tmp_path / "gap.csv", [(iso(T0 + i * 900), f"{20 + i * 1.37:.2f}") for i in range(41) if i != 1]))
    d = js(capsys, *base, prices, "--dry-run")
    assert d["boards"][0]["fits"] == {"serial": False, "mqtt": False}
    assert d["boards"][0]["console_line"] > dp.CONSOLE_LINE_MAX and d["boards"][0]["mqtt_packet"] > dp.FLEET_MAX_PACKET
    for via in (["--port", str(tmp_path / "no-such-port")], ["--broker", "127.0.0.1:9"]):
        rc, out, err = run(capsys, *base, prices, *via)
        assert rc == 2 and out == "" and err.count("\n") == 1, err
        assert "board verifies signed commands of at most 512 bytes" in err and "--fit" in err, err
    from agent.cmd_api import MAX_COMMAND_LEN

    assert dp.MAX_SIGNED_BYTES == MAX_COMMAND_LEN == 512
    with Inventory(db) as x:
        assert x.schedule_info("mkt-1") is None
    # --fit: the longest head that fits, cut at one time for every row kind, and said how far
    rc, out, err = run(capsys, *base, prices, "--dry-run", "--fit", "--port", "/dev/null", "--json")
    d = json.loads(out)
    n = d["summary"]["intervals"]
    assert rc == 0 and n == 17 and d["boards"][0]["fits"]["serial"] is True, d
    assert d["boards"][0]["bytes"] <= 512 and d["boards"][0]["console_line"] <= 1024
    assert f"--fit: {n} of 40 intervals fit the serial transport" in err
    assert [r["start_unix"] for r in d["schedule"]] == [T0] + [T0 + 900 * i for i in range(2, n + 1)]
    assert d["boards"][0]["form"] == "iv"
    d = js(capsys, *base, prices, "--dry-run", "--fit")
    assert d["boards"][0]["fits"]["mqtt"] is True and d["summary"]["intervals"] == n
    assert d["boards"][0]["mqtt_packet"] <= dp.FLEET_MAX_PACKET
    rows = [[T0 + 900 * i, T0 + 900 * (i + 1), "p", i] for i in range(10)] + [[T0, T0 + 9000, "kw", 5]]
    assert dp.fit_rows(rows, lambda rs: len(rs) <= 7) == rows[:6] + rows[10:]
    assert dp.fit_rows(rows, lambda rs: False) == []
    # a day of hourly whole-dollar prices fits one command
    prices = str(_prices(tmp_path, 24, step=3600, price=lambda i: 20 + i))
    d = js(capsys, *base, prices, "--dry-run")
    assert len(d["schedule"]) == 24 and d["boards"][0]["fits"] == {"serial": True, "mqtt": True}


def test_signed_schedule_verifies_and_ids_rise(tmp_path, inv):
    db, keys = inv
    from gridshed import fleet_client as fc

    rows = [[T0, T0 + 900, "p", 25.5], [T0 + 900, T0 + 1800, "kw", 369]]
    tg = fc.targets(db, None, "demo-site")
    seqf = tmp_path / "seq.json"
    first = dp.sign(tg, rows, seqf, db, now=T0 - 100)
    again = dp.sign(tg, rows, seqf, db, now=T0 - 100)  # same second: ids and seqs still rise
    for a, b in zip(first, again):
        assert b.sched_id == a.sched_id + 1 and b.seq == a.seq + 1
        kid, key = keys[a.target.device]
        r = mac0.verify(b.msg, {kid: key}, 4096)
        assert isinstance(r, tuple), r
        p = cbor.loads(r[1])
        assert p["cmd"] == "schedule" and p["dev"] == a.target.device and p["site"] == "demo-site"
        assert p["sid"] == b.sched_id and p["iv"] == rows and p["exp"] == T0 - 100 + 60
        other = keys["other-1"]
        assert mac0.verify(b.msg, {kid: other[1]}, 4096) == "bad-mac"
    with Inventory(db) as x:
        assert x.schedule_info("ctl-1")["last_id"] == T0 - 100 + 1
        assert x.schedule_info("ctl-1")["intervals"] == 2
    # the inventory lost and rebuilt: ids start again from the clock, still above the old ones
    fresh = tmp_path / "fresh.sqlite"
    with Inventory(fresh) as x:
        x.record_provision("ctl-1", "unix-sim", "demo-site", keys["ctl-1"][0].hex(), keys["ctl-1"][1], "b1", "c1")
    later = dp.sign(fc.targets(fresh, "ctl-1", None), rows, seqf, fresh, now=T0)
    assert later[0].sched_id == T0 > again[0].sched_id


# ---- live prices ------------------------------------------------------------------------------
def test_prices_without_gridstatus(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gridstatus", None)  # what `import gridstatus` sees when not installed
    rc, out, err = run(capsys, "prices", "--iso", "ERCOT", "--out", "x.csv")
    assert rc == 2 and out == ""
    assert err == "gridshed: error: live prices need the gridstatus package: pip install 'gridshed[live]'   " \
                  "(or: pip install gridstatus)\n"
    # the extra is declared, and not among the test deps
    import tomllib

    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("gridstatus") for d in proj["optional-dependencies"]["live"])
    assert not any("gridstatus" in d for d in proj["optional-dependencies"]["test"] + proj["dependencies"])


def test_merge_by_strike_decides_the_same(tmp_path, capsys, inv):
    """Neighbours between the same strikes merged into one row: the board's own decision core
    (agent.market, with the example site's strikes, min times, caps and ramp) sheds and restores
    the same blocks at the same seconds over the merged schedule as over the full one."""
    import random

    from agent import market as M
    from gridshed.siteconfig import load_site, read_toml

    site_path = ROOT / "scenarios" / "market-site.toml"
    cfg = load_site(site_path)
    strikes = dp.site_strikes(read_toml(site_path))
    assert sorted(strikes) == [45, 65, 90, 150]
    rnd = random.Random(16)
    level = 50.0
    vals = []
    for _ in range(96):  # a random walk across the strikes, 15-minute cent prices
        level = 80 + 0.9 * (level - 80) + rnd.uniform(-15, 15)  # mean-reverting: crosses the strikes
        vals.append(round(level, 2))
    series = [dp.Interval(T0 + 900 * i, T0 + 900 * (i + 1), v) for i, v in enumerate(vals)]
    full = dp.price_intervals(series, T0)
    merged = dp.price_intervals(series, T0, strikes=strikes)
    assert len(full) == 96 and 5 < len(merged) < 48, len(merged)
    for a, b in zip(merged, merged[1:]):
        assert a[1] == b[0]
        assert sum(a[3] > s for s in strikes) != sum(b[3] > s for s in strikes)  # neighbours differ in band

    def run(rows: list[list]) -> list:
        m = M.Market(cfg)
        assert m.set_schedule(1, rows) is None
        closed = (1 << m.n) - 1
        trace = []
        for t in range(T0, T0 + 96 * 900 + 3600, 60):
            off = m.step(t, closed)
            trace.append((t, off, [(e["ev"], e["block"], e["why"]) for e in (m.event(k) for k in range(m.nev))]))
        return trace

    tf, tm = run(full), run(merged)
    assert tf == tm
    assert sum(len(x[2]) for x in tf) > 10  # it did curtail and restore along the way
    # through the CLI: fewer rows, the same series
    prices = _csv(tmp_path / "walk.csv", [(dp.iso(iv.start), f"{iv.value:.2f}") for iv in series])
    db, _ = inv
    base = ["dispatch", str(prices), "--site", str(site_path), "--inventory", str(db), "--dry-run",
            "--now", "2027-07-15T00:00:00-05:00"]
    assert len(js(capsys, *base)["schedule"]) == 96
    d = js(capsys, *base, "--merge-by-strike")
    assert [[r["start_unix"], r["end_unix"], "p", r["price_usd_mwh"]] for r in d["schedule"]] == merged
    rc, _, err = run_cli(capsys, "dispatch", str(prices), "--site", str(ROOT / "scenarios" / "demo-site.toml"),
                         "--inventory", str(db), "--dry-run", "--merge-by-strike")
    assert rc == 2 and "--merge-by-strike: no [[blocks]]" in err
