# The status (console @status, and the answer of a signed "status" / "test" command on the
# console), loaded per request and freed after it: (key, value) pairs made one at a time and
# streamed, so no dict of the whole status is ever in RAM. Agent.status adds the agent's own
# (watchdog, journal, cmd_shed).
import gc

from agent import control
from agent.base import BUILD
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
    yield from _meter(a, c)  # a function of its own: two smaller bytecode blobs to load
    yield "mask", a.relays.mask
    yield "blocks", [b["name"] for b in a.cfg["blocks"]]
    yield "samples", a.samples
    yield "meter_errors", a.meter_errors
    yield "transitions", a.relays.transitions
    yield "uptime_ms", ticks_diff(ticks_ms(), a.started)
    yield "errors", a.errors
    yield "mem_errors", a.mem_errors  # MemoryErrors the agent's tasks survived (counted, never a crash)
    yield "journal_seq", a.journal.seq
    yield "mem_free", gc.mem_free()
    yield "signal", a.auth.held != 0  # some issuer holds a shed (held: which)
    yield "held", holders(a.auth)
    yield "time_trusted", a.time_off is not None  # a signed time received (docs/security.md)
    yield "min_off_left_ms", c.min_off_left_ms()
    yield "config_hash", getattr(a, "config_hash", None)
    yield "integrity", a.integrity  # {file: reason} of a refused state/keys file, else None
    if a.master is not None:
        yield "modbus", a.master.counters()
    if a.seq_counters is not None:
        yield "commands", a.seq_counters
    if a.shed_kw is not None or a.curtailer is not None:
        yield "shed_kw", a.shed_kw
        if a.curtailer is not None:
            yield "curtail", a.curtailer.status()
    # each running feature under its site.toml section (agent/features/)
    for sec, f in a.features:
        yield sec, f.status()


def _meter(a, c):
    # always valid JSON: a value that is not a finite number is null with a reason
    yield "hz", _num(a.hz)
    yield "kw", _num(a.kw)
    yield "meter_ok", a.meter_ok
    age = None if a.kw_ms is None else ticks_diff(ticks_ms(), a.kw_ms)
    yield "kw_age_ms", age
    # kW is stale when the meter is not answering (or never did): shown, never taken as current
    yield "kw_stale", not a.meter_ok or age is None
    bad = c.bad_counts
    n = control.BAD_NAMES
    d = {"total": c.bad_samples, "now": c.bad_why != 0, "last": None}
    for i in (1, 2, 3, 4):
        d[n[i]] = bad[i]
    v = c.bad_hz
    if v is not None:  # the last implausible value (null with "value" when not a number)
        d["last"] = {"hz": _num(v), "why": n[c.bad_last], "value": "nan" if v != v else ("inf" if _num(v) is None else None)}
    yield "implausible", d
    yield "word_order", a.word_order
    b = a.q_burst  # failed polls this minute, the first and last error, the burst in progress
    yield "meter_comm", {"polls": a.q_polls, "failed": a.q_fail, "first": a.q_first, "last": a.q_last,
                         "burst": b and b[3]}


def _num(v):
    # a finite number, else None (NaN and inf are not JSON)
    if v is None or v != v or v > 1e300 or v < -1e300:
        return None
    return v


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




def holders(au):
    # the issuers with an active entry in the shed authority (docs/control.md "Shed authority"):
    # "modbus", "dry_contact", "heartbeat", "schedule", "signed:<kid hex>[#iss]", "dnp3"
    from agent.control import I_SIGNED, NISSUERS, NSIGNED

    out = []
    for i in range(NISSUERS):
        if au.active(i):
            if i < I_SIGNED or i >= I_SIGNED + NSIGNED:
                out.append(("modbus", "dry_contact", "heartbeat", "schedule")[i] if i < I_SIGNED else "dnp3")
            else:
                v = au.ids[i - I_SIGNED] or b"\0"
                n = v[0] + 1  # kid bytes (any value) then the label (checked UTF-8 without "#")
                try:
                    iss = v[n:].decode()
                except UnicodeError:
                    iss = "?"
                out.append("signed:" + ("".join("%02x" % b for b in v[1:n]) or "?") + ("#" + iss if iss else ""))
    return out
