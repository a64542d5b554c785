"""ERCOT 4CP peak-window predictor: a load forecast -> kW-target windows for the schedule.

ERCOT charges transmission by a site's load in the four coincident peaks (the 15-minute
interval of ERCOT's highest load in each of June..September); a site off during those four
intervals saves that charge for a year. The predictor flags the forecast intervals that

* fall in one of ``months`` (1..12) and, in local time (``tz``), in one of ``hours`` (0..23,
  hour beginning), and
* have a forecast load at or above ``threshold_mw``,

widens each by ``pad_min`` minutes on both sides (a peak forecast is rarely exact to the
interval), merges what touches, and gives each window the kW to curtail (``shed_kw``: a number,
or ``"all"``, the default: every block's kW in the site file, so the board sheds everything it
may shed economically; firm blocks, a heat minimum and a frequency obligation still hold).
Those become ``"kw"`` rows of a schedule, placed after the price rows, so they win where they
overlap (docs/market.md).

Config (TOML), e.g. scenarios/ercot-4cp.toml:

    months = [6, 7, 8, 9]
    hours = [15, 16, 17, 18]
    tz = "America/Chicago"
    threshold_mw = 78000
    pad_min = 15
    shed_kw = "all"
    forecast = "ercot_forecast.csv"   # optional: columns interval_start, forecast_mw

A relative ``forecast`` path is read beside the config file.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import UserError
from .prices import Interval, iso, read_series

KEYS = {"months", "hours", "tz", "threshold_mw", "pad_min", "shed_kw", "forecast"}
FORECAST_COL = "forecast_mw"


@dataclass
class Config:
    months: list[int]
    hours: list[int]
    tz: str
    threshold_mw: float
    pad_min: float = 0.0
    shed_kw: float | None = None   # None: "all" (the site's total block kW, known with a site file)
    forecast: Path | None = None


def _ints(name: str, v: Any, lo: int, hi: int, src: str) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi
                                                   for x in v):
        raise UserError(f"{src}: {name} must be a list of integers {lo}..{hi}, got {v!r}")
    return sorted(set(v))


def _num(name: str, v: Any, src: str, lo: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
        raise UserError(f"{src}: {name} must be a number >= {lo:g}, got {v!r}")
    return float(v)


def parse_config(d: dict[str, Any], src: str = "4cp config", base: Path | None = None) -> Config:
    unknown = sorted(set(d) - KEYS)
    if unknown:
        raise UserError(f"{src}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    for k in ("months", "hours", "threshold_mw"):
        if k not in d:
            raise UserError(f"{src}: {k} missing")
    tz = d.get("tz", "America/Chicago")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(str(tz))
    except Exception:
        raise UserError(f"{src}: tz {tz!r} is not a known time zone (e.g. America/Chicago)") from None
    fc = d.get("forecast")
    if fc is not None and not isinstance(fc, str):
        raise UserError(f"{src}: forecast must be a file name")
    fpath = None
    if fc:
        fpath = Path(fc)
        if not fpath.is_absolute() and base is not None:
            fpath = base / fpath
    shed = d.get("shed_kw", "all")
    return Config(_ints("months", d["months"], 1, 12, src), _ints("hours", d["hours"], 0, 23, src), str(tz),
                  _num("threshold_mw", d["threshold_mw"], src), _num("pad_min", d.get("pad_min", 0), src),
                  None if shed == "all" else _num("shed_kw (a number or \"all\")", shed, src), fpath)


def site_kw(site: dict[str, Any]) -> float:
    """Every block's kW in a site.toml (miners x kw_per_miner): "all" for shed_kw."""
    total = 0.0
    for b in site.get("blocks") or []:
        if isinstance(b, dict):
            m, k = b.get("miners") or 0, b.get("kw_per_miner") or 0
            if isinstance(m, (int, float)) and isinstance(k, (int, float)):
                total += float(m) * float(k)
    return math.ceil(total)


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text())
    except OSError as exc:
        raise UserError(f"cannot read {p}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(d, str(p), p.parent)


def predict(cfg: Config, forecast: list[Interval]) -> list[dict[str, Any]]:
    """The predicted peak windows: [{"start", "end" (unix), "peak_mw", "intervals"}], merged."""
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(cfg.tz)
    pad = int(round(cfg.pad_min * 60))
    hits = []
    for iv in forecast:
        local = datetime.fromtimestamp(iv.start, timezone.utc).astimezone(tz)
        if local.month in cfg.months and local.hour in cfg.hours and iv.value >= cfg.threshold_mw:
            hits.append(iv)
    windows: list[dict[str, Any]] = []
    for iv in hits:
        s, e = iv.start - pad, iv.end + pad
        if windows and s <= windows[-1]["end"]:
            w = windows[-1]
            w["end"] = max(w["end"], e)
            w["peak_mw"] = max(w["peak_mw"], iv.value)
            w["intervals"] += 1
        else:
            windows.append({"start": s, "end": e, "peak_mw": iv.value, "intervals": 1})
    return windows


def read_forecast(cfg: Config, override: str | Path | None = None) -> list[Interval]:
    path = Path(override) if override else cfg.forecast
    if path is None:
        raise UserError("no load forecast: give --forecast FILE.csv (columns interval_start, forecast_mw) "
                        "or forecast = \"...\" in the 4CP config")
    return read_series(path, FORECAST_COL)


def windows_json(windows: list[dict[str, Any]], shed_kw: float | None, tz: str = "UTC") -> list[dict[str, Any]]:
    from zoneinfo import ZoneInfo

    z = ZoneInfo(tz)

    def local(t: int) -> str:
        return datetime.fromtimestamp(t, timezone.utc).astimezone(z).isoformat()

    return [{"start": iso(w["start"]), "end": iso(w["end"]), "start_local": local(w["start"]),
             "end_local": local(w["end"]), "start_unix": w["start"], "end_unix": w["end"],
             "peak_forecast_mw": w["peak_mw"], "forecast_intervals": w["intervals"],
             "shed_kw": "all" if shed_kw is None else shed_kw} for w in windows]
