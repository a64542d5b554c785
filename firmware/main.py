"""Board entry point: run the agent; on an unexpected error say why, wait, then reset.

The pause before the reset keeps a persistent fault from becoming a tight crash loop, and the
relays keep the state the agent last gave them (the watchdog covers a hang). Boot order: a
switch-over that a reset cut short (deploy, provision) is finished and the config is read and
validated first (agent/boot.py, while the heap is empty; a rejected config never touches a
pin), then agent/app.py run() sets the relays' safe state before any other part of the agent is
built. Ctrl-C on the console stops the agent for a bounded maintenance window (agent/stopped.py,
maint.py): the REPL's _gs_keep() extends it, and the watchdog resets the board into the agent
when it ends.
"""
import sys
import time


def _main():
    global _gs_keep
    try:
        try:  # a host tool asked for a boot without the agent (maint_boot.py)
            open("maint.flag").close()
        except OSError:
            pass
        else:
            import maint_boot

            _gs_keep = maint_boot.boot()
            return
        import agent.boot

        switched = agent.boot.finish_switch()
        cfg, errors, chash = agent.boot.load_config()  # before the agent's modules: the heap is empty
        del sys.modules["agent.boot"]
        del agent.boot  # nothing keeps the boot code alive: its RAM goes to the agent
        import agent.app

        agent.app.run(cfg, errors, chash, switched)
    except KeyboardInterrupt:
        for _ in range(3):  # a second Ctrl-C must not cut the window's set-up short
            try:
                _gs_keep = _stopped()
                break
            except KeyboardInterrupt:
                pass
            except MemoryError:  # the stopped agent left no RAM for the window (maint.py)
                _no_room()
    except Exception as e:  # last line of defence, never a silent crash loop
        sys.print_exception(e)
        print("E agent crashed; resetting in 5 s")
        time.sleep(5)
        _reset()


def _reset():
    try:
        from agent import hal

        hal.load(None).reset()
    except Exception:
        sys.exit(3)


_gs_stop = None


def _no_room():
    # instead of the window, a maintenance boot (maint_boot.py: the agent not started, the heap
    # free for the host's work, the same bounded window); never a REPL without agent or window
    try:
        with open("maint.flag", "w") as f:
            f.write("30")
    except Exception:
        pass
    _reset()


def _stopped():
    # agent/stopped.py says so (journal, MQTT) and frees the agent (once: kept for a retry);
    # maint.py, compiled into RAM once the heap is free, holds the bounded window
    global _gs_stop
    if _gs_stop is None:
        try:
            from agent.stopped import stop

            _gs_stop = stop(sys.modules.get("agent.app"))
        except MemoryError:
            _gs_stop = False
    import maint

    return maint.start(_gs_stop or None)


_main()
