"""`gridshed backtest`: a price history through the board's own decision code (agent.market).

The price CSV has a header with `interval_start` (ISO 8601 with a UTC offset) and
`price_usd_mwh`; other columns are ignored. The interval length comes from the data: the most
common step between consecutive starts; a longer step is a gap (no price, no load counted), a
shorter one is refused. Each interval is run through agent.market.Market.decide(), the function
the board runs every decision, with the site's strikes, min run/off times, cycle caps, ramp and
obligation; between interval starts the simulation also stops at every time a hold ends
(Market.wake), so min times land on the second, as on the board. Always on = every block on.
"""
from __future__ import annotations

import csv
import io
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from agent import market as M

from .errors import UserError


def load_prices(path: str | Path) -> dict[str, Any]:
    """{"t": [unix starts], "p": [$/MWh], "interval_s": int, "gaps": int} or UserError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"cannot read price file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a UTF-8 text file") from None
    rows = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in rows.fieldnames or ()]
    for need in ("interval_start", "price_usd_mwh"):
        if need not in cols:
            raise UserError(f"{p}: column {need!r} missing (header must have interval_start,price_usd_mwh; has "
                            f"{','.join(cols) or 'nothing'})")
    rows.fieldnames = cols
    ts: list[int] = []
    ps: list[float] = []
    for n, r in enumerate(rows, start=2):
        s = (r.get("interval_start") or "").strip()
        v = (r.get("price_usd_mwh") or "").strip()
        if not s and not v:
            continue
        try:
            d = datetime.fromisoformat(s)
        except ValueError:
            raise UserError(f"{p}:{n}: interval_start {s!r} is not an ISO 8601 time") from None
        if d.utcoffset() is None:
            raise UserError(f"{p}:{n}: interval_start {s!r} has no UTC offset (write e.g. 2026-08-14T17:00:00-05:00)")
        try:
            price = float(v)
        except ValueError:
            raise UserError(f"{p}:{n}: price_usd_mwh {v!r} is not a number") from None
        if price != price or not -10000 <= price <= 100000:
            raise UserError(f"{p}:{n}: price_usd_mwh {v} is outside -10000..100000 $/MWh")
        t = int(d.timestamp())
        if t < M.EPOCH:
            raise UserError(f"{p}:{n}: interval_start {s} is before 2020-01-01")
        if ts and t <= ts[-1]:
            raise UserError(f"{p}:{n}: interval_start {s} is not after the row before (rows must be in time order)")
        ts.append(t)
        ps.append(price)
    if len(ts) < 2:
        raise UserError(f"{p}: need at least two price rows (the interval length comes from the data)")
    steps = Counter(b - a for a, b in zip(ts, ts[1:]))
    interval = max(steps.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    short = [b - a for a, b in zip(ts, ts[1:]) if b - a < interval]
    if short:
        raise UserError(f"{p}: irregular intervals: a {short[0]} s step where the data's interval is {interval} s")
    gaps = sum(1 for a, b in zip(ts, ts[1:]) if b - a > interval)
    return {"file": str(p), "t": ts, "p": ps, "interval_s": interval, "gaps": gaps}


def run(cfg: dict[str, Any], prices: dict[str, Any]) -> dict[str, Any]:
    """The backtest of one site config over one price series (see the module doc)."""
    m = M.Market(cfg)
    n = m.n
    names = m.names
    kw = m.kw
    rev = []
    for b in cfg["blocks"]:
        r = b.get("revenue_usd_mwh", b.get("strike_usd_mwh"))
        rev.append(float(r) if r is not None else 0.0)
    full = (1 << n) - 1
    iv = prices["interval_s"]
    ts, ps = prices["t"], prices["p"]
    on_cost = on_mwh = on_rev = 0.0
    cost = mwh = revenue = cut_mwh = cut_s = 0.0
    cycles = [0] * n
    series: dict[str, list[float]] = {"t": [], "price": [], "load_kw": [], "curtailed_kw": []}
    refusals = 0
    short_s = 0
    total_kw = sum(kw)
    for t_unix, price in zip(ts, ps):
        t0 = t_unix - M.EPOCH
        t1 = t0 + iv
        t = t0
        e_int = 0.0  # kWh on in this interval
        c_int = 0.0
        while t < t1:
            m.decide(t, M.M_PRICE, price, full)
            for k in range(m.nev):
                if m.ev[3 * k] == M.EV_SHED:
                    cycles[m.ev[3 * k + 1]] += 1
            nxt = t1
            if t < m.wake < nxt:
                nxt = m.wake
            if m.oblig_kw > 0 and (t // 3600 + 1) * 3600 < nxt:
                nxt = (t // 3600 + 1) * 3600
            h = (nxt - t) / 3600.0
            off = m.off
            any_off = False
            for i in range(n):
                if (off >> i) & 1:
                    any_off = any_off or kw[i] > 0
                    cut_mwh += kw[i] * h / 1000
                    c_int += kw[i] * h
                else:
                    e = kw[i] * h / 1000
                    mwh += e
                    cost += price * e
                    revenue += rev[i] * e
                    e_int += kw[i] * h
            if any_off:
                cut_s += nxt - t
            if m.short:
                short_s += nxt - t
            t = nxt
        refusals = m.refused
        hours = iv / 3600.0
        for i in range(n):
            e = kw[i] * hours / 1000
            on_mwh += e
            on_cost += price * e
            on_rev += rev[i] * e
        series["t"].append(t_unix)
        series["price"].append(price)
        series["load_kw"].append(e_int / hours)
        series["curtailed_kw"].append(c_int / hours)

    def r(x: float) -> float:
        return round(x, 6)

    return {
        "prices": {"file": prices.get("file"), "intervals": len(ts), "interval_s": iv, "gaps": prices["gaps"],
                   "start": ts[0], "end": ts[-1] + iv},
        "site": {"blocks": names, "kw": kw, "total_kw": total_kw, "obligation_mw": m.oblig_kw / 1000,
                 "program": m.program,
                 "strikes": {names[i]: m.strike[i] for i in range(n) if m.strike[i] is not None and m.cls[i] != M.C_FIRM}},
        "always_on": {"energy_cost_usd": r(on_cost), "energy_mwh": r(on_mwh), "mining_revenue_usd": r(on_rev),
                      "net_usd": r(on_rev - on_cost)},
        "strategy": {"energy_cost_usd": r(cost), "energy_mwh": r(mwh), "mining_revenue_usd": r(revenue),
                     "net_usd": r(revenue - cost), "curtailed_mwh": r(cut_mwh), "curtailed_hours": r(cut_s / 3600),
                     "cycles": {names[i]: cycles[i] for i in range(n)}, "obligation_refusals": refusals,
                     "obligation_short_hours": r(short_s / 3600)},
        "series": series,
    }


def render_text(res: dict[str, Any]) -> list[str]:
    a, s, pr = res["always_on"], res["strategy"], res["prices"]
    out = [f"{pr['intervals']} intervals of {pr['interval_s']} s from {pr['file']}"
           + (f" ({pr['gaps']} gaps)" if pr["gaps"] else ""),
           f"{'':12} {'energy $':>12} {'MWh':>10} {'revenue $':>12} {'net $':>12}"]
    for name, d in (("always on", a), ("strategy", s)):
        out.append(f"{name:12} {d['energy_cost_usd']:12.2f} {d['energy_mwh']:10.3f} {d['mining_revenue_usd']:12.2f} "
                   f"{d['net_usd']:12.2f}")
    out.append(f"curtailed {s['curtailed_mwh']:.3f} MWh over {s['curtailed_hours']:.2f} h; net gain "
               f"${s['net_usd'] - a['net_usd']:.2f}")
    out.append("cycles: " + ", ".join(f"{k} {v}" for k, v in s["cycles"].items()))
    if res["site"]["obligation_mw"]:
        out.append(f"{res['site']['program']} {res['site']['obligation_mw']} MW: {s['obligation_refusals']} economic "
                   f"curtailments refused, {s['obligation_short_hours']:.2f} h short of the commitment")
    return out


def write_report(res: dict[str, Any], path: str | Path) -> str:
    """Price, load and curtailment over time as .png or .html (by extension)."""
    import base64

    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in ("png", "html", "htm"):
        raise UserError(f"{p}: report must end in .png or .html")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from datetime import timezone

    s = res["series"]
    end = s["t"][-1] + res["prices"]["interval_s"]
    x = [datetime.fromtimestamp(t, timezone.utc) for t in s["t"] + [end]]
    price, load, cut = s["price"] + s["price"][-1:], s["load_kw"] + s["load_kw"][-1:], s["curtailed_kw"] + s["curtailed_kw"][-1:]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.step(x, price, where="post", color="tab:red")
    ax1.set_ylabel("price $/MWh")
    ax1.axhline(0, color="grey", lw=0.5)
    for name, v in (res["site"].get("strikes") or {}).items():
        ax1.axhline(v, color="grey", lw=0.7, ls="--")
        ax1.annotate(f"{name} strike", (x[0], v), fontsize=7, va="bottom", color="grey")
    ax2.stackplot(x, load, cut, step="post", labels=["load on (kW)", "curtailed (kW)"],
                  colors=["tab:blue", "tab:orange"])
    ax2.set_ylabel("kW")
    ax2.legend(loc="upper right")
    st, a = res["strategy"], res["always_on"]
    fig.suptitle(f"backtest: energy \\${st['energy_cost_usd']:.0f} vs \\${a['energy_cost_usd']:.0f} always on; "
                 f"curtailed {st['curtailed_mwh']:.2f} MWh")
    ax2.set_xlabel("UTC")
    fig.autofmt_xdate()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    png = buf.getvalue()
    try:
        if fmt == "png":
            p.write_bytes(png)
        else:
            import html

            rows = "".join(f"<tr><td>{html.escape(line)}</td></tr>" for line in render_text(res))
            p.write_text("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>gridshed backtest"
                         "</title></head><body><h1>gridshed backtest</h1><table>" + rows + "</table>"
                         "<img alt=\"price, load and curtailment\" src=\"data:image/png;base64,"
                         + base64.b64encode(png).decode() + "\"></body></html>\n")
    except OSError as exc:
        raise UserError(f"cannot write {p}: {exc.strerror or exc}") from None
    return "png" if fmt == "png" else "html"
