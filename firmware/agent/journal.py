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

# the record format, also in agent/journal_scan.py (the parser; tests/firmware/test_journal.py
# checks they agree)
MAGIC = const(0xFC)  # not a well-formed CBOR initial byte, so rarely seen at a record boundary
_HDR = const(3)  # magic + u16 length
_OVERHEAD = const(7)
MAX_BODY = const(8192)  # largest body append() writes and readers accept

CORE_KEYS = ("n", "t", "ms", "k")


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


def _unload_scan():
    # agent.journal_scan out of sys.modules and its package (agent.base.unload, which this
    # leaf module does not import)
    import sys

    sys.modules.pop("agent.journal_scan", None)
    pkg = sys.modules.get("agent")
    if pkg is not None and "journal_scan" in pkg.__dict__:
        delattr(pkg, "journal_scan")


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
        # the scan and the cut: agent/journal_scan.py, loaded for this and freed after it (a
        # recovery runs at boot and after a failed write, not with every record)
        from agent import journal_scan as js

        try:
            good_end, last = js.scan_file(path, size)
            if good_end < size:
                js.truncate(path, good_end, self._mv)
                self.torn += 1
            i = len(segs) - 2
            while last is None and i >= 0:  # newest empty (fresh rotation): seq from older ones
                p = self._path(segs[i])
                try:
                    _, last = js.scan_file(p, _fsize(p))
                except OSError:
                    pass
                i -= 1
        finally:
            js = None
            _unload_scan()
        if last is not None and last > self.seq:
            self.seq = last
        self._f = open(path, "ab")
        self._size = good_end

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
