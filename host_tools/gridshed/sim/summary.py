"""What a utility would measure from a simulated run: response time, kW shed, restore behaviour.

The summary also says, for every trip condition the scenario plays, what was expected of the
agent and whether it happened (docs/quickstart.md, "Reading the summary"):

* ``trips``: conditions that should have opened a relay: an under-frequency excursion long
  enough for the site's delay / samples, meter silence or an invalid frequency (0 Hz, NaN)
  longer than ``meter_loss_after_s`` with the ``shed`` fail-safe, a utility signal on a site
  with a dry contact. ``relay_open_s`` is None when nothing opened: a miss.
* ``already_shed``: the same conditions while every block they would open was already open.
* ``not_expected``: conditions the agent rightly ignores (too short for the delay, a ``hold``
  fail-safe, a signal the site has no input for), each with the reason.
* ``failures``: one line per expectation that failed (a miss, or a relay that opened with no
  trip condition at all); ``gridshed sim`` exits 1 when there is any.

Times are scenario seconds. The board sees the scenario's first sample while it settles before
the scenario clock starts, so a trip on the first sample happens at a negative time; it is
reported as such (``at_start``), never dropped.
"""
from __future__ import annotations

import math
from typing import Any

STEP_S = 0.01          # the scenario is examined at this step
AFTER_S = 1.0          # an opening this long after a condition ends still belongs to it


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} s"


def _kinds(sc: Any, cfg: dict[str, Any]) -> list[tuple[float, str, float]]:
    """[(t, kind, hz)] every STEP_S: kind 'ok', 'silent' (meter not answering), 'invalid' (0 Hz,
    NaN or outside the agent's plausible band: agent/control.py, docs/control.md "Plausibility")."""
    from agent.control_setup import BAND

    nom = cfg.get("nominal_hz", 60)
    lo, hi = nom * (1 - BAND), nom * (1 + BAND)
    trip = cfg.get("trip") or {}
    picks = [trip.get("pickup_hz")] + [st.get("pickup_hz") for st in trip.get("stages") or ()
                                       if isinstance(st, dict)]
    picks = [p for p in picks if isinstance(p, (int, float))]
    if picks and min(picks) - 1.0 < lo:
        lo = min(picks) - 1.0  # the band reaches 1 Hz under the lowest pickup, as the agent's does
    out = []
    n = int(round(sc.duration / STEP_S))
    for k in range(n + 1):
        t = round(k * STEP_S, 6)
        hz = sc.value("hz", t)
        if sc.value("meter_ok", t, 1.0) < 0.5:
            kind = "silent"
        elif hz != hz or not (lo < hz < hi):
            kind = "invalid"
        else:
            kind = "ok"
        out.append((t, kind, hz))
    return out


def _crossing(sc: Any, t_prev: float, t: float, pickup: float) -> float:
    """Exact time in (t_prev, t] where the scenario's frequency went below pickup."""
    a, b = t_prev, t
    for _ in range(30):
        m = (a + b) / 2
        v = sc.value("hz", m)
        if v == v and v < pickup:
            b = m
        else:
            a = m
    return b


def _runs(samples: list[tuple[float, str, float]], inside, keep_going) -> list[tuple[int, int]]:
    """(first, last+1) sample index ranges: a run starts where inside() and lasts while keep_going()."""
    runs = []
    i, n = 0, len(samples)
    while i < n:
        if inside(samples[i]):
            j = i + 1
            while j < n and keep_going(samples[j]):
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def summarize(run: Any, load: Any) -> dict[str, Any]:
    cfg, sc, t0 = run.cfg, run.scenario, run.t0
    trip_cfg = cfg["trip"]
    pickup = trip_cfg["pickup_hz"]
    deadband = trip_cfg.get("deadband_hz", 0.0)
    poll_s = cfg["meter"].get("poll_ms", 50) / 1000.0
    names = [b["name"] for b in cfg["blocks"]]
    nb = len(names)

    def t_of(e: Any) -> float:
        at = getattr(e, "at", None)
        return e.t if at is None or not t0 else at - t0

    all_evs = sorted(((t_of(e), e) for e in run.block_events), key=lambda x: x[0])
    # the scenario's events, plus openings before it started (a trip on the first sample)
    evs = [(t, e) for t, e in all_evs if e.t >= 0 or not e.closed]
    all_polls = list(run.meter.polls)
    polls = [p for p in all_polls if p.t >= t0]
    transitions = [{"t_s": round(t, 4), "block": names[e.block], "state": "closed" if e.closed else "open"}
                   for t, e in evs]
    opens = [(t, e) for t, e in evs if not e.closed]
    closes = [(t, e) for t, e in evs if e.closed and e.t >= 0]

    def open_at(t: float) -> set[int]:
        """Blocks open just before scenario time t (every pin change replayed, boot included)."""
        closed = [False] * nb
        for te, e in all_evs:
            if te >= t:
                break
            closed[e.block] = e.closed
        return {i for i in range(nb) if not closed[i]}

    def first_open(lo: float, hi: float) -> tuple[float, Any] | None:
        return next(((t, e) for t, e in opens if lo <= t <= hi), None)

    stages = trip_cfg.get("stages")
    uf_set = set(range(nb))
    if isinstance(stages, list) and stages:
        uf_set = {b for st in stages if isinstance(st, dict) for b in st.get("blocks") or ()}
    used: list[tuple[float, float]] = []   # windows in which an opening has a cause
    trips: list[dict[str, Any]] = []
    already: list[dict[str, Any]] = []
    not_expected: list[dict[str, Any]] = []
    failures: list[str] = []
    samples = _kinds(sc, cfg)

    # ---- under-frequency: runs of valid samples below pickup, until above pickup + deadband
    need_s = max(trip_cfg.get("delay_ms", 0) / 1000.0, (trip_cfg.get("samples", 1) - 1) * poll_s)
    slack_s = 2 * poll_s + 0.1
    uf_runs = _runs(samples, lambda s: s[1] == "ok" and s[2] < pickup,
                    lambda s: s[1] == "ok" and s[2] <= pickup + deadband)
    for i, j in uf_runs:
        t_first = samples[i][0]
        at_start = i == 0
        cross = 0.0 if at_start else _crossing(sc, samples[i - 1][0], t_first, pickup)
        end = samples[j][0] if j < len(samples) else sc.duration
        below_s = sum(STEP_S for s in samples[i:j] if s[2] < pickup)
        hi = end + AFTER_S
        used.append((-math.inf if at_start else cross, hi))
        found = first_open(-math.inf if at_start else cross - 1e-6, hi)
        item: dict[str, Any] = {"cause": "under-frequency", "crossing_s": round(cross, 4)}
        if at_start:
            item["at_start"] = True
        if found is not None:
            t_open = found[0]
            low = next((p for p in (all_polls if at_start else polls) if p.hz is not None and p.hz == p.hz
                        and p.hz < pickup and (at_start or p.t - t0 >= cross)), None)
            if low is not None:
                item["meter_update_s"] = round(low.refreshed_at - t0, 4)
                item["poll_s"] = round(low.t - t0, 4)
            item["relay_open_s"] = round(t_open, 4)
            item["latency_ms"] = None if at_start else round((t_open - cross) * 1000, 1)
            if low is not None:
                item["latency_from_meter_ms"] = round((t_open - (low.refreshed_at - t0)) * 1000, 1)
                item["latency_from_poll_ms"] = round((t_open - (low.t - t0)) * 1000, 1)
            trips.append(item)
            continue
        shed = open_at(cross)
        if uf_set and uf_set <= shed:
            already.append({"cause": "under-frequency", "at_s": round(cross, 4),
                            "open": [names[b] for b in sorted(shed)]})
        elif below_s < need_s + slack_s:
            not_expected.append({"cause": "under-frequency", "at_s": round(cross, 4),
                                 "why": f"below pickup for {below_s:.2f} s; a trip needs {need_s:.2f} s "
                                        f"(delay_ms / samples) plus a poll"})
        else:
            item["relay_open_s"] = None
            item["latency_ms"] = None
            trips.append(item)
            failures.append(f"under-frequency from {cross:.3f} s (below {pickup} Hz for {below_s:.2f} s): "
                            f"no relay opened")

    # ---- meter silent or answering no valid frequency (0 Hz, NaN): the fail-safe policy
    fs = cfg.get("failsafe") or {}
    policy, after = fs.get("meter_loss", "hold"), float(fs.get("meter_loss_after_s", 5.0))
    bad_runs = _runs(samples, lambda s: s[1] != "ok", lambda s: s[1] != "ok")
    for i, j in bad_runs:
        t_from = samples[i][0]
        end = samples[j][0] if j < len(samples) else sc.duration
        first = samples[i]
        if first[1] == "silent":
            cause, detail = "meter silent", "meter silent"
        else:
            cause = "meter invalid"
            hz = first[2]
            detail = ("meter answers NaN" if hz != hz else "meter reports 0 Hz" if hz == 0
                      else f"meter reports {hz:g} Hz (implausible)")
        item = {"cause": cause, "detail": detail, "silent_from_s": round(t_from, 4),
                "until_s": round(end, 4)}
        dur = end - t_from
        if policy != "shed":
            not_expected.append({"cause": cause, "at_s": round(t_from, 4),
                                 "why": f"{detail} for {dur:.2f} s; failsafe.meter_loss = \"{policy}\" keeps the "
                                        f"relays as they are"})
            continue
        if dur < after + slack_s:
            # the agent may or may not act on a run about as long as the timer: no expectation
            used.append((t_from + after - slack_s, end + AFTER_S))
            not_expected.append({"cause": cause, "at_s": round(t_from, 4),
                                 "why": f"{detail} for {dur:.2f} s; the fail-safe acts after "
                                        f"meter_loss_after_s = {after:g} s"})
            continue
        used.append((t_from, end + AFTER_S))
        found = first_open(t_from, end + AFTER_S)
        if found is not None:
            item["relay_open_s"] = round(found[0], 4)
            item["after_s"] = round(found[0] - t_from, 3)
            trips.append(item)
            continue
        shed = open_at(t_from + after)
        if len(shed) == nb:
            already.append({"cause": cause, "at_s": round(t_from, 4), "open": [names[b] for b in sorted(shed)]})
        else:
            item["relay_open_s"] = None
            item["after_s"] = None
            trips.append(item)
            failures.append(f"{detail} from {t_from:.3f} s for {dur:.2f} s (fail-safe shed after {after:g} s): "
                            f"no relay opened")

    # ---- utility signal on the dry contact
    if sc.has("signal"):
        sig = cfg.get("signals") or {}
        wired = bool(sig.get("dry_contact")) and sig.get("dry_contact_pin") is not None
        on_runs = _runs([(t, "on" if sc.value("signal", t) >= 0.5 else "off", 0.0) for t, _, _ in samples],
                        lambda s: s[1] == "on", lambda s: s[1] == "on")
        for i, j in on_runs:
            t_a = samples[i][0]
            # exact assertion time: the scenario row where the step happens
            t_a = next((t for k, t in enumerate(sc.t) if t <= t_a + 1e-9 and sc.cols["signal"][k] >= 0.5
                        and (k == 0 or sc.cols["signal"][k - 1] < 0.5 or sc.t[k - 1] < t)), t_a)
            end = samples[j][0] if j < len(samples) else sc.duration
            if not wired:
                not_expected.append({"cause": "utility signal", "at_s": round(t_a, 4),
                                     "why": "the site has no dry contact ([signals] dry_contact = true): "
                                            "the signal was not played"})
                continue
            used.append((t_a, end + AFTER_S))
            found = first_open(t_a, end + AFTER_S)
            item = {"cause": "utility signal", "asserted_s": t_a}
            if found is not None:
                item["relay_open_s"] = round(found[0], 4)
                item["latency_ms"] = round((found[0] - t_a) * 1000, 1)
                trips.append(item)
                continue
            shed = open_at(t_a)
            debounce = (sig.get("debounce_ms") or 0) / 1000.0
            if len(shed) == nb:
                already.append({"cause": "utility signal", "at_s": round(t_a, 4),
                                "open": [names[b] for b in sorted(shed)]})
            elif end - t_a < debounce + slack_s:
                not_expected.append({"cause": "utility signal", "at_s": round(t_a, 4),
                                     "why": f"asserted for {end - t_a:.2f} s, shorter than the debounce"})
            else:
                item["relay_open_s"] = None
                item["latency_ms"] = None
                trips.append(item)
                failures.append(f"utility signal asserted at {t_a:.3f} s: no relay opened")

    # ---- the market (docs/market.md): an opening while the price is above the block's strike
    # (decided once a second on whole seconds: the price of the last ECON_S counts) is economic
    market = _market(cfg, sc, opens, all_evs, used, names, uf_set, failures)
    econ = {id(e) for _, e in (market or {}).get("_opens", ())}
    # ---- an opening with no trip condition at all: a relay moved on good data
    unexplained = [(t, e) for t, e in opens if 0 <= t <= sc.duration and not any(a <= t <= b for a, b in used)
                   and id(e) not in econ]
    for t, e in unexplained[:3]:
        failures.append(f"relay {names[e.block]} opened at {t:.3f} s with no trip condition in the scenario")

    # kW shed, from the meter's own answers: last reading before the first opening vs the
    # lowest reading in the 2 s after it.
    kw_shed = None
    kw_before = kw_after = None
    if opens:
        ft = opens[0][0]
        before = [p for p in all_polls if p.kw is not None and p.kw == p.kw and p.t - t0 < ft]
        after_p = [p for p in all_polls if p.kw is not None and p.kw == p.kw and ft < p.t - t0 < ft + 2.0]
        if before and after_p:
            kw_before = before[-1].kw
            kw_after = min(p.kw for p in after_p)
            kw_shed = round(kw_before - kw_after, 1)
    restores = [{"t_s": round(t, 3), "block": names[e.block]} for t, e in closes]
    gaps = [round(b["t_s"] - a["t_s"], 3) for a, b in zip(restores, restores[1:])]
    opens_per_block = {n: sum(1 for _, e in opens if names[e.block] == n) for n in names}
    final = [names[i] for i, c in enumerate(load.closed) if c]
    errs = sum(1 for p in polls if p.hz is None)
    # the meter's answers as a trace for plots (gridshed.report): [scenario s, Hz, kW], None =
    # unanswered (or NaN), decimated to at most 2000 points
    step = max(1, -(-len(polls) // 2000))
    trace = [[round(p.t - t0, 4), None if p.hz is None or p.hz != p.hz else round(p.hz, 4),
              None if p.kw is None else round(p.kw, 2)] for p in polls[::step]]
    # which requests were not the frequency read (the agent's slow reads: kW and the rest): the
    # most frequent start register is the hot read's; the others' times, at most 5000
    addrs: dict[int, int] = {}
    for p in polls:
        if p.addr is not None:
            addrs[p.addr] = addrs.get(p.addr, 0) + 1
    hot = max(addrs, key=lambda a: addrs[a]) if addrs else None
    slow_reads = [round(p.t - t0, 4) for p in polls if p.addr is not None and p.addr != hot][:5000]
    return {
        "scenario": sc.name,
        "duration_s": sc.duration,
        "pickup_hz": pickup,
        "restore_hz": trip_cfg["restore_hz"],
        "transport": cfg["meter"]["transport"],
        "baud": cfg["meter"]["baud"] if cfg["meter"]["transport"] == "rtu" else None,
        "polls": len(polls),
        "unanswered_polls": errs,
        "slow_read_s": slow_reads,
        "trips": trips,
        "already_shed": already,
        "not_expected": not_expected,
        "failures": failures,
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
        **({"market": {k: v for k, v in market.items() if not k.startswith("_")}} if market else {}),
    }


ECON_S = 2.5


def _market(cfg: dict[str, Any], sc: Any, opens: list, all_evs: list, used: list, names: list[str],
            uf_set: set[int], failures: list[str]) -> dict[str, Any] | None:
    mk = cfg.get("market")
    if not sc.has("price") or not isinstance(mk, dict):
        return None
    blocks = cfg["blocks"]
    strikes = [None if b.get("class") == "firm" else b.get("strike_usd_mwh") for b in blocks]
    kw = [b.get("miners", 0) * b.get("kw_per_miner", 0) for b in blocks]

    def priced_out(i: int, t: float) -> bool:
        s = strikes[i]
        return s is not None and any(sc.value("price", max(0.0, t - k * 0.25)) > s for k in range(int(ECON_S * 4) + 1))

    econ = [(t, e) for t, e in opens if 0 <= t <= sc.duration and priced_out(e.block, t)
            and not any(a <= t <= b for a, b in used)]
    # the obligation: sheddable load on (blocks a frequency stage sheds) after every relay change
    # outside a frequency event, against the commitment (in force the whole run when its hours
    # hold the current UTC hour)
    import time as _t

    hour = _t.gmtime().tm_hour
    hours = set()
    for a, b in mk.get("obligation_hours") or ():
        k = a
        while True:
            hours.add(k % 24)
            k += 1
            if k % 24 == b % 24:
                break
    oblig = float(mk.get("obligation_mw") or 0) * 1000 if hour in hours else 0.0
    closed = [True] * len(names)
    low = None
    for t, e in all_evs:
        closed[e.block] = e.closed
        if t < 0 or any(a <= t <= b for a, b in used):
            continue
        av = sum(kw[i] for i in uf_set if closed[i])
        low = av if low is None else min(low, av)
    held = oblig == 0 or low is None or low >= oblig - 1e-6
    if not held:
        failures.append(f"the {mk.get('program', 'RRS')} obligation was broken outside a frequency event: "
                        f"{low:.1f} kW sheddable on, {oblig:.1f} kW committed")
    return {"_opens": econ, "economic_opens": [{"t_s": round(t, 3), "block": names[e.block]} for t, e in econ],
            "obligation_kw": oblig, "min_available_kw": low, "obligation_held": held,
            "program": mk.get("program", "RRS")}


def render_text(s: dict[str, Any]) -> str:
    lines = [f"== summary: {s['scenario']} ({s['transport']}"
             f"{' @ %d baud' % s['baud'] if s['baud'] else ''}, {s['polls']} polls, "
             f"{s['unanswered_polls']} unanswered) =="]
    if not s["trips"] and not s.get("already_shed") and not s.get("not_expected"):
        lines.append("no trip condition in this scenario")
    for t in s["trips"]:
        if t["cause"] == "under-frequency":
            if t.get("relay_open_s") is None:
                lines.append(f"under-frequency at {t['crossing_s']:.3f} s: NO RELAY OPENED (miss)")
                continue
            if t.get("at_start"):
                parts = ["below pickup from the first sample (the board saw it before the scenario clock started)"]
            else:
                parts = [f"crossing {t['crossing_s']:.3f} s"]
            if "meter_update_s" in t:
                parts.append(f"meter showed it {t['meter_update_s']:.3f} s")
                parts.append(f"polled {t['poll_s']:.3f} s")
            parts.append(f"relay open {t['relay_open_s']:.3f} s")
            lines.append("trip (under-frequency): " + " -> ".join(parts))
            figs = []
            if t.get("latency_ms") is not None:
                figs.append(f"{t['latency_ms']:.0f} ms from the crossing")
            if "latency_from_meter_ms" in t:
                figs.append(f"{t['latency_from_meter_ms']:.0f} ms from the meter update")
                figs.append(f"{t['latency_from_poll_ms']:.0f} ms from the poll")
            if figs:
                lines.append("  response " + ", ".join(figs))
        elif t["cause"] == "utility signal":
            if t.get("relay_open_s") is None:
                lines.append(f"utility signal asserted {t['asserted_s']:.3f} s: NO RELAY OPENED (miss)")
            else:
                lines.append(f"trip (utility signal) asserted {t['asserted_s']:.3f} s -> relay open "
                             f"{t['relay_open_s']:.3f} s ({t['latency_ms']:.0f} ms)")
        else:
            what = t.get("detail") or t["cause"]
            if t.get("relay_open_s") is None:
                lines.append(f"{what} from {t['silent_from_s']:.3f} s: NO RELAY OPENED (miss)")
            else:
                lines.append(f"{what} from {t['silent_from_s']:.3f} s -> relay open {t['relay_open_s']:.3f} s "
                             f"(after {t['after_s']:.3f} s, fail-safe shed)")
    groups: list[list[dict[str, Any]]] = []
    for a in s.get("already_shed") or []:
        if groups and groups[-1][0]["cause"] == a["cause"] and groups[-1][0]["open"] == a["open"]:
            groups[-1].append(a)
        else:
            groups.append([a])
    for g in groups:
        a = g[0]
        when = f"at {a['at_s']:.3f} s" if len(g) == 1 else f"{len(g)} times from {a['at_s']:.3f} s to {g[-1]['at_s']:.3f} s"
        lines.append(f"{a['cause']} {when}: already shed, no relay left to open (open: {', '.join(a['open'])})")
    for n in s.get("not_expected") or []:
        lines.append(f"{n['cause']} at {n['at_s']:.3f} s: no trip expected ({n['why']})")
    if s["kw_shed"] is not None:
        lines.append(f"kW shed (meter): {s['kw_before']:.1f} -> {s['kw_after']:.1f} kW = {s['kw_shed']:.1f} kW")
    if s["restores"]:
        lines.append("restores: " + ", ".join(f"{r['block']} {r['t_s']:.2f} s" for r in s["restores"])
                     + (f" (gaps {', '.join(str(g) for g in s['restore_gaps_s'])} s)" if s["restore_gaps_s"] else ""))
    m = s.get("market")
    if m:
        lines.append("economic curtailment: " + (", ".join(f"{o['block']} {o['t_s']:.2f} s" for o in m["economic_opens"])
                                                 or "none"))
        bm = (s.get("board_status") or {}).get("market") or {}
        if m["obligation_kw"]:
            low = m["min_available_kw"]
            lines.append(f"{m['program']} obligation {m['obligation_kw']:.0f} kW: "
                         + ("held" if m["obligation_held"] else "BROKEN")
                         + (f", at least {low:.0f} kW sheddable on outside frequency events" if low is not None else "")
                         + (f"; the board refused {bm.get('refused')} economic curtailment(s)" if bm.get("refused") else ""))
    lines.append("opens per block: " + ", ".join(f"{k} {v}" for k, v in s["opens_per_block"].items()))
    lines.append("at end: " + ("all blocks closed (load restored)" if s["all_restored"]
                               else "closed: " + (", ".join(s["closed_at_end"]) or "none")))
    h = s.get("health")
    sick: list[str] = []
    if h:
        from .site import health_problems  # (site imports this module)

        sick = health_problems(h)
        lines.append("board: %d restart(s), %d MemoryError(s), %d traceback(s)%s, @status %s" % (
            h["restarts"], h["memory_errors"], h["tracebacks"],
            " (last: %s)" % h["last_exception"] if h.get("last_exception") else "",
            "answered" if h["status_answered"] else "NOT answered (%s)" % h["status_error"]))
    fails = s.get("failures") or []
    # the relays alone can look right while the board crashed and came back: never "all met" then
    lines.append("result: " + ("every expectation met" if not fails else f"{len(fails)} expectation(s) FAILED")
                 + ("; but the board was NOT healthy (see board:)" if sick else ""))
    for f in fails:
        lines.append(f"  FAILED: {f}")
    return "\n".join(lines)


def failure_line(s: dict[str, Any]) -> str | None:
    """The one line `gridshed sim` prints on stderr when it exits 1 (None: nothing failed)."""
    fails = s.get("failures") or []
    if not fails:
        return None
    more = f" (and {len(fails) - 1} more, see the summary)" if len(fails) > 1 else ""
    return f"expectation failed: {fails[0]}{more}"
