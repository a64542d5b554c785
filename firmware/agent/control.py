"""Load-shed control state machine: pickup, delay, trip, restore hold, min-off, staggered restore.

Pure logic in the MicroPython/CPython common subset (see docs/control.md for the full
behaviour, settings and worked examples).

Usage (control task, once per meter sample and on a 50-100 ms timer tick)::

    ctl = Controller(cfg, nblocks, persisted=journal_state_or_None)
    relays.apply(ctl.closed_mask)                 # safe state first
    ev = ctl.step(now_ms, hz, True)               # a meter sample
    ev = ctl.step(now_ms, None, False)            # a failed poll (meter silent)
    ev = ctl.step(now_ms, None, True)             # timer tick, no new sample (or ctl.tick(now_ms))
    relays.apply(ctl.closed_mask)                 # immediately after every step
    for i in range(ctl.nevents): log(EVENT_NAMES[ctl.events[i]])
    if persist_wanted(ev) ...: save(ctl.snapshot())

The hot path allocates nothing: the state is ints, bools and references to floats that
already exist; events go to a preallocated bytearray.
"""
from agent.compat import const, ticks_diff

# ---- states (Controller.state) ----
NORMAL = const(0)
PICKUP = const(1)
TRIPPED = const(2)
RESTORE_HOLD = const(3)
RESTORING = const(4)
DISARMED = const(5)
STATE_NAMES = ("normal", "pickup", "tripped", "restore_hold", "restoring", "disarmed")

# ---- trip reasons (Controller.reason / last_reason) ----
REASON_NONE = const(0)
REASON_UF = const(1)
REASON_SIGNAL = const(2)
REASON_METER_LOSS = const(3)
REASON_COMMAND = const(4)
REASON_BOOT = const(5)
REASON_NAMES = ("none", "underfrequency", "signal", "meter_loss", "command", "boot")

# ---- event codes (step() return value, Controller.events) ----
EV_NONE = const(0)
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
DISARMED_EV = const(15)
RELEASE_SEEN = const(16)
SIGNAL_ON = const(17)
SIGNAL_OFF = const(18)
EVENT_NAMES = (
    "none", "trip_uf", "trip_signal", "trip_meter_loss", "trip_command",
    "pickup_start", "pickup_cancel", "restore_hold_start", "restore_hold_reset",
    "restore_start", "restore_block", "restore_done", "meter_lost", "meter_back",
    "armed", "disarmed", "release_seen", "signal_on", "signal_off",
)
# DISARMED is both a state and an event in the brief; the event constant is DISARMED_EV,
# EVENT_DISARMED is an alias with the event-style name.
EVENT_DISARMED = DISARMED_EV

# Events after which the caller should persist snapshot() (trips, restores, release, arm state).
PERSIST_MASK = const(
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16)
)

_MAX_EVENTS = const(16)

# Fallbacks used when a key is missing from cfg (agent.config normally fills every key).
DEFAULTS = {
    "delay_ms": 0,
    "samples": 2,
    "restore_hold_s": 30.0,
    "min_off_s": 60.0,
    "release_required": False,
    "stagger_s": 5.0,
    "jitter_s": 2.0,
    "deadband_hz": 0.02,
    "meter_loss": "hold",
    "meter_loss_after_s": 5.0,
    "boot_state": "closed",
}


def persist_wanted(code):
    """True when the event `code` changes state worth persisting (snapshot())."""
    return code > 0 and (PERSIST_MASK >> code) & 1 == 1


def is_trip(code):
    return TRIP_UF <= code <= TRIP_COMMAND


def _ms(seconds):
    return int(seconds * 1000 + 0.5)


def _get(d, key, default):
    if d is None:
        return default
    v = d.get(key)
    return default if v is None else v


class Controller:
    """Under-frequency / signal / meter-loss load shed with deliberate staggered restore.

    cfg: normalized site config dict (uses "trip", "failsafe", "blocks", "nominal_hz", "device").
    nblocks: number of relay blocks driven (must equal len(cfg["blocks"]) when blocks are given).
    rand: optional callable -> float in [0, 1) for restore jitter; default is a small integer
          LCG seeded from cfg["device"] (or `seed`), identical under CPython and MicroPython.
    persisted: a dict previously returned by snapshot(); resumes a trip after a reboot.
    """

    def __init__(self, cfg, nblocks, rand=None, persisted=None, seed=None):
        trip = cfg.get("trip") or {}
        fs = cfg.get("failsafe") or {}
        blocks = cfg.get("blocks") or []
        nominal = cfg.get("nominal_hz") or 60
        if nblocks < 1 or nblocks > 30:
            raise ValueError("nblocks must be 1..30")
        if blocks and len(blocks) != nblocks:
            raise ValueError("cfg blocks (%d) != nblocks (%d)" % (len(blocks), nblocks))
        self.nblocks = nblocks
        self.all_mask = (1 << nblocks) - 1

        pickup = float(_get(trip, "pickup_hz", nominal - 0.3))
        delay_ms = int(_get(trip, "delay_ms", DEFAULTS["delay_ms"]))
        self.samples = int(_get(trip, "samples", DEFAULTS["samples"]))
        if self.samples < 1:
            self.samples = 1
        self.deadband_hz = float(_get(trip, "deadband_hz", DEFAULTS["deadband_hz"]))
        if self.deadband_hz < 0:
            raise ValueError("deadband_hz must be >= 0")
        self.restore_hz = float(_get(trip, "restore_hz", nominal - 0.05))
        self._restore_low = self.restore_hz - self.deadband_hz
        self.hold_ms = _ms(float(_get(trip, "restore_hold_s", DEFAULTS["restore_hold_s"])))
        self.min_off_ms = _ms(float(_get(trip, "min_off_s", DEFAULTS["min_off_s"])))
        self.release_required = bool(_get(trip, "release_required", DEFAULTS["release_required"]))
        self.stagger_ms = _ms(float(_get(trip, "stagger_s", DEFAULTS["stagger_s"])))
        self.jitter_ms = _ms(float(_get(trip, "jitter_s", DEFAULTS["jitter_s"])))
        if min(delay_ms, self.hold_ms, self.min_off_ms, self.stagger_ms, self.jitter_ms) < 0:
            raise ValueError("trip times must be >= 0")

        # stages: default one stage = all blocks
        stages = trip.get("stages")
        if not stages:
            stages = ({"pickup_hz": pickup, "delay_ms": delay_ms, "blocks": None},)
        n = len(stages)
        self.nstages = n
        self._st_pick = [0.0] * n
        self._st_cancel = [0.0] * n
        self._st_delay = [0] * n
        self._st_mask = [0] * n
        self._st_on = [0] * n     # picked up
        self._st_low = [0] * n    # last good sample below this stage's pickup
        self._st_count = [0] * n  # low samples since pickup (capped at samples)
        self._st_t0 = [0] * n     # pickup start, ms
        for i in range(n):
            st = stages[i]
            p = float(_get(st, "pickup_hz", pickup))
            self._st_pick[i] = p
            self._st_cancel[i] = p + self.deadband_hz
            d = int(_get(st, "delay_ms", delay_ms))
            if d < 0:
                raise ValueError("stage delay_ms must be >= 0")
            self._st_delay[i] = d
            idx = st.get("blocks")
            if idx is None:
                m = self.all_mask
            else:
                m = 0
                for b in idx:
                    if not 0 <= b < nblocks:
                        raise ValueError("stage block index out of range: %r" % (b,))
                    m |= 1 << b
            if m == 0:
                raise ValueError("stage %d sheds no block" % i)
            self._st_mask[i] = m
            if self.restore_hz < p + self.deadband_hz - 1e-9:
                raise ValueError("restore_hz must be >= pickup_hz + deadband_hz")
        self.pickup_hz = self._st_pick[0]
        self.delay_ms = self._st_delay[0]
        # plausibility window for a frequency sample (outside: counted, treated as no sample)
        self._hz_lo = nominal * 0.5
        self._hz_hi = nominal * 1.5

        mode = _get(fs, "meter_loss", DEFAULTS["meter_loss"])
        if mode not in ("hold", "shed"):
            raise ValueError("failsafe.meter_loss must be 'hold' or 'shed'")
        self.meter_loss_shed = mode == "shed"
        self.meter_loss_ms = _ms(float(_get(fs, "meter_loss_after_s", DEFAULTS["meter_loss_after_s"])))
        boot_open = _get(fs, "boot_state", DEFAULTS["boot_state"]) == "open"

        # block data: priority (lower = shed first, restored last), kW
        self.prio = [0] * nblocks
        self.kw = [0.0] * nblocks
        for i in range(nblocks):
            b = blocks[i] if blocks else {}
            self.prio[i] = int(_get(b, "priority", i))
            self.kw[i] = float(_get(b, "miners", 0)) * float(_get(b, "kw_per_miner", 0.0))
        # restore order: highest priority number first (most important loads back first),
        # ties by block index
        order = list(range(nblocks))
        order.sort(key=lambda i: (-self.prio[i], i))
        self._order = tuple(order)

        # jitter source
        self._rand = rand
        if seed is None:
            seed = 0
            for ch in str(cfg.get("device") or ""):
                seed = (seed * 31 + ord(ch)) & 0x7FFF
        self._seed = seed & 0x7FFF

        # events (preallocated)
        self.events = bytearray(_MAX_EVENTS)
        self.nevents = 0
        self.events_dropped = 0
        self._ret = 0

        # dynamic state (every attribute exists from here on: no dict growth later)
        self.closed_mask = self.all_mask
        self.shed_mask = 0         # blocks opened by the controller and not yet restored
        self.trip_mask = 0         # blocks opened by the latest trip
        self.state = NORMAL
        self._phase = TRIPPED      # TRIPPED / RESTORE_HOLD / RESTORING while shed_mask != 0
        self.armed = True
        self.reason = REASON_NONE
        self.last_reason = REASON_NONE
        self.last_stage = -1
        self.last_block = -1
        self.trip_hz = None
        self.last_hz = None
        self.signal = False
        self.released = False
        self.meter_lost = False
        self.bad_samples = 0
        self.now_ms = 0
        self._started = False
        self._good_ms = 0
        self._trip_ms = 0
        self._trip_ref_pending = False
        self._min_off_need = 0
        self._min_off_done = True
        self._hold_t0 = 0
        self._hold_done = False
        self._next_ref = 0
        self._next_wait = 0
        self._npick = 0
        self.resumed = False

        if persisted:
            self._resume(persisted)
        elif boot_open:
            self.shed_mask = self.all_mask
            self.closed_mask = 0
            self.trip_mask = self.all_mask
            self.reason = REASON_BOOT
            self.last_reason = REASON_BOOT
            self.released = True       # nothing for the utility to release after a boot
            self._min_off_need = 0
            self._min_off_done = True
            self._trip_ref_pending = True
        self._update_state()

    # ------------------------------------------------------------------ persistence
    def _resume(self, p):
        try:
            armed = p.get("armed", True)
            self.armed = armed is not False
            if not p.get("tripped"):
                return
            m = p.get("shed_mask")
            m = (m if isinstance(m, int) else 0) & self.all_mask
            if m == 0:
                m = self.all_mask
            left = p.get("min_off_left_ms")
            left = left if isinstance(left, int) else self.min_off_ms
            r = p.get("reason")
            r = r if isinstance(r, int) and 0 < r < len(REASON_NAMES) else REASON_UF
            rel = p.get("released") is True
        except Exception:  # corrupt record: conservative full trip
            m, left, r, rel = self.all_mask, self.min_off_ms, REASON_UF, False
        if left < 0:
            left = 0
        if left > self.min_off_ms:
            left = self.min_off_ms
        self.shed_mask = m
        self.closed_mask = self.all_mask & ~m
        self.trip_mask = m
        self.reason = r
        self.last_reason = r
        self.released = rel
        self._min_off_need = left
        self._min_off_done = left == 0
        self._trip_ref_pending = True
        self.resumed = True

    def min_off_left_ms(self, now_ms=None):
        if self.shed_mask == 0 or self._min_off_done:
            return 0
        if self._trip_ref_pending:
            return self._min_off_need
        if now_ms is None:
            now_ms = self.now_ms
        left = self._min_off_need - ticks_diff(now_ms, self._trip_ms)
        return left if left > 0 else 0

    def snapshot(self, now_ms=None):
        """Small dict to persist on each trip/restore (see persist_wanted())."""
        return {
            "v": 1,
            "tripped": self.shed_mask != 0,
            "reason": self.reason,
            "shed_mask": self.shed_mask,
            "min_off_left_ms": self.min_off_left_ms(now_ms),
            "released": self.released,
            "armed": self.armed,
        }

    # ------------------------------------------------------------------ events
    def _emit(self, code):
        n = self.nevents
        if n < _MAX_EVENTS:
            self.events[n] = code
            self.nevents = n + 1
        else:
            self.events_dropped += 1
        if self._ret == 0 or (TRIP_UF <= code <= TRIP_COMMAND and not TRIP_UF <= self._ret <= TRIP_COMMAND):
            self._ret = code

    def _begin(self, now_ms):
        self.nevents = 0
        self._ret = 0
        self.now_ms = now_ms
        if not self._started:
            self._started = True
            self._good_ms = now_ms
        if self._trip_ref_pending:
            self._trip_ref_pending = False
            self._trip_ms = now_ms

    def _update_state(self):
        if self.shed_mask:
            self.state = self._phase
        elif not self.armed:
            self.state = DISARMED
        elif self._npick:
            self.state = PICKUP
        else:
            self.state = NORMAL

    # ------------------------------------------------------------------ actions
    def _trip(self, now_ms, mask, reason, code):
        opened = self.closed_mask & mask
        if opened == 0:
            return False
        self.closed_mask &= ~mask
        self.shed_mask |= opened
        self.trip_mask = opened
        self.reason = reason
        self.last_reason = reason
        self._trip_ms = now_ms
        self._trip_ref_pending = False
        self._min_off_need = self.min_off_ms
        self._min_off_done = self.min_off_ms == 0
        self.released = False
        self._phase = TRIPPED
        self._hold_done = False
        self.trip_hz = self.last_hz
        # stages with nothing left to shed forget their pickup (silently)
        i = 0
        while i < self.nstages:
            if self.closed_mask & self._st_mask[i] == 0:
                if self._st_on[i]:
                    self._st_on[i] = 0
                    self._npick -= 1
                self._st_low[i] = 0
                self._st_count[i] = 0
            i += 1
        self._emit(code)
        return True

    def _cancel_pickups(self, emit):
        i = 0
        while i < self.nstages:
            if self._st_on[i]:
                self._st_on[i] = 0
                self._npick -= 1
                if emit:
                    self.last_stage = i
                    self._emit(PICKUP_CANCEL)
            self._st_low[i] = 0
            self._st_count[i] = 0
            i += 1

    def _jitter(self):
        j = self.jitter_ms
        if j <= 0:
            return 0
        if self._rand is not None:
            return int(self._rand() * j)
        s = (self._seed * 12869 + 6925) & 0x7FFF  # full-period LCG mod 2**15, small ints only
        self._seed = s
        return (s * j) >> 15

    # ------------------------------------------------------------------ the step
    def step(self, now_ms, hz, meter_ok, signal_shed=False, release=False):
        """Advance to now_ms. hz: a fresh sample (meter_ok True), or None with meter_ok False
        (failed poll) or None with meter_ok True (timer tick, no new sample).
        Returns the main event code of this step (a trip outranks others) or 0; all events of
        the step are in self.events[:self.nevents]."""
        self._begin(now_ms)

        # --- meter
        sample = False
        if meter_ok:
            if hz is not None:
                if hz == hz and self._hz_lo < hz < self._hz_hi:
                    sample = True
                else:
                    self.bad_samples += 1
                    self._stale()
        else:
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
            self._cancel_pickups(True)

        # --- utility signal and release
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

        # --- trips
        if self.signal and self.closed_mask:
            self._trip(now_ms, self.all_mask, REASON_SIGNAL, TRIP_SIGNAL)
        if self.meter_lost and self.meter_loss_shed and self.armed and self.closed_mask:
            self._trip(now_ms, self.all_mask, REASON_METER_LOSS, TRIP_METER_LOSS)
        if self.armed and self.closed_mask and not self.meter_lost:
            self._stages(now_ms, hz, sample)

        # --- restore
        if self.shed_mask:
            self._restore(now_ms, hz, sample)
        self._update_state()
        return self._ret

    def tick(self, now_ms, signal_shed=False, release=False):
        """Timer tick without a new meter sample."""
        return self.step(now_ms, None, True, signal_shed, release)

    def _stale(self):
        # a failed / implausible poll: the last low sample may no longer be trusted to end a
        # delay on a timer tick; the next good sample decides
        i = 0
        while i < self.nstages:
            self._st_low[i] = 0
            i += 1

    def _stages(self, now_ms, hz, sample):
        i = 0
        n = self.nstages
        while i < n:
            if self.closed_mask & self._st_mask[i] == 0:
                # nothing left to shed in this stage
                if self._st_on[i]:
                    self._st_on[i] = 0
                    self._npick -= 1
                self._st_low[i] = 0
                self._st_count[i] = 0
            else:
                if sample:
                    if hz < self._st_pick[i]:
                        self._st_low[i] = 1
                        if not self._st_on[i]:
                            self._st_on[i] = 1
                            self._npick += 1
                            self._st_t0[i] = now_ms
                            self._st_count[i] = 1
                            self.last_stage = i
                            self._emit(PICKUP_START)
                        elif self._st_count[i] < self.samples:
                            self._st_count[i] += 1
                    else:
                        self._st_low[i] = 0
                        if self._st_on[i] and hz > self._st_cancel[i]:
                            self._st_on[i] = 0
                            self._npick -= 1
                            self._st_count[i] = 0
                            self.last_stage = i
                            self._emit(PICKUP_CANCEL)
                if (self._st_on[i] and self._st_low[i] and self._st_count[i] >= self.samples
                        and ticks_diff(now_ms, self._st_t0[i]) >= self._st_delay[i]):
                    self._st_on[i] = 0
                    self._npick -= 1
                    self._st_count[i] = 0
                    self.last_stage = i
                    self._trip(now_ms, self._st_mask[i], REASON_UF, TRIP_UF)
            i += 1

    def _restore(self, now_ms, hz, sample):
        if not self._min_off_done and ticks_diff(now_ms, self._trip_ms) >= self._min_off_need:
            self._min_off_done = True
        ok = not self.meter_lost and not self.signal
        ph = self._phase
        if ph != TRIPPED:
            if not ok or (sample and hz < self._restore_low):
                self._phase = TRIPPED
                self._hold_done = False
                self._emit(RESTORE_HOLD_RESET)
                return
        if ph == TRIPPED:
            if ok and sample and hz >= self.restore_hz:
                self._phase = ph = RESTORE_HOLD
                self._hold_t0 = now_ms
                self._hold_done = False
                self._emit(RESTORE_HOLD_START)
            else:
                return
        if ph == RESTORE_HOLD:
            if not self._hold_done and ticks_diff(now_ms, self._hold_t0) >= self.hold_ms:
                self._hold_done = True
            if not (self._hold_done and self._min_off_done
                    and (self.released or not self.release_required)):
                return
            self._phase = ph = RESTORING
            self._next_ref = now_ms
            self._next_wait = self._jitter()
            self._emit(RESTORE_START)
        # RESTORING
        if ticks_diff(now_ms, self._next_ref) < self._next_wait:
            return
        k = 0
        while k < self.nblocks:
            b = self._order[k]
            bit = 1 << b
            if self.shed_mask & bit:
                self.shed_mask &= ~bit
                self.closed_mask |= bit
                self.last_block = b
                self._emit(RESTORE_BLOCK)
                break
            k += 1
        if self.shed_mask == 0:
            self.reason = REASON_NONE
            self._phase = TRIPPED
            self._hold_done = False
            self._emit(RESTORE_DONE)
        else:
            self._next_ref = now_ms
            self._next_wait = self.stagger_ms + self._jitter()

    # ------------------------------------------------------------------ commands
    def arm(self, now_ms):
        self._begin(now_ms)
        if not self.armed:
            self.armed = True
            self._emit(ARMED)
        self._update_state()
        return self._ret

    def disarm(self, now_ms):
        """Disarm autonomous protection (frequency and meter-loss trips). Utility signal and
        shed commands still trip; a trip in progress still restores by the normal rules."""
        self._begin(now_ms)
        if self.armed:
            self.armed = False
            self._cancel_pickups(False)
            self._emit(DISARMED_EV)
        self._update_state()
        return self._ret

    def shed(self, now_ms, mask=None, reason=REASON_COMMAND):
        """Open `mask` (default all blocks) now, e.g. for a verified shed command. Restore then
        follows the normal rules. Returns TRIP_COMMAND (or the trip code for `reason`) or 0."""
        self._begin(now_ms)
        if mask is None:
            mask = self.all_mask
        code = TRIP_COMMAND
        if reason == REASON_UF:
            code = TRIP_UF
        elif reason == REASON_SIGNAL:
            code = TRIP_SIGNAL
        elif reason == REASON_METER_LOSS:
            code = TRIP_METER_LOSS
        self._trip(now_ms, mask & self.all_mask, reason, code)
        self._update_state()
        return self._ret

    def shed_kw(self, target_kw):
        """Mask of currently closed blocks to open to shed at least target_kw: lowest priority
        number first, then the largest block first, then block index. All closed blocks when
        they cannot reach the target; 0 for target <= 0. Does not change state (see shed())."""
        if target_kw <= 0:
            return 0
        cand = [i for i in range(self.nblocks) if self.closed_mask & (1 << i)]
        cand.sort(key=lambda i: (self.prio[i], -self.kw[i], i))
        m = 0
        total = 0.0
        for i in cand:
            if total >= target_kw:
                break
            m |= 1 << i
            total += self.kw[i]
        return m

    # ------------------------------------------------------------------ introspection
    def closed(self, i):
        return (self.closed_mask >> i) & 1 == 1

    def state_name(self):
        return STATE_NAMES[self.state]
