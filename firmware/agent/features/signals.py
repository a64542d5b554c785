# The utility's dry contact (site.toml [signals], dry_contact = true): a shed input sampled every
# INPUT_MS, debounced (agent/inputs.py ShedSignal), handed to the control decision as the
# contact's own entry in the shed authority (docs/control.md "Shed authority").
import asyncio

from agent.base import log
from agent.compat import ticks_ms
from agent.control import I_CONTACT
from agent.inputs import ShedSignal

INPUT_MS = 10  # sampling period


async def run(a, pin):
    sig = a.signal
    level = a.cfg["signals"]["mode"] == "level"
    while True:
        now = ticks_ms()
        if sig.sample(now, pin.value()):
            on = sig.input.state
            a.journal.append("signal", {"src": "dry_contact", "on": on})
            log("E", "dry contact %s" % ("asserted" if on else "released"))
            # the contact's own entry: asserted sheds; in "level" mode its release releases it (in
            # "edge" mode only a signed restore-all, or a trusted Modbus release, clears it).
            # Unauthenticated: it satisfies trip.release_required only if authority.trusted says so.
            if on:
                a.issue(I_CONTACT, True)
            elif level:
                a.issue(I_CONTACT, False)
                if a.trusted >> I_CONTACT & 1:
                    a.release = True
            a.decide(now, False)
        await asyncio.sleep_ms(INPUT_MS)


def start(a):
    s = a.cfg["signals"]
    # agent.signal: the latch a signed restore-all clears (agent/cmd_run.py); its status() is @status "signals"
    a.signal = sig = ShedSignal(s["mode"], s["debounce_ms"], s["dry_contact_active"])
    pin = a.hal.in_pin(s["dry_contact_pin"], pull_up=not s["dry_contact_active"])
    if a.auth.held >> I_CONTACT & 1:  # held before a reboot: the first readings confirm it
        sig.input.state = sig.latched = True
        sig.input._raw = -1
    asyncio.create_task(a.keep(lambda: run(a, pin), INPUT_MS))  # (a MemoryError: counted, begun again)
    return sig
