"""A pymodbus meter whose registers follow the site: scenario frequency, load-model kW.

The register image comes from the meter map (data) through gridshed.meters.register_image, the
same encoder the firmware's decoder is tested against. Values are refreshed at the meter's own
update interval, as a real meter's registers are, and every poll is timestamped.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from ..meters import register_image


@dataclass
class Reading:
    hz: float
    kw: float
    ok: bool = True
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class PollRecord:
    t: float          # host monotonic time the request was answered
    hz: float | None  # what the answer carried (None = not answered)
    kw: float | None
    refreshed_at: float
    addr: int | None = None  # the request's first register (which read of the plan it was)


class SimMeter:
    def __init__(self, meter_map: dict, source: Callable[[float], Reading], unit: int = 1,
                 update_ms: float = 50.0) -> None:
        self.map = meter_map
        self.source = source
        self.unit = unit
        self.update_s = update_ms / 1000.0
        q = meter_map["quantities"]
        width = {"u16": 1, "s16": 1}
        self.top = max(v["addr"] + width.get(v["type"], 2) for v in q.values()) + 1
        self.polls: list[PollRecord] = []
        self._image: dict[int, int] = {}
        self._refreshed_at = -1.0
        self._reading = Reading(0.0, 0.0)
        self.server = None
        self.exceptions = 0

    def _refresh(self, now: float) -> None:
        slot = now - (now % self.update_s) if self.update_s else now
        if slot != self._refreshed_at:
            self._refreshed_at = slot
            r = self.source(slot)
            self._reading = r
            values = {"hz": r.hz, "kw": r.kw}
            values.update(r.extra)
            nan = [k for k, v in values.items() if v != v]
            image = register_image(self.map, {k: v for k, v in values.items() if k not in nan})
            for k in nan:
                image.update(self._nan_words(k))
            self._image = image

    def _nan_words(self, name: str) -> dict[int, int]:
        """A quantity the meter answers as Not-a-Number: the float NaN pattern for f32 registers,
        all ones (0xFFFF..., the "not available" value of integer meters) otherwise."""
        q = self.map["quantities"][name]
        try:
            return register_image(self.map, {name: float("nan")})
        except Exception:
            n = 1 if q["type"] in ("u16", "s16") else 2
            return {q["addr"] + i: 0xFFFF for i in range(n)}

    async def _action(self, fc, start, addr, count, regs, set_values):
        now = time.monotonic()
        self._refresh(now)
        r = self._reading
        if not r.ok:
            self.polls.append(PollRecord(now, None, None, self._refreshed_at, addr))
            return None  # reply suppressed in _trace (a silent meter)
        if fc not in (3, 4) or addr + count > self.top:
            self.exceptions += 1
            return ExcCodes.ILLEGAL_ADDRESS
        for a in range(addr, addr + count):
            regs[a - start] = self._image.get(a, 0)
        self.polls.append(PollRecord(now, r.hz, r.kw, self._refreshed_at, addr))
        return None

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if sending and not self._reading.ok:
            return b""
        return data

    def _device(self) -> SimDevice:
        return SimDevice(id=self.unit, simdata=[SimData(0, count=self.top, values=0, datatype=DataType.REGISTERS)],
                         action=self._action)

    async def serve_rtu(self, port_path: str, baud: int) -> None:
        self.server = ModbusSerialServer(self._device(), port=port_path, baudrate=baud, trace_packet=self._trace)
        await self.server.serve_forever()

    async def serve_tcp(self, host: str, port: int) -> None:
        self.server = ModbusTcpServer(self._device(), address=(host, port), trace_packet=self._trace)
        await self.server.serve_forever()

    async def stop(self) -> None:
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.shutdown(), 2)
            except Exception:
                pass
