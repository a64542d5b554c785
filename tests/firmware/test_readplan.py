"""agent.readplan: the wire-aware meter read plan (docs/modbus.md "Read plan"), the same pure code
under CPython and the real micropython unix port, over every map in meters/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import readplan as rp
from agent.meter_check import validate
from agent.meter_encode import MeterMap
from agent.modbus_rtu import char_time_us, frame_gap_us


class P:
    """The plan with the names of what each read covers (for the asserts)."""

    def __init__(self, m, *a, **k):
        mm = MeterMap(m)
        self.__dict__.update(rp.make(mm, *a, **k))
        self.names_hot = [mm.names[i] for i in mm._covered(*self.hot[0])]
        self.names_slow = [tuple(mm.names[i] for i in mm._covered(s, c)) for s, c in self.slow]


def make(m, *a, **k):
    return P(m, *a, **k)


def plain(m, b):
    return json.loads(json.dumps(rp.make(MeterMap(m), b)))

METERS = Path(__file__).resolve().parents[2] / "meters"
MAPS = {p.stem: json.loads(p.read_text()) for p in sorted(METERS.glob("*.json"))}
BAUDS = (2400, 9600, 19200, 115200, None)


def test_wire_time_of_one_read():
    # 8-byte request + 9-byte reply at 11 bits a char, plus t3.5 after each frame
    assert char_time_us(9600) == 1146 and frame_gap_us(9600) == 4011
    assert rp.read_txn_us(9600, 2) == 17 * 1146 + 2 * 4011
    assert rp.read_txn_us(2400, 2) == 17 * char_time_us(2400) + 2 * frame_gap_us(2400)
    assert frame_gap_us(38400) == 1750 and frame_gap_us(115200) == 1750  # fixed above 19200
    assert rp.read_txn_us(None, 2) == 0  # TCP: no wire time
    # one more register costs two characters
    assert rp.read_txn_us(19200, 3) - rp.read_txn_us(19200, 2) == 2 * char_time_us(19200)
    # 125 registers at 2400 baud: more than a second on the wire
    assert rp.read_txn_us(2400, 125) > 1000000


def test_break_even_hole():
    # a hole is read through while cheaper than a second request: 10 registers at <= 19200 baud
    for b in (1200, 2400, 9600, 19200):
        assert rp.break_even_gap(b) in (9, 10)
    assert rp.break_even_gap(115200) > 20  # t3.5 is a fixed 1.75 ms there: long holes pay


@pytest.mark.parametrize("model", sorted(MAPS))
def test_every_map_plans_frequency_alone_and_covers_the_rest(model):
    m = MAPS[model]
    assert validate(m) == []
    qs = m["quantities"]
    for baud in BAUDS:
        p = make(m, baud)
        # the hot read: one request, frequency, plus at most the nearly-free phase-1 voltage
        assert len(p.hot) == 1
        assert p.names_hot[0] == "hz" and set(p.names_hot) <= {"hz", "v1"}
        span = 1 if qs["hz"]["type"] in ("u16", "s16") else 2
        assert p.hot[0][1] <= span + rp.HOT_EXTRA_REGS
        if p.names_hot == ["hz"]:
            assert p.hot[0] == (qs["hz"]["addr"], span)
        # every other quantity is in a slow read, inside the meter's limits
        covered = set(p.names_hot)
        for (s, c), names in zip(p.slow, p.names_slow):
            assert 1 <= c <= m.get("max_read", 125)
            for n in names:
                a = qs[n]["addr"]
                assert s <= a and a + (1 if qs[n]["type"] in ("u16", "s16") else 2) <= s + c
            covered |= set(names)
        assert covered == set(qs)
        # kW leads the slow sequence and comes every other tick
        assert "kw" in p.names_slow[0]
        assert all("kw" in p.names_slow[k] for k in range(0, len(p.slow), 2))
        # wire times from the plan, and the automatic slow tick within 1..10 s
        assert p.hot_us == sum(rp.read_txn_us(baud, c) for _, c in p.hot)
        assert p.slow_us == [rp.read_txn_us(baud, c) for _, c in p.slow]
        assert 1000 <= p.slow_ms <= 10000 and p.slow_ms % 100 == 0
        # kW alone, for the reads that need only kW (evidence after an opening, a curtailment)
        ka, kn, kitems = p.kw_read
        kspan = 1 if qs["kw"]["type"] in ("u16", "s16") else 2
        assert (ka, kn) == (qs["kw"]["addr"], kspan) and kn <= min(c for _, c in p.slow)


def test_holes_follow_the_wire_and_the_meter():
    m = {"model": "t", "function": 3, "quantities": {
        "hz": {"addr": 100, "type": "u16", "scale": 0.01},
        "kw": {"addr": 0, "type": "s32", "scale": 1},
        "v1": {"addr": 14, "type": "u16", "scale": 0.1},   # hole of 12 after kw
        "i1": {"addr": 17, "type": "u16", "scale": 0.1}}}  # hole of 2 after v1
    assert validate(m) == []
    # at 9600 a 12-register hole costs more than a second request: split
    p = make(m, 9600)
    assert p.hot == [(100, 1)] and p.slow[0] == (0, 2) and (14, 4) in p.slow
    # on TCP (no wire) the map's hole limit alone decides: one read
    assert make(m, None).slow == [(0, 18)]
    # a meter that refuses holes (max_gap 0) and long reads (max_read 2)
    m2 = dict(m, max_gap=0, max_read=2)
    assert validate(m2) == []
    p2 = make(m2, None)
    assert (14, 1) in p2.slow and (17, 1) in p2.slow and all(c <= 2 for _, c in p2.slow)
    # the configured slow tick wins over the automatic one
    assert make(m, 9600, slow_ms=250).slow_ms == 250


def test_voltage_rides_only_when_nearly_free():
    base = {"model": "t", "function": 3, "quantities": {
        "hz": {"addr": 10, "type": "f32"}, "kw": {"addr": 40, "type": "f32"}}}
    near = dict(base, quantities=dict(base["quantities"], v1={"addr": 12, "type": "f32"}))
    far = dict(base, quantities=dict(base["quantities"], v1={"addr": 18, "type": "f32"}))
    assert make(near, 9600).names_hot == ["hz", "v1"] and make(near, 9600).hot == [(10, 4)]
    assert make(far, 9600).names_hot == ["hz"] and make(far, 9600).hot == [(10, 2)]


def test_the_same_plans_in_micropython(mp):
    """The board computes the very plans the host does (all maps, all bauds)."""
    want = {k: [plain(m, b) for b in BAUDS] for k, m in MAPS.items()}
    res = mp.run("""
        import json, sys
        from agent import readplan as rp
        from agent.meter import MeterMap
        while True:
            line = sys.stdin.readline()
            if not line:
                break
            k, m = json.loads(line)
            out = []
            for b in (2400, 9600, 19200, 115200, None):
                out.append(rp.make(MeterMap(m), b))
            print(json.dumps([k, out]))
    """, stdin="".join(json.dumps([k, m]) + "\n" for k, m in MAPS.items()).encode(), heapsize="256k")
    got = dict(json.loads(line) for line in res.out.strip().splitlines())
    assert got == want
