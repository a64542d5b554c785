"""agent.mqtt_codec against the real thing: paho-mqtt's bytes, a real Mosquitto, real MicroPython.

- packets paho-mqtt writes (CONNECT with will/user/password, SUBSCRIBE, PUBLISH qos 0/1,
  DISCONNECT) decode to the fields paho was given;
- packets our encoder builds are accepted by Mosquitto 2.0 (CONNACK 0, SUBACK codes, PUBACK,
  PINGRESP, last-will on a dropped socket, no will after DISCONNECT) and what Mosquitto sends
  decodes and re-encodes byte-for-byte;
- the incremental parser is fuzzed under the real micropython (seeded, 2000+ cases: only
  ValueError, no hang) and with hypothesis under CPython.
"""
from __future__ import annotations

import os
import socket
import threading

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from agent import mqtt_codec as mc
from mosquitto_broker import HOST, Mosquitto, free_port  # noqa: F401 (re-exported to test_mqtt_client)


# ------------------------------------------------------------------------------ rigs

@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


class PahoSub:
    """paho-mqtt subscriber collecting (topic, payload, retain, qos)."""

    def __init__(self, port: int, topic: str, cid: str = "paho-sub") -> None:
        self.msgs: list[tuple[str, bytes, bool, int]] = []
        self.cv = threading.Condition()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid,
                             protocol=paho.MQTTv311)
        self.c.on_message = self._on
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.connect(HOST, port, keepalive=30)
        self.c.loop_start()
        self.c.subscribe(topic, qos=1)
        assert subscribed.wait(30), "paho subscribe not acknowledged"

    def _on(self, client, userdata, msg) -> None:
        with self.cv:
            self.msgs.append((msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))
            self.cv.notify_all()

    def wait(self, pred, timeout: float = 20.0):
        with self.cv:
            ok = self.cv.wait_for(lambda: any(pred(m) for m in self.msgs), timeout)
            assert ok, f"no matching message; got {self.msgs}"
            return next(m for m in self.msgs if pred(m))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def paho_publish(port: int, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="paho-pub", protocol=paho.MQTTv311)
    c.connect(HOST, port)
    c.loop_start()
    info = c.publish(topic, payload, qos=qos, retain=retain)
    info.wait_for_publish(20)
    assert info.is_published()
    c.disconnect()
    c.loop_stop()


def read_raw(sock: socket.socket) -> bytes:
    """One whole packet, framed independently of the codec under test."""
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise EOFError("socket closed")
            out += chunk
        return out
    head = exact(1)
    mult, length, vb = 1, 0, b""
    while True:
        b = exact(1)
        vb += b
        length += (b[0] & 0x7F) * mult
        mult *= 128
        if not b[0] & 0x80:
            break
    return head + vb + exact(length)


def decode_raw(raw: bytes) -> mc.Packet:
    pkts = list(mc.Parser(max(len(raw), 16)).feed(raw))
    assert len(pkts) == 1
    return pkts[0]


# ------------------------------------------------------------------------------ unit checks

@pytest.mark.parametrize("n,enc", [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"), (2097151, b"\xff\xff\x7f"), (2097152, b"\x80\x80\x80\x01"),
    (268435455, b"\xff\xff\xff\x7f"),
])
def test_varint_spec_examples(n, enc):
    assert mc.encode_varint(n) == enc
    assert mc.decode_varint(enc) == (n, len(enc))
    assert mc.decode_varint(enc[:-1]) is None  # incomplete, not an error


def test_varint_limits():
    with pytest.raises(ValueError):
        mc.encode_varint(268435456)
    with pytest.raises(ValueError):
        mc.encode_varint(-1)
    with pytest.raises(ValueError):
        mc.decode_varint(b"\xff\xff\xff\xff\x01")
    p = mc.Parser(64)
    with pytest.raises(ValueError):
        list(p.feed(b"\x30\xff\xff\xff\xff"))


@pytest.mark.parametrize("bad", [
    b"\x00\x00",                      # reserved type 0
    b"\xf0\x00",                      # reserved type 15
    b"\x36\x05\x00\x01a\x00\x01",     # publish qos 3
    b"\x38\x04\x00\x01ab",            # dup on qos 0
    b"\x80\x06\x00\x01\x00\x01a\x00", # subscribe with flags 0
    b"\x20\x02\x00\x09",              # CONNACK rc 9
    b"\x20\x03\x00\x00\x00",          # CONNACK too long
    b"\x40\x02\x00\x00",              # PUBACK pid 0
    b"\x30\x03\x00\x03a",             # topic runs past the end
    b"\x30\x04\x00\x01+x",            # wildcard in topic name
    b"\x30\x04\x00\x02\xc3\x28",      # invalid UTF-8 topic
    b"\x30\x03\x00\x01\x00",          # NUL in topic
    b"\xc0\x01\x00",                  # PINGREQ with body
    b"\x92\x03\x00\x01\x00",          # SUBACK reserved flags
    b"\x90\x03\x00\x01\x03",          # SUBACK code 3
    b"\x82\x07\x00\x01\x00\x02a#\x00",  # '#' not alone
    b"\x10\x0c\x00\x04MQTT\x04\x41\x00\x00\x00\x00",  # password without user, reserved bit
])
def test_malformed_raise_valueerror(bad):
    with pytest.raises(ValueError):
        list(mc.Parser(64).feed(bad))


def test_oversize_packet_refused_before_body():
    p = mc.Parser(32)
    # a SUBACK header announcing 100 bytes: refused as soon as the length is known
    with pytest.raises(ValueError, match="too large"):
        list(p.feed(b"\x90\x64"))
    # the parser is reset and usable again after an error
    assert [x.type for x in p.feed(mc.pingresp())] == [mc.PINGRESP]


def test_oversize_publish_is_skipped_not_fatal():
    """Issue 13: a retained 700-byte message on the cmd topic ended every session (the broker
    redelivers it at once): an oversize PUBLISH is now discarded and counted, the stream goes on."""
    big = bytes(mc.publish("gridshed/s/d/cmd", b"x" * 700, 1, True, False, 7))
    small = bytes(mc.publish("gridshed/s/d/cmd", b"y" * 50, 0, False))
    data = big + small + big + mc.pingresp()
    for chunk in (1, 7, 256, len(data)):
        p = mc.Parser(640)
        got = []
        for i in range(0, len(data), chunk):
            got += [(x.type, bytes(x.payload) if x.type == mc.PUBLISH else None) for x in p.feed(data[i:i + chunk])]
        assert got == [(mc.PUBLISH, b"y" * 50), (mc.PINGRESP, None)] and p.skipped == 2, chunk


def test_encoder_refuses_bad_arguments():
    with pytest.raises(ValueError):
        mc.publish("a/+", b"x")
    with pytest.raises(ValueError):
        mc.publish("a", b"x", qos=1)  # no pid
    with pytest.raises(ValueError):
        mc.connect("c", password=b"p")
    with pytest.raises(ValueError):
        mc.connect("", clean=False)
    with pytest.raises(ValueError):
        mc.subscribe(1, [])
    with pytest.raises(ValueError):
        mc.subscribe(1, [("a/#/b", 0)])
    with pytest.raises(ValueError):
        mc.publish("t" * 70000, b"")


# ------------------------------------------------------------------------------ paho's bytes

class FakeBroker:
    """Accepts one client, answers CONNACK/SUBACK/PUBACK, records the raw packets it got."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.raw: list[bytes] = []
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(10)
        try:
            while True:
                raw = read_raw(conn)
                self.raw.append(raw)
                p = decode_raw(raw)
                if p.type == mc.CONNECT:
                    conn.sendall(mc.connack(0))
                elif p.type == mc.SUBSCRIBE:
                    conn.sendall(mc.suback(p.pid, [q for _, q in p.topics]))
                elif p.type == mc.PUBLISH and p.qos == 1:
                    conn.sendall(mc.puback(p.pid))
                elif p.type == mc.DISCONNECT:
                    break
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            self.sock.close()
            self.done.set()


def test_paho_packets_decode():
    fb = FakeBroker()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="paho-dev-7",
                    protocol=paho.MQTTv311, clean_session=True)
    c.will_set("gridshed/site1/dev7/state", b'{"online":false}', qos=1, retain=True)
    c.username_pw_set("tech", "s3cr\u00e9t")
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(HOST, fb.port, keepalive=17)
    c.loop_start()
    assert connected.wait(30)
    c.subscribe([("gridshed/site1/dev7/cmd", 1), ("gridshed/site1/cmd", 0)])
    big = bytes(range(256)) * 80  # 20480 bytes: 3-byte remaining length
    c.publish("gridshed/site1/dev7/telemetry", b'{"kw":12.5}', qos=0, retain=False).wait_for_publish(30)
    c.publish("gridshed/site1/dev7/state", big, qos=1, retain=True).wait_for_publish(30)
    c.disconnect()
    c.loop_stop()
    assert fb.done.wait(30)

    pk = [decode_raw(r) for r in fb.raw]
    assert [p.type for p in pk] == [mc.CONNECT, mc.SUBSCRIBE, mc.PUBLISH, mc.PUBLISH, mc.DISCONNECT]
    con = pk[0]
    assert (con.client_id, con.keepalive, con.clean, con.level) == ("paho-dev-7", 17, True, 4)
    assert (con.will_topic, con.will_payload, con.will_qos, con.will_retain) == (
        "gridshed/site1/dev7/state", b'{"online":false}', 1, True)
    assert (con.username, con.password) == ("tech", "s3cr\u00e9t".encode())
    assert pk[1].topics == [("gridshed/site1/dev7/cmd", 1), ("gridshed/site1/cmd", 0)]
    assert pk[1].pid > 0
    t = pk[2]
    assert (t.topic, t.payload, t.qos, t.retain, t.dup, t.pid) == (
        "gridshed/site1/dev7/telemetry", b'{"kw":12.5}', 0, False, False, 0)
    s = pk[3]
    assert (s.topic, s.payload, s.qos, s.retain) == ("gridshed/site1/dev7/state", big, 1, True)
    assert s.pid > 0
    # our encoder produces exactly paho's bytes for the same packets
    assert mc.connect("paho-dev-7", 17, True, "gridshed/site1/dev7/state", b'{"online":false}',
                      1, True, "tech", "s3cr\u00e9t".encode()) == fb.raw[0]
    assert mc.subscribe(pk[1].pid, pk[1].topics) == fb.raw[1]
    assert mc.publish(t.topic, t.payload) == fb.raw[2]
    assert mc.publish(s.topic, s.payload, 1, True, False, s.pid) == fb.raw[3]
    assert mc.disconnect() == fb.raw[4]


# ------------------------------------------------------------------------------ real Mosquitto

def raw_client(port: int, **kw) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=20)
    s.sendall(mc.connect(**kw))
    return s


def test_mosquitto_accepts_our_packets_and_we_decode_its(broker):
    port = broker.port
    # a retained message is waiting before we subscribe
    paho_publish(port, "gridshed/site1/dev1/cmd", b"\xd1\x84\x43\xa1\x01\x05", qos=1, retain=True)
    sub = PahoSub(port, "gridshed/#")
    try:
        s = raw_client(port, client_id="gs-dev1", keepalive=7, clean=True,
                       will_topic="gridshed/site1/dev1/state", will_payload=b'{"online":false}',
                       will_qos=1, will_retain=True, username="fleet", password=b"pw")
        raw = read_raw(s)
        assert raw == mc.connack(0) == b"\x20\x02\x00\x00"
        ca = decode_raw(raw)
        assert (ca.type, ca.rc, ca.session_present) == (mc.CONNACK, 0, False)

        s.sendall(mc.subscribe(11, [("gridshed/site1/dev1/cmd", 1), ("gridshed/site1/cmd", 0)]))
        raw = read_raw(s)
        assert raw == mc.suback(11, [1, 0])
        assert decode_raw(raw).codes == [1, 0]
        # the retained message arrives with the retain flag, qos 1 and a packet id
        raw = read_raw(s)
        p = decode_raw(raw)
        assert (p.type, p.topic, p.payload, p.retain, p.qos) == (
            mc.PUBLISH, "gridshed/site1/dev1/cmd", b"\xd1\x84\x43\xa1\x01\x05", True, 1)
        assert raw == mc.publish(p.topic, p.payload, 1, True, False, p.pid)
        s.sendall(mc.puback(p.pid))

        # live message from paho, large enough for a 3-byte remaining length
        big = os.urandom(70000)
        paho_publish(port, "gridshed/site1/cmd", big, qos=1)
        raw = read_raw(s)
        p = decode_raw(raw)
        assert (p.topic, p.payload, p.qos, p.retain, p.dup) == ("gridshed/site1/cmd", big, 0, False, False)
        assert raw == mc.publish(p.topic, p.payload)
        assert raw[1] & 0x80 and raw[2] & 0x80 and not raw[3] & 0x80

        # our QoS 1 retained publish: PUBACK with our packet id, paho sees it retained
        s.sendall(mc.publish("gridshed/site1/dev1/state", b'{"online":true}', 1, True, False, 4242))
        raw = read_raw(s)
        assert raw == mc.puback(4242)
        assert decode_raw(raw).pid == 4242
        sub.wait(lambda m: m[0] == "gridshed/site1/dev1/state" and m[1] == b'{"online":true}')

        s.sendall(mc.pingreq())
        raw = read_raw(s)
        assert raw == mc.pingresp() == b"\xd0\x00"

        # drop the socket without DISCONNECT: Mosquitto publishes our will
        s.close()
        m = sub.wait(lambda m: m[1] == b'{"online":false}')
        assert m[0] == "gridshed/site1/dev1/state"
        late = PahoSub(port, "gridshed/site1/dev1/state", cid="paho-late")
        m = late.wait(lambda m: True)
        assert m[1:3] == (b'{"online":false}', True)  # retained will
        late.close()

        # with DISCONNECT the will is discarded
        s = raw_client(port, client_id="gs-dev2", keepalive=7, will_topic="gridshed/site1/dev2/state",
                       will_payload=b"WILL2")
        assert decode_raw(read_raw(s)).rc == 0
        s.sendall(mc.disconnect())
        assert s.recv(10) == b""  # broker closed its side after DISCONNECT
        s.close()
        paho_publish(port, "gridshed/site1/dev2/state", b"marker", qos=1)
        sub.wait(lambda m: m[1] == b"marker")
        assert not [m for m in sub.msgs if m[1] == b"WILL2"]
    finally:
        sub.close()
    log = broker.logtext(tail=10**6)
    assert "gs-dev1" in log and "k7" in log and "u'fleet'" in log  # Mosquitto saw our CONNECT


def test_mosquitto_rejects_protocol_violation_we_also_reject(broker):
    """Differential on a malformed packet: SUBSCRIBE with reserved flags 0 — Mosquitto drops the
    client, our decoder raises ValueError."""
    bad = b"\x80" + mc.subscribe(1, ["a/b"])[1:]
    with pytest.raises(ValueError):
        decode_raw(bad)
    s = raw_client(broker.port, client_id="gs-bad")
    assert decode_raw(read_raw(s)).rc == 0
    s.sendall(bad)
    s.settimeout(20)
    assert s.recv(10) == b""
    s.close()


# ------------------------------------------------------------------------------ MicroPython

MP_FUZZ = r"""
import random
from agent import mqtt_codec as mc
random.seed(20261124)

def rb(n):
    return bytes([random.getrandbits(8) for _ in range(n)])

def rtopic():
    words = ["gridshed", "site1", "dev1", "cmd", "state", "telemetry", "\u00e9t\u00e9", "x"]
    return "/".join(words[random.getrandbits(3)] for _ in range(1 + random.getrandbits(2)))

def valid():
    k = random.getrandbits(4)
    if k == 0:
        return mc.connect("dev%d" % random.getrandbits(8), random.getrandbits(16), True,
                          rtopic(), rb(random.getrandbits(5)), random.getrandbits(1),
                          bool(random.getrandbits(1)), "u", rb(3))
    if k in (1, 2, 3, 4):
        q = random.getrandbits(1)
        return mc.publish(rtopic(), rb(random.getrandbits(7 if k < 4 else 9)), q,
                          bool(random.getrandbits(1)), bool(q and random.getrandbits(1)),
                          1 + random.getrandbits(15) if q else 0)
    if k == 5:
        return mc.subscribe(1 + random.getrandbits(10), [(rtopic(), 1), ("gridshed/+/cmd", 0), "a/#"])
    if k == 6:
        return mc.suback(1 + random.getrandbits(10), [0, 1, 0x80])
    if k == 7:
        return mc.puback(1 + random.getrandbits(16) % 65535)
    if k == 8:
        return mc.connack(random.getrandbits(2))
    return [mc.pingreq(), mc.pingresp(), mc.disconnect(), mc.unsubscribe(3, ["a"]),
            mc.pubrel(9), mc.unsuback(4), mc.pubrec(5)][k % 7]

def mutate(b):
    b = bytearray(b)
    for _ in range(1 + random.getrandbits(2)):
        op = random.getrandbits(3)
        if op == 0 and b:
            i = random.getrandbits(16) % len(b)
            b[i] ^= 1 << random.getrandbits(3)
        elif op == 1 and b:
            b = bytearray(b[:random.getrandbits(16) % len(b)])
        elif op == 2:
            i = random.getrandbits(16) % (len(b) + 1)
            b = bytearray(bytes(b[:i]) + rb(1 + random.getrandbits(3)) + bytes(b[i:]))
        elif op == 3 and len(b) > 1:
            b[1] = b[1] | 0x80          # corrupt the remaining length
        elif op == 4 and b:
            b[0] = random.getrandbits(8)  # any type / flags
        elif op == 5 and len(b) > 4:
            i = random.getrandbits(16) % (len(b) - 2)
            b = bytearray(bytes(b[:i]) + bytes(b[i + 1 + random.getrandbits(2):]))
        elif op == 6:
            b = bytearray(rb(random.getrandbits(6)))
        else:
            b = bytearray(bytes(b) + bytes(b[:random.getrandbits(4)]))
    return bytes(b)

cases = errors = packets = 0
for case in range(2600):
    stream = b"".join(valid() for _ in range(1 + random.getrandbits(2)))
    mutated = case % 4 != 0
    if mutated:
        stream = mutate(stream)
    p = mc.Parser(16 + random.getrandbits(10))
    pos = 0
    got = []
    try:
        while pos < len(stream):
            n = 1 + random.getrandbits(5)
            for pkt in p.feed(stream[pos:pos + n]):
                got.append(pkt)
            pos += n
        if not mutated and not p.skipped:
            # valid streams (no PUBLISH over the parser's size, which is skipped): everything
            # decodes and re-encodes to the same bytes
            again = b""
            for q in got:
                if q.type == mc.PUBLISH:
                    again += mc.publish(q.topic, q.payload, q.qos, q.retain, q.dup, q.pid)
                elif q.type == mc.CONNECT:
                    again += mc.connect(q.client_id, q.keepalive, q.clean, q.will_topic,
                                        q.will_payload, q.will_qos, q.will_retain, q.username,
                                        q.password)
                elif q.type == mc.SUBSCRIBE:
                    again += mc.subscribe(q.pid, q.topics)
                elif q.type == mc.SUBACK:
                    again += mc.suback(q.pid, q.codes)
                elif q.type == mc.CONNACK:
                    again += mc.connack(q.rc, q.session_present)
                elif q.type in (mc.PUBACK, mc.PUBREL, mc.UNSUBACK, mc.PUBREC):
                    again += {mc.PUBACK: mc.puback, mc.PUBREL: mc.pubrel,
                              mc.UNSUBACK: mc.unsuback, mc.PUBREC: mc.pubrec}[q.type](q.pid)
                elif q.type == mc.UNSUBSCRIBE:
                    again += mc.unsubscribe(q.pid, q.topics)
                else:
                    again += bytes((q.type << 4, 0))
            if again != stream[:len(again)] or (p.pending() == 0 and len(again) != len(stream)):
                print("ROUNDTRIP", case, stream.hex())
                raise SystemExit(1)
    except ValueError:
        errors += 1
    except Exception as e:
        print("BAD", case, type(e).__name__, e, stream.hex())
        raise SystemExit(1)
    cases += 1
    packets += len(got)
print("FUZZ", cases, errors, packets)
"""


def test_fuzz_parser_under_micropython(mp):
    res = mp.run(MP_FUZZ, heapsize="256k", timeout=50)
    line = [ln for ln in res.out.splitlines() if ln.startswith("FUZZ")]
    assert line, res.out + res.err
    _, cases, errors, packets = line[0].split()
    assert int(cases) >= 2000
    # mutations really break packets, and valid streams (1/4 of cases) really parse
    assert 300 < int(errors) < int(cases)
    assert int(packets) > 1000


def test_micropython_encodes_like_cpython(mp):
    """Same source, two interpreters: byte-identical packets (str/bytes/UTF-8 handling)."""
    code = """
from agent import mqtt_codec as mc
import binascii
pk = [mc.connect("d\\u00e9v1", 30, True, "gridshed/s\\u00e9/d/state", b"\\x00\\xff", 1, True, "u", b"p"),
      mc.publish("gridshed/site1/dev1/state", b'{"online":true}', 1, True, True, 65535),
      mc.publish("t", bytes(300)), mc.subscribe(7, [("gridshed/site1/cmd", 1), "a/+/b"]),
      mc.suback(7, [1, 128]), mc.connack(5), mc.pingreq(), mc.puback(1), mc.disconnect(),
      mc.encode_varint(268435455)]
for p in pk:
    print(binascii.hexlify(p).decode())
"""
    res = mp.run(code, heapsize="256k", timeout=20)
    expected = [mc.connect("d\u00e9v1", 30, True, "gridshed/s\u00e9/d/state", b"\x00\xff", 1, True, "u", b"p"),
                mc.publish("gridshed/site1/dev1/state", b'{"online":true}', 1, True, True, 65535),
                mc.publish("t", bytes(300)), mc.subscribe(7, [("gridshed/site1/cmd", 1), "a/+/b"]),
                mc.suback(7, [1, 128]), mc.connack(5), mc.pingreq(), mc.puback(1), mc.disconnect(),
                mc.encode_varint(268435455)]
    assert res.out.split() == [e.hex() for e in expected]


# ------------------------------------------------------------------------------ hypothesis

topics = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="+#\x00"),
                 min_size=1, max_size=40)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(1, 64), st.integers(16, 400))
def test_hypothesis_parser_only_valueerror(data, chunk, max_size):
    p = mc.Parser(max_size)
    try:
        for i in range(0, len(data), chunk):
            for pkt in p.feed(data[i:i + chunk]):
                assert isinstance(pkt, mc.Packet)
    except ValueError:
        pass


@settings(max_examples=300, deadline=None)
@given(topics, st.binary(max_size=600), st.integers(0, 1), st.booleans(), st.booleans(),
       st.integers(1, 65535), st.integers(1, 50))
def test_hypothesis_publish_roundtrip_any_chunking(topic, payload, qos, retain, dup, pid, chunk):
    raw = mc.publish(topic, payload, qos, retain, dup and qos > 0, pid if qos else 0)
    stream = raw + mc.pingresp() + raw
    p = mc.Parser(len(raw) + 16)
    got = []
    for i in range(0, len(stream), chunk):
        got.extend(p.feed(stream[i:i + chunk]))
    assert [g.type for g in got] == [mc.PUBLISH, mc.PINGRESP, mc.PUBLISH]
    g = got[2]
    assert (g.topic, g.payload, g.qos, g.retain, g.pid) == (topic, payload, qos, retain, pid if qos else 0)
    assert p.pending() == 0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=23), st.integers(0, 65535), st.one_of(st.none(), topics),
       st.binary(max_size=50), st.integers(0, 2), st.booleans(),
       st.one_of(st.none(), st.text(max_size=12).filter(lambda s: "\x00" not in s)),
       st.binary(max_size=12))
def test_hypothesis_connect_roundtrip(cid, ka, wt, wp, wq, wr, user, pw):
    cid = cid.replace("\x00", "") or "c"
    cid = "".join(ch for ch in cid if not 0xD800 <= ord(ch) <= 0xDFFF) or "c"
    kw = dict(client_id=cid, keepalive=ka, clean=True, username=user,
              password=pw if user is not None else None)
    if wt is not None:
        kw.update(will_topic=wt, will_payload=wp, will_qos=wq, will_retain=wr)
    p = decode_raw(mc.connect(**kw))
    assert (p.client_id, p.keepalive, p.username, p.password) == (cid, ka, user, kw["password"])
    assert p.will_topic == wt
    if wt is not None:
        assert (p.will_payload, p.will_qos, p.will_retain) == (wp, wq, wr)
