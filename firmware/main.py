"""Board entry point: run the agent; on an unexpected error say why, wait, then reset.

The pause before the reset keeps a persistent fault from becoming a tight crash loop, and the
relays keep the state the agent last gave them (the watchdog covers a hang). Boot order is in
agent/app.py run(): config read and validated first (a rejected config never touches a pin),
then the relays take their safe state before any other part of the agent is built.
"""
import sys
import time


def _main():
    try:
        import agent.app

        agent.app.run()
    except KeyboardInterrupt:
        # A technician stopped the agent on purpose: park the watchdog (fed by a timer on
        # boards, emulation ended on the unix port) so the REPL is not reset under them.
        w = sys.modules.get("agent.app")
        w = w and w.WDT  # [hw, feeds, starved, emulation state]
        if w and w[3]:
            w[3][2] = 0
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
