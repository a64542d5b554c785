# Partial curtailment: shed a kW target (agent.shed_kw) by blocks, then confirm with the meter.
#
# Pure logic (MicroPython/CPython common subset); the agent creates a Curtailer when shed_kw is
# set and calls step(now) from every control decision (docs/partial-and-miners.md):
#   1. new target: remember the site kW (baseline: a kW read after the target came), choose blocks (lowest priority number first;
#      inside a priority tier the smallest block that covers what is missing, else the largest,
#      and so on) and open them with ctrl.shed(now, mask, REASON_COMMAND);
#   2. confirm: once network sheds are confirmed (relays.pending) and the meter has had
#      CONFIRM_POLLS fresh polls and at least SETTLE_MS, measured reduction = baseline - kW;
#      short of the target by more than the tolerance -> open more blocks (estimates scaled by
#      what the opened blocks really delivered); met or over -> nothing;
#   3. never closes a block: a lower target, overshoot or noise never re-close anything (no
#      chatter); blocks come back only through the controller's restore rules, after shed_kw is
#      cleared (a restore command). While a target is active the controller's release_required
#      is held True, so min-off + hold alone cannot undo the shed under the utility's feet.
# The per-decision path between actions compares ints only (no allocation).
from agent.compat import const, ticks_diff
from agent.control import REASON_COMMAND

CONFIRM_POLLS = const(3)
SETTLE_MS = const(1000)
TOL_FRAC = 0.05   # tolerance: 5 % of the target ...
TOL_KW = 1.0      # ... but at least 1 kW


def boot_target(agent, persisted, tripped):
    # state.cbor had a kW target: it is active again; its episode resumes if blocks are still shed
    kw = persisted.get("shed_kw")
    if isinstance(kw, (int, float)) and not isinstance(kw, bool) and 0 < kw < 1e7:
        agent.shed_kw = float(kw)
        if tripped:
            agent._resume = persisted.get("curtail")
    else:
        agent.count("state_shed_kw")


class Curtailer:
    def __init__(self, agent, resume=None, now=0):
        self.a = agent
        c = agent.ctrl
        self.kw = c.kw
        self.prio = c.prio
        bl = agent.cfg["blocks"]  # a firm block (docs/market.md) is never a partial-shed candidate
        self.order = sorted([i for i in range(c.nblocks) if bl[i].get("class") != "firm"],
                            key=lambda i: (c.prio[i], -c.kw[i], i))
        self._rr = c.release_required
        poll = agent.cfg["meter"]["poll_ms"]
        self.settle_ms = SETTLE_MS if SETTLE_MS > CONFIRM_POLLS * poll else CONFIRM_POLLS * poll
        self.target = None
        self.base = None      # site kW before this episode's first shed (None: meter was down)
        self.measured = None  # last measured reduction, kW
        self.opened = 0       # blocks this episode opened
        self.ratio = 1.0      # measured / nameplate of the opened blocks (learned)
        self.rounds = 0
        self.met = False
        self.short = False    # every candidate block is open and the target is still not met
        self.s0 = 0
        self.t0 = 0
        self.born = now
        if resume:
            self._resume(resume, now)

    def snapshot(self):
        # persisted with the agent's state: a reboot mid-episode resumes it instead of taking the
        # already-reduced site kW as a new baseline (which would shed more than asked)
        return None if self.target is None else [self.base, self.opened, self.ratio, self.rounds]

    def _resume(self, r, now):
        a = self.a
        try:
            base, opened, ratio, rounds = r
            self.base = None if base is None else float(base)
            self.opened = int(opened) & a.ctrl.shed_mask
            self.ratio = min(2.0, max(0.2, float(ratio)))
            self.rounds = int(rounds)
        except Exception:  # unreadable: a fresh episode (a baseline taken now sheds more, not less)
            self.base = None
            self.opened = self.rounds = 0
            self.ratio = 1.0
            a.count("curtail_resume")
            return
        self.target = a.shed_kw
        a.ctrl.release_required = True
        self.s0 = a.samples
        self.t0 = now

    def idle(self):
        return self.target is None

    def status(self):
        return {"target_kw": self.target, "base_kw": self.base, "measured_kw": self.measured,
                "opened": self.opened, "rounds": self.rounds, "met": self.met, "short": self.short}

    def tolerance(self, target):
        t = target * TOL_FRAC
        return t if t > TOL_KW else TOL_KW

    def step(self, now):
        a = self.a
        c = a.ctrl
        t = a.shed_kw
        if t is None:
            if self.target is not None:
                c.release_required = self._rr
                self.target = None
            return False
        if self.target is None:
            # a new episode. kW comes with the meter's slow reads (docs/modbus.md "Read plan"),
            # at every poll while a curtailer exists: the baseline waits for one read after this
            # curtailer began (a poll or two; at most 2 s, then the last value it has)
            if a.meter_ok and a.kw_ms is not None and ticks_diff(a.kw_ms, self.born) < 0 \
                    and ticks_diff(now, self.born) < 2000:
                return False
            self.target = t
            c.release_required = True
            self.base = a.kw if (a.meter_ok and a.kw is not None) else None
            self.opened = self.rounds = 0
            self.measured = None
            self.met = self.short = False
            self.ratio = 1.0
            return self._shed(now, t)
        if t != self.target:
            up = t > self.target
            self.target = t
            self.met = False
            if up and self.base is None:
                # no baseline to confirm against: nameplate only
                return self._shed(now, t - self.estimate())
        if a.relays.pending & self.opened:
            # network curtailment still in flight: the meter cannot show it yet
            self.s0 = a.samples
            self.t0 = now
            return False
        if a.samples - self.s0 < CONFIRM_POLLS or ticks_diff(now, self.t0) < self.settle_ms:
            return False
        if self.base is None or not a.meter_ok or a.kw is None:
            return False
        self.s0 = a.samples
        self.t0 = now
        red = self.base - a.kw
        self.measured = red
        miss = t - red
        if miss <= self.tolerance(t):
            self.met = True
            return False
        self.met = False
        est = self.estimate()
        if est > 0:
            r = red / est
            self.ratio = 0.2 if r < 0.2 else (2.0 if r > 2.0 else r)
        return self._shed(now, miss)

    def estimate(self):
        # nameplate kW of the blocks this episode opened that are still open
        m = self.opened & ~self.a.ctrl.closed_mask
        s = 0.0
        for i in range(len(self.kw)):
            if m & (1 << i):
                s += self.kw[i]
        return s

    def choose(self, need):
        # Blocks to open for `need` kW: priority tiers in order; within a tier the smallest
        # block whose estimate covers what is missing, else the largest, until covered.
        closed = self.a.ctrl.closed_mask
        kw = self.kw
        prio = self.prio
        order = self.order
        r = self.ratio
        n = len(order)
        m = 0
        got = 0.0
        k = 0
        while k < n and got < need:
            p = prio[order[k]]
            j = k
            while j < n and prio[order[j]] == p:
                j += 1
            while got < need:
                rem = need - got
                best = -1
                big = -1
                for x in range(k, j):
                    i = order[x]
                    bit = 1 << i
                    if closed & bit and not m & bit and kw[i] > 0:
                        if big < 0:
                            big = i  # tier sorted by size: the first candidate is the largest
                        if kw[i] * r >= rem and (best < 0 or kw[i] < kw[best]):
                            best = i
                if best < 0:
                    best = big
                if best < 0:
                    break
                m |= 1 << best
                got += kw[best] * r
            k = j
        return m

    def _shed(self, now, need):
        m = self.choose(need)
        self.s0 = self.a.samples
        self.t0 = now
        if not m:
            self.short = True
            return False
        self.a.ctrl.shed(now, m, REASON_COMMAND)
        self.opened |= m
        self.rounds += 1
        try:
            self.a.journal.append("curtail", {"target_kw": self.target, "need_kw": need, "mask": m,
                                              "measured_kw": self.measured, "round": self.rounds})
        except Exception:
            self.a.count("curtail_journal")
        return True
