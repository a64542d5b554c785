# The market decision core's cold half (agent/market.py): the config and the holds read back
# at boot. agent.market.Market loads this for each of those calls and frees it after, so only
# the per-tick decision stays resident. Pure logic in the MicroPython/CPython common subset.
# (Comments, not docstrings: less RAM when compiled from source.)
from agent.compat import const

EPOCH = const(1577836800)
_DAY = const(86400)
_MAX_IV = const(96)
_NEVER = const(0x3FFFFFFF)
_C_INT = const(0)
C_FIRM = const(1)
_C_HEAT = const(2)
_M_NONE = const(0)
M_PRICE = const(1)
_M_KW = const(2)
_W_MIN_OFF = const(4)
_W_OBLIG = const(6)
_NEV = const(40)
CLASSES = ("interruptible", "firm", "heat")


def trip_mask(cfg, n):
    # blocks an under-frequency / ROCOF trip would shed: the union of the stages' blocks
    st = (cfg.get("trip") or {}).get("stages")
    if not st:
        return (1 << n) - 1
    m = 0
    for s in st:
        for b in s.get("blocks") or range(n):
            m |= 1 << b
    return m


def setup(self, cfg):
    blocks = cfg["blocks"]
    mk = cfg.get("market") or {}
    self.n = n = len(blocks)
    self.names = [b.get("name", "") for b in blocks]
    self.kw = [float(b.get("miners", 0) * b.get("kw_per_miner", 0)) for b in blocks]
    self.cls = bytearray(n)
    self.strike = [None] * n
    self.min_run = [0] * n
    self.min_off = [0] * n
    self.cap = [0] * n
    self.ramp = [0.0] * n
    im = 0
    for i in range(n):
        b = blocks[i]
        c = b.get("class", "interruptible")
        self.cls[i] = CLASSES.index(c)
        s = b.get("strike_usd_mwh")
        self.strike[i] = None if s is None else float(s)
        self.min_run[i] = int(b.get("min_run_s", 0))
        self.min_off[i] = int(b.get("min_off_s", 0))
        self.cap[i] = int(b.get("max_cycles_day", 0))
        self.ramp[i] = float(b.get("ramp_kw_per_min", 0))
        if self.cls[i] == _C_INT and self.kw[i] > 0:
            im |= 1 << i
    self.int_mask = im
    self.heat_min_kw = float(mk.get("heat_min_kw", 0))
    self.oblig_kw = float(mk.get("obligation_mw", 0)) * 1000
    self.program = mk.get("program", "RRS")
    self.hours = bytearray(24)  # 1: an obligation hour (UTC)
    for h in mk.get("obligation_hours") or ():
        a, b = int(h[0]) % 24, int(h[1])
        k = a
        while True:
            self.hours[k] = 1
            k = (k + 1) % 24
            if k == b % 24:
                break
    self.trip = trip_mask(cfg, n)
    # shed order: interruptible, then heat (shed last); each by priority, the largest first;
    # firm blocks never shed for economics. Restores go the other way round.
    pr = [b.get("priority", 1) for b in blocks]
    self.order = tuple(sorted([i for i in range(n) if self.cls[i] != C_FIRM and self.kw[i] > 0],
                              key=lambda i: (self.cls[i] == _C_HEAT, pr[i], -self.kw[i], i)))
    # schedule: parallel arrays, times in seconds since EPOCH, later intervals win; sized to
    # the schedule when it is taken (a series-only or empty schedule keeps none)
    self.sid = -1
    self.niv = 0
    self.iv_s = self.iv_e = self.iv_v = None  # array("i"): start, end, value x 100 (cents / 0.01 kW)
    self.iv_m = None  # bytearray: the rows' modes
    # the compact uniform-step series ("ts": [t0, dt, "pc"|"kw", [values]]): the base layer
    # under the iv rows, read in place (no per-interval rows): step k runs t0 + k*dt .. + dt
    self.ts_t0 = 0
    self.ts_dt = 1
    self.ts_m = _M_NONE
    self.ts_v = None        # the received list (prices in cents, or kW); None: no series
    self.ts_n = 0
    # dynamic state (every attribute exists from here on)
    self.off = 0            # blocks economics holds open
    self.why = bytearray(n)  # each block's last journaled reason
    self.on_t = [0] * n     # when each block last came on (relays' real state)
    self.off_t = [0] * n    # when economics last opened it
    self.cycles = [0] * n   # economic sheds today (UTC day)
    self.day = -1
    self.fin = -1           # the relays' mask at the last decision (-1: none yet)
    self.t = -1             # the second of the last step
    self.t_dec = 0          # the second of the last decision
    self.closed = -1
    self.ramp_until = 0
    self.wake = _NEVER       # the next second a hold ends (a decision is due then)
    self.edge = 0           # the next interval start or end
    self.mode = _M_NONE
    self.val = 0.0
    self.avail_kw = 0.0     # sheddable load on now: what a frequency trip would shed
    self.oblig = False      # in an obligation hour now
    self.short = False      # in an obligation hour with less available than committed
    self.refused = 0        # economic curtailments refused for the obligation (episodes)
    self.unknown = 0        # decisions skipped: no trusted time
    self.known = False
    self.boot_hold = False  # blocks held open at a reboot stay so until their min off ends
    self.x_price = None     # the utility register's price ($/MWh) or None: only adds curtailment
    self.x_kw = 0.0         # the utility register's kW target (0: none): only adds curtailment
    self.ev = bytearray(3 * _NEV)
    self.nev = self.dropped = 0


def set_holds(self, h):
    # the stored holds at boot: min run and min off count from the real times across the
    # reboot. Blocks held open stay so, without a trusted clock, only until their min off has
    # run by the board's own count since boot (boot_release); then they come back.
    off, fin, a, b = h
    for i in range(self.n):
        self.off_t[i] = int(a[i])
        self.on_t[i] = int(b[i])
    self.fin = int(fin)
    self.t_dec = max(max(self.off_t), max(self.on_t))
    m = 0
    for i in self.order:
        if (off >> i) & 1 and self.min_off[i] > 0:
            m |= 1 << i
            self.why[i] = _W_MIN_OFF
    self.off = m
    self.boot_hold = m != 0
