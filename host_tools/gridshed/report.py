"""Event reports for utilities: one figure (frequency, site kW, relay blocks) and an HTML page.

Inputs, normalized into :class:`Evidence`:

* pulled journal records (:class:`gridshed.events.EventSet`: ``gridshed events`` JSON/CSV or a
  board directory): the plotted trace comes from ``capture`` records (the disturbance recorder's
  samples) and from the Hz/kW/mask that every control record carries; times are seconds from the
  trip on the board's uptime clock, the table also shows wall-clock UTC;
* a simulated run's summary (``gridshed sim --report``): the meter's answered polls
  (``summary["trace"]``), the relay transitions seen on the GPIO, the measured trips; times are
  scenario seconds.

Annotations (docs/journal.md, "Pulling the journal and reading the report"): pickup and restore
thresholds, per trip the trigger (first sample below pickup, utility signal, command, meter loss)
and the relay opening with the response time between them, kW before / after and shed, the
staggered restore of each block.
"""
from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .events import EventSet, capture_samples, format_time, read_file

TRIP_EVENTS = {"trip_uf": "underfrequency", "trip_signal": "signal", "trip_meter_loss": "meter_loss",
               "trip_command": "command"}
CAUSE_TEXT = {"underfrequency": "under-frequency", "signal": "utility signal", "meter_loss": "meter loss (fail-safe)",
              "command": "signed command", "under-frequency": "under-frequency", "utility signal": "utility signal",
              "meter silent": "meter loss (fail-safe)", "meter invalid": "no valid meter frequency (fail-safe)"}
KW_AFTER_WINDOW_S = 3.0  # kW after a trip: lowest reading within this many seconds (meter lag)


@dataclass
class Trip:
    t_open: float
    cause: str
    t_trigger: float | None = None
    trigger_label: str = ""
    response_ms: float | None = None
    kw_before: float | None = None
    kw_after: float | None = None
    when: str = ""                      # wall clock of the opening (journal), "" when unknown
    extra: list[str] = field(default_factory=list)   # further measured lines (simulator)

    @property
    def kw_shed(self) -> float | None:
        if self.kw_before is None or self.kw_after is None:
            return None
        return self.kw_before - self.kw_after


@dataclass
class Restore:
    t: float
    block: str
    hz: float | None = None
    kw: float | None = None
    when: str = ""


@dataclass
class Evidence:
    title: str
    source: str
    site: str | None
    device: str | None
    blocks: list[str]
    pickup_hz: float | None
    restore_hz: float | None
    axis_label: str
    trace: list[tuple[float, float | None, float | None]] = field(default_factory=list)
    masks: list[tuple[float, int]] = field(default_factory=list)
    trips: list[Trip] = field(default_factory=list)
    restores: list[Restore] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)   # the event table
    notes: list[str] = field(default_factory=list)
    final_mask: int | None = None
    dense: bool = True      # trace = meter samples (True) or only the readings logged with events
    logged: list[tuple[float, float | None, float | None]] = field(default_factory=list)  # event readings
    incomplete: list[str] = field(default_factory=list)  # why these records are not the whole story


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return None
    return float(v)


def _closed_names(mask: int | None, blocks: list[str]) -> str:
    if mask is None:
        return ""
    names = [b for i, b in enumerate(blocks) if mask >> i & 1]
    return ", ".join(names) if names else "none"


# ---------------------------------------------------------------------------------------------
# From journal records


def _event_of(rec: dict[str, Any]) -> str:
    """ctl records carry the event in "ev"; the host treats ctl/ev=X like kind X."""
    return str(rec.get("ev")) if rec.get("k") == "ctl" else str(rec.get("k"))


def _is_trip(rec: dict[str, Any]) -> bool:
    return _event_of(rec) in TRIP_EVENTS or rec.get("k") == "trip"


def _sessions(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for r in records:
        if r.get("k") == "boot" or not out:
            out.append([])
        out[-1].append(r)
    return out


def evidence_from_events(ev: EventSet, trip_seq: int | None = None) -> Evidence:
    from .events import unwrap_ms

    # uptime made monotonic within each boot: a board's ticks_ms wraps every 12.4 days
    recs = unwrap_ms([r for r in ev.records if isinstance(r.get("ms"), int)])
    if not recs:
        raise UserError(f"{ev.source}: no journal records to report on")
    cfg = ev.config or {}
    trip_cfg = cfg.get("trip") or {}
    blocks = [str(b.get("name", f"block{i}")) for i, b in enumerate(cfg.get("blocks") or []) if isinstance(b, dict)]
    sessions = _sessions(recs)
    if trip_seq is not None:
        chosen = next((s for s in sessions if any(r["n"] == trip_seq for r in s)), None)
        if chosen is None:
            raise UserError(f"no record with seq {trip_seq} in {ev.source}")
    else:
        with_trip = [s for s in sessions if any(_is_trip(r) for r in s)]
        chosen = (with_trip or sessions)[-1]
    notes = []
    if len(sessions) > 1:
        notes.append(f"{len(sessions)} boots in these records; plotted: the one with records "
                     f"{chosen[0]['n']}..{chosen[-1]['n']} (uptime restarts at each boot)")
    trip_recs = [r for r in chosen if _is_trip(r)]
    if trip_seq is not None:
        trip_recs = [r for r in trip_recs if r["n"] >= trip_seq] or trip_recs
    ms0 = trip_recs[0]["ms"] if trip_recs else chosen[0]["ms"]

    def x(ms: int) -> float:
        return (ms - ms0) / 1000.0

    # wall clock: t is unix seconds at the record's ms; samples get t by offset from their capture
    def wall(ms: int) -> str:
        ref = min((r for r in chosen if _num(r.get("t")) is not None), key=lambda r: abs(r["ms"] - ms), default=None)
        if ref is None:
            return ""
        t = format_time(ref["t"] + (ms - ref["ms"]) / 1000.0)
        return "" if t == "-" else t

    trace: list[tuple[float, float | None, float | None]] = []
    logged: list[tuple[float, float | None, float | None]] = []
    masks: list[tuple[float, int]] = []
    n_samples = 0
    for r in chosen:
        if r.get("k") == "capture":
            for sms, hz, kw, mask in capture_samples(r):
                trace.append((x(sms), hz, _num(kw)))
                masks.append((x(sms), mask))
                n_samples += 1
        else:
            if "hz" in r or "kw" in r:
                logged.append((x(r["ms"]), _num(r.get("hz")), _num(r.get("kw"))))
            if isinstance(r.get("mask"), int):
                masks.append((x(r["ms"]), r["mask"]))
    samples_tr = sorted(trace, key=lambda p: p[0])
    logged.sort(key=lambda p: p[0])
    trace = sorted(samples_tr + logged, key=lambda p: p[0])  # for the measurements below
    masks.sort(key=lambda p: p[0])
    if not n_samples:
        notes.append("no disturbance capture in these records: the trace is the readings logged with each "
                     "control event only (enable [capture] or pull after post_s has elapsed)")
    if not blocks:
        width = max((m for _, m in masks), default=0).bit_length()
        blocks = [f"block{i}" for i in range(max(width, 1))]

    pickup = _num(trip_cfg.get("pickup_hz"))
    restore_hz = _num(trip_cfg.get("restore_hz"))
    trips: list[Trip] = []
    for tr in trip_recs:
        cause = TRIP_EVENTS.get(_event_of(tr)) or str(tr.get("reason") or "trip")
        t_open = x(tr["ms"])
        before = [r for r in chosen if r["n"] < tr["n"]]
        prev_trip = max((r["ms"] for r in before if _is_trip(r)), default=None)
        trig_ms: int | None = None
        label = ""
        if cause == "underfrequency":
            label = "first sample below pickup"
            # from the capture: the run of samples below pickup that ends at the trip
            if pickup is not None:
                below = None
                for t, hz, _ in trace:
                    if t > t_open + 1e-9:
                        break
                    if hz is not None and hz < pickup:
                        below = t if below is None else below
                    else:
                        below = None
                if below is not None and n_samples:
                    trig_ms = int(round(below * 1000)) + ms0
            if trig_ms is None:
                ps = [r for r in before if _event_of(r) == "pickup_start"
                      and (prev_trip is None or r["ms"] > prev_trip)]
                if ps:
                    trig_ms = ps[-1]["ms"]
        elif cause == "signal":
            label = "utility signal asserted"
            sig = [r for r in before if (r.get("k") == "signal" and r.get("on")) or _event_of(r) == "signal_on"]
            trig_ms = sig[-1]["ms"] if sig else None
            # a shed command holds its own shed entry, journaled as signal_on right after the
            # accepted command: the cause is the command, not a utility signal
            cmd = [r for r in before if r.get("k") == "cmd" and r.get("cmd") == "shed"]
            if cmd and sig and sig[-1]["n"] - cmd[-1]["n"] <= 2 and sig[-1]["ms"] - cmd[-1]["ms"] < 1000:
                cause, label, trig_ms = "command", "shed command accepted", cmd[-1]["ms"]
        elif cause == "command":
            label = "shed command accepted"
            cmd = [r for r in before if r.get("k") == "cmd" and r.get("cmd") == "shed"]
            trig_ms = cmd[-1]["ms"] if cmd else None
        elif cause == "meter_loss":
            label = "meter silent (fail-safe timer)"
            ml = [r for r in before if _event_of(r) in ("meter_lost", "meter_fault")]
            trig_ms = ml[-1]["ms"] if ml else None
        trip = Trip(t_open, cause, trigger_label=label, when=wall(tr["ms"]))
        if trig_ms is not None and (prev_trip is None or trig_ms >= prev_trip):
            trip.t_trigger = x(trig_ms)
            trip.response_ms = float(tr["ms"] - trig_ms)
        # kW: the reading the trip decision saw, then the lowest within the window after it
        trip.kw_before = _num(tr.get("kw"))
        if trip.kw_before is None:
            pre = [kw for t, _, kw in trace if t < t_open and kw is not None]
            trip.kw_before = pre[-1] if pre else None
        nxt = [x(r["ms"]) for r in chosen if r["n"] > tr["n"] and _event_of(r) in ("restore_block", "restore")]
        end = min([t_open + KW_AFTER_WINDOW_S] + nxt)
        after = [kw for t, _, kw in trace if t_open < t <= end and kw is not None]
        if not after:
            later = [kw for t, _, kw in trace if t > t_open and kw is not None]
            after = later[:1]
        trip.kw_after = min(after) if after else None
        trips.append(trip)

    restores: list[Restore] = []
    prev_mask: int | None = None
    for r in chosen:
        m = r.get("mask") if isinstance(r.get("mask"), int) else None
        if _event_of(r) in ("restore_block", "restore") and m is not None:
            new = m & ~(prev_mask or 0)
            names = [blocks[i] if i < len(blocks) else f"block{i}" for i in range(m.bit_length()) if new >> i & 1]
            if isinstance(r.get("block"), str):
                names = [r["block"]]
            for name in names or ["?"]:
                restores.append(Restore(x(r["ms"]), name, _num(r.get("hz")), _num(r.get("kw")), wall(r["ms"])))
        if m is not None and r.get("k") != "capture":
            prev_mask = m

    rows = []
    for r in chosen:
        e = _event_of(r)
        if r.get("k") == "capture":
            smp = capture_samples(r)
            what = f"capture: {len(smp)} samples"
            if smp:
                what += f" from {x(smp[0][0]):+.2f} s to {x(smp[-1][0]):+.2f} s"
        elif r.get("k") == "ctl":
            what = e + (f" ({r['reason']})" if r.get("reason") not in (None, "none") and e in TRIP_EVENTS else "")
        else:
            from .events import describe

            what = f"{r.get('k')}: {describe(r)}".strip()
        rmask: int | None = r["mask"] if isinstance(r.get("mask"), int) and r.get("k") != "capture" else None
        rows.append({"n": r["n"], "when": wall(r["ms"]), "t": x(r["ms"]), "what": what,
                     "hz": _num(r.get("hz")), "kw": _num(r.get("kw")), "closed": _closed_names(rmask, blocks)})
    final_mask = masks[-1][1] if masks else None
    incomplete = incompleteness(ev)
    if incomplete:
        final_mask = None  # the state after the last record pulled is not the board's end state
    site = ev.site or cfg.get("site")
    device = ev.device or cfg.get("device")
    if pickup is None:
        notes.append("no site config in these records (pickup/restore lines not drawn): pass the site "
                     "file (`gridshed report ... --site site.toml`; a .csv export carries none), or pull to "
                     "a .json file (`gridshed events --port ... -o events.json`)")
    return Evidence(title=f"Load-shed event report: {site or 'site ?'} / {device or 'device ?'}"
                          + (" (INCOMPLETE records)" if incomplete else ""), source=ev.source,
                    site=site, device=device, blocks=blocks, pickup_hz=pickup, restore_hz=restore_hz,
                    axis_label="seconds from the trip (board uptime)" if trip_recs else "seconds (board uptime)",
                    trace=samples_tr if n_samples else logged, masks=masks, trips=trips, restores=restores,
                    rows=rows, notes=notes, final_mask=final_mask, dense=n_samples > 0,
                    logged=logged if n_samples else [], incomplete=incomplete)


def incompleteness(ev: EventSet) -> list[str]:
    """Why a pull does not hold the whole journal: stopped early, records missing, board ahead."""
    out = []
    if not ev.complete:
        out.append(f"the pull stopped after {len(ev.records)} records (the board stopped answering): "
                   "pull again with `gridshed events` and report from the complete file")
    seqs = sorted({r["n"] for r in ev.records if isinstance(r.get("n"), int)})
    holes = [(a + 1, b - 1) for a, b in zip(seqs, seqs[1:]) if b - a > 1]
    if holes:
        n = sum(b - a + 1 for a, b in holes)
        first = holes[0]
        out.append(f"{n} records missing between the ones pulled (first: seq {first[0]}"
                   f"{'..%d' % first[1] if first[1] > first[0] else ''})")
    if isinstance(ev.board_seq, int) and seqs and seqs[-1] < ev.board_seq:
        out.append(f"the records end at seq {seqs[-1]}, the board's journal was at seq {ev.board_seq}")
    return out


# ---------------------------------------------------------------------------------------------
# From a simulated run (gridshed.sim.summary.summarize output)


def evidence_from_sim(s: dict[str, Any]) -> Evidence:
    blocks = list((s.get("opens_per_block") or {}).keys())
    idx = {b: i for i, b in enumerate(blocks)}
    trace = [(float(p[0]), _num(p[1]), _num(p[2])) for p in s.get("trace") or [] if len(p) >= 3]
    transitions = s.get("transitions") or []
    mask = 0
    for i, b in enumerate(blocks):
        first = next((tr for tr in transitions if tr["block"] == b), None)
        closed = (first["state"] == "open") if first else (b in (s.get("closed_at_end") or []))
        if closed:
            mask |= 1 << i
    t_start = trace[0][0] if trace else 0.0
    masks = [(min(t_start, 0.0), mask)]
    for tr in transitions:
        bi = idx.get(tr["block"])
        if bi is None:
            continue
        mask = (mask | 1 << bi) if tr["state"] == "closed" else (mask & ~(1 << bi))
        masks.append((float(tr["t_s"]), mask))

    def reading_at(t: float) -> tuple[float | None, float | None]:
        best = None
        for p in trace:
            if p[0] <= t:
                best = p
            else:
                break
        return (best[1], best[2]) if best else (None, None)

    trips: list[Trip] = []
    for i, t in enumerate(s.get("trips") or []):
        if t.get("relay_open_s") is None:
            continue
        cause = t.get("cause", "trip")
        trip = Trip(float(t["relay_open_s"]), cause)
        if cause == "under-frequency":
            # the headline figure is the console's first one: from the frequency crossing the
            # pickup (a trip on the scenario's first sample has no crossing: from the first poll)
            if t.get("latency_ms") is not None:
                trip.t_trigger = float(t["crossing_s"])
                trip.trigger_label = f"frequency crossing {s.get('pickup_hz')} Hz"
                trip.response_ms = t["latency_ms"]
            elif t.get("poll_s") is not None:
                trip.t_trigger = float(t["poll_s"])
                trip.trigger_label = "first meter poll below pickup (scenario starts below it)"
                trip.response_ms = t.get("latency_from_poll_ms")
            if t.get("latency_from_meter_ms") is not None:
                trip.extra.append(f"meter registers showed it at {t['meter_update_s']:.3f} s, polled at "
                                  f"{t['poll_s']:.3f} s: relay open {t['latency_from_meter_ms']:.0f} ms after the "
                                  f"meter update, {t['latency_from_poll_ms']:.0f} ms after the poll")
        elif cause == "utility signal":
            trip.t_trigger = float(t["asserted_s"])
            trip.trigger_label = "utility signal asserted"
            trip.response_ms = t.get("latency_ms")
        elif cause in ("meter silent", "meter invalid"):
            trip.t_trigger = float(t["silent_from_s"])
            trip.trigger_label = t.get("detail") or cause
            trip.response_ms = (t["after_s"] * 1000.0) if t.get("after_s") is not None else None
        if i == 0 or not trips:
            trip.kw_before, trip.kw_after = _num(s.get("kw_before")), _num(s.get("kw_after"))
        if trip.kw_before is None:
            trip.kw_before = reading_at(trip.t_open - 1e-6)[1]
        trips.append(trip)
    restores = []
    for r in s.get("restores") or []:
        hz, kw = reading_at(float(r["t_s"]))
        restores.append(Restore(float(r["t_s"]), r["block"], hz, kw))
    rows: list[dict[str, Any]] = []
    for t in s.get("trips") or []:
        key = next((k for k in ("crossing_s", "asserted_s", "silent_from_s") if k in t), None)
        if key is not None:
            hz, kw = reading_at(float(t[key]))
            rows.append({"n": "", "when": "", "t": float(t[key]), "what": f"{t['cause']} ({key[:-2].replace('_', ' ')})",
                         "hz": hz, "kw": kw, "closed": ""})
    m = masks[0][1]
    for tr in transitions:
        i = idx.get(tr["block"], 0)
        m = (m | 1 << i) if tr["state"] == "closed" else (m & ~(1 << i))
        hz, kw = reading_at(float(tr["t_s"]))
        rows.append({"n": "", "when": "", "t": float(tr["t_s"]),
                     "what": f"relay {tr['block']} {'closed (load on)' if tr['state'] == 'closed' else 'OPEN (shed)'}",
                     "hz": hz, "kw": kw, "closed": _closed_names(m, blocks)})
    rows.sort(key=lambda r: r["t"])
    st = s.get("board_status") or {}
    notes = [f"simulated run of scenario {s.get('scenario')} ({s.get('transport')}"
             f"{' @ %s baud' % s['baud'] if s.get('baud') else ''}, {s.get('polls')} meter polls, "
             f"{s.get('unanswered_polls')} unanswered)"]
    if not trace:
        notes.append("this summary has no meter trace (made by an older gridshed): only events are drawn")
    return Evidence(title=f"Load-shed event report (simulated): {st.get('site') or 'site'} / {st.get('device') or 'device'}",
                    source=f"gridshed sim {s.get('scenario')}", site=st.get("site"), device=st.get("device"),
                    blocks=blocks, pickup_hz=_num(s.get("pickup_hz")), restore_hz=_num(s.get("restore_hz")),
                    axis_label="scenario seconds", trace=trace, masks=masks, trips=trips, restores=restores,
                    rows=rows, notes=notes, final_mask=masks[-1][1] if masks else None)


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt_kw(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} kW"


def _with_gaps(pts: list[tuple[float, float]], gap_s: float = 1.0) -> tuple[list[float], list[float]]:
    """x, y lists with a NaN break wherever samples are more than gap_s apart (no line across holes)."""
    xs: list[float] = []
    ys: list[float] = []
    for i, (t, v) in enumerate(pts):
        if i and t - pts[i - 1][0] > gap_s:
            xs.append(pts[i - 1][0])
            ys.append(float("nan"))
        xs.append(t)
        ys.append(v)
    return xs, ys


def render_png(e: Evidence) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb = max(len(e.blocks), 1)
    fig, (ax_hz, ax_kw, ax_rl) = plt.subplots(
        3, 1, figsize=(11, 8.6), sharex=True, dpi=110,
        gridspec_kw={"height_ratios": [3.2, 2.2, 0.5 + 0.45 * nb], "hspace": 0.12})
    ts = [p[0] for p in e.trace + e.logged] + [t for t, _ in e.masks] + [tr.t_open for tr in e.trips]
    x0, x1 = (min(ts), max(ts)) if ts else (0.0, 1.0)
    if x1 - x0 < 1.0:
        x1 = x0 + 1.0
    if e.restores:  # room for the label of the last block to come back
        x1 = max(x1, max(r.t for r in e.restores) + (x1 - x0) * 0.1)
    pad = (x1 - x0) * 0.02
    ax_hz.set_xlim(x0 - pad, x1 + pad)

    # --- frequency
    hz_pts = [(t, hz) for t, hz, _ in e.trace if hz is not None]
    if hz_pts and e.dense:
        gx, gy = _with_gaps(hz_pts)
        ax_hz.plot(gx, gy, color="#1f4e99", lw=1.4, marker="." if len(hz_pts) < 60 else None,
                   label="frequency (meter)")
        lg = [(t, hz) for t, hz, _ in e.logged if hz is not None]
        if lg:
            ax_hz.plot([p[0] for p in lg], [p[1] for p in lg], ls="none", marker="o", ms=4, color="#1f4e99",
                       alpha=0.6, label="reading logged with an event")
    elif hz_pts:
        ax_hz.plot([p[0] for p in hz_pts], [p[1] for p in hz_pts], color="#1f4e99", lw=0.8, ls=":", marker="o",
                   ms=4, label="frequency logged with each event")
    if e.pickup_hz is not None:
        ax_hz.axhline(e.pickup_hz, color="#c0392b", ls="--", lw=1.1, label=f"pickup {e.pickup_hz:g} Hz")
    if e.restore_hz is not None:
        ax_hz.axhline(e.restore_hz, color="#27884a", ls="--", lw=1.1, label=f"restore {e.restore_hz:g} Hz")
    vals = [p[1] for p in hz_pts] + [v for v in (e.pickup_hz, e.restore_hz) if v is not None]
    if vals:
        lo, hi = min(vals), max(vals)
        span = max(hi - lo, 0.1)
        ax_hz.set_ylim(lo - span * 0.25, hi + span * 0.45)
    ax_hz.set_ylabel("Hz")
    ax_hz.set_title(e.title, fontsize=12, loc="left", fontweight="bold")

    # shed periods: from each opening to the last restore that follows it
    for k, tr in enumerate(e.trips):
        nxt = e.trips[k + 1].t_open if k + 1 < len(e.trips) else None
        rs = [r.t for r in e.restores if r.t > tr.t_open and (nxt is None or r.t < nxt)]
        all_back = e.final_mask == (1 << len(e.blocks)) - 1
        end = max(rs) if rs and (nxt is not None or all_back) else x1 + pad
        for ax in (ax_hz, ax_kw, ax_rl):
            ax.axvspan(tr.t_open, end, color="#e74c3c", alpha=0.06, lw=0)
            ax.axvline(tr.t_open, color="#c0392b", lw=1.0, alpha=0.8)
    def right_half(t: float) -> bool:
        return (t - x0) / (x1 - x0) > 0.55

    for k, tr in enumerate(e.trips):
        cause = CAUSE_TEXT.get(tr.cause, tr.cause)
        text = f"TRIP #{k + 1}: {cause}\nrelay open at {tr.t_open:.3f} s"
        if tr.response_ms is not None:
            text += f"\nresponse {tr.response_ms:.0f} ms\n({tr.trigger_label} \u2192 relay open)"
        ymin, ymax = ax_hz.get_ylim()
        ax_hz.annotate(text, xy=(tr.t_open, ymin + (ymax - ymin) * 0.05), xycoords="data",
                       xytext=(-12 if right_half(tr.t_open) else 12, 0), textcoords="offset points", fontsize=8.5,
                       va="bottom", ha="right" if right_half(tr.t_open) else "left",
                       bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "#c0392b", "alpha": 0.92})
        if tr.t_trigger is not None:
            hz_at = next((hz for t, hz, _ in e.trace if hz is not None and t >= tr.t_trigger - 1e-9), None)
            if hz_at is not None:
                ax_hz.plot([tr.t_trigger], [hz_at], marker="o", ms=7, mfc="none", mec="#e67e22", mew=1.8,
                           label=tr.trigger_label if k == 0 else None, ls="none")
    ax_hz.legend(loc="upper right", fontsize=8, ncol=2, framealpha=0.9)
    ax_hz.grid(alpha=0.3)

    # zoom on the first trip: the response is tens of ms, invisible at full scale
    if e.trips and e.trips[0].t_trigger is not None:
        tr = e.trips[0]
        trig = e.trips[0].t_trigger
        lo_t = min(trig, tr.t_open) - 0.25
        hi_t = max(trig, tr.t_open) + 0.25
        near = [(t, hz) for t, hz in hz_pts if lo_t <= t <= hi_t]
        if len(near) >= 3:
            ins = ax_hz.inset_axes([0.12 if right_half(tr.t_open) else 0.52, 0.08, 0.27, 0.38])
            ins.plot([p[0] for p in near], [p[1] for p in near], color="#1f4e99", marker=".", lw=1)
            if e.pickup_hz is not None:
                ins.axhline(e.pickup_hz, color="#c0392b", ls="--", lw=1)
            ins.axvline(tr.t_open, color="#c0392b", lw=1.2)
            ins.axvline(trig, color="#e67e22", lw=1.2, ls=":")
            ins.set_title(f"zoom: {tr.trigger_label} \u2192 relay open = {tr.response_ms:.0f} ms"
                          if tr.response_ms is not None else "zoom on the trip", fontsize=7.5)
            ins.tick_params(labelsize=6.5)
            ins.set_facecolor("#fbfbfb")
            ins.grid(alpha=0.3)

    # --- site kW
    kw_pts = [(t, kw) for t, _, kw in e.trace if kw is not None]
    if kw_pts and e.dense:
        gx, gy = _with_gaps(kw_pts)
        ax_kw.step(gx, gy, where="post", color="#6c3483", lw=1.4, label="site kW (meter)")
        lg = [(t, kw) for t, _, kw in e.logged if kw is not None]
        if lg:
            ax_kw.plot([p[0] for p in lg], [p[1] for p in lg], ls="none", marker="o", ms=4, color="#6c3483",
                       alpha=0.6, label="reading logged with an event")
    elif kw_pts:
        ax_kw.plot([p[0] for p in kw_pts], [p[1] for p in kw_pts], color="#6c3483", lw=0.8, ls=":", marker="o",
                   ms=4, label="site kW logged with each event")
    kmax = max([p[1] for p in kw_pts] + [tr.kw_before or 0.0 for tr in e.trips] + [1.0])
    ax_kw.set_ylim(min([0.0] + [p[1] for p in kw_pts]) - kmax * 0.05, kmax * 1.3)
    for tr in e.trips:
        if tr.kw_before is not None and tr.kw_after is not None:
            w = (x1 - x0) * 0.05
            ax_kw.hlines([tr.kw_before], tr.t_open - w, tr.t_open, colors="#6c3483", linestyles=":", lw=1.2)
            ax_kw.hlines([tr.kw_after], tr.t_open, tr.t_open + w, colors="#6c3483", linestyles=":", lw=1.2)
            ax_kw.annotate("", xy=(tr.t_open + w * 0.6, tr.kw_after), xytext=(tr.t_open + w * 0.6, tr.kw_before),
                           arrowprops={"arrowstyle": "<->", "color": "#c0392b", "lw": 1.3})
            ax_kw.text(tr.t_open + w * 0.8, (tr.kw_before + tr.kw_after) / 2,
                       f"shed {tr.kw_shed:,.0f} kW\n{tr.kw_before:,.0f} \u2192 {tr.kw_after:,.0f} kW",
                       fontsize=8.5, va="center",
                       bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "#6c3483", "alpha": 0.9})
    ax_kw.set_ylabel("kW")
    if kw_pts:
        ax_kw.legend(loc="upper right", fontsize=8)
    ax_kw.grid(alpha=0.3)

    # --- relay blocks: one bar per block, green while closed (load on)
    if e.masks:
        t_end = x1 + pad
        for i, name in enumerate(e.blocks):
            y = nb - 1 - i
            on: list[tuple[float, float]] = []
            off: list[tuple[float, float]] = []
            for k, (t, m) in enumerate(e.masks):
                t_next = e.masks[k + 1][0] if k + 1 < len(e.masks) else t_end
                if t_next > t:
                    (on if m >> i & 1 else off).append((t, t_next - t))
            ax_rl.broken_barh(off, (y - 0.32, 0.64), facecolors="#d5d8dc")
            ax_rl.broken_barh(on, (y - 0.32, 0.64), facecolors="#2e9e5b")
        for r in e.restores:
            if r.block in e.blocks:
                y = nb - 1 - e.blocks.index(r.block)
                ax_rl.text(r.t, y, f" \u2191 {r.t:.2f} s", fontsize=7.5, ha="left", va="center", color="white",
                           fontweight="bold", clip_on=True)
    ax_rl.set_yticks(range(nb))
    ax_rl.set_yticklabels(list(reversed(e.blocks)) if e.blocks else [""], fontsize=8.5)
    ax_rl.set_ylim(-0.6, nb - 0.4 + 0.35)
    ax_rl.set_ylabel("relay blocks")
    ax_rl.set_xlabel(e.axis_label + "   (green = closed / load on, grey = open / shed)")
    ax_rl.grid(axis="x", alpha=0.3)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.07)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def summary_lines(e: Evidence) -> list[tuple[str, str]]:
    """(label, text) pairs of the readable summary (HTML and text)."""
    out = [("site", e.site or "-"), ("device", e.device or "-"), ("source", e.source)]
    if e.pickup_hz is not None:
        out.append(("thresholds", f"pickup {e.pickup_hz:g} Hz, restore {e.restore_hz:g} Hz"
                    if e.restore_hz is not None else f"pickup {e.pickup_hz:g} Hz"))
    if not e.trips:
        out.append(("trips", "none in these records"))
    for k, tr in enumerate(e.trips):
        when = f" ({tr.when})" if tr.when else ""
        line = f"{CAUSE_TEXT.get(tr.cause, tr.cause)}: relay open at {tr.t_open:.3f} s{when}"
        if tr.response_ms is not None:
            line += f"; response {tr.response_ms:.0f} ms from {tr.trigger_label} ({tr.t_trigger:.3f} s)"
        out.append((f"trip #{k + 1}", line))
        for x in tr.extra:
            out.append(("", x))
        if tr.kw_before is not None or tr.kw_after is not None:
            shed = f" = {tr.kw_shed:,.1f} kW shed" if tr.kw_shed is not None else ""
            out.append(("", f"site load {_fmt_kw(tr.kw_before)} before \u2192 {_fmt_kw(tr.kw_after)} after{shed}"))
    if e.restores:
        seq = ", ".join(f"{r.block} at {r.t:.2f} s" + (f" ({r.when})" if r.when else "") for r in e.restores)
        out.append(("restore sequence", seq))
        gaps = [b.t - a.t for a, b in zip(e.restores, e.restores[1:])]
        if gaps:
            out.append(("", "gaps between blocks: " + ", ".join(f"{g:.2f} s" for g in gaps)))
    if e.incomplete:
        out[0:0] = [("INCOMPLETE", "these records are not the whole journal; the end state is unknown")] + \
            [("", why) for why in e.incomplete]
        out.append(("at the end", "unknown (incomplete records)"))
    elif e.final_mask is not None:
        closed = _closed_names(e.final_mask, e.blocks)
        out.append(("at the end", "all blocks closed (load restored)" if e.final_mask == (1 << len(e.blocks)) - 1
                    else f"closed: {closed}"))
    for n in e.notes:
        out.append(("note", n))
    return out


def render_html(e: Evidence, png: bytes) -> str:
    esc = html.escape
    rows = []
    for label, text in summary_lines(e):
        rows.append(f"<tr><th>{esc(label)}</th><td>{esc(text)}</td></tr>")
    ev_rows = []
    for r in e.rows:
        ev_rows.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
            r["n"], r["when"] or "-", f"{r['t']:+.3f}", r["what"],
            "-" if r["hz"] is None else f"{r['hz']:.3f}", "-" if r["kw"] is None else f"{r['kw']:,.1f}",
            r["closed"] or "-")) + "</tr>")
    img = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{esc(e.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1250px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; vertical-align: top; }}
table.summary th {{ background: #f4f6f7; white-space: nowrap; }}
table.events td:nth-child(3), table.events td:nth-child(5), table.events td:nth-child(6) {{ text-align: right; }}
thead th {{ background: #eaeded; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
.small {{ color: #555; font-size: 13px; }}
</style></head><body>
<h1>{esc(e.title)}</h1>
<h2>Summary</h2>
<table class="summary">
{chr(10).join(rows)}
</table>
<h2>Frequency, site load and relay blocks</h2>
<img alt="frequency with pickup and restore thresholds, site kW and relay blocks over time, trips annotated" src="data:image/png;base64,{img}">
<p class="small">Red dashed line: pickup threshold; green dashed: restore threshold; red vertical line: relay
opening (shaded until the last block is back); orange circle: the trigger the response time is measured
from; kW arrow: site load before the opening and the lowest reading within {KW_AFTER_WINDOW_S:g} s after it.
Time axis: {esc(e.axis_label)}.</p>
<h2>Events</h2>
<table class="events">
<thead><tr><th>seq</th><th>time (UTC)</th><th>t (s)</th><th>event</th><th>Hz</th><th>kW</th><th>blocks closed after</th></tr></thead>
<tbody>
{chr(10).join(ev_rows)}
</tbody></table>
<p class="small">Generated by gridshed from {esc(e.source)}.</p>
</body></html>
"""


def write_report(e: Evidence, path: str | os.PathLike) -> str:
    """Write .png or .html (by extension); returns the format."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in ("png", "html", "htm"):
        raise UserError(f"{p}: report must end in .png or .html")
    png = render_png(e)
    try:
        if fmt == "png":
            p.write_bytes(png)
        else:
            p.write_text(render_html(e, png))
    except OSError as exc:
        raise UserError(f"cannot write {p}: {exc.strerror or exc}") from None
    return "png" if fmt == "png" else "html"


def report(source: str | os.PathLike | EventSet, path: str | os.PathLike, trip_seq: int | None = None) -> Evidence:
    """Report from pulled events (EventSet, .json/.csv export, or a board directory)."""
    ev = source if isinstance(source, EventSet) else read_file(source)
    e = evidence_from_events(ev, trip_seq)
    write_report(e, path)
    return e


def report_from_sim(summary: dict[str, Any], path: str | os.PathLike) -> Evidence:
    """The same report from a `gridshed sim` summary (called by `gridshed sim --report FILE`)."""
    e = evidence_from_sim(summary)
    write_report(e, path)
    return e
