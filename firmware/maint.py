"""Console maintenance (docs/failsafes.md, "Stopping the agent from the console").

When the agent is stopped with Ctrl-C (by a technician or a host tool: deploy, provision),
main.py first lets agent/stopped.py say so (console, journal, MQTT) and release the agent's
RAM, then imports this. From then on nothing watches frequency, so it is never unbounded: the
watchdog (the agent's, or one started here) is fed once a second until the window ends (site
config [maintenance] window_s), then no more, and it resets the board into the agent. keep()
(the REPL's _gs_keep()) moves the end to one window from now; host tools call it with their
raw-REPL execs, so a host that disappears leaves protection off for at most one window after
its last exec, plus the watchdog's timeout.

This file stays source on the board's filesystem (gridshed build) and is compiled into RAM when
imported, once the agent's RAM is free: what runs during the window must not be the agent's
bytecode, which a deploy may be rewriting (the code of a ROMFS agent runs from the partition a
deploy erases).
"""
import gc
import sys
import time

WINDOW_S = 300   # agent/stopped.py WINDOW_S, when that could not run
MAX_S = 3600     # the most one keep(s) asks for
WDT_MS = 8000    # agent/app.py WDT_MS: the watchdog started here when the agent had none yet


class Window:
    def __init__(self, wdt, window_s):
        self.wdt = wdt
        self.window_ms = int(window_s * 1000)
        self.end = time.ticks_add(time.ticks_ms(), self.window_ms)
        self.over = False
        # every attribute exists before the ticker starts: on the unix port the ticker is a thread,
        # and adding one later (win.timer = ...) grows the instance's dict while that thread reads
        # it ("'Window' object has no attribute 'over'", seen once in a fresh-clone run)
        self.timer = None

    def keep(self, s=None, lease=False):
        # The window ends no sooner than s seconds from now (default: one window); keep(0) ends
        # it now. lease=True (host tools): it ends exactly s seconds from now, at most one window,
        # so a host that disappears mid-write leaves protection off for one short lease, not a
        # technician's whole window. Returns the seconds left (0: the board is about to reset).
        now = time.ticks_ms()
        ms = self.window_ms if s is None else int(min(max(s, 0), MAX_S) * 1000)
        if lease:
            ms = min(ms, self.window_ms)
        if not ms:
            self.end = now
        elif lease or time.ticks_diff(time.ticks_add(now, ms), self.end) > 0:
            self.end = time.ticks_add(now, ms)
        return 0 if self.over else (max(0, time.ticks_diff(self.end, now)) + 999) // 1000

    def tick(self, _=None):
        # once a second, outside asyncio: a machine.Timer on a board, a thread on the virtual one
        if self.over:
            return False
        if time.ticks_diff(self.end, time.ticks_ms()) > 0:
            self.wdt.feed()
            return True
        self.over = True
        print("E maintenance window over: watchdog no longer fed, the board resets into the agent")
        return False


def _periodic(ms, fn):
    if sys.platform in ("linux", "darwin"):
        import _thread

        def loop():
            while fn() is not False:
                time.sleep_ms(ms)

        _thread.start_new_thread(loop, ())
        return
    import machine

    def cb(t):
        if fn() is False:
            t.deinit()

    # a virtual timer (-1; rp2 has only those) or hardware timer 0 (ESP32 1.26+ refuses -1);
    # its callback is a soft (scheduled) one: it runs while the REPL waits for input too
    for tid in (-1, 0):
        try:
            return machine.Timer(tid, mode=machine.Timer.PERIODIC, period=ms, callback=cb)
        except (ValueError, OSError):
            pass


def start(stopped):
    """stopped: (watchdog or None, window s, relay mask or None) from agent/stopped.py, or None
    when that could not run (short of RAM). Returns keep()."""
    hw, window, mask = stopped or (None, WINDOW_S, None)
    if hw is None:  # stopped before the agent started its watchdog: one bounds the window now
        if sys.platform in ("linux", "darwin"):
            from agent.hal.unix import wdt

            hw = wdt(WDT_MS)
        else:
            import machine

            hw = machine.WDT(timeout=WDT_MS)
        gc.collect()
    win = Window(hw, window)
    win.timer = _periodic(1000, win.tick)  # kept: a timer must stay referenced
    print("W PROTECTION OFF: agent stopped from the console; relays held as they were (mask %s); "
          "the board resets into the agent in %d s ([maintenance] window_s). _gs_keep(s): s more "
          "seconds, _gs_keep(0): end it now; Ctrl-D: restart the agent now" % (mask, window))
    return win.keep

