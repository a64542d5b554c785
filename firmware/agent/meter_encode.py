"""The meter map on the host: checked when built, and encode(), the inverse of the decode the
board runs (the simulator's register image, gridshed meters / probe, tests). Pure (MicroPython and
CPython), but the board never imports it: gridshed.build HOST_ONLY, not deployed.
"""
import struct

from agent.meter import T_F32, T_S16, T_U16, T_U32
from agent.meter import MeterMap as _MeterMap
from agent.meter_check import validate


def words16(typ, little, raw):
    """Raw number (already divided by scale) -> list of u16 words in register order."""
    if typ == T_F32:
        b = struct.pack(">f", raw)
        hi = (b[0] << 8) | b[1]
        lo = (b[2] << 8) | b[3]
    else:
        if isinstance(raw, float):
            if raw != raw or raw in (float("inf"), float("-inf")):
                raise ValueError("not a finite number")
            raw = int(round(raw))
        if typ == T_U16:
            lo_lim, hi_lim = 0, 0xFFFF
        elif typ == T_S16:
            lo_lim, hi_lim = -0x8000, 0x7FFF
        elif typ == T_U32:
            lo_lim, hi_lim = 0, 0xFFFFFFFF
        else:
            lo_lim, hi_lim = -0x80000000, 0x7FFFFFFF
        if raw < lo_lim or raw > hi_lim:
            raise ValueError("value out of range for the register type")
        if typ == T_U16 or typ == T_S16:
            return [raw & 0xFFFF]
        raw &= 0xFFFFFFFF
        hi = raw >> 16
        lo = raw & 0xFFFF
    return [lo, hi] if little else [hi, lo]


class MeterMap(_MeterMap):
    """agent.meter.MeterMap for the host and the simulator: the map is checked first (ValueError
    with every problem), and encode() writes values as the meter would (the board only decodes)."""

    def __init__(self, m, max_gap=None):
        errors = validate(m)
        if errors:
            raise ValueError("meter map: " + "; ".join(errors))
        super().__init__(m, max_gap)
        # every quantity in the fewest reads, and the quantities of each (probe, library, sim)
        self.full_plan = self.plan_for(self.names)
        self.full_items = [self._covered(s, c) for s, c in self.full_plan]

    def encode(self, name, value):
        """Value (in the map's unit) -> list of u16 words, in register order from the address."""
        i = self._index[name]
        return words16(self._type[i], self._little[i], value / self._scale[i])


def encode(m, name, value):
    """MeterMap(m).encode(name, value) for a map dict (host convenience)."""
    return MeterMap(m).encode(name, value)
