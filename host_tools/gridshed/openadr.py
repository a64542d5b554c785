"""OpenADR 2.0b VEN bridge: VTN events in, signed site shed/restore commands out.

The bridge registers with a VTN as a VEN (openleadr's ``OpenADRClient``, simpleHttp pull),
answers every event with optIn or optOut, and turns the event's intervals into a timeline of
site actions: at an interval start it sends ``shed`` (full, or partial with ``kw``), when the
event ends or is cancelled it sends ``restore``. See docs/openadr.md.

Design: :class:`VenBridge` holds the OpenADR logic and the timeline; it never signs or sends
anything itself. Commands go through an injected callable

    send(cmd: str, target_site: str, kw: float | None, expires_s: int) -> Any

whose default implementation, :class:`SiteSender`, signs one COSE_Mac0 per device of the site
(key and kid from the inventory, seq from the shared seq file) and delivers it over MQTT, UDP
or serial with :mod:`gridshed.fleet_client`.

Mapping (several active events are combined: any full shed wins, else the largest kW):

* SIMPLE (signal_type ``level``): payload 0..3 through a :class:`LevelMap`, by default
  ``0=none 1=50% 2=full 3=full`` (a percentage is of ``site_kw``, the site's sheddable load).
* LOAD_DISPATCH ``delta``: shed ``|value|`` kW (the bridge can only reduce load);
  ``setpoint``: shed ``site_kw - value`` kW. The signal's measurement (unit W and SI scale)
  converts to kW; without a measurement the value is taken as kW.
* ELECTRICITY_PRICE ``price``: with a schedule sender (``send_schedule``), each interval
  becomes a schedule row ``[start, end, "p", $/MWh]`` (measurement ``currencyPerKWh``: x 1000
  times its SI scale; no measurement: ``price_unit``, $/kWh by default) and the price rows of
  every live price event go to the site as ONE signed schedule (gridshed.dispatch; the board
  sheds each block above its strike, docs/market.md). A cancel sends the schedule without
  that event's rows. Without a schedule sender price signals are not acted on.
* Any other signal is not acted on; an event with no usable signal is answered optOut.
* Test events (``test_event`` true) are answered optIn and logged but never acted on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

log = logging.getLogger("gridshed.openadr")

SendFn = Callable[[str, str, "float | None", int], Any]
ScheduleFn = Callable[[list, str, int], Any]
LogFn = Callable[[dict[str, Any]], None]

ISSUER = "openadr"  # the issuer label the bridge signs into every command (its own shed entry)

# ---- actions ------------------------------------------------------------------------------
NONE, FULL, KW = "none", "full", "kw"


@dataclass(frozen=True)
class Action:
    """What the site should do: nothing (restore), full shed, or shed ``kw`` kW."""

    kind: str
    kw: float | None = None

    def describe(self) -> str:
        if self.kind == KW:
            return f"shed {self.kw or 0:g} kW"
        return "full shed" if self.kind == FULL else "restore"


RESTORE = Action(NONE)
SHED_FULL = Action(FULL)


def combine(actions: list[Action]) -> Action:
    """Several active events at once: full beats partial, the largest partial wins."""
    if any(a.kind == FULL for a in actions):
        return SHED_FULL
    kws = [a.kw for a in actions if a.kind == KW and a.kw]
    return Action(KW, max(kws)) if kws else RESTORE


# ---- level map ----------------------------------------------------------------------------
_SPEC = re.compile(r"^\s*(\d+)\s*=\s*(full|none|restore|(\d+(?:\.\d+)?)\s*(%|kw))\s*$", re.I)


@dataclass
class LevelMap:
    """SIMPLE signal level -> action. Values: ``"full"``, ``"none"``, ``("pct", P)``, ``("kw", X)``."""

    levels: dict[int, str | tuple[str, float]] = field(default_factory=lambda: {0: "none", 1: ("pct", 50.0), 2: "full", 3: "full"})
    site_kw: float | None = None

    @classmethod
    def parse(cls, specs: list[str] | None, site_kw: float | None = None) -> "LevelMap":
        """``["1=250kw", "2=full"]`` overrides the defaults (``0=none 1=50% 2=full 3=full``)."""
        m = cls(site_kw=site_kw)
        for spec in specs or []:
            g = _SPEC.match(spec)
            if not g:
                raise UserError(f"bad level {spec!r}: use LEVEL=full, LEVEL=none, LEVEL=NN% or LEVEL=NNkw "
                                "(e.g. --level 1=40%)")
            lvl = int(g.group(1))
            if not 0 <= lvl <= 3:
                raise UserError(f"bad level {spec!r}: SIMPLE levels are 0..3")
            word = g.group(2).lower()
            if word in ("full", "none", "restore"):
                m.levels[lvl] = "none" if word == "restore" else word
            elif g.group(4) == "%":
                pct = float(g.group(3))
                if not 0 < pct <= 100:
                    raise UserError(f"bad level {spec!r}: a percentage is 0 < P <= 100")
                m.levels[lvl] = ("pct", pct)
            else:
                m.levels[lvl] = ("kw", float(g.group(3)))
        if site_kw is not None and not (site_kw > 0 and math.isfinite(site_kw)):
            raise UserError(f"--site-kw must be > 0, got {site_kw!r}")
        for lvl, v in sorted(m.levels.items()):
            if isinstance(v, tuple) and v[0] == "pct" and site_kw is None:
                raise UserError(f"level {lvl} sheds {v[1]:g}% of the site: give --site-kw KW (the site's "
                                f"sheddable load) or set it in kW or full (--level {lvl}=250kw, --level {lvl}=full)")
        return m

    def action(self, level: int) -> Action:
        v = self.levels.get(level)
        if v is None:  # above the map: the highest mapped level (OpenADR levels only ever escalate)
            v = self.levels[max(self.levels)] if level > max(self.levels) else "none"
        if isinstance(v, str):
            return SHED_FULL if v == "full" else RESTORE
        kind, x = v
        kw = x if kind == "kw" else (self.site_kw or 0.0) * x / 100.0
        return Action(KW, round(kw, 3)) if kw > 0 else RESTORE

    def describe(self) -> dict[str, str]:
        out = {}
        for lvl, v in sorted(self.levels.items()):
            out[str(lvl)] = v if isinstance(v, str) else (f"{v[1]:g}%" if v[0] == "pct" else f"{v[1]:g} kW")
        return out


# ---- event -> timeline --------------------------------------------------------------------
_SCALE = {"p": 1e-12, "n": 1e-9, "micro": 1e-6, "m": 1e-3, "c": 1e-2, "d": 1e-1, "none": 1.0,
          "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _kw_factor(signal: dict[str, Any]) -> float:
    """Multiplier from the signal's payload to kW (no measurement: the payload is kW)."""
    meas = signal.get("measurement") or {}
    if not meas:
        return 1.0
    unit = str(meas.get("unit") or "W")
    scale = _SCALE.get(str(meas.get("scale") or "none"))
    if scale is None:
        raise ValueError(f"unknown SI scale {meas.get('scale')!r}")
    if unit not in ("W", "w"):
        raise ValueError(f"unit {unit!r} is not power (W)")
    return scale / 1000.0


def _ts(v: Any) -> float:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        return v.timestamp()
    return float(v)


def _secs(v: Any) -> float:
    return v.total_seconds() if hasattr(v, "total_seconds") else float(v or 0)


@dataclass
class Segment:
    start: float          # unix seconds
    end: float | None     # None: open-ended (until cancelled)
    action: Action
    why: str


def signal_segments(signal: dict[str, Any], levels: LevelMap, site_kw: float | None) -> list[Segment]:
    """The actions of one event signal; ValueError if the bridge cannot act on it."""
    name = signal.get("signal_name")
    stype = signal.get("signal_type")
    out = []
    for iv in signal.get("intervals") or []:
        start = _ts(iv["dtstart"])
        dur = _secs(iv.get("duration"))
        end = start + dur if dur > 0 else None
        value = iv.get("signal_payload")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: payload {value!r} is not a number")
        if name == "SIMPLE":
            lvl = int(round(value))
            act = levels.action(lvl)
            why = f"SIMPLE level {lvl}"
        elif name == "LOAD_DISPATCH" and stype == "delta":
            kw = abs(value) * _kw_factor(signal)
            act = Action(KW, round(kw, 3)) if kw > 0 else RESTORE
            why = f"LOAD_DISPATCH delta {value:g}"
        elif name == "LOAD_DISPATCH" and stype == "setpoint":
            if site_kw is None:
                raise ValueError("LOAD_DISPATCH setpoint needs --site-kw (shed = site kW - setpoint)")
            kw = site_kw - value * _kw_factor(signal)
            act = Action(KW, round(kw, 3)) if kw > 0 else RESTORE
            why = f"LOAD_DISPATCH setpoint {value:g}"
        else:
            raise ValueError(f"signal {name}/{stype} is not supported")
        out.append(Segment(start, end, act, why))
    if not out:
        raise ValueError(f"{name}: no intervals")
    return out


PRICE_SIGNAL = "ELECTRICITY_PRICE"


def price_rows(signal: dict[str, Any], price_unit: str = "kwh") -> list[list]:
    """An ELECTRICITY_PRICE ``price`` signal -> schedule rows [start, end, "p", $/MWh];
    ValueError if the bridge cannot act on it (relative prices, another currency or unit, an
    interval without a duration)."""
    stype = signal.get("signal_type")
    if stype != "price":
        raise ValueError(f"{PRICE_SIGNAL}/{stype}: only absolute prices (signal type price) are supported")
    meas = signal.get("measurement") or {}
    if meas:
        name = str(meas.get("name") or "")
        unit = str(meas.get("unit") or "USD")
        scale = _SCALE.get(str(meas.get("scale") or "none"))
        if scale is None:
            raise ValueError(f"unknown SI scale {meas.get('scale')!r}")
        if unit != "USD":
            raise ValueError(f"{PRICE_SIGNAL}: currency {unit!r} (the boards' strikes are in USD)")
        if name == "currencyPerKWh":
            factor = 1000.0 * scale
        elif name in ("currencyPerMWh", "customUnit") and "MWh" in str(meas.get("description") or name):
            factor = scale
        else:
            raise ValueError(f"{PRICE_SIGNAL}: measurement {name!r} is not a price per energy")
    else:
        factor = 1000.0 if price_unit == "kwh" else 1.0
    rows = []
    for iv in signal.get("intervals") or []:
        start = _ts(iv["dtstart"])
        dur = _secs(iv.get("duration"))
        if dur <= 0:
            raise ValueError(f"{PRICE_SIGNAL}: an interval without a duration")
        value = iv.get("signal_payload")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{PRICE_SIGNAL}: payload {value!r} is not a number")
        rows.append([int(start), int(start + dur), "p", round(value * factor, 2)])
    if not rows:
        raise ValueError(f"{PRICE_SIGNAL}: no intervals")
    return rows


def plan_event(event: dict[str, Any], levels: LevelMap, site_kw: float | None) -> tuple[list[Segment], list[str]]:
    """Segments from every supported signal of an event, and the reasons others were skipped."""
    signals = event.get("event_signals") or []
    if isinstance(signals, dict):
        signals = signals.get("event_signals") or []
    segs: list[Segment] = []
    skipped = []
    for s in signals:
        if s.get("signal_name") == PRICE_SIGNAL:
            continue  # the bridge's price path (VenBridge._take)
        try:
            segs.extend(signal_segments(s, levels, site_kw))
        except (ValueError, KeyError, TypeError) as exc:
            skipped.append(str(exc))
    return segs, skipped


def action_at(segs: list[Segment], t: float) -> Action:
    return combine([s.action for s in segs if s.start <= t and (s.end is None or t < s.end)])


def boundaries(segs: list[Segment]) -> list[float]:
    pts = {s.start for s in segs} | {s.end for s in segs if s.end is not None}
    return sorted(pts)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- the bridge ---------------------------------------------------------------------------
@dataclass
class _Plan:
    event_id: str
    segs: list[Segment]
    opt: str
    test: bool
    task: asyncio.Task | None = None


class _Responded(dict):
    """openleadr's responded_events with a fallback to the bridge's own opt record."""

    def __init__(self, opts: dict[str, str]) -> None:
        super().__init__()
        self._opts = opts

    def __missing__(self, key: str) -> str:
        return self._opts.get(key, "optIn")


class VenBridge:
    """OpenADR VEN handlers + event timeline; commands through the injected ``send``.

    ``client_factory`` builds the openleadr client (tests may pass keyword overrides through
    ``client_kwargs``). ``now`` is the wall clock (unix seconds). Secure by default: the VTN
    URL must be https and openleadr's XML signatures stay on (``client_kwargs`` then needs the
    VEN's ``cert`` and ``key``); ``insecure=True`` allows http and turns signatures off.

    ``send_schedule(rows, site, expires_s)`` (optional) delivers the price rows of every live
    ELECTRICITY_PRICE event as one signed schedule (:meth:`SiteSender.schedule`); without it
    price signals are skipped. ``price_unit`` ("kwh" or "mwh"): the unit of a price signal
    that carries no measurement.
    """

    def __init__(self, vtn_url: str, ven_name: str, site: str, send: SendFn, *,
                 levels: LevelMap | None = None, site_kw: float | None = None, expires_s: int = 60,
                 ven_id: str | None = None, on_log: LogFn | None = None, retry_s: float = 5.0,
                 client_kwargs: dict[str, Any] | None = None, now: Callable[[], float] = time.time,
                 insecure: bool = False, send_schedule: ScheduleFn | None = None,
                 price_unit: str = "kwh") -> None:
        if not insecure and not str(vtn_url).startswith("https://"):
            raise UserError(f"VTN {vtn_url!r}: https is required (plain http only with --insecure)")
        self.insecure = insecure
        self.vtn_url = vtn_url
        self.ven_name = ven_name
        self.site = site
        self.send = send
        self.site_kw = site_kw
        self.levels = levels or LevelMap.parse(None, site_kw)
        self.expires_s = int(expires_s)
        self.ven_id = ven_id
        self.on_log = on_log
        self.retry_s = retry_s
        self.now = now
        self.client_kwargs = dict(client_kwargs or {})
        self.plans: dict[str, _Plan] = {}
        self.opts: dict[str, str] = {}       # event id -> the opt we answered
        self.sent: Action | None = None     # last action delivered (None: nothing sent yet)
        self.records: list[dict[str, Any]] = []
        self.client: Any = None
        self._lock: asyncio.Lock | None = None
        self._retry: asyncio.Task | None = None
        if price_unit not in ("kwh", "mwh"):
            raise UserError(f"price unit {price_unit!r}: kwh or mwh")
        self.send_schedule = send_schedule
        self.price_unit = price_unit
        self.prices: dict[str, list[list]] = {}  # event id -> its schedule rows (arrival order)
        self.sched_sent: list[list] | None = None  # the rows last delivered
        self._sched_retry: asyncio.Task | None = None
        self._sched_roll: asyncio.Task | None = None

    # -- log ----------------------------------------------------------------------------------
    def log(self, kind: str, **fields: Any) -> dict[str, Any]:
        rec = {"t": _iso(self.now()), "kind": kind, **fields}
        self.records.append(rec)
        log.info("%s %s", kind, json.dumps(fields, default=str))
        if self.on_log:
            try:
                self.on_log(rec)
            except Exception:  # a broken log sink must not stop the bridge
                log.exception("log sink failed")
        return rec

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Register with the VTN and start polling; UserError if the VTN does not register us."""
        self.client = self.make_client()
        self.log("start", vtn=self.vtn_url, ven_name=self.ven_name, site=self.site,
                 levels=self.levels.describe(), site_kw=self.site_kw, expires_s=self.expires_s)
        await self.client.run()
        if not self.client.registration_id:
            self.log("register-failed", vtn=self.vtn_url)
            raise UserError(f"VTN {self.vtn_url} did not register VEN {self.ven_name!r} "
                            "(wrong URL, VTN down, or the VTN refused this VEN name; see the log)")
        self.log("registered", ven_id=self.client.ven_id, registration_id=self.client.registration_id,
                 poll_s=self.client.poll_frequency.total_seconds() if self.client.poll_frequency else None)

    def make_client(self) -> Any:
        """The openleadr OpenADRClient with this bridge's handlers (call inside the event loop)."""
        from openleadr import OpenADRClient

        self._lock = asyncio.Lock()
        kw = {"show_fingerprint": False, "disable_signature": self.insecure}
        kw.update(self.client_kwargs)
        client = OpenADRClient(ven_name=self.ven_name, vtn_url=self.vtn_url, ven_id=self.ven_id, **kw)
        client.add_handler("on_event", self.on_event)
        client.add_handler("on_update_event", self.on_update_event)
        # openleadr 0.5.36 forgets its answer once an event completes, then raises KeyError (and
        # opts out of the whole message, cancellations and new events included) when a VTN
        # re-sends that event unchanged: answer from our own record instead.
        client.responded_events = _Responded(self.opts)
        return client

    async def stop(self) -> None:
        for p in self.plans.values():
            if p.task:
                p.task.cancel()
        for r in (self._retry, self._sched_retry, self._sched_roll):
            if r:
                r.cancel()
        if self.client is not None and self.client.client_session is not None:
            await self.client.stop()
        self.log("stop", shed_state=self.sent.describe() if self.sent else None)

    # -- openleadr handlers ---------------------------------------------------------------------
    async def on_event(self, event: dict[str, Any]) -> str:
        return self._safe_take(event, update=False)

    async def on_update_event(self, event: dict[str, Any]) -> str:
        return self._safe_take(event, update=True)

    def _safe_take(self, event: dict[str, Any], update: bool) -> str:
        # openleadr opts out of EVERY event of a message when a handler raises: keep it to this one
        try:
            opt = self._take(event, update)
        except Exception as exc:
            eid = str((event.get("event_descriptor") or {}).get("event_id"))
            self.log("error", event_id=eid, error=f"{type(exc).__name__}: {exc}")
            opt = "optOut"
        self.opts[str((event.get("event_descriptor") or {}).get("event_id"))] = opt
        return opt

    def _take(self, event: dict[str, Any], update: bool) -> str:
        desc = event.get("event_descriptor") or {}
        eid = str(desc.get("event_id"))
        status = desc.get("event_status")
        mod = desc.get("modification_number")
        self.log("event-update" if update else "event", event_id=eid, status=status, modification=mod,
                 signals=[(s.get("signal_name"), s.get("signal_type")) for s in (event.get("event_signals") or [])
                          if isinstance(s, dict)],
                 active_period={"start": _iso(_ts(event["active_period"]["dtstart"])),
                                "duration_s": _secs(event["active_period"].get("duration"))}
                 if event.get("active_period") else None)
        old = self.plans.pop(eid, None)
        if old and old.task:
            old.task.cancel()
        had_prices = self.prices.pop(eid, None) is not None
        if status == "cancelled":
            self.log("cancelled", event_id=eid)
            self._kick()
            if had_prices:
                self._kick_schedule()
            return old.opt if old else self.opts.get(eid, "optIn")
        segs, skipped = plan_event(event, self.levels, self.site_kw)
        rows, pskipped = self._price_rows(event)
        for why in skipped + pskipped:
            self.log("signal-skipped", event_id=eid, reason=why)
        if not segs and not rows:
            self.log("opt", event_id=eid, opt="optOut", reason="no signal this bridge can act on")
            if had_prices:
                self._kick_schedule()
            return "optOut"
        test = bool(desc.get("test_event"))
        plan = _Plan(eid, segs, "optIn", test)
        self.log("opt", event_id=eid, opt="optIn", test_event=test,
                 timeline=[{"start": _iso(s.start), "end": _iso(s.end), "action": s.action.describe(),
                            "why": s.why} for s in segs],
                 prices=[{"start": _iso(r[0]), "end": _iso(r[1]), "usd_mwh": r[3]} for r in rows])
        if test:
            self.log("test-event", event_id=eid, note="test event: logged, not acted on")
            return "optIn"
        if segs:
            self.plans[eid] = plan
            plan.task = asyncio.get_running_loop().create_task(self._run_plan(plan))
        if rows:
            self.prices[eid] = rows
        if rows or had_prices:
            self._kick_schedule()
        return "optIn"

    def _price_rows(self, event: dict[str, Any]) -> tuple[list[list], list[str]]:
        rows: list[list] = []
        skipped = []
        for sig in event.get("event_signals") or []:
            if not isinstance(sig, dict) or sig.get("signal_name") != PRICE_SIGNAL:
                continue
            if self.send_schedule is None:
                skipped.append(f"{PRICE_SIGNAL}: no schedule sender (price events go over --via mqtt or serial)")
                continue
            try:
                rows.extend(price_rows(sig, self.price_unit))
            except (ValueError, KeyError, TypeError) as exc:
                skipped.append(str(exc))
        return rows, skipped

    # -- price schedule -------------------------------------------------------------------------
    def schedule_rows(self, t: float) -> list[list]:
        """The rows of every live price event, older events first (a later row wins where rows
        overlap, so a newer event overrides an older one), rows already over at t dropped."""
        return [list(r) for rows in self.prices.values() for r in rows if r[1] > t]

    def _kick_schedule(self) -> None:
        asyncio.get_running_loop().create_task(self.send_prices())

    async def send_prices(self) -> None:
        """Send the site the schedule of all live price events, when it changed."""
        from .dispatch import MAX_INTERVALS

        assert self._lock is not None and self.send_schedule is not None
        async with self._lock:
            rows = self.schedule_rows(self.now())
            if rows == self.sched_sent:
                return
            if len(rows) > MAX_INTERVALS:
                self.log("error", cmd="schedule", error=f"the price events carry {len(rows)} intervals; a board "
                                                        f"holds at most {MAX_INTERVALS}: schedule not sent")
                return
            self.log("send", cmd="schedule", site=self.site, intervals=len(rows), events=sorted(self.prices))
            try:
                result = await asyncio.to_thread(self.send_schedule, rows, self.site, self.expires_s)
            except Exception as exc:
                self.log("send-failed", cmd="schedule", error=f"{type(exc).__name__}: {exc}", retry_s=self.retry_s)
                if self._sched_retry is None or self._sched_retry.done():
                    self._sched_retry = asyncio.get_running_loop().create_task(self._retry_schedule())
                return
            self.sched_sent = rows
            kept = result.get("rows") if isinstance(result, dict) and isinstance(result.get("rows"), int) else len(rows)
            self.log("sent", cmd="schedule", intervals=len(rows), kept=kept, result=result)
            if kept < len(rows):
                # the board got only the head that fits one command: send again when its first row
                # is over (one more row then fits), and so on, until the rest has reached it
                at = min(r[1] for r in rows)
                self.log("roll", cmd="schedule", at=_iso(at), sent=kept, of=len(rows))
                if self._sched_roll is not None:
                    self._sched_roll.cancel()
                self._sched_roll = asyncio.get_running_loop().create_task(self._roll_schedule(at))

    async def _roll_schedule(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))
        await self.send_prices()

    async def _retry_schedule(self) -> None:
        await asyncio.sleep(self.retry_s)
        await self.send_prices()

    # -- timeline -------------------------------------------------------------------------------
    async def _run_plan(self, plan: _Plan) -> None:
        try:
            t0 = self.now()
            await self.reconcile(t0)
            for b in boundaries(plan.segs):
                if b <= t0:
                    continue  # already behind us: the first reconcile covered it
                delay = b - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.reconcile(max(self.now(), b))
            if all(s.end is not None for s in plan.segs):
                self.plans.pop(plan.event_id, None)
                self.log("event-ended", event_id=plan.event_id)
                await self.reconcile(self.now())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let a bug kill the bridge silently
            self.log("error", event_id=plan.event_id, error=f"{type(exc).__name__}: {exc}")

    def desired(self, t: float) -> Action:
        return combine([action_at(p.segs, t) for p in self.plans.values() if not p.test])

    def _kick(self) -> None:
        asyncio.get_running_loop().create_task(self.reconcile(self.now()))

    async def reconcile(self, t: float) -> None:
        """Send whatever brings the site to the combined action of all events at time ``t``."""
        assert self._lock is not None
        async with self._lock:
            want = self.desired(t)
            have = self.sent or RESTORE
            if want == have:
                return
            cmd = "restore" if want.kind == NONE else "shed"
            kw = want.kw if want.kind == KW else None
            self.log("send", cmd=cmd, site=self.site, kw=kw, action=want.describe(),
                     events=sorted(p.event_id for p in self.plans.values() if action_at(p.segs, t).kind != NONE))
            try:
                result = await asyncio.to_thread(self.send, cmd, self.site, kw, self.expires_s)
            except Exception as exc:
                self.log("send-failed", cmd=cmd, kw=kw, error=f"{type(exc).__name__}: {exc}",
                         retry_s=self.retry_s)
                if self._retry is None or self._retry.done():
                    self._retry = asyncio.get_running_loop().create_task(self._retry_later())
                return
            self.sent = want
            self.log("sent", cmd=cmd, kw=kw, result=result)

    async def _retry_later(self) -> None:
        await asyncio.sleep(self.retry_s)
        await self.reconcile(self.now())


# ---- default sender -----------------------------------------------------------------------
class SiteSender:
    """Default ``send``: one signed command per device of the site, over MQTT, UDP or serial.

    Keys and kids come from the inventory, seqs from the shared seq file (never reused), the
    wire work from :mod:`gridshed.fleet_client` (the same code as ``gridshed shed``).
    ``addrs`` maps a device id to its UDP ``HOST[:PORT]`` or serial port; ``""`` is the
    address for any device (a one-device site). For serial the inventory's port is the default.
    ``warn`` gets what the operator should know but does not stop a send (a board that gave no
    nonce); without it, the ``gridshed.openadr`` logger does.
    """

    def __init__(self, inventory: str | Path | None, via: str = "mqtt", broker: str = "127.0.0.1:1883",
                 addrs: dict[str, str] | None = None, seq_path: str | Path | None = None,
                 ack_timeout: float = 10.0, warn: Callable[[str], None] | None = None) -> None:
        from . import fleet_client

        if via not in ("mqtt", "udp", "serial"):
            raise UserError(f"--via {via!r}: use mqtt, udp or serial")
        self.fc = fleet_client
        self.inventory = inventory
        self.via = via
        self.broker = broker
        self.addrs = dict(addrs or {})
        self.seq_path = fleet_client.seq_file(inventory, seq_path)
        self.ack_timeout = ack_timeout
        self.warn = warn

    def targets(self, site: str) -> list[Any]:
        return self.fc.targets(self.inventory, None, site)

    def check(self, site: str) -> list[str]:
        """Fail early (UserError) if the site has no device or a device has no address."""
        tg = self.targets(site)
        for t in tg:
            self._addr(t)
        return [t.device for t in tg]

    def _addr(self, t: Any) -> str:
        if self.via == "mqtt":
            return self.broker
        a = self.addrs.get(t.device) or self.addrs.get("")
        if not a and self.via == "serial":
            from .inventory import Inventory

            with Inventory(self.inventory) as inv:
                a = (inv.get(t.device) or {}).get("port") or ""
        if not a:
            raise UserError(f"device {t.device!r}: no {self.via} address (give --addr {t.device}="
                            f"{'HOST:PORT' if self.via == 'udp' else '/dev/ttyUSB0'})")
        return a

    def sign(self, cmd: str, site: str, kw: float | None, expires_s: int) -> list[Any]:
        """Signed commands (fleet_client.Signed), one per device, each with a fresh seq, all with
        the issuer label ``openadr``: on the board the bridge's sheds are an entry of their own,
        and its restores release only them (never the utility's Modbus shed or dry contact).
        A restore carries each board's current nonce when the board gives one (freshness before
        it trusts its clock); a board that gives none gets it without (accepted once its clock
        is trusted)."""
        tg = self.targets(site)
        nonces = self._nonces(tg) if cmd in self.fc.FRESH else None
        return self.fc.sign(tg, cmd, self.seq_path, expires_s=expires_s, kw=kw, iss=ISSUER, nonces=nonces)

    def _nonces(self, tg: list[Any]) -> dict[str, bytes]:
        t = min(self.ack_timeout, 5.0)
        if self.via == "mqtt":
            return self.fc.nonces_mqtt(self.broker, tg, timeout=t, strict=False)
        out = {}
        for x in tg:
            try:
                if self.via == "udp":
                    host, port = self.fc.parse_hostport(self._addr(x), self.fc.UDP_PORT)
                    out[x.device] = self.fc.nonce_udp(host, port, timeout=t)
                else:
                    out[x.device] = self.fc.nonce_serial(self._addr(x), timeout=t)
            except UserError as exc:
                msg = f"{x.device}: no nonce ({exc}): restore sent without one"
                if self.warn:
                    self.warn(msg)
                else:
                    log.warning("%s", msg)
        return out

    def deliver(self, signed: list[Any]) -> list[dict[str, Any]]:
        if self.via == "mqtt":
            answers = self.fc.send_mqtt(self.broker, signed, timeout=self.ack_timeout,
                                        settle=min(1.5, self.ack_timeout))
        else:
            answers = []
            for s in signed:
                addr = self._addr(s.target)
                try:
                    if self.via == "udp":
                        host, port = self.fc.parse_hostport(addr, self.fc.UDP_PORT)
                        answers.append(self.fc.send_udp(host, port, s.msg, timeout=self.ack_timeout))
                    else:
                        answers.append(self.fc.send_serial(addr, s.msg, timeout=self.ack_timeout))
                except UserError as exc:
                    answers.append({"ok": False, "error": str(exc)})
        out: list[dict[str, Any]] = []
        for s, a in zip(signed, answers):
            row: dict[str, Any] = {"device": s.target.device, "seq": s.seq, "exp": s.exp, "ok": bool(a.get("ok"))}
            row.update({k: a[k] for k in ("refused", "error") if k in a})
            out.append(row)
        return out

    def __call__(self, cmd: str, target_site: str, kw: float | None, expires_s: int) -> list[dict[str, Any]]:
        return self.deliver(self.sign(cmd, target_site, kw, expires_s))

    def schedule(self, rows: list[list], target_site: str, expires_s: int) -> list[dict[str, Any]]:
        """The price rows as one signed schedule per device of the site (gridshed.dispatch: its
        key, a fresh seq, its next schedule id from the inventory), delivered like a command.
        An empty list clears the boards' schedules (the price events were cancelled). Rows beyond
        what one command carries are cut (the head that fits is sent, a warning says so); the
        answer {"rows": rows sent, "boards": per-device results} tells the bridge to send again
        when the first row is over."""
        from . import dispatch

        if self.via == "udp":
            raise UserError("a schedule does not fit a UDP datagram: use --via mqtt or serial")
        tg = self.targets(target_site)

        def trial(rs: list[list]) -> list[Any]:
            return dispatch.sign(tg, rs, self.seq_path, self.inventory, expires_s, reserve_ids=False)

        if rows and not dispatch.fits(trial(rows), self.via):
            kept = dispatch.fit_rows(rows, lambda rs: dispatch.fits(trial(rs), self.via))
            msg = (f"the price schedule has {len(rows)} intervals; {len(kept)} fit the board's {self.via} "
                   f"transport: sending those (they reach {_iso(max(r[1] for r in kept)) if kept else 'nothing'})")
            if self.warn:
                self.warn(msg)
            else:
                log.warning("%s", msg)
            rows = kept
        nonces = self._nonces(tg) if dispatch.fresh_needed() else None
        boards = self.deliver(dispatch.sign(tg, rows, self.seq_path, self.inventory, expires_s,  # type: ignore[arg-type]
                                            nonces=nonces))
        return {"rows": len(rows), "boards": boards}
