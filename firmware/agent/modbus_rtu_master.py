"""Asyncio Modbus masters: RtuMaster (UART stream) and TcpMaster (socket).

API (both):
    regs = await m.read(unit, fn, addr, count)   # fn 1-4; memoryview of the
                                                 # register/bit bytes, valid
                                                 # until the next call
    await m.write_register(unit, addr, value)    # fn 6
    await m.write_registers(unit, addr, values)  # fn 16 (ints or raw bytes)
    await m.write_coil(unit, addr, on)           # fn 5
Failures raise agent.modbus_errors.ModbusError subclasses: ModbusTimeout,
ModbusCRCError, ModbusFrameError, ModbusException(code) (never retried: the
device answered), ModbusConnectionError (TCP).  Counters (attributes): tx,
ok, timeouts, crc_errors, exceptions, bad_frames, retries, junk (bytes
discarded: stale input, noise before a frame), conn_errors (TCP).  The
configured retry count is `max_retries` (`retries` is the counter).

How waiting works (why a poll loop, not wait_for_ms + StreamReader):
every wait is `await asyncio.sleep_ms(ms)` around a non-blocking
readinto().  sleep_ms allocates nothing on MicroPython, while wait_for_ms
allocates a Task and a closure per call (~430 B measured on the unix port)
and cancelling a pending stream read is the least portable corner of
MicroPython asyncio.  The loop works with anything that has a non-blocking
readinto (machine.UART with timeout=0, a raw pty with VMIN=0, a
non-blocking socket).  Wake-ups are few: the RTU master sleeps for the time
the still-missing bytes need at the line rate (at least 1 ms), so the cost
is at most ~1 ms of latency over an interrupt-driven read.

Success path: a frame is complete when the expected number of bytes has
arrived (5 for an exception); no silence gap is waited for.  Error path:
after a CRC/frame error the master waits for line silence before retrying.

read()/write_*() are plain functions returning the transaction coroutine
(await them as usual): one coroutine object per transaction instead of two,
and the transaction state lives in attributes, not in coroutine locals
(those are heap-allocated with the coroutine on every call).  Measured with
gc.mem_alloc deltas in tests/firmware/test_modbus_master.py on the unix port
(64-bit; a 32-bit board's objects are about half): 256 B per RTU read (282 B
with the DE hook), 288 B per TCP read, nearly all of it the coroutine object.
"""

from agent import modbus_rtu as rtu
from agent.crc import crc16_modbus
from agent.compat import ticks_diff, ticks_ms
from agent.modbus_errors import (
    ModbusCRCError,
    ModbusError,
    ModbusException,
    ModbusFrameError,
    ModbusTimeout,
)

try:
    from time import ticks_us  # type: ignore
except ImportError:  # CPython
    import time as _t

    def ticks_us():  # type: ignore
        return int(_t.monotonic() * 1000000) & 0x3FFFFFFF

try:
    from time import sleep_us as _sleep_us  # type: ignore
except ImportError:  # CPython
    import time as _t2

    def _sleep_us(us):  # type: ignore
        _t2.sleep(us / 1000000)

from agent.modbus_base import _Master, _sleep_ms, _wait_for_ms, _written_count  # noqa: F401

_FNS = (1, 2, 3, 4, 5, 6, 15, 16)
BUSY = 6  # exception "slave device busy": retried after a back-off (docs/modbus.md)
DONE = -1  # step(): the transaction succeeded (result in _res)
FAIL = -2  # step(): every attempt failed (the error in _err, counted)
_S_GAP = 0  # transaction states: wait for t3.5, send, DE release, receive, line quiet
_S_SEND = 1
_S_DE = 2
_S_RX = 3
_S_QUIET = 4


def _backoff(timeout_ms, attempt):
    # wait before retrying a busy device: 25 ms, doubling, at most timeout_ms
    b = 25 << (attempt - 1) if attempt < 8 else timeout_ms
    return b if b < timeout_ms else timeout_ms


class RtuMaster(_Master):
    """Modbus RTU master over a UART-like stream.

    uart: write(buf), non-blocking readinto(buf) (None or 0 when empty);
    optional txdone() or flush() for the DE hook.  baud: line rate (for
    t3.5, the DE fallback timing and the receive wake-ups).
    timeout_ms: the device's response time budget; the deadline of an
    attempt is timeout_ms plus the time the response takes on the line.
    retries: extra attempts after a timeout / CRC / frame error.
    de: optional pin (.value(v)) driving the RS-485 driver enable: high
    de_pre_us before the first start bit, low de_post_us after the last stop
    bit.  The end of TX comes from uart.txdone() (polled, non-blocking) or,
    failing that, from the frame time at 11 bits/char (conservative: late
    rather than truncating the last byte); uart.flush() only covers the
    final < 1 ms.  The sub-millisecond pre/post delays are short busy waits.
    """

    def __init__(self, uart, baud, timeout_ms=100, retries=1, de=None, de_pre_us=0, de_post_us=0):
        _Master.__init__(self, timeout_ms, retries)
        self.uart = uart
        self.baud = baud
        self.de = de
        self.de_pre_us = de_pre_us
        self.de_post_us = de_post_us
        self._char_us = rtu.char_time_us(baud)
        self._gap_us = rtu.frame_gap_us(baud)
        self._quiet_ms = self._gap_us // 1000 + 2
        self._tx = bytearray(rtu.MAX_ADU)
        self._txmv = memoryview(self._tx)
        self._tx8 = self._txmv[:8]
        self._txv = self._tx8
        self._ch = bytearray(32)  # later pieces of a reply arrive here first
        self._chmv = memoryview(self._ch)
        self._views = {}  # reply length -> view of its register bytes
        self._rq = False  # _tx holds the read request of (_unit, _fn, _addr, _arg)
        self._st = self._attempt = 0
        self._q_late = False
        self._q_t0 = self._q_n = 0
        self._q_last = None
        self._rx = bytearray(rtu.MAX_ADU)
        self._rxmv = memoryview(self._rx)
        self._view = self._rxmv[3:3]  # cached result view (same count each poll)
        self._last_us = ticks_us()
        self._txdone = getattr(uart, "txdone", None)
        self._flush = getattr(uart, "flush", None)
        self._de_on = False
        self._de_t0 = self._de_us = 0
        if de is not None:
            de.value(0)
        # the transaction in progress (attributes, not coroutine locals: a
        # coroutine's locals are heap-allocated with it on every call)
        self._n = self._need = self._bc = self._limit = self._wire_ms = 0
        self._unit = self._fn = 0
        self._addr = self._arg = None
        self._got = self._want = self._t0 = 0
        self._res = None
        self._err = None

    # -- line helpers ------------------------------------------------------
    def _drain(self):
        # discard whatever is waiting (stale replies, noise); never waits
        u = self.uart
        mv = self._rxmv
        for _ in range(64):
            r = u.readinto(mv)
            if not r:
                return
            self.junk += r

    def _quiet_begin(self, late):
        # error path: read and discard until the line is silent for a frame gap (+1 ms) after
        # the last byte seen, bounded by timeout_ms. late (after a timeout): first listen up to
        # timeout_ms for a reply still on its way; one that comes is a late reply (counted),
        # never the answer to the next request. _quiet_step() runs one look at the line.
        self._q_late = late
        self._q_t0 = ticks_ms()
        self._q_last = None
        self._q_n = 0

    def _quiet_step(self):
        # 1: look again in a millisecond, 0: the line is quiet (or given up)
        r = self.uart.readinto(self._rxmv)
        now = ticks_ms()
        done = False
        if r:
            self.junk += r
            self._q_n += r
            self._q_last = now
            if ticks_diff(now, self._q_t0) >= 4 * self.timeout_ms:  # a babbling line: give up
                done = True
        elif self._q_last is None:
            done = not self._q_late or ticks_diff(now, self._q_t0) >= self.timeout_ms
        elif ticks_diff(now, self._q_last) >= self._quiet_ms:
            done = True
        if not done:
            return 1
        if self._q_n and self._q_late:
            self.late += 1
        self._last_us = ticks_us()
        return 0

    def _write(self, n, off=0):
        # the request (_txv, from _prepare), from byte `off` on (what an earlier try wrote)
        mv = self._txv
        u = self.uart
        for _ in range(1000):
            if off >= n:
                return
            w = u.write(mv if off == 0 else mv[off:])
            if w is not None:  # (None: EAGAIN on a non-blocking stream)
                off += w
        raise ModbusTimeout("tx stuck")

    def _de_send(self, n):
        # DE high, pre delay, write; returns whole ms the frame needs on the line
        self._de_on = True
        self.de.value(1)
        if self.de_pre_us:
            _sleep_us(self.de_pre_us)
        self._de_t0 = ticks_us()
        self._write(n)
        self._de_us = n * self._char_us
        return self._de_us // 1000

    def _de_done(self):
        # True once the last stop bit is out and DE is released
        txdone = self._txdone
        if txdone is not None:
            if not txdone():
                return False
        else:
            if self._flush is not None:
                try:
                    self._flush()  # blocks for the last < 1 ms at most
                except OSError:  # e.g. a pty: no drain, use the frame time
                    self._flush = None
            left = self._de_us - ticks_diff(ticks_us(), self._de_t0)
            if left > 0:
                _sleep_us(left)
        if self.de_post_us:
            _sleep_us(self.de_post_us)
        self._de_on = False
        self.de.value(0)
        return True

    def _shift(self, k, got):
        rx = self._rx
        for i in range(got - k):
            rx[i] = rx[i + k]
        self.junk += k
        return got - k

    def _head_ok(self, k, got, strict=False):
        # can a response start at rx[k] (given what has arrived)? Ours, or (not strict) a
        # foreign one worth reading whole to tell a wrong reply (bad_frames) from noise:
        # another unit answering our function with our byte count, or our unit answering
        # another read function with our byte count, or another function's exception.
        rx = self._rx
        u = rx[k]
        if u != self._unit and (strict or not 1 <= u <= 247):
            return False
        if k + 1 >= got:
            return True
        f = rx[k + 1]
        fn = self._fn
        if f == (fn | 0x80):
            return True
        if f != fn:
            if strict or u != self._unit:
                return False
            if f & 0x80:
                return (f & 0x7F) in _FNS
            if not (1 <= f <= 4 and self._bc >= 0):
                return False
        return self._bc < 0 or k + 2 >= got or rx[k + 2] == self._bc

    def _len_at(self, got):
        # length of the frame starting at rx[0] (0 until enough has arrived to know)
        rx = self._rx
        f = rx[1]
        if f == self._fn and rx[0] == self._unit:
            return self._need
        if f & 0x80:
            return rtu.EXC_LEN
        return self._need  # another read function with our byte count (_head_ok)

    # -- transaction steps (synchronous: no allocation) ----------------------
    def _prepare(self, unit, fn, addr, arg, values):
        # (begin() skips this for the same read as last time, every poll: frame and limits as built)
        self._rq = False
        n = self._n = rtu.build_request(self._tx, unit, fn, addr, arg, values)
        self._txv = self._tx8 if n == 8 else self._txmv[:n]
        self._rq = fn <= 4
        if fn == 15 or fn == 16:
            arg = _written_count(fn, self._tx, 1)
        self._unit = unit
        self._fn = fn
        self._addr = addr
        self._arg = arg
        need = self._need = rtu.response_len(fn, arg)
        self._bc = need - 5 if fn <= 4 else -1
        if fn <= 4 and len(self._view) != need - 5:
            # the result view: made once per read size, so polls that take turns between reads
            # allocate nothing either
            v = self._views.get(need)
            if v is None:
                v = self._views[need] = self._rxmv[3:need - 2]
            self._view = v
        cu = self._char_us
        w = (need * cu) // 1000 + 1  # the reply's (and without DE the request's) line time
        if self.de is None:
            w += (self._n * cu) // 1000
        self._wire_ms = w

    def _start(self):
        self.tx += 1
        self._limit = self.timeout_ms + self._wire_ms
        self._t0 = ticks_ms()
        self._got = 0
        self._want = self._need

    def _poll(self):
        """Read what has arrived and judge it: >0 ms to sleep, 0 done
        (result in _res), -1 failed (error in _err, already counted), -2
        busy (exception 6 in _err, counted: retried after a back-off)."""
        got = self._got
        if got:
            return self._more(got, False)
        got = self.uart.readinto(self._rxmv)
        if not got:
            return self._more(0, False)
        rx = self._rx
        if got == self._need and rx[0] == self._unit and rx[1] == self._fn and rx[2] == self._bc:
            # fast path: exactly our read's reply in one piece; sound if the CRC says so
            c = crc16_modbus(rx, got - 2)
            if rx[got - 2] == c & 0xFF and rx[got - 1] == c >> 8:
                self.ok += 1
                self._last_us = ticks_us()
                self._res = self._view
                return 0
        return self._more(got, True)

    def _more(self, got, check):
        # the general receive path: more pieces, noise to skip, foreign or broken frames
        rx = self._rx
        mv = self._rxmv
        u = self.uart
        while got < self._want:  # take all that is there (up to the frame)
            if got:  # a later piece: through the small chunk buffer (a view from `got` on
                r = u.readinto(self._chmv)  # would be a new object every time)
                if not r:
                    break
                k = rtu.MAX_ADU - got
                if r > k:
                    self.junk += r - k
                    r = k
                ch = self._ch
                for i in range(r):
                    rx[got + i] = ch[i]
            else:
                r = u.readinto(mv)
                if not r:
                    break
            got += r
            check = True
        while check:
            check = False
            # hunt: drop noise in front of a plausible frame head
            k = 0
            while k < got and not self._head_ok(k, got):
                k += 1
            if k:
                got = self._shift(k, got)
            want = self._want
            if got >= 2:
                want = self._want = self._len_at(got) or self._need
            if got < want:
                break
            if rx[0] != self._unit or (rx[1] & 0x7F) != self._fn:
                # a whole foreign frame: a sound one is a wrong reply (bad frame), else noise
                if rtu.check_crc(rx, want):
                    self._shift(want, got)
                    self.junk -= want
                    return self._fail(ModbusFrameError("reply from unit %d function %d" % (rx[0], rx[1])))
                k = 1
                while k < got and not self._head_ok(k, got):
                    k += 1
                got = self._shift(k, got)
                self._want = self._need
                check = got > 0
                continue
            try:
                dl = self._check(want)
            except ModbusException as e:
                self.exceptions += 1
                self._last_us = ticks_us()
                if e.code == BUSY:
                    self._err = e
                    return -2
                raise
            except ModbusError as e:
                # maybe noise that only looked like a head: resync
                k = 1
                while k < got and not self._head_ok(k, got, True):
                    k += 1
                if k < got:
                    got = self._shift(k, got)
                    self._want = self._need
                    check = True
                    continue
                return self._fail(e)
            self.ok += 1
            self._last_us = ticks_us()
            if got > want:
                self.junk += got - want
            if self._fn <= 4:
                self._res = self._view
            else:
                self._res = None
            return 0
        self._got = got
        el = ticks_diff(ticks_ms(), self._t0)
        left = self._limit - el
        if left <= 0:
            return self._fail(ModbusFrameError("short frame") if got else ModbusTimeout("timeout"))
        w = ((self._want - got) * self._char_us) // 1000
        if w < 1:
            w = 1
        return w if w < left else left

    def _check(self, n):
        rx = self._rx
        if not rtu.check_crc(rx, n):
            raise ModbusCRCError("crc")
        return rtu.check_response_pdu(rx, 1, n - 2, self._fn, self._addr, self._arg)

    def _fail(self, e):
        self._last_us = ticks_us()
        self._err = e
        self._count(e)
        return -1

    # -- one transaction as a state machine (the poll task drives it without a coroutine) --
    def begin(self, unit, fn, addr, arg, values=None):
        """Start a transaction (the bus must be free: not _busy). Then call step() until it
        returns DONE (the result in _res) or FAIL (the error in _err); a value >= 0 is the ms to
        sleep first. end() when done, also on an exception or a cancel."""
        self._busy = True
        if not (self._rq and fn == self._fn and unit == self._unit and addr == self._addr and arg == self._arg):
            self._prepare(unit, fn, addr, arg, values)
        self._attempt = 0
        self._st = _S_GAP

    def step(self):
        while True:
            st = self._st
            if st == _S_GAP:
                self._st = _S_SEND
                r = self.uart.readinto(self._rxmv)  # drain stale input (none, nearly always)
                if r:
                    self.junk += r
                    self._drain()
                d = ticks_diff(ticks_us(), self._last_us)  # t3.5 since the last frame?
                if 0 <= d < self._gap_us:  # (< 0: wrapped, long ago)
                    return (self._gap_us - d) // 1000 + 1
            elif st == _S_SEND:
                if self.de is None:
                    w = self.uart.write(self._txv)
                    if w != self._n:
                        self._write(self._n, w or 0)  # (EAGAIN or a part: the careful way)
                    self.tx += 1  # _start(), inline
                    self._limit = self.timeout_ms + self._wire_ms
                    self._t0 = ticks_ms()
                    self._got = 0
                    self._want = self._need
                    self._st = _S_RX  # and look for the reply at once (it may be there)
                else:
                    self._st = _S_DE
                    w = self._de_send(self._n)
                    if w:
                        return w
            elif st == _S_DE:
                if not self._de_done():
                    # a transmitter that never reports done (txdone() stuck) must not hold DE,
                    # and the bus, for ever: past the frame time plus the timeout the attempt is
                    # a timeout (counted; DE released by end())
                    if ticks_diff(ticks_us(), self._de_t0) > self._de_us + self.timeout_ms * 1000:
                        self.timeouts += 1
                        raise ModbusTimeout("tx stuck")
                    return 0
                self._start()
                self._st = _S_RX
            elif st == _S_RX:
                w = self._poll()
                if w > 0:
                    return w
                if w == 0:
                    return DONE
                if w == -2:  # busy (exception 6): the device asks for time; back off, then again
                    if self._attempt >= self.max_retries:
                        return FAIL
                    self._attempt += 1
                    self.retries += 1
                    self._st = _S_GAP
                    return _backoff(self.timeout_ms, self._attempt)
                # the line must be silent before anything else goes out, after the last attempt
                # too: the next request must never meet this one's late reply
                self._quiet_begin(isinstance(self._err, ModbusTimeout))
                self._st = _S_QUIET
            else:  # _S_QUIET
                if self._quiet_step():
                    return 1
                if self._attempt >= self.max_retries:
                    return FAIL
                self._attempt += 1
                self.retries += 1
                self._st = _S_GAP

    def end(self):
        if self._de_on:  # an error or a cancel while transmitting
            self._de_on = False
            self.de.value(0)
        self._busy = False

    async def _transact(self, unit, fn, addr, arg, values):
        while self._busy:  # tasks sharing the bus never interleave
            await _sleep_ms(1)
        try:
            self.begin(unit, fn, addr, arg, values)
            w = self.step()
            while w >= 0:
                await _sleep_ms(w)
                w = self.step()
            if w == FAIL:
                raise self._err
            return self._res
        finally:
            self.end()


def TcpMaster(host, port, timeout_ms=200, retries=1):
    """Modbus TCP master (agent/modbus_tcp_master.py): loaded only when a meter is on TCP, so
    an RTU site does not keep its code in RAM."""
    from agent.modbus_tcp_master import TcpMaster as T

    return T(host, port, timeout_ms, retries)
