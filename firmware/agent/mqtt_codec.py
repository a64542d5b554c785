"""MQTT 3.1.1 packet codec, whole (OASIS mqtt-v3.1.1-os), pure: runs under MicroPython and
CPython. The client's side (encoders of what a client sends, the decoder of what a broker sends,
the stream ``Parser``) is agent/mqtt_wire.py, which the board's client keeps resident; this module
adds what a broker encodes (CONNACK, SUBACK, UNSUBACK, PINGRESP, ...) and decodes (CONNECT,
SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT): the tests' brokers use it, the board never loads it.

``decode(first_byte, body)`` turns any complete packet into a ``Packet``; ``Parser`` here yields
packets of both directions.  Everything that arrives from the network is untrusted: malformed
bytes raise ``ValueError`` (and only ``ValueError``; ``UnicodeError`` is a subclass) with a short
reason.  Topics are ``str`` (UTF-8 on the wire), payloads are ``bytes``.
"""
from agent import mqtt_wire as _w
from agent.mqtt_wire import (CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP,  # noqa: F401
                             SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT,
                             SUBACK_FAILURE, MAX_REMAINING, MAX_STRING, Packet, encode_varint,
                             decode_varint, connect, publish, puback, pubrec, pubcomp, subscribe,
                             pingreq, disconnect, check_fixed, _utf8, _lstr, _pid, _packet,
                             _check_topic_name, _check_filter, _ack, _u16, _rstr, _rbin, _rpid)

NAMES = ("reserved", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
         "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT",
         "reserved")

# CONNACK return codes (3.2.2.3).
CONNACK_TEXT = ("accepted", "unacceptable protocol version", "identifier rejected",
                "server unavailable", "bad user name or password", "not authorized")

_PINGRESP = b"\xd0\x00"


def _repr(self):
    t = NAMES[self.type]
    if self.type == PUBLISH:
        return "<%s %r %d bytes qos=%d retain=%d dup=%d pid=%d>" % (
            t, self.topic, len(self.payload), self.qos, self.retain, self.dup, self.pid)
    if self.type == CONNACK:
        return "<%s sp=%d rc=%d>" % (t, self.session_present, self.rc)
    if self.pid:
        return "<%s pid=%d>" % (t, self.pid)
    return "<%s>" % t


Packet.__repr__ = _repr  # type: ignore[method-assign,assignment]  # names in the tests' logs


def connack(return_code=0, session_present=False):
    if not 0 <= return_code <= 5:
        raise ValueError("bad CONNACK return code")
    return bytes((0x20, 2, 1 if session_present and return_code == 0 else 0, return_code))


def pubrel(pid):
    return _ack(0x62, pid)


def unsuback(pid):
    return _ack(0xB0, pid)


def suback(pid, codes):
    for c in codes:
        if c not in (0, 1, 2, SUBACK_FAILURE):
            raise ValueError("bad SUBACK code")
    if not codes:
        raise ValueError("SUBACK needs at least one code")
    return _packet(0x90, _pid(pid) + bytes(codes))


def unsubscribe(pid, filters):
    body = [_pid(pid)]
    for f in filters:
        fb = _utf8(f)
        _check_filter(fb)
        body.append(_lstr(fb))
    if len(body) < 2:
        raise ValueError("UNSUBSCRIBE needs at least one topic")
    return _packet(0xA2, b"".join(body))


def pingresp():
    return _PINGRESP


def set_dup(packet):
    """A QoS>0 PUBLISH packet (bytes) with its DUP flag set, for retransmission."""
    return bytes((packet[0] | 0x08,)) + packet[1:]


def decode(first, body):
    """Decode one packet (either direction) from its first byte and its body."""
    ptype = first >> 4
    if ptype not in (CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT):
        return _w.decode(first, body)
    check_fixed(first)
    n = len(body)
    p = Packet(ptype, first & 0x0F)
    p.topics = None
    if ptype in (PINGREQ, DISCONNECT):
        if n:
            raise ValueError("unexpected body")
    elif ptype == SUBSCRIBE:
        p.pid, i = _rpid(body, 0)
        p.topics = []
        while i < n:
            f, raw, i = _rstr(body, i)
            _check_filter(raw)
            if i >= n:
                raise ValueError("truncated SUBSCRIBE")
            q = body[i]
            i += 1
            if q > 2:
                raise ValueError("SUBSCRIBE qos")
            p.topics.append((f, q))
        if not p.topics:
            raise ValueError("SUBSCRIBE without topics")
    elif ptype == UNSUBSCRIBE:
        p.pid, i = _rpid(body, 0)
        p.topics = []
        while i < n:
            f, raw, i = _rstr(body, i)
            _check_filter(raw)
            p.topics.append(f)
        if not p.topics:
            raise ValueError("UNSUBSCRIBE without topics")
    else:  # CONNECT
        _decode_connect(p, body)
    return p


def _decode_connect(p, b):
    name, _, i = _rstr(b, 0)
    if i + 4 > len(b):
        raise ValueError("truncated CONNECT")
    level = b[i]
    if not ((name == "MQTT" and level == 4) or (name == "MQIsdp" and level == 3)):
        raise ValueError("unsupported protocol")
    p.level = level
    p.will_topic = p.will_payload = p.username = p.password = None
    flags = b[i + 1]
    p.keepalive, i = _u16(b, i + 2)
    if flags & 0x01:
        raise ValueError("CONNECT reserved flag")
    p.clean = bool(flags & 0x02)
    will = flags & 0x04
    p.will_qos = (flags >> 3) & 3
    p.will_retain = bool(flags & 0x20)
    if p.will_qos == 3:
        raise ValueError("will qos 3")
    if not will and (p.will_qos or p.will_retain):
        raise ValueError("will flags without will")
    if flags & 0x40 and not flags & 0x80:
        raise ValueError("password without user name")
    p.client_id, _, i = _rstr(b, i)
    if will:
        p.will_topic, raw, i = _rstr(b, i)
        _check_topic_name(raw)
        p.will_payload, i = _rbin(b, i)
    if flags & 0x80:
        p.username, _, i = _rstr(b, i)
    if flags & 0x40:
        p.password, i = _rbin(b, i)
    if i != len(b):
        raise ValueError("trailing bytes in CONNECT")


class Parser(_w.Parser):
    """The stream parser for packets of both directions (a broker's, the tests')."""

    def decode(self, first, body):
        return decode(first, body)
