"""The control state machine, the disturbance recorder, the journal and the host's reading of
it across a `ticks_ms` wrap-around.

A board's `ticks_ms` wraps at 2**30 ms (12.4 days; MicroPython's period on 32-bit ports), and a
controller runs for months. Under CPython `agent.compat` has that very period; under the real
unix port (64-bit) the period is the port's own (2**62), read from `ticks_add(0, -1)`. Each
scenario is run twice: from an arbitrary start, and shifted so that the wrap falls in the middle
of a trip episode (delay, min-off, restore hold, stagger, meter-loss timer all spanning it). The
two runs must decide the same thing at the same relative times.
"""
from __future__ import annotations

import json
import random

import pytest

from agent import control as C
from agent.compat import ticks_add, ticks_diff

PERIOD = 1 << 30  # a board's ticks period (agent.compat's under CPython)

RUNNER = r"""
from agent.control import Controller
from agent.compat import ticks_add, ticks_diff

def build(spec):
    n, pick, delay, samples, rest, hold, minoff, stag, jit, db, loss, after, relreq = spec
    t = {"pickup_hz": pick / 1000, "delay_ms": delay, "samples": samples, "restore_hz": rest / 1000,
         "restore_hold_s": hold / 1000, "min_off_s": minoff / 1000, "stagger_s": stag / 1000,
         "jitter_s": jit / 1000, "deadband_hz": db / 1000, "release_required": relreq}
    blocks = [{"name": "b", "pins": [i], "active": 1, "miners": 1, "kw_per_miner": 1.0,
               "priority": (i * 7) % 3} for i in range(n)]
    return Controller({"nominal_hz": 60, "device": "dev-%d" % n, "trip": t, "blocks": blocks,
                       "failsafe": {"meter_loss": loss, "meter_loss_after_s": after / 1000}}, n)

def run(spec, steps, shift):
    # shift: ms added (ticks_add: modulo the ticks period) to every step time; a row per step
    c = build(spec)
    out = []
    for t, mhz, ok, sig, rel in steps:
        now = ticks_add(t, shift)
        if mhz == -2:
            r = c.tick(now, sig == 1, rel == 1)
        else:
            r = c.step(now, None if mhz < 0 else mhz / 1000, ok == 1, sig == 1, rel == 1)
        snap = c.snapshot(now)
        out.append([r, c.closed_mask, c.state, c.min_off_left_ms(now), snap and snap.get("min_off_left_ms")]
                   + [c.events[i] for i in range(c.nevents)])
    return out
"""


def episode(rnd: random.Random) -> tuple[list, list]:
    """A config and a step list holding at least one whole trip episode: normal, a dip below the
    pickup, recovery, hold, staggered restore; meter silence and ticks (no sample) mixed in."""
    n = rnd.randint(2, 4)
    pick = rnd.choice([59700, 59850])
    spec = [n, pick, rnd.choice([0, 100, 250]), rnd.randint(1, 3), pick + rnd.choice([100, 250]),
            rnd.choice([300, 1000]), rnd.choice([500, 2000]), rnd.choice([200, 700]),
            rnd.choice([0, 100, 450]), rnd.choice([0, 20]), rnd.choice(["hold", "shed"]),
            rnd.choice([200, 600]), False]
    steps = []
    t = rnd.randint(0, 10**6)

    def add(ms: int, mhz: int, ok: int = 1) -> None:
        nonlocal t
        end = t + ms
        while t < end:
            t += rnd.choice([25, 50, 50, 75])
            kind = rnd.random()
            if kind < 0.1:
                steps.append([t, -2, 1, 0, 0])                       # a tick without a sample
            else:
                steps.append([t, mhz + rnd.randint(-10, 10) if ok else -1, ok, 0, 0])

    add(1500, pick + 300)
    add(rnd.choice([400, 900]), pick - 200)         # the dip: trips
    add(rnd.choice([300, 2500]), pick + 300)        # min-off and hold run
    add(rnd.choice([0, 700]), pick + 300, ok=0)     # the meter goes silent for a while
    add(6000, pick + 300)                           # staggered restore
    return spec, steps


def cases(seed: int, k: int = 10) -> list[tuple[list, list, int]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(k):
        spec, steps = episode(rnd)
        # the wrap lands between the trip and the end of the restore
        mid = steps[len(steps) // 3 + rnd.randint(0, len(steps) // 3)][0]
        out.append((spec, steps, mid))
    return out


def _ns() -> dict:
    ns: dict = {}
    exec(RUNNER, ns)
    return ns


def test_compat_ticks_are_a_boards():
    assert ticks_add(PERIOD - 1, 1) == 0 and ticks_diff(5, PERIOD - 5) == 10 and ticks_diff(PERIOD - 5, 5) == -10


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_control_decides_the_same_across_a_wrap_cpython(seed):
    ns = _ns()
    trips = restores_after_wrap = 0
    for spec, steps, mid in cases(seed):
        base = ns["run"](spec, steps, 0)
        shift = -mid  # the step at `mid` is at ticks 0: the ones before it are just below 2**30
        wrapped = ns["run"](spec, steps, shift)
        raw = [ticks_add(s[0], shift) for s in steps]
        assert any(b < a for a, b in zip(raw, raw[1:])), "the shifted run never wrapped"
        assert wrapped == base
        trips += any(C.is_trip(row[0]) for row in base)
        restores_after_wrap += any(C.RESTORE_BLOCK in row[5:] and raw[i] < PERIOD // 2
                                   for i, row in enumerate(wrapped))
    assert trips == 10 and restores_after_wrap >= 5  # the episodes did span the wrap


def test_control_decides_the_same_across_a_wrap_micropython(mp):
    """The same episodes in the real unix port, shifted to its own (native) ticks period, and
    compared with CPython's unshifted decisions."""
    ns = _ns()
    all_cases = cases(1) + cases(2)
    expected = [ns["run"](spec, steps, 0) for spec, steps, _ in all_cases]
    code = RUNNER + r"""
import sys, json
from time import ticks_add as _ta
P = _ta(0, -1) + 1
print(json.dumps({"period": P}))
for line in sys.stdin:
    spec, steps, mid = json.loads(line)
    print(json.dumps(run(spec, steps, -mid)))  # wraps at the port's own period
"""
    stdin = "".join(json.dumps([spec, steps, mid]) + "\n" for spec, steps, mid in all_cases).encode()
    res = mp.run(code, heapsize="512k", stdin=stdin)
    lines = res.out.strip().splitlines()
    period = json.loads(lines[0])["period"]
    assert period >= PERIOD and period & (period - 1) == 0, period
    got = [json.loads(x) for x in lines[1:]]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, "case %d diverges at step %d" % (i, next(k for k in range(len(e)) if g[k] != e[k]))


# ---- the recorder: a capture whose window spans the wrap -----------------------------------------
RECORDER = r"""
from agent.journal_host import decode_capture
from agent.journal_recorder import Recorder

def capture_across(t_start, period):
    r = Recorder(pre_s=1.0, post_s=1.0, poll_ms=50)
    ms = t_start
    rec = None
    for i in range(80):
        r.add(ms % period, 60.0 - (0.5 if i >= 30 else 0.0), 100.0 + i, 15)
        if i == 30:
            r.trigger(ms % period)
        cap = r.capture(ms % period)
        if cap:
            rec = cap
        ms += 50
    return rec, [(m, hz, mask) for m, hz, kw, mask in decode_capture(rec)]
"""


def test_recorder_capture_across_the_wrap_cpython():
    ns: dict = {}
    exec(RECORDER, ns)
    ref, ref_s = ns["capture_across"](10_000, PERIOD)
    start = PERIOD - 30 * 50 - 20  # the trigger sample is the first after the wrap
    rec, samples = ns["capture_across"](start, PERIOD)
    assert rec["pre"] == ref["pre"] == 20 and len(samples) == len(ref_s) == 41
    # same window, same spacing; sample times are t0-based and never jump back at the wrap
    assert [s[1:] for s in samples] == [s[1:] for s in ref_s]
    assert [b[0] - a[0] for a, b in zip(samples, samples[1:])] == [50] * 40
    assert ticks_diff(samples[0][0] % PERIOD, rec["t0"]) == -1000


def test_recorder_capture_across_the_wrap_micropython(mp):
    ns: dict = {}
    exec(RECORDER, ns)
    start = PERIOD - 30 * 50 - 20
    want = ns["capture_across"](start, PERIOD)[1]
    res = mp.run(RECORDER + "\nimport json\nprint(json.dumps(capture_across(%d, %d)[1]))\n" % (start, PERIOD),
                 heapsize="256k")
    got = [tuple(x) for x in json.loads(res.out.strip().splitlines()[-1])]
    assert got == [tuple(x) for x in want]
