"""Scenario CSV: `t_s,hz` plus optional `meter_ok`, `signal`, `kw_base`, `price`.

Rows may come at any time step; hz and kw_base are linear in between, meter_ok and signal are
steps (they hold their last value until the next row), as a switch would; so is `price`
($/MWh), which a site with [market] receives as a signed schedule (docs/market.md). `hz` may be 0 (what
real meters report when they lose their voltage reference) or `nan` (a meter that answers
Not-a-Number); next to a `nan` row the value steps instead of interpolating. A UTF-8 byte-order
mark (spreadsheet exports) is accepted.
"""
from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

REQUIRED = ("t_s", "hz")
OPTIONAL = ("meter_ok", "signal", "kw_base", "price")  # price: $/MWh, a step (docs/market.md)
LINEAR = ("hz", "kw_base")


@dataclass
class Scenario:
    name: str
    t: list[float]
    cols: dict[str, list[float]] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.t[-1]

    def has(self, col: str) -> bool:
        return col in self.cols

    def value(self, col: str, t: float, default: float = 0.0) -> float:
        if col not in self.cols:
            return default
        ys = self.cols[col]
        ts = self.t
        if t <= ts[0]:
            return ys[0]
        if t >= ts[-1]:
            return ys[-1]
        i = bisect.bisect_right(ts, t) - 1
        if col not in LINEAR or ys[i] != ys[i] or ys[i + 1] != ys[i + 1]:
            return ys[i]  # a step (NaN is never interpolated)
        t0, t1 = ts[i], ts[i + 1]
        if t1 == t0:
            return ys[i + 1]
        return ys[i] + (ys[i + 1] - ys[i]) * (t - t0) / (t1 - t0)

    def first_below(self, threshold: float, after: float = 0.0) -> float | None:
        """Exact time the linear hz trace first goes below threshold at or after `after`."""
        ts, ys = self.t, self.cols["hz"]
        for i in range(len(ts)):
            if ts[i] < after:
                continue
            if ys[i] == ys[i] and ys[i] < threshold:
                if i == 0 or ts[i - 1] < after:
                    return ts[i]
                y0, y1 = ys[i - 1], ys[i]
                return ts[i - 1] + (ts[i] - ts[i - 1]) * (y0 - threshold) / (y0 - y1)
        return None

    def crossings_below(self, threshold: float) -> list[float]:
        """Every downward crossing of the threshold (start of each excursion)."""
        out: list[float] = []
        t = 0.0
        while True:
            c = self.first_below(threshold, t)
            if c is None:
                return out
            out.append(c)
            # skip to where it is back above
            ts, ys = self.t, self.cols["hz"]
            nxt = [ts[i] for i in range(len(ts)) if ts[i] > c and not ys[i] < threshold]
            if not nxt:
                return out
            t = nxt[0]


def load_scenario(path: str | Path) -> Scenario:
    from ..datafiles import shipped

    p = shipped(path, "scenarios")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a BOM (spreadsheet export) is not part of the header
    except OSError as exc:
        raise UserError(f"cannot read scenario {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a UTF-8 text file (a scenario is a CSV: t_s,hz,...)") from None
    rows = list(csv.reader(line for line in text.splitlines() if line.strip() and not line.startswith("#")))
    if not rows:
        raise UserError(f"{p}: empty scenario (header t_s,hz expected)")
    header = [h.strip() for h in rows[0]]
    for need in REQUIRED:
        if need not in header:
            raise UserError(f"{p}: header must contain {need!r} (got {','.join(header)})")
    for h in header:
        if h not in REQUIRED + OPTIONAL:
            raise UserError(f"{p}: unknown column {h!r} (allowed: {', '.join(REQUIRED + OPTIONAL)})")
    if len(set(header)) != len(header):
        raise UserError(f"{p}: duplicate column in header")
    t: list[float] = []
    cols: dict[str, list[float]] = {h: [] for h in header if h != "t_s"}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise UserError(f"{p}:{n}: expected {len(header)} values, got {len(row)}")
        try:
            vals = [float(v) for v in row]
        except ValueError:
            raise UserError(f"{p}:{n}: not a number in {row!r}") from None
        rec = dict(zip(header, vals))
        if t and rec["t_s"] < t[-1]:
            raise UserError(f"{p}:{n}: t_s goes backwards ({rec['t_s']} after {t[-1]})")
        for h, v in rec.items():
            if v != v and h != "hz":
                raise UserError(f"{p}:{n}: {h} is nan (only hz may be nan: a meter answering Not-a-Number)")
            if v in (float("inf"), float("-inf")):
                raise UserError(f"{p}:{n}: {h} is infinite")
        if not (0 <= rec["hz"] < 100) and rec["hz"] == rec["hz"]:
            raise UserError(f"{p}:{n}: hz {rec['hz']} is not a grid frequency (0..100; 0 = the meter "
                            f"lost its voltage reference, nan = it answers Not-a-Number)")
        t.append(rec["t_s"])
        for h in cols:
            cols[h].append(rec[h])
    if len(t) < 2:
        raise UserError(f"{p}: need at least two rows")
    return Scenario(p.stem, t, cols)


def nominal_of(sc: Scenario) -> int | None:
    """The grid the scenario plays (50 or 60 Hz), from its first plausible frequency; None if none."""
    for v in sc.cols["hz"]:
        if v == v and 40 <= v <= 70:
            return 50 if abs(v - 50) < abs(v - 60) else 60
    return None
