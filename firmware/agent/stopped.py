# The agent was stopped from the console (Ctrl-C; main.py), by a technician or a host tool
# (deploy, provision): protection is off from now on. Loaded only then, while the stopped agent's
# objects are still there: say so (a "maint" journal record; with the MQTT channel on, the
# session is dropped without DISCONNECT, so the broker publishes the board's last will), then
# release the agent's RAM for the REPL and the host's raw-REPL work. The bounded maintenance
# window itself is maint.py, compiled into RAM once the heap is free (docs/failsafes.md).
import gc
import sys

WINDOW_S = 300  # [maintenance] window_s when the site config has no such section (agent/config.py)


def stop(app):
    # app: the agent.app module, or None (the agent never started). Returns (the watchdog the
    # agent started or None, the window in s, the relay mask or None).
    a = app and getattr(app, "AGENT", None)
    hw = mask = None
    window = WINDOW_S
    if a is not None:
        app.AGENT = None
        w = getattr(a, "wdt", None)
        hw = w and w[0]
        try:
            window = (a.cfg.get("maintenance") or {}).get("window_s", WINDOW_S)
            mask = a.relays.mask
            from agent import control

            a.journal.append("maint", {"off_s": window, "mask": mask, "state": control.STATE_NAMES[a.ctrl.state]})
        except Exception:  # stopped before its journal existed, or short of RAM: still bounded
            pass
        for sec, f in getattr(a, "features", ()):  # a feature's stop(): the MQTT session dropped
            try:
                if hasattr(f, "stop"):
                    f.stop()
            except Exception:
                pass
    a = app = w = f = None
    free()
    return hw, window, mask


def free():
    # The stopped agent stays reachable from asyncio: the last task that ran (cur_task) and the
    # task and I/O queues hold its coroutines, and their frames the Agent. Drop them and the
    # agent's modules (gridshed/transport.py runs the same against older firmware).
    core = sys.modules.get("asyncio.core")
    if core is not None:
        setattr(core, "cur_task", None)  # a module global of asyncio/core.py (not in the port stubs)
        core.new_event_loop()
    for k in list(sys.modules):
        if k == "agent" or k.startswith("agent."):
            del sys.modules[k]
    gc.collect()
