"""3: end-to-end trip latency in the simulated site (RTU 9600, RTU 19200, TCP), many short dips
per run_site call."""
from __future__ import annotations

import argparse
import asyncio
from typing import Any

from common import HEAP, demo_cfg, dip_scenario, dist, say

SECTIONS = ("latency",)  # the names `--only` takes for this module
DEFAULT = True  # part of a plain `make bench`


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--events", type=int, default=52, help="dips per latency run (>= 50 for the figures)")


LATENCY_TRIP = {"pickup_hz": 59.7, "delay_ms": 0, "samples": 1, "restore_hz": 59.9,
                "restore_hold_s": 0.15, "min_off_s": 0.25, "stagger_s": 0.04, "jitter_s": 0.0}


def latency_run(n: int, transport: str, baud: int | None) -> dict[str, Any]:
    from gridshed.sim.site import run_site

    cfg = demo_cfg(**LATENCY_TRIP)
    sc = dip_scenario(n)
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
    return {"transport": transport, "baud": baud, "dips": n, "trips_measured": len(matched),
            "unmatched": len(uf) - len(matched), "polls": s["polls"], "unanswered_polls": s["unanswered_polls"],
            "opens_per_block": s["opens_per_block"], "all_restored": s["all_restored"],
            "total_ms": dist(total), "crossing_to_meter_update_ms": dist(upd),
            "meter_update_to_poll_ms": dist(poll), "poll_to_relay_ms": dist(dec),
            "meter_update_to_relay_ms": dist(from_meter)}


def bench_latency(res: dict[str, Any], quick: bool, events: int) -> None:
    n = 12 if quick else events
    out = []
    for transport, baud in (("rtu", 9600), ("rtu", 19200), ("tcp", None)):
        say("latency: %s %s, %d dips (%.0f s)" % (transport, baud or "", n, n * 0.8 + 2))
        try:
            out.append(latency_run(n, transport, baud))
        except Exception as e:
            out.append({"transport": transport, "baud": baud, "error": "%s: %s" % (type(e).__name__, e)})
    res["latency"] = {"trip_settings": LATENCY_TRIP, "dip": "60.0 -> 59.5 Hz step for 0.25 s every 0.8137 s (phase walks through the 50 ms meter update)",
                      "meter_update_ms": 50, "poll_ms": 50, "runs": out}


def run(res: dict[str, Any], a: argparse.Namespace) -> None:
    bench_latency(res, a.quick, a.events)


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """This section's rows of the table `make bench` prints (figure, value, vs reference / note)."""
    rows: list[tuple[str, str, str]] = []
    lat = res.get("latency")
    if lat:
        for r in lat["runs"]:
            name = "%s%s" % (r["transport"].upper(), " %d" % r["baud"] if r.get("baud") else "")
            if "error" in r:
                rows.append(("3 trip latency " + name, "ERROR", r["error"][:60]))
                continue
            t = r["total_ms"]
            rows.append(("3 trip latency " + name, "p50 %s p99 %s max %s ms" % (t["p50"], t["p99"], t["max"]),
                         "n=%d (%d unmatched)" % (r["trips_measured"], r["unmatched"])))
            rows.append(("3   split p50 (p99)", "cross->meter %s (%s) | meter->poll %s (%s) | poll->relay %s (%s)" % (
                r["crossing_to_meter_update_ms"]["p50"], r["crossing_to_meter_update_ms"]["p99"],
                r["meter_update_to_poll_ms"]["p50"], r["meter_update_to_poll_ms"]["p99"],
                r["poll_to_relay_ms"]["p50"], r["poll_to_relay_ms"]["p99"]), "ms"))
            rows.append(("3   meter update -> relay", "p50 %s p99 %s max %s ms" % (
                r["meter_update_to_relay_ms"]["p50"], r["meter_update_to_relay_ms"]["p99"], r["meter_update_to_relay_ms"]["max"]),
                "budget p99 <= 100 ms @19200"))
    return rows
