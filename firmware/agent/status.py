# The status (console @status, and the answer of a signed "status" / "test" command on the
# console), loaded per request and freed after it: (key, value) pairs made one at a time and
# streamed, so no dict of the whole status is ever in RAM. Agent.status adds the agent's own
# (override, watchdog, journal, cmd_shed).
import gc

from agent import control
from agent.app import BUILD
from agent.compat import ticks_ms, ticks_diff


def status(a):
    # (key, value) pairs: reply() streams them; dict(status(a)) where a dict is needed
    c = a.ctrl
    yield "build", BUILD
    yield "site", a.cfg["site"]
    yield "device", a.cfg["device"]
    yield "board", a.cfg["board"]
    yield "state", control.STATE_NAMES[c.state]
    yield "reason", control.REASON_NAMES[c.reason]
    yield "armed", c.armed
    yield "hz", a.hz
    yield "kw", a.kw
    yield "meter_ok", a.meter_ok
    yield "mask", a.relays.mask
    yield "blocks", [b["name"] for b in a.cfg["blocks"]]
    yield "samples", a.samples
    yield "meter_errors", a.meter_errors
    yield "transitions", a.relays.transitions
    yield "uptime_ms", ticks_diff(ticks_ms(), a.started)
    yield "errors", a.errors
    yield "journal_seq", a.journal.seq
    yield "mem_free", gc.mem_free()
    yield "signal", a.cmd_shed or (a.signal is not None and a.signal.shed())
    yield "min_off_left_ms", c.min_off_left_ms()
    yield "config_hash", getattr(a, "config_hash", None)
    yield "integrity", a.integrity  # {file: reason} of a refused state/keys file, else None
    if a.master is not None:
        yield "modbus", a.master.counters()
    if a.seq_counters is not None:
        yield "commands", a.seq_counters
    # optional features' counters, when the site runs them
    u = getattr(a, "utility", None)
    if u is not None:
        yield "utility", {"requests": u.requests, "exceptions": u.exceptions, "bad": u.bad,
                          "heartbeat_losses": u.hb_losses, "commands": u.commands}
    f = getattr(a, "fleet", None)
    if f is not None:
        yield "mqtt", f.client.stats()
    f = getattr(a, "freq", None)
    if f is not None:
        yield "ac_sense", f.status()
    if a.shed_kw is not None or a.curtailer is not None:
        yield "shed_kw", a.shed_kw
        if a.curtailer is not None:
            yield "curtail", a.curtailer.status()
    if getattr(a, "miners", None) is not None:
        yield "miners", a.miners.status()


def answer(a, out):
    # A signed "status" / "test" command's answer on the console, its "status" the console's
    # status streamed like @status's (no dict of it in RAM).
    import json
    import sys

    w = sys.stdout.write
    w('@{"status": {')
    sep = ""
    for k, v in status(a):
        w(sep)
        w(json.dumps(k))
        w(": ")
        json.dump(v, sys.stdout)
        sep = ", "
    w("}, ")
    del out["status"]
    for k in out:
        w(json.dumps(k))
        w(": ")
        json.dump(out[k], sys.stdout)
        w(", ")
    w('"end": true}\n')


