"""Virtual board: the unix port with pty UARTs and GPIO over a loopback socket (see docs/virtual-board.md).

`sim.json` in the working directory (the board's filesystem) says where the simulated hardware
is. Output writes are sent as `O <pin> <level>` lines the moment they happen, so the host can
timestamp a relay opening; input changes arrive as `I <pin> <level>` lines.

Edge inputs (AC zero-crossing sense, docs/ac-sense.md): the simulator sends
`X <pin> <t_us> [<t_us> ...]`, rising-edge times on CLOCK_MONOTONIC in microseconds, the
clock behind this port's time.ticks_us() (and CPython's time.monotonic() on the host). They
are what an MCU's GPIO interrupt would have recorded at the edge (the simulator adds the
jitter it wants to model); lines arrive a few ms later, which only delays processing, as a
late task wake would. A stamp more than 1 s away from ticks_us() (clock not shared) is
replaced by the arrival time and counted in edge_clock_errors.
"""
import _thread  # noqa: F401 (the watchdog's text below uses it)
import json
import os
import socket
import time

try:
    import termios
except ImportError:  # pragma: no cover
    termios = None

_inputs = {}


class _OutPin:
    def __init__(self, hal, pin, level):
        self._hal = hal
        self.pin = pin
        self._v = -1
        self.value(level)

    def value(self, v=None):
        if v is None:
            return self._v
        v = 1 if v else 0
        if v != self._v:
            self._v = v
            self._hal._send_gpio(self.pin, v)
        return v


class _InPin:
    def __init__(self, pin, pull_up):
        self.pin = pin
        if pin not in _inputs:
            _inputs[pin] = 1 if pull_up else 0

    def value(self, v=None):
        return _inputs.get(self.pin, 0)


CAUSE_PATH = "wdt_reset"

# machine.WDT for the virtual board. A thread plays the chip's timer: not fed for timeout_ms, it
# SIGKILLs the process (as abrupt as a reset) after leaving a marker the next boot reports as its
# reset cause; the supervisor boots it again. Like the hardware, nothing stops it once started
# but the end of the process, and asking again gives the running one. The thread and feed() are
# compiled from this text into RAM (once, at import, while the heap is still in one piece): they
# keep running while the agent is stopped, when the agent's own code may be being rewritten (a
# ROMFS deploy erases the partition that bytecode runs from), as a chip's watchdog is no code.
_WDT_SRC = """
def _wdt_make(ms):
 st=[time.ticks_ms(),ms]
 def feed():
  st[0]=time.ticks_ms()
 def run():
  while time.ticks_diff(time.ticks_ms(),st[0])<=st[1]:
   time.sleep_ms(100)
  print('E %d watchdog: not fed: reset'%time.ticks_ms())
  try:
   open(CAUSE_PATH,'w').close()
  except OSError:
   pass
  os.system('kill -9 $PPID')
 _thread.start_new_thread(run,())
 return feed,st
"""
exec(_WDT_SRC)  # defines _wdt_make in this module, its code in RAM
del _WDT_SRC
_the_wdt = []


class _Wdt:
    def __init__(self, timeout_ms):
        self.feed, self._st = _wdt_make(timeout_ms)  # noqa: F821 (made by exec above)


def wdt(timeout_ms):
    if not _the_wdt:
        _the_wdt.append(_Wdt(timeout_ms))
    w = _the_wdt[0]
    w._st[1] = timeout_ms
    w.feed()
    return w


class UnixHal:
    name = "unix"

    def __init__(self, board):
        self.board = board
        try:
            with open("sim.json") as f:
                self.sim = json.load(f)
        except OSError:
            self.sim = {}
        self.gpio_errors = 0
        self.gpio_mem_errors = 0  # GPIO socket lines lost to a full heap (virtual board only)
        self.edge_clock_errors = 0
        self._edges = {}
        self._sock = None
        self._rxbuf = b""
        if self.sim.get("slow_fs_ms"):  # a slow flash chip, for the power-cut tests
            from agent.hal.slowfs import install

            install(int(self.sim["slow_fs_ms"]))
        self._connect_gpio()

    def _connect_gpio(self):
        addr = self.sim.get("gpio")
        if not addr:
            return
        host, port = addr.rsplit(":", 1)
        try:
            s = socket.socket()
            s.connect(socket.getaddrinfo(host, int(port))[0][-1])
            # TCP_NODELAY: an output line leaves at once (Nagle held a relay's "O" line back
            # until the host's delayed ACK, ~14 ms, when an earlier write was still unacked)
            s.setsockopt(6, 1, 1)  # (IPPROTO_TCP, TCP_NODELAY)
            s.setblocking(False)
            self._sock = s
        except OSError:
            self.gpio_errors += 1
            self._sock = None

    def _send_gpio(self, pin, v):
        if self._sock is None:
            return
        try:
            self._sock.send(b"O %d %d\n" % (pin, v))
        except OSError:
            self.gpio_errors += 1

    def out_pin(self, pin, level):
        return _OutPin(self, pin, level)

    def in_pin(self, pin, pull_up=False):
        return _InPin(pin, pull_up)

    def edge_input(self, pin, sink):
        # Rising edges of `pin` -> sink(t_us) (the same call a board's IRQ handler makes).
        self._edges[pin] = sink

    def _edge_line(self, parts):
        sink = self._edges.get(int(parts[1]))
        if sink is None:
            self.gpio_errors += 1
            return
        mask = time.ticks_add(0, -1)
        for p in parts[2:]:
            t = int(p) & mask
            now = time.ticks_us()
            if abs(time.ticks_diff(now, t)) > 1000000:
                self.edge_clock_errors += 1
                t = now
            sink(t)

    def uart(self, role, cfg=None):
        path = self.sim.get("uarts", {}).get(role)
        if not path:
            raise OSError("no UART for role %r in sim.json" % role)
        f = open(path, "r+b", buffering=0)
        if termios is not None:
            fd = f.fileno()
            termios.setraw(fd)
            a = termios.tcgetattr(fd)
            a[6][6] = 0  # VMIN = 0, VTIME = 0: readinto returns at once when nothing waits,
            a[6][5] = 0  # like machine.UART(timeout=0) on a board
            termios.tcsetattr(fd, termios.TCSANOW, a)
        return f

    def wdt(self, timeout_ms):
        return wdt(timeout_ms)

    def wall_time(self):
        return time.time()

    def reset_cause(self):
        try:
            os.remove(CAUSE_PATH)
            return "watchdog"
        except OSError:
            return None

    def reset(self):
        # as abrupt as a chip's reset: the supervisor boots the process again (sys.exit alone only
        # reaches the REPL of `micropython -i main.py`, where the board would wait for its watchdog)
        import os
        import sys

        os.system("kill -9 $PPID")
        sys.exit(3)

    async def run(self):
        """Read simulator input changes from the GPIO socket (never blocks the loop)."""
        import asyncio

        if self._sock is None:
            return
        reader = None
        while True:
            try:  # (asyncio.StreamReader loads asyncio's stream module on first use)
                if reader is None:
                    reader = asyncio.StreamReader(self._sock)
                line = await reader.readline()
            except MemoryError:  # a full heap (the budget tests): counted, and the reader goes on
                self.gpio_mem_errors += 1
                import gc

                gc.collect()
                await asyncio.sleep_ms(5)
                continue
            if not line:
                self.gpio_errors += 1
                return
            parts = line.split()
            if len(parts) >= 3 and parts[0] == b"X":
                try:
                    self._edge_line(parts)
                except ValueError:
                    self.gpio_errors += 1
            elif len(parts) == 3 and parts[0] == b"I":
                try:
                    _inputs[int(parts[1])] = 1 if int(parts[2]) else 0
                except ValueError:
                    self.gpio_errors += 1
            else:
                self.gpio_errors += 1
