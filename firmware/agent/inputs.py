"""Debounced digital inputs: the utility's dry contact and the technician's override switch.

Debounced / ShedSignal / Override are pure logic: the caller samples the pin and passes the
level with the time; a change counts only after it has been stable for debounce_ms, so contact
bounce and induced spikes never reach the control decision. boot_override() and run() wire them
to the agent (loaded only when the dry contact or the override is enabled).
"""
from agent.compat import ticks_diff

INPUT_MS = 10  # the input task's sampling period


class Debounced:
    # initial: the level assumed before the first sample (-1 = unknown: the first reading is
    # debounced like a change). state: the debounced "asserted" to start from.
    def __init__(self, debounce_ms=50, active=1, initial=0, state=False):
        self.debounce_ms = debounce_ms
        self.active = active
        self.state = state          # debounced "asserted"
        self._raw = initial
        self._since = None
        self.changes = 0
        self.bounces = 0

    def sample(self, now_ms, level):
        """Feed one reading; returns True when the debounced state changed."""
        if level != self._raw:
            if self._since is not None:
                self.bounces += 1
            self._raw = level
            self._since = now_ms
            return False
        if self._since is None:
            return False
        if ticks_diff(now_ms, self._since) < self.debounce_ms:
            return False
        self._since = None
        asserted = level == self.active
        if asserted != self.state:
            self.state = asserted
            self.changes += 1
            return True
        return False


class ShedSignal:
    """Utility dry contact -> (signal_shed, release) for the controller.

    mode "level": shed while asserted; its de-assertion is the release.
    mode "edge": an assertion latches the shed; only a release (command / Modbus register)
    clears it, for programs where the utility pulses the contact.
    """

    def __init__(self, mode="level", debounce_ms=50, active=1):
        self.mode = mode
        self.input = Debounced(debounce_ms, active)
        self.latched = False

    def sample(self, now_ms, level):
        changed = self.input.sample(now_ms, level)
        if changed and self.input.state and self.mode == "edge":
            self.latched = True
        return changed

    def shed(self):
        return self.input.state if self.mode == "level" else self.latched

    def clear(self):
        self.latched = False


class Override:
    """The technician's override switch (docs/failsafes.md, site-config [override]).

    mode "lockout": while asserted every block is held open and nothing restores it (no
    automatic restore, no restore command); its release lets the normal restore rules run.
    mode "shed": an assertion is a local manual shed of every block (a trip); restore then
    follows the normal rules whatever the switch does afterwards.
    asserted: the state to start from (the pin read at boot, or a lockout persisted across a
    reboot); the first samples confirm or clear it after debounce_ms.
    """

    def __init__(self, mode="lockout", debounce_ms=50, active=0, asserted=False, pin=None):
        self.mode = mode
        self.input = Debounced(debounce_ms, active, -1, asserted)
        self.pin = pin
        self.own = False  # a lockout opened the blocks itself (no trip was in progress)

    def sample(self, now_ms, level):
        return self.input.sample(now_ms, level)

    def on(self):
        return self.input.state

    def lockout(self):
        return self.mode == "lockout" and self.input.state


def boot_override(cfg, hal, persisted):
    # At boot, before the relays are driven: the switch as read now, or a lockout persisted in
    # state.cbor (kept until the switch reads released, so a reboot never re-energises a load a
    # technician locked out, even before the first debounced reading).
    ov = cfg["override"]
    pin = hal.in_pin(ov["pin"], pull_up=not ov["active"])
    on = pin.value() == ov["active"]
    if ov["mode"] == "lockout" and persisted and persisted.get("lockout") is True:
        on = True
    o = Override(ov["mode"], cfg["signals"]["debounce_ms"], ov["active"], on, pin)
    o.own = on and not (persisted and persisted.get("tripped"))
    return o


async def run(a):
    # The agent's input task: sample every INPUT_MS, hand debounced changes to the decision.
    import asyncio
    from agent.base import log
    from agent.compat import ticks_ms

    from agent.control import I_CONTACT

    s = a.cfg["signals"]
    pin = None
    if s.get("dry_contact"):
        a.signal = sig = ShedSignal(s["mode"], s["debounce_ms"], s["dry_contact_active"])
        pin = a.hal.in_pin(s["dry_contact_pin"], pull_up=not s["dry_contact_active"])
        if a.auth.held >> I_CONTACT & 1:  # held before a reboot: the first readings confirm it
            sig.input.state = sig.latched = True
            sig.input._raw = -1
    ov = a.override
    while True:
        now = ticks_ms()
        if pin is not None and a.signal.sample(now, pin.value()):
            on = a.signal.input.state
            a.journal.append("signal", {"src": "dry_contact", "on": on})
            log("E", "dry contact %s" % ("asserted" if on else "released"))
            # the contact's own entry: asserted sheds; in "level" mode its release releases it
            # (in "edge" mode only a signed restore-all, or a trusted Modbus release, clears it).
            # Unauthenticated: it satisfies trip.release_required only if authority.trusted says so.
            if on:
                a.issue(I_CONTACT, True)
            elif s["mode"] == "level":
                a.issue(I_CONTACT, False)
                if a.trusted >> I_CONTACT & 1:
                    a.release = True
            a.decide(now, False)
        if ov is not None and ov.sample(now, ov.pin.value()):
            override_changed(a, now, log)
        await asyncio.sleep_ms(INPUT_MS)


def override_changed(a, now, log):
    ov = a.override
    on = ov.on()
    a.journal.append("override", {"mode": ov.mode, "on": on, "mask": a.relays.mask})
    log("E", "override (%s) %s" % (ov.mode, "asserted" if on else "released"))
    if ov.mode == "lockout":
        if on:
            ov.own = a.ctrl.shed_mask == 0
        elif ov.own:
            a.release = True  # the lockout's own shed needs no utility release
        a.lockout = on
        a.decide(now, False)  # held open / restore rules resume; persisted (a held input)
    elif on:
        # "shed": a local manual trip of every block; restore follows the normal rules
        from agent.control import REASON_COMMAND

        ev = a.ctrl.shed(now, None, REASON_COMMAND)
        a.relays.apply(0 if a.lockout else a.ctrl.closed_mask)
        if a.ctrl.nevents:
            a.events(ev, now)


def start(a):
    import asyncio

    asyncio.create_task(run(a))
