"""Identify an unknown meter: read every library map's registers and score what decodes plausibly.

A technician at a site with an unlabeled (or mislabeled) meter points `gridshed meter probe` at
the RS-485 adapter (or a Modbus TCP gateway). For each baud rate and unit id, every map in
meters/ is tried: its `identify` register when it has one (decisive either way), then all its
quantities read with the map's own function code and read plan, decoded by the firmware's own
decoder (agent.meter). Plausible values score points (Hz in 45..65, near 50/60, voltages of a
real grid, kW that is the sum of the phase kW ...); a map whose Hz is implausible is out. Maps
with the very same registers for what was read (SDM630 and SDM72, for instance) cannot be told
apart by registers: the probe says so and prefers the better-sourced map.

Reads are cached per (unit, function, address, count), so maps sharing registers cost one read.
"""
from __future__ import annotations

import logging
import math
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

from agent.meter_encode import MeterMap

from .errors import UserError
from .meters import list_meters, load_meter

CONFIDENCE_RANK = {"reference": 0, "manual": 1, "community": 2}
HZ_RANGE = (45.0, 65.0)
VOLT_RANGE = (80.0, 500.0)
KW_MAX = 1.0e5          # 100 MW: more than any single site meter
AMP_MAX = 1.0e4
SILENT_AFTER = 3        # distinct reads with no answer at all: nobody at this unit id

NO_ANSWER = None        # read() result: timeout / no reply


class Reader(Protocol):
    """read(fn, addr, count) -> list of u16 | int exception code | None (no answer)."""

    def read(self, fn: int, addr: int, count: int) -> list[int] | int | None: ...


@dataclass
class Candidate:
    model: str
    title: str
    confidence: str
    resolution_hz: float | None
    score: int = 0
    plausible: bool = False
    identified: bool | None = None   # identify register matched / contradicted / not available
    values: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    word_order: str | None = None    # "as mapped", "swapped" (the other word order reads a frequency), or None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["values"] = {k: round(v, 4) for k, v in self.values.items()}
        return d


class CachedReader:
    """Caches answers; counts how many distinct reads got no answer at all (and how many did)."""

    def __init__(self, raw: Callable[[int, int, int], list[int] | int | None]) -> None:
        self.raw = raw
        self.cache: dict[tuple[int, int, int], list[int] | int | None] = {}
        self.silent = 0
        self.answered = 0

    def read(self, fn: int, addr: int, count: int) -> list[int] | int | None:
        key = (fn, addr, count)
        if key not in self.cache:
            r = self.raw(fn, addr, count)
            self.cache[key] = r
            if r is None:
                self.silent += 1
            else:
                self.answered += 1
        return self.cache[key]

    @property
    def dead(self) -> bool:
        return self.answered == 0 and self.silent >= SILENT_AFTER


def _words_value(words: list[int], typ: str, little: bool) -> int:
    if typ in ("u16", "s16"):
        v = words[0]
        return v - 0x10000 if typ == "s16" and v & 0x8000 else v
    hi, lo = (words[1], words[0]) if little else (words[0], words[1])
    v = hi << 16 | lo
    return v - (1 << 32) if typ == "s32" and v & 0x80000000 else v


def check_identify(m: dict[str, Any], reader: Reader) -> tuple[bool | None, str]:
    ident = m.get("identify")
    if not isinstance(ident, dict):
        return None, ""
    typ = ident.get("type", "u16")
    n = 1 if typ in ("u16", "s16") else 2
    r = reader.read(int(ident.get("function", m["function"])), int(ident["addr"]), n)
    if r is None:
        return None, "model register: no answer"
    if isinstance(r, int):
        return False, f"model register {ident['addr']}: exception {r} (not this model)"
    v = _words_value(list(r), typ, ident.get("words") == "little")
    if v in ident.get("expect", []):
        return True, f"model register {ident['addr']} = {v}: matches"
    return False, f"model register {ident['addr']} = {v}: not one of {ident.get('expect')}"


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) or isinstance(x, int)


def evaluate(m: dict[str, Any], reader: Reader) -> Candidate:
    """Score one meter map against what the device answers."""
    c = Candidate(m["model"], m.get("title", m["model"]), m.get("confidence", "unknown"), m.get("resolution_hz"))
    ident, why = check_identify(m, reader)
    c.identified = ident
    if why:
        c.reasons.append(why)
    if ident is False:
        c.score = -100
        return c
    mm = MeterMap(m)
    regs: dict[int, int] = {}
    for start, count in mm.full_plan:
        r = reader.read(mm.function, start, count)
        if r is None:
            c.reasons.append(f"fn {mm.function} @{start}+{count}: no answer")
        elif isinstance(r, int):
            c.reasons.append(f"fn {mm.function} @{start}+{count}: exception {r}")
        else:
            for i, w in enumerate(r):
                regs[start + i] = w
    for name in mm.names:
        a, n = mm.span(name)
        if all(a + i in regs for i in range(n)):
            raw = struct.pack(">%dH" % n, *(regs[a + i] for i in range(n)))
            c.values[name] = mm.decode(name, raw, a)
    hz = c.values.get("hz")
    if hz is None:
        c.reasons.append("Hz register not readable")
        c.score += -50
        return c
    order = mm.words("hz")
    if not (_finite(hz) and HZ_RANGE[0] <= hz <= HZ_RANGE[1]):
        alt = mm.swapped("hz")  # the same registers with the other word order
        if alt is not None and _finite(alt) and HZ_RANGE[0] <= alt <= HZ_RANGE[1]:
            other = "little" if order == "big" else "big"
            tiny = " (a denormal: the classic sign)" if _finite(hz) and 0 < abs(hz) < 1.2e-38 else ""
            c.word_order = "swapped"
            c.reasons.append(f"Hz decodes to {hz:.3g}{tiny}, but to {alt:.3f} with the words swapped: the meter "
                             f"sends the {other} word first, the map says {order} (set the meter's word order, "
                             f"or use a map with words = \"{other}\")")
        else:
            c.reasons.append(f"Hz decodes to {hz!r}: not a grid frequency")
        c.score += -50
        return c
    if mm.swapped("hz") is not None:
        c.word_order = "as mapped"
    score = 40
    if min(abs(hz - 50), abs(hz - 60)) <= 2:
        score += 10
    kw = c.values.get("kw")
    if kw is None or not _finite(kw) or abs(kw) > KW_MAX:
        c.reasons.append(f"kW decodes to {kw!r}: implausible")
        score -= 30
    else:
        score += 10
    for v in ("v1", "v2", "v3"):
        x = c.values.get(v)
        if x is None:
            continue
        if _finite(x) and VOLT_RANGE[0] <= x <= VOLT_RANGE[1]:
            score += 10
        elif x != 0:
            c.reasons.append(f"{v} decodes to {x:.4g} V: implausible")
            score -= 20
    for name in ("i1", "i2", "i3"):
        x = c.values.get(name)
        if x is None:
            continue
        if _finite(x) and abs(x) <= AMP_MAX:
            score += 2
        else:
            score -= 10
    phases = [c.values.get(k) for k in ("kw1", "kw2", "kw3")]
    if kw is not None and _finite(kw) and all(p is not None and _finite(p) for p in phases):
        total = sum(p for p in phases if p is not None)
        if abs(kw) > 0.5 and abs(total - kw) <= max(0.05 * abs(kw), 0.5):
            score += 15
            c.reasons.append("kW = kW1 + kW2 + kW3")
    if ident:
        score += 100
    c.score = score
    c.plausible = True
    return c


def rank(cands: list[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: (-int(c.plausible), -c.score, CONFIDENCE_RANK.get(c.confidence, 9), c.model))


def verdict(cands: list[Candidate]) -> dict[str, Any]:
    """The suggestion: best plausible map, and the maps that read the same (indistinguishable)."""
    ranked = rank(cands)
    best = ranked[0] if ranked and ranked[0].plausible else None
    same: list[str] = []
    if best is not None:
        for c in ranked[1:]:
            if c.plausible and c.score == best.score and c.values == best.values:
                same.append(c.model)
    return {"suggested": best.model if best else None, "indistinguishable": same,
            "candidates": [c.to_json() for c in ranked]}


def probe_reader(reader: Reader, maps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Evaluate every map through one reader (one unit id); None when nothing answers there."""
    cands = []
    for m in maps:
        cands.append(evaluate(m, reader))
        if isinstance(reader, CachedReader) and reader.dead:
            return None
    if isinstance(reader, CachedReader) and reader.answered == 0:
        return None
    return verdict(cands)


def parse_units(text: str) -> list[int]:
    """'1', '1,3,5', '1..5' or '1-5' (and mixes) -> unit ids 1..247."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        sep = ".." if ".." in part else ("-" if "-" in part[1:] else None)
        try:
            if sep:
                lo, hi = (int(x) for x in part.split(sep, 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(f"--unit {text!r}: use numbers like 1, 1,2,3 or 1..5") from None
    if not out or any(not 1 <= u <= 247 for u in out):
        raise UserError(f"--unit {text!r}: unit ids are 1..247")
    return list(dict.fromkeys(out))


def parse_bauds(text: str) -> list[int]:
    try:
        bauds = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--baud {text!r}: use numbers like 9600 or 9600,19200") from None
    if not bauds or any(b < 300 or b > 921600 for b in bauds):
        raise UserError(f"--baud {text!r}: baud rates are 300..921600")
    return bauds


def load_maps(models: list[str] | None = None) -> list[dict[str, Any]]:
    return [load_meter(name) for name in (models or list_meters())]


def _pymodbus_reader(client: Any, unit: int) -> Callable[[int, int, int], list[int] | int | None]:
    from pymodbus.exceptions import ModbusException as PmException
    from pymodbus.pdu import ExceptionResponse

    def raw(fn: int, addr: int, count: int) -> list[int] | int | None:
        f = client.read_holding_registers if fn == 3 else client.read_input_registers
        try:
            rr = f(addr, count=count, device_id=unit)
        except PmException:
            client.close()  # a timed-out transaction can leave the client disconnected
            client.connect()
            return None
        if isinstance(rr, ExceptionResponse):
            code = int(rr.exception_code)
            # 10/11: a gateway saying nobody answers at this unit id, which is what we want to know
            return None if code in (10, 11) else code
        if rr.isError():
            return None
        return list(rr.registers)

    return raw


def probe(*, port: str | None = None, tcp: str | None = None, bauds: list[int] | None = None,
          units: list[int] | None = None, parity: str = "N", timeout: float = 0.5,
          models: list[str] | None = None, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Scan (baud x unit) on a serial port, or units on a Modbus TCP host; returns the findings."""
    from pymodbus.client import ModbusSerialClient, ModbusTcpClient

    maps = load_maps(models)
    units = units or [1]
    say = on_progress or (lambda s: None)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    found: list[dict[str, Any]] = []
    if (port is None) == (tcp is None):
        raise UserError("give either --port DEVICE (RS-485 adapter) or --tcp HOST:PORT")
    if tcp is not None:
        host, _, p = tcp.rpartition(":") if ":" in tcp else (tcp, "", "502")
        try:
            tport = int(p)
        except ValueError:
            raise UserError(f"--tcp {tcp!r}: use HOST:PORT") from None
        client = ModbusTcpClient(host or tcp, port=tport, timeout=timeout, retries=0)
        if not client.connect():
            raise UserError(f"cannot connect to Modbus TCP {host}:{tport}")
        try:
            for u in units:
                say(f"unit {u}: trying {len(maps)} meter maps")
                res = probe_reader(CachedReader(_pymodbus_reader(client, u)), maps)
                if res is not None:
                    found.append({"unit": u, "transport": "tcp", "address": f"{host}:{tport}", **res})
        finally:
            client.close()
        return {"transport": "tcp", "address": f"{host}:{tport}", "units": units, "found": found}
    bauds = bauds or [9600, 19200]
    done: set[int] = set()
    assert port is not None
    for b in bauds:
        sclient = ModbusSerialClient(port, baudrate=b, parity=parity, timeout=timeout, retries=0)
        try:
            if not sclient.connect():
                raise UserError(f"cannot open serial port {port} (is the adapter plugged in? permissions?)")
            for u in units:
                if u in done:
                    continue
                say(f"{b} baud, unit {u}: trying {len(maps)} meter maps")
                res = probe_reader(CachedReader(_pymodbus_reader(sclient, u)), maps)
                if res is not None:
                    done.add(u)
                    found.append({"unit": u, "transport": "rtu", "baud": b, "parity": parity, **res})
        finally:
            sclient.close()
    return {"transport": "rtu", "address": port, "bauds": bauds, "units": units, "found": found}


def library() -> list[dict[str, Any]]:
    """The meter library as rows: model, title, confidence, Hz resolution, function, identify."""
    rows = []
    for m in load_maps():
        rows.append({"model": m["model"], "title": m.get("title", ""), "confidence": m.get("confidence", ""),
                     "resolution_hz": m.get("resolution_hz"), "function": m["function"],
                     "identify": "identify" in m, "source": m.get("source", "")})
    return rows
