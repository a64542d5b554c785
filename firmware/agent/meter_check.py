"""Meter map checks: needed at boot and on the host, not in the hot path.

Split from agent.meter so the running agent does not keep this code in RAM (the agent drops
this module after boot). The host's checked MeterMap with register encoding is agent.meter_encode
(never deployed).
"""
from agent.meter import MAX_READ, TYPES, WORDS, QUANTITIES, REQUIRED

CONFIDENCE = ("reference", "manual", "community")
MAP_KEYS = ("model", "title", "source", "confidence", "function", "resolution_hz", "quantities",
            "identify", "notes", "max_gap", "max_read")
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
    if not isinstance(typ, str):  # (a list or a map is not hashable: a TypeError, no refusal)
        typ = None
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
    if "max_read" in m:
        g = m["max_read"]
        if not _is_int(g) or g < 2 or g > MAX_READ:
            errors.append("max_read: must be an integer 2..125 (registers per request)")
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
