"""Modbus RTU framing (pure: MicroPython and CPython).

Frames are built into and parsed from caller-owned (preallocated) buffers.

ADU:  unit(1) | PDU: fn(1) data(N) | CRC-16 (low byte first)

The PDU helpers (put_request_pdu, check_response_pdu, parse_request_pdu,
put_response_pdu) take an offset so modbus_tcp shares them (PDU at 7 there).

Master side:
    n = build_request(tx, unit, fn, addr, count_or_value, values=None)
    need = response_len(fn, count)        # bytes of a normal response
    frame_len(rx, got)                    # total needed once the head arrived
    regs = parse_response(rx, need, unit, fn, addr, count)   # memoryview
Server side:
    unit, fn, addr, arg, data = parse_request(rx, n)
    n = build_response(tx, unit, fn, addr, arg, data) / build_exception(...)

Errors: ModbusCRCError, ModbusFrameError, ModbusException(code) (all
ModbusError).  Bad *arguments* from our own code raise ValueError.
"""
from agent.compat import const
from agent.crc import crc16_modbus
from agent.modbus_errors import (  # noqa: F401  (re-exported)
    ModbusCRCError,
    ModbusError,
    ModbusException,
    ModbusFrameError,
    ModbusTimeout,
)

_READ_COILS = const(1)
_READ_DISCRETE_INPUTS = const(2)
_READ_HOLDING_REGISTERS = const(3)
_READ_INPUT_REGISTERS = const(4)
_WRITE_SINGLE_COIL = const(5)
_WRITE_SINGLE_REGISTER = const(6)
_WRITE_MULTIPLE_COILS = const(15)
_WRITE_MULTIPLE_REGISTERS = const(16)

ILLEGAL_FUNCTION = const(1)
ILLEGAL_DATA_ADDRESS = const(2)
ILLEGAL_DATA_VALUE = const(3)
_SERVER_DEVICE_FAILURE = const(4)
_ACKNOWLEDGE = const(5)
SERVER_DEVICE_BUSY = const(6)
_GATEWAY_PATH_UNAVAILABLE = const(10)
GATEWAY_TARGET_FAILED = const(11)

MAX_ADU = const(256)
EXC_LEN = const(5)  # unit, fn|0x80, code, crc(2)
_MIN_LEN = const(4)
_MAX_READ_REGS = const(125)
_MAX_WRITE_REGS = const(123)
_MAX_READ_BITS = const(2000)
_MAX_WRITE_BITS = const(1968)


def _put16(buf, i, v):
    buf[i] = (v >> 8) & 0xFF
    buf[i + 1] = v & 0xFF


def _get16(buf, i):
    return (buf[i] << 8) | buf[i + 1]


def _is_bytes(x):
    return isinstance(x, (bytes, bytearray, memoryview))


# ---------------------------------------------------------------- PDU level
def put_request_pdu(buf, o, fn, addr, arg=1, values=None):
    """Write a request PDU at buf[o]; return its length.

    fn 1-4: arg = count.  fn 5: arg truthy = ON.  fn 6: arg = value.
    fn 16: values = register ints, or raw big-endian register bytes.
    fn 15: values = sequence of 0/1 (or bools).  arg is ignored for 15/16.
    """
    if not 0 <= addr <= 0xFFFF:
        raise ValueError("addr")
    buf[o] = fn
    _put16(buf, o + 1, addr)
    if 1 <= fn <= 4:
        lim = _MAX_READ_REGS if fn >= 3 else _MAX_READ_BITS
        if not 1 <= arg <= lim:
            raise ValueError("count")
        _put16(buf, o + 3, arg)
        return 5
    if fn == 6:
        if not 0 <= arg <= 0xFFFF:
            raise ValueError("value")
        _put16(buf, o + 3, arg)
        return 5
    if fn == 5:
        _put16(buf, o + 3, 0xFF00 if arg else 0)
        return 5
    if fn == 16:
        if values is None:
            raise ValueError("values")
        d = o + 6
        if _is_bytes(values):
            bc = len(values)
            if bc & 1:
                raise ValueError("odd byte count")
            count = bc >> 1
            if not 1 <= count <= _MAX_WRITE_REGS:
                raise ValueError("count")
            for i in range(bc):
                buf[d + i] = values[i]
        else:
            count = len(values)
            if not 1 <= count <= _MAX_WRITE_REGS:
                raise ValueError("count")
            bc = count << 1
            for i in range(count):
                v = values[i]
                if not 0 <= v <= 0xFFFF:
                    raise ValueError("value")
                _put16(buf, d + 2 * i, v)
        _put16(buf, o + 3, count)
        buf[o + 5] = bc
        return 6 + bc
    if fn == 15:
        if values is None:
            raise ValueError("values")
        count = len(values)
        if not 1 <= count <= _MAX_WRITE_BITS:
            raise ValueError("count")
        bc = (count + 7) >> 3
        d = o + 6
        for i in range(bc):
            buf[d + i] = 0
        for i in range(count):
            if values[i]:
                buf[d + (i >> 3)] |= 1 << (i & 7)
        _put16(buf, o + 3, count)
        buf[o + 5] = bc
        return 6 + bc
    raise ValueError("function")


def response_pdu_len(fn, arg=1):
    """PDU length of the normal response to request (fn, count)."""
    if fn == 3 or fn == 4:
        return 2 + 2 * arg
    if fn == 1 or fn == 2:
        return 2 + ((arg + 7) >> 3)
    if fn == 5 or fn == 6 or fn == 15 or fn == 16:
        return 5
    raise ValueError("function")


def check_response_pdu(buf, o, end, fn, addr=None, arg=None):
    """Validate response PDU buf[o:end] against the request.

    Returns the data length; data starts at o + 2 for fn 1-4 (after the byte
    count) and at o + 1 for writes (the 4 echoed bytes).  Raises
    ModbusException for an exception response, ModbusFrameError otherwise.
    For fn 16/15 `arg` is the count written; for 6 the value; for 5 on/off.
    """
    plen = end - o
    if plen < 2:
        raise ModbusFrameError("short pdu")
    rf = buf[o]
    if rf == (fn | 0x80):
        if plen != 2:
            raise ModbusFrameError("exception length")
        raise ModbusException(buf[o + 1], fn)
    if rf != fn:
        raise ModbusFrameError("function")
    if 1 <= fn <= 4:
        bc = buf[o + 1]
        if plen != 2 + bc:
            raise ModbusFrameError("byte count")
        if arg is not None:
            exp = 2 * arg if fn >= 3 else (arg + 7) >> 3
            if bc != exp:
                raise ModbusFrameError("byte count")
        return bc
    if fn == 5 or fn == 6 or fn == 15 or fn == 16:
        if plen != 5:
            raise ModbusFrameError("length")
        if addr is not None and _get16(buf, o + 1) != addr:
            raise ModbusFrameError("echo addr")
        if arg is not None:
            if fn == 5:
                arg = 0xFF00 if arg else 0
            if _get16(buf, o + 3) != arg:
                raise ModbusFrameError("echo value")
        return 4
    raise ModbusFrameError("function")


def parse_request_pdu(buf, o, end, unit=0):
    """Server side: validate request PDU buf[o:end].

    Returns (fn, addr, arg, data): arg is the count (1-4, 15, 16), the value
    (6) or 0xFF00/0 (5); data is a memoryview of the written bytes (15, 16)
    or None.  Raises ModbusException(code, fn, unit) when the server must
    answer with an exception, ModbusFrameError when it must stay silent.
    """
    plen = end - o
    if plen < 1:
        raise ModbusFrameError("short pdu")
    fn = buf[o]
    if fn > 6 and fn != 15 and fn != 16 or fn == 0:
        if fn & 0x80:
            raise ModbusFrameError("function")
        raise ModbusException(ILLEGAL_FUNCTION, fn, unit)
    if fn <= 6:
        if plen != 5:
            raise ModbusFrameError("length")
        addr = _get16(buf, o + 1)
        arg = _get16(buf, o + 3)
        if fn <= 4:
            lim = _MAX_READ_REGS if fn >= 3 else _MAX_READ_BITS
            if not 1 <= arg <= lim:
                raise ModbusException(ILLEGAL_DATA_VALUE, fn, unit)
            if addr + arg > 0x10000:
                raise ModbusException(ILLEGAL_DATA_ADDRESS, fn, unit)
        elif fn == 5 and arg != 0xFF00 and arg != 0:
            raise ModbusException(ILLEGAL_DATA_VALUE, fn, unit)
        return fn, addr, arg, None
    if plen < 6:
        raise ModbusFrameError("length")
    addr = _get16(buf, o + 1)
    arg = _get16(buf, o + 3)
    bc = buf[o + 5]
    if plen != 6 + bc:
        raise ModbusFrameError("byte count")
    if fn == 16:
        ok = 1 <= arg <= _MAX_WRITE_REGS and bc == 2 * arg
    else:
        ok = 1 <= arg <= _MAX_WRITE_BITS and bc == (arg + 7) >> 3
    if not ok:
        raise ModbusException(ILLEGAL_DATA_VALUE, fn, unit)
    if addr + arg > 0x10000:
        raise ModbusException(ILLEGAL_DATA_ADDRESS, fn, unit)
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    return fn, addr, arg, mv[o + 6:o + 6 + bc]


def put_response_pdu(buf, o, fn, addr=0, arg=0, data=None):
    """Server side: write a normal response PDU at buf[o]; return its length.

    fn 1-4: data = payload bytes (packed bits / big-endian registers), or for
    fn 3/4 a sequence of register ints.  fn 5/6/15/16: echo (addr, arg).
    """
    buf[o] = fn
    if 1 <= fn <= 4:
        if data is None:
            raise ValueError("data")
        if _is_bytes(data):
            bc = len(data)
            if bc > 250:
                raise ValueError("too long")
            buf[o + 2:o + 2 + bc] = data
        else:
            if fn < 3:
                raise ValueError("bits need packed bytes")
            bc = 2 * len(data)
            if bc > 250:
                raise ValueError("too long")
            for i in range(len(data)):
                _put16(buf, o + 2 + 2 * i, data[i] & 0xFFFF)
        buf[o + 1] = bc
        return 2 + bc
    if fn == 5 or fn == 6 or fn == 15 or fn == 16:
        _put16(buf, o + 1, addr)
        _put16(buf, o + 3, arg)
        return 5
    raise ValueError("function")


# ---------------------------------------------------------------- RTU ADU
def _seal(buf, n):
    c = crc16_modbus(buf, n)
    buf[n] = c & 0xFF
    buf[n + 1] = c >> 8
    return n + 2


def check_crc(buf, n):
    """True when the last two of buf[:n] are the CRC of the rest."""
    if n < 3:
        return False
    c = crc16_modbus(buf, n - 2)
    return buf[n - 2] == (c & 0xFF) and buf[n - 1] == (c >> 8)


def build_request(buf, unit, fn, addr, arg=1, values=None):
    """Request ADU into buf; returns its length (see put_request_pdu)."""
    if not 0 <= unit <= 247:
        raise ValueError("unit")
    buf[0] = unit
    return _seal(buf, 1 + put_request_pdu(buf, 1, fn, addr, arg, values))


def response_len(fn, arg=1):
    """ADU length of the normal response to (fn, count)."""
    return response_pdu_len(fn, arg) + 3


def request_response_len(req):
    """ADU length of the normal response to the request frame `req`."""
    fn = req[1]
    return response_len(fn, _get16(req, 4) if fn <= 4 else 1)


def frame_len(buf, n, request=False):
    """Total ADU length once enough of the head (buf[:n]) has arrived.

    Returns 0 when more bytes are needed to know.  Raises ModbusFrameError
    for a function code whose length cannot be known (unknown function).
    request=False: a response (master side); True: a request (server side).
    """
    if n < 2:
        return 0
    fn = buf[1]
    if request:
        if 1 <= fn <= 6:
            return 8
        if fn == 15 or fn == 16:
            return 9 + buf[6] if n >= 7 else 0
        raise ModbusFrameError("function")
    if fn & 0x80:
        return EXC_LEN
    if 1 <= fn <= 4:
        return 5 + buf[2] if n >= 3 else 0
    if fn == 5 or fn == 6 or fn == 15 or fn == 16:
        return 8
    raise ModbusFrameError("function")


def parse_response(buf, n, unit, fn, addr=None, arg=None):
    """Validate response ADU buf[:n] to request (unit, fn, addr, arg).

    Returns a memoryview into buf: the register/bit bytes for fn 1-4, the
    4 echoed bytes for writes.  Raises ModbusFrameError (short, unit,
    function, byte count), ModbusCRCError or ModbusException(code).
    """
    if n is None:
        n = len(buf)
    if n < _MIN_LEN:
        raise ModbusFrameError("short frame")
    if not check_crc(buf, n):
        raise ModbusCRCError("crc")
    if buf[0] != unit:
        raise ModbusFrameError("unit id")
    dl = check_response_pdu(buf, 1, n - 2, fn, addr, arg)
    s = 3 if fn <= 4 else 2
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    return mv[s:s + dl]


def parse_request(buf, n=None):
    """Server side: validate a request ADU.  Returns (unit, fn, addr, arg, data).

    ModbusCRCError / ModbusFrameError: stay silent.  ModbusException: answer
    with build_exception(tx, e.unit, e.fn, e.code) (unless unit 0, broadcast).
    """
    if n is None:
        n = len(buf)
    if n < _MIN_LEN:
        raise ModbusFrameError("short frame")
    if not check_crc(buf, n):
        raise ModbusCRCError("crc")
    unit = buf[0]
    fn, addr, arg, data = parse_request_pdu(buf, 1, n - 2, unit)
    return unit, fn, addr, arg, data


def build_response(buf, unit, fn, addr=0, arg=0, data=None):
    """Server side: normal response ADU into buf; returns its length."""
    buf[0] = unit
    return _seal(buf, 1 + put_response_pdu(buf, 1, fn, addr, arg, data))


def build_exception(buf, unit, fn, code):
    """Exception response ADU (unit, fn | 0x80, code, crc) into buf; returns 5."""
    buf[0] = unit
    buf[1] = (fn | 0x80) & 0xFF
    buf[2] = code
    return _seal(buf, 3)


# ---------------------------------------------------------------- timing
def char_time_us(baud, bits=11):
    """Time of one character on the line (11 bits: start, 8 data, parity or
    second stop, stop), rounded up."""
    return (bits * 1000000 + baud - 1) // baud


def frame_gap_us(baud):
    """t3.5 inter-frame silence; fixed 1750 us above 19200 baud (spec)."""
    if baud > 19200:
        return 1750
    return (38500000 + baud - 1) // baud


def char_gap_us(baud):
    """t1.5 inter-character limit; fixed 750 us above 19200 baud (spec)."""
    if baud > 19200:
        return 750
    return (16500000 + baud - 1) // baud
