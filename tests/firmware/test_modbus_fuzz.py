"""Fuzzing the Modbus parsers (and the RTU master's receive path).

Under the real micropython: seeded random and mutated frames in one process
(the 64k heap), every outcome must be a result or a ModbusError, never any
other exception and never a hang (the subprocess has a timeout).  Under
CPython: hypothesis properties over the same modules.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from agent import modbus_pdu as pdu, modbus_rtu as rtu, modbus_tcp as tcp
from agent.crc import crc16_modbus
from agent.modbus_errors import ModbusError, ModbusException

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"

PARSER_FUZZ = r'''
import random, json
from agent import modbus_rtu as rtu, modbus_tcp as tcp
from agent.crc import crc16_modbus
from agent.modbus_errors import ModbusError

random.seed(SEED)
FNS = (1, 2, 3, 4, 5, 6, 15, 16)
buf = bytearray(300)
stats = {}
fails = []

def seal(b, n):
    c = crc16_modbus(b, n - 2)
    b[n - 2] = c & 0xFF
    b[n - 1] = c >> 8

def rnd_bytes(n):
    b = bytearray(n)
    for i in range(n):
        b[i] = random.getrandbits(8)
    return b

def valid_response(unit, fn, count):
    if fn <= 4:
        nb = 2 * count if fn >= 3 else (count + 7) // 8
        n = rtu.build_response(buf, unit, fn, data=bytes(rnd_bytes(nb)))
    else:
        n = rtu.build_response(buf, unit, fn, 7, count)
    return bytearray(buf[:n])

def mutate(b):
    k = random.getrandbits(3)
    if k == 0 and len(b) > 0:       # flip a bit
        i = random.getrandbits(8) % len(b)
        b[i] ^= 1 << random.getrandbits(3)
    elif k == 1:                    # truncate
        b = b[:random.getrandbits(8) % (len(b) + 1)]
    elif k == 2:                    # extend
        b = b + rnd_bytes(random.getrandbits(3))
    elif k == 3 and len(b) > 2:     # set a header byte to an edge value
        b[random.getrandbits(2) % 3] = random.choice((0, 1, 0x7F, 0x80, 0x83, 0xFF, 250, 251))
    elif k == 4:                    # random prefix
        b = rnd_bytes(1 + random.getrandbits(2)) + b
    if len(b) >= 4 and random.getrandbits(1):
        seal(b, len(b))             # valid CRC: reach the checks behind it
    return b

def note(name):
    stats[name] = stats.get(name, 0) + 1

def run(label, f):
    try:
        r = f()
    except ModbusError as e:
        note(type(e).__name__)
        return None
    except Exception as e:
        fails.append("%s %s %r" % (label, type(e).__name__, e))
        return None
    note("ok")
    return r

for case in range(N):
    unit = random.choice((0, 1, 17, 247))
    fn = random.choice(FNS)
    count = 1 + random.getrandbits(7) % (125 if fn in (3, 4, 16) else 200)
    if case % 4 == 0:
        fr = rnd_bytes(random.getrandbits(9) % 261)
    else:
        fr = mutate(valid_response(unit, fn, count))
    n = len(fr)
    mv = run("rtu.parse_response", lambda: rtu.parse_response(fr, n, unit, fn, 7 if fn > 4 else None, count))
    if mv is not None:
        exp = 2 * count if fn in (3, 4) else ((count + 7) // 8 if fn <= 2 else 4)
        if len(mv) != exp:
            fails.append("bad view length %d != %d" % (len(mv), exp))
    run("rtu.frame_len", lambda: rtu.frame_len(fr, n))
    run("rtu.frame_len/req", lambda: rtu.frame_len(fr, n, True))
    run("rtu.parse_request", lambda: rtu.parse_request(fr, n))
    # the same bytes as a TCP frame body
    t = bytearray(7) + fr[1:max(1, n - 2)]
    tl = len(t) - 6
    t[0] = 0
    t[1] = case & 0xFF
    t[4] = tl >> 8 if random.getrandbits(3) else random.getrandbits(8)
    t[5] = tl & 0xFF
    t[6] = unit
    run("tcp.parse_response", lambda: tcp.parse_response(t, len(t), case & 0xFF, unit, fn, None, count))
    run("tcp.parse_request", lambda: tcp.parse_request(t, len(t)))
    run("tcp.frame_len", lambda: tcp.frame_len(t, len(t)))
print(json.dumps({"stats": stats, "fails": fails[:20], "nfails": len(fails)}))
'''


def test_parser_fuzz_micropython(mp):
    n = 2000
    res = mp.run(PARSER_FUZZ.replace("SEED", "20261124").replace("N)", "%d)" % n), heapsize="64k", timeout=60)
    out = json.loads(res.out.strip().splitlines()[-1])
    assert out["nfails"] == 0, out["fails"]
    stats = out["stats"]
    assert sum(stats.values()) == 7 * n
    # the fuzzer reached every kind of outcome, including deep ones
    for k in ("ok", "ModbusCRCError", "ModbusFrameError", "ModbusException"):
        assert stats.get(k, 0) > 20, stats


MASTER_FUZZ = r'''
import random, asyncio, json, struct
from agent import modbus_rtu as rtu
from agent.modbus_rtu_master import RtuMaster
from agent.modbus_errors import ModbusError
from agent.compat import ticks_ms, ticks_diff

random.seed(SEED)

def rnd_bytes(n):
    b = bytearray(n)
    for i in range(n):
        b[i] = random.getrandbits(8)
    return b

class FuzzUart:
    """On each request, queue a random reply: good, noisy, corrupt, junk, none."""
    def __init__(self):
        self.q = bytearray()
        self.kind = ""
        self.buf = bytearray(300)
    def write(self, b):
        unit, fn = b[0], b[1]
        cnt = (b[4] << 8) | b[5]
        regs = bytes(b[2:4]) * cnt  # register i = request address: checkable
        n = rtu.build_response(self.buf, unit, fn, data=regs)
        good = self.buf[:n]
        k = random.getrandbits(3)
        self.kind = k
        if k <= 1:
            q = bytearray(good)
        elif k == 2:
            q = rnd_bytes(random.getrandbits(3)) + good
        elif k == 3:
            q = bytearray(good)
            q[random.getrandbits(8) % len(q)] ^= 1 << random.getrandbits(3)
        elif k == 4:
            q = rnd_bytes(random.getrandbits(6))
        elif k == 5:
            q = bytearray()
        elif k == 6:
            m = rtu.build_exception(self.buf, unit, fn, 1 + random.getrandbits(2))
            q = bytearray(self.buf[:m])
        else:
            q = bytearray(good[:random.getrandbits(8) % len(good)])
        self.q = q
        return len(b)
    def readinto(self, b):
        if not self.q:
            return 0
        n = 1 + random.getrandbits(4) % len(self.q)
        for i in range(n):
            b[i] = self.q[i]
        self.q = self.q[n:]
        return n

async def main():
    u = FuzzUart()
    m = RtuMaster(u, 115200, timeout_ms=3, retries=random.getrandbits(1))
    res = {"ok": 0, "err": 0, "wrong": 0, "other": [], "max_ms": 0}
    for i in range(N):
        addr = random.getrandbits(16)
        cnt = 1 + random.getrandbits(5)
        t0 = ticks_ms()
        try:
            mv = await m.read(1 + random.getrandbits(1), 3, addr, cnt)
            if bytes(mv) != struct.pack(">H", addr) * cnt:
                res["wrong"] += 1
            res["ok"] += 1
        except ModbusError:
            res["err"] += 1
        except Exception as e:
            res["other"].append(repr(e))
        res["max_ms"] = max(res["max_ms"], ticks_diff(ticks_ms(), t0))
    res["counters"] = m.counters()
    print(json.dumps(res))

asyncio.run(main())
'''

def test_rtu_master_fuzzed_line_micropython(mp, mpy_dir):
    # the firmware as a board runs it (.mpy, tests/conftest.py): modbus_master.py from source
    # does not fit a 64k heap
    n = 300
    code = MASTER_FUZZ.replace("SEED", "7").replace("range(N)", "range(%d)" % n)
    proc = subprocess.run([mp.exe, "-X", "heapsize=64k", "-c", code], capture_output=True, timeout=60,
                          env=dict(os.environ, MICROPYPATH="%s:.frozen" % mpy_dir))
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    res = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert res["other"] == []
    assert res["wrong"] == 0  # nothing corrupt was ever accepted
    assert res["ok"] + res["err"] == n and res["ok"] > 50 and res["err"] > 50
    # never a hang: every one of the n transactions ended (answered or an error), the loop
    # above counted them all; how long the slowest took is a figure of make bench
    # (bench/run.py, "fuzzed RTU line"), not a test's bound
    print("fuzzed RTU line: %d transactions, slowest %d ms" % (n, res["max_ms"]))
    c = res["counters"]
    assert c["crc_errors"] > 0 and c["timeouts"] > 0 and c["exceptions"] > 0 and c["junk"] > 0


# ------------------------------------------------------------------ hypothesis (CPython)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
units = st.integers(0, 247)
fns = st.sampled_from([1, 2, 3, 4, 5, 6, 15, 16])


@FUZZ
@given(st.binary(max_size=300), units, fns, st.integers(1, 2000), st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_parsers_raise_only_modbus_errors(data, unit, fn, count, addr):
    for f in (
        lambda: rtu.parse_response(data, len(data), unit, fn, addr, count),
        lambda: rtu.parse_request(data),
        lambda: rtu.frame_len(data, len(data)),
        lambda: rtu.frame_len(data, len(data), True),
        lambda: tcp.parse_response(data, len(data), 1, unit, fn, addr, count),
        lambda: tcp.parse_request(data),
        lambda: tcp.frame_len(data, len(data)),
    ):
        try:
            f()
        except ModbusError:
            pass


def _sealed(b: bytes) -> bytes:
    c = crc16_modbus(b)
    return b + bytes([c & 0xFF, c >> 8])


@FUZZ
@given(st.binary(min_size=2, max_size=254), units, fns)
def test_sealed_random_frames_raise_only_modbus_errors(body, unit, fn):
    fr = _sealed(bytes([unit, fn]) + body)  # right CRC: exercise the checks behind it
    try:
        rtu.parse_response(fr, len(fr), unit, fn, None, None)
    except ModbusError:
        pass
    try:
        rtu.parse_request(fr)
    except ModbusError:
        pass


@FUZZ
@given(units, st.sampled_from([3, 4]), st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125), st.integers(0, 0xFFFF))
def test_register_response_roundtrip_and_frame_len(unit, fn, regs, tid):
    buf = bytearray(260)
    n = rtu.build_response(buf, unit, fn, data=regs)
    fr = bytes(buf[:n])
    for k in range(n + 1):  # any prefix: either "need more" or the exact total
        assert rtu.frame_len(fr, k) in (0, n)
    assert rtu.frame_len(fr, 3) == n == rtu.response_len(fn, len(regs))
    mv = rtu.parse_response(fr, n, unit, fn, 0, len(regs))
    assert list(struct.unpack(">%dH" % len(regs), mv)) == regs
    n = tcp.build_response(buf, tid, unit, fn, data=regs)
    assert list(struct.unpack(">%dH" % len(regs), tcp.parse_response(buf, n, tid, unit, fn, 0, len(regs)))) == regs


@FUZZ
@given(units, st.integers(0, 0xFFFF), st.one_of(
    st.tuples(st.sampled_from([3, 4]), st.integers(1, 125), st.none()),
    st.tuples(st.sampled_from([1, 2]), st.integers(1, 2000), st.none()),
    st.tuples(st.just(6), st.integers(0, 0xFFFF), st.none()),
    st.tuples(st.just(16), st.just(0), st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=123)),
    st.tuples(st.just(15), st.just(0), st.lists(st.booleans(), min_size=1, max_size=1968)),
))
def test_request_roundtrip_server_side(unit, addr, spec):
    fn, arg, values = spec
    buf = bytearray(300)
    n = rtu.build_request(buf, unit, fn, addr, arg, values)
    assert rtu.frame_len(buf, n, True) == n
    count = len(values) if values is not None else arg
    try:
        u, f, a, g, data = rtu.parse_request(buf, n)
    except ModbusException as e:  # only a request running past register 0xFFFF
        assert e.code == pdu.ILLEGAL_DATA_ADDRESS and addr + count > 0x10000
        return
    assert (u, f, a) == (unit, fn, addr)
    if fn == 16:
        assert list(struct.unpack(">%dH" % g, data)) == values
    elif fn == 15:
        assert [bool((data[i >> 3] >> (i & 7)) & 1) for i in range(g)] == values
    else:
        assert g == arg
