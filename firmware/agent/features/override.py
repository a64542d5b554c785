# The technician's override switch (site.toml [override]; docs/failsafes.md): "lockout" holds
# every block open while asserted, "shed" is a local manual trip. boot() reads the switch before
# the relays are driven (a lockout, or one persisted in state.cbor, holds the load off from the
# first relay write); start() samples it every INPUT_MS, debounced (agent/inputs.py Override).
import asyncio

from agent.base import log
from agent.compat import ticks_ms
from agent.inputs import Override

INPUT_MS = 10  # sampling period


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
    asyncio.create_task(run(a))
    return a.override
