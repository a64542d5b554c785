"""CLI: the market commands on the host (docs/market.md; `gridshed backtest` is in cli/market.py).

breakeven  a miner's strike price in $/MWh (hashprice, or BTC price + network hashrate + fees)
dispatch   a price series (and/or 4CP peak windows) -> a signed schedule sent to the boards
fourcp     the ERCOT 4CP predictor alone: which forecast intervals it would keep the site off
prices     live ERCOT / CAISO prices through the optional gridstatus package -> the price CSV
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import UserError
from .output import emit, note, warn

BREAKEVEN_EPILOG = """formula:
  strike ($/MWh) = hashprice ($/TH/day) x (1 - pool fee) / (efficiency (J/TH) x 86400 / 3.6e9)
  hashprice      = BTC price x BTC per day / (network EH/s x 1e6),  BTC per day = BTC per block x 144
  e.g. 20 J/TH at $0.05/TH/day: 0.05 / (20 x 86400 / 3.6e9) = $104.17/MWh
  mining loses money while the power price is above the strike (energy only: no hosting, no wear).

examples:
  gridshed breakeven --efficiency 20 --hashprice 0.05
  gridshed breakeven --efficiency 17.5 --btc-price 95000 --network-eh 850 --btc-per-block 3.2
  gridshed breakeven --hashprice 0.05 --site site.toml --json     (per block: efficiency_j_th in [[blocks]])
"""

DISPATCH_EPILOG = """examples:
  gridshed dispatch prices.csv --site site.toml --dry-run --json
  gridshed dispatch prices.csv --site site.toml --broker 10.0.0.5:1883          (every board of the site)
  gridshed dispatch prices.csv --site site.toml --device site1-ctl1 --port /dev/ttyUSB0
  gridshed dispatch prices.csv --site site.toml --4cp ercot-4cp.toml --forecast forecast.csv --horizon 24h
  gridshed dispatch prices.csv --site site.toml --merge-by-strike --fit    (as many hours as one command holds)

the schedule: one row per price interval from now on ([start, end, "p", $/MWh], neighbours with the
  same price merged) then one row per 4CP window ([start, end, "kw", target]; later rows win where
  they overlap). Prices on one step without gaps go as a compact series ("ts": start, step, cents:
  a day of 96 15-minute prices fits one command) when that is shorter; else as rows (one signed
  command of 512 bytes holds about 17 rows of cent prices). At most 96 rows or steps per schedule;
  a longer one is refused (--horizon, --merge-by-strike, --fit).
  Each board gets its own signed command (its key, a fresh seq, its next schedule id from the
  inventory); the board keeps the schedule with the highest id. docs/market.md.
exit status: 0 all boards accepted (or --dry-run), 1 a board refused or did not answer, 2 usage errors."""

FOURCP_EPILOG = """config (TOML): months = [6, 7, 8, 9]  hours = [15, 16, 17, 18]  tz = "America/Chicago"
  threshold_mw = 78000  pad_min = 15  shed_kw = "all"  forecast = "forecast.csv" (optional)
  an interval is a predicted peak when its local month and hour are listed and its forecast
  (CSV: interval_start, forecast_mw) is >= threshold_mw; windows are padded by pad_min and merged.
  Each window asks the boards to curtail shed_kw kW ("all": every block's kW in the site file).

examples:
  gridshed fourcp scenarios/ercot-4cp.toml
  gridshed fourcp ercot-4cp.toml --forecast tomorrow.csv --json
  gridshed dispatch prices.csv --site site.toml --4cp ercot-4cp.toml    (send them as kW rows)
"""

PRICES_EPILOG = """needs the optional gridstatus package and the network:
  pip install 'gridshed[live]'      (or: pip install gridstatus)
examples:
  gridshed prices --iso ERCOT --out prices.csv
  gridshed prices --iso ERCOT --market day-ahead --date 2026-07-01 --location HB_HOUSTON --out da.csv
  gridshed prices --iso CAISO --location TH_SP15_GEN-APND --out caiso.csv
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("breakeven", parents=[common], help="a miner's strike price in $/MWh (per block with --site)",
                       description="The power price above which mining loses money, from the miners' "
                                   "efficiency and the hashprice (or BTC price, network hashrate and fees).",
                       epilog=BREAKEVEN_EPILOG, formatter_class=fmt)
    p.add_argument("--efficiency", type=float, metavar="J_TH",
                   help="miner efficiency in J/TH (with --site: for mining blocks without efficiency_j_th)")
    p.add_argument("--hashprice", type=float, metavar="USD_TH_DAY", help="hashprice in $ per TH/s per day")
    p.add_argument("--btc-price", type=float, metavar="USD", help="BTC price in $ (instead of --hashprice)")
    p.add_argument("--network-eh", type=float, metavar="EH_S", help="network hashrate in EH/s")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--btc-per-block", type=float, metavar="BTC", help="block subsidy + average fees per block")
    g.add_argument("--btc-per-day", type=float, metavar="BTC", help="subsidy + fees mined by the network per day")
    p.add_argument("--pool-fee", type=float, default=0.0, metavar="PCT", help="pool fee in percent (default 0)")
    p.add_argument("--site", metavar="SITE.toml", help="a strike per [[blocks]] (efficiency_j_th, miners, kw_per_miner)")
    p.set_defaults(func=cmd_breakeven)

    p = sub.add_parser("dispatch", parents=[common], help="a price series -> a signed schedule sent to the boards",
                       description="Turn a price series (CSV: interval_start, price_usd_mwh) and/or ERCOT 4CP "
                                   "peak windows into one signed schedule per board and send it over MQTT or "
                                   "the serial console.",
                       epilog=DISPATCH_EPILOG, formatter_class=fmt)
    p.add_argument("prices", nargs="?", help="price CSV (interval_start ISO 8601 with offset, price_usd_mwh)")
    p.add_argument("--site", required=True, metavar="SITE.toml", help="the site file (its site id picks the boards)")
    p.add_argument("--device", action="append", metavar="ID",
                   help="only this board (repeat for several; default: every board of the site in the inventory)")
    p.add_argument("--4cp", dest="fourcp", metavar="CONFIG.toml", help="add the 4CP predictor's windows as kW rows")
    p.add_argument("--forecast", metavar="CSV", help="load forecast for --4cp (default: the config's forecast)")
    p.add_argument("--horizon", metavar="DURATION", help="only intervals starting within this from now (e.g. 24h)")
    p.add_argument("--now", metavar="ISO", help="the time the schedule starts from (default: the host clock)")
    p.add_argument("--dry-run", action="store_true", help="print the schedule; sign nothing, send nothing")
    p.add_argument("--merge-by-strike", action="store_true",
                   help="merge neighbouring intervals whose prices lie between the same strikes of the site "
                        "file (the boards decide the same; the row carries the mean price): fewer rows")
    p.add_argument("--fit", action="store_true",
                   help="send the first intervals that fit the transport (a warning says how far they reach) "
                        "instead of refusing a schedule that does not fit")
    p.add_argument("--port", "-p", help="serial port of the board's console (one board)")
    p.add_argument("--broker", help="MQTT broker HOST[:PORT] (default $GRIDSHED_BROKER or 127.0.0.1:1883)")
    p.add_argument("--expires", default="60s", help="the command's delivery lifetime (default 60s)")
    p.add_argument("--inventory", help="inventory database (default: user data dir, or $GRIDSHED_INVENTORY)")
    p.add_argument("--seq-file", help="seq counter file (default: seq.json beside the inventory)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for answers (default 10)")
    p.set_defaults(func=cmd_dispatch)

    p = sub.add_parser("fourcp", parents=[common], help="ERCOT 4CP predictor: predicted peak windows from a forecast",
                       description="Flag the load-forecast intervals that may be one of ERCOT's four coincident "
                                   "peaks (months, local hours, a forecast threshold) and print the windows the "
                                   "site would be held at its kW target.",
                       epilog=FOURCP_EPILOG, formatter_class=fmt)
    p.add_argument("config", help="4CP predictor config (TOML)")
    p.add_argument("--forecast", metavar="CSV", help="load forecast (default: the config's forecast)")
    p.set_defaults(func=cmd_fourcp)

    p = sub.add_parser("prices", parents=[common], help="live ERCOT/CAISO prices -> price CSV (needs gridstatus)",
                       description="Fetch prices from the ISO through the optional gridstatus package and write "
                                   "the price CSV that dispatch and backtest read.",
                       epilog=PRICES_EPILOG, formatter_class=fmt)
    p.add_argument("--iso", required=True, type=str.upper, choices=("ERCOT", "CAISO"))
    p.add_argument("--market", choices=("real-time", "day-ahead"), default="real-time")
    p.add_argument("--location", help="settlement point / node (default ERCOT HB_NORTH, CAISO TH_NP15_GEN-APND)")
    p.add_argument("--date", default="today", help="day to fetch (YYYY-MM-DD or today; default today)")
    p.add_argument("--out", "-o", help="CSV file to write (default: stdout)")
    p.set_defaults(func=cmd_prices)


# ---- breakeven --------------------------------------------------------------------------------
def _hashprice(args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    from .. import breakeven as be

    net = (args.btc_price, args.network_eh, args.btc_per_block, args.btc_per_day)
    if args.hashprice is not None:
        if any(v is not None for v in net):
            raise UserError("give --hashprice, or --btc-price with --network-eh and --btc-per-block/--btc-per-day, not both")
        return be._pos("--hashprice", args.hashprice, allow_zero=True), {"hashprice_source": "given"}
    if args.btc_price is None or args.network_eh is None or (args.btc_per_block is None and args.btc_per_day is None):
        raise UserError("give --hashprice USD_TH_DAY, or --btc-price, --network-eh and --btc-per-block (or --btc-per-day)")
    h = be.hashprice(args.btc_price, args.network_eh, args.btc_per_block, args.btc_per_day)
    return h, {"hashprice_source": "network", "btc_price_usd": args.btc_price, "network_eh_s": args.network_eh,
               "btc_per_block": args.btc_per_block, "btc_per_day": args.btc_per_day
               if args.btc_per_day is not None else args.btc_per_block * be.BLOCKS_PER_DAY}


def cmd_breakeven(args: argparse.Namespace) -> int:
    from .. import breakeven as be

    h, src = _hashprice(args)
    out: dict[str, Any] = {"hashprice_usd_th_day": round(h, 6), "pool_fee_pct": args.pool_fee, **src}
    lines = [f"hashprice ${h:.4f}/TH/day" + (f" (pool fee {args.pool_fee:g} %)" if args.pool_fee else "")]
    if args.site:
        from ..siteconfig import read_toml

        rows = be.site_strikes(read_toml(args.site), h, args.pool_fee, args.efficiency, source=args.site)
        out["blocks"] = [r.as_dict() for r in rows]
        for r in rows:
            if r.strike_usd_mwh is None:
                lines.append(f"  {r.name:<16} {'firm: never curtailed for price' if r.cls == 'firm' else 'no miners'}"
                             " (no strike)")
                continue
            conf = ("" if r.configured_usd_mwh is None
                    else f"   (site.toml strike_usd_mwh {r.configured_usd_mwh:g})")
            heat = "   (heat block: mining value only, its heat is worth more)" if r.cls == "heat" else ""
            lines.append(f"  {r.name:<16} {r.efficiency_j_th:g} J/TH  {r.kw:g} kW  strike ${r.strike_usd_mwh:.2f}/MWh"
                         f"{conf}{heat}")
    else:
        if args.efficiency is None:
            raise UserError("give --efficiency J/TH (or --site SITE.toml with efficiency_j_th per block)")
        s = be.strike(args.efficiency, h, args.pool_fee)
        out.update({"efficiency_j_th": args.efficiency, "strike_usd_mwh": round(s, 2)})
        lines.append(f"{args.efficiency:g} J/TH: strike ${s:.2f}/MWh (mining loses money above it)")
    emit(args, out, lines)
    return 0


# ---- 4CP ----------------------------------------------------------------------------------------
def _fourcp(config: str, forecast: str | None) -> tuple[Any, list[dict[str, Any]]]:
    from .. import fourcp

    cfg = fourcp.load_config(config)
    return cfg, fourcp.predict(cfg, fourcp.read_forecast(cfg, forecast))


def cmd_fourcp(args: argparse.Namespace) -> int:
    from .. import fourcp

    cfg, wins = _fourcp(args.config, args.forecast)
    js = fourcp.windows_json(wins, cfg.shed_kw, cfg.tz)
    lines = [f"{w['start_local']} .. {w['end_local']}  peak forecast {w['peak_forecast_mw']:g} MW  -> curtail "
             f"{w['shed_kw'] if cfg.shed_kw is None else format(cfg.shed_kw, 'g') + ' kW'}" for w in js]
    emit(args, {"months": cfg.months, "hours": cfg.hours, "tz": cfg.tz, "threshold_mw": cfg.threshold_mw,
                "pad_min": cfg.pad_min, "shed_kw": "all" if cfg.shed_kw is None else cfg.shed_kw, "windows": js},
         lines or ["no predicted 4CP window in the forecast"])
    return 0


# ---- dispatch ---------------------------------------------------------------------------------
def build_rows(args: argparse.Namespace, now: float, site: dict[str, Any]) -> tuple[list[list], list[dict[str, Any]]]:
    """The schedule rows (price rows, then 4CP kW rows) and the 4CP windows."""
    from .. import dispatch as dp
    from .. import fleet_client as fc
    from ..backtest import load_prices
    from ..prices import Interval

    if not args.prices and not args.fourcp:
        raise UserError("give a price CSV and/or --4cp CONFIG")
    horizon = fc.parse_duration(args.horizon) if args.horizon else None
    rows: list[list] = []
    if args.prices:
        pr = load_prices(args.prices)  # the backtest's reader: one reading of the price CSV
        series = [Interval(t, t + pr["interval_s"], p) for t, p in zip(pr["t"], pr["p"])]
        strikes = None
        if args.merge_by_strike:
            strikes = dp.site_strikes(site)
            if not strikes:
                raise UserError(f"--merge-by-strike: no [[blocks]] in {args.site} has strike_usd_mwh")
        rows += dp.price_intervals(series, now, horizon, strikes)
    wins: list[dict[str, Any]] = []
    if args.fourcp:
        cfg, wins = _fourcp(args.fourcp, args.forecast)
        if horizon is not None:
            wins = [w for w in wins if w["start"] < now + horizon]
        from ..fourcp import site_kw

        shed = cfg.shed_kw if cfg.shed_kw is not None else site_kw(site)
        if shed <= 0:
            raise UserError("--4cp: shed_kw = \"all\" but the site file's blocks have no kW (miners x kw_per_miner)")
        rows += dp.kw_intervals([(w["start"], w["end"]) for w in wins], shed, now)
    elif args.forecast:
        raise UserError("--forecast only applies with --4cp")
    return rows, wins


def cmd_dispatch(args: argparse.Namespace) -> int:
    import time

    from .. import dispatch as dp
    from .. import fleet_client as fc
    from ..prices import parse_time
    from ..siteconfig import read_toml

    site = read_toml(args.site)
    site_id = site.get("site")
    if not isinstance(site_id, str) or not site_id:
        raise UserError(f"{args.site}: site = \"...\" missing (the site id the boards were provisioned with)")
    now = parse_time(args.now, "--now: ") if args.now else time.time()
    if args.timeout <= 0:
        raise UserError("--timeout must be > 0")
    expires = fc.parse_duration(args.expires)
    rows, _ = build_rows(args, now, site)
    dp.check_rows(rows)
    dp.check_size(rows, form="auto")
    if any(r[2] == "p" for r in rows) and not any(isinstance(b, dict) and "strike_usd_mwh" in b
                                                  for b in site.get("blocks") or []):
        warn(f"{args.site}: no [[blocks]] has strike_usd_mwh: the boards take the prices but shed nothing for them "
             "(see `gridshed breakeven --site`)")
    summ = dp.summary(rows)
    if args.device:
        tgts = [t for d in dict.fromkeys(args.device) for t in fc.targets(args.inventory, d, None)]
        for t in tgts:
            if t.site != site_id:
                raise UserError(f"device {t.device!r} belongs to site {t.site!r}, not {site_id!r} ({args.site})")
    else:
        try:
            tgts = fc.targets(args.inventory, None, site_id)
        except UserError as exc:
            if not args.dry_run:
                raise
            # a dry run needs no inventory: sized for the site file's device with a stand-in key
            note(f"{exc}; dry run sized for device {site.get('device') or 'device'!r} of the site file")
            tgts = [fc.Target(str(site.get("device") or "device"), site_id, bytes(8), bytes(32))]
    if args.port and len(tgts) != 1:
        raise UserError(f"--port reaches one board: name it with --device ({len(tgts)} boards in site {site_id!r})")
    seq_path = fc.seq_file(args.inventory, args.seq_file)
    via = "serial" if args.port else "mqtt"

    def trial(rs: list[list]) -> list[Any]:  # signed as it would be, nothing reserved
        return dp.sign(tgts, rs, seq_path, args.inventory, expires, now, reserve_ids=False, form="auto")

    if args.fit and not dp.fits(trial(rows), via):
        kept = dp.fit_rows(rows, lambda rs: dp.fits(trial(rs), via))
        if not kept:
            raise UserError(f"not even the first interval fits the {via} transport")
        warn(f"--fit: {len(kept)} of {len(rows)} intervals fit the {via} transport; the schedule reaches "
             f"{dp.iso(max(r[1] for r in kept))}: dispatch again before then")
        rows = kept
        summ = dp.summary(rows)
    if args.dry_run:
        signed = trial(rows)
        boards = [{"device": s.target.device, "schedule_id": s.sched_id, "bytes": len(s.msg), "form": s.form,
                   "console_line": dp.console_line_len(s.msg), "console_max": dp.CONSOLE_LINE_MAX,
                   "mqtt_packet": dp.mqtt_packet_len(s), "mqtt_max": dp.FLEET_MAX_PACKET,
                   "fits": {v: dp.fits([s], v) for v in ("serial", "mqtt")}} for s in signed]
        emit(args, {"dry_run": True, "site": site_id, "summary": summ, "boards": boards,
                     "schedule": dp.rows_json(rows)},
             [f"schedule for {site_id}: {summ['intervals']} intervals {summ['from']} .. {summ['to']} "
              f"(dry run: nothing signed into the inventory, nothing sent)"]
             + [f"  {r['start']} .. {r['end']}  " + (f"{r['price_usd_mwh']:9.2f} $/MWh" if "price_usd_mwh" in r
                                                      else f"curtail {r['curtail_kw']} kW") for r in dp.rows_json(rows)]
             + [f"  {b['device']}: would be schedule id {b['schedule_id']}, {b['bytes']}/{dp.MAX_SIGNED_BYTES} bytes "
                f"signed as {'a uniform-step series' if b['form'] == 'ts' else 'rows'} (console line {b['console_line']}/{b['console_max']}, MQTT packet "
                f"{b['mqtt_packet']}/{b['mqtt_max']}): "
                + ("fits" if b["fits"][via] else f"TOO BIG for one {via} command: use --fit, --merge-by-strike or "
                                                 "--horizon") for b in boards])
        return 0
    broker = args.broker or os.environ.get("GRIDSHED_BROKER") or "127.0.0.1:1883"
    dp.check_transport(trial(rows), len(rows), via)  # before an id or seq is spent
    nonces = None
    if dp.fresh_needed():
        nonces = fc.nonces(via, tgts, port=args.port, broker=broker, timeout=args.timeout)
    signed = dp.sign(tgts, rows, seq_path, args.inventory, expires, now, nonces=nonces, form="auto")
    if via == "serial":
        note(f"sending schedule id {signed[0].sched_id} ({len(signed[0].msg)} bytes) on {args.port}")
        replies = [fc.send_serial(args.port, signed[0].msg, timeout=args.timeout)]
    else:
        replies = fc.send_mqtt(broker, signed, timeout=args.timeout)  # type: ignore[arg-type]
    results = []
    for s, r in zip(signed, replies):
        row: dict[str, Any] = {"device": s.target.device, "schedule_id": s.sched_id, "seq": s.seq,
                               "bytes": len(s.msg), "form": s.form, "ok": bool(r.get("ok"))}
        row.update({k: r[k] for k in ("refused", "error") if k in r})
        results.append(row)
    ok = all(r["ok"] for r in results)

    def line(r: dict[str, Any]) -> str:
        st = ("accepted" if r["ok"] else f"REFUSED: {r['refused']}" if r.get("refused")
              else f"NO ANSWER: {r.get('error', 'unknown')}")
        return f"{r['device']:<20} schedule id={r['schedule_id']} seq={r['seq']}  {st}"

    lines = [f"schedule {summ['intervals']} intervals {summ['from']} .. {summ['to']} via {via}"]
    lines += [line(r) for r in results]
    if len(results) > 1:
        lines.append(f"{sum(r['ok'] for r in results)}/{len(results)} boards accepted")
    emit(args, {"site": site_id, "via": via, "ok": ok, "summary": summ, "results": results}, lines)
    return 0 if ok else 1


# ---- live prices ------------------------------------------------------------------------------
def cmd_prices(args: argparse.Namespace) -> int:
    from .. import prices

    series = prices.fetch_live(args.iso, args.market, args.location, args.date)
    text = prices.write_series(args.out, series)
    info = {"iso": args.iso, "market": args.market, "location": args.location or prices.DEFAULT_LOCATION[args.iso],
            "intervals": len(series), "from": prices.iso(series[0].start), "to": prices.iso(series[-1].end),
            "out": args.out}
    if args.out:
        emit(args, info, f"{len(series)} intervals {info['from']} .. {info['to']} -> {args.out}")
    else:
        emit(args, {**info, "csv": text}, text.rstrip("\n"))
    return 0
