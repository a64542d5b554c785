# The agent: asyncio tasks wired around one control decision per meter sample.
#
# Hot path (poll task): read the meter's hot registers, decode Hz and kW, step the controller,
# apply the relay mask, record the sample. Nothing else runs between a sample arriving and a
# relay opening; console, commands, journal captures and telemetry live in other tasks and only
# set inputs that the next decision reads. (Comments, not docstrings: less RAM when compiled
# from source.)
import asyncio
import gc
import sys

from agent import control
from agent.base import BUILD, KEYS_PATH, STATE_PATH, ConsoleLines, log, read_checked, reply, unload, write_cbor_atomic
from agent.compat import const, ticks_ms, ticks_diff, ticks_add
from agent.journal import Journal
from agent.meter import MeterMap
from agent.relays import RelayBank

_TICK_MS = const(50)
_CAPTURE_PART = const(40)     # samples per capture record (400 bytes)
WDT_MS = 8000        # hardware watchdog timeout (rp2 allows at most 8388 ms)
_WDT_POLL_PERIODS = const(3)  # the poll task must finish its next cycle within 3 periods + its worst read
_KW_EVIDENCE_MS = const(3000)  # kW read at every poll this long after an opening (the reports' kW after)
_KW_RESTORE_MS = const(1000)  # one kW read this long after the last restore (the load it put back, on status)
_EVENT_HOLD_MS = const(10000)  # a frequency event lasts this long after the last sample below restore_hz or shed
_SLOW_DEFER_MAX_MS = const(60000)  # during an event slow reads wait, but one goes (kW's) this long after the last
_WDT_BOOT_MS = const(3000)    # extra allowance for the first cycle (UART/socket open, first connect)
MEM_REPLY = '\n@{"error": "MemoryError", "end": true}\n'  # a request that found no RAM
AGENT = None          # the running Agent (agent/maint.py takes it over on Ctrl-C)


def _cause(hal):
    # why the board (re)started, from the port (machine.reset_cause, or the virtual board's
    # watchdog marker): journaled with the boot record
    f = getattr(hal, "reset_cause", None)
    return f() if f else None


def _read_plan(mm, m):
    # the meter's read plan from its map, the baud rate and the site's slow cadence; the
    # module is freed after boot (the plan is plain lists)
    from agent.readplan import make

    p = make(mm, None if m["transport"] == "tcp" else m["baud"], m["slow_ms"], 10 if m["parity"] == "N" else 11)
    unload("agent.readplan")
    return p


class Agent:
    # Inputs and hooks the features set, defaulted here on the class, not per instance: an
    # attribute the site never sets costs no room in the instance's dict (a dict that grows past
    # its table reallocates it whole, which a 48wK heap may not have in one piece).
    override = None    # the override switch (agent/features/override.py)
    lockout = False    # the override's lockout holds every block open
    signal = None      # the dry contact's latch, cleared by a signed restore-all (agent/features/signals.py)
    hz_source = None   # a feature measuring the frequency itself: the poll task's hook (its ok)
    market = None      # the market feature (agent/features/market.py), when [market] is on
    econ_off = 0       # blocks economics holds open: relays = ctrl.closed_mask & ~econ_off
    seq_counters = None  # command counters survive the command-step modules being freed
    refused_at = None    # when a refused command was last journaled (rate limit)

    def __init__(self, cfg, hal, switched=None):
        global AGENT
        AGENT = self
        self.cfg = cfg
        self.hal = hal
        self.errors = {}
        self.mem_errors = 0  # MemoryErrors a task survived (@status): an int, counted without RAM
        # settings files that failed their integrity check: {file: reason}, shown in @status,
        # journaled at boot, sent with telemetry (docs/failsafes.md, "Settings integrity")
        self.integrity = None
        persisted, why = read_checked(STATE_PATH)
        if why is None and persisted is not None and not isinstance(persisted, dict):
            why = "not a state record"
        if why is not None:
            # a damaged state file: whatever it held is unknown, so boot shed (every block
            # open, full min-off, restore by the normal rules), never closed on a guess
            self.integrity = {STATE_PATH: why}
            persisted = {"tripped": True, "reason": control.REASON_BOOT, "min_off_left_ms": 1 << 30}
        elif not isinstance(persisted, dict):
            persisted = None
        why = read_checked(KEYS_PATH)[1]
        if why is not None:
            self.integrity = self.integrity or {}
            self.integrity[KEYS_PATH] = why
        tripped = bool(persisted and persisted.get("tripped"))
        # Held inputs survive a reboot: every issuer's shed not yet released (control.Authority,
        # docs/control.md "Shed authority"), a lockout in place (kept until the switch reads
        # released), and the override switch read right now.
        self.auth = au = control.Authority()
        if persisted and (persisted.get("auth") or persisted.get("cmd_shed") or persisted.get("shed_kw")):
            self.step("cmd_check", "load_auth", au, persisted)  # boot-only code, freed after
        tr = (cfg.get("authority") or {}).get("trusted") or ()
        self.trusted = ((1 << control.I_MODBUS if "modbus" in tr else 0)
                        | (1 << control.I_CONTACT if "dry_contact" in tr else 0))
        self.shed_kw = self._resume = None  # partial curtailment: kW target, persisted episode
        if persisted and persisted.get("shed_kw"):  # a kW target survives too (agent/curtail.py)
            from agent.curtail import boot_target

            boot_target(self, persisted, tripped)
        self.auth_sync()
        self._p_kw = self.shed_kw
        on, early = self.step("boot", "features", cfg)  # the sections this site runs (agent/boot.py)
        for sec in early:  # read before the relays are driven (a lockout holds them open)
            self._feature(sec).boot(self, persisted)
        hold = self.auth.held != 0 or self.lockout
        closed = cfg["failsafe"]["boot_state"] == "closed" and not tripped and not hold
        # Relays first: the safe state is set before anything else is built.
        self.relays = RelayBank(hal, cfg["blocks"], closed, self.econ_off)
        try:
            self.ctrl = control.Controller(cfg, len(cfg["blocks"]), persisted=persisted)
        except Exception:
            self.ctrl = control.Controller(cfg, len(cfg["blocks"]))
            persisted = None
        unload("agent.control_setup")  # the controller's settings code: boot only
        now = ticks_ms()
        if hold:
            self.ctrl.shed(now, None, control.REASON_SIGNAL)
        elif not closed and not tripped:
            # boot_state "open": hold the load off until the first healthy decision restores it
            self.ctrl.shed(now)
        self.relays.apply(0 if self.lockout else self.ctrl.closed_mask & ~self.econ_off)
        # Relays are safe: now load every module this site will keep resident, before the
        # long-lived buffers are allocated, so code and data do not fragment the heap.
        self.master = None
        self.recorder = None
        try:  # long-lived buffers first, while the heap is still in one piece
            from agent.journal_recorder import Recorder

            self.recorder = Recorder.from_config(cfg)
        except (ImportError, MemoryError):
            pass
        gc.collect()
        self.master = self._master()
        # [(section, its module)] imported now; main() starts them: [(section, what start() returned)]
        self.features = [(sec, self._feature(sec)) for sec in on]
        gc.collect()
        # held inputs as last persisted (authority changes, lockout): a change is persisted at once
        self._p_held = self.auth.changes | bool(persisted and persisted.get("lockout") is True) << 30
        # the clock counts as known only after a signed time from the host (agent/cmd_run.py):
        # time_off = trusted unix time - time.time(); the port's RTC default never counts
        self.time_off = None
        self.nonce = None  # the current command nonce (agent/cmd_check.py nonce_hex), single use
        jc = cfg.get("journal") or {}
        self.journal = Journal(".", seg_size=jc.get("segment_bytes", 16384), max_segs=jc.get("segments", 4),
                               clock=self.now_unix)
        self.meter_map = MeterMap(cfg["meter"]["map"])  # checked in agent/boot.py
        self.plan = _read_plan(self.meter_map, cfg["meter"])  # agent/readplan.py (docs/modbus.md)
        # the map now lives in meter_map's arrays; keep only what the host needs to name it
        cfg["meter"]["map"] = {"model": self.meter_map.model}
        self.hz = None
        self.kw = None
        self.meter_ok = False
        self.curtailer = None
        self.release = False  # one-shot: a release that satisfies trip.release_required
        self.samples = 0
        self.meter_errors = 0
        self.kw_ms = None    # when kw was last read (status: kw_age_ms, kw_stale)
        self.word_order = None  # "as mapped" after a plausible first sample, or the swap hint
        # communication quality (journaled as summaries, docs/meters.md): polls and failures in
        # the current minute, the burst in progress [start ms, first error, last error, n]
        self.q_polls = self.q_fail = 0
        self.q_t0 = ticks_ms()
        self.q_first = self.q_last = None
        self.q_burst = None
        self.q_logged = [None, None]  # when a burst start / end was last journaled
        self._mc = None
        self.started = ticks_ms()
        self.wdt = None
        m = cfg["meter"]
        # worst case of one poll cycle's reads: every request timing out on every attempt
        # (an RTU attempt that times out then listens up to another timeout for a late reply,
        # and at most 4 timeouts for a babbling line to fall silent: 6 timeouts an attempt)
        self._read_worst = (m["retries"] + 1) * 6 * m["timeout_ms"] * 2  # the frequency read + a slow one
        self.poll_due = ticks_add(now, _WDT_BOOT_MS + self._read_worst + _WDT_POLL_PERIODS * m["poll_ms"])
        boot = {"build": BUILD, "resumed_trip": tripped, "mask": self.relays.mask, "cause": _cause(hal),
                "torn": self.journal.torn, "cmd_shed": self.cmd_shed, "held": self.auth.held,
                "lockout": self.lockout}
        if switched is not None:  # a deploy/provision switch-over a reset cut short, finished at boot
            boot["switched"] = switched
        self.journal.append("boot", boot)
        if self.integrity:
            for k in self.integrity:
                log("E", "ALARM %s refused: %s" % (k, self.integrity[k]))
                self.journal.append("integrity", {"file": k, "why": self.integrity[k], "mask": self.relays.mask})
        if hold:  # the boot-time shed of a held input: journal it, persist it
            self.events(0, now)

    # ---- journal and events --------------------------------------------------------------
    def count(self, what):
        try:
            self.errors[what] = self.errors.get(what, 0) + 1
        except MemoryError:  # no RAM for a new key: the count is not lost, it is a memory error
            self.mem_errors += 1


    def events(self, ev, now):
        c = self.ctrl
        persist = self._dirty()
        for i in range(c.nevents):
            persist = persist or control.persist_wanted(c.events[i])
        if persist:
            # first, before the journal and the console: a reset from here on boots with the trip
            # (the relays opened already; a boot that does not know would close them again)
            self.persist(now)
        for i in range(c.nevents):
            code = c.events[i]
            name = control.EVENT_NAMES[code]
            self.journal.append("ctl", {"ev": name, "hz": None if c.bad_why else self.hz, "kw": self.kw, "mask": c.closed_mask,
                                        "reason": control.REASON_NAMES[c.reason]})
            log("E", "%s hz=%s kw=%s mask=%d" % (name, self.hz, self.kw, c.closed_mask))
            if control.is_trip(code) and self.recorder is not None:
                self.recorder.trigger(now)

    def persist(self, now):
        # state.cbor: the controller's snapshot (trip, min-off left, release, armed) plus the held
        # inputs; written after each trip/restore event and whenever a held input changes.
        try:  # no RAM for the record now: counted, written at the next decision (still dirty)
            s = self.ctrl.snapshot(now)
            s["cmd_shed"] = self.cmd_shed
            s["auth"] = self.auth.snapshot()
            s["lockout"] = self.lockout
            s["shed_kw"] = self._p_kw = self.shed_kw
            if self.curtailer is not None:
                s["curtail"] = self.curtailer.snapshot()
            self._p_held = self.auth.changes | self.lockout << 30
            write_cbor_atomic(STATE_PATH, s)
        except (OSError, MemoryError):
            self.count("state_write")

    def _dirty(self):
        # a held input or the kW target changed since state.cbor was written
        return self._p_held != self.auth.changes | self.lockout << 30 or self._p_kw != self.shed_kw

    # ---- control -------------------------------------------------------------------------
    def shed_requested(self):
        # Every issuer (signed commands per key, dry contact, Modbus server, heartbeat, OpenADR)
        # holds its own entry in self.auth; any full shed held is an input of the next decision.
        return self.auth.held != 0 or self.lockout

    def issue(self, i, shed, kw=None, full=True):
        # Issuer i (control.I_*) sheds (everything, or to kw) or releases its own entry (its
        # full shed and/or its kW target). Nothing here releases another issuer's entry or
        # sets the release that trip.release_required waits for. Returns True on a change.
        changed = self.auth.apply(i, shed, kw, full)
        self.auth_sync()
        return changed

    def auth_sync(self):
        self.cmd_shed = self.auth.held & control.SIGNED_MASK != 0
        self.shed_kw = self.auth.target()

    def decide(self, now, sample):
        # One control decision; relays change here and only here.
        sig = self.shed_requested()
        rel = self.release  # a release is a one-shot input: the controller latches it per trip
        self.release = False
        if sample:
            ev = self.ctrl.step(now, self.hz, self.meter_ok, sig, rel)
        else:
            ev = self.ctrl.tick(now, sig, rel)
        if self.shed_kw is not None or self.curtailer is not None:
            if self.ctrl.nevents:  # ctrl.shed() below starts a new event list: keep this one
                self.relays.apply(0 if self.lockout else self.ctrl.closed_mask & ~self.econ_off)
                self.events(ev, now)
                self.ctrl.nevents = 0  # journaled: not again below
            ev = self._partial(now) or ev
        self.relays.apply(0 if self.lockout else self.ctrl.closed_mask & ~self.econ_off)
        if self.ctrl.nevents or self._dirty():
            self.events(ev, now)
        return ev

    def _partial(self, now):
        # Partial curtailment (shed to a kW target): agent/curtail.py chooses and adjusts the
        # blocks from measured kW; it opens blocks through ctrl.shed(), so restore rules hold.
        if self.curtailer is None:
            from agent.curtail import Curtailer

            self.curtailer = Curtailer(self, self._resume, now)
            self._resume = None
        changed = self.curtailer.step(now)  # its events are journaled by decide()
        if self.shed_kw is None and self.curtailer.idle():
            self.curtailer = None
        return changed and self.ctrl.nevents and self.ctrl.events[0]

    def _master(self):
        m = self.cfg["meter"]
        if m["transport"] == "tcp":
            from agent.modbus_tcp_master import TcpMaster

            return TcpMaster(m["host"], m["port"], timeout_ms=m["timeout_ms"], retries=m["retries"])
        from agent.modbus_rtu_master import RtuMaster

        de = None
        u = (self.cfg.get("uart") or {}).get("meter") or {}
        if u.get("de") is not None:
            de = self.hal.out_pin(u["de"], 0)
        return RtuMaster(self.hal.uart("meter", m), m["baud"], timeout_ms=m["timeout_ms"],
                         retries=m["retries"], de=de)

    async def keep(self, task, ms, poll=False):
        # The control loop's tasks survive a MemoryError: the cycle it cut short is dropped,
        # counted (mem_errors in @status), the heap collected, and after ms the task begins again;
        # nothing allocated here. No relay moves for it: relays change only in a decision, and a
        # dropped cycle makes none (the tick task's decisions and the meter-loss timer go on).
        while True:
            try:
                await task()
            except MemoryError:
                self.mem_errors += 1
                gc.collect()
                if poll:  # a failed cycle, not a hung task: the watchdog's promise moves on
                    self.poll_due = ticks_add(ticks_ms(), ms + self._read_worst + _WDT_POLL_PERIODS * ms)
                await asyncio.sleep_ms(ms)

    async def poll_task(self):
        # every cycle: the hot read (frequency) -> decide; then, when due, one slow read (kW and
        # the rest, round robin; kW's read at every poll while a curtailment needs it). An RTU
        # master's transactions are driven here through its state machine: no coroutine and, in
        # steady state, no allocation per poll (docs/modbus.md "Read plan").
        m = self.cfg["meter"]
        master = self.master
        unit = m["unit"]
        mm = self.meter_map
        fn = mm.function
        rp = self.plan
        if isinstance(rp, dict):  # the rest of the plan is freed; this part kept for a restart
            self.plan = rp = (rp["hot_read"], rp["slow_reads"], rp["slow_ms"], rp["kw_read"])
        (h_addr, h_count, h_items), slow, slow_ms, kw_read = rp  # (agent/readplan.py)
        rp = None
        ns = len(slow)  # (>= 1: kW is never in the frequency read)
        k_slow = 0
        slow_due = ticks_ms()
        i_hz = mm.names.index("hz")
        i_kw = mm.names.index("kw")
        i_v = mm.names.index("v1") if mm.has("v1") else -1
        if i_v not in h_items:  # the undervoltage block, when the voltage rides the hot read
            i_v = -1
        b2b = m["poll_mode"] == "back_to_back"
        period = 0 if b2b else m["poll_ms"]
        rec_t = ticks_ms()  # back to back: the recorder still takes a sample per poll_ms
        # evidence kW (what the journal and the reports show): after an opening, kW is read at
        # every poll for _KW_EVIDENCE_MS (what the shed took off). A restore ends that; its own kW
        # read waits _KW_RESTORE_MS after the last close: restored load pulls the frequency down,
        # and the dip that may follow must meet no kW read between the frequency reads (the
        # back-to-back latency target, docs/modbus.md)
        seen_mask = self.relays.mask
        kw_until = kw_at = kw_back = ticks_ms()  # kw_back: after a failed kW read, the curtailer's wait
        kw_pend = False
        # a frequency event (a sample below restore_hz, or load shed, in the last _EVENT_HOLD_MS):
        # the bus belongs to the frequency; due slow reads wait, so a dip that follows a dip meets
        # none (the evidence reads above still go); _SLOW_DEFER_MAX_MS after the last slow read
        # one goes anyway, and it is kW's (the age of kW stays bounded in the longest event)
        ev_until = ticks_ms()
        rec = self.recorder
        ctrl = self.ctrl
        step = hasattr(master, "step")
        sleep = asyncio.sleep_ms
        while True:
            t0 = ticks_ms()
            err = None
            # j 0: the frequency read; j 1: a slow read, when one is due (after the decision)
            if self.relays.mask != seen_mask:
                opened = seen_mask & ~self.relays.mask  # closed before, open now
                seen_mask = self.relays.mask
                kw_until = ticks_add(t0, _KW_EVIDENCE_MS if opened else 0)
                kw_pend = not opened
                kw_at = ticks_add(t0, _KW_RESTORE_MS)
            due = ticks_diff(t0, slow_due)
            late = due + slow_ms >= _SLOW_DEFER_MAX_MS  # (due + slow_ms: since the last slow read)
            slow_now = due >= 0 and (late or ticks_diff(ev_until, t0) <= 0)
            last = 1 if (slow_now or (self.curtailer is not None and ticks_diff(t0, kw_back) >= 0)
                         or ticks_diff(kw_until, t0) > 0
                         or (kw_pend and ticks_diff(t0, kw_at) >= 0)) else 0
            j = 0
            while j <= last:
                if j == 0:
                    addr = h_addr
                    count = h_count
                    items = h_items
                elif slow_now:
                    if late and ticks_diff(ev_until, t0) > 0:  # held back by an event: kW's read
                        addr, count, items = kw_read
                    else:
                        addr, count, items = slow[k_slow]
                        k_slow = k_slow + 1 if k_slow + 1 < ns else 0
                    slow_due = ticks_add(t0, slow_ms)
                else:  # curtailing, or evidence after a relay change: kW alone, the smallest read
                    addr, count, items = kw_read
                    kw_pend = False
                try:
                    if step:  # (this task is the meter bus's only user)
                        try:
                            master.begin(unit, fn, addr, count)
                            w = master.step()
                            while w >= 0:
                                await sleep(w)
                                w = master.step()
                        finally:
                            master.end()
                        if w == -2:  # FAIL: every attempt failed, the error counted
                            raise master._err
                        regs = master._res
                    else:
                        regs = await master.read(unit, fn, addr, count)
                    mm.update(regs, addr, items)
                    if j:
                        kw = mm.values[i_kw]
                        if i_kw in items and kw == kw and -1e300 < kw < 1e300:  # NaN / inf never shown
                            self.kw = kw
                            self.kw_ms = ticks_ms()
                    else:
                        self.hz = mm.values[i_hz]  # checked by the controller (plausibility) below
                        if i_v >= 0:
                            ctrl.volts = mm.values[i_v]
                        self.meter_ok = True
                        self.samples += 1
                except MemoryError:  # not a meter error: the cycle is dropped (keep)
                    raise
                except Exception as e:  # ModbusError and friends: counted; the fail-safe policy decides
                    self.meter_errors += 1
                    if self.meter_errors < 4 or self.meter_errors % 200 == 0:
                        log("W", "meter: %r (errors %d)" % (e, self.meter_errors))
                    if j == 0:  # (a failed slow read leaves this cycle's frequency as it was)
                        self.meter_ok = False
                        self.hz = None
                        err = e
                        last = 0
                    else:  # and ends the evidence reads: a meter that times out kW costs no timeout per poll;
                        kw_until = t0  # a curtailment's kW read waits a slow tick
                        kw_back = ticks_add(t0, slow_ms)
                if j == 0:
                    now = ticks_ms()
                    # the frequency hook: while a feature measures the frequency itself
                    # (hz_source.ok: AC sense, role primary; it decides on its own samples) the
                    # meter's sample is a tick
                    src = self.hz_source
                    self.decide(now, src is None or not src.ok)
                    hz = self.hz
                    if ctrl.shed_mask or (hz is not None and hz < ctrl.restore_hz):
                        ev_until = ticks_add(now, _EVENT_HOLD_MS)
                    if ctrl.bad_why and self.meter_ok:  # implausible: never shown as the frequency
                        self.hz = None
                        err = control.BAD_NAMES[ctrl.bad_why]
                        if self.word_order is None or self.word_order == "as mapped":
                            self._comm().word_hint(self, mm)
                    if err is not None or self.q_burst:
                        self._comm().quality(self, now, err)
                    elif self.word_order is None:
                        self.word_order = "as mapped"
                    self.q_polls += 1
                    if rec is not None and (not b2b or ticks_diff(now, rec_t) >= m["poll_ms"]):
                        rec_t = now
                        rec.add(now, self.hz if self.hz is not None else -1.0,
                                self.kw if self.kw is not None else 0.0, self.relays.mask)
                j += 1
            left = period - ticks_diff(ticks_ms(), t0)
            if left < 0:
                left = 0
            # the watchdog promise: the next cycle ends by then, or the tick stops feeding
            self.poll_due = ticks_add(ticks_ms(), left + self._read_worst + _WDT_POLL_PERIODS * m["poll_ms"])
            await sleep(left)  # back to back: 0, a yield (the master keeps t3.5 before the next request)

    def _comm(self):
        # agent/meter_comm.py (the failure path's summaries): loaded while polls fail, freed by
        # it when they recover, so a healthy site keeps none of its code in RAM
        m = self._mc
        if m is None:
            m = self._mc = __import__("agent.meter_comm", None, None, ("quality",))
        return m

    async def tick_task(self):
        # Time-based progress (restore stagger, meter-loss timer) even when the meter is silent.
        # The watchdog is fed here and only while the poll task completes its cycles (good or
        # failed polls) on time: a hung poll task or a blocked loop lets the hardware reset.
        if self.wdt is None:  # once: a restart after a MemoryError keeps it and its counts
            self.wdt = [self.hal.wdt(WDT_MS), 0, 0, None]  # hw, feeds, starved, (unused)
        w = self.wdt
        hw = w[0]
        rec = self.recorder
        late = False
        while True:
            now = ticks_ms()
            self.decide(now, False)
            if ticks_diff(now, self.q_t0) >= 60000:  # the minute's summary (docs/meters.md)
                self._comm().minute(self, now)
            if rec is not None and rec.ready():
                try:  # one small part per tick: no window-sized allocation
                    cap = rec.capture(now, _CAPTURE_PART)
                    if cap:
                        self.journal.append("capture", cap)
                except MemoryError:
                    rec.cancel()
                    self.count("capture_mem")
            over = ticks_diff(ticks_ms(), self.poll_due)
            if over <= 0:
                hw.feed()
                w[1] += 1
                late = False
            elif not late:
                late = True
                w[2] += 1
                log("E", "watchdog: poll task overdue (%d ms): not feeding" % over)
                self.journal.append("watchdog", {"late_ms": over, "mask": self.relays.mask})
            await asyncio.sleep_ms(_TICK_MS)

    # ---- console and commands: code loaded on demand (agent/status.py, console.py,
    # journal_read.py; mac0.py, cmdcheck.py, cmdrun.py for a signed command), freed after use ----
    def console_line(self, line):
        gc.collect()  # the console module loads into a fragmented heap otherwise
        if line == "status" or line.startswith("status "):
            reply(self.status(), True)
            return
        if line[:3] == "cmd" and line[3:4] in " \t\r\v\f":  # "" (no argument) is in any str
            # a signed command (base64): only the command path loads, not the console
            out = self.signed_command(line[4:].strip(), "serial")
            if "status" in out:  # the answer carries the status, streamed (agent/status.py)
                self.step("status", "answer", self, out)
            else:
                reply(out, True)
            return
        if line[:6] == "events" and line[6:7] in " \t\r\v\f":  # read by agent/journal_read.py
            self.step("journal_read", "events", self, line[7:].strip())
            return
        self.step("console", "handle", self, line)

    async def console_task(self):
        lines = ConsoleLines(self.count)
        while True:
            line = await lines.next()
            if line.startswith("@"):
                line = line[1:]  # one copy of the line alive, not two
                try:
                    self.console_line(line)
                except MemoryError:  # the reply without RAM: a constant, nothing allocated
                    self.mem_errors += 1
                    sys.stdout.write(MEM_REPLY)
                except Exception as e:
                    self.count("console_error")
                    sys.stdout.write("\n")  # a reply cut short is a line of its own
                    reply({"error": repr(e)}, True)
                gc.collect()

    # ---- API for the feature modules (agent/features/<section>.py, agent/features/__init__.py):
    # each has start(agent) that creates its own tasks and talks to the agent only through
    # these methods and the input attributes above (hz, kw, release, lockout, override, signal,
    # hz_source, ...).
    def signed_command(self, buf, src):
        # One step per module, each freed before the next one loads (a 64 KB heap has no room
        # for the whole command path at once): the COSE_Mac0 (agent/cmd_mac0.py), the payload
        # against this board and its seq store (agent/cmd_check.py), count, journal and set the
        # inputs (agent/cmd_run.py); then one control decision. The answer of a "status" /
        # "test" command has "status": None, for the caller to fill with the status its
        # transport carries. buf: the COSE_Mac0, or (the console) its base64 text.
        c = self.step("cmd_mac0", "run", self, buf)
        if c is None:  # the console's text is not base64: not even counted as a command
            self.count("console_bad")
            return {"ok": False, "refused": "malformed"}
        if isinstance(c, str):  # refused by the MAC check: no payload to check (no module to load)
            c = "malformed" if c == "bad-alg" else c
        else:
            c = self.step("cmd_check", "run", self, c)
        c = self.step("cmd_run", "run", self, c, src)
        if c["ok"]:  # the decision runs with the command code freed
            self.decide(ticks_ms(), False)
        return c

    def now_unix(self):
        # trusted unix seconds, or None until the host's signed time arrived (docs/security.md)
        if self.time_off is None:
            return None
        import time

        return time.time() + self.time_off

    def step(self, mod, fn, *args):
        # agent.<mod>.<fn>(*args), the module loaded for this call only
        gc.collect()
        m = __import__("agent." + mod, None, None, (fn,))
        try:
            return getattr(m, fn)(*args)
        finally:
            unload("agent." + mod)

    def status(self):
        # @status: (key, value) pairs, streamed by reply() (agent/status.py)
        yield from self.step("status", "status", self)
        w = self.wdt
        yield "watchdog", w and {"feeds": w[1], "starved": w[2]}
        yield "journal", self.journal.stats()
        yield "cmd_shed", self.cmd_shed

    def _feature(self, sec):
        # the module of an optional feature: agent/features/<site.toml section>.py
        return __import__("agent.features." + sec, None, None, ("start",))

    def start_features(self):
        # start(agent) of each enabled feature: it creates its tasks and returns the object
        # whose status() @status shows under the section's name (agent/status.py)
        out = []
        for sec, mod in self.features:
            try:
                f = mod.start(self)
            except MemoryError:  # its buffers do not fit what the others left: it stays off, counted
                f = None
                self.count("features_memory")
                log("E", "no RAM to start " + sec)
            except Exception as e:  # a section it cannot run with (a key missing): off, counted; protection runs
                f = None
                self.count("feature_error")
                log("E", "ALARM %s did not start: %r" % (sec, e))
                unload("agent.features." + sec)
            if f is not None:  # None: it could not start (no RAM for its buffers) and said so
                out.append((sec, f))
        self.features = out

    async def main(self):
        asyncio.create_task(self.keep(self.tick_task, _TICK_MS))
        asyncio.create_task(self.keep(self.console_task, _TICK_MS))
        self.start_features()
        hal_task = self.hal.run()
        if hal_task is not None:
            asyncio.create_task(hal_task)
        gc.collect()
        log("I", "agent up: site=%s device=%s blocks=%d state=%s" % (
            self.cfg["site"], self.cfg["device"], len(self.cfg["blocks"]), control.STATE_NAMES[self.ctrl.state]))
        await self.keep(self.poll_task, self.cfg["meter"]["poll_ms"], True)


def run(cfg=None, errors=None, chash=None, switched=None):
    # main.py loads and checks the config first (agent/boot.py) while the heap is empty
    global AGENT
    from agent import hal as halmod

    if errors is None:
        from agent.boot import load_config

        cfg, errors, chash = load_config()
        unload("agent.boot")
    if errors:
        from agent.refused import refuse_forever

        asyncio.run(refuse_forever(errors, chash))
        return
    hal = halmod.load(cfg.get("board"))
    errors = (tuple(sys.modules), cfg["meter"]["map"])  # Agent() replaces the map with its arrays
    try:
        agent = Agent(cfg, hal, switched)
    except MemoryError:
        # the optional features' code took the RAM protection needs (docs/failsafes.md, "A
        # feature without RAM"): built again without them (agent/boot.py)
        agent = AGENT = None  # the half-built agent and what it loaded: garbage now
        for n in list(sys.modules):
            if n not in errors[0]:
                unload(n)
        cfg["meter"]["map"] = errors[1]
        gc.collect()
        from agent.boot import rebuild

        agent = rebuild(Agent, cfg, hal, switched)
        unload("agent.boot")
    errors = None
    agent.config_hash = chash
    gc.collect()
    asyncio.run(agent.main())

