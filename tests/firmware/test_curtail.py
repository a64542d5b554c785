"""Partial curtailment (agent/curtail.py), the soft-block relay bank (agent/relays.py) and the
miner API reply parsing (agent/features/miners.py): pure logic, under CPython and the real MicroPython."""
from __future__ import annotations

import json

import pytest

from agent import control
from agent.curtail import Curtailer
from agent.features.miners import MinerError, check, parse_hosts, split_json
from agent.relays import RelayBank

BLOCKS = [  # name, priority, nameplate kW
    ("a", 1, 40.0), ("b", 1, 20.0), ("c", 2, 60.0), ("d", 3, 100.0), ("aux", 9, 0.0),
]


def cfg(blocks=BLOCKS, **trip):
    t = {"pickup_hz": 59.7, "restore_hz": 59.9, "restore_hold_s": 1, "min_off_s": 2, "stagger_s": 1,
         "jitter_s": 0, "release_required": False}
    t.update(trip)
    return {"device": "t", "nominal_hz": 60, "trip": t, "failsafe": {"meter_loss": "hold"},
            "meter": {"poll_ms": 50},
            "blocks": [{"name": n, "priority": p, "miners": 1, "kw_per_miner": kw, "active": 1, "pins": [i]}
                       for i, (n, p, kw) in enumerate(blocks)]}


class Journal:
    def __init__(self):
        self.recs = []

    def append(self, kind, rec):
        self.recs.append((kind, rec))


class Relays:
    pending = 0


class Site:
    """The agent's inputs a Curtailer reads, over a real Controller, and a site whose blocks
    really draw `true_kw` (which may differ from nameplate) on top of `base` kW."""

    def __init__(self, c, true_kw=None, base=50.0):
        self.cfg = c
        self.ctrl = control.Controller(c, len(c["blocks"]))
        self.true_kw = true_kw or [b["kw_per_miner"] for b in c["blocks"]]
        self.base = base
        self.shed_kw = None
        self.meter_ok = True
        self.samples = 0
        self.relays = Relays()
        self.journal = Journal()
        self.errors = {}
        self.now = 1000
        self.kw = self.load()
        self.kw_ms = None  # when kW was read (None: never; the curtailer then baselines at once)
        self.sheds = 0
        self.closes = 0

    def count(self, what):
        self.errors[what] = self.errors.get(what, 0) + 1

    def load(self, noise=0.0):
        m = self.ctrl.closed_mask
        return self.base + noise + sum(k for i, k in enumerate(self.true_kw) if m & (1 << i))

    def run(self, cur, steps, noise=None):
        for k in range(steps):
            self.now += 50
            self.samples += 1
            self.kw = self.load(noise(k) if noise else 0.0)
            self.kw_ms = self.now
            before = self.ctrl.closed_mask
            if cur.step(self.now):
                self.sheds += 1
            after = self.ctrl.closed_mask
            if after & ~before:
                self.closes += 1


def names(c, mask):
    return [c["blocks"][i]["name"] for i in range(len(c["blocks"])) if mask & (1 << i)]


@pytest.mark.parametrize("target,expect", [
    (15, ["b"]),             # smallest block of the first priority tier that covers it
    (30, ["a"]),             # 20 kW would not do: the 40 kW block of the same tier
    (50, ["a", "b"]),
    (70, ["a", "b", "c"]),   # tier 1 exhausted, then priority 2
    (500, ["a", "b", "c", "d"]),  # short: everything with load behind it, never the 0 kW block
])
def test_block_choice_by_priority_and_size(target, expect):
    c = cfg()
    s = Site(c)
    s.shed_kw = target
    cur = Curtailer(s)
    assert cur.step(s.now) is True
    assert names(c, s.ctrl.shed_mask) == expect
    assert s.ctrl.reason == control.REASON_COMMAND
    assert s.ctrl.release_required is True  # held while a target is active


def test_meter_confirms_target_met_without_more_shedding():
    c = cfg()
    s = Site(c)
    s.shed_kw = 35
    cur = Curtailer(s)
    s.run(cur, 60)
    assert names(c, s.ctrl.shed_mask) == ["a"]
    assert cur.met and cur.rounds == 1
    assert cur.measured == pytest.approx(40.0)
    assert s.journal.recs[0][0] == "curtail"


def test_baseline_is_a_kw_read_after_the_target_came():
    # kW comes with the meter's slow reads (docs/modbus.md "Read plan"): a value read before the
    # target came may be seconds old, and a baseline from it would mis-measure the reduction
    c = cfg()
    s = Site(c)
    fresh = s.kw
    s.kw = fresh - 40.0  # the load rose since this was read
    s.kw_ms = s.now
    s.now += 700
    s.shed_kw = 35
    cur = Curtailer(s, None, s.now)
    assert cur.step(s.now) is False and cur.target is None and s.ctrl.shed_mask == 0  # waits
    s.run(cur, 1)  # the next poll reads kW, then decides: baseline from that read, shed
    assert cur.target == 35 and cur.base == pytest.approx(fresh)
    assert names(c, s.ctrl.shed_mask) == ["a"]
    # a meter that never gives kW again: after 2 s the last value serves
    s2 = Site(c)
    s2.kw_ms = s2.now
    s2.now += 100
    s2.shed_kw = 35
    cur2 = Curtailer(s2, None, s2.now)
    assert cur2.step(s2.now) is False
    assert cur2.step(s2.now + 2000) is True and cur2.base == pytest.approx(s2.kw)


def test_measured_shortfall_sheds_more_blocks():
    # blocks really draw 55 % of nameplate: "a" (40 kW nameplate) delivers 22 kW for a 35 kW target
    c = cfg()
    s = Site(c, true_kw=[k * 0.55 for _, _, k in BLOCKS])
    s.shed_kw = 35
    cur = Curtailer(s)
    s.run(cur, 200)
    assert cur.rounds >= 2
    assert cur.met
    assert cur.measured >= 35 - cur.tolerance(35)
    assert names(c, s.ctrl.shed_mask) == ["a", "b", "c"]  # 22 + 11 is short by more than 1.75
    assert s.closes == 0


def reboot(s, cur):
    """The agent's state.cbor round trip: a new Controller from the snapshot, a new site object
    (same load, same meter), the curtailment episode handed back to a new Curtailer."""
    snap = s.ctrl.snapshot(s.now)
    s2 = Site(s.cfg, true_kw=s.true_kw, base=s.base)
    s2.ctrl = control.Controller(s.cfg, len(s.cfg["blocks"]), persisted=snap)
    s2.now = s.now + 3000
    s2.kw = s2.load()
    s2.shed_kw = s.shed_kw
    return s2, cur.snapshot()


def test_reboot_resumes_the_episode_instead_of_shedding_more():
    c = cfg()
    s = Site(c, true_kw=[k * 0.55 for _, _, k in BLOCKS])
    s.shed_kw = 35
    cur = Curtailer(s)
    s.run(cur, 200)
    assert cur.met
    shed = s.ctrl.shed_mask
    s2, snap = reboot(s, cur)
    cur2 = Curtailer(s2, snap, s2.now)
    assert cur2.base == cur.base and cur2.opened == cur.opened and cur2.ratio == cur.ratio
    assert s2.ctrl.release_required is True
    s2.run(cur2, 200)
    assert s2.ctrl.shed_mask == shed and s2.sheds == 0 and s2.closes == 0
    assert cur2.met
    # the naive alternative (a fresh episode) takes the reduced kW as baseline and sheds more:
    # what the persisted episode prevents
    s3, _ = reboot(s, cur)
    fresh = Curtailer(s3)
    s3.run(fresh, 200)
    assert s3.ctrl.shed_mask != shed


@pytest.mark.parametrize("bad", [[1, 2], ["x", 1, 1.0, 1], [None, "m", 1.0, 0], 7])
def test_unreadable_resume_is_counted_and_starts_fresh(bad):
    c = cfg()
    s = Site(c)
    s.shed_kw = 35
    cur = Curtailer(s, bad, s.now)
    assert s.errors == {"curtail_resume": 1} and cur.idle()
    assert cur.step(s.now) is True  # a fresh episode: sheds for the target


def test_confirmation_waits_for_network_curtailment():
    c = cfg()
    s = Site(c, true_kw=[k * 0.5 for _, _, k in BLOCKS])
    s.shed_kw = 35
    cur = Curtailer(s)
    assert cur.step(s.now)
    s.relays.pending = s.ctrl.shed_mask  # the miners have not confirmed yet
    s.run(cur, 100)
    assert cur.rounds == 1 and cur.measured is None
    s.relays.pending = 0
    s.run(cur, 100)
    assert cur.rounds >= 2 and cur.met


def test_no_chatter_with_noise_and_a_lower_target():
    c = cfg()
    s = Site(c)
    s.shed_kw = 40  # at the edge: 40 kW opened, tolerance 2 kW, meter noise +-1.5 kW
    cur = Curtailer(s)
    s.run(cur, 400, noise=lambda k: 1.5 if k % 7 < 3 else -1.5)
    assert s.closes == 0
    assert cur.rounds == 1
    s.shed_kw = 5  # a lower target never re-closes anything
    s.run(cur, 100)
    assert s.closes == 0 and names(c, s.ctrl.shed_mask) == ["a"]
    s.shed_kw = 70  # a higher one sheds more
    s.run(cur, 100)
    assert names(c, s.ctrl.shed_mask) == ["a", "b", "c"] and s.closes == 0


def test_restore_follows_controller_rules_after_target_cleared():
    c = cfg()
    s = Site(c)
    s.shed_kw = 50
    cur = Curtailer(s)
    s.run(cur, 10)
    shed = s.ctrl.shed_mask
    # min-off and hold pass with a healthy grid: the target is still active, nothing comes back
    for _ in range(100):
        s.now += 50
        s.ctrl.step(s.now, 60.0, True)
        cur.step(s.now)
    assert s.ctrl.shed_mask == shed
    s.shed_kw = None  # the restore command: target cleared + release
    assert cur.step(s.now) is False and cur.idle()
    assert s.ctrl.release_required is False
    closed_at = []
    s.ctrl.step(s.now, 60.0, True, False, True)  # hold and min-off long passed: one block at once
    if s.ctrl.shed_mask != shed:
        closed_at.append(s.now)
    t_release = s.now
    while s.ctrl.shed_mask and s.now - t_release < 20000:
        s.now += 50
        before = s.ctrl.shed_mask
        s.ctrl.step(s.now, 60.0, True)
        if s.ctrl.shed_mask != before:
            closed_at.append(s.now)
    assert s.ctrl.shed_mask == 0
    assert len(closed_at) == 2 and closed_at[1] - closed_at[0] >= 1000  # staggered


def test_no_baseline_without_meter_uses_nameplate_only():
    c = cfg()
    s = Site(c)
    s.meter_ok = False
    s.kw = None
    s.shed_kw = 30
    cur = Curtailer(s)
    s.run(cur, 1)
    s.meter_ok = False
    for _ in range(50):
        s.now += 50
        s.samples += 1
        cur.step(s.now)
    assert names(c, s.ctrl.shed_mask) == ["a"] and cur.base is None and cur.rounds == 1


# ---- RelayBank with an actuator -------------------------------------------------------------------
class Pin:
    def __init__(self, log, n, level):
        self.log, self.n = log, n
        log.append((n, level))

    def value(self, v):
        self.log.append((self.n, v))


class Hal:
    def __init__(self):
        self.log = []

    def out_pin(self, n, level):
        return Pin(self.log, n, level)


class Act:
    def __init__(self, accept=True):
        self.accept = accept
        self.hard = False
        self.calls = []

    def curtail(self, bits):
        self.calls.append(("curtail", bits))
        return bits if self.accept else 0

    def resume(self, bits):
        self.calls.append(("resume", bits))

    def powered(self, bits, on):
        self.calls.append(("powered", bits, on))

    def hard_now(self):
        return self.hard


def bank(act):
    hal = Hal()
    blocks = [{"active": 1, "pins": [i]} for i in range(3)]
    r = RelayBank(hal, blocks, True)
    r.attach(act, 0b011)  # blocks 0 and 1 have miners
    hal.log.clear()
    return r, hal


def test_soft_block_held_then_fallback_opens_relay_at_next_apply():
    act = Act()
    r, hal = bank(act)
    r.apply(0b000)                    # shed everything
    assert hal.log == [(2, 0)]        # only the relay-only block opened its pins
    assert r.mask == 0 and r.pins == 0b011 and r.held == 0b011
    r.fallback(0b010)                 # a miner of block 1 did not answer
    assert hal.log == [(2, 0)]        # marks only: nothing moves outside apply()
    r.apply(0b000)
    assert hal.log == [(2, 0), (1, 0)] and r.held == 0b001 and r.fallbacks == 1
    assert ("powered", 0b010, False) in act.calls
    r.apply(0b111)                    # restore: held block resumed (never opened), others close
    assert ("resume", 0b001) in act.calls
    assert sorted(hal.log[2:]) == [(1, 1), (2, 1)] and r.pins == 0b111 and r.held == 0


def test_hard_trip_never_waits_and_escalates_held_blocks():
    act = Act(accept=False)           # the actuator refuses: guaranteed trip
    r, hal = bank(act)
    r.apply(0b000)
    assert sorted(hal.log) == [(0, 0), (1, 0), (2, 0)] and r.held == 0
    act2 = Act()
    r2, hal2 = bank(act2)
    r2.apply(0b100)                   # soft shed of blocks 0 and 1
    assert hal2.log == [] and r2.held == 0b011
    act2.hard = True                  # e.g. frequency fell below the pickup
    r2.apply(0b100)
    assert sorted(hal2.log) == [(0, 0), (1, 0)] and r2.held == 0 and r2.pins == 0b100


# ---- miner replies -----------------------------------------------------------------------------
def test_reply_parsing_tolerates_nul_and_concatenated_objects():
    ok = {"STATUS": [{"STATUS": "S", "Code": 104, "Msg": "ASC count"}], "ASCS": [{"Count": 3}], "id": 1}
    raw = json.dumps(ok).encode() + b"\x00"
    assert check(split_json(raw), "ASCS") == {"Count": 3}
    two = json.dumps({"STATUS": ok["STATUS"]}).encode() + json.dumps({"ASCS": [{"Count": 2}]}).encode() + b"\x00\x00"
    objs = split_json(two)
    assert len(objs) == 2
    assert check(objs) is None
    with pytest.raises(MinerError, match="E 45"):
        check(split_json(b'{"STATUS":[{"STATUS":"E","Code":45,"Msg":"Access denied"}]}\x00'))
    for bad in (b"", b"\x00", b"STATUS=S,Code=1|", b'{"STATUS":[{"STATUS":"S"}', b'{"a": "}"}'):
        with pytest.raises(MinerError):
            check(split_json(bad))
    # braces inside strings do not confuse the splitter
    assert split_json(b'{"Msg":"a}{b"}{"x":1}') == [{"Msg": "a}{b"}, {"x": 1}]


def test_host_list_checked():
    blocks = [{"name": "a"}, {"name": "b"}]
    good, errs = parse_hosts([{"host": "10.0.0.5", "block": "b"},
                              {"host": "10.0.0.6", "port": 4029, "block": 0, "api": "luxos"}], blocks)
    assert good == [("10.0.0.5", 4028, 1, None), ("10.0.0.6", 4029, 0, "luxos")] and errs == []
    good, errs = parse_hosts([{"host": "miner.local", "block": 0}, {"host": "10.0.0.1", "block": "zz"},
                              "x", {"host": "10.0.0.300", "block": 0}, {"host": "10.0.0.1", "block": 0, "api": "x"},
                              {"host": "10.0.0.1", "port": 0, "block": 0}], blocks)
    assert good == [] and len(errs) == 6 and "miners.hosts[0].host" in errs[0]


def test_same_logic_under_micropython(mp):
    res = mp.run("""
        from agent import control
        from agent.curtail import Curtailer
        from agent.features.miners import split_json, check
        class J:
            def append(self, k, r): pass
        class R:
            pending = 0
        class A:
            pass
        bl = [("a", 1, 40.0), ("b", 1, 20.0), ("c", 2, 60.0)]
        cfg = {"device": "t", "nominal_hz": 60, "trip": {"pickup_hz": 59.7, "restore_hz": 59.9},
               "failsafe": {}, "meter": {"poll_ms": 50},
               "blocks": [{"name": n, "priority": p, "miners": 1, "kw_per_miner": k} for n, p, k in bl]}
        a = A()
        a.cfg = cfg; a.ctrl = control.Controller(cfg, 3); a.relays = R(); a.journal = J()
        a.meter_ok = True; a.samples = 0; a.shed_kw = 35; a.kw_ms = None
        true = [k * 0.55 for _, _, k in bl]
        def load():
            return 50 + sum(true[i] for i in range(3) if a.ctrl.closed_mask & (1 << i))
        a.kw = load()
        cur = Curtailer(a)
        now = 0
        for k in range(200):
            now += 50
            a.samples += 1
            a.kw = load()
            a.kw_ms = now
            cur.step(now)
        print("MASK", a.ctrl.shed_mask, cur.rounds, cur.met)
        print("ASCS", check(split_json(b'{"STATUS":[{"STATUS":"S"}]}{"ASCS":[{"Count":3}]}\\x00'), None))
    """, heapsize="256k")
    assert "MASK 7 2 True" in res.out  # a (22 kW real) + b (11) is still 2 kW short: c too
    assert "ASCS None" in res.out


def test_a_firm_block_is_never_a_partial_shed_candidate():
    # docs/market.md: a firm block (AI inference under an SLA) sheds only by its under-frequency
    # stage or a full utility shed, never for a kW target
    c = cfg()
    c["blocks"][0]["class"] = "firm"   # "a", priority 1, 40 kW: the first choice otherwise
    s = Site(c)
    s.shed_kw = 30
    cur = Curtailer(s)
    assert cur.step(s.now) is True
    assert names(c, s.ctrl.shed_mask) == ["b", "c"]  # tier 1 without "a": b (20 kW) is short, then c
    s.shed_kw = 1000
    cur2 = Curtailer(Site(c))
    cur2.a.shed_kw = 1000
    cur2.step(cur2.a.now)
    assert names(c, cur2.a.ctrl.shed_mask) == ["b", "c", "d"]
