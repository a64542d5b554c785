# DNP3 (IEEE 1815) outstation application layer (docs/dnp3.md): the point database, the event
# buffer and the answer to one request fragment. Pure logic, MicroPython and CPython, no I/O:
# agent/dnp3_link.py delivers request fragments (Outstation.request) and frames the answer
# (Outstation.tx). The points are set by the owner (update_bi / update_ai, bo[]); controls go
# to the owner's ctl(index, on, execute) -> CROB status, which decides what a control may do.
#
# Unsolicited responses (when the owner allows them): a null one after each connection until
# confirmed, then events of the classes the master enabled (ENABLE_UNSOLICITED), each repeated
# every UNSOL_MS until confirmed. Supported: CONFIRM, READ (class 0-3, g1v0/v2, g2v0/v2, g10v0/v2, g30v0/v5, g32v0/v7, g50v1),
# WRITE (g80v1 index 7 = 0, g50v1, g50v3), SELECT / OPERATE / DIRECT_OPERATE / DIRECT_OPERATE_NR
# with g12v1 (qualifiers 0x17, 0x28), DELAY_MEASURE (g52v2), RECORD_CURRENT_TIME; every other
# function code answers IIN2.0, every other object IIN2.1. Requests are single fragments (FIR
# and FIN); a non-READ request repeating the last one (same sequence and bytes) gets the last
# answer again without being executed again. Any malformed request answers IIN2.2 and is
# counted, never a crash. (Comments, not docstrings: less RAM when compiled from source.)
import struct
from array import array

from agent.compat import const, ticks_ms, ticks_diff
from agent.dnp3_link import crc

TX_MAX = const(512)   # largest answer fragment (dnp3_link.OUT_MAX frames it)
NEV = const(32)       # event buffer (overflow: the oldest of class 3, else 2, else 1 goes; IIN2.3)
SBO_MS = const(5000)  # SELECT to OPERATE
MAX_CTL = const(4)    # CROBs in one request (more: TOO_MANY_OBJS)

# CROB status codes (IEEE 1815 table 11-8)
ST_OK = const(0)
ST_TIMEOUT = const(1)
ST_NO_SELECT = const(2)
ST_FORMAT = const(3)
ST_NOT_SUPPORTED = const(4)
ST_TOO_MANY = const(8)
ST_NOT_AUTHORIZED = const(9)
ST_LIMITED = const(11)

# event kinds in ek[] (low 2 bits), class in bits 2-3; sent in a solicited answer (SENT) or an
# unsolicited one (USENT), until its confirm
K_BI = const(1)
K_AI = const(2)
SENT = const(0x80)
USENT = const(0x40)
UNSOL_MS = const(5000)  # unsolicited confirm timeout: then the same answer again

# counters (Outstation.counts)
A_REQ = const(0)       # request fragments
A_CONFIRM = const(1)   # application confirms that freed events
A_BAD = const(2)       # malformed requests (IIN2.2) or multi-fragment requests (dropped)
A_FUNC = const(3)      # unsupported function codes (IIN2.0)
A_OBJ = const(4)       # unknown objects (IIN2.1)
A_DUP = const(5)       # repeated requests answered without executing them again
A_CTL = const(6)       # controls executed
A_CTL_REFUSED = const(7)  # controls answered with a status other than success
A_EV_LOST = const(8)   # events dropped on overflow
A_TIME = const(9)      # time writes
A_EVENTS = const(10)   # events recorded
NCOUNTS = const(11)
COUNT_NAMES = ("requests", "confirms", "bad_requests", "unsupported_function", "unknown_object",
               "repeats", "controls", "controls_refused", "events_lost", "time_syncs", "events")


class Bad(Exception):
    pass


def _rd(f, n, i, k):
    # k-byte little-endian integer at f[i] (bounds checked against n)
    if i + k > n:
        raise Bad()
    v = 0
    for j in range(k - 1, -1, -1):
        v = v << 8 | f[i + j]
    return v


class Outstation:
    def __init__(self, nbi, nai, nbo, ctl, aclass, deadband, unsol=False):
        self.tx = bytearray(TX_MAX)
        self.nbi = nbi
        self.nai = nai
        self.nbo = nbo
        self.ctl = ctl
        self.bi = bytearray(nbi)
        self.ai = array("f", [0.0] * nai)
        self.aiq = bytearray(nai)          # AI flags (0x01 online, 0x04 comm lost)
        self.aref = array("f", [0.0] * nai)  # value of the last AI event (deadband reference)
        self.arq = bytearray(nai)
        self.acls = aclass                 # event class of each AI (1..3)
        self.db = deadband                 # deadband of each AI
        self.bo = bytearray(nbo)
        self.ek = bytearray(NEV)
        self.ei = bytearray(NEV)
        self.ef = bytearray(NEV)
        self.ev = array("f", [0.0] * NEV)
        self.et = bytearray(6 * NEV)
        self.ne = 0
        self.counts = array("L", [0] * NCOUNTS)
        self.overflow = False
        self.restart = True     # IIN1.7 until the master clears it
        self.trouble = False    # IIN1.6
        self.t_ms = 0           # DNP3 time (ms since 1970 UTC) at t_tick
        self.t_tick = ticks_ms()
        self.synced = False     # IIN1.4 NEED_TIME until a time write
        self.rec_tick = -1      # RECORD_CURRENT_TIME
        self.unsol = unsol      # unsolicited responses allowed
        self.useq = 0
        self.session()

    def session(self):
        # a new master connection: no selection, no repeat, no answer awaiting a confirm
        self.last_seq = -1
        self.last_crc = -1
        self.last_n = 0
        self.con_seq = -1
        self.sel_seq = -1
        self.sel_crc = -1
        self.sel_t = 0
        self.umask = 0          # classes enabled for unsolicited answers (bit c: class c)
        self.ucon = -1          # sequence of the unsolicited answer awaiting its confirm
        self.ut = 0
        self.unull = self.unsol  # the null unsolicited answer of a new session is due
        self._unsend(SENT | USENT)

    # ---- time ------------------------------------------------------------------------------
    def now(self):
        # DNP3 time (ms); re-anchored on every call, so the tick counter never wraps between
        t = ticks_ms()
        self.t_ms += ticks_diff(t, self.t_tick)
        self.t_tick = t
        return self.t_ms

    def set_time(self, ms):
        self.t_ms = ms
        self.t_tick = ticks_ms()
        self.synced = True
        self.counts[A_TIME] += 1

    # ---- points and events -------------------------------------------------------------------
    def update_bi(self, i, v):
        v = 1 if v else 0
        if self.bi[i] != v:
            self.bi[i] = v
            self._event(K_BI | 1 << 2, i, v, 0x01 | v << 7)

    def update_ai(self, i, v, flags):
        self.ai[i] = v
        self.aiq[i] = flags
        d = v - self.aref[i]
        if flags != self.arq[i] or d > self.db[i] or -d > self.db[i]:
            self.aref[i] = v
            self.arq[i] = flags
            self._event(K_AI | self.acls[i] << 2, i, v, flags)

    def _event(self, kind, i, v, flags):
        if self.ne >= NEV:  # full: the oldest of the highest class number goes (trip events last)
            x = 0
            for c in (3, 2):
                for k in range(self.ne):
                    if self.ek[k] >> 2 & 3 == c:
                        x = k
                        break
                else:
                    continue
                break
            self._remove(x)
            self.overflow = True
            self.counts[A_EV_LOST] += 1
        k = self.ne
        self.ek[k] = kind
        self.ei[k] = i
        self.ev[k] = v
        self.ef[k] = flags
        t = self.now()
        o = 6 * k
        for j in range(6):
            self.et[o + j] = t & 0xFF
            t >>= 8
        self.ne = k + 1
        self.counts[A_EVENTS] += 1

    def _remove(self, k):
        n = self.ne - 1
        for j in range(k, n):
            self.ek[j] = self.ek[j + 1]
            self.ei[j] = self.ei[j + 1]
            self.ev[j] = self.ev[j + 1]
            self.ef[j] = self.ef[j + 1]
            o = 6 * j
            for b in range(6):
                self.et[o + b] = self.et[o + 6 + b]
        self.ne = n

    def _unsend(self, flag):
        for k in range(self.ne):
            self.ek[k] &= ~flag

    def _confirmed(self, flag):
        k = 0
        was = False
        while k < self.ne:
            if self.ek[k] & flag:
                self._remove(k)
                was = True
            else:
                k += 1
        if was:
            self.counts[A_CONFIRM] += 1
            if self.ne == 0:
                self.overflow = False

    def iin1(self):
        v = 0
        for k in range(self.ne):
            v |= 1 << (self.ek[k] >> 2 & 3)
        return (v & 0x0E) | (0 if self.synced else 0x10) | (0x40 if self.trouble else 0) | (0x80 if self.restart else 0)

    # ---- requests ------------------------------------------------------------------------------
    def request(self, f, n):
        # one request fragment f[:n]; returns the length of the answer in self.tx (0: none)
        c = self.counts
        c[A_REQ] += 1
        if n < 2 or f[0] & 0xC0 != 0xC0:  # a multi-fragment request: not supported, dropped
            c[A_BAD] += 1
            return 0
        seq = f[0] & 0x0F
        fc = f[1]
        if fc == 0:  # CONFIRM (of a solicited answer carrying events, or of an unsolicited one)
            if f[0] & 0x10:
                if seq == self.ucon:
                    self.ucon = -1
                    self.unull = False
                    self._confirmed(USENT)
            elif seq == self.con_seq:
                self.con_seq = -1
                self._confirmed(SENT)
            return 0
        h = crc(f, 0, n)
        if fc != 1 and seq == self.last_seq and h == self.last_crc and self.last_n:
            c[A_DUP] += 1  # a repeat (the master did not get our answer): the same answer again
            return 0 if fc == 6 else self.last_n
        self.last_seq = seq
        self.last_crc = h
        self.last_n = 0
        self.con_seq = -1
        self._unsend(SENT)  # events of an unconfirmed answer are reported again
        if fc < 3 or fc > 4:
            self.sel_seq = -1  # anything but SELECT / OPERATE ends a selection
        iin2 = 0
        o = 4
        try:
            if fc == 1:
                o, iin2 = self._read(f, n, seq)
            elif fc == 2:
                iin2 = self._write(f, n)
            elif 3 <= fc <= 6:
                o, iin2 = self._control(f, n, fc, seq)
            elif fc == 23:  # DELAY_MEASURE: g52v2, count 1, 0 ms
                o = self._hdr(4, 52, 2, 1)
                self.tx[o] = 0
                self.tx[o + 1] = 0
                o += 2
            elif fc == 24:  # RECORD_CURRENT_TIME (then a WRITE of g50v3)
                self.rec_tick = ticks_ms()
            elif (fc == 20 or fc == 21) and self.unsol:  # ENABLE / DISABLE_UNSOLICITED
                iin2 = self._enable(f, n, fc == 20)
            else:
                c[A_FUNC] += 1
                iin2 = 0x01
        except Exception:  # Bad, or an index past the end of a malformed request
            c[A_BAD] += 1
            o = 4
            iin2 = 0x04
            self.con_seq = -1
            self._unsend(SENT)
        if iin2 & 0x02:
            c[A_OBJ] += 1
        if fc == 6:
            return 0
        tx = self.tx
        tx[0] = 0xC0 | (0x20 if self.con_seq == seq else 0) | seq
        tx[1] = 0x81
        tx[2] = self.iin1()
        tx[3] = iin2 | (0x08 if self.overflow else 0)
        self.last_n = o
        return o

    def _hdr(self, o, g, v, count):
        # object header with qualifier 0x07 (1-byte count) at tx[o]; returns the data offset
        tx = self.tx
        tx[o] = g
        tx[o + 1] = v
        tx[o + 2] = 0x07
        tx[o + 3] = count
        return o + 4

    def _range(self, f, n, i, q, npts):
        # the range of an object header at f[i]: (start, stop, count limit, next i); stop < 0
        # when the range names no point of ours
        if q == 0x06:
            return 0, npts - 1, 255, i
        if q == 0x00 or q == 0x01:
            k = q + 1
            a = _rd(f, n, i, k)
            b = _rd(f, n, i + k, k)
            if a > b or b >= npts:
                raise Bad()
            return a, b, 255, i + 2 * k
        if q == 0x07 or q == 0x08:
            k = q - 6
            return 0, npts - 1, _rd(f, n, i, k), i + k
        raise Bad()

    def _read(self, f, n, seq):
        # READ: the events asked for (classes 1-3 or by group), then the static points asked
        # for (class 0, or a group with a range). Returns (answer length, IIN2).
        i = 2
        cls = 0       # bit c: event class c wanted
        kinds = 0     # bit k: events of kind k (any class) wanted
        lim = 255
        st = [-1, -1, -1, -1, -1, -1]  # BI, BO, AI static (start, stop); -1: not asked
        rtime = False
        iin2 = 0
        while i < n:
            if i + 3 > n:
                raise Bad()
            g = f[i]
            v = f[i + 1]
            q = f[i + 2]
            i += 3
            if g == 60 and 1 <= v <= 4:
                a, b, m, i = self._range(f, n, i, q, 1)
                if v == 1:
                    st[0], st[1] = 0, self.nbi - 1
                    st[2], st[3] = 0, self.nbo - 1
                    st[4], st[5] = 0, self.nai - 1
                else:
                    cls |= 1 << (v - 1)
                    lim = m if m < lim else lim
            elif (g == 2 and v in (0, 2)) or (g == 32 and v in (0, 7)):
                a, b, m, i = self._range(f, n, i, q, 1)
                kinds |= 1 << (K_BI if g == 2 else K_AI)
                lim = m if m < lim else lim
            elif (g == 1 and v in (0, 2)) or (g == 10 and v in (0, 2)) or (g == 30 and v in (0, 5)):
                j = 0 if g == 1 else (2 if g == 10 else 4)
                a, b, m, i = self._range(f, n, i, q, (self.nbi, self.nbo, self.nai)[j // 2])
                st[j], st[j + 1] = a, b
            elif g == 50 and v == 1 and (q == 0x07 or q == 0x06):
                a, b, m, i = self._range(f, n, i, q, 1)
                rtime = True
            else:
                iin2 |= 0x02  # unknown object: the rest of the request cannot be parsed
                break
        o = 4
        if cls or kinds:
            o = self._events(o, cls, kinds, lim, SENT)
            if o > 4:
                self.con_seq = seq
        tx = self.tx
        for j in (0, 2):  # BI (g1v2), BO (g10v2): flags with the state in bit 7
            a = st[j]
            if a >= 0:
                b = st[j + 1]
                if o + 5 + b - a + 1 > TX_MAX:
                    break
                tx[o] = 1 if j == 0 else 10
                tx[o + 1] = 2
                tx[o + 2] = 0x00
                tx[o + 3] = a
                tx[o + 4] = b
                o += 5
                p = self.bi if j == 0 else self.bo
                for k in range(a, b + 1):
                    tx[o] = 0x01 | p[k] << 7
                    o += 1
        a = st[4]
        if a >= 0 and o + 5 + 5 * (st[5] - a + 1) <= TX_MAX:  # AI (g30v5): flags, float32
            b = st[5]
            tx[o] = 30
            tx[o + 1] = 5
            tx[o + 2] = 0x00
            tx[o + 3] = a
            tx[o + 4] = b
            o += 5
            for k in range(a, b + 1):
                tx[o] = self.aiq[k]
                struct.pack_into("<f", tx, o + 1, self.ai[k])
                o += 5
        if rtime and o + 10 <= TX_MAX:  # g50v1: the time now
            o = self._hdr(o, 50, 1, 1)
            t = self.now()
            for j in range(6):
                tx[o + j] = t & 0xFF
                t >>= 8
            o += 6
        return o, iin2

    def _events(self, o, cls, kinds, lim, flag):
        # events wanted, oldest first, in runs of one group (g2v2: index, flags, time; g32v7:
        # index, flags, float32, time), marked SENT until the confirm; what does not fit in
        # the fragment stays for the next read (its class bit stays in IIN1)
        tx = self.tx
        hd = -1   # offset of the current run's count byte
        kind = 0
        sent = 0
        for k in range(self.ne):
            e = self.ek[k]
            if not (cls >> (e >> 2 & 3) & 1 or kinds >> (e & 3) & 1) or (flag == USENT and e & SENT):
                continue
            if sent >= lim:
                break
            size = 8 if e & 3 == K_BI else 12
            new = e & 3 != kind or tx[hd] == 255
            if o + size + (4 if new else 0) > TX_MAX:
                break
            if new:
                kind = e & 3
                tx[o] = 2 if kind == K_BI else 32
                tx[o + 1] = 2 if kind == K_BI else 7
                tx[o + 2] = 0x17
                tx[o + 3] = 0
                hd = o + 3
                o += 4
            tx[hd] += 1
            tx[o] = self.ei[k]
            tx[o + 1] = self.ef[k]
            o += 2
            if kind == K_AI:
                struct.pack_into("<f", tx, o, self.ev[k])
                o += 4
            for j in range(6):
                tx[o + j] = self.et[6 * k + j]
            o += 6
            self.ek[k] = e | flag
            sent += 1
        return o

    def _enable(self, f, n, on):
        # ENABLE / DISABLE_UNSOLICITED of g60v2..v4 (qualifier 06); returns IIN2
        i = 2
        m = 0
        while i < n:
            if i + 3 > n or f[i] != 60 or not 2 <= f[i + 1] <= 4 or f[i + 2] != 0x06:
                return 0x02
            m |= 1 << (f[i + 1] - 1)
            i += 3
        self.umask = self.umask | m if on else self.umask & ~m
        return 0

    def unsolicited(self):
        # the unsolicited answer due now in self.tx (its length), or 0: the null one of a new
        # session, events of the enabled classes not yet sent, or a repeat after UNSOL_MS
        if not self.unsol:
            return 0
        now = ticks_ms()
        seq = self.useq
        if self.ucon >= 0:
            if ticks_diff(now, self.ut) < UNSOL_MS:
                return 0
            seq = self.ucon  # a repeat keeps its sequence
            self._unsend(USENT)
        o = 4
        if not self.unull:
            if not self.umask:
                return 0
            o = self._events(4, self.umask, 0, 255, USENT)
            if o == 4:
                self.ucon = -1
                return 0
        tx = self.tx
        tx[0] = 0xF0 | seq  # FIR FIN CON UNS
        tx[1] = 0x82
        tx[2] = self.iin1()
        tx[3] = 0x08 if self.overflow else 0
        self.ucon = seq
        self.ut = now
        self.useq = (seq + 1) & 0x0F
        self.last_n = 0  # the last solicited answer is gone from tx: a repeat is executed anew
        return o

    def _write(self, f, n):
        # WRITE: clear IIN1.7 (g80v1 index 7 = 0), set the time (g50v1; g50v3 after a
        # RECORD_CURRENT_TIME). Returns IIN2.
        i = 2
        while i < n:
            if i + 3 > n:
                raise Bad()
            g = f[i]
            v = f[i + 1]
            q = f[i + 2]
            i += 3
            if g == 80 and v == 1 and q == 0x00:
                a = _rd(f, n, i, 1)
                b = _rd(f, n, i + 1, 1)
                i += 2
                if a > b or b > 15:
                    raise Bad()
                nb = (b - a + 8) // 8
                bits = _rd(f, n, i, nb)
                i += nb
                for k in range(a, b + 1):
                    if k != 7 or bits >> (k - a) & 1:  # only "restart seen" may be written (to 0)
                        return 0x04
                self.restart = False
            elif g == 50 and (v == 1 or v == 3) and q == 0x07:
                if _rd(f, n, i, 1) != 1:
                    raise Bad()
                t = _rd(f, n, i + 1, 6)
                i += 7
                if v == 3:  # the master's time when we recorded ours (LAN procedure)
                    if self.rec_tick < 0:
                        return 0x04
                    t += ticks_diff(ticks_ms(), self.rec_tick)
                    self.rec_tick = -1
                self.set_time(t)
            else:
                return 0x02
        return 0

    def _control(self, f, n, fc, seq):
        # SELECT (3), OPERATE (4), DIRECT_OPERATE (5, and 6 without an answer) of g12v1 CROBs:
        # the answer echoes the request's objects with a status each. Returns (length, IIN2).
        tx = self.tx
        if n - 2 + 4 > TX_MAX:
            raise Bad()
        for j in range(2, n):
            tx[j + 2] = f[j]
        h = crc(f, 2, n - 2)
        sel = 0  # for OPERATE: the status when the selection does not match
        if fc == 4:
            if self.sel_seq < 0 or seq != (self.sel_seq + 1) & 0x0F or h != self.sel_crc:
                sel = ST_NO_SELECT
            elif ticks_diff(ticks_ms(), self.sel_t) > SBO_MS:
                sel = ST_TIMEOUT
            self.sel_seq = -1
        ok = True
        i = 2
        nobj = 0
        while i < n:
            if i + 3 > n:
                raise Bad()
            g = f[i]
            v = f[i + 1]
            q = f[i + 2]
            if g != 12 or v != 1 or (q != 0x17 and q != 0x28):
                return 4, 0x02
            w = 1 if q == 0x17 else 2
            cnt = _rd(f, n, i + 3, w)
            i += 3 + w
            for _ in range(cnt):
                idx = _rd(f, n, i, w)
                if i + w + 11 > n:  # the whole CROB is there
                    raise Bad()
                p = i + w  # the CROB: code, count, on-time (4), off-time (4), status
                nobj += 1
                if nobj > MAX_CTL:
                    st = ST_TOO_MANY
                elif sel:
                    st = sel
                else:
                    st = self._crob(idx, f[p], f[p + 1], fc)
                if st != ST_OK:
                    ok = False
                    self.counts[A_CTL_REFUSED] += 1
                tx[p + 12] = st  # tx = f shifted by 2
                i = p + 11
        if fc == 3 and ok:
            self.sel_seq = seq
            self.sel_crc = h
            self.sel_t = ticks_ms()
        return n + 2, 0

    def _crob(self, idx, code, count, fc):
        if idx >= self.nbo or code & 0x30:  # unknown point; queue / clear not supported
            return ST_NOT_SUPPORTED
        op = code & 0x0F
        tcc = code >> 6
        if tcc == 0 and (op == 1 or op == 3):
            on = True
        elif tcc == 0 and (op == 2 or op == 4):
            on = False
        elif op == 1 and tcc == 1:  # CLOSE pulse: on
            on = True
        elif op == 1 and tcc == 2:  # TRIP pulse: off
            on = False
        else:
            return ST_NOT_SUPPORTED
        if count == 0:  # count 0: nothing to execute
            return ST_OK
        ex = fc != 3
        st = self.ctl(idx, on, ex)
        if ex and st == ST_OK:
            self.counts[A_CTL] += 1
        return st
