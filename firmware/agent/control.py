# Load-shed control state machine: pickup, delay, trip, restore hold, min-off, staggered restore.
#
# Pure logic, MicroPython/CPython common subset. Behaviour, settings and worked examples:
# docs/control.md. Usage from the control task (once per meter sample, and on a 50-100 ms tick):
#
#   ctl = Controller(cfg, nblocks, persisted=saved_snapshot_or_None)
#   relays.apply(ctl.closed_mask)            # safe state first
#   ev = ctl.step(now_ms, hz, True)          # a meter sample
#   ev = ctl.step(now_ms, None, False)       # a failed poll
#   ev = ctl.step(now_ms, None, True)        # timer tick without a sample (= ctl.tick(now_ms))
#   relays.apply(ctl.closed_mask)            # immediately after every step
#   for i in range(ctl.nevents): log(EVENT_NAMES[ctl.events[i]])
#   if persist_wanted(ev): save(ctl.snapshot())
#
# The step path allocates nothing: state is ints, bools and references to floats that already
# exist (thresholds are precomputed, times are int ms); events go to a preallocated bytearray.
# Comments rather than docstrings: this module is compiled from source on 64k-heap boards.
from agent.compat import const, ticks_diff

# states (Controller.state)
NORMAL = const(0)
PICKUP = const(1)
TRIPPED = const(2)
RESTORE_HOLD = const(3)
RESTORING = const(4)
DISARMED = const(5)
STATE_NAMES = ("normal", "pickup", "tripped", "restore_hold", "restoring", "disarmed")

# trip reasons (Controller.reason, last_reason); reasons 1..4 equal their TRIP_* event code
_REASON_NONE = const(0)
REASON_UF = const(1)
REASON_SIGNAL = const(2)
REASON_METER_LOSS = const(3)
REASON_COMMAND = const(4)
REASON_BOOT = const(5)
REASON_NAMES = ("none", "underfrequency", "signal", "meter_loss", "command", "boot")

# event codes (step() result, Controller.events[:nevents])
_EV_NONE = const(0)
TRIP_UF = const(1)
TRIP_SIGNAL = const(2)
TRIP_METER_LOSS = const(3)
TRIP_COMMAND = const(4)
PICKUP_START = const(5)
PICKUP_CANCEL = const(6)
RESTORE_HOLD_START = const(7)
RESTORE_HOLD_RESET = const(8)
RESTORE_START = const(9)
RESTORE_BLOCK = const(10)
RESTORE_DONE = const(11)
METER_LOST = const(12)
METER_BACK = const(13)
ARMED = const(14)
EV_DISARMED = const(15)  # the state DISARMED is 5; this is the event
RELEASE_SEEN = const(16)
SIGNAL_ON = const(17)
SIGNAL_OFF = const(18)
EVENT_NAMES = (
    "none", "trip_uf", "trip_signal", "trip_meter_loss", "trip_command",
    "pickup_start", "pickup_cancel", "restore_hold_start", "restore_hold_reset",
    "restore_start", "restore_block", "restore_done", "meter_lost", "meter_back",
    "armed", "disarmed", "release_seen", "signal_on", "signal_off",
)
# implausible samples (Controller.bad_why, bad_counts[i]): docs/control.md, "Plausibility"
_BAD_NONE = const(0)
BAD_NAN = const(1)   # NaN or infinite
BAD_BAND = const(2)  # outside the plausible band around nominal
BAD_RATE = const(3)  # moved faster than ROCOF_MAX_HZ_S allows since the last plausible sample
BAD_UV = const(4)    # voltage below UV_BLOCK_V: the meter's frequency is not trusted
BAD_NAMES = ("none", "nan", "band", "rate", "undervoltage")
# (the band and the rate limit, BAND, ROCOF_MAX_HZ_S, RATE_SLACK_HZ: agent/control_setup.py)
UV_BLOCK_V = 40.0    # frequency blocked while phase-1 voltage (where the map has it) is below
# events after which the caller persists snapshot(): trips, restores, release, arm/disarm
_PERSIST_MASK = const(0x1CC1E)
_NEV = const(16)


def persist_wanted(code):
    return (_PERSIST_MASK >> code) & 1 == 1


def is_trip(code):
    return TRIP_UF <= code <= TRIP_COMMAND


class Controller:
    # cfg: normalized site config (uses "trip", "failsafe", "blocks", "nominal_hz", "device").
    # nblocks: relay blocks driven (== len(cfg["blocks"]) when blocks are listed).
    # rand: optional callable -> float in [0, 1) for restore jitter; default a 15-bit integer
    #   LCG seeded from cfg["device"] (or seed=), identical under CPython and MicroPython.
    # persisted: a dict from snapshot(): resumes a trip after a reboot (blocks stay open,
    #   min-off countdown restarts from the persisted remainder).
    def __init__(self, cfg, nblocks, rand=None, persisted=None, seed=None):
        # the settings (trip timers, stages, rate grid, blocks): boot-only code in its own module,
        # which the agent frees once the controller is built (agent/control_setup.py)
        from agent.control_setup import settings

        settings(self, cfg, nblocks, seed)
        am = self.all_mask
        mo = self.min_off_ms
        fs = cfg.get("failsafe") or {}
        self._rand = rand
        self.events = bytearray(_NEV)
        # dynamic state: every attribute exists from here on (no instance-dict growth later).
        # shed_mask: opened by the controller and not yet restored; trip_mask: by the last trip
        self.closed_mask = am
        self.nevents = self.events_dropped = self._ret = self.bad_samples = self.now_ms = 0
        self.bad_counts = [0] * 5  # per BAD_* reason
        self.bad_why = 0           # reason of the last sample (0: it was plausible)
        self.bad_last = 0          # reason of the last implausible sample
        self.bad_hz = None         # the last implausible value (may be NaN / inf)
        self._cell = self._raw_cell = -1  # rate grid cell of the last plausible / last in-band sample
        self._cell_ms = self._raw_ms = 0
        self.shed_mask = self.trip_mask = self.reason = self.last_reason = self._npick = 0
        self._good_ms = self._trip_ms = self._hold_t0 = self._next_ref = self._next_wait = 0
        self._min_off_need = self._last_close = 0
        self._closed_some = False  # a block came back since the last trip (stagger across pauses)
        self.last_stage = self.last_block = -1
        self.trip_hz = self.last_hz = None
        self.rocof = None  # input: ROCOF in Hz/s (local measurement, agent/features/ac_sense.py) or None
        self.signal = self.released = self.meter_lost = self._started = self._hold_done = False
        self._ref_pending = self.resumed = False  # _ref_pending: trip time taken at first step
        self._min_off_done = self.armed = True
        self.state = NORMAL
        self._phase = TRIPPED  # TRIPPED / RESTORE_HOLD / RESTORING while shed_mask != 0
        p = persisted
        if p:
            try:
                self.armed = p.get("armed") is not False
                if p.get("tripped"):
                    r = p.get("reason")
                    self._boot_trip(int(p.get("shed_mask") or am) & am or am,
                                    r if r in (1, 2, 3, 4, 5) else REASON_UF,
                                    max(0, min(int(p.get("min_off_left_ms", mo)), mo)),
                                    p.get("released") is True)
                    self.resumed = True
            except Exception:  # unreadable record: conservative full trip
                self._boot_trip(am, REASON_UF, mo, False)
                self.resumed = True
        elif fs.get("boot_state") == "open":
            # nothing for a utility to release after a boot; min-off does not apply
            self._boot_trip(am, REASON_BOOT, 0, True)
        self._update_state()

    def _boot_trip(self, m, r, left, rel):
        self.shed_mask = self.trip_mask = m
        self.closed_mask = self.all_mask & ~m
        self.reason = self.last_reason = r
        self.released = rel
        self._min_off_need = left
        self._min_off_done = left == 0
        self._ref_pending = True

    # ---- persistence
    def min_off_left_ms(self, now_ms=None):
        if not self.shed_mask or self._min_off_done:
            return 0
        if self._ref_pending:
            return self._min_off_need
        left = self._min_off_need - ticks_diff(self.now_ms if now_ms is None else now_ms, self._trip_ms)
        return left if left > 0 else 0

    def snapshot(self, now_ms=None):
        return {
            "v": 1,
            "tripped": self.shed_mask != 0,
            "reason": self.reason,
            "shed_mask": self.shed_mask,
            "min_off_left_ms": self.min_off_left_ms(now_ms),
            "released": self.released,
            "armed": self.armed,
        }

    # ---- events
    def _emit(self, code):
        n = self.nevents
        if n < _NEV:
            self.events[n] = code
            self.nevents = n + 1
        else:
            self.events_dropped += 1
        if not self._ret or (code <= TRIP_COMMAND and self._ret > TRIP_COMMAND):
            self._ret = code  # the first event, but a trip outranks everything else

    def _begin(self, now_ms):
        self.nevents = 0
        self._ret = 0
        self.now_ms = now_ms
        if not self._started:
            self._started = True
            self._good_ms = now_ms
        if self._ref_pending:
            self._ref_pending = False
            self._trip_ms = now_ms

    def _update_state(self):
        if self.shed_mask:
            self.state = self._phase
        elif not self.armed:
            self.state = DISARMED
        else:
            self.state = PICKUP if self._npick else NORMAL

    # ---- actions
    def _drop(self, i, emit):
        # forget stage i's pickup
        if self._on[i]:
            self._on[i] = 0
            self._npick -= 1
            if emit:
                self.last_stage = i
                self._emit(PICKUP_CANCEL)
        self._low[i] = 0
        self._count[i] = 0

    def _trip(self, now_ms, mask, reason):
        opened = self.closed_mask & mask
        if not opened:
            return
        self.closed_mask &= ~mask
        self.shed_mask |= opened
        self.trip_mask = opened
        self.reason = self.last_reason = reason
        self.trip_hz = self.last_hz
        self._trip_ms = now_ms
        self._ref_pending = False
        self._min_off_need = self.min_off_ms
        self._min_off_done = self.min_off_ms == 0
        self.released = self._closed_some = False
        self._phase = TRIPPED
        self._hold_done = False
        i = 0
        while i < self.nstages:
            if not self.closed_mask & self._smask[i]:
                self._drop(i, False)  # nothing left to shed in stage i
            i += 1
        self._emit(reason)  # TRIP_* code == reason for reasons 1..4

    def _stale(self):
        # failed / implausible poll: a tick may not end a delay on the old low sample
        i = 0
        while i < self.nstages:
            self._low[i] = 0
            i += 1

    def _jitter(self):
        j = self.jitter_ms
        if j <= 0:
            return 0
        if self._rand is not None:
            return int(self._rand() * j)
        self._seed = s = (self._seed * 12869 + 6925) & 0x7FFF  # full period mod 2**15
        return (s * j) >> 15

    # ---- the step
    # hz: a fresh sample with meter_ok True; None with meter_ok False = failed poll;
    # None with meter_ok True = timer tick. Returns the step's main event (a trip outranks
    # the others, otherwise the first) or 0; all of them are in events[:nevents].
    def step(self, now_ms, hz, meter_ok, signal_shed=False, release=False):
        self._begin(now_ms)
        sample = False
        if not meter_ok:
            self._stale()
        elif hz is not None:
            why = self._plausible(now_ms, hz)
            self.bad_why = why
            if not why:
                sample = True
            else:
                self.bad_samples += 1
                self.bad_counts[why] += 1
                self.bad_hz = hz
                self.bad_last = why
                self._stale()
        if sample:
            self._good_ms = now_ms
            self.last_hz = hz
            if self.meter_lost:
                self.meter_lost = False
                self._emit(METER_BACK)
        elif not self.meter_lost and ticks_diff(now_ms, self._good_ms) > self.meter_loss_ms:
            self.meter_lost = True
            self._emit(METER_LOST)
            i = 0
            while i < self.nstages:
                self._drop(i, True)
                i += 1
        if signal_shed:
            if not self.signal:
                self.signal = True
                self._emit(SIGNAL_ON)
        elif self.signal:
            self.signal = False
            self._emit(SIGNAL_OFF)
        if release and self.shed_mask and not self.released:
            self.released = True
            self._emit(RELEASE_SEEN)
        # trips
        if self.signal:
            self._trip(now_ms, self.all_mask, REASON_SIGNAL)
        if self.meter_lost and self.meter_loss_shed and self.armed:
            self._trip(now_ms, self.all_mask, REASON_METER_LOSS)
        if self.armed and self.closed_mask and not self.meter_lost:
            self._stages(now_ms, hz, sample)
        if self.shed_mask:
            self._restore(now_ms, hz, sample)
        self._update_state()
        return self._ret

    # 0 when hz is a plausible sample, else its BAD_* reason. Comparisons and small ints only:
    # no float is made here (the step path allocates nothing).
    def _plausible(self, now_ms, hz):
        if not hz == hz or hz > 1e300 or hz < -1e300:  # NaN or +-inf
            return BAD_NAN
        if not self._hz_lo < hz < self._hz_hi:
            return BAD_BAND
        v = self.volts
        if v is not None and v < UV_BLOCK_V:
            return BAD_UV
        g = self._grid
        if g is None:
            return 0
        c = 0  # this sample's cell
        n = len(g) - 1
        while c < n and hz >= g[c + 1]:
            c += 1
        ok = self._cell < 0 or ticks_diff(now_ms, self._cell_ms) > self._rate_ms or -2 <= c - self._cell <= 2
        if not ok and self._raw_cell >= 0 and ticks_diff(now_ms, self._raw_ms) <= self._rate_ms:
            ok = -2 <= c - self._raw_cell <= 2  # confirmed by the sample before: a real step
        self._raw_cell = c
        self._raw_ms = now_ms
        if not ok:
            return BAD_RATE
        self._cell = c
        self._cell_ms = now_ms
        return 0

    def tick(self, now_ms, signal_shed=False, release=False):
        return self.step(now_ms, None, True, signal_shed, release)

    def _stages(self, now_ms, hz, sample):
        i = 0
        while i < self.nstages:
            if not self.closed_mask & self._smask[i]:
                self._drop(i, False)
            else:
                if sample:
                    if self._rocof[i]:
                        r = self.rocof
                        low = r is not None and r < self._pick[i] and hz < self._below[i]
                        high = r is None or r > self._cancel[i] or hz >= self._below[i]
                    else:
                        low = hz < self._pick[i]
                        high = hz > self._cancel[i]
                    if low:
                        self._low[i] = 1
                        if not self._on[i]:
                            self._on[i] = 1
                            self._npick += 1
                            self._t0[i] = now_ms
                            self._count[i] = 1
                            self.last_stage = i
                            self._emit(PICKUP_START)
                        elif self._count[i] < self.samples:
                            self._count[i] += 1
                    else:
                        self._low[i] = 0
                        if self._on[i] and high:
                            self._drop(i, True)
                if (self._low[i] and self._on[i] and self._count[i] >= self.samples
                        and ticks_diff(now_ms, self._t0[i]) >= self._delay[i]):
                    self.last_stage = i
                    self._trip(now_ms, self._smask[i], REASON_UF)
            i += 1

    def _restore(self, now_ms, hz, sample):
        if not self._min_off_done and ticks_diff(now_ms, self._trip_ms) >= self._min_off_need:
            self._min_off_done = True
        ok = not self.meter_lost and not self.signal
        ph = self._phase
        if ph != TRIPPED and (not ok or (sample and hz < self._restore_low)):
            self._phase = TRIPPED  # dip, signal or meter lost: hold starts over
            self._hold_done = False
            self._emit(RESTORE_HOLD_RESET)
            return
        if ph == TRIPPED:
            if not (ok and sample and hz >= self.restore_hz):
                return
            self._phase = ph = RESTORE_HOLD
            self._hold_t0 = now_ms
            self._emit(RESTORE_HOLD_START)
        if ph == RESTORE_HOLD:
            if not self._hold_done and ticks_diff(now_ms, self._hold_t0) >= self.hold_ms:
                self._hold_done = True
            if not (self._hold_done and self._min_off_done and (self.released or not self.release_required)):
                return
            self._phase = RESTORING
            self._next_ref = now_ms
            self._next_wait = self._jitter()
            if self._closed_some:  # resuming after a pause: keep the stagger from the last close
                d = self.stagger_ms - ticks_diff(now_ms, self._last_close)
                if d > 0:
                    self._next_wait += d
            self._emit(RESTORE_START)
        if not sample or ticks_diff(now_ms, self._next_ref) < self._next_wait:
            return  # a block closes on a good sample only: never on a tick while the meter is silent
        k = 0
        while k < self.nblocks:
            b = self._order[k]
            if self.shed_mask & (1 << b):
                self.shed_mask &= ~(1 << b)
                self.closed_mask |= 1 << b
                self.last_block = b
                self._last_close = now_ms
                self._closed_some = True
                self._emit(RESTORE_BLOCK)
                break
            k += 1
        if self.shed_mask:
            self._next_ref = now_ms
            self._next_wait = self.stagger_ms + self._jitter()
        else:
            self.reason = 0
            self._phase = TRIPPED
            self._hold_done = False
            self._emit(RESTORE_DONE)

    # ---- commands (return the step-style main event or 0)
    def arm(self, now_ms):
        self._begin(now_ms)
        if not self.armed:
            self.armed = True
            self._emit(ARMED)
        self._update_state()
        return self._ret

    # Disarm autonomous protection (frequency and meter-loss trips). The utility signal and
    # shed() still trip; a trip in progress still restores by the normal rules.
    def disarm(self, now_ms):
        self._begin(now_ms)
        if self.armed:
            self.armed = False
            for i in range(self.nstages):
                self._drop(i, False)
            self._emit(EV_DISARMED)
        self._update_state()
        return self._ret

    # Open mask (default all blocks) now, e.g. for a verified shed command; restore follows
    # the normal rules. reason 1..4 selects the TRIP_* event.
    def shed(self, now_ms, mask=None, reason=REASON_COMMAND):
        self._begin(now_ms)
        if not 0 < reason < 5:
            reason = REASON_COMMAND
        self._trip(now_ms, self.all_mask if mask is None else mask & self.all_mask, reason)
        self._update_state()
        return self._ret

    # Mask of closed blocks to open for at least target_kw: lowest priority number first, then
    # the largest block, then index; all closed blocks when short of target. No state change.
    def shed_kw(self, target_kw):
        m = 0
        total = 0.0
        for i in sorted(range(self.nblocks), key=lambda i: (self.prio[i], -self.kw[i], i)):
            if total >= target_kw:
                break
            if self.closed_mask & (1 << i):
                m |= 1 << i
                total += self.kw[i]
        return m


# ---- shed authority: one entry per issuer (docs/control.md, "Shed authority") -------------
# The controller's own trips (frequency, ROCOF, meter loss) are the protection's entry: its
# shed_mask and restore rules. Every other source of a shed holds its own entry here: a full
# shed (a bit of held) and/or a kW target (kw[i]). The load may come back only when no entry
# holds (Agent.shed_requested() reads held: one int, no allocation) and the controller's own
# rules allow it. An entry is released by its own issuer; clearing another's needs the power
# the site config gives (authority.trusted, authority.restore_all).
I_MODBUS = const(0)     # utility Modbus map: register 10 / 12 (unauthenticated)
I_CONTACT = const(1)    # dry contact (unauthenticated)
I_HEARTBEAT = const(2)  # Modbus heartbeat lost with heartbeat_action = "shed"
_I_SCHEDULE = const(3)   # schedules (reserved for the market issue)
I_SIGNED = const(4)     # first signed issuer slot: one per (kid, "iss" label)
NSIGNED = const(8)
I_DNP3 = const(12)      # DNP3 outstation: CROB shed / release (unauthenticated, agent/features/dnp3.py)
NISSUERS = const(13)
SIGNED_MASK = const(0xFF0)


class Authority:
    # (the record in state.cbor is read back by agent/cmd_check.py load_auth, at boot only)
    def __init__(self):
        self.held = 0               # bit i: issuer i holds a full shed
        self.kw = [0.0] * NISSUERS  # issuer i's partial target in kW (0: none)
        self.ids = [None] * NSIGNED  # signed slot -> issuer id (kid length byte, kid, then the iss label)
        self.changes = 0  # bumped by every change (the agent persists when it moved)

    def active(self, i):
        return (self.held >> i) & 1 or self.kw[i] > 0

    def shed(self, i, kw=None):
        # issuer i sheds: everything (kw None) or to a kW target (0: its target withdrawn)
        if kw is None:
            if not (self.held >> i) & 1:
                self.held |= 1 << i
                self.changes += 1
        elif self.kw[i] != kw:
            self.kw[i] = float(kw)
            self.changes += 1

    def apply(self, i, shed, kw=None, full=True):
        # issuer i sheds (everything, or to kw) or releases its own entry only (its full shed
        # and/or, when kw is given, its kW target); True when the table changed
        n = self.changes
        if shed:
            self.shed(i, kw)
        else:
            self.release(1 << i, full, kw is not None)
        return self.changes != n

    def release(self, mask, full=True, kw=True):
        # release the entries (full shed and/or kW target) of the issuers in mask; True when
        # one of them was active
        was = False
        for i in range(NISSUERS):
            if (mask >> i) & 1:
                if (full and (self.held >> i) & 1) or (kw and self.kw[i] > 0):
                    was = True
                if kw:
                    self.kw[i] = 0.0
        if full:
            self.held &= ~mask
        if was:
            self.changes += 1
        return was

    def target(self):
        # the kW target the curtailer works to: the largest entry's, or None
        t = 0.0
        for k in self.kw:
            if k > t:
                t = k
        return t if t > 0 else None

    def snapshot(self):
        # [held, kW per issuer or 0 (none), signer ids or 0 (none)]: small in the common case
        return [self.held, self.kw if self.target() else 0, self.ids if self.held >> I_SIGNED or self.target() else 0]

