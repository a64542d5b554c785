"""CRC-16/MODBUS and CRC-32 (pure; MicroPython and CPython).

crc16_modbus() is table driven: the 256-entry table is built once at import
into an array('H') (512 bytes) and the per-call loop allocates nothing (small
ints only, `for i in range(n)` compiles to a counter loop on MicroPython).
The result is the CRC as an int; on the wire it goes low byte first.
"""
from array import array

try:
    import binascii as _binascii

    _crc32 = getattr(_binascii, "crc32", None)
except ImportError:  # pragma: no cover - every supported port has binascii
    _crc32 = None


def _build16():
    t = array("H", range(256))
    for i in range(256):
        c = i
        for _ in range(8):
            if c & 1:
                c = (c >> 1) ^ 0xA001
            else:
                c >>= 1
        t[i] = c
    return t


_T16 = _build16()


def crc16_modbus(buf, n=None, crc=0xFFFF):
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF) of buf[:n].

    `crc` lets a caller continue a running CRC over several pieces.
    """
    if n is None:
        n = len(buf)
    t = _T16
    for i in range(n):
        crc = (crc >> 8) ^ t[(crc ^ buf[i]) & 0xFF]
    return crc


_T32 = None


def _crc32_py(data, crc=0):
    global _T32
    t = _T32
    if t is None:
        t = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            t.append(c)
        _T32 = t
    crc = ~crc & 0xFFFFFFFF
    for b in data:
        crc = (crc >> 8) ^ t[(crc ^ b) & 0xFF]
    return ~crc & 0xFFFFFFFF


def crc32(data, crc=0):
    """CRC-32 (zlib/IEEE), unsigned; binascii.crc32 when the port has it."""
    if _crc32 is not None:
        return _crc32(data, crc) & 0xFFFFFFFF
    return _crc32_py(data, crc)
