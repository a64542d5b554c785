"""Site config: defaults and validation, the same code on the host (site.toml) and the board (/config.cbor).

The board validates again at boot because a config can arrive by any path (mpremote, an image,
a corrupted flash): a bad one is refused with the list of errors and the relays stay safe.
"""

VERSION = 1

# section -> key -> (default, kind, lo, hi). kind: "f" float, "i" int, "b" bool, or a tuple of choices.
SCHEMA = {
    "meter": {
        "transport": ("rtu", ("rtu", "tcp"), None, None),
        "unit": (1, "i", 1, 247),
        "baud": (19200, "i", 1200, 115200),
        "parity": ("N", ("N", "E", "O"), None, None),
        "host": ("127.0.0.1", "s", None, None),
        "port": (502, "i", 1, 65535),
        "poll_ms": (50, "i", 10, 10000),
        "poll_mode": ("period", ("period", "back_to_back"), None, None),
        "slow_ms": (0, "i", 0, 600000),
        "timeout_ms": (100, "i", 5, 5000),
        "retries": (1, "i", 0, 5),
    },
    "trip": {
        "pickup_hz": (59.7, "f", 40.0, 70.0),
        "delay_ms": (0, "i", 0, 600000),
        "samples": (1, "i", 1, 100),
        "restore_hz": (59.9, "f", 40.0, 70.0),
        "restore_hold_s": (10.0, "f", 0.0, 86400.0),
        "min_off_s": (30.0, "f", 0.0, 86400.0),
        "release_required": (False, "b", None, None),
        "stagger_s": (2.0, "f", 0.0, 3600.0),
        "jitter_s": (0.5, "f", 0.0, 600.0),
        "deadband_hz": (0.02, "f", 0.0, 1.0),
    },
    "failsafe": {
        "meter_loss": ("hold", ("hold", "shed"), None, None),
        "meter_loss_after_s": (5.0, "f", 0.0, 3600.0),
        "boot_state": ("closed", ("closed", "open"), None, None),
    },
    "capture": {
        "pre_s": (5.0, "f", 0.0, 60.0),
        "post_s": (10.0, "f", 0.0, 600.0),
    },
    "journal": {
        "segment_bytes": (16384, "i", 1024, 1048576),
        "segments": (4, "i", 2, 64),
    },
    "signals": {
        "dry_contact": (False, "b", None, None),
        "dry_contact_pin": (None, "p", 0, 255),
        "dry_contact_active": (1, "i", 0, 1),
        "debounce_ms": (50, "i", 0, 10000),
        "mode": ("level", ("level", "edge"), None, None),
    },
}

BLOCK_SCHEMA = {
    "name": ("", "s", None, None),
    "miners": (0, "i", 0, 100000),
    "kw_per_miner": (0.0, "f", 0.0, 100000.0),
    "priority": (1, "i", 0, 1000),
    "active": (1, "i", 0, 1),
}

MAX_BLOCKS = 16

# Plausible band of the trip thresholds around nominal_hz (docs/site-config.md): a pickup (and a
# stage's) lies in [nominal - BAND_HZ, nominal), a restore in [nominal - BAND_HZ, nominal + 1].
# 3 Hz holds the deepest published under-frequency load-shedding stages (ERCOT 58.3 Hz, GB LFDD
# 47.8 Hz, AEMO 47.5..49 Hz) and refuses the settings of the other grid (49.7 on a 60 Hz site).
BAND_HZ = 3.0


def _check(path, value, kind, lo, hi, errors):
    if isinstance(kind, tuple):
        if value not in kind:
            errors.append("%s: must be one of %s, got %r" % (path, "/".join(kind), value))
        return
    if kind == "l":
        if not isinstance(value, list):
            errors.append("%s: must be a list, got %r" % (path, value))
        return
    if kind == "b":
        if value is not True and value is not False:
            errors.append("%s: must be true or false, got %r" % (path, value))
        return
    if kind == "p":
        if value is None:
            return
        kind = "i"
    if kind == "s":
        if not isinstance(value, str):
            errors.append("%s: must be a string, got %r" % (path, value))
        return
    if kind == "i":
        ok = isinstance(value, int) and value is not True and value is not False
    else:
        ok = isinstance(value, (int, float)) and value is not True and value is not False
    if not ok:
        errors.append("%s: must be a %s, got %r" % (path, "whole number" if kind == "i" else "number", value))
        return
    if lo is not None and not (lo <= value <= hi):
        errors.append("%s: %r is outside %s..%s" % (path, value, lo, hi))


def validate(cfg):
    """Return a list of 'path: problem' strings; empty means the config is usable."""
    errors = []
    if not isinstance(cfg, dict):
        return ["config: must be a map"]
    if cfg.get("v") != VERSION:
        errors.append("v: config version %r not supported (want %d)" % (cfg.get("v"), VERSION))
    for key in ("site", "device", "board"):
        v = cfg.get(key)
        if not isinstance(v, str) or not v or len(v) > 64:
            errors.append("%s: must be a non-empty string of at most 64 characters" % key)
    if cfg.get("nominal_hz") not in (50, 60):
        errors.append("nominal_hz: must be 50 or 60, got %r" % (cfg.get("nominal_hz"),))
    for sec, keys in SCHEMA.items():
        d = cfg.get(sec)
        if not isinstance(d, dict):
            errors.append("%s: section missing or not a table" % sec)
            continue
        for k, (default, kind, lo, hi) in keys.items():
            if k not in d:
                errors.append("%s.%s: missing" % (sec, k))
            else:
                _check(sec + "." + k, d[k], kind, lo, hi, errors)
        for k in d:
            if k not in keys and not (sec == "meter" and k == "map") and not (sec == "trip" and k == "stages"):
                errors.append("%s.%s: unknown key" % (sec, k))
    bl = cfg.get("blocks")
    bl = bl if isinstance(bl, list) else ()  # (not a list: refused below, never iterated)
    opt = _optional(cfg)
    if opt:
        opt.check_sections(cfg, errors, _check)
    trip = cfg.get("trip")
    if isinstance(trip, dict) and not errors:
        nominal = cfg["nominal_hz"]
        if not trip["pickup_hz"] < trip["restore_hz"]:
            errors.append("trip.pickup_hz: must be below trip.restore_hz (%r >= %r)" % (trip["pickup_hz"], trip["restore_hz"]))
        if not (nominal - BAND_HZ <= trip["pickup_hz"] < nominal):
            errors.append("trip.pickup_hz: %r is not a plausible under-frequency pickup for a %d Hz grid (%r..%d Hz)"
                          % (trip["pickup_hz"], nominal, nominal - BAND_HZ, nominal))
        if trip["restore_hz"] > nominal + 1:
            errors.append("trip.restore_hz: %r is above nominal + 1 Hz" % trip["restore_hz"])
        elif trip["restore_hz"] < nominal - BAND_HZ:
            errors.append("trip.restore_hz: %r is more than %r Hz below the %d Hz nominal" % (trip["restore_hz"], BAND_HZ, nominal))
        if "stages" in trip:
            opt.check_stages(trip, nominal, len(bl), BAND_HZ, errors)
    if opt:
        opt.check_authority(cfg, errors)
    if "market" in cfg or any(len(b) > 6 for b in bl if isinstance(b, dict)):
        from agent.market_check import check  # docs/market.md: loaded only for a market site

        check(cfg, errors, _check)
    if "dnp3" in cfg:
        from agent.dnp3_check import check as dnp3_check  # docs/dnp3.md: loaded only for a DNP3 site

        dnp3_check(cfg, errors, _check, _ipv4)
    if opt:
        opt.check_links(cfg, errors, _ipv4)
    sig = cfg.get("signals")
    if isinstance(sig, dict) and sig.get("dry_contact") is True and sig.get("dry_contact_pin") is None:
        errors.append("signals.dry_contact: the board has no dry-contact input pin")
    meter = cfg.get("meter")
    if isinstance(meter, dict):
        m = meter.get("map")
        if not isinstance(m, dict) or not isinstance(m.get("quantities"), dict):
            errors.append("meter.map: missing meter register map")
        else:
            q = m["quantities"]
            for need in ("hz", "kw"):
                if need not in q:
                    errors.append("meter.map: quantity %r missing" % need)
    blocks = cfg.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        errors.append("blocks: at least one relay block is required")
    elif len(blocks) > MAX_BLOCKS:
        errors.append("blocks: at most %d blocks" % MAX_BLOCKS)
    else:
        seen_pins = {}
        for i, b in enumerate(blocks):
            p = "blocks[%d]" % i
            if not isinstance(b, dict):
                errors.append(p + ": must be a table")
                continue
            for k, (default, kind, lo, hi) in BLOCK_SCHEMA.items():
                if k not in b:
                    errors.append("%s.%s: missing" % (p, k))
                else:
                    _check(p + "." + k, b[k], kind, lo, hi, errors)
            pins = b.get("pins")
            if not isinstance(pins, list) or not pins:
                errors.append(p + ".pins: at least one relay pin is required")
                continue
            for pin in pins:
                if not isinstance(pin, int) or pin < 0 or pin > 255:
                    errors.append("%s.pins: bad pin %r" % (p, pin))
                elif pin in seen_pins:
                    errors.append("%s.pins: pin %d already used by blocks[%d]" % (p, pin, seen_pins[pin]))
                else:
                    seen_pins[pin] = i
    return errors


# top-level keys agent/config_optional.py has nothing to check in (besides SCHEMA's sections)
_BASE = ("v", "site", "device", "board", "nominal_hz", "blocks", "uart", "market", "dnp3")


def _optional(cfg):
    # agent.config_optional when the config has a feature section (OPTIONAL there) or trip
    # stages, else None: a site without them does not load it
    tr = cfg.get("trip")
    if (isinstance(tr, dict) and "stages" in tr) or any(k not in SCHEMA and k not in _BASE for k in cfg):
        from agent import config_optional

        return config_optional
    return None


def _ipv4(v):
    try:
        p = v.split(".")
        return len(p) == 4 and all(x.isdigit() and 0 <= int(x) < 256 for x in p)
    except Exception:
        return False
