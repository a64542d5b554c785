"""What the RTU and TCP Modbus masters share: counters, the public read/write API, the
asyncio sleep shims. Kept apart so a TCP-metered site does not load the RTU master."""
import asyncio

from agent.modbus_errors import ModbusConnectionError, ModbusCRCError, ModbusTimeout


_sleep_ms = getattr(asyncio, "sleep_ms", None)
if _sleep_ms is None:  # CPython

    async def _sleep_ms(ms):  # type: ignore
        await asyncio.sleep(ms / 1000)


def _wait_for_ms(aw, ms):
    # only the CPython TCP path waits this way; MicroPython's asyncio.wait_for_ms lives in a
    # lazily loaded submodule the board never needs (it polls with sleep_ms instead)
    return asyncio.wait_for(aw, ms / 1000)


def _written_count(fn, buf, o):
    # the count a fn 15/16 request carries (to check the echo)
    return (buf[o + 3] << 8) | buf[o + 4]


class _Master:
    def __init__(self, timeout_ms, retries):
        self.timeout_ms = timeout_ms
        self.max_retries = retries
        self.tx = 0
        self.ok = 0
        self.timeouts = 0
        self.crc_errors = 0
        self.exceptions = 0
        self.bad_frames = 0
        self.retries = 0
        self.junk = 0
        self.conn_errors = 0
        self.late = 0  # replies that came after their timeout (discarded, RTU)
        self._busy = False

    def counters(self):
        return {
            "tx": self.tx, "ok": self.ok, "timeouts": self.timeouts,
            "crc_errors": self.crc_errors, "exceptions": self.exceptions,
            "bad_frames": self.bad_frames, "retries": self.retries,
            "junk": self.junk, "conn_errors": self.conn_errors, "late": self.late,
        }

    def _count(self, e):
        if isinstance(e, ModbusTimeout):
            self.timeouts += 1
        elif isinstance(e, ModbusCRCError):
            self.crc_errors += 1
        elif isinstance(e, ModbusConnectionError):
            self.conn_errors += 1
        else:
            self.bad_frames += 1

    def read(self, unit, fn, addr, count):
        """Read `count` registers (fn 3/4) or bits (fn 1/2) -> memoryview."""
        if not 1 <= fn <= 4:
            raise ValueError("read function")
        return self._transact(unit, fn, addr, count, None)

    def write_register(self, unit, addr, value):
        return self._transact(unit, 6, addr, value, None)

    def write_registers(self, unit, addr, values):
        return self._transact(unit, 16, addr, 0, values)

    def write_coil(self, unit, addr, on):
        return self._transact(unit, 5, addr, 1 if on else 0, None)


