"""Disturbance recorder (firmware/agent/journal_recorder.py) under the real MicroPython; decoding on the host."""
from __future__ import annotations

import json
import math
import struct

import pytest

from agent import journal_read as hjr
from agent.journal_host import decode_capture, from_jsonable, parse_stream
from agent.journal_recorder import SAMPLE_SIZE, Recorder

PRE = """
import json, binascii
import agent.journal_recorder
assert agent.journal_recorder.__file__.endswith(".mpy"), agent.journal_recorder.__file__
from agent.journal_recorder import Recorder
def dump(x):
    print("J" + json.dumps(x))
def dump_rec(c):
    d = dict(c)
    d["smp"] = binascii.hexlify(c["smp"]).decode()
    dump(d)
"""


def run(board, code, cwd, heapsize="64k"):
    res = board.run(PRE + code, heapsize=heapsize, cwd=cwd)
    return [json.loads(line[1:]) for line in res.out.splitlines() if line.startswith("J")]


def unhex(d):
    d = dict(d)
    d["smp"] = bytes.fromhex(d["smp"])
    return d


def f32(x):
    return struct.unpack(">f", struct.pack(">f", x))[0]


def test_ring_wraps_and_keeps_the_newest(board, tmp_path):
    out = run(board, """
r = Recorder(pre_s=0.5, post_s=0.5, poll_ms=100)
dump([r.cap, r.count])
for i in range(30):
    r.add(i * 100, 50.0 + i / 100, float(i), i)
dump([r.cap, r.count, r.head])
r.trigger(29 * 100 - 500)
dump_rec(r.capture())
""", tmp_path)
    (cap0, count0), (cap, count, head), rec = out
    samples = [[s[0], s[3]] for s in decode_capture(unhex(rec))]  # decoded on the host (agent/journal_host.py)
    assert cap0 == cap == 12 and count0 == 0
    assert count == 12 and head == 30 % 12
    # everything older than the ring's 12 slots is gone; the window is t0-500 .. t0+500
    assert samples == [[ms, ms // 100] for ms in range(1900, 2901, 100)]


def test_pre_post_windows(board, tmp_path):
    out = run(board, """
r = Recorder(pre_s=1.0, post_s=2.0, poll_ms=50)
ms = 0
res = []
while ms < 10000:
    r.add(ms, 60.0, 100.0, 1)
    if ms == 6000:
        res.append(r.trigger(ms))
    if ms == 6500:
        res.append(r.trigger(ms))   # already pending: the running capture covers it
    c = r.capture()
    if c is not None:
        res.append(ms)
        break
    ms += 50
dump(res)
dump_rec(c)
dump(r.capture(20000))  # one capture per trigger
""", tmp_path)
    res, rec, again = out
    assert res == [True, False, 8000]  # returned exactly when post_s had elapsed
    assert again is None
    rec = unhex(rec)
    assert rec["t0"] == 6000 and rec["dt"] == 50 and rec["v"] == 1
    samples = decode_capture(rec)
    assert [s[0] for s in samples] == list(range(5000, 8001, 50))
    assert rec["pre"] == 20 and rec["ms0"] == -1000
    assert len(rec["smp"]) == 61 * SAMPLE_SIZE


def test_add_allocates_nothing(board, tmp_path):
    out = run(board, """
import gc
r = Recorder(pre_s=5, post_s=10, poll_ms=50)
hzs = [59.9 + i / 1000 for i in range(10)]
kws = [100.5 + i for i in range(10)]

def feed(n):
    ms = 0
    i = 0
    while i < n:
        r.add(ms, hzs[i % 10], kws[i % 10], i & 7)
        ms += 50
        i += 1

def idle(n):
    ms = 0
    i = 0
    while i < n:
        ms += 50
        i += 1

def main():
    feed(1)
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    idle(1000)
    b = gc.mem_alloc()
    feed(1000)
    c = gc.mem_alloc()
    gc.enable()
    dump([b - a, c - b, r.count, r.cap])
main()
""", tmp_path)[0]
    loop, growth, count, cap = out
    assert loop == 0  # the measuring loop itself allocates nothing ...
    assert growth == 0, "add() allocated %d bytes over 1000 calls" % growth
    assert count == cap == 302  # ... and the ring really was written (and wrapped)


def test_host_decode_equals_samples_and_journal_roundtrip(board, tmp_path):
    # deterministic samples, generated the same way on both sides
    def sample(i):
        ms = 1000 + i * 50 + (i % 3)  # poll jitter
        hz = 59.8 + ((i * 37) % 100) / 1000.0
        if i == 40:
            hz = float("nan")  # meter fault: no reading
        kw = 1234.5 - i * 0.37
        mask = (i * 2654435761) & 0xFFFF
        return ms, hz, kw, mask

    code = """
from agent.journal import Journal
def sample(i):
    ms = 1000 + i * 50 + (i % 3)
    hz = 59.8 + ((i * 37) % 100) / 1000.0
    if i == 40:
        hz = float("nan")
    kw = 1234.5 - i * 0.37
    mask = (i * 2654435761) & 0xFFFF
    return ms, hz, kw, mask
r = Recorder(pre_s=5.0, post_s=10.0, poll_ms=50)
j = Journal(".", seg_size=16384)
for i in range(400):
    r.add(*sample(i))
    if i == 150:
        r.trigger(sample(i)[0])
    c = r.capture()
    if c is not None:
        break
dump_rec(c)
dump([j.append("capture", c), j.seq])
from agent.journal_read import read as jread
back = list(jread(j))[-1]
dump([back["k"], back["smp"] == c["smp"], back["t0"] == c["t0"] and back["pre"] == c["pre"]])
"""
    rec, (ok, seq), same = run(board, code, tmp_path)
    assert ok and seq == 1 and same == ["capture", True, True]
    rec = unhex(rec)
    t0 = sample(150)[0]
    want = [sample(i) for i in range(400) if -5000 <= sample(i)[0] - t0 <= 10000]
    got = decode_capture(rec)
    assert len(got) == len(want) > 250 and rec["pre"] == 100
    for (gms, ghz, gkw, gmask), (ms, hz, kw, mask) in zip(got, want):
        assert gms == ms and gmask == mask
        assert gkw == f32(kw)
        if math.isnan(hz):
            assert ghz is None
        else:
            assert abs(ghz - hz) <= 0.0005
    # the host reads the journal file the board wrote and decodes the capture from it
    recs, errs = parse_stream((tmp_path / "journal.0").read_bytes())
    assert errs == [] and recs[0]["k"] == "capture"
    assert decode_capture(recs[0]) == got
    # JSON view (console replies) round-trips the packed samples
    back = from_jsonable(json.loads(json.dumps(hjr.jsonable(recs[0]))))
    assert decode_capture(back) == got


@pytest.mark.parametrize("start", [(1 << 30) - 1500, (1 << 33) - 1500])
def test_tick_wrap_long_uptime_and_cpython_same_bytes(board, tmp_path, start):
    """Uptime ms wraps at 2**30 on 32-bit ports (start 1: t0 lands on the wrap) and exceeds
    32 bits on the 64-bit unix port after 24 days (start 2): windows still come out right."""
    code = """
r = Recorder(pre_s=1.0, post_s=1.0, poll_ms=100)
P = 1 << 30
big = %d > P
ms = %d
for i in range(40):
    r.add(ms, 50.0 + i / 1000, float(i), i)
    if i == 15:
        r.trigger(ms)
    c = r.capture()
    if c is not None:
        break
    ms = ms + 100 if big else (ms + 100) & (P - 1)
dump_rec(c)
""" % (start, start)
    rec = unhex(run(board, code, tmp_path)[0])
    assert rec["pre"] == 10 and rec["ms0"] == -1000 and rec["t0"] == (start + 1500) % (1 << 30 if start < (1 << 31) else 1 << 62)
    assert [s[3] for s in decode_capture(rec)] == list(range(5, 26))
    assert [s[0] - rec["t0"] for s in decode_capture(rec)] == list(range(-1000, 1001, 100))
    # CPython runs the same module on the same inputs and packs the same bytes
    r = Recorder(pre_s=1.0, post_s=1.0, poll_ms=100)
    P = 1 << 30
    big = start > P
    ms = start
    c = None
    for i in range(40):
        r.add(ms, 50.0 + i / 1000, float(i), i)
        if i == 15:
            r.trigger(ms)
        c = r.capture()
        if c is not None:
            break
        ms = ms + 100 if big else (ms + 100) & (P - 1)
    assert c == rec


def test_decode_rejects_bad_records():
    import pytest

    for bad in ({}, {"t0": 1, "ms0": 0, "smp": b"\x00" * 7}, {"t0": 1, "ms0": 0, "smp": "x"},
                {"v": 2, "t0": 1, "ms0": 0, "smp": b""}):
        with pytest.raises(ValueError):
            decode_capture(bad)


def test_capture_in_parts_equals_whole_window():
    """The board writes the window as small parts (one per tick); together they are the window."""
    def fill(r):
        for k in range(160 + 61):  # up to t0 + post_s: the whole window is still in the ring
            r.add(k * 50, 60.0 - (0.5 if 150 <= k < 170 else 0.0), 100.0 + k, k & 0xF)
            if k == 160:
                r.trigger(k * 50)

    whole, parted = Recorder(2.0, 3.0, 50), Recorder(2.0, 3.0, 50)
    fill(whole)
    fill(parted)
    ref = decode_capture(whole.capture())
    parts = []
    while parted.ready():
        rec = parted.capture(None, 7)
        assert rec is not None and len(rec["smp"]) <= 7 * SAMPLE_SIZE
        parts.append(rec)
    assert [p["part"] for p in parts] == list(range(len(parts))) and len(parts) > 3
    got = [s for p in parts for s in decode_capture(p)]
    assert got == ref
    assert not parted.pending and parted.capture(None, 7) is None
