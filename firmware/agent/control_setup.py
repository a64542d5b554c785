# The controller's settings from the site config (trip timers, stages, the plausibility band and
# rate grid, block priorities and kW, the jitter seed): boot-only code, called by
# control.Controller.__init__ and freed by the agent once its controller is built (agent/app.py),
# so the running board keeps only the control logic (agent/control.py) resident. Raises
# ValueError on a setting the controller cannot run with (the config checks come first).
# (Comments, not docstrings: less RAM when compiled from source.)
BAND = 0.15          # plausible band: nominal -15 % (or 1 Hz under the lowest pickup) .. +15 %
ROCOF_MAX_HZ_S = 10  # |df/dt| no power system reaches (big grids < 1 Hz/s, islands ~ 5 Hz/s)
RATE_SLACK_HZ = 0.1  # meter resolution and averaging-window slack on top of it


def _ms(seconds):
    return int(seconds * 1000 + 0.5)


def settings(c, cfg, nblocks, seed):
    tr = cfg.get("trip") or {}
    fs = cfg.get("failsafe") or {}
    blocks = cfg.get("blocks") or ()
    nom = cfg.get("nominal_hz") or 60
    if not 0 < nblocks <= 30 or (blocks and len(blocks) != nblocks):
        raise ValueError("nblocks")
    c.nblocks = nblocks
    c.all_mask = am = (1 << nblocks) - 1
    g = tr.get
    c.samples = max(1, g("samples", 2))
    c.deadband_hz = db = g("deadband_hz", 0.02)
    c.restore_hz = g("restore_hz", nom - 0.05)
    c._restore_low = c.restore_hz - db
    c.release_required = bool(g("release_required", False))
    c.hold_ms = _ms(g("restore_hold_s", 30))
    c.min_off_ms = mo = _ms(g("min_off_s", 60))
    c.stagger_ms = _ms(g("stagger_s", 5))
    c.jitter_ms = _ms(g("jitter_s", 2))
    if db < 0 or min(c.hold_ms, mo, c.stagger_ms, c.jitter_ms) < 0:
        raise ValueError("negative trip setting")
    # stages (default: one stage = all blocks); per-stage arrays, preallocated. A stage
    # with "rocof_hz_s" (negative) watches the ROCOF input (Controller.rocof) instead of hz,
    # optionally only while hz < "below_hz"; it cancels above rocof_hz_s + "deadband_hz_s".
    sts = g("stages") or ({},)
    c.nstages = n = len(sts)
    c._pick = [0.0] * n
    c._cancel = [0.0] * n
    c._rocof = [0] * n   # 1: ROCOF stage
    c._below = [0.0] * n
    c._delay = [0] * n
    c._smask = [0] * n
    c._on = [0] * n     # picked up
    c._low = [0] * n    # last good sample below this stage's pickup
    c._count = [0] * n  # low samples since pickup (capped at samples)
    c._t0 = [0] * n     # pickup start, ms
    c._hz_lo = nom * (1 - BAND)  # plausible band (lowered below the lowest pickup)
    c._hz_hi = nom * (1 + BAND)
    pk = None
    for i in range(n):
        st = sts[i]
        if "rocof_hz_s" in st:
            c._rocof[i] = 1
            p = c._pick[i] = st["rocof_hz_s"]
            c._cancel[i] = p + st.get("deadband_hz_s", 0.1)
            c._below[i] = st.get("below_hz", c._hz_hi)
            if not -20 <= p < 0 or not c._cancel[i] >= p:
                raise ValueError("stage %d: rocof_hz_s must be negative" % i)
        else:
            p = c._pick[i] = st.get("pickup_hz", g("pickup_hz", nom - 0.3))
            c._cancel[i] = p + db
            if pk is None:
                pk = p
        c._delay[i] = d = st.get("delay_ms", g("delay_ms", 0))
        m = am
        if "blocks" in st:
            m = 0
            for b in st["blocks"]:
                m |= 1 << b
        c._smask[i] = m
        if d < 0 or not 0 < m <= am or (not c._rocof[i] and c.restore_hz < p + db - 1e-9):
            raise ValueError("stage %d: delay, blocks or restore_hz < pickup+deadband" % i)
    c.pickup_hz = g("pickup_hz", nom - 0.3) if pk is None else pk
    for i in range(n):
        if not c._rocof[i] and c._pick[i] - 1.0 < c._hz_lo:
            c._hz_lo = c._pick[i] - 1.0
    # rate check: a grid of cells (half the step a poll may make) where a decision can
    # change (2 steps under the lowest pickup to a step over nominal; below and above it,
    # one cell each); a sample more than 2 cells (>= 1 step, < 1.5 steps) from the last
    # plausible one is implausible unless the previous sample agrees with it. Built once:
    # the check only compares.
    pm = (cfg.get("meter") or {}).get("poll_ms")
    c.rate_step_hz = None
    c._grid = None
    c._rate_ms = 0
    if pm:
        c.rate_step_hz = stp = ROCOF_MAX_HZ_S * pm / 1000 + RATE_SLACK_HZ
        lo = c.pickup_hz
        for i in range(n):
            if not c._rocof[i] and c._pick[i] < lo:
                lo = c._pick[i]
        lo -= 2 * stp
        k = int((nom + stp - lo) / (stp / 2)) + 2
        if k <= 32:  # wider steps than that: the band alone decides
            c._grid = [lo + j * stp / 2 for j in range(k)]
            c._rate_ms = 3 * pm  # older reference (failed polls between): band only
    c.volts = None  # input: phase-1 voltage this sample (where the map has it) or None
    c.delay_ms = c._delay[0]
    mode = fs.get("meter_loss", "hold")
    if mode not in ("hold", "shed"):
        raise ValueError("meter_loss")
    c.meter_loss_shed = mode == "shed"
    c.meter_loss_ms = _ms(fs.get("meter_loss_after_s", 5))
    # blocks: priority (lower = shed first, restored last) and kW
    c.prio = [b.get("priority", 0) for b in blocks] or list(range(nblocks))
    c.kw = [b.get("miners", 0) * b.get("kw_per_miner", 0) for b in blocks] or [0] * nblocks
    # restore order: highest priority number first, ties by index
    c._order = tuple(sorted(range(nblocks), key=lambda i: (-c.prio[i], i)))
    if seed is None:
        seed = 0
        for ch in str(cfg.get("device", "")):
            seed = (seed * 31 + ord(ch)) & 0x7FFF
    c._seed = seed & 0x7FFF
