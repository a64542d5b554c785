# Site config checks of the market loop (docs/market.md): the [market] section and a block's
# market keys. Loaded by agent/config.py validate() only for a config that has them, so a site
# without the market keeps none of this in its core. Defaults live in agent/market.py.
# (Comments, not docstrings: less RAM when compiled from source.)

SECTION = {
    "enabled": ("b", None, None),
    "obligation_mw": ("f", 0.0, 10000.0),
    "obligation_hours": ("l", None, None),
    "program": ("s", None, None),
    "heat_min_kw": ("f", 0.0, 1000000.0),
    "firm_stage": ("i", 0, 3),
}
BLOCK = {
    "class": (("interruptible", "firm", "heat"), None, None),
    "strike_usd_mwh": ("f", -10000.0, 100000.0),
    "revenue_usd_mwh": ("f", 0.0, 100000.0),
    "min_run_s": ("f", 0.0, 86400.0),
    "min_off_s": ("f", 0.0, 86400.0),
    "max_cycles_day": ("i", 0, 1000),
    "ramp_kw_per_min": ("f", 0.0, 1000000.0),
}


def check(cfg, errors, chk):
    # chk: agent.config._check(path, value, kind, lo, hi, errors)
    mk = cfg.get("market")
    if mk is not None:
        if not isinstance(mk, dict):
            errors.append("market: must be a table")
            mk = {}
        for k in mk:
            if k in SECTION:
                s = SECTION[k]
                chk("market." + k, mk[k], s[0], s[1], s[2], errors)
            else:
                errors.append("market.%s: unknown key" % k)
        oh = mk.get("obligation_hours")  # (not a list: refused by chk above, never iterated)
        for h in oh if isinstance(oh, list) else ():
            if not (isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in h)
                    and 0 <= h[0] <= 23 and 0 <= h[1] <= 24 and h[0] != h[1]):
                errors.append("market.obligation_hours: %r is not [start_hour, end_hour] (0..23, 1..24, UTC)" % (h,))
    blocks = cfg.get("blocks")
    if not isinstance(blocks, list):
        return
    firm = []
    for i in range(len(blocks)):
        b = blocks[i]
        if not isinstance(b, dict):
            continue
        for k in BLOCK:
            if k in b:
                s = BLOCK[k]
                chk("blocks[%d].%s" % (i, k), b[k], s[0], s[1], s[2], errors)
        if b.get("class") == "firm":
            firm.append(i)
    # a firm block sheds only by one under-frequency stage (market.firm_stage, default the
    # last) or a utility emergency: no other stage may list it
    trip = cfg.get("trip")
    st = trip.get("stages") if isinstance(trip, dict) else None
    if not firm or not isinstance(st, list) or not st:
        return
    fs = (mk or {}).get("firm_stage")
    fs = len(st) - 1 if fs is None else fs
    if not isinstance(fs, int) or not 0 <= fs < len(st):
        errors.append("market.firm_stage: %r is not a stage (0..%d)" % (fs, len(st) - 1))
        return
    for j in range(len(st)):
        s = st[j]
        if j != fs and isinstance(s, dict):
            for i in firm:
                sb = s.get("blocks")
                if isinstance(sb, list) and i in sb:
                    errors.append("blocks[%d]: a firm block sheds only in stage %d (market.firm_stage), not in stage %d"
                                  % (i, fs, j))
