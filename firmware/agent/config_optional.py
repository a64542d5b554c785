# Site config checks of what only some sites configure: the feature sections (OPTIONAL:
# [modbus_server], [authority], [udp], [mqtt], [ac_sense], [miners], [override], [maintenance])
# and trip.stages (docs/site-config.md). Loaded by agent/config.py (validate) only for a config
# that has one of them, like agent/market_check.py and agent/dnp3_check.py, so a site without
# them keeps none of this in its core; the board's boot unloads it with the validator. Each check
# runs where validate() always ran it: the order of the errors (and the checks that run only
# while there are none) is unchanged. (Comments, not docstrings.)

# key -> (default, kind, lo, hi), as agent/config.py SCHEMA. Each feature's module
# (agent/features/<section>.py) reads its own section.
OPTIONAL = {
    "modbus_server": {
        "enabled": (True, "b", None, None),
        "transport": ("tcp", ("tcp", "rtu"), None, None),
        "port": (502, "i", 1, 65535),
        "unit": (1, "i", 1, 247),
        "baud": (19200, "i", 1200, 115200),
        "heartbeat_s": (0.0, "f", 0.0, 3600.0),
        "heartbeat_action": ("alarm", ("alarm", "shed"), None, None),
        "bind": ("", "s", None, None),
        "allow": ([], "l", None, None),
        "master": ("", "s", None, None),
    },
    "authority": {
        "trusted": ([], "l", None, None),
        "restore_all": (["*"], "l", None, None),
    },
    "udp": {
        "enabled": (True, "b", None, None),
        "port": (4700, "i", 1, 65535),
    },
    "mqtt": {
        "enabled": (True, "b", None, None),
        "host": ("127.0.0.1", "s", None, None),
        "port": (1883, "i", 1, 65535),
        "keepalive_s": (30, "i", 5, 3600),
        "telemetry_s": (10.0, "f", 0.5, 3600.0),
        # secure fleet channel (docs/mqtt.md "Securing the broker"): TLS checked against the CA
        # provisioned in /broker.cbor and server_name (default: host); the board's login
        "tls": (False, "b", None, None),
        "ca": ("", "s", None, None),            # host side: PEM file of the CA (default: the site CA)
        "server_name": ("", "s", None, None),
        "auth": ("none", ("none", "password", "cert"), None, None),
        "username": ("", "s", None, None),      # host side: the operator's broker login
    },
    "ac_sense": {
        "enabled": (True, "b", None, None),
        "pin": (None, "p", 0, 255),
        "role": ("secondary", ("primary", "secondary"), None, None),
        "max_disagree_hz": (0.05, "f", 0.0, 5.0),
        "disagree_s": (2.0, "f", 0.1, 3600.0),
        "cycles": (4, "i", 3, 12),
        "rocof_cycles": (24, "i", 8, 64),
    },
    "miners": {
        "enabled": (True, "b", None, None),
        "api": ("cgminer", ("cgminer", "luxos"), None, None),
        "timeout_ms": (1000, "i", 50, 60000),
        "hosts": ([], "l", None, None),
        "stagger_ms": (1000, "i", 0, 600000),
        "hard": (False, "b", None, None),
        "hard_signal": (True, "b", None, None),
    },
    "override": {
        "enabled": (True, "b", None, None),
        "pin": (None, "p", 0, 255),
        "active": (0, "i", 0, 1),
        "mode": ("lockout", ("lockout", "shed"), None, None),
    },
    # how long protection may stay off after the agent is stopped from the console (Ctrl-C)
    # before the watchdog resets the board into the agent; host tools extend it while they work
    # (agent/maint.py). The default applies without the section: agent/maint.py WINDOW_S.
    "maintenance": {
        "window_s": (300.0, "f", 10.0, 3600.0),
    },
}


def check_sections(cfg, errors, chk):
    # the keys of each feature section present; chk: agent.config._check
    for sec, keys in OPTIONAL.items():
        d = cfg.get(sec)
        if d is None:
            continue
        if not isinstance(d, dict):
            errors.append("%s: must be a table" % sec)
            continue
        for k, (default, kind, lo, hi) in keys.items():
            if k in d:
                chk(sec + "." + k, d[k], kind, lo, hi, errors)
        for k in d:
            if k not in keys:
                errors.append("%s.%s: unknown key" % (sec, k))


def check_stages(trip, nominal, nblocks, band, errors):
    # trip.stages: 1..4 of {pickup_hz | rocof_hz_s, delay_ms, blocks: [index...]} (docs/ac-sense.md)
    st = trip["stages"]
    if not isinstance(st, list) or not 0 < len(st) < 5:
        errors.append("trip.stages: must be a list of 1 to 4 stages")
        return
    for i, s in enumerate(st):
        try:
            f = s.get("pickup_hz")
            r = s.get("rocof_hz_s")
            ok = ((f is None) != (r is None) and (f is None or nominal - band <= f <= trip["restore_hz"] - trip["deadband_hz"])
                  and (r is None or -20 <= r < 0) and 0 <= s.get("delay_ms", 0) <= 600000
                  and 40 <= s.get("below_hz", 50) <= 70 and 0 <= s.get("deadband_hz_s", 0) <= 10
                  and s["blocks"] and all(0 <= x < nblocks for x in s["blocks"])
                  and all(k in ("name", "pickup_hz", "rocof_hz_s", "delay_ms", "below_hz", "deadband_hz_s", "blocks") for k in s))
        except Exception:
            ok = False
        if not ok:
            errors.append("trip.stages[%d]: need pickup_hz (<= restore_hz - deadband_hz) or rocof_hz_s (-20..0), "
                          "delay_ms 0..600000, blocks = [0..%d]; other keys: below_hz, deadband_hz_s, name" % (i, nblocks - 1))


def _list(v):
    # a list's items, or none: a value of another type is refused by check_sections already, and
    # must not crash the checks that read the items (a crash at boot is no refusal)
    return v if isinstance(v, list) else ()


def check_authority(cfg, errors):
    au = cfg.get("authority")
    if isinstance(au, dict):
        for v in _list(au.get("trusted")):
            if v not in ("modbus", "dry_contact"):
                errors.append("authority.trusted: %r is not an unauthenticated channel (modbus, dry_contact)" % (v,))
        for v in _list(au.get("restore_all")):
            if not (v == "*" or (isinstance(v, str) and 0 < len(v) <= 64 and not v.strip("0123456789abcdef"))):
                errors.append("authority.restore_all: %r is not a key id in hex or \"*\"" % (v,))


def check_links(cfg, errors, ipv4):
    # the Modbus server's addresses, the MQTT login; ipv4: agent.config._ipv4
    ms = cfg.get("modbus_server")
    if isinstance(ms, dict):
        for v in list(_list(ms.get("allow"))) + [ms.get("master") or "0.0.0.0", ms.get("bind") or "0.0.0.0"]:
            if not ipv4(v):
                errors.append("modbus_server: %r is not an IPv4 address (bind, allow, master)" % (v,))
    mq = cfg.get("mqtt")
    if isinstance(mq, dict) and mq.get("auth") == "cert" and not mq.get("tls"):
        errors.append("mqtt.auth: \"cert\" (a client certificate) needs mqtt.tls = true")
