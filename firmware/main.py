"""Board entry point: run the agent; on an unexpected error say why, wait, then reset.

The pause before the reset keeps a persistent fault from becoming a tight crash loop, and the
relays keep the state the agent last gave them (the watchdog covers a hang).
"""
import sys
import time


def _main():
    try:
        import agent.app

        agent.app.run()
    except KeyboardInterrupt:
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
