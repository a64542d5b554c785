# The technician's override switch (site.toml [override]; docs/failsafes.md): "lockout" holds
# every block open while asserted, "shed" is a local manual trip. boot() reads the switch before
# the relays are driven (a lockout, or one persisted in state.cbor, holds the load off from the
# first relay write); start() samples it every INPUT_MS, debounced (Override, below).
import asyncio

from agent.base import log
from agent.compat import ticks_ms
from agent.inputs import Debounced

INPUT_MS = 10  # sampling period


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

    def status(self):
        # @status "override"
        return {"mode": self.mode, "on": self.input.state, "changes": self.input.changes}


def boot(a, persisted):
    # the switch as read now, or a lockout persisted in state.cbor (kept until the switch reads
    # released, so a reboot never re-energises a load a technician locked out, even before the
    # first debounced reading). Sets the agent's lockout input.
    cfg = a.cfg
    ov = cfg["override"]
    pin = a.hal.in_pin(ov["pin"], pull_up=not ov["active"])
    on = pin.value() == ov["active"]
    if ov["mode"] == "lockout" and persisted and persisted.get("lockout") is True:
        on = True
    o = Override(ov["mode"], cfg["signals"]["debounce_ms"], ov["active"], on, pin)
    o.own = on and not (persisted and persisted.get("tripped"))
    a.override = o
    a.lockout = o.lockout()


async def run(a):
    ov = a.override
    pin = ov.pin
    while True:
        now = ticks_ms()
        if ov.sample(now, pin.value()):
            changed(a, now)
        await asyncio.sleep_ms(INPUT_MS)


def changed(a, now):
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
    asyncio.create_task(a.keep(lambda: run(a), INPUT_MS))  # (a MemoryError: counted, begun again)
    return a.override
