"""Hardware behind one interface: `load()` returns the HAL for the port the agent runs on.

A HAL object offers: out_pin(pin, level) -> pin with value(v); in_pin(pin, pull_up) -> pin with
value(); uart(role, cfg) -> stream for asyncio (write / readinto, pollable); wdt(timeout_ms) ->
object with feed(); wall_time() -> unix seconds or None; start() (an asyncio task for
background I/O, or None); reset(). hal/unix.py is the virtual board, hal/mcu.py real ports.
"""
import sys


def load(board):
    if sys.platform == "linux" or sys.platform == "darwin":
        from agent.hal.unix import UnixHal

        return UnixHal(board)
    from agent.hal.mcu import McuHal

    return McuHal(board)
