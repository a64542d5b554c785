"""Modbus RTU framing (pure: MicroPython and CPython).

Frames are built into and parsed from caller-owned (preallocated) buffers.

ADU:  unit(1) | PDU: fn(1) data(N) | CRC-16 (low byte first)

The PDU helpers are agent.modbus_pdu's (shared with agent.modbus_tcp; re-exported here for the
RTU master). A site with only Modbus TCP never loads this module nor its CRC table.

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
from agent.modbus_errors import ModbusCRCError, ModbusFrameError
from agent.modbus_pdu import (  # noqa: F401  (check_response_pdu: re-exported for the RTU master)
    _get16,
    check_response_pdu,
    parse_request_pdu,
    put_request_pdu,
    put_response_pdu,
    response_pdu_len,
)

MAX_ADU = const(256)
EXC_LEN = const(5)  # unit, fn|0x80, code, crc(2)
_MIN_LEN = const(4)


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
