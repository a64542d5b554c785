"""Meter register maps (data, meters/*.json) -> read plans, decode and encode of registers.

Pure module: runs unchanged under MicroPython and CPython (the host simulator builds its register
image with agent.meter_encode.MeterMap.encode(), the inverse of the decode the board runs).

A map:
    {"model": str, "function": 3|4,
     "quantities": {name: {"addr": int (0-based protocol address), "type": "u16"|"s16"|"u32"|
                           "s32"|"f32", "words": "big"|"little", "scale": number}},
     optional: "title", "source", "confidence", "resolution_hz", "identify", "notes", "max_gap",
               "max_read"}

Read plans are lists of (start, count) tuples: the fewest contiguous reads covering a set of
quantities, merging neighbours when the hole between them is at most `max_gap` registers (one
longer read is cheaper than a second round trip on RS-485) and never over `max_read` registers
(the meter's documented limit; default 125, the Modbus limit for function 3/4).

Hot path: decode(name, regs, base) reads the register bytes exactly as a Modbus 3/4 response
carries them (big-endian 16-bit registers, `regs[0:2]` is register `base`) and returns a float.
It builds no tuple, no slice and no long int: 32-bit values are assembled from their two 16-bit
halves in float arithmetic, f32 is rebuilt from sign / exponent / mantissa with math.ldexp.
The only allocation is the float result (boxed on most ports).
"""
import math

from agent.compat import const

MAX_READ = const(125)
DEFAULT_MAX_GAP = const(24)

T_U16 = const(0)
T_S16 = const(1)
T_U32 = const(2)
_T_S32 = const(3)
T_F32 = const(4)

TYPES = {"u16": T_U16, "s16": T_S16, "u32": T_U32, "s32": _T_S32, "f32": T_F32}
WORDS = ("big", "little")
QUANTITIES = ("hz", "kw", "v1", "v2", "v3", "i1", "i2", "i3", "kw1", "kw2", "kw3")
REQUIRED = ("hz", "kw")
def plan(spans, max_gap=DEFAULT_MAX_GAP, max_read=MAX_READ):
    """[(addr, nregs)] -> [(start, count)]: fewest reads, holes <= max_gap, count <= max_read."""
    reads = []
    cur_s = -1
    cur_e = -1
    for a, n in sorted(spans):
        e = a + n
        if cur_s >= 0 and a - cur_e <= max_gap and max(e, cur_e) - cur_s <= max_read:
            if e > cur_e:
                cur_e = e
            continue
        if cur_s >= 0:
            reads.append((cur_s, cur_e - cur_s))
        cur_s = a
        cur_e = e
    if cur_s >= 0:
        reads.append((cur_s, cur_e - cur_s))
    return reads


class MeterMap:
    """One meter map (already checked), with its read plans and decoders.

    Attributes: model, function, names (quantity names, map order), values (list of floats
    aligned with names, filled by update()), resolution_hz (or None). What the agent polls comes
    from agent/readplan.py; the host's subclass (agent.meter_encode.MeterMap) adds full_plan.
    """

    def __init__(self, m, max_gap=None):
        # m must be checked already: the board checks it at boot (agent/boot.py); the host builds
        # agent.meter_encode.MeterMap, which checks it and adds encode()
        self.model = m["model"]
        self.function = m["function"]
        self.resolution_hz = m.get("resolution_hz")
        if max_gap is None:
            max_gap = m.get("max_gap", DEFAULT_MAX_GAP)
        self.max_gap = max_gap
        self.max_read = m.get("max_read", MAX_READ)  # the meter's documented registers per request
        qs = m["quantities"]
        names = [n for n in QUANTITIES if n in qs]
        self.names = names
        self._index = {}
        self._addr = []
        self._type = []
        self._little = []
        self._scale = []
        for i, n in enumerate(names):
            q = qs[n]
            self._index[n] = i
            self._addr.append(q["addr"])
            self._type.append(TYPES[q["type"]])
            self._little.append(q.get("words", "big") == "little")
            self._scale.append(float(q.get("scale", 1)))
        self.values = [0.0] * len(names)
        self._w0 = [0] * len(names)  # the last raw words of each quantity (word-order hint)
        self._w1 = [0] * len(names)

    def _span(self, i):
        return 1 if self._type[i] <= T_S16 else 2

    def _covered(self, start, count):
        out = []
        for i in range(len(self.names)):
            a = self._addr[i]
            if a >= start and a + self._span(i) <= start + count:
                out.append(i)
        return tuple(out)

    def plan_for(self, names, max_gap=None):
        """Read plan covering the given quantity names (unknown names are ignored)."""
        spans = []
        for n in names:
            i = self._index.get(n)
            if i is not None:
                spans.append((self._addr[i], self._span(i)))
        return plan(spans, self.max_gap if max_gap is None else max_gap, self.max_read)

    def span(self, name):
        """(addr, nregs) of a quantity."""
        i = self._index[name]
        return self._addr[i], self._span(i)

    def has(self, name):
        return name in self._index

    def _decode_i(self, i, regs, base):
        o = (self._addr[i] - base) * 2
        if o < 0 or o + self._span(i) * 2 > len(regs):
            raise ValueError("register not in this read")
        t = self._type[i]
        w0 = (regs[o] << 8) | regs[o + 1]
        self._w0[i] = w0
        if t == T_U16:
            return w0 * self._scale[i]
        if t == T_S16:
            if w0 & 0x8000:
                w0 -= 0x10000
            return w0 * self._scale[i]
        w1 = (regs[o + 2] << 8) | regs[o + 3]
        self._w1[i] = w1
        if self._little[i]:
            hi = w1
            lo = w0
        else:
            hi = w0
            lo = w1
        if t == T_U32:
            return (hi * 65536.0 + lo) * self._scale[i]
        if t == _T_S32:
            if hi & 0x8000:
                hi -= 0x10000
            return (hi * 65536.0 + lo) * self._scale[i]
        # f32 from its fields: sign 1, exponent 8, mantissa 23 (never a 32-bit int)
        e = (hi >> 7) & 0xFF
        mant = ((hi & 0x7F) << 16) | lo
        if e == 0xFF:
            v = math.nan if mant else math.inf
        elif e == 0:
            v = math.ldexp(mant, -149)
        else:
            v = math.ldexp(mant | 0x800000, e - 150)
        if hi & 0x8000:
            v = -v
        if self._scale[i] == 1.0:
            return v
        return v * self._scale[i]

    def words(self, name):
        """The word order the map gives a quantity ("big" | "little")."""
        return "little" if self._little[self._index[name]] else "big"

    def swapped(self, name):
        """The last value of a 32-bit quantity decoded with the other word order (None for a
        16-bit one): what the meter means if the map's word order is wrong."""
        i = self._index[name]
        if self._span(i) != 2:
            return None
        w0 = self._w0[i]
        w1 = self._w1[i]
        w = bytes(((w1 >> 8) & 0xFF, w1 & 0xFF, (w0 >> 8) & 0xFF, w0 & 0xFF))
        v = self._decode_i(i, w, self._addr[i])
        self._w0[i] = w0  # (update() compares with the words as read)
        self._w1[i] = w1
        return v

    def decode(self, name, regs, base):
        """Value of quantity `name` (float, scaled) from register bytes read at address `base`."""
        return self._decode_i(self._index[name], regs, base)

    def update(self, regs, base, items):
        """Decode every quantity index in `items` into self.values (preallocated list).

        A quantity whose register words are the ones decoded last time keeps its value: no
        float is made (on most ports a float is a heap object), so polling a meter whose
        registers have not changed allocates nothing."""
        vals = self.values
        w0 = self._w0
        w1 = self._w1
        n = len(regs)
        for i in items:
            o = (self._addr[i] - base) * 2
            short = self._type[i] <= T_S16
            if 0 <= o and o + (2 if short else 4) <= n and (regs[o] << 8 | regs[o + 1]) == w0[i] and (
                    short or (regs[o + 2] << 8 | regs[o + 3]) == w1[i]):
                continue
            vals[i] = self._decode_i(i, regs, base)

    def value(self, name):
        """Last value stored by update() for `name`."""
        return self.values[self._index[name]]
