# Console verbs and signed commands, loaded when a request arrives and freed after it.
#
# The agent's steady state holds only the hot path in RAM; a technician's @status or a signed
# command costs a module load (milliseconds) and nothing while idle. Commands only set inputs
# (cmd_shed, release, arm/disarm) and then run one control decision, so relays still change in
# one place. Line protocol: docs/architecture.md.
import gc

from agent import control
from agent.app import KEYS_PATH, SEQ_PATH, BUILD, read_cbor, reply, log, unload
from agent.compat import ticks_ms, ticks_diff


def status(a):
    c = a.ctrl
    st = {
        "build": BUILD, "site": a.cfg["site"], "device": a.cfg["device"],
        "board": a.cfg["board"], "state": control.STATE_NAMES[c.state],
        "reason": control.REASON_NAMES[c.reason], "armed": c.armed,
        "hz": a.hz, "kw": a.kw, "meter_ok": a.meter_ok, "mask": a.relays.mask,
        "blocks": [b["name"] for b in a.cfg["blocks"]], "samples": a.samples,
        "meter_errors": a.meter_errors, "transitions": a.relays.transitions,
        "uptime_ms": ticks_diff(ticks_ms(), a.started), "errors": a.errors,
        "journal_seq": a.journal.seq, "mem_free": gc.mem_free(),
        "signal": a.cmd_shed or (a.signal is not None and a.signal.shed()),
        "min_off_left_ms": c.min_off_left_ms(),
        "config_hash": getattr(a, "config_hash", None),
    }
    if a.master is not None:
        st["modbus"] = a.master.counters()
    if a.seq_counters is not None:
        st["commands"] = a.seq_counters
    # optional features' counters, when the site runs them
    u = getattr(a, "utility", None)
    if u is not None:
        st["utility"] = {"requests": u.requests, "exceptions": u.exceptions, "bad": u.bad,
                         "heartbeat_losses": u.hb_losses, "commands": u.commands}
    f = getattr(a, "fleet", None)
    if f is not None:
        st["mqtt"] = f.client.stats()
    f = getattr(a, "freq", None)
    if f is not None:
        st["ac_sense"] = f.status()
    if a.shed_kw is not None or a.curtailer is not None:
        st["shed_kw"] = a.shed_kw
        if a.curtailer is not None:
            st["curtail"] = a.curtailer.status()
    if getattr(a, "miners", None) is not None:
        st["miners"] = a.miners.status()
    return st


def command(a, buf, src):
    # Verify, journal (accepted or refused, with why), then set inputs for the next decision.
    from agent.commands import CommandVerifier, CommandRefused, FileSeqStore

    keys = read_cbor(KEYS_PATH)
    if not isinstance(keys, dict):
        keys = {}
    v = CommandVerifier(keys, a.cfg["device"], a.cfg["site"], FileSeqStore(SEQ_PATH))
    if a.seq_counters is not None:
        for k in a.seq_counters:
            v.counters[k] = a.seq_counters[k]
    try:
        try:
            c = v.verify(buf, a.hal.wall_time())
        except CommandRefused as e:
            # journaled from a bucket of 20 that refills one a second (all are counted): a
            # flood of forgeries must not rotate real evidence out of the journal
            now = ticks_ms()
            last, tokens = a.refused_at or (now, 20)
            tokens = min(20, tokens + ticks_diff(now, last) // 1000)
            if tokens > 0:
                a.refused_at = (now, tokens - 1)
                a.journal.append("cmd_refused", {"src": src, "why": e.reason})
                log("W", "command refused (%s): %s" % (src, e.reason))
            else:
                a.refused_at = (last, 0)
                a.count("cmd_refused_unjournaled")
            return {"ok": False, "refused": e.reason}
    finally:
        a.seq_counters = v.counters
        unload("agent.commands")
        unload("agent.cose")
    cmd = c["cmd"]
    now = ticks_ms()
    a.journal.append("cmd", {"src": src, "cmd": cmd, "seq": c["seq"]})
    log("E", "command %s seq=%d (%s)" % (cmd, c["seq"], src))
    if cmd == "shed":
        if "kw" in c:
            a.shed_kw = c["kw"]  # partial: agent/curtail.py sheds blocks to this kW target
        else:
            a.cmd_shed = True
    elif cmd == "restore":
        a.cmd_shed = False
        a.shed_kw = None
        a.release = True
        if a.signal is not None:
            a.signal.clear()
    elif cmd == "arm" or cmd == "disarm":
        ev = a.ctrl.arm(now) if cmd == "arm" else a.ctrl.disarm(now)
        if a.ctrl.nevents:
            a.events(ev, now)
    a.decide(now, False)
    out = {"ok": True, "cmd": cmd, "seq": c["seq"]}
    if cmd == "status" or cmd == "test":
        out["status"] = status(a)
    return out


def handle(a, line):
    try:
        _handle(a, line)
    finally:
        unload("agent.journal_read")  # the read side of the journal, loaded by @events/@config


def _handle(a, line):
    parts = line.split(None, 1)
    verb = parts[0] if parts else ""
    arg = parts[1].strip() if len(parts) > 1 else ""
    if verb == "status":
        reply(status(a), True)
    elif verb == "events":
        from agent.journal import jsonable

        since = int(arg) if arg.isdigit() else 0
        n = 0
        for rec in a.journal.read(since):
            reply({"rec": jsonable(rec)}, False)
            n += 1
            if n % 8 == 0:
                gc.collect()
        reply({"ok": True, "count": n, "read_errors": a.journal.read_errors}, True)
    elif verb == "config":
        # written a section at a time: no copy of the config, no whole-reply string
        import json
        import sys

        w = sys.stdout.write
        w('@{"config": {')
        sep = ""
        for k in a.cfg:
            w(sep)
            w(json.dumps(k))
            w(": ")
            try:
                w(json.dumps(a.cfg[k]))
            except TypeError:  # a value JSON cannot carry (bytes): named, not dropped silently
                w('"<binary>"')
            sep = ", "
        w('}, "end": true}\n')
    elif verb == "cmd":
        import binascii

        try:
            buf = binascii.a2b_base64(arg)
        except Exception:
            a.count("console_bad")
            reply({"ok": False, "refused": "malformed"}, True)
            return
        reply(command(a, buf, "serial"), True)
    else:
        a.count("console_bad")
        reply({"error": "unknown verb"}, True)
