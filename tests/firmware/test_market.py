"""The market loop's decision core (agent/market.py): strikes, kW targets, min run/off, the cycle
cap, the ramp, the obligation hold, load classes, schedules (overlap, replay, unknown clock) and a
frequency trip during economic curtailment; the same decisions under the real MicroPython, and
no allocation on its per-tick path."""
from __future__ import annotations

import json
import random

import pytest

from agent import market as M
from agent.market import Market

T0 = 1796083200  # 2026-12-01T00:00:00Z (a Tuesday), an hour boundary
H = 3600


def cfg(blocks, stages=None, **mk):
    """blocks: (name, kW, class, strike, extra dict)."""
    bl = []
    for i, (name, kw, cls, strike, extra) in enumerate(blocks):
        b = {"name": name, "miners": 1, "kw_per_miner": kw, "priority": i + 1, "class": cls, "pins": [i]}
        if strike is not None:
            b["strike_usd_mwh"] = strike
        b.update(extra)
        bl.append(b)
    c = {"blocks": bl, "trip": {}, "market": mk}
    if stages is not None:
        c["trip"]["stages"] = stages
    return c


THREE = [("a", 100.0, "interruptible", 50.0, {}), ("b", 100.0, "interruptible", 80.0, {}),
         ("c", 100.0, "interruptible", 120.0, {})]
ALL = 0b111


def sched(m, sid, *iv):
    assert m.set_schedule(sid, [list(x) for x in iv]) is None


def evs(m):
    return [(e["ev"], e["block"], e["why"]) for e in (m.event(k) for k in range(m.nev))]


def test_price_above_strike_sheds_each_block_and_journals_why():
    m = Market(cfg(THREE))
    sched(m, 1, (T0, T0 + H, "p", 60.0), (T0 + H, T0 + 2 * H, "p", 100.0), (T0 + 2 * H, T0 + 3 * H, "p", 30.0))
    assert m.step(T0, ALL) == 0b001
    assert evs(m) == [("shed", "a", "price_above_strike")]
    assert m.event(0)["value"] == 60.0 and m.event(0)["mode"] == "p"
    assert m.step(T0 + 10, ALL) == 0b001 and m.nev == 0  # nothing new: nothing journaled
    assert m.step(T0 + H, ALL) == 0b011
    assert evs(m) == [("shed", "b", "price_above_strike")]
    assert m.step(T0 + 2 * H, ALL) == 0
    assert sorted(evs(m)) == [("restore", "a", "price_at_or_below_strike"),
                              ("restore", "b", "price_at_or_below_strike")]
    assert m.step(T0 + 3 * H, ALL) == 0 and m.nev == 0  # past the schedule: nothing to do
    assert m.cycles == [1, 1, 0]


def test_price_equal_to_strike_does_not_shed():
    m = Market(cfg(THREE))
    sched(m, 1, (T0, T0 + H, "p", 80.0))
    assert m.step(T0, ALL) == 0b001


def test_overlapping_intervals_later_wins_and_newer_id_replaces_the_whole_schedule():
    m = Market(cfg(THREE))
    # a day-long low price, then a spike inside it: the spike (listed later) wins where they overlap
    sched(m, 5, (T0, T0 + 24 * H, "p", 10.0), (T0 + 2 * H, T0 + 3 * H, "p", 500.0))
    assert m.step(T0 + H, ALL) == 0
    assert m.step(T0 + 2 * H + 5, ALL) == ALL and m.val == 500.0
    assert m.step(T0 + 3 * H, ALL) == 0
    # listed the other way round, the long interval (later) wins everywhere
    m2 = Market(cfg(THREE))
    sched(m2, 1, (T0 + 2 * H, T0 + 3 * H, "p", 500.0), (T0, T0 + 24 * H, "p", 10.0))
    assert m2.step(T0 + 2 * H + 5, ALL) == 0
    # replay: a lower or equal id is refused and changes nothing
    assert m.set_schedule(5, [[T0, T0 + 24 * H, "p", 900.0]]) == "replay"
    assert m.set_schedule(4, []) == "replay"
    assert m.sid == 5 and m.niv == 2
    # a newer id replaces everything (its intervals only)
    sched(m, 6, (T0 + 4 * H, T0 + 5 * H, "kw", 150.0))
    assert m.niv == 1 and m.schedule() == {"sid": 6, "iv": [[T0 + 4 * H, T0 + 5 * H, "kw", 150.0]]}
    assert m.step(T0 + 4 * H, ALL) == 0b011  # 150 kW: the two first blocks
    assert evs(m) == [("shed", "a", "kw_target"), ("shed", "b", "kw_target")]
    assert m.step(T0 + 5 * H, ALL) == 0
    assert {e[2] for e in evs(m)} == {"no_interval"}


@pytest.mark.parametrize("sid,iv,why", [
    (-1, [], "bad-id"), (True, [], "bad-id"), ("1", [], "bad-id"), (1.0, [], "bad-id"),
    (1, "x", "too-many-intervals"), (1, [[T0, T0 + 1, "p", 1]] * 97, "too-many-intervals"),
    (1, [[T0, T0, "p", 1]], "bad-interval"), (1, [[T0 + 5, T0, "p", 1]], "bad-interval"),
    (1, [[T0, T0 + 1, "x", 1]], "bad-interval"), (1, [[T0, T0 + 1, "p", "1"]], "bad-interval"),
    (1, [[T0, T0 + 1, "kw", -1]], "bad-interval"), (1, [[T0, T0 + 1, "p", 1e9]], "bad-interval"),
    (1, [[T0, T0 + 1, "p"]], "bad-interval"), (1, [[T0 * 1.0, T0 + 1, "p", 1]], "bad-interval"),
    (1, [[1000, 2000, "p", 1]], "bad-interval"), (1, [[T0, T0 + 1, "p", True]], "bad-interval"),
    (1, [7], "bad-interval"),
])
def test_bad_schedules_are_refused_and_change_nothing(sid, iv, why):
    m = Market(cfg(THREE))
    sched(m, 0, (T0, T0 + H, "p", 100.0))
    assert m.set_schedule(sid, iv) == why
    assert m.sid == 0 and m.schedule()["iv"] == [[T0, T0 + H, "p", 100.0]]


def test_fuzzed_schedules_never_raise():
    rnd = random.Random(7)
    atoms = [None, True, -1, 0, 1, T0, T0 + H, 2 ** 40, 1.5, float("nan"), float("inf"), "p", "kw", "", b"x", [], {}]
    m = Market(cfg(THREE))
    for sid in range(1, 1500):
        iv = [[rnd.choice(atoms) for _ in range(rnd.choice((3, 4, 4, 5)))] for _ in range(rnd.randint(0, 4))]
        r = m.set_schedule(sid if rnd.random() < 0.8 else rnd.choice(atoms), iv)
        assert r in (None, "bad-id", "replay", "too-many-intervals", "bad-interval")
        m.step(T0 + rnd.randint(0, 4 * H), rnd.randint(0, 7))
        assert m.off & ~0b111 == 0


def test_clock_unknown_takes_no_economic_action_and_is_counted():
    m = Market(cfg(THREE))
    sched(m, 1, (T0, T0 + H, "p", 1000.0))
    for _ in range(3):
        assert m.step(None, ALL) == 0
    assert m.unknown == 3 and m.nev == 0
    st = m.status()
    assert st["clock"] is False and st["warning"] == "clock not trusted: schedule not executed"
    assert st["avail_kw"] == 300.0  # availability is reported without a clock
    assert m.step(T0 + 1, ALL) == ALL
    # a clock that is lost again (not a path the agent has, but the rule holds): economics lets go
    assert m.step(None, ALL) == 0
    assert {(e[0], e[2]) for e in evs(m)} == {("restore", "clock_unknown")}


def test_min_run_min_off_and_the_daily_cycle_cap():
    bl = [("a", 100.0, "interruptible", 50.0, {"min_run_s": 600, "min_off_s": 900, "max_cycles_day": 2})]
    m = Market(cfg(bl))
    hi, lo = 100.0, 10.0
    # prices flip every 5 minutes all day
    sched(m, 1, *[(T0 + k * 300, T0 + (k + 1) * 300, "p", hi if k % 2 else lo) for k in range(96)])
    trace = []
    t = T0
    while t < T0 + 8 * H:
        off = m.step(t, 1)
        for e in evs(m):
            trace.append((t - T0, e[0], e[2]))
        t += 30
    # hi in [300, 600), [900, 1200), ...: on at 0; high at 300 but min run holds until 600
    assert trace == [(300, "hold", "min_run"), (900, "shed", "price_above_strike"),
                     (1200, "hold", "min_off"),  # low at 1200, min off holds until 900 + 900
                     (1800, "restore", "price_at_or_below_strike"),
                     (2100, "hold", "min_run"), (2700, "shed", "price_above_strike"),
                     (3000, "hold", "min_off"), (3600, "restore", "price_at_or_below_strike"),
                     (3900, "hold", "min_run"),
                     (4500, "hold", "cycle_cap")]  # the third shed of the day: journaled once
    assert off == 0 and m.cycles == [2]
    # the next UTC day the cap starts over
    m2 = Market(cfg(bl))
    sched(m2, 1, (T0, T0 + 2 * 86400, "p", hi))
    m2.cycles = [2]
    m2.day = (T0 - M.EPOCH) // 86400
    m2.step(T0, 1)
    assert m2.step(T0 + 600, 1) == 0 and evs(m2) == [("hold", "a", "cycle_cap")]
    assert m2.step(T0 + 86400, 1) == 1 and evs(m2) == [("shed", "a", "price_above_strike")]


def test_ramp_limits_re_energising_one_block_at_a_time():
    bl = [(n, 120.0, "interruptible", 50.0, {"ramp_kw_per_min": 60.0}) for n in "abc"]
    m = Market(cfg(bl))
    sched(m, 1, (T0, T0 + H, "p", 100.0), (T0 + H, T0 + 2 * H, "p", 10.0))
    assert m.step(T0, ALL) == ALL
    assert m.step(T0 + H, ALL) == 0b011  # 120 kW at 60 kW/min: the next one 120 s later
    assert evs(m)[0] == ("restore", "c", "price_at_or_below_strike")
    assert ("hold", "b", "ramp") in evs(m)
    assert m.wake == T0 + H + 120 - M.EPOCH
    assert m.step(T0 + H + 119, ALL) == 0b011
    assert m.step(T0 + H + 120, ALL) == 0b001
    assert m.step(T0 + H + 240, ALL) == 0


def test_obligation_refuses_curtailment_below_the_commitment():
    # 0.2 MW of RRS from 14:00 to 16:00 UTC; three 100 kW blocks under frequency protection
    m = Market(cfg(THREE, obligation_mw=0.2, obligation_hours=[[14, 16]], program="RRS"))
    sched(m, 1, (T0 + 13 * H, T0 + 17 * H, "p", 1000.0))
    assert m.step(T0 + 13 * H, ALL) == ALL  # before the hours: everything sheds
    # 14:00: the obligation hour gives 200 kW back (the last shed first)
    assert m.step(T0 + 14 * H, ALL) == 0b001
    assert [e[:3] for e in evs(m)] == [("restore", "c", "obligation_hour"), ("restore", "b", "obligation_hour")]
    assert m.status()["avail_kw"] == 200.0 and m.status()["obligation_hour"] is True
    # the price still wants them off: refused (the restore is the journal record), counted,
    # a warning for the host; nothing more journaled while it lasts
    assert m.refused == 2
    m.step(T0 + 14 * H + 60, ALL)
    assert m.nev == 0 and m.refused == 2
    st = m.status()
    assert st["warning"] == "economic curtailment refused: RRS obligation" and st["short"] is False
    assert st["holds"] == ["price_above_strike", "obligation", "obligation"]
    # 16:00: the hours end, the price sheds them
    assert m.step(T0 + 16 * H, ALL) == ALL


def test_obligation_counts_only_blocks_a_frequency_trip_sheds():
    # block c is in no under-frequency stage: shedding it never touches availability
    st = [{"pickup_hz": 59.7, "blocks": [0, 1]}]
    m = Market(cfg(THREE, stages=st, obligation_mw=0.2, obligation_hours=[[0, 24]]))
    sched(m, 1, (T0, T0 + H, "p", 1000.0))
    assert m.step(T0, ALL) == 0b100
    assert m.status()["avail_kw"] == 200.0 and m.refused == 2


def test_frequency_trip_during_economic_curtailment_overrides_economics():
    m = Market(cfg(THREE))
    sched(m, 1, (T0, T0 + 2 * H, "p", 60.0))
    assert m.step(T0, ALL) == 0b001  # a economically open
    # a frequency trip opens everything: economics never closes anything, relays = closed & ~off
    off = m.step(T0 + 5, 0)
    assert 0 & ~off == 0 and m.status()["avail_kw"] == 0.0
    assert m.nev == 0  # no economic event: b and c stay wanted on, protection holds them open
    # protection restores b then c; a stays open for economics
    assert m.step(T0 + 60, 0b010) == 0b001
    assert m.step(T0 + 65, ALL) == 0b001
    assert ALL & ~m.off == 0b110
    # price falls: economics lets a go; protection decides when it really closes
    sched(m, 2, (T0, T0 + 2 * H, "p", 10.0))
    assert m.step(T0 + 70, 0b110) == 0


def test_frequency_opened_block_is_not_claimed_and_min_run_applies_after_its_restore():
    bl = [("a", 100.0, "interruptible", 50.0, {"min_run_s": 300})]
    m = Market(cfg(bl))
    sched(m, 1, (T0, T0 + H, "p", 10.0), (T0 + H, T0 + 2 * H, "p", 90.0))
    m.step(T0, 1)
    assert m.step(T0 + H, 0) == 0 and m.nev == 0  # tripped by frequency at the price change
    assert m.step(T0 + H + 100, 1) == 0 and evs(m) == [("hold", "a", "min_run")]
    assert m.step(T0 + H + 400, 1) == 1 and evs(m) == [("shed", "a", "price_above_strike")]


def test_classes_firm_never_heat_last_and_heat_minimum():
    bl = [("ai", 200.0, "firm", 10.0, {}), ("m1", 100.0, "interruptible", 50.0, {}),
          ("m2", 100.0, "interruptible", 300.0, {}), ("h1", 80.0, "heat", 40.0, {}),
          ("h2", 80.0, "heat", 40.0, {})]
    m = Market(cfg(bl, heat_min_kw=80.0))
    sched(m, 1, (T0, T0 + H, "p", 100.0), (T0 + H, T0 + 2 * H, "p", 400.0),
          (T0 + 2 * H, T0 + 3 * H, "kw", 1000.0), (T0 + 3 * H, T0 + 4 * H, "kw", 150.0))
    # 100 $/MWh: above m1's and the heat strikes, but heat sheds only after every miner is off
    assert m.step(T0, 0b11111) == 0b00010
    # 400: both miners off, then one heat block (the other keeps the 80 kW heat minimum)
    assert m.step(T0 + H, 0b11111) == 0b01110
    # a 1000 kW target: everything but firm and the heat minimum
    assert m.step(T0 + 2 * H, 0b11111) == 0b01110
    # 150 kW: m1 then m2 (interruptible first, by priority)
    assert m.step(T0 + 3 * H, 0b11111) == 0b00110


def test_day_boundary_and_obligation_hours_wrapping_midnight():
    m = Market(cfg(THREE, obligation_mw=0.3, obligation_hours=[[22, 2]]))
    assert [h for h in range(24) if m.hours[h]] == [0, 1, 22, 23]
    sched(m, 1, (T0 + 21 * H, T0 + 27 * H, "p", 999.0))
    assert m.step(T0 + 21 * H, ALL) == ALL
    assert m.step(T0 + 22 * H, ALL) == 0
    assert m.step(T0 + 26 * H, ALL) == ALL  # 02:00 next day: hours over


def test_status_is_json():
    m = Market(cfg(THREE, obligation_mw=0.1, obligation_hours=[[0, 24]]))
    sched(m, 3, (T0, T0 + H, "p", 99.5))
    m.step(T0, ALL)
    s = json.loads(json.dumps(m.status()))
    assert s["sid"] == 3 and s["mode"] == "p" and s["value"] == 99.5 and s["avail_mw"] == 0.1


# ---- the same decisions under MicroPython ---------------------------------------------------
RUNNER = r"""
from agent.market import Market, EPOCH
def run(spec):
    c, scheds, steps = spec
    m = Market(c)
    out = []
    for t, closed, sid in steps:
        if sid is not None:
            out.append(m.set_schedule(sid, scheds[sid % len(scheds)]))
        off = m.step(t, closed)
        out.append([off, m.nev] + [[m.event(k)["ev"], m.event(k)["block"], m.event(k)["why"]] for k in range(m.nev)]
                   + [m.avail_kw, m.refused, m.cycles[0], m.wake])
    return out
"""


def random_spec(rnd):
    classes = ["interruptible", "interruptible", "heat", "firm"]
    bl = []
    for i in range(rnd.randint(1, 5)):
        ex = {}
        for k, hi in (("min_run_s", 900), ("min_off_s", 900), ("max_cycles_day", 4), ("ramp_kw_per_min", 200)):
            if rnd.random() < 0.5:
                ex[k] = rnd.randint(1, hi)
        bl.append(("b%d" % i, float(rnd.choice((0, 50, 100, 125))), rnd.choice(classes),
                   rnd.choice((None, 20.0, 60.0, 150.0)), ex))
    c = cfg(bl, obligation_mw=rnd.choice((0, 0.05, 0.2)), obligation_hours=[[rnd.randint(0, 23), rnd.randint(0, 24)]],
            heat_min_kw=rnd.choice((0.0, 50.0)))
    scheds = []
    for _ in range(3):
        iv = []
        for _ in range(rnd.randint(0, 6)):
            s = T0 + rnd.randint(0, 20) * 900
            iv.append([s, s + rnd.randint(1, 8) * 900, rnd.choice(("p", "p", "kw")), float(rnd.randint(0, 300))])
        scheds.append(iv)
    steps = []
    t = T0 - 600
    for k in range(150):
        t += rnd.choice((1, 30, 60, 300))
        steps.append([t, rnd.choice((31, 31, 31, 0, 5)), (k // 40) + 1 if k % 40 == 0 else None])
    return [c, scheds, steps]


def test_differential_cpython_vs_micropython(mp):
    rnd = random.Random(16)
    specs = [random_spec(rnd) for _ in range(25)]
    ns: dict = {}
    exec(RUNNER, ns)
    expected = [ns["run"](s) for s in specs]
    flat = [row for e in expected for row in e if isinstance(row, list)]
    assert any(r[1] for r in flat)  # something happened
    code = "import json, sys\n" + RUNNER + (
        "for line in sys.stdin:\n    print(json.dumps(run(json.loads(line))))\n")
    res = mp.run(code, heapsize="256k", stdin="".join(json.dumps(s) + "\n" for s in specs).encode())
    got = [json.loads(x) for x in res.out.splitlines() if x.strip()]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert json.loads(json.dumps(e)) == g, "spec %d diverges" % i


def test_micropython_quiet_ticks_allocate_nothing(mp):
    code = r"""
import gc, micropython
from agent.market import Market
T0 = %d
bl = [{"name": "a", "miners": 1, "kw_per_miner": 100.0, "strike_usd_mwh": 50.0, "min_run_s": 600},
      {"name": "b", "miners": 1, "kw_per_miner": 100.0, "strike_usd_mwh": 90.0, "class": "heat"}]
m = Market({"blocks": bl, "trip": {}, "market": {"obligation_mw": 0.1, "obligation_hours": [[0, 24]]}})
m.set_schedule(1, [[T0, T0 + 7200, "p", 70.0]])
m.step(T0, 3)
m.step(T0 + 1, 3)
t = T0 + 2
i = 0
gc.collect()
micropython.heap_lock()
while i < 2000:   # 20 ticks a second, 100 s: the board's quiet path
    m.step(t + i // 20, 3)
    i += 1
micropython.heap_unlock()
print(m.off, m.why[0], m.t)
""" % T0
    res = mp.run(code, heapsize="256k")  # compiled from source here (the board runs the .mpy)
    assert res.out.split() == ["0", "3", str(T0 + 2 + 99 - 1577836800)]  # a held by min run


# ---- site config: [market] and the block keys (agent/market_check.py via agent.config) -------
def test_config_checks_market_keys():
    from agent import config as fw
    from gridshed import siteconfig
    from gridshed.errors import UserError

    ok = siteconfig.load_site("scenarios/market-site.toml")
    assert ok["market"]["obligation_mw"] == 0.25 and ok["blocks"][3]["class"] == "heat"
    assert fw.validate(ok) == []

    def errs(mut):
        import copy
        c = copy.deepcopy(ok)
        mut(c)
        return fw.validate(c)

    assert errs(lambda c: c["blocks"][0].update({"class": "gold"})) == [
        "blocks[0].class: must be one of interruptible/firm/heat, got 'gold'"]
    assert errs(lambda c: c["blocks"][0].update({"strike_usd_mwh": "45"})) == [
        "blocks[0].strike_usd_mwh: must be a number, got '45'"]
    assert errs(lambda c: c["blocks"][1].update({"max_cycles_day": -1})) == [
        "blocks[1].max_cycles_day: -1 is outside 0..1000"]
    assert errs(lambda c: c["market"].update({"obligation_hours": [[5, 5]]})) == [
        "market.obligation_hours: [5, 5] is not [start_hour, end_hour] (0..23, 1..24, UTC)"]
    assert errs(lambda c: c["market"].update({"obligation_hours": [[25, 2], "x"]}))[0].startswith("market.obligation_hours")
    assert errs(lambda c: c["market"].update({"bogus": 1})) == ["market.bogus: unknown key"]
    assert errs(lambda c: c["market"].update({"obligation_mw": -1})) == ["market.obligation_mw: -1 is outside 0.0..10000.0"]
    # the firm block (inference, index 4) may only be in stage firm_stage (1)
    assert errs(lambda c: c["trip"]["stages"][0]["blocks"].append(4)) == [
        "blocks[4]: a firm block sheds only in stage 1 (market.firm_stage), not in stage 0"]
    assert errs(lambda c: c["market"].update({"firm_stage": 0})) == [
        "blocks[4]: a firm block sheds only in stage 0 (market.firm_stage), not in stage 1"]
    assert errs(lambda c: c.update({"market": 3})) == ["market: must be a table"]
    # host side: unknown block key and the one-line error
    site = siteconfig.read_toml("scenarios/market-site.toml")
    site["blocks"][0]["strike"] = 4
    with pytest.raises(UserError, match=r"blocks\[0\]\.strike: unknown key"):
        siteconfig.normalize(site)


# ---- the utility Modbus map's market registers (agent/features/modbus_server.py) ------------------
def test_utility_market_registers_only_on_a_trusted_line_and_only_add_curtailment():
    from agent import modbus_tcp as tcp
    from agent.features import modbus_server as us
    from agent.control import Authority
    from agent.features import market as feat
    from agent.modbus_errors import ModbusException

    class Ctrl:
        armed, shed_mask, state, reason, nblocks = True, 0, 0, 0, 3
        kw = [100.0, 100.0, 100.0]
        _smask = [7]
        closed_mask = 7

    class J:
        def __init__(self):
            self.recs = []

        def append(self, k, d):
            self.recs.append((k, d))

    class Relays:
        mask = 7

    class A:
        def __init__(self, trusted):
            self.ctrl, self.relays, self.journal = Ctrl(), Relays(), J()
            self.cfg = cfg(THREE)
            self.hz, self.kw, self.meter_ok, self.auth = 60.0, 300.0, True, Authority()
            self.trusted, self.signal, self.release, self.errors, self.econ_off = trusted, None, False, {}, 0
            self.market = None

        def shed_requested(self):
            return False

        def issue(self, i, shed, kw=None, full=True):
            return self.auth.apply(i, shed, kw, full)

        def decide(self, now, sample):
            self.relays.mask = self.ctrl.closed_mask & ~self.econ_off

        def count(self, w):
            self.errors[w] = self.errors.get(w, 0) + 1

        def now_unix(self):
            return T0 + 30

    for trusted in (0, 1):
        a = A(trusted)
        f = feat.Feature.__new__(feat.Feature)  # the feature without its file (no market.cbor here)
        f.a, f.m, f.file, f.refusals, f.dirty = a, Market(a.cfg), None, 0, False
        f.save = lambda: True
        a.market = f
        s = us.UtilityServer(a, {"unit": 1, "heartbeat_s": 0.0, "heartbeat_action": "alarm"})
        req = bytearray(300)

        def write(reg, v, tid=[0]):
            tid[0] += 1
            n = tcp.build_request(req, tid[0], 1, 6, reg, v, None)
            k = s.handle_tcp(req, n)
            try:
                tcp.parse_response(s.tx, k, tid[0], 1, 6, None, None)
                return "ok"
            except ModbusException as e:
                return "E%d" % e.code

        def read():
            n = tcp.build_request(req, 99, 1, 3, 19, 4, None)
            k = s.handle_tcp(req, n)
            mv = tcp.parse_response(s.tx, k, 99, 1, 3, None, None)
            return [(mv[2 * i] << 8) | mv[2 * i + 1] for i in range(4)]

        f.step()
        assert read() == [300, 1 | 2, 0x8000, 0]  # 300 kW available, market running, clock known
        if not trusted:
            assert write(21, 60) == "E1" and write(22, 100) == "E1"
            assert a.errors["utility_market_refused"] == 2 and a.relays.mask == 7 and f.m.x_price is None
            continue
        assert write(21, 60) == "ok"         # 60 $/MWh: above block a's strike (50)
        assert a.relays.mask == 0b110 and read()[:3] == [200, 3, 60]
        assert ("utility", {"cmd": "market_price", "v": 60, "src": "tcp"}) in a.journal.recs
        assert a.journal.recs[0][1]["why"] == "utility_register"
        assert write(22, 150) == "ok"        # and 150 kW: a and b
        assert a.relays.mask == 0b100
        # a schedule below it does not lower it (max with the schedule): the register only adds
        sched(f.m, 1, (T0, T0 + H, "p", 10.0))
        f.step()
        assert a.relays.mask == 0b100
        assert write(22, 0) == "ok" and write(21, 0x8000) == "ok"  # a trusted line takes it back
        assert a.relays.mask == 0b111


# ---- the board feature's file: market.cbor (agent/features/market.py) ---------------------
def test_feature_file_keeps_schedule_and_todays_cycles_and_a_damaged_one_is_refused(tmp_path, monkeypatch):
    from agent.features import market as feat

    monkeypatch.chdir(tmp_path)

    class J:
        def __init__(self):
            self.recs = []

        def append(self, k, d):
            self.recs.append((k, d))

    class Ctrl:
        closed_mask = ALL

    class A:
        def __init__(self, t):
            self.cfg, self.journal, self.ctrl, self.errors = cfg(THREE), J(), Ctrl(), {}
            self.market, self.econ_off, self.t, self.decisions = None, 0, t, 0

        def count(self, w):
            self.errors[w] = self.errors.get(w, 0) + 1

        def now_unix(self):
            return self.t

        def decide(self, now, sample):
            self.decisions += 1

    a = A(None)
    f = feat.Feature(a)
    assert a.market is f and f.m.sid == -1 and f.file is None
    assert f.schedule(7, [[T0, T0 + H, "p", 60.0]], "serial") is None
    assert (tmp_path / "market.cbor").exists() and f.status()["stored"] is True
    assert f.schedule(7, [], "udp") == "replay" and a.errors["market_refused"] == 1
    a.t = T0 + 10
    f.step()
    assert a.econ_off == 0b001 and a.decisions == 1 and f.dirty  # today's cycle to be written
    assert f.save()
    # a power cut: the schedule and today's cycle come back; no economics before the time
    b = A(None)
    g = feat.Feature(b)
    assert g.m.sid == 7 and g.m.cycles == [1, 0, 0] and g.m.day == (T0 - M.EPOCH) // 86400
    g.step()
    assert b.econ_off == 0 and g.status()["clock"] is False
    b.t = T0 + 20
    g.step()
    assert b.econ_off == 0b001 and g.m.cycles == [2, 0, 0]  # the count goes on from the file
    # a damaged file: refused at boot (journal + counter + @status), no schedule runs
    data = bytearray((tmp_path / "market.cbor").read_bytes())
    data[12] ^= 0x40
    (tmp_path / "market.cbor").write_bytes(bytes(data))
    c = A(T0 + 30)
    h = feat.Feature(c)
    assert h.m.sid == -1 and h.file == "CRC-32 mismatch (damaged)" and c.errors["market_file"] == 1
    assert ("integrity", {"file": "market.cbor", "why": "CRC-32 mismatch (damaged)"}) in c.journal.recs
    h.step()
    assert c.econ_off == 0 and h.status()["file"] == "CRC-32 mismatch (damaged)"


def test_a_clock_set_back_decides_again():
    m = Market(cfg(THREE))
    sched(m, 1, (T0, T0 + H, "p", 10.0), (T0 + H, T0 + 2 * H, "p", 100.0))
    assert m.step(T0 + H + 5, ALL) == 0b011
    assert m.step(T0 + 600, ALL) == 0  # a new signed time an hour back: the earlier interval rules
