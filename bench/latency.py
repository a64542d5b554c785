"""3: end-to-end trip latency in the simulated site, many short dips per run_site call: RTU at
2400, 9600 and 19200 baud with the SDM120 and SDM630 maps in back-to-back mode (each row with the
wire time of one frequency transaction and the target, 2 transactions + 10 ms), TCP, the period
mode for reference; and AC sense (trip latency in cycles, false trips)."""
from __future__ import annotations

import argparse
import asyncio
from typing import Any

from common import HEAP, demo_cfg, dip_scenario, dist, say

SECTIONS = ("latency",)  # the names `--only` takes for this module
DEFAULT = True  # part of a plain `make bench`


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--events", type=int, default=52, help="dips per latency run (>= 50 for the figures)")


# (transport, baud, meter model or None for the demo site's, poll mode)
RUNS = [("rtu", 2400, "eastron_sdm120", "back_to_back"), ("rtu", 2400, "eastron_sdm630", "back_to_back"),
        ("rtu", 9600, "eastron_sdm120", "back_to_back"), ("rtu", 9600, "eastron_sdm630", "back_to_back"),
        ("rtu", 19200, "eastron_sdm120", "back_to_back"), ("rtu", 19200, "eastron_sdm630", "back_to_back"),
        ("tcp", None, "eastron_sdm630", "back_to_back"),
        ("rtu", 9600, "eastron_sdm630", "period"), ("rtu", 19200, "eastron_sdm630", "period"),
        ("tcp", None, "eastron_sdm630", "period")]


DIP_PERIOD_S = 0.8137
SLOW_LINE_DIP_PERIOD_S = 1.2137
LATENCY_TRIP = {"pickup_hz": 59.7, "delay_ms": 0, "samples": 1, "restore_hz": 59.9,
                "restore_hold_s": 0.15, "min_off_s": 0.25, "stagger_s": 0.04, "jitter_s": 0.0}


def wire_plan(cfg: dict[str, Any]) -> dict[str, Any]:
    """The agent's read plan for this meter section (agent/readplan.py, as the board computes it)."""
    from agent.meter_encode import MeterMap
    from agent.readplan import make

    m = cfg["meter"]
    return make(MeterMap(m["map"]), None if m["transport"] == "tcp" else m["baud"], m.get("slow_ms", 0),
                10 if m.get("parity", "N") == "N" else 11)


def latency_run(n: int, transport: str, baud: int | None, model: str | None = None,
                mode: str = "period") -> dict[str, Any]:
    from gridshed import meters
    from gridshed.sim.site import run_site

    cfg = demo_cfg(**LATENCY_TRIP)
    cfg["meter"] = dict(cfg["meter"], poll_mode=mode, transport=transport)
    if baud:
        cfg["meter"]["baud"] = baud
    if model:
        cfg["meter"]["map"] = meters.load_meter(model)
    plan = wire_plan(cfg)
    # each dip from a restored site: at 2400 baud (a sample every ~105 ms; the restore closes a
    # block only in a decision on a good sample) the staggered restore takes up to ~0.8 s after
    # the dip began, so its dips come 1.2137 s apart (the same 13.7 ms walk through the meter's
    # 50 ms update as 0.8137 s)
    period = DIP_PERIOD_S if plan["hot_us"] < 60000 else SLOW_LINE_DIP_PERIOD_S
    sc = dip_scenario(n, period=period)
    s = asyncio.run(run_site(sc, cfg, heapsize=HEAP, transport=transport, baud=baud, settle_s=0.5))
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    ok = [t for t in uf if t.get("latency_ms") is not None and "poll_s" in t]
    # a dip whose relay was still open from the previous one would match a later opening:
    # anything slower than one dip period is not this dip's trip
    matched = [t for t in ok if t["latency_ms"] < 800]
    total = [t["latency_ms"] for t in matched]
    upd = [(t["meter_update_s"] - t["crossing_s"]) * 1000 for t in matched]
    poll = [(t["poll_s"] - t["meter_update_s"]) * 1000 for t in matched]
    dec = [t["latency_from_poll_ms"] for t in matched]
    from_meter = [t["latency_from_meter_ms"] for t in matched]
    wire_ms = plan["hot_us"] / 1000
    # a trip whose path (one transaction before the meter update, to the relay) had a slow read
    # on the bus: the tail the read plan keeps rare (docs/modbus.md "Slow reads during a frequency event")
    slow = s.get("slow_read_s") or []
    met_slow = sum(1 for t in matched if any(t["meter_update_s"] - wire_ms / 1000 <= r <= t["relay_open_s"]
                                              for r in slow))
    fm = dist(from_meter)
    target = round(2 * wire_ms + 10, 1) if transport == "rtu" and mode == "back_to_back" else None
    return {"transport": transport, "baud": baud, "model": cfg["meter"]["map"]["model"], "poll_mode": mode,
            "dip_period_s": period,
            "hot_read": list(plan["hot"][0]), "slow_reads": [list(r) for r in plan["slow"]],
            "slow_ms": plan["slow_ms"], "wire_ms_per_txn": round(wire_ms, 2),
            "reads_per_s": round(s["polls"] / s["duration_s"], 1) if s.get("duration_s") else None,
            "target_ms": target, "target_met": None if target is None or fm["p99"] is None else fm["p99"] <= target,
            "dips": n, "trips_measured": len(matched),
            "unmatched": len(uf) - len(matched), "polls": s["polls"], "unanswered_polls": s["unanswered_polls"],
            "slow_reads_made": len(slow), "trips_meeting_a_slow_read": met_slow,
            # outside a frequency event (the first dip from a steady state): the share of meter
            # updates whose path to the relay holds a slow read, from the plan (no run can show a
            # 1 % tail in 52 dips): (hot + mean slow transaction) / slow tick
            "steady_state_slow_read_pct": round(100 * (plan["hot_us"] + sum(plan["slow_us"]) / len(plan["slow_us"]))
                                                / (plan["slow_ms"] * 1000), 2) if plan["hot_us"] else None,
            "opens_per_block": s["opens_per_block"], "all_restored": s["all_restored"],
            "total_ms": dist(total), "crossing_to_meter_update_ms": dist(upd),
            "meter_update_to_poll_ms": dist(poll), "poll_to_relay_ms": dist(dec),
            "meter_update_to_relay_ms": dist(from_meter)}


def bench_latency(res: dict[str, Any], quick: bool, events: int) -> None:
    n = 12 if quick else events
    out = []
    for transport, baud, model, mode in RUNS:
        say("latency: %s %s %s %s, %d dips (%.0f s)" % (transport, baud or "", model, mode, n, n * 0.8 + 2))
        try:
            out.append(latency_run(n, transport, baud, model, mode))
        except Exception as e:
            out.append({"transport": transport, "baud": baud, "model": model, "poll_mode": mode,
                        "error": "%s: %s" % (type(e).__name__, e)})
    res["latency"] = {"trip_settings": LATENCY_TRIP, "dip": "60.0 -> 59.5 Hz step for 0.25 s every 0.8137 s, 1.2137 s at 2400 baud (phase walks through the 50 ms meter update)",
                      "meter_update_ms": 50, "poll_ms": 50, "wire": "8N1 (10 bits a character), t3.5 after each frame",
                      "runs": out}
    acs = []
    for cycles in (4, 3):  # the default window, and the shortest the firmware allows
        say("latency: AC sense cycles=%d, %d dips + false-trip run" % (cycles, n))
        try:
            acs.append(acsense_run(n, quick, cycles))
        except Exception as e:
            acs.append({"cycles_setting": cycles, "error": "%s: %s" % (type(e).__name__, e)})
    res["latency"]["ac_sense"] = acs


AC_FALSE_S = 30.0  # the false-trip run: nominal frequency with phase jumps and harmonic chatter


def _ac_cfg(cycles: int) -> dict[str, Any]:
    import re
    import tempfile
    from pathlib import Path

    from common import DEMO_SITE
    from gridshed import siteconfig

    text = DEMO_SITE.read_text()
    for k, v in LATENCY_TRIP.items():
        text, _ = re.subn(r"(?m)^%s = .*$" % k, "%s = %s" % (k, v), text)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "site.toml"
        p.write_text(text + '\n[ac_sense]\nrole = "primary"\ncycles = %d\n' % cycles)
        return siteconfig.load_site(p)


def acsense_run(n: int, quick: bool, cycles: int = 4) -> dict[str, Any]:
    """AC sense as the primary frequency source (the meter frozen at 60 Hz): trip latency in
    cycles from the excursion over n dips, then the false trips of a nominal-frequency run with
    phase jumps (+-10..60 degrees, one every 0.5-1.5 s) and harmonic chatter (an extra crossing in
    3 % of cycles), 20 us timestamp jitter throughout."""
    import random

    from gridshed.sim.acsense import AcOptions
    from gridshed.sim.scenario import Scenario
    from gridshed.sim.site import run_site

    cfg = _ac_cfg(cycles)
    s = asyncio.run(run_site(dip_scenario(n), cfg, heapsize=HEAP, settle_s=0.5, meter_update_ms=3_600_000,
                             ac_opts=AcOptions(jitter_us=20)))
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    cyc = [t["latency_ms"] / 1000 * 60 for t in uf if t.get("latency_ms") is not None and t["latency_ms"] < 800]
    rnd = random.Random(7)
    jumps = []
    t = 1.0
    dur = 8.0 if quick else AC_FALSE_S
    while t < dur - 0.5:
        jumps.append((round(t, 3), rnd.choice((-1, 1)) * rnd.uniform(10, 60)))
        t += rnd.uniform(0.5, 1.5)
    flat = Scenario("bench_ac_false", [0.0, dur], {"hz": [60.0, 60.0]})
    f = asyncio.run(run_site(flat, cfg, heapsize=HEAP, settle_s=0.5, meter_update_ms=3_600_000,
                             ac_opts=AcOptions(jitter_us=20, phase_jumps=jumps, extra_edge_prob=0.03)))
    opens = sum(f["opens_per_block"].values())
    return {"cycles_setting": cycles, "dips": n, "trips_measured": len(cyc), "unmatched": len(uf) - len(cyc),
            "latency_cycles": dist([round(c, 2) for c in cyc]), "goal_p99_cycles": 3,
            "false_run_s": dur, "phase_jumps": len(jumps), "extra_edge_prob": 0.03,
            "false_trips": len([t for t in f["trips"] if t["cause"] == "under-frequency"]),
            "false_relay_opens": opens}


def run(res: dict[str, Any], a: argparse.Namespace) -> None:
    bench_latency(res, a.quick, a.events)


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """This section's rows of the table `make bench` prints (figure, value, vs reference / note)."""
    rows: list[tuple[str, str, str]] = []
    lat = res.get("latency")
    if lat:
        for r in lat["runs"]:
            name = "%s%s %s %s" % (r["transport"].upper(), " %d" % r["baud"] if r.get("baud") else "",
                                   (r.get("model") or "").replace("eastron_", ""), r.get("poll_mode", "period"))
            if "error" in r:
                rows.append(("3 trip latency " + name, "ERROR", r["error"][:60]))
                continue
            t = r["total_ms"]
            rows.append(("3 trip latency " + name, "p50 %s p99 %s max %s ms" % (t["p50"], t["p99"], t["max"]),
                         "n=%d (%d unmatched); %s slow reads, %s met by a trip" % (
                    r["trips_measured"], r["unmatched"], r.get("slow_reads_made"), r.get("trips_meeting_a_slow_read"))))
            rows.append(("3   split p50 (p99)", "cross->meter %s (%s) | meter->poll %s (%s) | poll->relay %s (%s)" % (
                r["crossing_to_meter_update_ms"]["p50"], r["crossing_to_meter_update_ms"]["p99"],
                r["meter_update_to_poll_ms"]["p50"], r["meter_update_to_poll_ms"]["p99"],
                r["poll_to_relay_ms"]["p50"], r["poll_to_relay_ms"]["p99"]), "ms"))
            tgt = r.get("target_ms")
            rows.append(("3   meter update -> relay", "p50 %s p99 %s max %s ms" % (
                r["meter_update_to_relay_ms"]["p50"], r["meter_update_to_relay_ms"]["p99"], r["meter_update_to_relay_ms"]["max"]),
                ("target p99 <= %s ms (2 x %s ms wire + 10): %s" % (tgt, r["wire_ms_per_txn"], "met" if r["target_met"] else "NOT met"))
                if tgt is not None else "budget p99 <= 100 ms @19200; %s reads/s" % r.get("reads_per_s")))
            if r.get("steady_state_slow_read_pct") is not None:
                rows.append(("3   from a steady state", "%s %% of updates meet a slow read" % r["steady_state_slow_read_pct"],
                             "slow tick %s ms (plan)" % r["slow_ms"]))
        for ac in lat.get("ac_sense") or []:
            if "error" in ac:
                rows.append(("3 AC sense trip (cycles)", "ERROR", ac["error"][:60]))
            else:
                c = ac["latency_cycles"]
                rows.append(("3 AC sense trip (cycles)", "p50 %s p99 %s max %s" % (c["p50"], c["p99"], c["max"]),
                             "n=%d, goal p99 <= 3; cycles=%d" % (ac["trips_measured"], ac["cycles_setting"])))
                rows.append(("3 AC sense false trips", "%d (relay opens %d)" % (ac["false_trips"], ac["false_relay_opens"]),
                             "%.0f s, %d phase jumps, %.0f %% extra edges" % (ac["false_run_s"], ac["phase_jumps"],
                                                                          100 * ac["extra_edge_prob"])))
    return rows
