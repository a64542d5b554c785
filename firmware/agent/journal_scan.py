"""The journal's record parser: the recovery scan at open (agent/journal.py Journal._recover, which
loads this module for it and frees it after), the board's reader (agent/journal_read.py) and the
host's (agent/journal_host.py). Pure module: MicroPython and CPython. Format: docs/journal.md.
"""
import binascii
import os
import struct

from agent import cbor
from agent.compat import const

MAGIC = const(0xFC)  # the record format (as in agent/journal.py)
_HDR = const(3)  # magic + u16 length
_TRAILER = const(4)  # u32 CRC-32
_OVERHEAD = const(7)
MAX_BODY = const(8192)
_MAGIC_B = b"\xfc"
_CHUNK = const(64)


def _crc(buf):
    return binascii.crc32(buf) & 0xFFFFFFFF


def _try_record(read_at, off, size, max_body):
    """(obj, end) for a valid record at off, else (None, reason)."""
    if size - off < _HDR + 1 + _TRAILER:
        return None, "short"
    hdr = read_at(off, _HDR)
    if hdr[0] != MAGIC:
        return None, "magic"
    ln = (hdr[1] << 8) | hdr[2]
    if ln == 0 or ln > max_body:
        return None, "length"
    end = off + _OVERHEAD + ln
    if end > size:
        return None, "short"
    data = read_at(off + 1, 2 + ln + _TRAILER)
    if len(data) != 2 + ln + _TRAILER:
        return None, "short"
    stored = struct.unpack_from(">I", data, 2 + ln)[0]
    if _crc(data[: 2 + ln]) != stored:
        return None, "crc"
    try:
        obj = cbor.loads(data[2 : 2 + ln])
    except MemoryError:  # a good record must never be reported (or cut) as bad for want of RAM
        raise
    except Exception:  # ValueError from the codec; anything else is still bad data
        return None, "cbor"
    if not isinstance(obj, dict):
        return None, "body"
    n = obj.get("n")
    if not isinstance(n, int) or n is True or n is False or n < 0:
        return None, "body"
    return obj, end


def _next_magic(read_at, pos, size):
    while pos < size:
        n = size - pos
        chunk = read_at(pos, _CHUNK if n > _CHUNK else n)
        if not chunk:
            return size
        i = chunk.find(_MAGIC_B)
        if i >= 0:
            return pos + i
        pos += len(chunk)
    return size


def _scan(read_at, size, max_body=MAX_BODY):
    """Yield (off, end, obj, reason): obj is a record dict (reason None) or None for a bad region.

    A bad region is everything from a position where no valid record starts up to the next
    valid record (found again by its magic byte and CRC). A bad region that runs to the end of
    the data gets the reason "torn" (an interrupted last write).
    """
    off = 0
    bad = -1
    why = None
    while off < size:
        obj, r = _try_record(read_at, off, size, max_body)
        if obj is not None:
            if bad >= 0:
                yield bad, off, None, why
                bad = -1
            yield off, r, obj, None
            off = r
        else:
            if bad < 0:
                bad = off
                why = r
            off = _next_magic(read_at, off + 1, size)
    if bad >= 0:
        yield bad, size, None, "torn"


class _FileReader:
    def __init__(self, f):
        self.f = f

    def __call__(self, off, n):
        self.f.seek(off)
        return self.f.read(n)


def scan_file(path, size):
    """(end of the last valid record, largest seq) of one file."""
    good_end = 0
    last = None
    if size <= 0:
        return 0, None
    f = open(path, "rb")
    try:
        for off, end, obj, why in _scan(_FileReader(f), size):
            if obj is not None:
                good_end = end
                n = obj["n"]
                if last is None or n > last:
                    last = n
    finally:
        f.close()
    return good_end, last


def truncate(path, keep, mv):
    """Cut path to its first keep bytes without file truncate(): copy, then rename over.

    A power cut at any point leaves either the old file, or the old file plus a .tmp that
    Journal._recover() deletes, or (after the fallback remove) only the complete .tmp that
    Journal._recover() renames.
    """
    tmp = path + ".tmp"
    src = open(path, "rb")
    try:
        dst = open(tmp, "wb")
        try:
            left = keep
            while left > 0:
                n = len(mv) if left > len(mv) else left
                got = src.readinto(mv[:n])
                if not got:
                    raise OSError(5)
                dst.write(mv[:got])
                left -= got
            dst.flush()
        finally:
            dst.close()
    finally:
        src.close()
    try:
        os.rename(tmp, path)  # atomic replace on POSIX and LittleFS
    except OSError:  # FAT refuses to rename over an existing file
        os.remove(path)
        os.rename(tmp, path)
