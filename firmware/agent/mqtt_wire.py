"""MQTT 3.1.1 packet codec, the client's side (OASIS mqtt-v3.1.1-os), pure: runs under
MicroPython and CPython. The board's MQTT client (agent/mqtt.py) keeps this resident; what only a
broker encodes or decodes (CONNACK, SUBACK, ... and the CONNECT / SUBSCRIBE decoders) is in
agent/mqtt_codec.py, the whole codec, which the board never loads.

Encoders return ``bytes`` ready for the socket.  ``decode(first_byte, body)`` turns one complete
packet a broker sends (fixed-header byte + remaining-length body) into a ``Packet``; a packet only
a client sends is a ValueError here.  ``Parser`` is the incremental stream parser the client uses:
it owns one preallocated buffer of ``max_size`` bytes, takes whatever the socket delivered and
yields complete packets.

Everything that arrives from the network is untrusted: malformed bytes raise ``ValueError`` (and
only ``ValueError``; ``UnicodeError`` is a subclass) with a short reason.  A packet larger than
the parser's ``max_size`` is an error, not a reason to allocate: the caller drops the connection.

Topics are ``str`` (UTF-8 on the wire), payloads are ``bytes``.
"""
from agent.compat import const

# Control packet types (fixed header bits 7..4).
CONNECT = const(1)
CONNACK = const(2)
PUBLISH = const(3)
PUBACK = const(4)
PUBREC = const(5)
PUBREL = const(6)
PUBCOMP = const(7)
SUBSCRIBE = const(8)
SUBACK = const(9)
UNSUBSCRIBE = const(10)
UNSUBACK = const(11)
PINGREQ = const(12)
PINGRESP = const(13)
DISCONNECT = const(14)

SUBACK_FAILURE = const(0x80)
MAX_REMAINING = const(268435455)  # 4-byte varint limit (2.2.3)
MAX_STRING = const(65535)

_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"


class Packet:
    """One decoded control packet; only the fields of its type are set on the instance."""

    type = 0
    flags = 0
    pid = 0
    # PUBLISH
    topic = None
    payload = b""
    qos = 0
    retain = False
    dup = False
    # CONNACK
    session_present = False
    rc = 0
    # SUBACK: [code]
    codes = None

    def __init__(self, ptype, flags=0):
        self.type = ptype
        self.flags = flags

# ---------------------------------------------------------------------------------------------
# remaining length (variable byte integer)

def encode_varint(n):
    """Remaining length as 1..4 bytes; ValueError outside 0..268435455."""
    if n < 0 or n > MAX_REMAINING:
        raise ValueError("remaining length out of range")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_varint(buf, pos=0, end=-1):
    """Decode a remaining length at buf[pos:end] (end -1: len(buf)).  Returns (value, next_pos), or None when the bytes
    end before the varint does.  ValueError when a 4th byte still has its continuation bit."""
    val = 0
    shift = 0
    if end < 0:
        end = len(buf)
    i = pos
    while True:
        if i >= end:
            return None
        c = buf[i]
        i += 1
        val |= (c & 0x7F) << shift
        if not c & 0x80:
            return val, i
        shift += 7
        if shift >= 28:
            raise ValueError("remaining length longer than 4 bytes")


# ---------------------------------------------------------------------------------------------
# encoding

def _utf8(s):
    if isinstance(s, str):
        s = s.encode()
    elif not isinstance(s, (bytes, bytearray)):
        raise ValueError("string expected")
    return bytes(s)


def _lstr(b):
    n = len(b)
    if n > MAX_STRING:
        raise ValueError("string longer than 65535 bytes")
    return bytes((n >> 8, n & 0xFF)) + b


def _bin(p):
    if isinstance(p, str):
        return p.encode()
    if isinstance(p, (bytes, bytearray, memoryview)):
        return bytes(p)
    raise ValueError("payload must be bytes or str")


def _pid(pid):
    if not 0 < pid <= 0xFFFF:
        raise ValueError("packet id must be 1..65535")
    return bytes((pid >> 8, pid & 0xFF))


def _packet(first, body):
    return bytes((first,)) + encode_varint(len(body)) + body


def _check_topic_name(t):
    # t: bytes (UTF-8)
    if not t:
        raise ValueError("empty topic")
    if b"+" in t or b"#" in t:
        raise ValueError("wildcard in topic name")
    if b"\x00" in t:
        raise ValueError("NUL in topic")


def _check_filter(f):
    # f: bytes (UTF-8)
    if not f:
        raise ValueError("empty topic filter")
    if b"\x00" in f:
        raise ValueError("NUL in topic filter")
    levels = f.split(b"/")
    last = len(levels) - 1
    for i, lv in enumerate(levels):
        if b"#" in lv and (lv != b"#" or i != last):
            raise ValueError("bad '#' in topic filter")
        if b"+" in lv and lv != b"+":
            raise ValueError("bad '+' in topic filter")


def connect(client_id, keepalive=60, clean=True, will_topic=None, will_payload=b"", will_qos=0,
            will_retain=False, username=None, password=None):
    """CONNECT (protocol "MQTT" level 4).  will_topic=None means no will."""
    cid = _utf8(client_id)
    if not cid and not clean:
        raise ValueError("empty client id needs clean session")
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError("keepalive must be 0..65535")
    flags = 0x02 if clean else 0
    parts = [b"\x00\x04MQTT\x04", b"", bytes((keepalive >> 8, keepalive & 0xFF)), _lstr(cid)]
    if will_topic is not None:
        wt = _utf8(will_topic)
        _check_topic_name(wt)
        if not 0 <= will_qos <= 2:
            raise ValueError("will qos must be 0..2")
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        parts.append(_lstr(wt))
        parts.append(_lstr(_bin(will_payload)))
    elif will_qos or will_retain:
        raise ValueError("will qos/retain without will topic")
    if username is not None:
        flags |= 0x80
        parts.append(_lstr(_utf8(username)))
    if password is not None:
        if username is None:
            raise ValueError("password needs a user name")
        flags |= 0x40
        parts.append(_lstr(_bin(password)))
    parts[1] = bytes((flags,))
    return _packet(0x10, b"".join(parts))


def publish(topic, payload, qos=0, retain=False, dup=False, pid=0):
    """PUBLISH; qos 1/2 need pid 1..65535, qos 0 takes no pid and no dup."""
    t = _utf8(topic)
    _check_topic_name(t)
    if qos == 0:
        if dup or pid:
            raise ValueError("qos 0 publish has no dup and no packet id")
        vh = _lstr(t)
    elif qos in (1, 2):
        vh = _lstr(t) + _pid(pid)
    else:
        raise ValueError("qos must be 0..2")
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return _packet(first, vh + _bin(payload))


def _ack(first, pid):
    return bytes((first, 2)) + _pid(pid)


def puback(pid):
    return _ack(0x40, pid)


def pubrec(pid):
    return _ack(0x50, pid)


def pubcomp(pid):
    return _ack(0x70, pid)


def subscribe(pid, topics):
    """SUBSCRIBE; topics is a list of (filter, qos) or of bare filters (qos 0)."""
    body = [_pid(pid)]
    for item in topics:
        if isinstance(item, (tuple, list)):
            f, q = item
        else:
            f, q = item, 0
        fb = _utf8(f)
        _check_filter(fb)
        if not 0 <= q <= 2:
            raise ValueError("qos must be 0..2")
        body.append(_lstr(fb))
        body.append(bytes((q,)))
    if len(body) < 2:
        raise ValueError("SUBSCRIBE needs at least one topic")
    return _packet(0x82, b"".join(body))


def pingreq():
    return _PINGREQ


def disconnect():
    return _DISCONNECT


# ---------------------------------------------------------------------------------------------
# decoding

def _u16(b, i):
    if i + 2 > len(b):
        raise ValueError("truncated")
    return (b[i] << 8) | b[i + 1], i + 2


def _rstr(b, i):
    n, i = _u16(b, i)
    j = i + n
    if j > len(b):
        raise ValueError("truncated string")
    raw = bytes(b[i:j])
    if b"\x00" in raw:
        raise ValueError("NUL in string")
    return str(raw, "utf-8"), raw, j  # UnicodeError (a ValueError) on bad UTF-8


def _rbin(b, i):
    n, i = _u16(b, i)
    j = i + n
    if j > len(b):
        raise ValueError("truncated field")
    return bytes(b[i:j]), j


def _rpid(b, i):
    pid, i = _u16(b, i)
    if pid == 0:
        raise ValueError("packet id 0")
    return pid, i


def check_fixed(first):
    """Validate the first byte of a fixed header (type and its reserved flags)."""
    ptype = first >> 4
    flags = first & 0x0F
    if ptype == 0 or ptype == 15:
        raise ValueError("reserved packet type")
    if ptype == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise ValueError("publish qos 3")
        if qos == 0 and flags & 0x08:
            raise ValueError("dup on qos 0 publish")
    elif ptype in (PUBREL, SUBSCRIBE, UNSUBSCRIBE):
        if flags != 2:
            raise ValueError("bad fixed header flags")
    elif flags:
        raise ValueError("bad fixed header flags")
    return ptype


def decode(first, body):
    """Decode one packet a broker sends from its first byte and its body (bytes-like, exact
    remaining length); a packet only a client sends (CONNECT, SUBSCRIBE, ...) is a ValueError."""
    ptype = check_fixed(first)
    n = len(body)
    p = Packet(ptype, first & 0x0F)
    if ptype == PUBLISH:
        p.qos = (first >> 1) & 3
        p.retain = bool(first & 1)
        p.dup = bool(first & 8)
        p.topic, raw, i = _rstr(body, 0)
        _check_topic_name(raw)
        if p.qos:
            p.pid, i = _rpid(body, i)
        p.payload = bytes(body[i:])
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK):
        if n != 2:
            raise ValueError("ack length")
        p.pid, _ = _rpid(body, 0)
    elif ptype == CONNACK:
        if n != 2:
            raise ValueError("CONNACK length")
        if body[0] & 0xFE:
            raise ValueError("CONNACK reserved flags")
        if body[1] > 5:
            raise ValueError("CONNACK return code")
        p.session_present = bool(body[0] & 1)
        p.rc = body[1]
        if p.rc and p.session_present:
            raise ValueError("session present with refusal")
    elif ptype == PINGRESP:
        if n:
            raise ValueError("unexpected body")
    elif ptype == SUBACK:
        p.pid, i = _rpid(body, 0)
        if i >= n:
            raise ValueError("SUBACK without codes")
        p.codes = list(body[i:])
        for c in p.codes:
            if c not in (0, 1, 2, SUBACK_FAILURE):
                raise ValueError("SUBACK code")
    else:  # CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT: a client's packets
        raise ValueError("unexpected packet from broker")
    return p


# ---------------------------------------------------------------------------------------------
# incremental stream parser

class Parser:
    """Bytes in, complete packets out, in one fixed buffer of ``max_size`` bytes.

    ``for pkt in parser.feed(data): ...`` consumes all of ``data`` (any chunking, down to one
    byte at a time).  A PUBLISH whose fixed header announces more than ``max_size`` bytes is
    skipped (its bytes discarded as they arrive, counted in ``skipped``): a retained oversize
    message would otherwise end every session the moment it is redelivered. Any other packet over
    ``max_size``, or any malformed packet, raises ValueError; the parser is then reset and the
    stream must be abandoned (the client drops the connection).
    """

    def __init__(self, max_size=2048):
        if max_size < 16:
            raise ValueError("max_size too small")
        self.max_size = max_size
        self._buf = bytearray(max_size)
        self._mv = memoryview(self._buf)
        self._s = 0  # start of unparsed bytes
        self._n = 0  # end of buffered bytes
        self._skip = 0  # bytes of an oversize PUBLISH still to discard
        self.skipped = 0

    def decode(self, first, body):
        return decode(first, body)

    def reset(self):
        self._s = 0
        self._n = 0
        self._skip = 0

    def pending(self):
        """Number of buffered bytes not yet forming a complete packet."""
        return self._n - self._s

    def feed(self, data):
        try:
            src = memoryview(data)
            pos = 0
            end = len(src)
            while True:
                if self._skip and pos < end:
                    k = min(end - pos, self._skip)
                    pos += k
                    self._skip -= k
                    continue
                if pos < end:
                    if self._n == self.max_size and self._s:
                        k = self._n - self._s
                        self._buf[0:k] = bytes(self._mv[self._s:self._n])
                        self._s = 0
                        self._n = k
                    k = min(end - pos, self.max_size - self._n)
                    self._mv[self._n:self._n + k] = src[pos:pos + k]
                    self._n += k
                    pos += k
                pkt = self._take()
                if pkt is None:
                    if pos >= end:
                        return
                    if self._n == self.max_size and not self._s:
                        raise ValueError("packet too large")
                    continue
                yield pkt
        except ValueError:
            self.reset()
            raise

    def _take(self):
        s = self._s
        n = self._n
        if n <= s:
            self._s = self._n = 0
            return None
        b = self._buf
        check_fixed(b[s])
        r = decode_varint(b, s + 1, n)
        if r is None:
            if n - s >= 5:
                raise ValueError("remaining length longer than 4 bytes")
            return None
        length, i = r
        total = i - s + length
        if total > self.max_size:
            if b[s] >> 4 != PUBLISH:
                raise ValueError("packet too large")
            self.skipped += 1  # drop what is buffered of it, discard the rest as it arrives
            if n - s >= total:
                s += total
                self._s, self._n = (s, n) if s < n else (0, 0)
            else:
                self._skip = total - (n - s)
                self._s = self._n = 0
            return None
        if n - s < total:
            return None
        pkt = self.decode(b[s], self._mv[i:i + length])
        s += total
        if s >= n:
            self._s = self._n = 0
        else:
            self._s = s
        return pkt
