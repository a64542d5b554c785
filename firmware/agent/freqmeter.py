# Grid frequency and ROCOF from zero-crossing timestamps (rising edges, ticks_us).
#
# Pure logic, MicroPython/CPython common subset; docs/ac-sense.md explains the method.
#
#   fm = FreqMeter(60, cycles=4, rocof_cycles=24)
#   fm.edge(t_us)        # IRQ side: store one timestamp in the preallocated ring (hard-IRQ safe)
#   n = fm.process()     # task side: drain the ring, returns how many cycles were accepted
#   if fm.valid: hz = fm.hz(); r = fm.rocof()   # floats: computed on demand only
#
# Per edge (edge() and process()) everything is small-int arithmetic on preallocated arrays:
# no allocation. Steps (after SLAA638A): interval between edges -> classify (extra edge from
# noise/harmonics: dropped; 2..4 periods: missing edges, split; anything else one period off by
# more than `spike` of the estimate: a phase jump or glitch, rejected: a grid cannot change
# frequency that much in one cycle) -> moving average over `cycles` periods ("fast") -> low-pass
# (IIR, 1/16 per cycle, "slow") that snaps to fast when they differ by more than gate_hz, so it
# is quiet at steady state and follows a real excursion within a few cycles. ROCOF: difference of
# the mean frequency of two halves of the last `rocof_cycles` periods over their time distance.
# Comments rather than docstrings: less RAM when compiled from source.
from array import array

from agent.compat import const

# Timestamps are kept modulo 2**30 (the ticks_us period of 32-bit boards; the 64-bit unix port's
# ticks are masked to it on entry), so differences are wrap-safe and every value is a small int.
TICKS_MASK = const(0x3FFFFFFF)

_RING = const(32)   # raw timestamp ring (power of two); the task drains it every ~10-16 ms
_RMASK = const(31)
_WRAP = const(0xFFFF)  # edge counters wrap here (small ints everywhere)
_MAXREJ = const(6)  # consecutive rejected intervals before re-seeding the estimate
_MAXW = const(64)


class FreqMeter:
    def __init__(self, nominal=60, cycles=4, rocof_cycles=24, spike=0.005, gate_hz=None):
        if not 3 <= cycles <= 12 or not 8 <= rocof_cycles <= _MAXW or nominal not in (50, 60):
            raise ValueError("freqmeter: cycles 3..12, rocof_cycles 8..64, nominal 50|60")
        self.nominal = nominal
        self.nom_us = 1000000 // nominal
        self.n = cycles
        self.w2 = rocof_cycles // 2  # half window of the ROCOF estimate
        self.spike = spike
        self._spm = int(spike * 1000 + 0.5)  # per mille, an int for the per-edge path
        # gate as a fraction of the period, in Q8 us at nominal (snap threshold of the low-pass)
        # default: above the moving average's noise for +-20 us timestamp jitter (0.18 / cycles Hz)
        if gate_hz is None:
            gate_hz = 0.18 / cycles
        self.gate_q8 = int(self.nom_us * 256 * gate_hz / nominal)
        self.ts = array("i", [0] * _RING)
        self.win = array("i", [0] * cycles)   # last `cycles` accepted periods
        self.rw = array("i", [0] * (2 * self.w2))  # last 2 * w2 accepted periods (ROCOF)
        self.w = self.r = 0                    # ring write / read counters (mod _WRAP + 1)
        # counters: extra edges dropped, odd intervals rejected, edges missing, gaps (signal
        # lost), ring overflows, low-pass snaps, re-seeds after repeated rejections
        self.extra = self.rejected = self.missing = self.gaps = self.overflows = 0
        self.snaps = self.reseeds = self.steps = self.cycles = 0
        self.reset()

    def reset(self):
        # forget the signal (e.g. after a gap); counters survive
        self.valid = False
        self._have = False
        self._last = 0
        self._ref = self.nom_us
        self._spk = self.nom_us * self._spm // 1000
        self._nwin = self._iwin = self._swin = 0
        self._nr = self._ir = self._sa = self._sb = 0
        self._sq = 0
        self._rej = self._pd = self._trk = self._q = 0

    # ---- IRQ side: one rising edge at t (ticks_us). Allocation-free, hard-IRQ safe.
    def edge(self, t):
        w = self.w
        self.ts[w & _RMASK] = t & TICKS_MASK
        self.w = (w + 1) & _WRAP

    # ---- task side
    def process(self):
        w = self.w
        r = self.r
        if (w - r) & _WRAP > _RING:  # the reader fell behind: the oldest edges are gone
            self.overflows += 1
            r = (w - _RING) & _WRAP
            self._have = False
        got = 0
        while r != w:
            got += self._interval(self.ts[r & _RMASK])
            r = (r + 1) & _WRAP
        self.r = r
        return got

    # Signal lost when no accepted edge for 5 periods (call with ticks_us now, same clock).
    def expire(self, now):
        if self._have and (now - self._last) & TICKS_MASK > 5 * self._ref and \
                (now - self._last) & TICKS_MASK < 0x20000000:
            self.gaps += 1
            self.reset()
            return True
        return False

    def _interval(self, t):
        if not self._have:
            self._have = True
            self._last = t
            return 0
        d = (t - self._last) & TICKS_MASK
        ref = self._ref
        if d < ref - (ref >> 2):  # closer than 3/4 period: an extra edge (noise, harmonics)
            self.extra += 1
            return 0
        self._last = t
        k = (d + (ref >> 1)) // ref
        if k > 4:  # no edges for a while: start over
            self.gaps += 1
            self.reset()
            self._have = True
            self._last = t
            return 0
        err = d - k * ref
        if err < 0:
            err = -err
        if err > k * self._spk:  # phase jump, glitch, or a real step too large for one cycle
            self.rejected += 1
            pd = self._pd
            self._pd = d if k == 1 else 0
            if pd and k == 1 and -2 * self._spk <= d - pd <= 2 * self._spk:
                # two odd intervals in a row that agree: a step, not a one-off: jump to it
                self._rej = 0
                self._pd = 0
                self.steps += 1
                i = 0
                while i < self.n:
                    self.win[i] = pd
                    i += 1
                self._swin = pd * self.n
                self._nwin = self.n
                self._period(d)
                return 1
            self._rej += 1
            self._q = self.n  # the window now spans a gap: its noise doubles for n periods
            while k > 0 and self._nwin == self.n:  # ROCOF time axis: interpolate with the estimate
                self._rpush(ref)
                k -= 1
            if self._rej >= _MAXREJ:  # persistent: re-seed the reference on what we see
                self.reseeds += 1
                self.reset()
                self._have = True
                self._last = t
                if k == 1 and self.nom_us // 2 < d < self.nom_us * 2:
                    self._ref = d
                    self._spk = d * self._spm // 1000
            return 0
        self._rej = 0
        self._pd = 0
        if k > 1:
            self.missing += k - 1
        p = d // k
        while k > 1:  # missing edges: k periods, the sum stays exact
            self._period(p)
            d -= p
            k -= 1
        self._period(d)
        return 1

    def _period(self, p):
        n = self.n
        self.cycles = (self.cycles + 1) & 0x3FFFFFFF
        # moving window of n periods (sum is exact: consecutive periods telescope)
        i = self._iwin
        self._swin += p - (self.win[i] if self._nwin == n else 0)
        self.win[i] = p
        self._iwin = i + 1 if i + 1 < n else 0
        if self._nwin < n:
            self._nwin += 1
        self._rpush(p)
        if self._nwin < n:
            if self._nwin > 1:
                self._ref = self._swin // self._nwin
            return
        fq = (self._swin << 8) // n  # fast period, Q8 us
        if not self.valid:
            self.valid = True
            self._sq = fq
        else:
            s = self._sq
            dv = fq - s
            g = self.gate_q8
            if self._q:
                self._q -= 1
                g += g
            if dv > g or -dv > g:
                self._sq = fq
                self.snaps += 1
                self._trk = n  # follow the moving average until its window is all new
            elif self._trk:
                self._sq = fq
                self._trk -= 1
            else:
                self._sq = s + (dv >> 4) if dv >= 0 else s - ((-dv) >> 4)
        self._ref = self._sq >> 8
        self._spk = self._ref * self._spm // 1000

    def _rpush(self, p):
        # ROCOF window: rw holds 2*w2 periods; sa = older half, sb = newer half
        h = self.w2
        j = self._ir
        nr = self._nr
        if nr < 2 * h:
            if nr >= h:
                self._sb += p
            else:
                self._sa += p
            self._nr = nr + 1
        else:
            mid = j + h
            if mid >= 2 * h:
                mid -= 2 * h
            m = self.rw[mid]      # leaves the newer half, enters the older one
            self._sa += m - self.rw[j]
            self._sb += p - m
        self.rw[j] = p
        self._ir = j + 1 if j + 1 < 2 * h else 0

    # ---- results (floats: call once per control decision, not per edge)
    def hz(self):
        return 256000000.0 / self._sq if self.valid else None

    def fast_hz(self):
        return self.n * 1000000.0 / self._swin if self.valid else None

    def rocof(self):
        # Hz/s, negative when frequency falls; None until 2 * w2 periods are in
        h = self.w2
        if self._nr < 2 * h:
            return None
        sa = self._sa
        sb = self._sb
        return (h * 1000000.0 / sb - h * 1000000.0 / sa) * 2000000.0 / (sa + sb)

    def counters(self):
        return {"cycles": self.cycles, "extra": self.extra, "rejected": self.rejected,
                "missing": self.missing, "gaps": self.gaps, "overflows": self.overflows,
                "snaps": self.snaps, "steps": self.steps, "reseeds": self.reseeds}
