"""Price series: the CSV every market command reads, and the optional live source (gridstatus).

CSV (what `gridshed dispatch` and `gridshed backtest` read, what `gridshed prices` writes):

    interval_start,price_usd_mwh
    2026-07-01T00:00:00-05:00,23.10
    2026-07-01T00:15:00-05:00,-4.50

* ``interval_start`` is ISO 8601 with a UTC offset (``Z`` or ``+hh:mm``); a time without an
  offset is refused (a price series must never depend on the host's time zone).
* Rows in time order. The interval length comes from the data: the most common step between
  two starts; a longer step is a gap (no price there), a shorter one an error. A series needs
  two rows at least.
* A missing or non-finite price is an error naming the line.

The same reader takes the forecast CSV of the 4CP predictor (``value_col="forecast_mw"``).

Live prices (:func:`fetch_live`): ERCOT and CAISO through the ``gridstatus`` package, imported
only when asked; without it, one UserError saying ``pip install 'gridshed[live]'``.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import UserError

TIME_COL = "interval_start"
PRICE_COL = "price_usd_mwh"
MAX_ROWS = 1_000_000


@dataclass(frozen=True)
class Interval:
    start: int    # unix seconds
    end: int      # unix seconds (exclusive)
    value: float  # $/MWh for a price series, MW for a forecast


def parse_time(text: str, where: str = "") -> int:
    """ISO 8601 with a UTC offset -> unix seconds (UserError naming `where` otherwise)."""
    s = str(text).strip()
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UserError(f"{where}bad time {s!r}: use ISO 8601 with an offset, e.g. 2026-07-01T15:00:00-05:00") from None
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise UserError(f"{where}time {s!r} has no UTC offset (write e.g. 2026-07-01T15:00:00-05:00 or ...Z)")
    return int(dt.timestamp())


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_rows(rows: list[tuple[int, float]], source: str) -> list[Interval]:
    """(start unix, value) pairs in time order -> Intervals of the data's interval length (the
    most common step between starts; a longer step is a gap, a shorter one an error)."""
    from collections import Counter

    if len(rows) < 2:
        raise UserError(f"{source}: need at least two rows (the interval length comes from the data)")
    for (a, _), (b, _) in zip(rows, rows[1:]):
        if b <= a:
            raise UserError(f"{source}: {iso(b)} is not after the row before (rows must be in time order)")
    steps = Counter(b[0] - a[0] for a, b in zip(rows, rows[1:]))
    step = max(steps.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    short = [b[0] - a[0] for a, b in zip(rows, rows[1:]) if b[0] - a[0] < step]
    if short:
        raise UserError(f"{source}: irregular intervals: a {short[0]} s step where the data's interval is {step} s")
    return [Interval(t, t + step, v) for t, v in rows]


def read_series(path: str | Path, value_col: str = PRICE_COL) -> list[Interval]:
    """A CSV with ``interval_start`` and ``value_col`` -> sorted Intervals (UserError naming the line)."""
    p = Path(path)
    try:
        f = p.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"cannot read {p}: {exc.strerror or exc}") from None
    rows: list[tuple[int, float]] = []
    with f:
        try:
            rd = csv.DictReader(f)
            cols = [c.strip() for c in (rd.fieldnames or [])]
            if TIME_COL not in cols or value_col not in cols:
                raise UserError(f"{p}: needs columns {TIME_COL},{value_col} (has {','.join(cols) or 'none'})")
            rd.fieldnames = cols
            for rec in rd:
                where = f"{p}:{rd.line_num}: "
                if len(rows) >= MAX_ROWS:
                    raise UserError(f"{p}: more than {MAX_ROWS} rows")
                t = parse_time(rec.get(TIME_COL) or "", where)
                raw = (rec.get(value_col) or "").strip()
                try:
                    v = float(raw)
                except ValueError:
                    raise UserError(f"{where}{value_col} {raw!r} is not a number") from None
                if not math.isfinite(v):
                    raise UserError(f"{where}{value_col} {raw!r} is not a finite number")
                rows.append((t, v))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UserError(f"{p}: not a readable CSV: {exc}") from None
    return from_rows(rows, str(p))


def write_series(path: str | Path | None, series: list[Interval], value_col: str = PRICE_COL) -> str:
    """The CSV text (written to `path` when given); times in UTC (``Z``)."""
    lines = [f"{TIME_COL},{value_col}"] + [f"{iso(iv.start)},{iv.value:.2f}" for iv in series]
    text = "\n".join(lines) + "\n"
    if path is not None:
        try:
            Path(path).write_text(text)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return text


# ---- live prices through gridstatus --------------------------------------------------------
ISOS = ("ERCOT", "CAISO")
INSTALL = "pip install 'gridshed[live]'   (or: pip install gridstatus)"
# the price column gridstatus gives an LMP / SPP frame, by the time column it starts intervals with
_TIME_COLS = ("Interval Start", "Time")
_PRICE_COLS = ("SPP", "LMP")


def gridstatus_module() -> Any:
    """The gridstatus package, imported now; UserError with the install line when it is missing."""
    try:
        import gridstatus  # type: ignore[import-not-found]
    except ImportError:
        raise UserError(f"live prices need the gridstatus package: {INSTALL}") from None
    return gridstatus


def normalise(frame: Any, location: str, source: str) -> list[Interval]:
    """A gridstatus price frame (pandas DataFrame: "Interval Start", "Location", "SPP" or "LMP")
    -> Intervals for one location (settlement point / node)."""
    cols = list(frame.columns)
    tcol = next((c for c in _TIME_COLS if c in cols), None)
    pcol = next((c for c in _PRICE_COLS if c in cols), None)
    if tcol is None or pcol is None or "Location" not in cols:
        raise UserError(f"{source}: unexpected columns {cols} (gridstatus changed its format?)")
    sel = frame[frame["Location"] == location]
    if len(sel) == 0:
        have = sorted(set(frame["Location"]))[:8]
        raise UserError(f"{source}: no prices for location {location!r} (some there: {', '.join(map(str, have))})")
    rows = []
    for t, v in zip(sel[tcol], sel[pcol]):
        ts = t.to_pydatetime() if hasattr(t, "to_pydatetime") else t
        if not isinstance(ts, datetime) or ts.tzinfo is None:
            raise UserError(f"{source}: interval start {t!r} has no time zone")
        v = float(v)
        if math.isfinite(v):
            rows.append((int(ts.timestamp()), v))
    return from_rows(sorted(rows), source)


DEFAULT_LOCATION = {"ERCOT": "HB_NORTH", "CAISO": "TH_NP15_GEN-APND"}


def fetch_live(iso_name: str, market: str = "real-time", location: str | None = None,
               date: str = "today") -> list[Interval]:
    """Prices from the ISO's public site through gridstatus (needs the network)."""
    iso_name = iso_name.upper()
    if iso_name not in ISOS:
        raise UserError(f"--iso {iso_name}: one of {', '.join(ISOS)}")
    gs = gridstatus_module()
    loc = location or DEFAULT_LOCATION[iso_name]
    src = f"gridstatus {iso_name} {market} {date}"
    try:
        if iso_name == "ERCOT":
            m = gs.Markets.REAL_TIME_15_MIN if market == "real-time" else gs.Markets.DAY_AHEAD_HOURLY
            frame = gs.Ercot().get_spp(date=date, market=m, location_type="Trading Hub" if loc.startswith("HB_") else "Load Zone")
        else:
            m = gs.Markets.REAL_TIME_15_MIN if market == "real-time" else gs.Markets.DAY_AHEAD_HOURLY
            frame = gs.CAISO().get_lmp(date=date, market=m, locations=[loc])
    except UserError:
        raise
    except Exception as exc:  # network, the ISO's site, gridstatus itself: one line for the user
        raise UserError(f"{src}: {type(exc).__name__}: {exc}") from None
    return normalise(frame, loc, src)
