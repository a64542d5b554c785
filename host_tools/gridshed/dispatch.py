"""Host side of the board's economic schedule: build it, bound it, sign it, send it.

A schedule is one signed command (COSE_Mac0, the same path as ``gridshed shed``; see
docs/security.md) whose payload carries, beside cmd/seq/exp/dev/site,

    "cmd": "schedule", "sid": <schedule id, int, monotonic per device>,
    "iv": [[start_unix, end_unix, "p", usd_per_mwh] | [start_unix, end_unix, "kw", kw_to_curtail], ...]

A later interval wins where two overlap; a schedule with a higher id replaces the board's
whole schedule (docs/market.md). Ids are kept per device in the inventory (table
``schedules``); each new id is max(last + 1, now in unix seconds), so ids stay increasing even
if the inventory is lost and rebuilt.

Bounds: the board keeps at most :data:`MAX_INTERVALS` intervals and verifies signed commands of
at most :data:`MAX_SIGNED_BYTES` bytes (then the transport: a console line, the board's MQTT
buffer); a schedule over a bound is refused with the count and what to do (``--horizon``,
``--fit``), never cut silently.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from agent.cmd_api import MAX_COMMAND_LEN

from .errors import UserError
from .prices import Interval, iso

MAX_INTERVALS = 96          # the board's cap per schedule (agent.market MAX_IV; docs/market.md)
# what the board takes in a row (agent.market Market.set_schedule): times from 2020-01-01 on,
# a price in -10000..100000 $/MWh, kW to curtail in 0..1e7
MIN_START = 1577836800
PRICE_RANGE = (-10000.0, 100000.0)
KW_MAX = 1e7
MAX_SIGNED_BYTES = MAX_COMMAND_LEN  # the board verifies signed commands of at most 512 bytes
                                   # (agent.cmd_api); a longer one is refused "malformed"
CMD = "schedule"
ID_KEY = "sid"              # the schedule id's payload key (docs/market.md "The schedule")
CONSOLE_LINE_MAX = 1024     # the agent's longest console line (agent/base.py LINE_MAX)
FLEET_MAX_PACKET = 640      # the board's MQTT receive buffer (agent/features/mqtt.py max_packet): a bigger
                            # PUBLISH is skipped by the board, unanswered
PRICE, KW = "p", "kw"


def _num(v: float, nd: int) -> int | float:
    """Rounded; an int when whole (a smaller CBOR item on the wire)."""
    r = round(float(v), nd)
    return int(r) if r == int(r) and abs(r) < 2**53 else r


def price_intervals(series: list[Interval], now: float | None = None, horizon_s: float | None = None,
                    strikes: list[float] | None = None) -> list[list]:
    """Price Intervals -> schedule rows [start, end, "p", $/MWh]: intervals already over at `now`
    are dropped, intervals starting at or after now + horizon are cut, and neighbours with the
    same price (to the cent) that touch are merged into one row.

    strikes (the site's strike prices): neighbours are merged when the same blocks are above
    their strikes in both (the board decides only by price > strike, so it decides the same);
    the merged row carries the time-weighted mean price, which lies between the same strikes."""
    out: list[list] = []
    acc: list[float] = []  # price x seconds of the run in the last row (strike merging)
    cut = sorted(set(strikes or ()))

    def band(p: float) -> int:
        return sum(1 for x in cut if p > x)

    for iv in series:
        if now is not None and iv.end <= now:
            continue
        if horizon_s is not None and now is not None and iv.start >= now + horizon_s:
            break
        p = _num(iv.value, 2)
        if out and out[-1][1] == iv.start and (out[-1][3] == p if strikes is None else band(out[-1][4]) == band(p)):
            out[-1][1] = iv.end
            if strikes is not None:
                acc[-1] += p * (iv.end - iv.start)
                out[-1][3] = _num(acc[-1] / (out[-1][1] - out[-1][0]), 2)
        else:
            out.append([iv.start, iv.end, PRICE, p] + ([p] if strikes is not None else []))
            acc.append(p * (iv.end - iv.start))
    return [r[:4] for r in out]


def site_strikes(site: dict[str, Any]) -> list[float]:
    """Every block's strike_usd_mwh in a site.toml (as read by siteconfig.read_toml)."""
    return [float(b["strike_usd_mwh"]) for b in site.get("blocks") or []
            if isinstance(b, dict) and isinstance(b.get("strike_usd_mwh"), (int, float))
            and not isinstance(b.get("strike_usd_mwh"), bool)]


def kw_intervals(windows: list[tuple[int, int]], kw: float, now: float | None = None) -> list[list]:
    """Windows (start, end) -> rows [start, end, "kw", kW to curtail] (windows over at `now` dropped)."""
    if isinstance(kw, bool) or not isinstance(kw, (int, float)) or not math.isfinite(kw) or kw < 0:
        raise UserError(f"kW target must be a number >= 0, got {kw!r}")
    return [[s, e, KW, _num(kw, 3)] for s, e in windows if now is None or e > now]


def check_rows(rows: list[list]) -> None:
    """UserError (naming the interval) for a row the board would refuse: [int start < int end
    (from 2020 on), "p" with -10000..100000 $/MWh or "kw" with 0..1e7 kW]."""
    for i, r in enumerate(rows):
        ok = (isinstance(r, list) and len(r) == 4 and all(isinstance(x, int) and not isinstance(x, bool) for x in r[:2])
              and MIN_START <= r[0] < r[1] < 2**31 and r[2] in (PRICE, KW) and isinstance(r[3], (int, float))
              and not isinstance(r[3], bool) and math.isfinite(r[3]))
        if not ok:
            raise UserError(f"schedule interval {i} is not [start < end (unix, 2020 on), \"p\"|\"kw\", value]: {r!r}")
        lo, hi = PRICE_RANGE if r[2] == PRICE else (0.0, KW_MAX)
        if not lo <= r[3] <= hi:
            what = "price" if r[2] == PRICE else "kW to curtail"
            raise UserError(f"schedule interval {i} ({iso(r[0])}): {what} {r[3]:g} is outside what a board "
                            f"takes ({lo:g} .. {hi:g})")


def check_size(rows: list[list], what: str = "the schedule", form: str = "iv") -> None:
    """The board's interval cap: UserError with the count and how to shorten it. form "auto":
    the cap applies to what :func:`body` sends (series steps, iv rows)."""
    if not rows:
        raise UserError(f"{what} has no interval from now on (all of it is in the past?)")
    if (board_rows(body(rows)) if form == "auto" else len(rows)) > MAX_INTERVALS:
        first, last = rows[0][0], max(r[1] for r in rows)
        raise UserError(f"{what} has {len(rows)} intervals ({iso(first)} .. {iso(last)}); a board holds at most "
                        f"{MAX_INTERVALS} per schedule: send a shorter window with --horizon (e.g. --horizon 24h "
                        f"for 15-minute prices) and dispatch again before it runs out")


def _cents(v: float) -> int:
    """$/MWh -> whole cents, rounded as the board rounds an iv row (agent.market _x100)."""
    x = float(v) * 100
    return int(x + 0.5) if x >= 0 else -int(0.5 - x)


def compact(rows: list[list]) -> dict[str, Any] | None:
    """The compact body {"ts": [t0, dt, "pc", [cents, ...]], "iv": [the other rows]} for rows
    whose price rows come first, touch end to start and lie on one step (dt: the greatest common
    divisor of their lengths; merged neighbours are split back into steps), at most
    MAX_INTERVALS steps; None when the price rows are not such a series (a gap, a row out of
    order, or none). The kW rows after them stay iv rows lying over the series (later wins)."""
    k = 0
    while k < len(rows) and rows[k][2] == PRICE:
        k += 1
    prices, rest = rows[:k], rows[k:]
    if not prices or any(r[2] == PRICE for r in rest):
        return None
    if any(a[1] != b[0] for a, b in zip(prices, prices[1:])):
        return None
    dt = 0
    for r in prices:
        dt = math.gcd(dt, r[1] - r[0])
    if not 0 < dt <= 86400 or (prices[-1][1] - prices[0][0]) // dt > MAX_INTERVALS:
        return None
    vals = [_cents(r[3]) for r in prices for _ in range((r[1] - r[0]) // dt)]
    return {"ts": [prices[0][0], dt, "pc", vals], "iv": rest}


def body(rows: list[list]) -> dict[str, Any]:
    """The schedule's fields: {"iv": rows}, or the compact form (:func:`compact`) when it is the
    shorter of the two in CBOR (a day of 15-minute prices: only the compact one fits a command)
    or the rows are more than a board keeps as iv rows."""
    from agent import cbor

    c = compact(rows)
    if c is None:
        return {"iv": rows}
    if len(rows) > MAX_INTERVALS or len(cbor.dumps(c)) < len(cbor.dumps({"iv": rows})):
        return c
    return {"iv": rows}


def board_rows(b: dict[str, Any]) -> int:
    """The rows a board keeps for a body: iv rows and series steps (each at most MAX_INTERVALS)."""
    return max(len(b.get("iv") or ()), len(b["ts"][3]) if "ts" in b else 0)


def payload(dev: str, site: str | None, seq: int, exp: int, sched_id: int, rows: list[list],
            nonce: bytes | None = None, form: str = "iv") -> dict[str, Any]:
    """The schedule command's CBOR payload (keys in a fixed order: deterministic bytes).
    form "iv": every row as [start, end, mode, value]; "auto": :func:`body` picks."""
    p: dict[str, Any] = {"cmd": CMD, "seq": seq, "exp": int(exp), "dev": dev}
    if site is not None:
        p["site"] = site
    p[ID_KEY] = int(sched_id)
    b = body(rows) if form == "auto" else {"iv": rows}
    if "ts" in b:
        p["ts"] = b["ts"]
    p["iv"] = b["iv"]
    if nonce is not None:
        p["nonce"] = bytes(nonce)
    return p


def fresh_needed() -> bool:
    """Does the board want the schedule command fresh (a nonce before it trusts its clock)?"""
    from agent import cmd_check as cmdcheck

    return CMD in cmdcheck.FRESH


@dataclass
class SignedSchedule:
    target: Any     # fleet_client.Target
    seq: int
    exp: int
    sched_id: int
    msg: bytes
    form: str = "iv"  # "ts": the compact uniform-step series (+ iv rows over it), "iv": rows only

    @property
    def cmd(self) -> str:
        return CMD


def sign(tgts: list[Any], rows: list[list], seq_path: Any, inventory: Any, expires_s: float = 60.0,
         now: float | None = None, nonces: dict[str, bytes] | None = None,
         reserve_ids: bool = True, form: str = "iv") -> list[SignedSchedule]:
    """One signed schedule per target: its own key, seq and schedule id (reserved in the
    inventory before signing, so an id is never given twice). reserve_ids=False (dry run):
    the id the next dispatch would get, nothing written."""
    from agent import cbor
    from agent import cmd_cose as cose

    from .inventory import Inventory
    from .signing import SeqCounter

    check_rows(rows)
    if len(rows) > MAX_INTERVALS:  # an empty schedule is fine here: it clears the board's
        check_size(rows, form=form)
    now = time.time() if now is None else now
    counter = SeqCounter(seq_path)
    out = []
    with Inventory(inventory) as inv:
        for t in tgts:
            sid = (inv.next_schedule_id(t.device, at_least=int(now), intervals=len(rows)) if reserve_ids
                   else inv.peek_schedule_id(t.device, at_least=int(now)))
            if sid >= 2**31:  # the board keeps ids below 2**31 (agent.market Market.set_schedule)
                raise UserError(f"{t.device}: schedule id {sid} is past the board's limit (2**31 - 1)")
            seq = counter.next(t.kid, at_least=int(now)) if reserve_ids else max(counter.last(t.kid) + 1, int(now))
            p = payload(t.device, t.site, seq, int(now + expires_s), sid, rows, (nonces or {}).get(t.device), form)
            msg = cose.mac0_create(t.key, t.kid, cbor.dumps(p), tagged=True)
            out.append(SignedSchedule(t, seq, p["exp"], sid, msg, "ts" if "ts" in p else "iv"))
    return out


def console_line_len(msg: bytes) -> int:
    """Characters of the console request ``@cmd <base64>\\n`` carrying msg."""
    return len("@cmd ") + 4 * ((len(msg) + 2) // 3) + 1


def mqtt_packet_len(s: SignedSchedule) -> int:
    """Bytes of the MQTT PUBLISH (QoS 1) that carries s to its board's cmd topic."""
    rem = 2 + len(f"gridshed/{s.target.site}/{s.target.device}/cmd".encode()) + 2 + len(s.msg)
    return 1 + (1 if rem < 128 else 2 if rem < 16384 else 3) + rem


def transport_size(s: SignedSchedule, via: str) -> tuple[int, int, str]:
    """(size, limit, what) of the signed schedule on a transport ("serial" or "mqtt")."""
    if via == "serial":
        return console_line_len(s.msg), CONSOLE_LINE_MAX, "console line (characters)"
    return mqtt_packet_len(s), FLEET_MAX_PACKET, "MQTT packet (bytes) of the board's fleet channel"


def fits(signed: list[SignedSchedule], via: str) -> bool:
    """Does every board take its signed schedule: the command size, and the transport's?"""
    return all(len(s.msg) <= MAX_SIGNED_BYTES and transport_size(s, via)[0] <= transport_size(s, via)[1]
               for s in signed)


def check_transport(signed: list[SignedSchedule], rows: int, via: str) -> None:
    """UserError when a signed schedule is not what the board takes on `via`."""
    for s in signed:
        if len(s.msg) > MAX_SIGNED_BYTES:
            raise UserError(f"the signed schedule for {s.target.device} ({rows} intervals) is {len(s.msg)} bytes; the "
                            f"board verifies signed commands of at most {MAX_SIGNED_BYTES} bytes: send fewer intervals "
                            "(--horizon, or --fit to send as many as fit)")
        n, limit, what = transport_size(s, via)
        if n > limit:
            raise UserError(f"the signed schedule for {s.target.device} ({rows} intervals) is a {n}-long {what}; "
                            f"the board takes {limit}: send fewer intervals (--horizon, or --fit to send as many "
                            "as fit)")


def fit_rows(rows: list[list], ok: Any) -> list[list]:
    """The rows starting before the latest cut-off time for which ok(rows) holds (every row
    kind cut at the same time, so the 4CP rows of the kept hours stay); [] if none fits."""
    starts = sorted({r[0] for r in rows})
    lo, hi = 0, len(starts)  # keep rows with start <= starts[k-1]; find the largest k that fits
    while lo < hi:
        k = (lo + hi + 1) // 2
        if ok([r for r in rows if r[0] <= starts[k - 1]]):
            lo = k
        else:
            hi = k - 1
    return [r for r in rows if r[0] <= starts[lo - 1]] if lo else []


def summary(rows: list[list]) -> dict[str, Any]:
    prices = [r[3] for r in rows if r[2] == PRICE]
    kws = [r for r in rows if r[2] == KW]
    return {"intervals": len(rows), "from": iso(min(r[0] for r in rows)) if rows else None,
            "to": iso(max(r[1] for r in rows)) if rows else None,
            "price_intervals": len(prices), "kw_intervals": len(kws),
            "price_min": min(prices) if prices else None, "price_max": max(prices) if prices else None}


def rows_json(rows: list[list]) -> list[dict[str, Any]]:
    return [{"start": iso(r[0]), "end": iso(r[1]), "start_unix": r[0], "end_unix": r[1],
             ("price_usd_mwh" if r[2] == PRICE else "curtail_kw"): r[3]} for r in rows]
