"""Append-only event journal on the board's filesystem (format: docs/journal.md).

Pure module: runs unchanged under MicroPython (boards, unix port) and CPython (host tools read
pulled segment files with agent.journal_host.parse_stream()). File I/O goes through open() and os only.

Record on flash (all integers big-endian):

    0xFC | u16 L | CBOR body (L bytes) | u32 CRC-32 over (u16 L + body)

The body is a CBOR map {"n": seq, "t": unix s or None, "ms": uptime ms, "k": kind, ...fields}.
Segments are files <prefix>.<index> in one directory; the index only grows, at most max_segs
segments are kept (the oldest is deleted when a new one is started), each at most seg_size bytes.
"""
import gc
import os
import struct
import binascii

from agent import cbor
from agent.compat import const, ticks_ms

MAGIC = const(0xFC)  # not a well-formed CBOR initial byte, so rarely seen at a record boundary
_HDR = const(3)  # magic + u16 length
_TRAILER = const(4)  # u32 CRC-32
_OVERHEAD = const(7)
MAX_BODY = const(8192)  # largest body append() writes and readers accept
_MAGIC_B = b"\xfc"
_CHUNK = const(64)

CORE_KEYS = ("n", "t", "ms", "k")


# ---------------------------------------------------------------------------------------------
# Record parsing (shared by the board's reader, the recovery scan and the host)


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


def segment_index(name, prefix="journal"):
    """Index of a segment file name (<prefix>.<int>), or None."""
    p = prefix + "."
    if not name.startswith(p):
        return None
    rest = name[len(p) :]
    if not rest or not rest.isdigit():
        return None
    return int(rest)


# ---------------------------------------------------------------------------------------------
# The journal on the board


class _FileReader:
    def __init__(self, f):
        self.f = f

    def __call__(self, off, n):
        self.f.seek(off)
        return self.f.read(n)


def _put(f, p):
    w = f.write(p)
    if w is not None and w != len(p):
        raise OSError(28)  # a short write: the disk is full


def _fsize(path):
    return os.stat(path)[6]


class Journal:
    """Append-only journal in directory `root`.

    append() never raises; counters: torn (bad tails truncated at open), io_errors (failed
    writes/opens), dropped (records not written), rotations, read_errors (bad regions met by
    the latest read()).
    """

    def __init__(self, root=".", prefix="journal", seg_size=16384, max_segs=4, clock=None,
                 uptime=None, buf_size=256, max_segments=None):
        if max_segments is not None:  # alias used by the config section "journal"
            max_segs = max_segments
        self.root = root
        self.prefix = prefix
        self.seg_size = seg_size if seg_size > 64 else 64
        self.max_segs = max_segs if max_segs > 1 else 2
        self.clock = clock
        self.uptime = uptime or ticks_ms
        self._buf = bytearray(buf_size)
        self._mv = memoryview(self._buf)
        self._hdr = self._mv[:_HDR]  # a record's header and CRC are written from these
        self._trl = self._mv[_HDR:_OVERHEAD]
        self._lenb = bytearray(2)
        self._f = None
        self._segs = []
        self._cur = 0
        self._size = 0
        self.seq = 0
        self.torn = 0
        self.io_errors = 0
        self.dropped = 0
        self.rotations = 0
        self.read_errors = 0
        self.mem_errors = 0
        try:
            self._recover()
        except Exception:
            self.io_errors += 1
            self._f = None

    # -- paths -----------------------------------------------------------------------------
    def _path(self, k):
        r = self.root
        if r in ("", "."):
            return "%s.%d" % (self.prefix, k)
        if r[-1] == "/":
            return "%s%s.%d" % (r, self.prefix, k)
        return "%s/%s.%d" % (r, self.prefix, k)

    def _list(self):
        segs = []
        tmps = []
        p = self.prefix + "."
        root = self.root if self.root else "."
        try:
            names = os.listdir(root)
        except OSError:
            os.mkdir(root)
            names = []
        for name in names:
            k = segment_index(name, self.prefix)
            if k is not None:
                segs.append(k)
            elif name.startswith(p) and name.endswith(".tmp"):
                k = segment_index(name[:-4], self.prefix)
                if k is not None:
                    tmps.append(k)
        segs.sort()
        return segs, tmps

    # -- open / recovery -------------------------------------------------------------------
    def _recover(self):
        if self._f is not None:
            try:
                self._f.close()
            except Exception:
                pass
            self._f = None
        segs, tmps = self._list()
        for k in tmps:
            tmp = self._path(k) + ".tmp"
            if k in segs:  # the copy may be partial: the original is still intact
                os.remove(tmp)
            else:  # original removed after the copy was complete: finish the rename
                os.rename(tmp, self._path(k))
                segs.append(k)
        segs.sort()
        while len(segs) > self.max_segs:  # a rotation interrupted before its delete
            os.remove(self._path(segs.pop(0)))
        if not segs:
            segs = [0]
        self._segs = segs
        self._cur = segs[-1]
        # newest segment: find the end of the last good record, truncate anything after it
        path = self._path(self._cur)
        try:
            size = _fsize(path)
        except OSError:
            size = 0
        good_end, last = self._scan_file(path, size)
        if good_end < size:
            self._truncate(path, good_end)
            self.torn += 1
        i = len(segs) - 2
        while last is None and i >= 0:  # newest empty (fresh rotation): seq from older ones
            p = self._path(segs[i])
            try:
                _, last = self._scan_file(p, _fsize(p))
            except OSError:
                pass
            i -= 1
        if last is not None and last > self.seq:
            self.seq = last
        self._f = open(path, "ab")
        self._size = good_end

    def _scan_file(self, path, size):
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

    def _truncate(self, path, keep):
        """Cut path to its first keep bytes without file truncate(): copy, then rename over.

        A power cut at any point leaves either the old file, or the old file plus a .tmp that
        _recover() deletes, or (after the fallback remove) only the complete .tmp that
        _recover() renames.
        """
        tmp = path + ".tmp"
        src = open(path, "rb")
        try:
            dst = open(tmp, "wb")
            try:
                left = keep
                mv = self._mv
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

    # -- writing ---------------------------------------------------------------------------
    def _rotate(self):
        if self._f is not None:
            self._f.close()
            self._f = None
        k = self._cur + 1
        self._f = open(self._path(k), "ab")
        self._cur = k
        self._size = 0
        self._segs.append(k)
        self.rotations += 1
        while len(self._segs) > self.max_segs:
            old = self._segs.pop(0)
            try:
                os.remove(self._path(old))
            except OSError:
                self.io_errors += 1

    def append(self, kind, fields=None):
        """Write one record {"n","t","ms","k", **fields}. True if written and flushed.

        Never raises: an unencodable body or an I/O error is counted and returns False. After
        an I/O error the next append re-runs recovery (truncating a partial record) first.
        Short of RAM (MemoryError) is not an I/O error: the heap is collected and the record
        encoded again once (mem_errors counts each), the open segment is kept as it is, and a
        record longer than the write buffer goes out in pieces, never through a second copy.
        """
        d = body = None
        for _ in range(2):
            try:
                seq = self.seq + 1
                d = {"n": seq, "t": self.clock() if self.clock else None, "ms": self.uptime(),
                     "k": kind}
                if fields:
                    for key in fields:
                        if key not in d:
                            d[key] = fields[key]
                body = cbor.dumps(d)
                break
            except MemoryError:
                d = body = None
                self.mem_errors += 1
                gc.collect()
            except Exception:
                self.dropped += 1
                return False
        if body is None:
            self.dropped += 1
            return False
        ln = len(body)
        n = ln + _OVERHEAD
        if ln > MAX_BODY:
            self.dropped += 1
            return False
        try:
            if self._f is None:
                self._recover()
                seq = self.seq + 1
                if seq != d["n"]:
                    d["n"] = seq
                    body = cbor.dumps(d)
                    ln = len(body)
                    n = ln + _OVERHEAD
            if self._size > 0 and self._size + n > self.seg_size:
                self._rotate()
            mv = self._mv
            lb = self._lenb
            lb[0] = ln >> 8
            lb[1] = ln & 0xFF
            crc = binascii.crc32(body, binascii.crc32(lb)) & 0xFFFFFFFF
            mv[0] = MAGIC
            mv[1] = lb[0]
            mv[2] = lb[1]
            struct.pack_into(">I", mv, _HDR, crc)
            self.seq = seq  # never reused, even if the write below fails halfway
            f = self._f
            # header, body, CRC: three writes from what exists, no copy of the record (a cut
            # between them is a torn tail, like any other)
            _put(f, self._hdr)
            _put(f, body)
            _put(f, self._trl)
            f.flush()
            self._size += n
            return True
        except MemoryError:  # the segment is sound (a cut record is a torn tail): keep it open
            self.mem_errors += 1
            self.dropped += 1
            return False
        except Exception:
            self.io_errors += 1
            self.dropped += 1
            f = self._f
            self._f = None
            if f is not None:
                try:
                    f.close()
                except Exception:
                    pass
            return False

    def close(self):
        if self._f is not None:
            try:
                self._f.close()
            except Exception:
                self.io_errors += 1
            self._f = None

    def stats(self):
        total = 0
        for k in self._segs:
            try:
                total += _fsize(self._path(k))
            except OSError:
                pass
        return {"seq": self.seq, "segments": len(self._segs), "bytes": total, "torn": self.torn,
                "io_errors": self.io_errors, "dropped": self.dropped,
                "rotations": self.rotations, "read_errors": self.read_errors, "mem_errors": self.mem_errors}
