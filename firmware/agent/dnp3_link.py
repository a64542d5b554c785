# DNP3 (IEEE 1815) data link and transport layers for the outstation (docs/dnp3.md).
#
# Pure logic, MicroPython and CPython: no I/O. The transport (agent/features/dnp3.py: TCP; a serial line
# would feed the same object) reads bytes straight into Link.rx[Link.have:], adds what it read
# to Link.have, then calls Link.step() until it returns -1; a step that returns k > 0 left k
# bytes in Link.out to write. Buffers are allocated once: the frame being received (292 bytes),
# the request being reassembled (RX_FRAG), the framed response (OUT_MAX).
#
# Frame: 05 64 LEN CTRL DST(2) SRC(2) CRC(2), then the user data in blocks of 16 bytes, each
# followed by its CRC-16/DNP (LE). LEN counts CTRL, DST, SRC and the user data (5..255).
# Bad input is counted (counts[C_*]) and dropped, never acted on: a bad header CRC or sync
# slides one byte (resynchronise), a bad data-block CRC drops the whole frame, a transport
# segment out of sequence or a request over RX_FRAG drops the fragment being reassembled.
# (Comments, not docstrings: less RAM when compiled from source.)
from array import array

from agent.compat import const

RX_FRAG = const(256)      # largest request fragment accepted (more: counted C_OVERSIZE, dropped)
SEG_MAX = const(249)      # application bytes per transport segment (one frame: 250 user bytes)
FRAME_MAX = const(292)    # 10 + 250 + 16 block CRCs
OUT_MAX = const(640)      # an ACK and a response fragment of up to 512 bytes (3 frames: 621 bytes)
BROADCAST = const(0xFFFD)  # 0xFFFD..0xFFFF: broadcast destinations (dropped here, counted)

# counters (Link.counts)
C_FRAMES = const(0)       # good frames for us
C_SYNC = const(1)         # bytes skipped hunting for 05 64 (counted once per resync run)
C_HDR_CRC = const(2)      # header CRC failures
C_DATA_CRC = const(3)     # data block CRC failures (frame dropped)
C_ADDR = const(4)         # frames for another outstation address, a broadcast, or from a master not listed
C_LINK_FN = const(5)      # unsupported link function / direction
C_TP_SEQ = const(6)       # transport segment out of sequence (fragment dropped)
C_OVERSIZE = const(7)     # request fragment over RX_FRAG (dropped)
C_FRAGS = const(8)        # request fragments delivered to the application
NCOUNTS = const(9)
COUNT_NAMES = ("frames", "sync", "hdr_crc", "data_crc", "addr", "link_fn", "tp_seq", "oversize", "fragments")


def _table():
    # CRC-16/DNP: polynomial 0x3D65, reflected (0xA6BC), init 0, final complement, sent LE
    t = array("H", range(256))
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA6BC if c & 1 else c >> 1
        t[i] = c
    return t


_T = _table()


def crc(buf, off, n):
    t = _T
    c = 0
    for i in range(off, off + n):
        c = (c >> 8) ^ t[(c ^ buf[i]) & 0xFF]
    return ~c & 0xFFFF


def frame_len(length):
    # bytes on the wire of a frame whose LEN byte is length (>= 5)
    d = length - 5
    return 10 + d + 2 * ((d + 15) // 16)


def put_frame(out, o, ctrl, dst, src, th, data, off, n):
    # one frame at out[o:] carrying the transport header th (-1: none) and data[off:off+n]
    # (at most 250 user bytes in all); returns the new end
    m = n + (th >= 0)
    out[o] = 0x05
    out[o + 1] = 0x64
    out[o + 2] = m + 5
    out[o + 3] = ctrl
    out[o + 4] = dst & 0xFF
    out[o + 5] = dst >> 8
    out[o + 6] = src & 0xFF
    out[o + 7] = src >> 8
    c = crc(out, o, 8)
    out[o + 8] = c & 0xFF
    out[o + 9] = c >> 8
    o += 10
    j = -1 if th >= 0 else 0  # -1: the transport header byte comes first
    while m > 0:
        k = 16 if m > 16 else m
        b = o
        for _ in range(k):
            out[o] = th if j < 0 else data[off + j]
            o += 1
            j += 1
        c = crc(out, b, k)
        out[o] = c & 0xFF
        out[o + 1] = c >> 8
        o += 2
        m -= k
    return o


class Link:
    # app: an object with request(frag, n, bcast) -> response length in app.tx (0: no answer)
    # and the fragment buffer app.tx; address: this outstation; masters: the master link
    # addresses allowed (empty: any)
    def __init__(self, app, address, masters=()):
        self.app = app
        self.addr = address
        self.masters = masters
        self.rx = bytearray(FRAME_MAX)
        self.rxmv = memoryview(self.rx)
        self.frag = bytearray(RX_FRAG)
        self.out = bytearray(OUT_MAX)
        self.outmv = memoryview(self.out)
        self.counts = array("L", [0] * NCOUNTS)
        self.reset()

    def reset(self):
        # a new connection: nothing half received, link state unreset
        self.have = 0
        self.fn = -1        # bytes in frag; -1: no fragment in progress (or the one dropped)
        self.tseq = 0       # next transport sequence expected
        self.txseq = 0      # transport sequence of our next segment
        self.fcb = -1       # expected FCB of the next confirmed frame (-1: link not reset)
        self.resync = False
        self.peer = self.masters[0] if self.masters else 1  # the master's link address (then: the source of its last good frame)

    def step(self):
        # one frame from rx[:have]: -1 when more bytes are needed; else the bytes left in out
        rx = self.rx
        h = self.have
        c = self.counts
        if h < 10:
            if h and rx[0] != 0x05:
                self._drop(1, C_SYNC)
                return 0
            if h > 1 and rx[1] != 0x64:
                self._drop(1, C_SYNC)
                return 0
            return -1
        if rx[0] != 0x05 or rx[1] != 0x64:
            self._drop(1, C_SYNC)
            return 0
        if crc(rx, 0, 8) != rx[8] | rx[9] << 8 or rx[2] < 5:
            self._drop(1, C_HDR_CRC)
            return 0
        self.resync = False
        n = frame_len(rx[2])
        if h < n:
            return -1
        # every data block's CRC: one bad block drops the frame
        d = rx[2] - 5
        o = 10
        while d > 0:
            k = 16 if d > 16 else d
            if crc(rx, o, k) != rx[o + k] | rx[o + k + 1] << 8:
                self._drop(n, C_DATA_CRC)
                return 0
            o += k + 2
            d -= k
        k = self._frame(rx[2] - 5)
        self._drop(n, -1)
        return k

    def _drop(self, n, what):
        # consume n bytes of rx; count what (a resync run of skipped bytes counts once)
        if what >= 0:
            if what != C_SYNC or not self.resync:
                self.counts[what] += 1
            self.resync = what == C_SYNC or what == C_HDR_CRC
        h = self.have - n
        if h > 0:
            self.rxmv[0:h] = self.rxmv[n:n + h]
        self.have = h if h > 0 else 0

    def _frame(self, d):
        # a frame with sound CRCs: d user data bytes; returns bytes to write
        rx = self.rx
        c = self.counts
        ctrl = rx[3]
        dst = rx[4] | rx[5] << 8
        src = rx[6] | rx[7] << 8
        if dst != self.addr or (self.masters and src not in self.masters):
            c[C_ADDR] += 1
            return 0
        if ctrl & 0xC0 != 0xC0:  # from a master (DIR) and primary (PRM): anything else is not ours to answer
            c[C_LINK_FN] += 1
            return 0
        c[C_FRAMES] += 1
        self.peer = src
        fn = ctrl & 0x0F
        if fn == 0:  # RESET_LINK_STATES: ACK, the next confirmed frame carries FCB 1
            self.fcb = 1
            return self._sec(0)
        if fn == 9:  # REQUEST_LINK_STATUS
            return self._sec(11)
        if fn == 2 or fn == 3:  # TEST_LINK_STATES / CONFIRMED_USER_DATA: FCV must be set
            if not ctrl & 0x10 or self.fcb < 0:
                c[C_LINK_FN] += 1
                return self._sec(1)  # NACK: the link was not reset
            fcb = ctrl >> 5 & 1
            k = self._sec(0)
            if fcb != self.fcb:  # a repeat of the last frame: acknowledged, not processed again
                return k
            self.fcb ^= 1
            if fn == 2 or d == 0:
                return k
            return self._user(d, k)
        if fn == 4:  # UNCONFIRMED_USER_DATA
            return self._user(d, 0) if d else 0
        c[C_LINK_FN] += 1
        return self._sec(15)  # NOT_SUPPORTED

    def _sec(self, fn):
        # a secondary frame (ACK 0, NACK 1, LINK_STATUS 11, NOT_SUPPORTED 15) to the master
        return put_frame(self.out, 0, fn, self.peer, self.addr, -1, self.out, 0, 0)

    def _user(self, d, o):
        # one transport segment rx[10:] (d user bytes with the CRCs between blocks); o: bytes
        # already in out. Returns the bytes in out.
        rx = self.rx
        c = self.counts
        th = rx[10]
        seq = th & 0x3F
        if th & 0x40:  # FIR: a new fragment (one in progress is dropped)
            if self.fn > 0:
                c[C_TP_SEQ] += 1
            self.fn = 0
        elif self.fn < 0 or seq != self.tseq:  # no fragment in progress, or a segment missed
            c[C_TP_SEQ] += 1
            self.fn = -1
            return o
        self.tseq = (seq + 1) & 0x3F
        # copy the payload (d - 1 bytes after the transport header), skipping block CRCs
        f = self.frag
        n = self.fn
        i = 11   # rx offset of the next payload byte
        left = d - 1
        blk = 15  # bytes left in the first block after the header byte
        while left > 0:
            if blk == 0:
                i += 2
                blk = 16
            if n >= RX_FRAG:
                c[C_OVERSIZE] += 1
                self.fn = -1
                return o
            f[n] = rx[i]
            n += 1
            i += 1
            left -= 1
            blk -= 1
        self.fn = n
        if not th & 0x80:  # not FIN: wait for the next segment
            return o
        self.fn = -1
        c[C_FRAGS] += 1
        k = self.app.request(f, n)
        return self.send(o, k) if k else o

    def send(self, o, k):
        # frame the application's k bytes (app.tx) as transport segments into out[o:]
        tx = self.app.tx
        off = 0
        th = 0x40  # FIR on the first segment
        while True:
            n = SEG_MAX if k > SEG_MAX else k
            k -= n
            if k <= 0:
                th |= 0x80  # FIN
            o = put_frame(self.out, o, 0x44, self.peer, self.addr, th | self.txseq, tx, off, n)
            self.txseq = (self.txseq + 1) & 0x3F
            off += n
            th = 0
            if k <= 0:
                return o
