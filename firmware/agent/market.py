# The market loop's decision core: economic curtailment per block from a schedule of prices or
# kW targets, under minimum run/off times, a daily cycle cap, a re-energise ramp and a frequency
# obligation (docs/market.md). Pure logic in the MicroPython/CPython common subset: the board
# runs it every tick (the market feature) and `gridshed backtest` runs the very same decide().
#
#   m = Market(cfg)                       # cfg: the normalized site config
#   m.set_schedule(sid, iv, ts=ts)        # None, or why it is refused (a signed "schedule")
#   off = m.step(now_unix, closed_mask)   # trusted unix time or None; relays left closed by protection
#   relays.apply(closed_mask & ~off)      # economics only ever ADDS open blocks
#   for k in range(m.nev): journal(m.event(k))
#
# Times are whole seconds since EPOCH (2020-01-01 UTC): small ints on a 32-bit board. Between two
# changes (a new second, a new relay mask) step() compares ints and returns at once; a decision
# touches preallocated lists only. (Comments, not docstrings: less RAM when compiled from source.)
from array import array

from agent.compat import const

EPOCH = const(1577836800)  # 2020-01-01T00:00:00Z, a whole number of days
_DAY = const(86400)
_MAX_IV = const(96)         # schedule intervals kept (a day of 15-minute prices)
_NEVER = const(0x3FFFFFFF)
_C_INT = const(0)
C_FIRM = const(1)
_C_HEAT = const(2)
# interval modes
_M_NONE = const(0)
M_PRICE = const(1)
_M_KW = const(2)
MODES = (None, "p", "kw")
# events (kind) and reasons (why): every economic transition, journaled by the caller
EV_SHED = const(1)
_EV_RESTORE = const(2)
_EV_HOLD = const(3)
EV_NAMES = ("none", "shed", "restore", "hold")
_W_NONE = const(0)
_W_PRICE = const(1)       # shed: price above the block's strike
_W_KW = const(2)          # shed: the schedule's kW target
_W_MIN_RUN = const(3)     # hold: on for less than min_run_s (stays on)
_W_MIN_OFF = const(4)     # hold: off for less than min_off_s (stays off)
_W_CAP = const(5)         # hold: max_cycles_day reached (stays on)
_W_OBLIG = const(6)       # hold: refused, it would leave less sheddable load on than committed
_W_RAMP = const(7)        # hold: another block is still ramping back (stays off)
_W_PRICE_OK = const(8)    # restore: price at or below the strike
_W_TARGET = const(9)      # restore: the kW target no longer needs it
_W_NO_IV = const(10)      # restore: no schedule interval now
_W_OBLIG_ON = const(11)   # restore: the obligation hour needs the load on
_W_CLOCK = const(12)      # restore: the board's clock is not trusted (no economic action)
_W_UTIL = const(13)       # shed: the utility Modbus map's price / kW register (trusted line only)
WHY = ("none", "price_above_strike", "kw_target", "min_run", "min_off", "cycle_cap", "obligation",
       "ramp", "price_at_or_below_strike", "target_lowered", "no_interval", "obligation_hour",
       "clock_unknown", "utility_register")
_NEV = const(40)


def _io():
    from agent import market_io

    return market_io


def _free():
    import sys

    sys.modules.pop("agent.market_io", None)
    import agent

    if "market_io" in agent.__dict__:
        delattr(agent, "market_io")


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_ts(ts):
    # the compact series [t0_unix, dt_s, "pc"|"kw", [values]]: None if sound, else why not
    if not isinstance(ts, list) or len(ts) != 4:
        return "bad-interval"
    t0, dt, m, v = ts
    if not isinstance(v, list) or len(v) > _MAX_IV:
        return "too-many-intervals"
    if not (isinstance(t0, int) and isinstance(dt, int) and not isinstance(dt, bool) and 0 < dt <= _DAY
            and EPOCH <= t0 and t0 + dt * len(v) < EPOCH + _NEVER and v):
        return "bad-interval"
    for x in v:
        if m == "pc":
            if not (isinstance(x, int) and not isinstance(x, bool) and -1000000 <= x <= 10000000):
                return "bad-interval"
        elif not (m == "kw" and _num(x) and 0 <= x < 1e7):
            return "bad-interval"
    return None


def _x100(v):
    # a value x 100 as an int, rounded half away from zero (cents / 0.01 kW)
    v = v * 100
    return int(v + 0.5) if v >= 0 else -int(0.5 - v)


class Market:
    # the cold half (agent/market_io.py: the config, the holds read back at boot) is loaded
    # for those calls only (at boot) and freed after them: less resident bytecode
    def __init__(self, cfg):
        _io().setup(self, cfg)
        _free()

    def set_schedule(self, sid, iv, boot=False, ts=None):
        # A signed schedule {"sid": id, "iv": [[start_unix, end_unix, "p"|"kw", value], ...],
        # "ts": [t0_unix, dt_s, "pc"|"kw", [value, ...]]} (ts optional: a uniform-step series,
        # prices in whole cents per MWh or kW to curtail, step k from t0 + k*dt for dt seconds;
        # the iv rows lie over it, later wins): None when taken (it replaces the whole schedule),
        # else why it is refused. A lower or equal id is a replay (boot=True: the stored one, taken
        # as it is).
        if not isinstance(sid, int) or isinstance(sid, bool) or not 0 <= sid < 1 << 31:
            return "bad-id"
        if sid <= self.sid and not boot:
            return "replay"
        if not isinstance(iv, list) or len(iv) > _MAX_IV:
            return "too-many-intervals"
        for x in iv:
            if not isinstance(x, list) or len(x) != 4:
                return "bad-interval"
            s, e, m, v = x
            if not (isinstance(s, int) and isinstance(e, int) and EPOCH <= s < e < EPOCH + _NEVER):
                return "bad-interval"
            if not _num(v) or not ((m == "p" and -10000 <= v <= 100000) or (m == "kw" and 0 <= v < 1e7)):
                return "bad-interval"
        if ts is not None:
            why = _check_ts(ts)
            if why:
                return why
        n = len(iv)
        self.niv = self.ts_n = 0  # (no RAM for the new rows: no schedule rather than half of one)
        self.ts_v = self.iv_s = self.iv_e = self.iv_v = self.iv_m = None  # the old rows freed first
        if n:
            z = [0] * n
            self.iv_s = array("i", z)
            self.iv_e = array("i", z)
            self.iv_v = array("i", z)
            self.iv_m = bytearray(n)
            z = None
        k = 0
        for x in iv:
            self.iv_s[k] = x[0] - EPOCH
            self.iv_e[k] = x[1] - EPOCH
            self.iv_m[k] = M_PRICE if x[2] == "p" else _M_KW
            self.iv_v[k] = _x100(x[3])
            k += 1
        self.niv = k
        if ts is not None:
            self.ts_t0 = ts[0] - EPOCH
            self.ts_dt = ts[1]
            self.ts_m = M_PRICE if ts[2] == "pc" else _M_KW
            self.ts_v = ts[3]
            self.ts_n = len(ts[3])
        self.sid = sid
        self.closed = -1  # decide again at the next step
        return None

    def set_extra(self, price=None, kw=0.0):
        # the utility register's price / kW target (agent/features/modbus_server.py, trusted line only)
        self.x_price = price
        self.x_kw = kw
        self.closed = -1  # decide again at the next step

    def schedule(self):
        # the stored form (market.cbor), times back in unix seconds
        out = []
        for k in range(self.niv):
            out.append([self.iv_s[k] + EPOCH, self.iv_e[k] + EPOCH, MODES[self.iv_m[k]], self.iv_v[k] / 100])
        r = {"sid": self.sid, "iv": out}
        if self.ts_v is not None:
            r["ts"] = [self.ts_t0 + EPOCH, self.ts_dt, "pc" if self.ts_m == M_PRICE else "kw", self.ts_v]
        return r

    def holds(self):
        # [off, fin, off_t, on_t]: which blocks economics holds open and since when, when each
        # block came on (seconds since EPOCH); None before the first decision
        if self.fin < 0:
            return None
        return [self.off, self.fin, list(self.off_t), list(self.on_t)]

    def set_holds(self, h):
        _io().set_holds(self, h)
        _free()

    def status(self):
        w = None
        if self.short:
            w = "%s obligation: %.0f kW available of %.0f kW committed" % (self.program, self.avail_kw, self.oblig_kw)
        elif self.oblig and self.why_count(_W_OBLIG):
            w = "economic curtailment refused: %s obligation" % self.program
        elif not self.known and (self.niv or self.ts_n):
            w = "clock not trusted: schedule not executed"
        return {"clock": self.known, "sid": self.sid if self.sid >= 0 else None, "intervals": self.niv + self.ts_n,
                "mode": MODES[self.mode], "value": self.val if self.mode else None, "off": self.off,
                "avail_kw": self.avail_kw, "avail_mw": self.avail_kw / 1000, "program": self.program,
                "obligation_kw": self.oblig_kw, "obligation_hour": self.oblig, "short": self.short,
                "refused": self.refused, "unknown_clock": self.unknown, "cycles": self.cycles,
                "holds": [WHY[self.why[i]] for i in range(self.n)], "warning": w}

    # ---- the schedule ------------------------------------------------------------------
    def lookup(self, t):
        # the interval in force at t: the last iv row that holds t wins, then the series
        k = self.niv - 1
        while k >= 0:
            if self.iv_s[k] <= t < self.iv_e[k]:
                self.mode = self.iv_m[k]
                self.val = self.iv_v[k] / 100
                return
            k -= 1
        self.mode = _M_NONE
        if self.ts_n and t >= self.ts_t0:
            k = (t - self.ts_t0) // self.ts_dt
            if k < self.ts_n:
                self.mode = self.ts_m
                v = self.ts_v[k]
                self.val = v / 100 if self.ts_m == M_PRICE else _x100(v) / 100

    def _next_edge(self, t):
        # the next interval start or end after t (the series: where its value changes)
        w = _NEVER
        for k in range(self.niv):
            s = self.iv_s[k]
            if t < s < w:
                w = s
            s = self.iv_e[k]
            if t < s < w:
                w = s
        n = self.ts_n
        if n:
            t0 = self.ts_t0
            if t < t0:
                s = t0
            else:
                k = (t - t0) // self.ts_dt + 1
                v = self.ts_v
                while k < n and v[k] == v[k - 1]:
                    k += 1
                s = t0 + k * self.ts_dt if k <= n else _NEVER
            if t < s < w:
                w = s
        return w

    # ---- the board's entry: once per control decision ---------------------------------
    def step(self, unix, closed):
        # unix: the board's trusted time (Agent.now_unix) or None; closed: the blocks protection
        # and commands leave closed. Returns the mask economics holds open.
        self.nev = 0
        if unix is None:
            self.unknown += 1
            self.known = False
            if self.off and not self.boot_hold:  # no trusted time: no economic action at all
                self._release_all(_W_CLOCK)
            self.t = -1
            self.available(closed)
            return self.off
        t = int(unix - EPOCH)
        if t == self.t and closed == self.closed:
            return self.off
        if self.t <= t < self.wake and t < self.edge and closed == self.closed and t // 3600 == self.t // 3600:
            self.t = t
            return self.off
        self.known = True
        self.boot_hold = False
        self.t = t
        self.closed = closed
        self.lookup(t)
        self.decide(t, self.mode, self.val, closed)
        self.edge = self._next_edge(t)
        return self.off

    # ---- the holds across a reboot (market.cbor) ---------------------------------------
    def boot_release(self, up_s):
        # the clock still unknown up_s seconds after boot: give back the blocks held open at the
        # reboot whose min off has run (counted from boot: the cut itself counts as nothing)
        self.nev = 0
        for i in self.order:
            if (self.off >> i) & 1 and up_s >= self.min_off[i]:
                self.off &= ~(1 << i)
                self.why[i] = _W_NONE
                self._emit(_EV_RESTORE, i, _W_CLOCK)
        self.boot_hold = self.off != 0

    def _release_all(self, why):
        for i in self.order:
            if (self.off >> i) & 1:
                self._emit(_EV_RESTORE, i, why)
                self.why[i] = _W_NONE
        self.off = 0

    def _emit(self, kind, i, why):
        k = self.nev
        if k < _NEV:
            self.ev[3 * k] = kind
            self.ev[3 * k + 1] = i
            self.ev[3 * k + 2] = why
            self.nev = k + 1
        else:
            self.dropped += 1

    def event(self, k):
        # the k-th event of the last decision as a journal record
        i = self.ev[3 * k + 1]
        return {"ev": EV_NAMES[self.ev[3 * k]], "block": self.names[i], "why": WHY[self.ev[3 * k + 2]],
                "mode": MODES[self.mode], "value": self.val if self.mode else None,
                "avail_kw": self.avail_kw, "cycles": self.cycles[i]}

    def _hold(self, i, why, until):
        if self.why[i] != why:
            self.why[i] = why
            self._emit(_EV_HOLD, i, why)
            if why == _W_OBLIG:
                self.refused += 1
        if until < self.wake:
            self.wake = until

    # ---- the decision (also `gridshed backtest`'s) -------------------------------------
    def decide(self, t, mode, val, closed):
        # t: seconds since EPOCH; mode/val: the interval in force (_M_NONE, M_PRICE $/MWh, _M_KW
        # kW to curtail); closed: the blocks protection and commands leave closed.
        n = self.n
        self.nev = 0
        self.mode = mode
        self.val = val
        if t < self.t_dec:  # the clock was set back: the holds count from now
            for i in range(n):
                if self.on_t[i] > t:
                    self.on_t[i] = t
                if self.off_t[i] > t:
                    self.off_t[i] = t
            if self.ramp_until > t:
                self.ramp_until = t
        self.t_dec = t
        day = t // _DAY
        if day != self.day:
            self.day = day
            for i in range(n):
                self.cycles[i] = 0
        self.wake = (day + 1) * _DAY  # a cycle cap ends with the day
        bit = 1
        fin = closed & ~self.off
        for i in range(n):  # when each block came on (min run): the relays' real state
            if fin & bit and (self.fin < 0 or not self.fin & bit):
                self.on_t[i] = t
            bit <<= 1
        want = self._want(mode, val)
        extra = 0  # the utility register's (max with the schedule: it only ever adds)
        if self.x_price is not None:
            extra = self._want(M_PRICE, self.x_price)
        if self.x_kw > 0:
            extra |= self._want(_M_KW, self.x_kw)
        extra &= ~want
        want |= extra
        kw = self.kw
        trip = self.trip
        avail = self.available(fin)
        ob = self.oblig_kw > 0 and self.hours[(t // 3600) % 24] == 1
        self.oblig = ob
        order = self.order
        # 1. restores: held open by economics, no longer wanted open
        k = len(order) - 1
        while k >= 0:
            i = order[k]
            b = 1 << i
            k -= 1
            if not self.off & b or want & b:
                continue
            if t - self.off_t[i] < self.min_off[i]:
                self._hold(i, _W_MIN_OFF, self.off_t[i] + self.min_off[i])
            elif t < self.ramp_until:
                self._hold(i, _W_RAMP, self.ramp_until)
            else:
                avail += self._restore(t, i, _W_PRICE_OK if mode == M_PRICE else (_W_TARGET if mode == _M_KW else _W_NO_IV), closed)
        # 2. sheds: wanted open, in shed order
        for i in order:
            b = 1 << i
            if not want & b or self.off & b:
                continue
            if not closed & b:
                continue  # opened by protection or a command: economics waits until it is back
            if t - self.on_t[i] < self.min_run[i]:
                self._hold(i, _W_MIN_RUN, self.on_t[i] + self.min_run[i])
            elif self.cap[i] and self.cycles[i] >= self.cap[i]:
                self._hold(i, _W_CAP, self.wake)
            elif ob and trip & b and avail - kw[i] < self.oblig_kw - 1e-6:
                self._hold(i, _W_OBLIG, (t // 3600 + 1) * 3600)
            else:
                self.off |= b
                self.off_t[i] = t
                self.cycles[i] += 1
                if trip & b:
                    avail -= kw[i]
                self.why[i] = _W_UTIL if extra & b else (_W_PRICE if mode == M_PRICE else _W_KW)
                self._emit(EV_SHED, i, self.why[i])
        # 3. an obligation hour with less on than committed: economics gives load back
        if ob and avail < self.oblig_kw - 1e-6:
            k = len(order) - 1
            while k >= 0 and avail < self.oblig_kw - 1e-6:
                i = order[k]
                b = 1 << i
                k -= 1
                if self.off & b and trip & b and closed & b:
                    if t < self.ramp_until:
                        self._hold(i, _W_RAMP, self.ramp_until)
                        break
                    avail += self._restore(t, i, _W_OBLIG_ON, closed)
                    if want & b:  # still priced out: held on by the obligation from here
                        self.why[i] = _W_OBLIG
                        self.refused += 1
        self.short = ob and avail < self.oblig_kw - 1e-6
        if ob and (t // 3600 + 1) * 3600 < self.wake:
            self.wake = (t // 3600 + 1) * 3600
        bit = 1
        for i in range(n):  # a reason that is spent (a hold is journaled once per episode)
            w = self.why[i]
            if self.off & bit:
                if want & bit:
                    self.why[i] = _W_UTIL if extra & bit else (_W_KW if mode == _M_KW else _W_PRICE)
            elif (w == _W_PRICE or w == _W_KW or w == _W_UTIL or w == _W_MIN_OFF or w == _W_RAMP or (w == _W_MIN_RUN and not want & bit)
                  or (w == _W_OBLIG and (not ob or not want & bit)) or (w == _W_CAP and self.cycles[i] < self.cap[i])):
                self.why[i] = _W_NONE
            bit <<= 1
        self.avail_kw = avail
        self.fin = closed & ~self.off
        return self.off

    def available(self, fin):
        # kW a frequency trip would shed with the relays at fin
        a = 0.0
        m = fin & self.trip
        for i in range(self.n):
            if (m >> i) & 1:
                a += self.kw[i]
        self.avail_kw = a
        return a

    def _restore(self, t, i, why, closed):
        b = 1 << i
        self.off &= ~b
        self.why[i] = _W_NONE
        self.on_t[i] = t  # (on now if protection has it closed; else from when it closes)
        self._emit(_EV_RESTORE, i, why)
        r = self.ramp[i]
        if r > 0:
            self.ramp_until = t + int(self.kw[i] * 60 / r + 0.5)
            if self.ramp_until < self.wake:
                self.wake = self.ramp_until
        return self.kw[i] if closed & self.trip & b else 0.0

    def _want(self, mode, val):
        # the blocks economics wants open now (before min times, cap, obligation, ramp)
        want = 0
        order = self.order
        if mode == M_PRICE:
            for i in order:
                s = self.strike[i]
                if s is not None and val > s and self.cls[i] == _C_INT:
                    want |= 1 << i
            if want & self.int_mask == self.int_mask:  # heat sheds last
                heat = self._heat_on()
                for i in order:
                    s = self.strike[i]
                    if self.cls[i] == _C_HEAT and s is not None and val > s and heat - self.kw[i] >= self.heat_min_kw - 1e-6:
                        want |= 1 << i
                        heat -= self.kw[i]
        elif mode == _M_KW:
            got = 0.0
            heat = self._heat_on()
            for i in order:
                if got >= val - 1e-6:
                    break
                if self.cls[i] == _C_HEAT:
                    if heat - self.kw[i] < self.heat_min_kw - 1e-6:
                        continue
                    heat -= self.kw[i]
                want |= 1 << i
                got += self.kw[i]
        return want

    def _heat_on(self):
        h = 0.0
        for i in self.order:
            if self.cls[i] == _C_HEAT:
                h += self.kw[i]
        return h

    # ---- status -------------------------------------------------------------------------
    def why_count(self, why):
        c = 0
        for i in range(self.n):
            if self.why[i] == why:
                c += 1
        return c
