# RTU transport of the utility Modbus server (agent/features/modbus_server.py): the board's second UART
# ("utility" role). Frames end by length (a complete, CRC-valid request is answered at once) or by
# the line's silence (t3.5), which also ends frames of unknown functions and noise.
import asyncio

from agent import modbus_rtu as rtu
from agent.compat import ticks_ms, ticks_diff
from agent.modbus_errors import ModbusError, ModbusException
from agent.base import log


def handle(s, rx, n):
    # One frame (by length or by line silence) in rx[:n] for the server s (UtilityServer); its
    # response goes to s.tx, its length is returned. Frames for other units are ignored.
    try:
        unit, fn, addr, arg, data = rtu.parse_request(rx, n)
        if unit != s.unit and unit != 0:
            return 0
        s.bcast = unit == 0
        s.requests += 1
        d = s.execute(fn, addr, arg, data, unit)
        return 0 if unit == 0 else rtu.build_response(s.tx, unit, fn, addr, arg, d)
    except ModbusException as e:
        if e.unit != s.unit:
            return 0
        s.requests += 1
        s.exceptions += 1
        return rtu.build_exception(s.tx, e.unit, e.fn, e.code)
    except ModbusError:
        s.requests += 1
        s._bad()
        return 0


async def serve(s, cfg):
    a = s.a
    try:
        u = a.hal.uart("utility", cfg)
    except Exception as e:
        a.count("utility_uart")
        log("E", "utility modbus server: no utility UART: %r" % e)
        return
    de = None
    uc = (a.cfg.get("uart") or {}).get("utility") or {}
    if uc.get("de") is not None:
        de = a.hal.out_pin(uc["de"], 0)
    baud = cfg["baud"]
    gap = rtu.frame_gap_us(baud) // 1000 + 2
    char_us = rtu.char_time_us(baud)
    rx = bytearray(rtu.MAX_ADU)
    mv = memoryview(rx)
    got = 0
    last = ticks_ms()
    log("I", "utility modbus server: rtu %d baud unit %d" % (baud, s.unit))
    while True:
        if got >= len(rx):  # longer than any Modbus frame: noise
            s.requests += 1
            s._bad()
            got = 0
        try:
            k = u.readinto(mv[got:])
        except OSError:
            k = None
        now = ticks_ms()
        n = 0
        if k:
            got += k
            last = now
            try:
                need = rtu.frame_len(rx, got, True)
            except ModbusError:
                need = 0  # unknown function: the line's silence ends the frame
            if need and got == need and rtu.check_crc(rx, need):
                n = need
        elif got and ticks_diff(now, last) >= gap:
            n = got
        if n:
            got = 0
            try:
                k = handle(s, rx, n)
            except Exception as e:
                a.count("utility_error")
                log("E", "utility: %r" % e)
                k = 0
            if k:
                try:
                    if de is not None:
                        de.value(1)
                    u.write(s.txmv[:k])
                    if de is not None:
                        await asyncio.sleep_ms(k * char_us // 1000 + 1)
                        de.value(0)
                except OSError:
                    a.count("utility_io")
        await asyncio.sleep_ms(1 if got else 5)
