"""Board entry point: run the agent; on an unexpected error say why, wait, then reset.

The pause before the reset keeps a persistent fault from becoming a tight crash loop, and the
relays keep the state the agent last gave them (the watchdog covers a hang). Boot order: the
config is read and validated first (agent/boot.py, while the heap is empty; a rejected config
never touches a pin), then agent/app.py run() sets the relays' safe state before any other part
of the agent is built.
"""
import sys
import time


def _main():
    try:
        import agent.boot

        cfg, errors, chash = agent.boot.load_config()  # before the agent's modules: the heap is empty
        del sys.modules["agent.boot"]
        del agent.boot  # nothing keeps the boot code alive: its RAM goes to the agent
        import agent.app

        agent.app.run(cfg, errors, chash)
    except KeyboardInterrupt:
        # A technician stopped the agent on purpose: park the watchdog (fed by a timer on
        # boards, emulation ended on the unix port) so the REPL is not reset under them.
        w = sys.modules.get("agent.app")
        w = w and w.WDT  # [hw, feeds, starved, -]
        if w and hasattr(w[0], "park"):  # the virtual board's emulated watchdog
            w[0].park()
        elif w:
            try:
                import machine

                machine.Timer(-1, period=1000, callback=lambda t: w[0].feed())
            except Exception:
                print("W watchdog still running: the board resets within 8 s")
        print("agent stopped (Ctrl-C): REPL")
        raise
    except Exception as e:  # last line of defence, never a silent crash loop
        sys.print_exception(e)
        print("E agent crashed; resetting in 5 s")
        time.sleep(5)
        try:
            from agent import hal

            hal.load(None).reset()
        except Exception:
            sys.exit(3)


_main()
