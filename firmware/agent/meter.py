"""Meter register maps (data, meters/*.json) -> read plans, decode and encode of registers.

Pure module: runs unchanged under MicroPython and CPython (the host simulator builds its register
image with encode(), the very code the board decodes with).

A map:
    {"model": str, "function": 3|4,
     "quantities": {name: {"addr": int (0-based protocol address), "type": "u16"|"s16"|"u32"|
                           "s32"|"f32", "words": "big"|"little", "scale": number}},
     optional: "title", "source", "confidence", "resolution_hz", "identify", "notes", "max_gap"}

Read plans are lists of (start, count) tuples: the fewest contiguous reads covering a set of
quantities, merging neighbours when the hole between them is at most `max_gap` registers (one
longer read is cheaper than a second round trip on RS-485) and never over 125 registers (the
Modbus limit for function 3/4).

Hot path: decode(name, regs, base) reads the register bytes exactly as a Modbus 3/4 response
carries them (big-endian 16-bit registers, `regs[0:2]` is register `base`) and returns a float.
It builds no tuple, no slice and no long int: 32-bit values are assembled from their two 16-bit
halves in float arithmetic, f32 is rebuilt from sign / exponent / mantissa with math.ldexp.
The only allocation is the float result (boxed on most ports).
"""
import math
import struct

from agent.compat import const

MAX_READ = const(125)
DEFAULT_MAX_GAP = const(24)

T_U16 = const(0)
T_S16 = const(1)
T_U32 = const(2)
T_S32 = const(3)
T_F32 = const(4)

TYPES = {"u16": T_U16, "s16": T_S16, "u32": T_U32, "s32": T_S32, "f32": T_F32}
WORDS = ("big", "little")
QUANTITIES = ("hz", "kw", "v1", "v2", "v3", "i1", "i2", "i3", "kw1", "kw2", "kw3")
REQUIRED = ("hz", "kw")
HOT = ("hz", "kw")
CONFIDENCE = ("reference", "manual", "community")
MAP_KEYS = ("model", "title", "source", "confidence", "function", "resolution_hz", "quantities",
            "identify", "notes", "max_gap")
Q_KEYS = ("addr", "type", "words", "scale")
ID_KEYS = ("function", "addr", "type", "words", "expect")


def nregs(typ):
    """Registers used by a type name (1 or 2)."""
    return 1 if typ == "u16" or typ == "s16" else 2


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x):
    return (isinstance(x, int) or isinstance(x, float)) and not isinstance(x, bool)


def _check_reg(where, spec, errors, need_scale):
    """Checks addr/type/words(/scale) of one register spec; appends errors."""
    if not isinstance(spec, dict):
        errors.append(where + ": must be an object")
        return False
    ok = True
    for k in spec:
        if k not in (Q_KEYS if need_scale else ID_KEYS):
            errors.append(where + ": unknown key " + repr(k))
            ok = False
    typ = spec.get("type")
    if typ not in TYPES:
        errors.append(where + ".type: must be one of u16 s16 u32 s32 f32")
        ok = False
    addr = spec.get("addr")
    if not _is_int(addr) or addr < 0 or addr > 65535:
        errors.append(where + ".addr: must be an integer 0..65535 (0-based protocol address)")
        ok = False
    elif typ in TYPES and addr + nregs(typ) - 1 > 65535:
        errors.append(where + ".addr: value runs past register 65535")
        ok = False
    words = spec.get("words", "big")
    if words not in WORDS:
        errors.append(where + ".words: must be \"big\" (high word first) or \"little\"")
        ok = False
    if need_scale:
        scale = spec.get("scale", 1)
        if not _is_num(scale) or scale == 0 or scale != scale:
            errors.append(where + ".scale: must be a non-zero number")
            ok = False
    return ok


def validate(m):
    """Returns a list of error strings (empty: the map is usable)."""
    errors = []
    if not isinstance(m, dict):
        return ["meter map: must be an object"]
    for k in m:
        if k not in MAP_KEYS:
            errors.append("meter map: unknown key " + repr(k))
    model = m.get("model")
    if not isinstance(model, str) or not model:
        errors.append("model: must be a non-empty string")
    for k in ("title", "source", "notes"):
        if k in m and not isinstance(m[k], str):
            errors.append(k + ": must be a string")
    if "confidence" in m and m["confidence"] not in CONFIDENCE:
        errors.append("confidence: must be one of reference, manual, community")
    fn = m.get("function")
    if not _is_int(fn) or fn not in (3, 4):
        errors.append("function: must be 3 (holding registers) or 4 (input registers)")
    if "resolution_hz" in m:
        r = m["resolution_hz"]
        if not _is_num(r) or r <= 0 or r > 1:
            errors.append("resolution_hz: must be a number in (0, 1]")
    if "max_gap" in m:
        g = m["max_gap"]
        if not _is_int(g) or g < 0 or g > MAX_READ:
            errors.append("max_gap: must be an integer 0..125")
    qs = m.get("quantities")
    if not isinstance(qs, dict) or not qs:
        errors.append("quantities: must be a non-empty object")
        return errors
    for name in REQUIRED:
        if name not in qs:
            errors.append("quantities." + name + ": missing (hz and kw are required)")
    spans = []
    for name in qs:
        where = "quantities." + str(name)
        if name not in QUANTITIES:
            errors.append(where + ": unknown quantity (known: " + " ".join(QUANTITIES) + ")")
            continue
        spec = qs[name]
        if _check_reg(where, spec, errors, True):
            a = spec["addr"]
            spans.append((a, a + nregs(spec["type"]), name))
    spans.sort()
    for i in range(1, len(spans)):
        if spans[i][0] < spans[i - 1][1]:
            errors.append("quantities." + spans[i][2] + ": registers overlap " + spans[i - 1][2])
    if "identify" in m:
        ident = m["identify"]
        where = "identify"
        if _check_reg(where, ident, errors, False):
            f = ident.get("function", fn)
            if f not in (3, 4):
                errors.append("identify.function: must be 3 or 4")
            exp = ident.get("expect")
            if not isinstance(exp, list) or not exp or not all(_is_num(v) for v in exp):
                errors.append("identify.expect: must be a non-empty list of raw register values")
    return errors


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


def _words16(typ, little, raw):
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


class MeterMap:
    """One meter map, checked, with its read plans and decoders.

    Attributes: model, function, names (quantity names, map order), hot_plan and full_plan
    (lists of (start, count)), values (list of floats aligned with names, filled by update()),
    resolution_hz (or None).
    """

    def __init__(self, m, max_gap=None):
        errors = validate(m)
        if errors:
            raise ValueError("meter map: " + "; ".join(errors))
        self.model = m["model"]
        self.function = m["function"]
        self.resolution_hz = m.get("resolution_hz")
        if max_gap is None:
            max_gap = m.get("max_gap", DEFAULT_MAX_GAP)
        self.max_gap = max_gap
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
        self.hot_plan = self.plan_for(HOT)
        self.full_plan = self.plan_for(names)
        # For each read of full_plan/hot_plan: the indices of the quantities it covers.
        self.hot_items = [self._covered(s, c) for s, c in self.hot_plan]
        self.full_items = [self._covered(s, c) for s, c in self.full_plan]

    def _span(self, i):
        return 1 if self._type[i] <= T_S16 else 2

    def _covered(self, start, count):
        out = []
        for i in range(len(self.names)):
            a = self._addr[i]
            if a >= start and a + self._span(i) <= start + count:
                out.append(i)
        return tuple(out)

    def plan_for(self, names):
        """Read plan covering the given quantity names (unknown names are ignored)."""
        spans = []
        for n in names:
            i = self._index.get(n)
            if i is not None:
                spans.append((self._addr[i], self._span(i)))
        return plan(spans, self.max_gap)

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
        if t == T_U16:
            return w0 * self._scale[i]
        if t == T_S16:
            if w0 & 0x8000:
                w0 -= 0x10000
            return w0 * self._scale[i]
        w1 = (regs[o + 2] << 8) | regs[o + 3]
        if self._little[i]:
            hi = w1
            lo = w0
        else:
            hi = w0
            lo = w1
        if t == T_U32:
            return (hi * 65536.0 + lo) * self._scale[i]
        if t == T_S32:
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

    def decode(self, name, regs, base):
        """Value of quantity `name` (float, scaled) from register bytes read at address `base`."""
        return self._decode_i(self._index[name], regs, base)

    def update(self, regs, base, items):
        """Decode every quantity index in `items` into self.values (preallocated list)."""
        vals = self.values
        for i in items:
            vals[i] = self._decode_i(i, regs, base)

    def value(self, name):
        """Last value stored by update() for `name`."""
        return self.values[self._index[name]]

    def encode(self, name, value):
        """Value (in the map's unit) -> list of u16 words, in register order from the address."""
        i = self._index[name]
        return _words16(self._type[i], self._little[i], value / self._scale[i])


def encode(m, name, value):
    """Module-level form of MeterMap.encode for a map dict (host convenience)."""
    return MeterMap(m).encode(name, value)
