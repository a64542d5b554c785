"""Modbus RTU/TCP framing (agent.modbus_rtu, agent.modbus_tcp, agent.crc)
checked against pymodbus in both directions, and CPython vs real MicroPython.
"""
from __future__ import annotations

import json
import struct
import zlib

import pytest
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDiscreteInputsRequest,
    WriteMultipleCoilsRequest,
    WriteMultipleCoilsResponse,
    WriteSingleCoilRequest,
    WriteSingleCoilResponse,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
    WriteMultipleRegistersRequest,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterRequest,
    WriteSingleRegisterResponse,
)

from agent import crc, modbus_rtu as rtu, modbus_tcp as tcp
from agent.modbus_errors import (
    ModbusCRCError,
    ModbusException,
    ModbusFrameError,
)

RTU_SRV = FramerRTU(DecodePDU(is_server=True))   # decodes requests
RTU_CLI = FramerRTU(DecodePDU(is_server=False))  # decodes responses
TCP_SRV = FramerSocket(DecodePDU(is_server=True))
TCP_CLI = FramerSocket(DecodePDU(is_server=False))

# (unit, fn, addr, arg, values, pymodbus request)
REQUESTS = [
    (1, 3, 0, 1, None, ReadHoldingRegistersRequest(address=0, count=1, dev_id=1)),
    (7, 3, 40001, 125, None, ReadHoldingRegistersRequest(address=40001, count=125, dev_id=7)),
    (247, 4, 0xFFFF, 1, None, ReadInputRegistersRequest(address=0xFFFF, count=1, dev_id=247)),
    (2, 4, 300, 10, None, ReadInputRegistersRequest(address=300, count=10, dev_id=2)),
    (3, 1, 5, 19, None, ReadCoilsRequest(address=5, count=19, dev_id=3)),
    (3, 2, 0, 2000, None, ReadDiscreteInputsRequest(address=0, count=2000, dev_id=3)),
    (1, 6, 100, 0xBEEF, None, WriteSingleRegisterRequest(address=100, registers=[0xBEEF], dev_id=1)),
    (9, 6, 0, 0, None, WriteSingleRegisterRequest(address=0, registers=[0], dev_id=9)),
    (1, 16, 10, 0, [1, 2, 0xFFFF], WriteMultipleRegistersRequest(address=10, registers=[1, 2, 0xFFFF], dev_id=1)),
    (5, 16, 0, 0, list(range(123)), WriteMultipleRegistersRequest(address=0, registers=list(range(123)), dev_id=5)),
    (1, 5, 8, 1, None, WriteSingleCoilRequest(address=8, bits=[True], dev_id=1)),
    (1, 5, 8, 0, None, WriteSingleCoilRequest(address=8, bits=[False], dev_id=1)),
    (4, 15, 3, 0, [1, 0, 1, 1, 0, 0, 0, 0, 1], WriteMultipleCoilsRequest(address=3, bits=[1, 0, 1, 1, 0, 0, 0, 0, 1], dev_id=4)),
]


def _ours_rtu(unit, fn, addr, arg, values):
    buf = bytearray(256)
    n = rtu.build_request(buf, unit, fn, addr, arg, values)
    return bytes(buf[:n])


def _ours_tcp(tid, unit, fn, addr, arg, values):
    buf = bytearray(260)
    n = tcp.build_request(buf, tid, unit, fn, addr, arg, values)
    return bytes(buf[:n])


def _regs(b):
    return list(struct.unpack(">%dH" % (len(b) // 2), bytes(b)))


# ------------------------------------------------------------------ CRC
def test_crc_known_vectors_and_against_pymodbus_and_zlib():
    assert crc.crc16_modbus(b"123456789") == 0x4B37  # CRC-16/MODBUS check value
    data = bytes(range(256)) * 3
    for n in (0, 1, 2, 7, 100, 768):
        ours = crc.crc16_modbus(data, n)
        theirs = FramerRTU.compute_CRC(data[:n])  # pymodbus returns it byte-swapped
        assert ours == ((theirs >> 8) | ((theirs & 0xFF) << 8))
    # running CRC over pieces equals one pass
    assert crc.crc16_modbus(data[50:], 30, crc.crc16_modbus(data, 50)) == crc.crc16_modbus(data, 80)
    assert crc.crc32(b"123456789") == 0xCBF43926
    assert crc.crc32(data) == zlib.crc32(data)
    assert crc._crc32_py(data) == zlib.crc32(data)
    assert crc._crc32_py(data[10:], crc._crc32_py(data[:10])) == zlib.crc32(data)


# ------------------------------------------------------------------ requests: ours -> pymodbus
@pytest.mark.parametrize("unit,fn,addr,arg,values,pm", REQUESTS)
def test_rtu_request_equals_pymodbus_and_decodes(unit, fn, addr, arg, values, pm):
    ours = _ours_rtu(unit, fn, addr, arg, values)
    assert ours == RTU_SRV.buildFrame(pm)
    used, pdu = RTU_SRV.handleFrame(ours, 0, 0)
    assert used == len(ours) and pdu is not None
    assert (pdu.dev_id, pdu.function_code, pdu.address) == (unit, fn, addr)
    if fn in (3, 4, 1, 2):
        assert pdu.count == arg
    elif fn == 6:
        assert pdu.registers == [arg]
    elif fn == 16:
        assert pdu.registers == values and pdu.count == len(values)
    elif fn == 5:
        assert pdu.bits == [bool(arg)]
    elif fn == 15:
        assert pdu.bits[: len(values)] == [bool(v) for v in values]
    # the expected response length is what pymodbus builds for that request
    assert rtu.request_response_len(ours) == rtu.response_len(fn, arg if fn not in (15, 16) else len(values))


@pytest.mark.parametrize("unit,fn,addr,arg,values,pm", REQUESTS)
def test_tcp_request_equals_pymodbus_and_decodes(unit, fn, addr, arg, values, pm):
    tid = 0x1234 + fn
    pm.transaction_id = tid
    ours = _ours_tcp(tid, unit, fn, addr, arg, values)
    assert ours == TCP_SRV.buildFrame(pm)
    used, pdu = TCP_SRV.handleFrame(ours, 0, 0)
    assert used == len(ours)
    assert (pdu.transaction_id, pdu.dev_id, pdu.function_code, pdu.address) == (tid, unit, fn, addr)
    assert tcp.frame_len(ours, 6) == len(ours)


def test_raw_register_bytes_equal_int_values():
    assert _ours_rtu(1, 16, 5, 0, b"\x00\x01\xff\xfe") == _ours_rtu(1, 16, 5, 0, [1, 0xFFFE])


@pytest.mark.parametrize("args", [
    (1, 3, 0, 0, None), (1, 3, 0, 126, None), (1, 4, 70000, 1, None), (1, 6, 0, 0x10000, None),
    (1, 16, 0, 0, []), (1, 16, 0, 0, list(range(124))), (1, 16, 0, 0, [0x10000]),
    (1, 16, 0, 0, b"\x01"), (1, 8, 0, 1, None), (248, 3, 0, 1, None), (1, 15, 0, 0, None),
])
def test_bad_request_arguments_raise_valueerror(args):
    with pytest.raises(ValueError):
        _ours_rtu(*args)


# ------------------------------------------------------------------ responses: pymodbus -> ours
def _pm_rtu(pdu, unit):
    pdu.dev_id = unit
    return RTU_CLI.buildFrame(pdu)


@pytest.mark.parametrize("regs", [[0], [1, 2, 3], [0xFFFF] * 125, list(range(60))])
@pytest.mark.parametrize("fn,cls", [(3, ReadHoldingRegistersResponse), (4, ReadInputRegistersResponse)])
def test_pymodbus_register_responses_parse(regs, fn, cls):
    fr = _pm_rtu(cls(registers=regs), 17)
    assert len(fr) == rtu.response_len(fn, len(regs))
    assert rtu.frame_len(fr, 3) == len(fr)
    mv = rtu.parse_response(fr, len(fr), 17, fn, 100, len(regs))
    assert isinstance(mv, memoryview) and _regs(mv) == regs
    # same over TCP
    pdu = cls(registers=regs, dev_id=17, transaction_id=999)
    tfr = TCP_CLI.buildFrame(pdu)
    assert tcp.frame_len(tfr, 6) == len(tfr) == tcp.response_len(fn, len(regs))
    assert _regs(tcp.parse_response(tfr, len(tfr), 999, 17, fn, 100, len(regs))) == regs


def test_pymodbus_bit_and_write_responses_parse():
    bits = [True, False, True] + [False] * 7 + [True]
    fr = _pm_rtu(ReadCoilsResponse(bits=bits), 2)
    mv = rtu.parse_response(fr, len(fr), 2, 1, 0, len(bits))
    assert bytes(mv) == bytes([0b101, 0b100])
    fr = _pm_rtu(WriteSingleRegisterResponse(address=100, registers=[0xBEEF]), 1)
    assert bytes(rtu.parse_response(fr, len(fr), 1, 6, 100, 0xBEEF)) == b"\x00\x64\xbe\xef"
    fr = _pm_rtu(WriteMultipleRegistersResponse(address=10, count=3), 1)
    assert bytes(rtu.parse_response(fr, len(fr), 1, 16, 10, 3)) == b"\x00\x0a\x00\x03"
    with pytest.raises(ModbusFrameError):  # echo of a different count
        rtu.parse_response(fr, len(fr), 1, 16, 10, 4)
    with pytest.raises(ModbusFrameError):  # echo of a different address
        rtu.parse_response(fr, len(fr), 1, 16, 11, 3)
    fr = _pm_rtu(WriteSingleCoilResponse(address=8, bits=[True]), 1)
    assert bytes(rtu.parse_response(fr, len(fr), 1, 5, 8, 1)) == b"\x00\x08\xff\x00"
    fr = _pm_rtu(WriteMultipleCoilsResponse(address=3, count=9), 4)
    rtu.parse_response(fr, len(fr), 4, 15, 3, 9)


@pytest.mark.parametrize("code", [1, 2, 3, 4, 6, 11])
@pytest.mark.parametrize("fn", [3, 4, 6, 16])
def test_exception_responses(code, fn):
    pdu = ExceptionResponse(fn, code)
    fr = _pm_rtu(pdu, 5)
    assert len(fr) == rtu.EXC_LEN and rtu.frame_len(fr, 2) == 5
    with pytest.raises(ModbusException) as ei:
        rtu.parse_response(fr, len(fr), 5, fn, 0, 1)
    assert (ei.value.code, ei.value.fn) == (code, fn)
    pdu = ExceptionResponse(fn, code)
    pdu.dev_id, pdu.transaction_id = 5, 77
    tfr = TCP_CLI.buildFrame(pdu)
    with pytest.raises(ModbusException) as ei:
        tcp.parse_response(tfr, len(tfr), 77, 5, fn, 0, 1)
    assert ei.value.code == code
    # and our exception frames are what pymodbus builds
    buf = bytearray(16)
    assert bytes(buf[: rtu.build_exception(buf, 5, fn, code)]) == fr
    assert bytes(buf[: tcp.build_exception(buf, 77, 5, fn, code)]) == tfr


def _good_read():
    return bytearray(_pm_rtu(ReadHoldingRegistersResponse(registers=[10, 20]), 1))


def _resealed(b):
    b = bytearray(b)
    c = crc.crc16_modbus(b, len(b) - 2)
    b[-2], b[-1] = c & 0xFF, c >> 8
    return b


def _mut_crc(b):
    b[3] ^= 0x40
    return b


def _mut_crc_byte(b):
    b[-1] ^= 1
    return b


def _mut_unit(b):
    b[0] = 2
    return _resealed(b)


def _mut_fn(b):
    b[1] = 4
    return _resealed(b)


def _mut_bc(b):  # byte count says 6 but there are 4 data bytes
    b[2] = 6
    return _resealed(b)


def _mut_more_regs(b):  # a consistent frame, but 3 registers where 2 were asked
    return bytearray(_pm_rtu(ReadHoldingRegistersResponse(registers=[10, 20, 30]), 1))


def _mut_short(b):
    return b[:3]


def _mut_trunc(b):  # truncated, CRC recomputed
    return _resealed(b[:6])


def _mut_exc_other_fn(b):
    return bytearray(_pm_rtu(ExceptionResponse(4, 2), 1))


def _mut_long_exc(b):
    return _resealed(bytearray([1, 0x83, 2, 0, 0, 0]))


@pytest.mark.parametrize("mut,err", [
    (_mut_crc, ModbusCRCError), (_mut_crc_byte, ModbusCRCError), (_mut_unit, ModbusFrameError),
    (_mut_fn, ModbusFrameError), (_mut_bc, ModbusFrameError), (_mut_more_regs, ModbusFrameError),
    (_mut_short, ModbusFrameError), (_mut_trunc, ModbusFrameError), (_mut_exc_other_fn, ModbusFrameError),
    (_mut_long_exc, ModbusFrameError),
])
def test_bad_responses_rejected(mut, err):
    fr = mut(_good_read())
    with pytest.raises(err):
        rtu.parse_response(fr, len(fr), 1, 3, 0, 2)
    # pymodbus agrees that these are not the reply it asked for
    used, pdu = RTU_CLI.handleFrame(bytes(fr), 1, 0)
    ok = pdu is not None and pdu.function_code == 3 and pdu.dev_id == 1 and pdu.registers == [10, 20]
    assert not ok


def test_tcp_bad_responses_rejected():
    good = TCP_CLI.buildFrame(ReadHoldingRegistersResponse(registers=[10, 20], dev_id=1, transaction_id=5))
    assert _regs(tcp.parse_response(good, len(good), 5, 1, 3, 0, 2)) == [10, 20]
    cases = {
        "tid": (6, 1, 3, ModbusFrameError),
        "unit": (5, 2, 3, ModbusFrameError),
        "fn": (5, 1, 4, ModbusFrameError),
    }
    for _, (tid, unit, fn, err) in cases.items():
        with pytest.raises(err):
            tcp.parse_response(good, len(good), tid, unit, fn, 0, 2)
    bad = bytearray(good)
    bad[2] = 1  # protocol id
    with pytest.raises(ModbusFrameError):
        tcp.parse_response(bad, len(bad), 5, 1, 3, 0, 2)
    with pytest.raises(ModbusFrameError):
        tcp.parse_response(good[:-1], len(good) - 1, 5, 1, 3, 0, 2)
    with pytest.raises(ModbusFrameError):
        tcp.parse_response(good, len(good), 5, 1, 3, 0, 3)
    bad = bytearray(good)
    bad[5] = 1  # MBAP length 1
    with pytest.raises(ModbusFrameError):
        tcp.frame_len(bad, 6)
    assert tcp.frame_len(good, 5) == 0
    assert tcp.next_tid(0xFFFF) == 1 and tcp.next_tid(7) == 8


# ------------------------------------------------------------------ server side
@pytest.mark.parametrize("unit,fn,addr,arg,values,pm", REQUESTS)
def test_server_parses_pymodbus_requests(unit, fn, addr, arg, values, pm):
    fr = RTU_CLI.buildFrame(pm)
    assert rtu.frame_len(fr, 7, request=True) == len(fr)
    u, f, a, g, data = rtu.parse_request(fr)
    assert (u, f, a) == (unit, fn, addr)
    if fn == 16:
        assert g == len(values) and _regs(data) == values
    elif fn == 15:
        assert g == len(values)
        bits = [(data[i >> 3] >> (i & 7)) & 1 for i in range(g)]
        assert bits == values
    elif fn == 5:
        assert g == (0xFF00 if arg else 0) and data is None
    else:
        assert g == arg and data is None
    pm.transaction_id = 4242
    tfr = TCP_CLI.buildFrame(pm)
    tid, u, f, a, g2, _ = tcp.parse_request(tfr)
    assert (tid, u, f, a, g2) == (4242, unit, fn, addr, g)


def test_server_responses_decode_in_pymodbus():
    buf = bytearray(260)
    n = rtu.build_response(buf, 9, 3, data=[1, 0xFFFF, 300])
    used, pdu = RTU_CLI.handleFrame(bytes(buf[:n]), 0, 0)
    assert used == n and (pdu.dev_id, pdu.function_code, pdu.registers) == (9, 3, [1, 0xFFFF, 300])
    n = rtu.build_response(buf, 9, 4, data=b"\x00\x05")
    _, pdu = RTU_CLI.handleFrame(bytes(buf[:n]), 0, 0)
    assert (pdu.function_code, pdu.registers) == (4, [5])
    n = rtu.build_response(buf, 9, 1, data=b"\x05")
    _, pdu = RTU_CLI.handleFrame(bytes(buf[:n]), 0, 0)
    assert pdu.bits[:3] == [True, False, True]
    n = rtu.build_response(buf, 9, 16, addr=10, arg=3)
    _, pdu = RTU_CLI.handleFrame(bytes(buf[:n]), 0, 0)
    assert (pdu.function_code, pdu.address, pdu.count) == (16, 10, 3)
    n = rtu.build_response(buf, 9, 6, addr=10, arg=0x1234)
    _, pdu = RTU_CLI.handleFrame(bytes(buf[:n]), 0, 0)
    assert (pdu.address, pdu.registers) == (10, [0x1234])
    n = rtu.build_exception(buf, 9, 3, 2)
    _, pdu = RTU_CLI.handleFrame(bytes(buf[:n]), 0, 0)
    assert isinstance(pdu, ExceptionResponse) and pdu.exception_code == 2 and pdu.function_code == 0x83
    n = tcp.build_response(buf, 321, 9, 3, data=[7, 8])
    _, pdu = TCP_CLI.handleFrame(bytes(buf[:n]), 0, 0)
    assert (pdu.transaction_id, pdu.dev_id, pdu.registers) == (321, 9, [7, 8])


@pytest.mark.parametrize("frame,code", [
    (bytes([1, 3, 0, 0, 0, 0]), 3),          # count 0
    (bytes([1, 3, 0, 0, 0, 126]), 3),        # count > 125
    (bytes([1, 4, 0xFF, 0xFF, 0, 2]), 2),    # past the end of the address space
    (bytes([1, 5, 0, 1, 0x12, 0x34]), 3),    # coil value not 0/0xFF00
    (bytes([1, 16, 0, 0, 0, 2, 2, 0, 1]), 3),  # byte count != 2 * count
    (bytes([1, 8, 0, 0, 0, 0]), 1),          # unsupported function
    (bytes([1, 43, 14, 1, 0]), 1),
])
def test_server_request_exceptions(frame, code):
    fr = _resealed(bytearray(frame) + b"\0\0")
    with pytest.raises(ModbusException) as ei:
        rtu.parse_request(fr)
    assert (ei.value.code, ei.value.unit, ei.value.fn) == (code, 1, frame[1])


def test_server_request_frame_errors():
    good = _ours_rtu(1, 3, 0, 2, None)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    with pytest.raises(ModbusCRCError):
        rtu.parse_request(bad)
    with pytest.raises(ModbusFrameError):
        rtu.parse_request(good[:3])
    with pytest.raises(ModbusFrameError):  # fn 3 with a 6-byte PDU
        rtu.parse_request(_resealed(bytearray(good[:6]) + b"\0\0\0"))
    with pytest.raises(ModbusFrameError):
        rtu.frame_len(bytes([1, 0x41, 0]), 3, request=True)
    assert rtu.frame_len(good, 1, request=True) == 0
    assert rtu.frame_len(bytes([1, 16, 0, 0, 0, 2]), 6, request=True) == 0
    assert rtu.frame_len(bytes([1, 16, 0, 0, 0, 2, 4]), 7, request=True) == 13


def test_timing():
    assert rtu.frame_gap_us(9600) == 4011
    assert rtu.frame_gap_us(19200) == 2006
    assert rtu.frame_gap_us(38400) == rtu.frame_gap_us(115200) == 1750
    assert rtu.char_gap_us(115200) == 750 and rtu.char_gap_us(9600) == 1719
    assert rtu.char_time_us(19200) == 573 and rtu.char_time_us(9600, 10) == 1042


# ------------------------------------------------------------------ CPython vs MicroPython
RUNNER = r'''
from agent import modbus_rtu as rtu, modbus_tcp as tcp
from agent.crc import crc16_modbus, crc32
from agent.modbus_errors import ModbusError, ModbusException
from binascii import hexlify, unhexlify

def h(b):
    return hexlify(bytes(b)).decode()

def res(f):
    try:
        r = f()
    except ModbusException as e:
        return "ModbusException:%d:%d" % (e.code, e.fn)
    except ModbusError as e:
        return type(e).__name__
    except ValueError:
        return "ValueError"
    if isinstance(r, tuple):
        return "|".join(h(x) if isinstance(x, memoryview) else str(x) for x in r)
    if isinstance(r, memoryview):
        return "mv:" + h(r)
    return str(r)

buf = bytearray(260)

def run_one(c):
    out = []
    if 1:
        k = c[0]
        if k == "rtu_resp":
            fr = unhexlify(c[1])
            out.append(res(lambda: rtu.parse_response(fr, len(fr), c[2], c[3], c[4], c[5])))
        elif k == "tcp_resp":
            fr = unhexlify(c[1])
            out.append(res(lambda: tcp.parse_response(fr, len(fr), c[2], c[3], c[4], c[5], c[6])))
        elif k == "rtu_req":
            fr = unhexlify(c[1])
            out.append(res(lambda: rtu.parse_request(fr)))
        elif k == "tcp_req":
            fr = unhexlify(c[1])
            out.append(res(lambda: tcp.parse_request(fr)))
        elif k == "build":
            out.append(res(lambda: h(buf[:rtu.build_request(buf, c[1], c[2], c[3], c[4], c[5])])))
            out.append(res(lambda: h(buf[:tcp.build_request(buf, 77, c[1], c[2], c[3], c[4], c[5])])))
        elif k == "frame_len":
            fr = unhexlify(c[1])
            out.append(res(lambda: rtu.frame_len(fr, len(fr), c[2])))
        elif k == "misc":
            d = unhexlify(c[1])
            out.append("%d %d %d %d %d" % (crc16_modbus(d), crc32(d), rtu.frame_gap_us(c[2]),
                                            rtu.char_gap_us(c[2]), rtu.char_time_us(c[2])))
    return out
'''


def _parity_cases():
    cases = []
    for unit, fn, addr, arg, values, pm in REQUESTS:
        cases.append(["build", unit, fn, addr, arg, values])
        cases.append(["rtu_req", RTU_CLI.buildFrame(pm).hex()])
        pm.transaction_id = 3
        cases.append(["tcp_req", TCP_CLI.buildFrame(pm).hex()])
    cases.append(["build", 1, 3, 0, 0, None])
    cases.append(["build", 1, 16, 0, 0, [70000]])
    good = _good_read()
    for mut in (lambda b: b, _mut_crc, _mut_crc_byte, _mut_unit, _mut_fn, _mut_bc, _mut_more_regs,
                _mut_short, _mut_trunc, _mut_exc_other_fn, _mut_long_exc):
        fr = mut(bytearray(good))
        cases.append(["rtu_resp", bytes(fr).hex(), 1, 3, 0, 2])
        cases.append(["frame_len", bytes(fr).hex(), False])
    for code in (1, 2, 3, 4, 6, 11):
        cases.append(["rtu_resp", _pm_rtu(ExceptionResponse(3, code), 1).hex(), 1, 3, 0, 2])
    for fn, pm in ((6, WriteSingleRegisterResponse(address=100, registers=[0xBEEF])),
                   (16, WriteMultipleRegistersResponse(address=100, count=0xBEEF))):
        fr = _pm_rtu(pm, 1).hex()
        cases.append(["rtu_resp", fr, 1, fn, 100, 0xBEEF])
        cases.append(["rtu_resp", fr, 1, fn, 101, 0xBEEF])
    tg = TCP_CLI.buildFrame(ReadHoldingRegistersResponse(registers=[10, 20], dev_id=1, transaction_id=5))
    for tid, unit, fn in ((5, 1, 3), (6, 1, 3), (5, 2, 3), (5, 1, 4)):
        cases.append(["tcp_resp", tg.hex(), tid, unit, fn, 0, 2])
    cases.append(["tcp_resp", tg[:-1].hex(), 5, 1, 3, 0, 2])
    for frame in ([1, 3, 0, 0, 0, 0], [1, 4, 0xFF, 0xFF, 0, 2], [1, 5, 0, 1, 0x12, 0x34],
                  [1, 16, 0, 0, 0, 2, 2, 0, 1], [1, 8, 0, 0, 0, 0], [1, 3, 0, 0]):
        cases.append(["rtu_req", bytes(_resealed(bytearray(frame) + b"\0\0")).hex()])
    for baud in (1200, 9600, 19200, 38400, 115200):
        cases.append(["misc", bytes(range(baud % 251)).hex(), baud])
    return cases


def test_micropython_matches_cpython(mp):
    cases = _parity_cases()
    ns: dict = {}
    exec(compile(RUNNER, "runner", "exec"), ns)
    expected = [line for c in cases for line in ns["run_one"](c)]
    # sanity: the runner really saw each outcome class (so the comparison means something)
    joined = "\n".join(expected)
    for word in ("ModbusCRCError", "ModbusFrameError", "ModbusException:2:3", "mv:000a0014", "ValueError"):
        assert word in joined
    # one JSON case per stdin line: the 64k heap never holds the whole set
    code = RUNNER + (
        "\nimport json, sys\n"
        "while True:\n"
        "    ln = sys.stdin.readline()\n"
        "    if not ln:\n"
        "        break\n"
        "    for line in run_one(json.loads(ln)):\n"
        "        print(line)\n"
    )
    stdin = "".join(json.dumps(c) + "\n" for c in cases).encode()
    got = mp.run(code, heapsize="64k", stdin=stdin).out.splitlines()
    assert got == expected
