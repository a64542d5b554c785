"""Modbus TCP (MBAP) framing (pure: MicroPython and CPython).

ADU: tid(2) pid(2)=0 length(2) unit(1) | PDU   (length = 1 + PDU length)

The PDU is built/checked by the shared helpers in agent.modbus_pdu, so RTU
and TCP cannot disagree about function codes, counts or exceptions.
"""
from agent.compat import const
from agent.modbus_errors import ModbusFrameError
from agent.modbus_pdu import (
    _get16,
    _put16,
    check_response_pdu,
    parse_request_pdu,
    put_request_pdu,
    put_response_pdu,
    response_pdu_len,
)

MBAP_LEN = const(7)
HEAD_LEN = const(6)  # bytes needed to know the frame length
MAX_ADU = const(260)


def next_tid(tid):
    """Next transaction id (16 bit, wraps; 0 is skipped so it is never 'unset')."""
    tid = (tid + 1) & 0xFFFF
    return tid or 1


def put_header(buf, tid, unit, pdu_len):
    _put16(buf, 0, tid)
    buf[2] = 0
    buf[3] = 0
    _put16(buf, 4, pdu_len + 1)
    buf[6] = unit
    return MBAP_LEN + pdu_len


def parse_header(buf):
    """(tid, pid, length, unit) of the MBAP header in buf[:7]."""
    return _get16(buf, 0), _get16(buf, 2), _get16(buf, 4), buf[6]


def frame_len(buf, n):
    """Total ADU length once 6 header bytes arrived (0: need more).

    Raises ModbusFrameError for protocol id != 0 or an impossible length.
    """
    if n < HEAD_LEN:
        return 0
    if buf[2] or buf[3]:
        raise ModbusFrameError("protocol id")
    ln = _get16(buf, 4)
    if ln < 2 or ln > 254:
        raise ModbusFrameError("mbap length")
    return HEAD_LEN + ln


def build_request(buf, tid, unit, fn, addr, arg=1, values=None):
    """Request ADU into buf; returns its length (args as modbus_pdu.put_request_pdu)."""
    if not 0 <= unit <= 255:
        raise ValueError("unit")
    return put_header(buf, tid, unit, put_request_pdu(buf, MBAP_LEN, fn, addr, arg, values))


def response_len(fn, arg=1):
    """ADU length of the normal response to (fn, count)."""
    return MBAP_LEN + response_pdu_len(fn, arg)


def parse_response(buf, n, tid, unit, fn, addr=None, arg=None):
    """Validate response ADU buf[:n]; returns a memoryview of the data
    (register/bit bytes for fn 1-4, the 4 echoed bytes for writes).

    ModbusFrameError: short, protocol id, length, tid, unit, function, byte
    count.  ModbusException(code) for an exception response.
    """
    if n is None:
        n = len(buf)
    if n < MBAP_LEN + 2:
        raise ModbusFrameError("short frame")
    if frame_len(buf, n) != n:
        raise ModbusFrameError("mbap length")
    if _get16(buf, 0) != tid:
        raise ModbusFrameError("transaction id")
    if buf[6] != unit:
        raise ModbusFrameError("unit id")
    dl = check_response_pdu(buf, MBAP_LEN, n, fn, addr, arg)
    s = MBAP_LEN + (2 if fn <= 4 else 1)
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    return mv[s:s + dl]


def parse_request(buf, n=None):
    """Server side: (tid, unit, fn, addr, arg, data) of request ADU buf[:n].

    ModbusFrameError: drop (or close).  ModbusException(code, fn, unit):
    answer with build_exception(tx, tid, e.unit, e.fn, e.code).
    """
    if n is None:
        n = len(buf)
    if n < MBAP_LEN + 1:
        raise ModbusFrameError("short frame")
    if frame_len(buf, n) != n:
        raise ModbusFrameError("mbap length")
    unit = buf[6]
    fn, addr, arg, data = parse_request_pdu(buf, MBAP_LEN, n, unit)
    return _get16(buf, 0), unit, fn, addr, arg, data


def request_tid(buf):
    return _get16(buf, 0)


def build_response(buf, tid, unit, fn, addr=0, arg=0, data=None):
    """Server side: normal response ADU into buf; returns its length."""
    return put_header(buf, tid, unit, put_response_pdu(buf, MBAP_LEN, fn, addr, arg, data))


def build_exception(buf, tid, unit, fn, code):
    """Exception response ADU into buf; returns 9."""
    buf[MBAP_LEN] = (fn | 0x80) & 0xFF
    buf[MBAP_LEN + 1] = code
    return put_header(buf, tid, unit, 2)
