"""A maintenance boot (docs/failsafes.md "Writing to a board"): main.py imports this only when a
host tool left its flag file. Source on the board's filesystem like maint.py (gridshed build
SOURCE_ONLY), so its code costs the heap nothing at any other boot or stop."""
import gc
import sys

from maint import WINDOW_S, start


FLAG = "maint.flag"  # main.py checks it; gridshed/transport.py MAINT_FLAG


def boot(flag=FLAG):
    """main.py, at a boot a host tool asked for: its helpers ran short of heap beside the stopped
    agent (gridshed/transport.py maintenance_boot), so it wrote `flag` (its lease, s) and
    soft-reset the board. The flag is read and removed first (once: any later reset starts the
    agent); the agent is not started, so the host's write gets the whole heap. The window is the
    lease, at least 5 s and at most WINDOW_S; the host's _gs_keep(s, 1) calls keep it on.
    Journaled ("maint", state "maintenance boot"); returns keep()."""
    import os

    try:
        f = open(flag)
        try:
            s = int(f.read(16))
        finally:
            f.close()
    except (OSError, ValueError):
        s = 0
    os.remove(flag)
    s = min(max(s, 5), WINDOW_S)
    try:
        from agent.journal import Journal

        Journal(".").append("maint", {"off_s": s, "mask": None, "state": "maintenance boot"})
    except Exception:  # no journal (a board without the agent), or a bad one: still bounded
        pass
    for k in list(sys.modules):
        if k == "agent" or k.startswith("agent."):
            del sys.modules[k]
    gc.collect()
    print("W maintenance boot (asked for by a host tool): the agent is NOT started, the heap is free "
          "for the host's write; %d s lease" % s)
    return start((None, s, None))
