# Signed commands, the agent's last step (after agent.mac0 and agent.cmdcheck): write the new
# seq marks of an accepted command, count, journal (accepted or refused, with why), then set the
# inputs of the control decision that the caller runs next, which is where relays change.
# Loaded for that step and freed after it (Agent.signed_command).
# (Comments, not docstrings: less RAM when this is compiled from source.)
import os

from agent import cbor


def run(a, c, src):
    # c: what agent.cmdcheck.run returned, (the command, new seq marks) or why it is refused
    from agent.app import SEQ_PATH, log
    from agent.compat import ticks_ms, ticks_diff

    if isinstance(c, tuple):  # accepted: the marks are persisted before anything else
        try:
            save(SEQ_PATH, c[1])
            c = c[0]
        except Exception:
            c = "store-error"
    n = a.seq_counters  # kept by the agent: this module is freed after each command
    if n is None:  # the status "commands" counters: accepted and agent.commands.REASONS
        n = a.seq_counters = {"accepted": 0, "malformed": 0, "unknown-kid": 0, "bad-mac": 0,
                              "bad-cmd": 0, "wrong-target": 0, "expired": 0, "replay": 0,
                              "store-error": 0}
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
    n["accepted"] += 1
    cmd = c["cmd"]
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
    # the caller runs the control decision next (Agent.signed_command), this module freed
    out = {"ok": True, "cmd": cmd, "seq": c["seq"]}
    if cmd == "status" or cmd == "test":
        out["status"] = None  # the transport adds the status it carries (Agent.signed_command)
    return out


def save(path, data):
    # The seq store (agent.cmdcheck.load reads it): path.tmp written, flushed and renamed over
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
