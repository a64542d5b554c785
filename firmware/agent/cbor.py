"""Compact CBOR (RFC 8949) codec for untrusted input; MicroPython and CPython.

Decoding (``loads``, ``decode_prefix``):
- major types 0-7: unsigned / negative integers (full 64-bit range, so -2**64 .. 2**64-1),
  byte strings -> bytes, text strings -> str (strict UTF-8: overlongs, surrogates and
  code points above U+10FFFF are refused), arrays -> list, maps -> dict, tags -> Tag,
  false/true/null -> False/True/None, half/single/double floats -> float.
- refused with ValueError: indefinite lengths (ai 31) and the break byte, reserved
  additional-info values 28-30, simple values other than false/true/null (including
  `undefined`), nesting deeper than ``max_depth`` (default 16; each array, map and tag is
  one level), duplicate map keys, map keys that are not int/str/bytes/bool/None/float,
  any length field larger than what is left in the buffer (checked before allocating),
  truncated input and (for ``loads``) trailing bytes.
- every error on bad input is a ValueError; nothing else escapes for any byte string.
- tags are kept as ``Tag(tag, value)``; no tag is interpreted (bignum tags 2/3 stay tags).

Encoding (``dumps``) is deterministic:
- definite lengths and the shortest head for every integer / length,
- floats in the shortest of half/single/double that represents the value exactly,
  NaN as f97e00, infinities as half,
- map entries sorted by the bytewise order of their encoded keys (RFC 8949 section 4.2.1
  "core deterministic encoding"; note: not cbor2's length-first ``canonical`` order). This is
  needed because MicroPython dicts do not keep insertion order: the same dict encodes to the
  same bytes on the board and on the host.
- bool/None, int (-2**64 .. 2**64-1, else ValueError), float, bytes/bytearray/memoryview,
  str, list/tuple, dict, Tag. Other types raise TypeError. Nesting deeper than
  ``max_depth`` (also catches cycles) raises ValueError.
"""
import struct

from agent.compat import const

_MAX_DEPTH = const(16)

_UINT64_MAX = 0xFFFFFFFFFFFFFFFF


class Tag:
    """A CBOR tag (major type 6): ``Tag(17, [...])`` is a tagged COSE_Mac0."""

    __slots__ = ("tag", "value")

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value

    def __eq__(self, other):  # (!= is its negation, in MicroPython and CPython)
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __repr__(self):
        return "Tag(%d, %r)" % (self.tag, self.value)


# ---------------------------------------------------------------- encoding


def _head(out, major, n):
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n < 0x100:
        out.append(mt | 24)
        out.append(n)
    elif n < 0x10000:
        out.extend(struct.pack(">BH", mt | 25, n))
    elif n < 0x100000000:
        out.extend(struct.pack(">BI", mt | 26, n))
    else:
        out.extend(struct.pack(">BQ", mt | 27, n))


def _half_from_single(bits):
    """Half-float bits for the float32 with these bits, or None if not exact."""
    s = (bits >> 16) & 0x8000
    e = (bits >> 23) & 0xFF
    m = bits & 0x7FFFFF
    if e == 0:
        return s if m == 0 else None  # zero, or a float32 subnormal (too small for half)
    if 113 <= e <= 142:  # half normal range: unbiased exponent -14 .. 15
        if m & 0x1FFF:
            return None
        return s | ((e - 112) << 10) | (m >> 13)
    if 103 <= e <= 112:  # half subnormal
        full = m | 0x800000
        sh = 126 - e
        if full & ((1 << sh) - 1):
            return None
        return s | (full >> sh)
    return None


def _float(out, x):
    if x != x:
        out.extend(b"\xf9\x7e\x00")
        return
    try:
        b = struct.pack(">f", x)
        exact = struct.unpack(">f", b)[0] == x
    except (OverflowError, ValueError):
        exact = False
    if exact:
        bits = struct.unpack(">I", b)[0]
        h = _half_from_single(bits)
        if h is None and (bits & 0x7FFFFFFF) == 0x7F800000:
            h = ((bits >> 16) & 0x8000) | 0x7C00  # +-inf
        if h is not None:
            out.append(0xF9)
            out.extend(struct.pack(">H", h))
        else:
            out.append(0xFA)
            out.extend(b)
        return
    out.append(0xFB)
    out.extend(struct.pack(">d", x))


def _enc(out, obj, depth):
    if obj is None:
        out.append(0xF6)
    elif obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif isinstance(obj, int):
        if obj >= 0:
            if obj > _UINT64_MAX:
                raise ValueError("int out of 64-bit range")
            _head(out, 0, obj)
        else:
            n = -1 - obj
            if n > _UINT64_MAX:
                raise ValueError("int out of 64-bit range")
            _head(out, 1, n)
    elif isinstance(obj, str):
        b = obj.encode("utf-8")
        _head(out, 3, len(b))
        out.extend(b)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _head(out, 2, len(obj))
        out.extend(obj)
    elif isinstance(obj, float):
        _float(out, obj)
    else:
        if depth >= _MAX_DEPTH:
            raise ValueError("nesting too deep")
        depth += 1
        if isinstance(obj, (list, tuple)):
            _head(out, 4, len(obj))
            for v in obj:
                _enc(out, v, depth)
        elif isinstance(obj, dict):
            _head(out, 5, len(obj))
            if len(obj) < 2:
                for k in obj:
                    _enc(out, k, depth)
                    _enc(out, obj[k], depth)
            else:
                # RFC 8949 4.2.1: keys sorted by their encoded bytes (MicroPython dicts
                # do not keep insertion order, so "order given" would not be deterministic)
                items = []
                for k in obj:
                    kb = bytearray()
                    _enc(kb, k, depth)
                    items.append((bytes(kb), k))
                # by the encoded key: two keys of one dict never encode alike (NaN keys
                # aside, whose tuples then compare their NaNs: False, not an error)
                items.sort()
                for kb, k in items:
                    out.extend(kb)
                    _enc(out, obj[k], depth)
        elif isinstance(obj, Tag):
            t = obj.tag
            if not isinstance(t, int) or isinstance(t, bool) or t < 0 or t > _UINT64_MAX:
                raise ValueError("bad tag number")
            _head(out, 6, t)
            _enc(out, obj.value, depth)
        else:
            raise TypeError("cannot encode %s" % type(obj).__name__)


def dumps(obj):
    """Encode ``obj`` to CBOR bytes (deterministic; see module docstring)."""
    out = bytearray()
    _enc(out, obj, 0)
    return bytes(out)


# ---------------------------------------------------------------- decoding

_ARG_FMT = (">B", ">H", ">I", ">Q")


def _check_utf8(b):
    """Strict UTF-8 (RFC 3629). MicroPython's decoder accepts overlongs and surrogates."""
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            k = 1
            lo = 0x80
            hi = 0xBF
        elif 0xE0 <= c <= 0xEF:
            k = 2
            lo = 0xA0 if c == 0xE0 else 0x80
            hi = 0x9F if c == 0xED else 0xBF
        elif 0xF0 <= c <= 0xF4:
            k = 3
            lo = 0x90 if c == 0xF0 else 0x80
            hi = 0x8F if c == 0xF4 else 0xBF
        else:
            raise ValueError("invalid UTF-8")
        if i + k >= n:
            raise ValueError("invalid UTF-8")
        c = b[i + 1]
        if c < lo or c > hi:
            raise ValueError("invalid UTF-8")
        for j in range(i + 2, i + k + 1):
            c = b[j]
            if c < 0x80 or c > 0xBF:
                raise ValueError("invalid UTF-8")
        i += k + 1


def _dec(buf, i, end, depth, max_depth):
    if i >= end:
        raise ValueError("truncated")
    ib = buf[i]
    i += 1
    major = ib >> 5
    ai = ib & 0x1F
    if ai < 24:
        n = ai
    elif ai < 28:
        w = 1 << (ai - 24)
        if i + w > end:
            raise ValueError("truncated")
        if major == 7:
            if ai == 24:
                n = buf[i]
                i += 1
                if n < 32:
                    raise ValueError("bad simple value")
                raise ValueError("unsupported simple value")
            if ai == 25:
                h = struct.unpack_from(">H", buf, i)[0]
                return _half(h), i + 2
            if ai == 26:
                return struct.unpack_from(">f", buf, i)[0], i + 4
            return struct.unpack_from(">d", buf, i)[0], i + 8
        n = struct.unpack_from(_ARG_FMT[ai - 24], buf, i)[0]
        i += w
    elif ai == 31:
        raise ValueError("indefinite length not supported")
    else:
        raise ValueError("reserved additional info")

    if major == 0:
        return n, i
    if major == 1:
        return -1 - n, i
    if major == 2 or major == 3:
        if n > end - i:
            raise ValueError("length exceeds buffer")
        b = bytes(buf[i:i + n])
        i += n
        if major == 2:
            return b, i
        _check_utf8(b)
        try:
            return b.decode("utf-8"), i
        except Exception:
            raise ValueError("invalid UTF-8")
    if major == 7:
        if n == 20:
            return False, i
        if n == 21:
            return True, i
        if n == 22:
            return None, i
        raise ValueError("unsupported simple value")
    if depth >= max_depth:
        raise ValueError("nesting too deep")
    depth += 1
    if major == 4:
        if n > end - i:  # every item takes at least one byte
            raise ValueError("length exceeds buffer")
        lst = []
        for _ in range(n):
            v, i = _dec(buf, i, end, depth, max_depth)
            lst.append(v)
        return lst, i
    if major == 5:
        if n > (end - i) >> 1:
            raise ValueError("length exceeds buffer")
        d = {}
        for _ in range(n):
            k, i = _dec(buf, i, end, depth, max_depth)
            if not (k is None or isinstance(k, (int, str, bytes, float))):
                raise ValueError("unsupported map key type")
            if k in d:
                raise ValueError("duplicate map key")
            v, i = _dec(buf, i, end, depth, max_depth)
            d[k] = v
        return d, i
    # major 6: tag
    v, i = _dec(buf, i, end, depth, max_depth)
    return Tag(n, v), i


def _half(h):
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = m * 5.960464477539063e-08  # 2**-24, exact
    elif e == 31:
        v = float("inf") if m == 0 else float("nan")
    else:
        v = (m + 1024) * (2.0 ** (e - 25))
    return -v if h & 0x8000 else v


def decode_prefix(buf, offset=0, max_depth=_MAX_DEPTH):
    """Decode one CBOR item starting at ``offset``; return ``(obj, next_offset)``."""
    if offset < 0 or offset > len(buf):
        raise ValueError("offset out of range")
    try:
        return _dec(buf, offset, len(buf), 0, max_depth)
    except ValueError:
        raise
    except (IndexError, TypeError, KeyError, RuntimeError, OverflowError) as e:
        # defence in depth: a codec bug must still look like bad input to callers
        raise ValueError("malformed CBOR (%s)" % type(e).__name__)


def loads(buf, max_depth=_MAX_DEPTH):
    """Decode exactly one CBOR item that fills the whole buffer."""
    obj, i = decode_prefix(buf, 0, max_depth)
    if i != len(buf):
        raise ValueError("trailing bytes after CBOR item")
    return obj
