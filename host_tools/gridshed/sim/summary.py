"""What a utility would measure from a simulated run: response time, kW shed, restore behaviour."""
from __future__ import annotations

from typing import Any


def summarize(run: Any, load: Any) -> dict[str, Any]:
    cfg, sc, t0 = run.cfg, run.scenario, run.t0
    pickup = cfg["trip"]["pickup_hz"]
    names = [b["name"] for b in cfg["blocks"]]
    evs = [e for e in run.block_events if e.t >= 0]
    polls = [p for p in run.meter.polls if p.t >= t0]
    transitions = [{"t_s": round(e.t, 4), "block": names[e.block], "state": "closed" if e.closed else "open"}
                   for e in evs]
    opens = [e for e in evs if not e.closed]
    closes = [e for e in evs if e.closed]

    trips: list[dict[str, Any]] = []
    for cross in sc.crossings_below(pickup):
        first_open = next((e for e in opens if e.t >= cross), None)
        low = next((p for p in polls if p.hz is not None and p.hz < pickup and p.t - t0 >= cross), None)
        item: dict[str, Any] = {"cause": "under-frequency", "crossing_s": round(cross, 4)}
        if low is not None:
            item["meter_update_s"] = round(low.refreshed_at - t0, 4)
            item["poll_s"] = round(low.t - t0, 4)
        if first_open is not None:
            item["relay_open_s"] = round(first_open.t, 4)
            item["latency_ms"] = round((first_open.t - cross) * 1000, 1)
            if low is not None:
                item["latency_from_meter_ms"] = round((first_open.t - (low.refreshed_at - t0)) * 1000, 1)
                item["latency_from_poll_ms"] = round((first_open.t - (low.t - t0)) * 1000, 1)
        else:
            item["relay_open_s"] = None
        trips.append(item)

    if sc.has("signal"):
        prev = 0.0
        for i, t in enumerate(sc.t):
            v = sc.cols["signal"][i]
            if v >= 0.5 > prev:
                first_open = next((e for e in opens if e.t >= t), None)
                trips.append({"cause": "utility signal", "asserted_s": t,
                              "relay_open_s": round(first_open.t, 4) if first_open else None,
                              "latency_ms": round((first_open.t - t) * 1000, 1) if first_open else None})
            prev = v
    if sc.has("meter_ok"):
        prev = 1.0
        for i, t in enumerate(sc.t):
            v = sc.cols["meter_ok"][i]
            if v < 0.5 <= prev:
                first_open = next((e for e in opens if e.t >= t), None)
                trips.append({"cause": "meter silent", "silent_from_s": t,
                              "relay_open_s": round(first_open.t, 4) if first_open else None,
                              "after_s": round(first_open.t - t, 3) if first_open else None})
            prev = v

    # kW shed, from the meter's own answers: last reading before the first opening vs the
    # lowest reading in the 2 s after it.
    kw_shed = None
    kw_before = kw_after = None
    if opens:
        ft = opens[0].t
        before = [p for p in polls if p.kw is not None and p.t - t0 < ft]
        after = [p for p in polls if p.kw is not None and ft < p.t - t0 < ft + 2.0]
        if before and after:
            kw_before = before[-1].kw
            kw_after = min(p.kw for p in after)
            kw_shed = round(kw_before - kw_after, 1)
    restores = [{"t_s": round(e.t, 3), "block": names[e.block]} for e in closes]
    gaps = [round(b["t_s"] - a["t_s"], 3) for a, b in zip(restores, restores[1:])]
    opens_per_block = {n: sum(1 for e in opens if names[e.block] == n) for n in names}
    final = [names[i] for i, c in enumerate(load.closed) if c]
    errs = sum(1 for p in polls if p.hz is None)
    # the meter's answers as a trace for plots (gridshed.report): [scenario s, Hz, kW], None =
    # unanswered, decimated to at most 2000 points
    step = max(1, -(-len(polls) // 2000))
    trace = [[round(p.t - t0, 4), None if p.hz is None else round(p.hz, 4),
              None if p.kw is None else round(p.kw, 2)] for p in polls[::step]]
    return {
        "scenario": sc.name,
        "duration_s": sc.duration,
        "pickup_hz": pickup,
        "restore_hz": cfg["trip"]["restore_hz"],
        "transport": cfg["meter"]["transport"],
        "baud": cfg["meter"]["baud"] if cfg["meter"]["transport"] == "rtu" else None,
        "polls": len(polls),
        "unanswered_polls": errs,
        "trips": trips,
        "kw_before": kw_before,
        "kw_after": kw_after,
        "kw_shed": kw_shed,
        "restores": restores,
        "restore_gaps_s": gaps,
        "opens_per_block": opens_per_block,
        "transitions": transitions,
        "closed_at_end": final,
        "all_restored": len(final) == len(names),
        "trace": trace,
    }


def render_text(s: dict[str, Any]) -> str:
    lines = [f"== summary: {s['scenario']} ({s['transport']}"
             f"{' @ %d baud' % s['baud'] if s['baud'] else ''}, {s['polls']} polls, "
             f"{s['unanswered_polls']} unanswered) =="]
    if not s["trips"]:
        lines.append("no trip condition in this scenario")
    for t in s["trips"]:
        if t["cause"] == "under-frequency":
            if t.get("relay_open_s") is None:
                lines.append(f"under-frequency at {t['crossing_s']:.3f} s: NO RELAY OPENED")
                continue
            parts = [f"crossing {t['crossing_s']:.3f} s"]
            if "meter_update_s" in t:
                parts.append(f"meter showed it {t['meter_update_s']:.3f} s")
                parts.append(f"polled {t['poll_s']:.3f} s")
            parts.append(f"relay open {t['relay_open_s']:.3f} s")
            lines.append("trip (under-frequency): " + " -> ".join(parts))
            lat = f"  response {t['latency_ms']:.0f} ms from the crossing"
            if "latency_from_meter_ms" in t:
                lat += (f", {t['latency_from_meter_ms']:.0f} ms from the meter update, "
                        f"{t['latency_from_poll_ms']:.0f} ms from the poll")
            lines.append(lat)
        elif t["cause"] == "utility signal":
            lines.append(f"trip (utility signal) asserted {t['asserted_s']:.3f} s -> relay open "
                         f"{t['relay_open_s']} s ({t['latency_ms']} ms)")
        else:
            lines.append(f"meter silent from {t['silent_from_s']:.3f} s -> relay open {t['relay_open_s']} s "
                         f"(after {t['after_s']} s)")
    if s["kw_shed"] is not None:
        lines.append(f"kW shed (meter): {s['kw_before']:.1f} -> {s['kw_after']:.1f} kW = {s['kw_shed']:.1f} kW")
    if s["restores"]:
        lines.append("restores: " + ", ".join(f"{r['block']} {r['t_s']:.2f} s" for r in s["restores"])
                     + (f" (gaps {', '.join(str(g) for g in s['restore_gaps_s'])} s)" if s["restore_gaps_s"] else ""))
    lines.append("opens per block: " + ", ".join(f"{k} {v}" for k, v in s["opens_per_block"].items()))
    lines.append("at end: " + ("all blocks closed (load restored)" if s["all_restored"]
                               else "closed: " + (", ".join(s["closed_at_end"]) or "none")))
    h = s.get("health")
    if h:
        lines.append("board: %d restart(s), %d MemoryError(s), %d traceback(s), @status %s" % (
            h["restarts"], h["memory_errors"], h["tracebacks"],
            "answered" if h["status_answered"] else "NOT answered (%s)" % h["status_error"]))
    return "\n".join(lines)
