"""The DNP3 outstation's codec (agent/dnp3_link.py, agent/dnp3_app.py) against dnp3py, a
pure-Python IEEE 1815-2012 master written elsewhere: its request builders, link framing,
transport segmenter/reassembler and response parser talk to our Link + Outstation in process.
Then fuzzing: hypothesis under CPython (random bytes, random application payloads sealed in
valid frames: never an exception, every answer parses with dnp3py), and a seeded random run
of the same on the real micropython unix port.
"""
from __future__ import annotations

import json
from array import array

from dnp3.application.builder import build_write_request
from dnp3.application.fragment import ObjectBlock
from dnp3.application.header import RequestHeader
from dnp3.application.fragment import RequestFragment
from dnp3.application.parser import parse_response
from dnp3.application.qualifiers import ObjectHeader, PrefixCode, RangeCode
from dnp3.core.crc import compute_crc
from dnp3.core.enums import FunctionCode
from dnp3.core.flags import IIN
from dnp3.datalink.builder import build_reset_link_state, build_unconfirmed_user_data, build_primary_frame
from dnp3.core.enums import LinkFunctionCode
from dnp3.datalink.parser import FrameParser
from dnp3.master import DefaultSOEHandler, Master, MasterConfig
from dnp3.transport.reassembler import Reassembler
from dnp3.transport.segment import TransportSegment
from dnp3.transport.segmenter import Segmenter
from hypothesis import HealthCheck, given, settings, strategies as st

from agent import dnp3_app as A
from agent import dnp3_link as L


class Stack:
    """Our outstation (6 BI, 3 AI, 3 BO) and dnp3py's master codec, bytes in between."""

    def __init__(self, masters=(), unsol=False) -> None:
        self.calls: list[tuple[int, bool, bool]] = []
        self.status = 0
        self.o = A.Outstation(6, 3, 3, self.ctl, b"\x02\x02\x03", array("f", [0.01, 10.0, 0.1]), unsol)
        self.lk = L.Link(self.o, 10, masters)
        self.soe = DefaultSOEHandler()
        self.m = Master(config=MasterConfig(address=1, outstation_address=10), handler=self.soe)
        self.seg = Segmenter()
        self.fp = FrameParser()
        self.ra = Reassembler()
        self.frames: list = []

    def ctl(self, i: int, on: bool, ex: bool) -> int:
        self.calls.append((i, on, ex))
        return self.status

    def feed(self, data: bytes) -> bytes:
        out = b""
        lk = self.lk
        for i in range(0, len(data), 100):  # in pieces, as a socket delivers them
            part = data[i:i + 100]
            lk.rx[lk.have:lk.have + len(part)] = part
            lk.have += len(part)
            while True:
                k = lk.step()
                if k < 0:
                    break
                out += bytes(lk.out[:k])
        return out

    def frames_of(self, frag: bytes, source: int = 1) -> bytes:
        return b"".join(build_unconfirmed_user_data(destination=10, source=source, dir_from_master=True,
                                                    user_data=s.to_bytes()).to_bytes()
                        for s in self.seg.segment(frag))

    def xchg(self, req) -> list[bytes]:
        out = self.feed(self.frames_of(req.to_bytes()))
        frags = []
        for f in self.fp.feed(out):
            self.frames.append(f)
            if f.user_data:
                r = self.ra.add(TransportSegment.from_bytes(f.user_data))
                if r:
                    frags.append(r.data)
                    self.m.process_response(r.data)
        return frags


def crob_req(m: Master, fc: int, index: int, code: int, seq: int | None = None) -> RequestFragment:
    hdr = ObjectHeader.build(group=12, variation=1, prefix=PrefixCode.UINT8_INDEX, range_code=RangeCode(0x07))
    data = bytes([1, index, code, 1]) + bytes(9)
    h = RequestHeader.build(function=FunctionCode(fc), seq=m.next_request_sequence() if seq is None else seq)
    return RequestFragment(header=h, objects=(ObjectBlock(header=hdr, data=data),))


def crob_status(frag: bytes) -> int:
    r = parse_response(frag)
    (b,) = r.objects
    return b.data[-1]


def test_crc_matches_dnp3py():
    for data in (b"123456789", bytes(range(256)), b"\x05\x64\x05\xc0\x01\x00\x0a\x00"):
        assert L.crc(data, 0, len(data)) == compute_crc(data)
    assert L.crc(b"123456789", 0, 9) == 0xEA82  # the CRC-16/DNP check value


def test_integrity_poll_and_events_decoded_by_dnp3py():
    s = Stack()
    for i in range(6):
        s.o.update_bi(i, i % 2)
    s.o.update_ai(0, 59.95, 0x01)
    s.o.update_ai(1, 1234.5, 0x01)
    s.o.update_ai(2, 0.0, 0x04)
    fr = s.xchg(s.m.build_integrity_poll())
    assert len(fr) == 1
    r = parse_response(fr[0])
    assert r.header.control.con  # events inside: the master must confirm
    assert IIN.DEVICE_RESTART in r.header.iin and IIN.NEED_TIME in r.header.iin
    assert {k: v.value for k, v in s.soe.binary_inputs.items()} == {i: bool(i % 2) for i in range(6)}
    ai = s.soe.analog_inputs
    assert abs(ai[0].value - 59.95) < 1e-4 and abs(ai[1].value - 1234.5) < 1e-3
    assert ai[2].quality == 0x04  # comm lost, not online
    # not confirmed: the next poll reports the same events again; confirmed: they are gone
    s.xchg(s.m.build_class_poll())
    assert s.o.ne == 6
    s.xchg(s.m.build_confirm(parse_response(s.frames and fr[0]).header.control.seq))
    assert s.o.ne == 6  # a confirm of an older sequence frees nothing
    fr = s.xchg(s.m.build_class_poll())
    s.xchg(s.m.build_confirm(parse_response(fr[0]).header.control.seq))
    assert s.o.ne == 0 and s.o.counts[A.A_CONFIRM] == 1
    fr = s.xchg(s.m.build_class_poll())
    assert not parse_response(fr[0]).objects and not parse_response(fr[0]).header.control.con


def test_time_write_stamps_events_and_clears_need_time():
    s = Stack()
    t = 1_800_000_000_000
    hdr = ObjectHeader.build(group=50, variation=1, prefix=PrefixCode.NONE, range_code=RangeCode(0x07))
    fr = s.xchg(build_write_request((ObjectBlock(header=hdr, data=bytes([1]) + t.to_bytes(6, "little")),),
                                    seq=s.m.next_request_sequence()))
    assert IIN.NEED_TIME not in parse_response(fr[0]).header.iin
    s.o.update_bi(3, 1)
    got = []
    s.soe.on_binary_input = lambda values, info: got.extend(values)  # type: ignore[method-assign]
    s.xchg(s.m.build_class_poll())
    (ev,) = got
    assert ev.index == 3 and ev.value and 0 <= ev.timestamp.timestamp() * 1000 - t < 5000


def test_range_reads_time_read_lan_time_and_delay_measure():
    s = Stack()
    for i in range(6):
        s.o.update_bi(i, 1)
    # a start-stop read of BI 2..4 (qualifier 00), and of analog 1..2
    s.xchg(s.m.build_range_poll(1, 2, 2, 4))
    assert sorted(s.soe.binary_inputs) == [2, 3, 4]
    s.xchg(s.m.build_range_poll(30, 5, 1, 2))
    assert sorted(s.soe.analog_inputs) == [1, 2]
    # a range past the last point: parameter error, nothing reported
    fr = s.xchg(s.m.build_range_poll(1, 2, 0, 9))
    assert IIN.PARAMETER_ERROR in parse_response(fr[0]).header.iin
    # DELAY_MEASURE: g52v2 (0 ms); RECORD_CURRENT_TIME then WRITE g50v3 sets the time
    fr = s.xchg(s.m.build_delay_measure())
    (b,) = parse_response(fr[0]).objects
    assert (b.header.group, b.header.variation) == (52, 2)
    h = RequestHeader.build(function=FunctionCode(24), seq=s.m.next_request_sequence())
    s.xchg(RequestFragment(header=h))
    t = 1_800_000_000_000
    hdr = ObjectHeader.build(group=50, variation=3, prefix=PrefixCode.NONE, range_code=RangeCode(0x07))
    fr = s.xchg(build_write_request((ObjectBlock(header=hdr, data=bytes([1]) + t.to_bytes(6, "little")),),
                                    seq=s.m.next_request_sequence()))
    assert IIN.NEED_TIME not in parse_response(fr[0]).header.iin
    # READ g50v1: the time now, from the master's
    fr = s.xchg(s.m.build_range_poll(50, 1, 0, 0))  # start-stop is not a time read's qualifier
    assert IIN.OBJECT_UNKNOWN in parse_response(fr[0]).header.iin
    hdr = ObjectHeader.build(group=50, variation=1, prefix=PrefixCode.NONE, range_code=RangeCode(0x07))
    h = RequestHeader.build(function=FunctionCode.READ, seq=s.m.next_request_sequence())
    fr = s.xchg(RequestFragment(header=h, objects=(ObjectBlock(header=hdr, data=b"\x01"),)))
    (b,) = parse_response(fr[0]).objects
    now = int.from_bytes(b.data[1:7], "little")
    assert (b.header.group, b.header.variation) == (50, 1) and 0 <= now - t < 5000


def test_select_before_operate_and_direct_operate():
    s = Stack()
    m = s.m
    # OPERATE without SELECT: NO_SELECT, nothing executed
    assert crob_status(s.xchg(crob_req(m, 4, 0, 3))[0]) == A.ST_NO_SELECT and s.calls == []
    # SELECT checks (execute False), OPERATE with the next sequence and the same objects executes
    assert crob_status(s.xchg(crob_req(m, 3, 0, 3))[0]) == 0
    assert crob_status(s.xchg(crob_req(m, 4, 0, 3))[0]) == 0
    assert s.calls == [(0, True, False), (0, True, True)]
    # a second OPERATE: the selection was used
    assert crob_status(s.xchg(crob_req(m, 4, 0, 3))[0]) == A.ST_NO_SELECT
    # an OPERATE later than SBO_MS after its SELECT: TIMEOUT, nothing executed
    s.xchg(crob_req(m, 3, 0, 3))
    t = A.ticks_ms()
    A.ticks_ms, real = (lambda: t + A.SBO_MS + 1), A.ticks_ms
    try:
        assert crob_status(s.xchg(crob_req(m, 4, 0, 3))[0]) == A.ST_TIMEOUT
    finally:
        A.ticks_ms = real
    assert s.calls[-1] == (0, True, False)
    # SELECT of one point, OPERATE of another: NO_SELECT
    s.xchg(crob_req(m, 3, 0, 3))
    assert crob_status(s.xchg(crob_req(m, 4, 1, 3))[0]) == A.ST_NO_SELECT
    # DIRECT_OPERATE LATCH_OFF; TRIP pulse = off, CLOSE pulse = on; an unknown point; queue bit
    s.calls.clear()
    for code in (0x04, 0x81, 0x41):
        assert crob_status(s.xchg(crob_req(m, 5, 1, code))[0]) == 0
    assert s.calls == [(1, False, True), (1, False, True), (1, True, True)]
    assert crob_status(s.xchg(crob_req(m, 5, 9, 3))[0]) == A.ST_NOT_SUPPORTED
    assert crob_status(s.xchg(crob_req(m, 5, 0, 0x13))[0]) == A.ST_NOT_SUPPORTED
    # the owner refuses (e.g. disarm): its status is the answer
    s.status = A.ST_NOT_AUTHORIZED
    assert crob_status(s.xchg(crob_req(m, 5, 2, 4))[0]) == A.ST_NOT_AUTHORIZED
    # DIRECT_OPERATE_NO_ACK: executed, no answer at all
    s.status = 0
    s.calls.clear()
    assert s.xchg(crob_req(m, 6, 0, 3)) == [] and s.calls == [(0, True, True)]


def test_a_repeated_request_is_answered_again_not_executed_again():
    s = Stack()
    req = crob_req(s.m, 5, 0, 3)
    a = s.xchg(req)
    b = s.xchg(req)
    assert a == b and s.calls == [(0, True, True)] and s.o.counts[A.A_DUP] == 1
    s.lk.reset()
    s.o.session()  # a new connection: the same bytes are a new request
    s.xchg(req)
    assert len(s.calls) == 2


def test_overflow_evicts_analog_noise_before_trip_events():
    s = Stack()
    s.o.update_bi(1, 1)                  # a class 1 event (the trip)
    for i in range(60):                  # then frequency noise (class 2) and available MW (class 3)
        s.o.update_ai(0 if i % 2 else 2, 59.0 + i, 0x01)
    assert s.o.ne == A.NEV and s.o.counts[A.A_EV_LOST] == 61 - A.NEV
    classes = [s.o.ek[k] >> 2 & 3 for k in range(s.o.ne)]
    assert classes[0] == 1 and s.o.ek[0] & 3 == A.K_BI  # the trip event kept, the oldest
    # class 3 goes first (only the newest one, added last-but-one, is left), then class 2
    assert classes.count(3) == 1 and classes.count(2) == A.NEV - 2, classes
    assert s.o.ev[A.NEV - 2] == 59.0 + 58 and s.o.ev[A.NEV - 1] == 59.0 + 59


def test_event_overflow_and_a_multi_segment_answer():
    s = Stack()
    for i in range(40):  # 40 AI events in a buffer of 32: the oldest go, IIN2.3
        s.o.update_ai(1, 100.0 * (i + 1), 0x01)
    assert s.o.ne == A.NEV and s.o.counts[A.A_EV_LOST] == 8
    got = []
    s.soe.on_analog_input = lambda values, info: got.extend(values)  # type: ignore[method-assign]
    fr = s.xchg(s.m.build_class_poll())
    r = parse_response(fr[0])
    assert IIN.EVENT_BUFFER_OVERFLOW in r.header.iin
    assert [v.value for v in got] == [100.0 * (i + 1) for i in range(8, 40)]
    assert len([f for f in s.frames if f.user_data]) == 2  # 32 x 12 bytes: two transport segments
    s.xchg(s.m.build_confirm(r.header.control.seq))
    fr = s.xchg(s.m.build_class_poll())
    assert IIN.EVENT_BUFFER_OVERFLOW not in parse_response(fr[0]).header.iin


def test_link_services_and_addresses():
    s = Stack(masters=(1,))
    out = s.feed(build_reset_link_state(destination=10, source=1, dir_from_master=True).to_bytes())
    (ack,) = list(FrameParser().feed(out))
    assert ack.header.control.function_code == 0 and not ack.header.control.prm
    # confirmed user data: ACKed and processed once; the repeat (same FCB) ACKed, not processed
    seg = Segmenter().segment(crob_req(s.m, 5, 0, 3).to_bytes())[0].to_bytes()
    cf = build_primary_frame(destination=10, source=1, function_code=LinkFunctionCode.PRI_CONFIRMED_USER_DATA,
                             dir_from_master=True, fcb=True, fcv=True, user_data=seg).to_bytes()
    s.feed(cf)
    s.feed(cf)
    assert s.calls == [(0, True, True)]
    # another master, another outstation address, a broadcast: dropped, counted
    for src, dst in ((2, 10), (1, 11), (1, 0xFFFF)):
        s.feed(build_unconfirmed_user_data(destination=dst, source=src, dir_from_master=True, user_data=seg).to_bytes())
    assert len(s.calls) == 1 and s.lk.counts[L.C_ADDR] == 3


def test_bad_frames_are_counted_never_acted_on():
    s = Stack()
    good = s.frames_of(crob_req(s.m, 5, 0, 3).to_bytes())
    bad_hdr = bytearray(good)
    bad_hdr[4] ^= 1
    bad_data = bytearray(good)
    bad_data[12] ^= 0x80
    s.feed(bytes(bad_hdr) + bytes(bad_data) + b"\x00\x05\x64\x05")
    c = s.lk.counts
    assert c[L.C_HDR_CRC] == 1 and c[L.C_DATA_CRC] == 1 and c[L.C_SYNC] >= 1 and s.calls == []
    # a segment without FIR, then an oversized fragment (FIR, never FIN, > 256 bytes)
    s.feed(build_unconfirmed_user_data(destination=10, source=1, dir_from_master=True,
                                       user_data=b"\x05" + bytes(20)).to_bytes())
    for i in range(2):
        s.feed(build_unconfirmed_user_data(destination=10, source=1, dir_from_master=True,
                                           user_data=bytes([(0x40 if i == 0 else 0) | i]) + bytes(200)).to_bytes())
    assert c[L.C_TP_SEQ] == 1 and c[L.C_OVERSIZE] == 1 and s.calls == []
    # after all that (the partial frame in the buffer resynchronised away), a good request works
    s.lk.have = 0
    assert s.xchg(crob_req(s.m, 5, 0, 3)) and s.calls == [(0, True, True)]


def test_unsolicited_null_then_enabled_classes_until_confirmed(monkeypatch):
    s = Stack(unsol=True)

    def unsol() -> list:
        k = s.o.unsolicited()
        if not k:
            return []
        out = s.lk.send(0, k)
        return [parse_response(r.data) for f in s.fp.feed(bytes(s.lk.out[:out])) if f.user_data
                for r in [s.ra.add(TransportSegment.from_bytes(f.user_data))] if r]

    # the null unsolicited answer of a new session, CON + UNS, restart bit; not again before
    # its confirm timeout; after the confirm, nothing until classes are enabled
    (r,) = unsol()
    assert r.header.control.uns and r.header.control.con and not r.objects
    assert r.header.function == FunctionCode.UNSOLICITED_RESPONSE and IIN.DEVICE_RESTART in r.header.iin
    s.o.update_bi(0, 1)
    assert unsol() == []
    s.xchg(s.m.build_confirm(r.header.control.seq, uns=True))
    assert unsol() == []
    s.xchg(s.m.build_enable_unsolicited(class_2=False, class_3=False))
    s.o.update_ai(0, 60.0, 0x01)  # class 2: not enabled
    (r,) = unsol()
    assert [(b.header.group, b.header.variation) for b in r.objects] == [(2, 2)]
    # no confirm: repeated with the same sequence once UNSOL_MS passed (the clock moved on)
    assert unsol() == []
    t = A.ticks_ms()
    monkeypatch.setattr(A, "ticks_ms", lambda: t + A.UNSOL_MS + 1)
    (r2,) = unsol()
    assert r2.header.control.seq == r.header.control.seq and len(r2.objects) == 1
    s.xchg(s.m.build_confirm(r2.header.control.seq, uns=True))
    assert s.o.ne == 1 and s.o.ek[0] & 3 == A.K_AI  # the BI event freed, the class 2 one kept
    assert unsol() == []
    # disabled: FC 21; and without the owner's permission FC 20 is not supported (IIN2.0)
    s.xchg(s.m.build_disable_unsolicited())
    s.o.update_bi(1, 1)
    assert unsol() == []
    s2 = Stack()
    fr = s2.xchg(s2.m.build_enable_unsolicited())
    assert IIN.NO_FUNC_CODE_SUPPORT in parse_response(fr[0]).header.iin and s2.o.unsolicited() == 0


def seal(app: bytes, th: int = 0xC0) -> bytes:
    return build_unconfirmed_user_data(destination=10, source=1, dir_from_master=True,
                                       user_data=bytes([th]) + app[:249]).to_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    s = Stack()
    out = s.feed(data)
    assert s.calls == []  # random bytes never carry two sound CRCs and a CROB
    list(FrameParser().feed(out))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=4), st.integers(0, 255))
def test_fuzz_application_payloads(payloads, th):
    # random application fragments in valid frames (first with FIR|FIN, then any transport
    # header): the outstation answers or stays silent, never raises, and every answer is a
    # well-formed response dnp3py parses
    s = Stack()
    for i, p in enumerate(payloads):
        out = s.feed(seal(p, 0xC0 if i == 0 else th))
        ra = Reassembler()
        for f in FrameParser().feed(out):
            if f.user_data and f.header.control.function_code == 4:
                r = ra.add(TransportSegment.from_bytes(f.user_data))
                if r:
                    resp = parse_response(r.data)
                    assert resp.header.function == FunctionCode.RESPONSE


MP_FUZZ = r'''
import random, json
from array import array
from agent import dnp3_link as L, dnp3_app as A
random.seed(SEED)
calls = [0]
def ctl(i, on, ex):
    calls[0] += 1
    return 0
o = A.Outstation(8, 3, 3, ctl, b"\x02\x02\x03", array("f", [0.01, 10.0, 0.1]))
lk = L.Link(o, 10)
buf = bytearray(L.FRAME_MAX)
fails = []
def rnd(n):
    b = bytearray(n)
    for i in range(n):
        b[i] = random.getrandbits(8)
    return b
REQ = (b"\xc0\x01\x3c\x02\x06\x3c\x01\x06", b"\xc0\x05\x0c\x01\x17\x01\x00\x03\x01" + bytes(9),
       b"\xc0\x03\x0c\x01\x28\x01\x00\x02\x00\x41\x01" + bytes(9), b"\xc0\x02\x32\x01\x07\x01" + bytes(6),
       b"\xc0\x02\x50\x01\x00\x07\x07\x00", b"\xc0\x17", b"\xc0\x00")
def frame(app, th):
    n = L.put_frame(buf, 0, 0xC4, 10, 1, th, app, 0, len(app) if len(app) < 250 else 249)
    return bytes(buf[:n])
for it in range(N):
    k = random.getrandbits(2)
    app = bytearray(REQ[random.getrandbits(3) % len(REQ)])
    if k == 0:
        data = rnd(random.getrandbits(9))
    elif k == 1:
        data = frame(rnd(random.getrandbits(8)), random.getrandbits(8))
    else:
        for _ in range(1 + random.getrandbits(2)):
            j = random.getrandbits(8) % len(app)
            app[j] = random.getrandbits(8) if k == 2 else app[j] ^ (1 << random.getrandbits(3))
        if random.getrandbits(1):
            app = app[:random.getrandbits(8) % (len(app) + 1)]
        data = frame(app, 0xC0 | it & 0x3F)
        if random.getrandbits(2) == 0:  # then corrupt the frame itself
            data = bytearray(data)
            data[random.getrandbits(9) % len(data)] ^= 1 << random.getrandbits(3)
    if random.getrandbits(4) == 0:
        o.update_ai(random.getrandbits(8) % 3, random.getrandbits(16) / 7, 1)
        o.update_bi(random.getrandbits(3), random.getrandbits(1))
    try:
        p = 0
        while p < len(data):
            m = L.FRAME_MAX - lk.have
            part = data[p:p + m]
            lk.rx[lk.have:lk.have + len(part)] = part
            lk.have += len(part)
            p += len(part)
            while lk.step() >= 0:
                pass
    except Exception as e:
        fails.append("%d %r %s" % (it, e, bytes(data)))
        lk.have = 0
print(json.dumps({"fails": fails[:5], "nfails": len(fails), "calls": calls[0],
                  "link": list(lk.counts), "app": list(o.counts)}))
'''


def test_fuzz_on_micropython(board):
    n = 20000
    res = board.run(MP_FUZZ.replace("SEED", "1815").replace("range(N)", "range(%d)" % n), heapsize="80wK", timeout=120)
    out = json.loads(res.out.strip().splitlines()[-1])
    assert out["nfails"] == 0, out["fails"]
    link = dict(zip(L.COUNT_NAMES, out["link"]))
    app = dict(zip(A.COUNT_NAMES, out["app"]))
    # every kind of damage was exercised and counted
    assert link["sync"] > 50 and link["hdr_crc"] > 10 and link["data_crc"] > 10 and link["tp_seq"] > 50, link
    assert app["requests"] > 500 and app["bad_requests"] > 20 and app["unknown_object"] > 20, app


def test_gridshed_status_shows_the_outstation():
    # the technician's `gridshed status` table: the outstation's line, or an alarm when it could
    # not start for lack of RAM
    from rich.console import Console

    from gridshed.cli.board import _status_table

    def text(st: dict) -> str:
        c = Console(record=True, width=200)
        c.print(_status_table(st))
        return c.export_text()

    st = {"device": "d", "site": "s", "mask": 1, "blocks": ["a"],
          "dnp3": {"transport": "tcp", "port": 20000, "peer": "10.0.0.5", "events": 2,
                   "link": {"hdr_crc": 1, "data_crc": 2}, "app": {"requests": 7, "controls": 1, "controls_refused": 3}}}
    out = text(st)
    assert "tcp 20000, master 10.0.0.5, 7 requests, 1 controls (3 refused), bad frames 3, events waiting 2" in out
    out = text({"device": "d", "site": "s", "errors": {"dnp3_memory": 1}})
    assert "dnp3 outstation NOT started" in out


def test_start_without_ram_counts_and_unloads(monkeypatch):
    # the outstation's buffers find no RAM: counted, its code dropped from sys.modules, the agent
    # goes on (start returns None, no task created)
    import sys

    from agent.features import dnp3 as F

    class Agent:
        cfg = {"blocks": [{"miners": 1, "kw_per_miner": 1.0}],
               "dnp3": {"hz_deadband": 0.01, "kw_deadband": 1.0, "mw_deadband": 0.1, "unsolicited": False,
                        "transport": "tcp", "address": 10, "masters": [], "allow": [], "port": 1}}
        errors: dict = {}

        def count(self, what):
            self.errors[what] = self.errors.get(what, 0) + 1

    def no_ram(*a, **k):
        raise MemoryError

    monkeypatch.setattr(F.app, "Outstation", no_ram)
    a = Agent()
    try:
        assert F.start(a) is None
        assert a.errors == {"dnp3_memory": 1} and not hasattr(a, "dnp3")
        assert "agent.features.dnp3" not in sys.modules and "agent.dnp3_app" not in sys.modules
    finally:
        import importlib

        for n in ("agent.dnp3_link", "agent.dnp3_app", "agent.features.dnp3"):
            importlib.import_module(n)
