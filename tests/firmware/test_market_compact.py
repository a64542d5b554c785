"""The schedule's compact uniform-step form ("ts": [t0, dt, "pc"|"kw", [values]], docs/market.md
"The schedule"): a day of 96 15-minute prices in one signed command; the board decides exactly
as with the same prices as iv rows (merged or not), under CPython and the real MicroPython;
malformed series are refused whole; the stored form round-trips; the host picks the form."""
from __future__ import annotations

import json
import random

import pytest

from agent import cbor
from agent import cmd_check as cmdcheck
from agent import cmd_cose as cose
from agent import cmd_mac0 as mac0
from agent.market import Market

from gridshed import dispatch as dp
from gridshed.prices import Interval

T0 = 1796083200  # 2026-12-01T00:00:00Z
Q = 900

RUNNER = r"""
from agent.market import Market
def run(spec):
    c, sid_bodies, steps = spec
    out = []
    for iv, ts in sid_bodies:
        m = Market(c)
        r = [m.set_schedule(1, iv, False, ts)]
        for t, closed in steps:
            off = m.step(t, closed)
            if m.nev:
                r.append([t, off] + [[m.event(k)["ev"], m.event(k)["block"], m.event(k)["why"], m.event(k)["value"]]
                                     for k in range(m.nev)])
        r.append([m.off, m.refused, list(m.cycles)])
        out.append(r)
    return out
"""


def blocks(rnd):
    bl = []
    for i in range(rnd.randint(2, 5)):
        b = {"name": "b%d" % i, "miners": 1, "kw_per_miner": float(rnd.choice((50, 100, 125))), "priority": i + 1,
             "class": rnd.choice(("interruptible", "interruptible", "heat")), "pins": [i],
             "strike_usd_mwh": float(rnd.choice((20, 45.5, 60, 90, 150)))}
        for k, hi in (("min_run_s", 1800), ("min_off_s", 1800), ("max_cycles_day", 4), ("ramp_kw_per_min", 200)):
            if rnd.random() < 0.4:
                b[k] = rnd.randint(1, hi)
        bl.append(b)
    return {"blocks": bl, "trip": {}, "market": {"obligation_mw": rnd.choice((0, 0.1)),
                                                 "obligation_hours": [[rnd.randint(0, 23), rnd.randint(0, 24)]]}}


def prices(rnd, n=96):
    out, p = [], 40.0
    for _ in range(n):
        if rnd.random() < 0.4:  # runs of equal prices: the merged iv form has fewer rows
            p = rnd.choice((-12.5, 0.0, 19.99, 45.5, 45.51, 61.37, 89.99, 90.0, 151.25, 2400.0))
        out.append(p)
    return out


def forms(ps, kw_rows=()):
    """The same schedule three ways: compact series, one iv row per step, merged iv rows."""
    t0 = T0 + 3600
    rows = [[t0 + Q * i, t0 + Q * (i + 1), "p", p] for i, p in enumerate(ps)]
    merged = dp.price_intervals([Interval(r[0], r[1], r[3]) for r in rows])
    kw = [list(r) for r in kw_rows]
    body = dp.body(merged + kw)
    assert "ts" in body and body["iv"] == kw and body["ts"][:3] == [t0, Q, "pc"], body
    return [[body["iv"], body["ts"]], [rows + kw, None], [merged + kw, None]]


def spec(seed):
    rnd = random.Random(seed)
    c = blocks(rnd)
    kw = [] if seed % 2 else [[T0 + 3600 + Q * 40, T0 + 3600 + Q * 44, "kw", 150]]
    ps = prices(rnd, 96 - len(kw))  # one iv row per step: at most 96 rows with the kW row
    steps, t = [], T0
    while t < T0 + 3600 + 97 * Q:
        t += rnd.choice((1, 7, 60, 299, 900))
        steps.append([t, rnd.choice((31, 31, 31, 31, 0, 5))])
    return [c, forms(ps, kw), steps]


def test_compact_day_decides_as_the_iv_rows_under_cpython_and_micropython(mp):
    specs = [spec(s) for s in range(6)]
    ns: dict = {}
    exec(RUNNER, ns)
    expected = [ns["run"](s) for s in specs]
    for e in expected:
        ts, rows, merged = e
        assert ts[0] is None and rows[0] is None and merged[0] is None
        assert ts[1:] == rows[1:] == merged[1:]  # same events, same second, same masks
    assert sum(len(e[0]) for e in expected) > 30  # sheds and restores happened
    code = "import json, sys\n" + RUNNER + "for line in sys.stdin:\n    print(json.dumps(run(json.loads(line))))\n"
    res = mp.run(code, heapsize="2m", stdin="".join(json.dumps(s) + "\n" for s in specs).encode())
    got = [json.loads(x) for x in res.out.splitlines() if x.strip()]
    assert got == json.loads(json.dumps(expected))


def test_series_status_lookup_and_stored_form():
    c = {"blocks": [{"name": "a", "miners": 1, "kw_per_miner": 100.0, "strike_usd_mwh": 50.0}], "trip": {}}
    m = Market(c)
    assert m.set_schedule(5, [[T0 + 2 * Q, T0 + 3 * Q, "kw", 100]], False, [T0, Q, "pc", [4000, 5001, 5001, -250]]) is None
    assert m.step(T0, 1) == 0 and m.mode == 1 and m.val == 40.0
    assert m.step(T0 + Q, 1) == 1 and m.val == 50.01 and m.event(0)["why"] == "price_above_strike"
    assert m.edge == T0 + 2 * Q - 1577836800  # the next change: the kW row over step 2
    m.step(T0 + 2 * Q, 1)
    assert m.mode == 2 and m.val == 100  # the iv row lies over the series
    m.step(T0 + 3 * Q, 1)
    assert m.val == -2.5 and m.off == 0
    m.step(T0 + 4 * Q, 1)
    assert m.mode == 0  # past the series' end
    st = json.loads(json.dumps(m.status()))
    assert st["intervals"] == 5 and st["sid"] == 5
    rec = cbor.loads(cbor.dumps(m.schedule()))
    assert rec["ts"] == [T0, Q, "pc", [4000, 5001, 5001, -250]]
    m2 = Market(c)
    assert m2.set_schedule(rec["sid"], rec["iv"], True, rec["ts"]) is None
    assert m2.schedule() == m.schedule()
    # a newer schedule without a series drops it
    assert m.set_schedule(6, [[T0, T0 + Q, "p", 10]]) is None and m.ts_n == 0 and "ts" not in m.schedule()


@pytest.mark.parametrize("ts,why", [
    ([T0, Q, "pc"], "bad-interval"),
    ([T0, Q, "p", [4000]], "bad-interval"),           # "p" is the iv rows' mode; a series says "pc"
    ([T0, Q, "pc", [40.5]], "bad-interval"),          # cents are whole
    ([T0, Q, "pc", [True]], "bad-interval"),
    ([T0, 0, "pc", [1]], "bad-interval"),
    ([T0, -Q, "pc", [1]], "bad-interval"),
    ([T0, 86401, "pc", [1]], "bad-interval"),
    ([T0, Q, "pc", []], "bad-interval"),
    ([1500000000, Q, "pc", [1]], "bad-interval"),      # before 2020
    ([T0, Q, "pc", [10000001]], "bad-interval"),       # above 100000 $/MWh
    ([T0, Q, "kw", [-1]], "bad-interval"),
    ([T0, Q, "kw", [1e7]], "bad-interval"),
    ([T0, Q, "pc", [1] * 97], "too-many-intervals"),
    ([T0, 86400, "pc", [1] * 96 + []], None),
    ("x", "bad-interval"),
])
def test_bad_series_are_refused_and_change_nothing(ts, why):
    c = {"blocks": [{"name": "a", "miners": 1, "kw_per_miner": 100.0, "strike_usd_mwh": 50.0}], "trip": {}}
    m = Market(c)
    assert m.set_schedule(1, [], False, [T0, Q, "pc", [9000]]) is None
    before = m.schedule()
    assert m.set_schedule(2, [], False, ts) == why
    if why:
        assert m.schedule() == before and m.sid == 1


def test_fuzzed_series_never_raise():
    rnd = random.Random(7)
    c = {"blocks": [{"name": "a", "miners": 1, "kw_per_miner": 100.0, "strike_usd_mwh": 50.0}], "trip": {}}
    pool = [None, True, -1, 0, 1, Q, T0, 2**40, 1.5, "pc", "kw", "p", [], [1], {}, b"x", float("nan")]
    for sid in range(1, 400):
        m = Market(c)
        ts = [rnd.choice(pool) for _ in range(rnd.choice((3, 4, 4, 5)))]
        if rnd.random() < 0.5:
            ts = [T0, Q, rnd.choice(("pc", "kw")), [rnd.choice(pool) for _ in range(rnd.randint(0, 5))]]
        why = m.set_schedule(sid, [], False, ts)
        assert why in (None, "bad-interval", "too-many-intervals")
        m.step(T0 + 5, 1)


def test_the_command_check_passes_a_series_without_rows():
    key, kid = bytes(range(32)), b"k1"
    p = {"cmd": "schedule", "seq": 9, "exp": 2**40, "dev": "d1", "sid": 3, "ts": [T0, Q, "pc", [1, 2]]}
    r = mac0.verify(cose.mac0_create(key, kid, cbor.dumps(p), tagged=True), {kid: key})
    c = cmdcheck.check(r, "d1", None, None, {}, lambda h: None)
    assert c["iv"] == [] and c["ts"] == [T0, Q, "pc", [1, 2]], c


def test_host_picks_the_form():
    day = [[T0 + Q * i, T0 + Q * (i + 1), "p", round(20 + (i % 40) * 13.37, 2)] for i in range(96)]
    b = dp.body(day)
    assert "ts" in b and len(b["ts"][3]) == 96 and b["iv"] == []
    dp.check_size(day, form="auto")  # 96 rows: fine as a series
    dp.check_size(day + [[T0, T0 + Q, "kw", 5]], form="auto")  # + a 4CP row over it
    with pytest.raises(Exception, match="at most 96"):
        dp.check_size(day + [[T0 + 96 * Q, T0 + 97 * Q, "p", 1]], form="auto")
    two = [[T0, T0 + 2 * 3600, "p", 100], [T0 + 2 * 3600, T0 + 24 * 3600, "p", 20]]
    assert dp.body(two) == {"iv": two}  # two merged rows: shorter as rows
    gap = [day[0], day[2]]
    assert dp.body(gap) == {"iv": gap}  # a gap: no series
    kw_first = [[T0, T0 + Q, "kw", 5]] + day
    assert dp.body(kw_first) == {"iv": kw_first}  # "later wins" would change: rows
    hourly = [[T0 + 3600 * i, T0 + 3600 * (i + 1), "p", 30 + i * 1.01] for i in range(24)]
    assert dp.body(hourly)["ts"][:2] == [T0, 3600]
    p = dp.payload("site1-ctl1", "site1", 1796083200, 1796083260, 1796083200, day, None, "auto")
    msg = cose.mac0_create(bytes(32), b"mkt-host", cbor.dumps(p), tagged=True)
    assert len(msg) <= dp.MAX_SIGNED_BYTES  # a day of 15-minute cent prices in one command
