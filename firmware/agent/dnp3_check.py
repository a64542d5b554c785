# Site config checks of the DNP3 outstation ([dnp3], docs/dnp3.md): its keys with their defaults,
# kinds and ranges, and the checks across keys. Loaded by agent/config.py (validate) and
# agent/config_defaults.py (the host's apply_defaults) only for a config that has the section, so a site without DNP3 keeps none of this in
# its core; the board's boot unloads it with the validator. (Comments, not docstrings.)

# key -> (default, kind, lo, hi), as agent/config_optional.py OPTIONAL
SECTION = {
    "enabled": (True, "b", None, None),
    "transport": ("tcp", ("tcp", "serial"), None, None),
    "port": (20000, "i", 1, 65535),
    "baud": (19200, "i", 1200, 115200),
    "address": (10, "i", 0, 65519),
    "masters": ([], "l", None, None),
    "allow": ([], "l", None, None),
    "bind": ("", "s", None, None),
    "hz_deadband": (0.01, "f", 0.0, 10.0),
    "kw_deadband": (10.0, "f", 0.0, 1000000.0),
    "mw_deadband": (0.1, "f", 0.0, 10000.0),
    "unsolicited": (False, "b", None, None),
}


def check(cfg, errors, chk, ipv4):
    # chk: agent.config._check(path, value, kind, lo, hi, errors); ipv4: agent.config._ipv4
    dn = cfg["dnp3"]
    if not isinstance(dn, dict):
        errors.append("dnp3: must be a table")
        return
    for k in dn:
        if k in SECTION:
            s = SECTION[k]
            chk("dnp3." + k, dn[k], s[1], s[2], s[3], errors)
        else:
            errors.append("dnp3.%s: unknown key" % k)
    if errors:
        return
    al = dn.get("allow")  # (not a list: refused by chk, never iterated)
    for v in (al if isinstance(al, list) else []) + [dn.get("bind") or "0.0.0.0"]:
        if not ipv4(v):
            errors.append("dnp3: %r is not an IPv4 address (bind, allow)" % (v,))
    ms = dn.get("masters")
    for v in ms if isinstance(ms, list) else ():
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65519 or v == dn.get("address", 10):
            errors.append("dnp3.masters: %r is not a master link address (0..65519, not the outstation's)" % (v,))
    if dn.get("transport") == "serial" and dn.get("unsolicited"):
        errors.append("dnp3.unsolicited: TCP only (transport = \"serial\" has one master polling the line)")
    ms = cfg.get("modbus_server")
    if dn.get("transport") == "serial" and dn.get("enabled") is not False and isinstance(ms, dict) \
            and ms.get("enabled") is not False and ms.get("transport") == "rtu":
        errors.append("dnp3.transport: the utility UART already serves Modbus RTU (modbus_server.transport)")
