"""Modbus TCP master over asyncio: the TCP half of agent.modbus_rtu_master (same API and counters).

Split out so an RS-485 site never loads it; see agent/modbus_rtu_master.py for the waiting strategy.

The poll task drives a transaction through begin()/step()/end() (the RTU master's protocol: step()
returns the ms to sleep, DONE or FAIL), so a steady-state read allocates nothing: the MBAP request
is built in the preallocated buffer, the reply read with readinto into the preallocated one. A (re)connect, and the CPython streams path, run as a task of
their own that step() waits for: those allocate, but only when connecting (or off the board).
"""
import asyncio

from agent import modbus_pdu as pdu
from agent import modbus_tcp as tcp
from agent.compat import ticks_add, ticks_diff, ticks_ms
from agent.modbus_errors import ModbusConnectionError, ModbusError, ModbusException, ModbusFrameError, ModbusTimeout
from agent.modbus_base import _Master, _sleep_ms, _wait_for_ms, _written_count


DONE = -1  # step(): as agent.modbus_rtu_master
FAIL = -2
_T_CONN = 0  # transaction states: connect (then a new request), send, receive, (CPython) streams
_T_SEND = 1
_T_RX = 2
_T_CPY = 3


class ReconnectWait(ModbusConnectionError):
    """A request refused at once: the last connect failed and its back-off has not passed."""


class TcpMaster(_Master):
    """Modbus TCP master over asyncio.open_connection, reconnecting after
    errors.  On MicroPython the connected non-blocking socket is driven
    directly (same poll loop as RtuMaster); on CPython the asyncio streams
    are used.  timeout_ms bounds the connect and each response.  A reply
    whose transaction id is not the current one (a late answer to an
    abandoned request) is skipped and counted in bad_frames."""

    def __init__(self, host, port, timeout_ms=200, retries=1):
        _Master.__init__(self, timeout_ms, retries)
        self.host = host
        self.port = port
        self._tx = bytearray(tcp.MAX_ADU)
        self._txmv = memoryview(self._tx)
        self._rx = bytearray(tcp.MAX_ADU)
        self._rxmv = memoryview(self._rx)
        self._view = self._rxmv[9:9]
        self._txv = self._txmv[:0]
        self._off = 0
        self._tid = 0
        self._sock = None
        self._reader = None
        self._writer = None
        self.connects = 0
        # reconnect back-off: after a failed connect, no new one before _next (ms ticks);
        # the wait doubles from 100 ms to 2 s and resets at the next good reply
        self._wait_ms = 0
        self._next = 0
        self.backoffs = 0  # requests failed at once while waiting to reconnect
        self._fresh = False
        self._n = self._fn = self._unit = self._got = self._want = self._t0 = 0
        self._addr = self._arg = None
        self._res = None
        self._st = self._attempt = self._task = 0  # step(): state, attempt, a task running (1)
        self._err = self._terr = None
        self._qc = 0  # begin()'s count and values
        self._qv = None

    def _back_off(self):
        w = self._wait_ms
        self._wait_ms = w = 100 if not w else (w * 2 if w < 1000 else 2000)
        self._next = ticks_add(ticks_ms(), w)

    def counters(self):
        c = _Master.counters(self)
        c["connects"] = self.connects
        c["backoffs"] = self.backoffs
        return c

    def close(self):
        s = self._sock
        w = self._writer
        self._sock = self._reader = self._writer = None
        try:
            if s is not None:
                s.close()
            elif w is not None:
                w.close()
        except OSError:
            pass

    async def _connect(self, retry=0):
        # (a coroutine of its own: the poll's transaction frame stays as small as before)
        if retry and self._wait_ms:  # a retry waits out a back-off shorter than the timeout
            w = ticks_diff(self._next, ticks_ms())
            if 0 < w <= self.timeout_ms:
                await _sleep_ms(w)
        if self._wait_ms and ticks_diff(ticks_ms(), self._next) < 0:
            self.backoffs += 1
            raise ReconnectWait("reconnect back-off")
        try:
            r, w = await _wait_for_ms(asyncio.open_connection(self.host, self.port), self.timeout_ms)
        except (OSError, asyncio.TimeoutError) as e:
            self._back_off()
            raise ModbusConnectionError(str(e))
        self.connects += 1
        self._fresh = True  # no good reply on this connection yet
        s = getattr(r, "s", None)  # MicroPython Stream: the raw non-blocking socket
        if s is not None and hasattr(s, "readinto"):
            self._sock = s
        else:
            self._reader = r
            self._writer = w

    def _prepare(self, unit, fn, addr, arg, values):
        self._tid = tid = tcp.next_tid(self._tid)
        self._n = tcp.build_request(self._tx, tid, unit, fn, addr, arg, values)
        if fn == 15 or fn == 16:
            arg = _written_count(fn, self._tx, tcp.MBAP_LEN)
        self._unit = unit
        self._fn = fn
        self._addr = addr
        self._arg = arg
        self._got = self._want = 0
        self._off = 0
        self._t0 = ticks_ms()
        self.tx += 1

    def _send(self):
        # MicroPython socket: True when the whole request is out
        n = self._n
        off = self._off
        if len(self._txv) != n:  # a poll repeats the same request size
            self._txv = self._txmv[:n]
        w = self._sock.write(self._txv if off == 0 else self._txv[off:])
        if w:
            off = self._off = off + w
        if off >= n:
            return True
        if ticks_diff(ticks_ms(), self._t0) >= self.timeout_ms:
            raise ModbusTimeout("tx")
        return False

    def _poll(self):
        # MicroPython socket: True when the reply is in (_res), else False
        rx = self._rx
        mv = self._rxmv
        got = self._got
        r = self._sock.readinto(mv if got == 0 else mv[got:])
        if r == 0:
            raise ModbusConnectionError("closed")
        if r:
            got += r
            tid = self._tid
            want = self._want
            while True:
                if not want:
                    want = tcp.frame_len(rx, got)
                if not want or got < want:
                    break
                if rx[0] != tid >> 8 or rx[1] != tid & 0xFF:
                    # late reply to an abandoned request: skip it
                    self.bad_frames += 1
                    for i in range(got - want):
                        rx[i] = rx[i + want]
                    got -= want
                    want = 0
                    continue
                dl = self._check(want)
                if got > want:
                    self.junk += got - want
                self._set_res(dl)
                return True
            self._got = got
            self._want = want
        if ticks_diff(ticks_ms(), self._t0) >= self.timeout_ms:
            raise ModbusTimeout("timeout")
        return False

    def _check(self, n):
        rx = self._rx
        if tcp.frame_len(rx, n) != n or rx[6] != self._unit:
            raise ModbusFrameError("mbap length / unit id")
        return pdu.check_response_pdu(rx, tcp.MBAP_LEN, n, self._fn, self._addr, self._arg)

    def _set_res(self, dl):
        if self._fn <= 4:
            if len(self._view) != dl:
                self._view = self._rxmv[9:9 + dl]
            self._res = self._view
        else:
            self._res = None

    async def _xfer_cpython(self):
        self._writer.write(self._tx[:self._n])
        await self._writer.drain()
        rx = self._rx
        while True:
            try:
                head = await _wait_for_ms(self._reader.readexactly(6), self.timeout_ms)
                rx[0:6] = head
                want = tcp.frame_len(rx, 6)
                body = await _wait_for_ms(self._reader.readexactly(want - 6), self.timeout_ms)
            except asyncio.TimeoutError:
                raise ModbusTimeout("timeout")
            except asyncio.IncompleteReadError:
                raise ModbusConnectionError("closed")
            rx[6:want] = body
            if rx[0] != self._tid >> 8 or rx[1] != self._tid & 0xFF:
                self.bad_frames += 1
                continue
            self._set_res(self._check(want))
            return

    # -- one transaction as a state machine (the poll task drives it without a coroutine) --
    def begin(self, unit, fn, addr, arg, values=None):
        """Start a transaction (not _busy). Then step() until DONE (result in _res) or FAIL
        (error in _err); a value >= 0 is the ms to sleep first. end() when done, also on a cancel."""
        self._busy = True
        self._unit = unit
        self._fn = fn
        self._addr = addr
        self._qc = arg
        self._qv = values
        self._attempt = 0
        self._st = _T_CONN

    async def _bg(self, conn):
        # a connect or a CPython streams transfer, as a task step() waits for
        try:
            if conn:
                await self._connect(self._attempt)
            else:
                await self._xfer_cpython()
        except Exception as e:  # handled by step()
            self._terr = e
        self._task = 0

    def step(self):
        while True:
            st = self._st
            try:
                if self._task:
                    return 1
                e = self._terr
                if e is not None:
                    self._terr = None
                    raise e
                if st == _T_CONN:
                    c = self._sock is None and self._reader is None
                    if not c:
                        self._prepare(self._unit, self._fn, self._addr, self._qc, self._qv)
                        if self._sock is not None:
                            self._st = _T_SEND
                            continue
                        self._st = _T_CPY
                    self._task = 1  # a connect (allocates: once per connection) or CPython streams
                    asyncio.create_task(self._bg(c))
                    return 1
                elif st == _T_SEND:
                    if not self._send():
                        return 1
                    self._st = _T_RX
                elif st == _T_RX:
                    if not self._poll():
                        return 1
                    st = _T_CPY
                if st == _T_CPY:
                    self.ok += 1
                    self._wait_ms = 0
                    self._fresh = False
                    return DONE
            except ModbusException as e:
                self.exceptions += 1
                if e.code != 6 or self._attempt >= self.max_retries:
                    self._err = e
                    return FAIL
                self._attempt += 1  # busy: back off, then ask again on the same connection
                self.retries += 1
                self._st = _T_CONN
                return min(25 << (self._attempt - 1), self.timeout_ms)
            except ReconnectWait as e:
                self._err = e  # not an attempt: nothing sent, counted in backoffs only
                return FAIL
            except (ModbusError, OSError) as e:
                err = e if isinstance(e, ModbusError) else ModbusConnectionError(str(e))
                if self._fresh:  # a connection that never gave a good reply: back off too
                    self._fresh = False
                    self._back_off()
                self.close()
                self._count(err)
                if self._attempt >= self.max_retries:
                    self._err = err
                    return FAIL
                self._attempt += 1
                self.retries += 1
                self._st = _T_CONN

    def end(self):
        self._busy = False

    async def _transact(self, unit, fn, addr, arg, values):
        while self._busy:  # tasks sharing the connection never interleave
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
