"""Modbus PDU (function code + data), shared by RTU and TCP framing (pure: MicroPython and CPython).

The PDU helpers take an offset: the PDU sits at 1 in an RTU ADU (agent.modbus_rtu) and at 7 in
a TCP one (agent.modbus_tcp), so the two cannot disagree about function codes, counts or
exceptions. A module of its own so that a site with only Modbus TCP (meter and utility server)
never loads the RTU framing and its CRC table (docs/architecture.md, "Test heaps").

    n = put_request_pdu(buf, o, fn, addr, count_or_value, values=None)
    dl = check_response_pdu(buf, o, end, fn, addr, count)      # master side
    fn, addr, arg, data = parse_request_pdu(buf, o, end, unit)  # server side
    n = put_response_pdu(buf, o, fn, addr, arg, data)

Errors: ModbusFrameError, ModbusException(code) (both ModbusError). Bad *arguments* from our own
code raise ValueError.
"""
from agent.compat import const
from agent.modbus_errors import ModbusException, ModbusFrameError

# exception codes a server answers with (the others are not used here)
ILLEGAL_FUNCTION = const(1)
ILLEGAL_DATA_ADDRESS = const(2)
ILLEGAL_DATA_VALUE = const(3)
SERVER_DEVICE_BUSY = const(6)
GATEWAY_TARGET_FAILED = const(11)

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
