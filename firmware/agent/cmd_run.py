# Signed commands, the agent's last step (after agent.cmd_mac0 and agent.cmd_check): write the new
# seq marks of an accepted command, count, journal (accepted or refused, with why), then set the
# inputs of the control decision that the caller runs next, which is where relays change.
# Loaded for that step and freed after it (Agent.signed_command).
# (Comments, not docstrings: less RAM when this is compiled from source.)
import os

from agent import cbor


def run(a, c, src):
    # c: what agent.cmd_check.run returned, (the command, new seq marks) or why it is refused
    from agent.base import SEQ_PATH, log
    from agent.compat import ticks_ms, ticks_diff

    if isinstance(c, tuple):  # accepted: the marks are persisted before anything else
        try:
            save(SEQ_PATH, c[1])
            c = c[0]
        except Exception:
            c = "store-error"
    n = a.seq_counters  # kept by the agent: this module is freed after each command
    if n is None:  # the status "commands" counters: accepted and agent.cmd_api.REASONS
        n = a.seq_counters = {"accepted": 0, "malformed": 0, "unknown-kid": 0, "bad-mac": 0,
                              "bad-cmd": 0, "wrong-target": 0, "expired": 0, "stale": 0, "replay": 0,
                              "store-error": 0, "forbidden": 0}
    now = ticks_ms()
    if isinstance(c, str):
        n[c] += 1
        # journaled from a bucket of 20 that refills one a second (all are counted): a flood
        # of forgeries must not rotate real evidence out of the journal
        last, tokens = a.refused_at or (now, 20)
        tokens = min(20, tokens + ticks_diff(now, last) // 1000)
        if tokens > 0:
            a.refused_at = (now, tokens - 1)
            a.journal.append("cmd_refused", {"src": src, "why": c})
            log("W", "command refused (%s): %s" % (src, c))
        else:
            a.refused_at = (last, 0)
            a.count("cmd_refused_unjournaled")
        return {"ok": False, "refused": c}
    cmd = c["cmd"]
    kid = c["kid"]
    iss = c.get("iss")
    iid = bytes((len(kid),)) + kid + (iss.encode() if iss else b"")  # this signer's issuer entry: len, kid, label
    if c.get("all"):
        ra = (a.cfg.get("authority") or {}).get("restore_all", ["*"])
        if cmd != "restore" or iss is not None or not ("*" in ra or _hex(kid) in ra):
            n["forbidden"] += 1
            a.journal.append("cmd_refused", {"src": src, "why": "forbidden", "seq": c["seq"]})
            log("W", "command refused (%s): forbidden" % src)
            return {"ok": False, "refused": "forbidden"}
    if "nonce" in c:
        a.nonce = None  # used: the next command needing one asks for a new one
    if cmd == "time":  # the host's signed time: the board's clock is trusted from now on
        import time

        w = a.hal.wall_time()  # NTP / RTC: only a sanity bound, and only once it looks set
        if w is not None and w > RTC_FLOOR and abs(w - c["t"]) > TIME_SKEW_S:
            n["stale"] += 1
            a.journal.append("cmd_refused", {"src": src, "why": "time-skew", "seq": c["seq"], "t": c["t"]})
            return {"ok": False, "refused": "time-skew"}
        was = a.now_unix()
        a.time_off = c["t"] - time.time()
        a.journal.append("time", {"t": c["t"], "was": was, "src": src})
    n["accepted"] += 1
    a.journal.append("cmd", {"src": src, "cmd": cmd, "seq": c["seq"], "by": _hex(kid) + ("#" + iss if iss else "")})
    log("E", "command %s seq=%d (%s)" % (cmd, c["seq"], src))
    if cmd == "shed":
        # everything, or partial: agent/curtail.py sheds blocks to the largest kW target held
        a.issue(slot(a.auth, iid), True, c.get("kw"))
    elif cmd == "restore":
        if c.get("all"):  # every issuer's entry, the dry contact's latch, a heartbeat-loss shed
            a.auth.release(-1)
            a.auth_sync()
            if a.signal is not None:
                a.signal.clear()
        else:  # this signer's own entry only
            i = slot(a.auth, iid, False)
            if i >= 0:
                a.issue(i, False, 0)
        a.release = True  # authenticated: satisfies trip.release_required
    elif cmd == "schedule":  # the market feature takes it, or says why not (docs/market.md)
        mk = a.market
        why = "no-market" if mk is None or mk.m is None else mk.schedule(c["sid"], c["iv"], src, c.get("ts"))
        if why is not None:
            return {"ok": False, "refused": why, "seq": c["seq"]}
    elif cmd == "arm" or cmd == "disarm":
        ev = a.ctrl.arm(now) if cmd == "arm" else a.ctrl.disarm(now)
        if a.ctrl.nevents:
            a.events(ev, now)
    # the caller runs the control decision next (Agent.signed_command), this module freed
    out = {"ok": True, "cmd": cmd, "seq": c["seq"]}
    if cmd == "status" or cmd == "test":
        out["status"] = None  # the transport adds the status it carries (Agent.signed_command)
    return out


TIME_SKEW_S = 300  # a signed time further than this from a plausible RTC/NTP time is refused
RTC_FLOOR = 1767225600  # 2026-01-01: an RTC before it is a port default (rp2 starts at 2021), unset


def slot(au, iid, create=True):
    # the issuer number (control.I_SIGNED + k) of a signer id in control.Authority's table; a
    # free slot for a new one; -1 when absent and not created
    from agent.control import I_SIGNED, NSIGNED

    free = -1
    for i in range(NSIGNED):
        v = au.ids[i]
        if v == iid:
            return I_SIGNED + i
        if free < 0 and (v is None or not au.active(I_SIGNED + i)):
            free = i
    if not create:
        return -1
    if free < 0:  # full: the last slot, as an unknown signer's (only a restore-all clears it)
        free = NSIGNED - 1
        iid = b""
    au.ids[free] = iid
    return I_SIGNED + free


def _hex(b):
    return "".join("%02x" % x for x in b)


def save(path, data):
    # The seq store (agent.cmd_check.load reads it): path.tmp written, flushed and renamed over
    # path (on a VFS whose rename does not replace, the old file is removed first: load() then
    # finds the .tmp).
    data = cbor.dumps({"v": 1, "seq": data})
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if hasattr(os, "fsync") and hasattr(f, "fileno"):
            os.fsync(f.fileno())
    try:
        os.rename(tmp, path)
    except OSError:
        try:
            os.remove(path)
        except OSError:
            pass
        os.rename(tmp, path)
    if hasattr(os, "sync"):
        os.sync()
