"""Board access over a serial port: mpremote's SerialTransport for the raw REPL, pyserial for the console.

Two ways to talk to a board:

* :class:`Board` stops the agent (Ctrl-C), enters the raw REPL and runs code there (file hashes,
  writes, renames). It never soft-resets on entry (mpremote's ``resume`` semantics: on the virtual
  board Ctrl-D ends the process). Work that stops the agent runs inside :meth:`Board.stopped`,
  which restarts the agent afterwards whatever happens (an error on the board, a MemoryError, a
  lost connection, Ctrl-C on the host) and says how that went; :meth:`Board.restart_agent`
  leaves the raw REPL and presses Ctrl-D at the friendly REPL: a board soft-reboots and runs
  main.py, the virtual board's supervisor starts the process again.
* :class:`Console` speaks the agent's console protocol (``@status`` ... answered by ``@{json}``
  lines, the last with ``"end": true``) without interrupting it.

Every wait on the board has an overall deadline: a board that keeps printing (an agent refusing
its config logs a line every 10 s) never keeps a host tool waiting byte by byte.

While the agent is stopped, protection is off for a bounded window only (firmware agent/maint.py,
docs/failsafes.md): the board resets itself into the agent when the window ends. Host work
holds it on a short lease as it goes (``_gs_keep(LEASE_S, 1)`` with a raw-REPL exec at most every
KEEP_EVERY seconds), so a host that disappears mid-operation leaves protection off for at most
LEASE_S seconds (never more than the site's window), plus the watchdog's timeout.
"""
from __future__ import annotations

import ast
import binascii
import contextlib
import json
import signal
import struct
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .errors import UserError

KEEP_EVERY = 5.0       # s between the host's _gs_keep() calls while it works in the raw REPL
LEASE_S = 30           # what each call leaves: a host gone mid-write leaves protection off this long
# a boot's console lines (a board reset while the host waited for an exec's output): never in the
# output of the host's own code (hashes, base64, short words)
REBOOT_MARKS = (b"soft reboot\r\n", b"agent up: ", b" config: ")
AGENT_UP_WAIT = 30.0   # s for a restarted agent to say "agent up" and answer @status
# one block the host's helpers need on the board (the code carrying a ROMFS write's 2 KiB chunk
# in base64): a stopped agent's heap that cannot give it (full, or fragmented: the walk saw
# 109 KB free with no 1280-byte block) gets a maintenance boot before the write; a helper that
# hits MemoryError anyway gets one on the run again (run_with_full_heap)
NEED_HEAP = 3072
MAINT_FLAG = "maint.flag"  # firmware main.py / maint_boot.py: the next boot is a maintenance boot
MAINT_BOOT_WAIT = 30.0  # s for the board to come back from the reset into its maintenance boot


class BoardError(UserError):
    """The board did not answer as expected (not running MicroPython, busy, unplugged...)."""


class BoardMemoryError(BoardError):
    """The host's helper code ran out of heap on the board (the stopped agent's heap was full or
    fragmented): the operation can run again in a maintenance boot (Board.stopped(full_heap=True))."""


def _quote(path: str) -> str:
    return repr(path)


# Runs on the board: sha256 of each listed path ("-" when missing), one "path hash" line each.
_HASH_CODE = """
import hashlib
def _gs_h(p):
 try:
  f=open(p,'rb')
 except OSError:
  return '-'
 h=hashlib.sha256();b=bytearray(512);m=memoryview(b)
 while 1:
  n=f.readinto(b)
  if not n:break
  h.update(m[:n])
 f.close()
 d=h.digest()
 return ''.join('%02x'%x for x in d)
for _p in {paths!r}:
 print(_p,_gs_h(_p))
"""

# Runs on the board: every file under root, recursively, as "size path" lines.
_WALK_CODE = """
import os
def _gs_w(d):
 for e in os.ilistdir(d or '.'):
  p=(d+'/'+e[0]) if d else e[0]
  if e[1]&0x4000:
   _gs_w(p)
  else:
   print(e[3] if len(e)>3 else -1,p)
_gs_w({root!r})
"""

# Runs on the board right after entering the raw REPL: release what the stopped agent held (the
# firmware does it itself since agent/maint.py; an older agent stays reachable from asyncio's last
# task and queues, ~80 KB of a small heap), then report the maintenance window ("-": none, an
# agent-less board or older firmware) and the free heap.
_FREE_CODE = """
import sys,gc
_c=sys.modules.get('asyncio.core')
if _c:
 _c.cur_task=None
 _c.new_event_loop()
for _k in list(sys.modules):
 if _k.startswith('agent') or _k=='main':
  del sys.modules[_k]
for _k in list(globals()):
 if _k[0]!='_' and _k not in ('sys','gc'):
  del globals()[_k]
_c=None
gc.collect()
try:
 _k=_gs_keep(LEASE_S,1)
except NameError:
 _k='-'
try:
 _c=bytearray(NEED_HEAP)
 _c=1
except MemoryError:
 _c=0
print('gs-maint',_k,gc.mem_free(),_c)
_c=None
"""

# Runs on the board: the switch-over (docs/failsafes.md, "Writing to a board"). The plan is
# committed by renaming its .tmp into place; then every staged file is renamed over its target
# (FAT refuses that: remove, then rename), listed files are removed and the plan is deleted. The
# firmware's agent/boot.py finish_switch() completes a committed plan at the next boot.
_SWITCH_CODE = """
import os
def _gs_r(a,b):
 try:
  os.rename(a,b)
 except OSError:
  os.remove(b)
  os.rename(a,b)
{commit}
for _r in {renames!r}:
 try:
  os.stat(_r[0])
 except OSError:
  continue
 _gs_r(_r[0],_r[1])
for _p in {removes!r}:
 try:
  os.remove(_p)
 except OSError:
  pass
os.remove({plan!r})
print('switched')
"""


def _at_repl(text: str) -> bool:
    """Console output that says the board sits at its REPL (the agent is not running)."""
    return ">>> " in text or "SyntaxError" in text or "PROTECTION OFF" in text or "raw REPL" in text


@contextlib.contextmanager
def sigint_deferred() -> Iterator[list[int]]:
    """Ctrl-C on the host is held back (and re-raised after) while the agent is being restarted."""
    hits: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield hits
        return
    old = signal.signal(signal.SIGINT, lambda *a: hits.append(1))
    try:
        yield hits
    finally:
        signal.signal(signal.SIGINT, old)


T = TypeVar("T")
BUSY_WAIT = 3.0  # how long an open waits for a port another program holds (a monitor's refresh)


def _busy(port: str, exc: BaseException) -> bool:
    """The port exists and is ours to use, but another program holds its lock for now."""
    import errno
    import os

    text = str(exc)
    if not os.path.exists(port):
        return False
    if "exclusively lock" in text or f"[Errno {errno.EAGAIN}]" in text or isinstance(exc, BlockingIOError):
        return True  # pyserial's lock
    # mpremote's SerialTransport says only "failed to access PORT" (its own open hit the lock)
    return "failed to access" in text and os.access(port, os.R_OK | os.W_OK)


def open_retrying(port: str, opener: Callable[[], T], wait: float = BUSY_WAIT) -> T:
    """opener() (it opens `port`), again for up to `wait` s while another program holds the port
    (`gridshed monitor` in another window holds it only while it asks, once per refresh)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return opener()
        except Exception as exc:
            if time.monotonic() >= deadline or not _busy(port, exc):
                raise
            time.sleep(0.05)


def open_error(port: str, exc: BaseException) -> str:
    """The one line for a port that would not open (Board and Console say the same)."""
    import os

    if not os.path.exists(port):
        why = "no such port (is the board plugged in? `gridshed ports` lists the attached ones)"
    elif not os.access(port, os.R_OK | os.W_OK):
        why = "permission denied (on Linux: add yourself to the dialout group and log in again)"
    else:
        why = f"{exc} (is another program using it?)"
    return f"cannot open {port}: {why}"


class Board:
    """A MicroPython board reached through mpremote's SerialTransport (raw REPL, raw paste)."""

    def __init__(self, port: str, baudrate: int = 115200, chunk: int = 1024) -> None:
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport

        self.port = port
        self.chunk = chunk
        try:
            # a read timeout: on a pty mpremote reads byte by byte without checking in_waiting,
            # so without one a silent board would block read_until() forever
            self.t = open_retrying(port, lambda: SerialTransport(port, baudrate=baudrate, timeout=1))
        except TransportError as exc:
            raise BoardError(open_error(port, exc)) from None
        except Exception as exc:  # serial.SerialException and OSError
            raise BoardError(f"cannot open {port}: {exc}") from None
        self.raw = False
        self.maint_left: int | None = None   # the board's maintenance window (s left), None: none
        self.mem_free: int | None = None      # free heap once the stopped agent was released
        self.outcome: str | None = None       # how the agent restart after stopped() went
        self.agent_status: dict[str, Any] | None = None  # its @status after the restart
        self.wait_for_agent = False   # set by work that put the agent on the board (deploy)
        self.time_warning: str | None = None  # in warnings: a market board restarted without its time
        self.config_refused: str | None = None  # the restarted agent refused its config (why): no protection
        self.reached = False          # a raw REPL answered (a MicroPython board is there)
        # what went wrong without failing the operation (callers put these in their result's
        # "warnings"; a library never prints); free_memory_failures counts the cleanup's failures
        self.warnings: list[str] = []
        self.free_memory_failures = 0
        self._kept = 0.0
        self.heap_ok = True           # the stopped agent's heap gave NEED_HEAP in one block
        self.maint_flag: str | None = None  # the maintenance-boot flag file (None: firmware not known to have it)
        self.maint_boot: str | None = None  # why this session's write ran in a maintenance boot

    # ---- session -------------------------------------------------------------------------
    def __enter__(self) -> "Board":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.raw:
                self.exit_raw()
        except Exception:
            pass
        try:
            self.t.close()
        except Exception:
            pass

    def _drain(self, quiet: float = 0.05, limit: float = 1.0) -> bytes:
        """Read until the line is quiet for `quiet` s (at most `limit` s)."""
        s = self.t.serial
        out = bytearray()
        end = time.monotonic() + limit
        last = time.monotonic()
        while time.monotonic() < end:
            n = s.in_waiting
            if n:
                out += s.read(n)
                last = time.monotonic()
            elif time.monotonic() - last >= quiet:
                break
            else:
                time.sleep(0.005)
        return bytes(out)

    def _read_until(self, ending: bytes, deadline: float) -> bytes:
        """Bytes up to and including `ending`, or what came before the deadline."""
        return self.t.read_until(1, ending, timeout=None, timeout_overall=max(0.05, deadline - time.monotonic()))

    def enter_raw(self, attempts: int = 3) -> None:
        """Stop whatever runs (Ctrl-C) and enter the raw REPL, without a soft reset."""
        s = self.t.serial
        seen = b""
        for _ in range(attempts):
            s.write(b"\r\x03")
            # wait for the friendly prompt (a running agent prints its maintenance notice first)
            seen = self._read_until(b">>> ", time.monotonic() + 3)
            self._drain()
            s.write(b"\r\x01")
            data = self._read_until(b"raw REPL; CTRL-B to exit\r\n", time.monotonic() + 3)
            if data.endswith(b"raw REPL; CTRL-B to exit\r\n"):
                self.t.in_raw_repl = True
                self.raw = self.reached = True
                self._free_memory()
                return
            seen = data or seen
            s.write(b"\r\x02")  # back to the friendly REPL and try again
            self._drain(limit=0.5)
        tail = seen[-120:].decode(errors="replace").strip()
        raise BoardError(f"{self.port}: no MicroPython raw REPL answered (last output: {tail!r}); "
                         "is this a MicroPython board, and is no other program using the port?")

    def _free_memory(self) -> None:
        """Release the stopped agent's RAM for our helpers; learn the maintenance window.

        Never fails the host operation: what went wrong is counted (free_memory_failures) and
        said in self.warnings (the helpers then run in whatever heap the stopped agent left, and
        no maintenance window is known, so a restart is not waited for)."""
        try:
            out, err = self._exec_raw(_FREE_CODE.replace("LEASE_S", str(LEASE_S)).replace("NEED_HEAP", str(NEED_HEAP)),
                                      timeout=10)
        except Exception as exc:
            self._free_memory_failed(f"{type(exc).__name__}: {exc}")
            return
        for line in out.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "gs-maint":
                self.maint_left = int(parts[1]) if parts[1].isdigit() else None
                self.mem_free = int(parts[2]) if parts[2].isdigit() else None
                self.heap_ok = parts[3] != "0"
                self.maint_flag = MAINT_FLAG if self.maint_left is not None else None
                self._kept = time.monotonic()
                return
        said = (err or out).decode(errors="replace").strip().splitlines()
        self._free_memory_failed(said[-1] if said else "no answer")

    def _free_memory_failed(self, why: str) -> None:
        self.free_memory_failures += 1
        self.warnings.append(f"{self.port}: could not release the stopped agent's memory ({why}); "
                             "continuing in the heap it left, maintenance window unknown")

    def exit_raw(self) -> None:
        self.t.serial.write(b"\r\x02")
        self.t.in_raw_repl = False
        self.raw = False

    def restart_agent(self, wait: float = 0.0) -> str:
        """Back to the friendly REPL from whatever state the console is in, then Ctrl-D (soft reset).

        Ctrl-C first: it stops code running in the raw REPL, and a raw paste cut short is dropped
        without running (MicroPython raises KeyboardInterrupt while compiling it). With `wait`,
        until the agent says "agent up" and answers @status (self.agent_status); the result says
        how far it got.
        """
        s = self.t.serial
        s.write(b"\r\x03")
        self._drain(limit=0.5)
        s.write(b"\r\x02")
        self._read_until(b">>> ", time.monotonic() + 2)
        self.t.in_raw_repl = False
        self.raw = False
        s.write(b"\x04")
        s.flush()
        if wait <= 0:
            time.sleep(0.05)
            return "agent restarted"
        return self._wait_agent(wait)

    def _read_for(self, markers: tuple[bytes, ...], deadline: float) -> tuple[bytes, bytes | None]:
        """Output until one of `markers` and the end of its line (or the deadline): (data, marker)."""
        s = self.t.serial
        data = bytearray()
        found: bytes | None = None
        while time.monotonic() < deadline:
            chunk = s.read(max(1, min(s.in_waiting, 4096)))
            if not chunk:
                continue
            data += chunk
            if found is None:
                found = next((m for m in markers if m in data), None)
            if found is not None and data.find(b"\n", data.find(found)) >= 0:
                break
        return bytes(data), found

    def _wait_agent(self, wait: float) -> str:
        deadline = time.monotonic() + wait
        seen, found = self._read_for((b"agent up", b" config: "), deadline)
        if found == b" config: ":
            line = seen[seen.rfind(b"\n", 0, seen.find(found)) + 1:].split(b"\n")[0]
            why = line.decode(errors="replace").strip().split(" config: ", 1)[-1]
            self.config_refused = why
            return f"agent restarted; it refuses to run without a valid config ({why})"
        if found is None:
            tail = " | ".join(x.strip() for x in seen[-160:].decode(errors="replace").splitlines() if x.strip())
            return f"agent restart sent, but it did not say 'agent up' within {wait:g} s (last output: {tail or 'none'})"
        time.sleep(0.05)  # its console task starts reading right after the line
        s = self.t.serial
        for _ in range(3):
            s.write(b"@status\n")
            s.flush()
            until = time.monotonic() + 5
            while time.monotonic() < until:
                line = self._read_until(b"\n", until).strip()
                if line.startswith(b"@{"):
                    try:
                        st = json.loads(line[1:])
                    except ValueError:
                        continue
                    if st.get("end"):
                        st.pop("end", None)
                        self.agent_status = st
                        mk = st.get("market")
                        if isinstance(mk, dict) and mk.get("sid") is not None and not st.get("time_trusted"):
                            # a restart forgets the signed time: the schedule waits for it
                            self.time_warning = (
                                f"{self.port}: the restarted agent has no trusted time, so its market schedule "
                                "is not executed (what economics held open comes back on after its min off) "
                                f"until `gridshed time-sync --device {st.get('device') or 'DEVICE'}`")
                            self.warnings.append(self.time_warning)
                        if "error" in st:
                            return f"agent restarted (agent up), @status answered an error: {st['error']}"
                        return f"agent restarted: it answers @status (state {st.get('state')})"
        return "agent restarted (agent up), but it did not answer @status"

    def maintenance_boot(self, why: str) -> None:
        """Reset the board into a maintenance boot (firmware main.py's flag file, maint_boot.py): the
        agent is not started, so the host's helpers get the whole heap. Bounded like any stop: the
        flag carries the lease (LEASE_S), the board resets into the agent when it runs out without
        this host's _gs_keep calls, and restart_agent() ends it (the flag is gone by then)."""
        if not self.maint_flag:  # the cleanup could not say (short of heap itself): ask in one short line
            with contextlib.suppress(Exception):
                out, _ = self._exec_raw("print('gs-f',_gs_stop is not None)", timeout=5)
                if out.split() == [b"gs-f", b"True"]:  # this firmware's main.py stopped the agent
                    self.maint_flag = MAINT_FLAG
        if not self.maint_flag:
            raise BoardError(f"{self.port}: {why}, and the board's main.py has no maintenance boot (deploy this "
                             "gridshed's firmware from a board with more free heap, or erase and flash it)")
        try:
            out, err = self._exec_raw("f=open(%r,'w')\nf.write('%d')\nf.close()\nprint('gs-flag')"
                                      % (self.maint_flag, LEASE_S), timeout=10)
        except Exception as exc:
            raise BoardError(f"{self.port}: {why}; could not ask for a maintenance boot ({exc})") from None
        if b"gs-flag" not in out:
            said = (err or out).decode(errors="replace").strip().splitlines()
            raise BoardError(f"{self.port}: {why}; could not ask for a maintenance boot "
                             f"({said[-1] if said else 'no answer'})")
        self.restart_agent(wait=0)  # soft reset: main.py finds the flag
        seen, found = self._read_for((b"maintenance boot",), time.monotonic() + MAINT_BOOT_WAIT)
        if found is None:
            tail = seen[-160:].decode(errors="replace").strip()
            raise BoardError(f"{self.port}: {why}; the board did not come back in a maintenance boot within "
                             f"{MAINT_BOOT_WAIT:g} s (last output: {tail!r})")
        self._read_until(b">>> ", time.monotonic() + 5)
        self.enter_raw()
        self.maint_boot = why

    @contextlib.contextmanager
    def stopped(self, restart: bool = True, wait: float = AGENT_UP_WAIT,
                say: Callable[[str], None] | None = None, full_heap: bool = False,
                maint_boot: bool = False) -> Iterator["Board"]:
        """The agent stopped for raw-REPL work; restarted afterwards whatever happens.

        The outcome (one line) is in self.outcome. When the work fails, it ends the error's own
        line (a UserError), or goes to `say` (host Ctrl-C, anything else). `wait`: how long to
        wait for the restarted agent ("agent up", then @status), if the board ran the agent when
        it was stopped (it had a maintenance window) or `wait_for_agent` was set meanwhile (the
        work put the agent on it). restart=False leaves it stopped on purpose: the board then
        resets into the agent when its maintenance window ends.

        The work gets a maintenance boot (maintenance_boot) first when the stopped agent's heap
        cannot give one NEED_HEAP block, or with full_heap=True (a run again after the work's
        helpers hit MemoryError: run_with_full_heap), or with maint_boot=True (the user asked:
        `deploy --maintenance-boot`).
        """
        try:
            self.enter_raw()
            if full_heap or maint_boot or (not self.heap_ok and self.maint_flag):
                self.maintenance_boot("the host's helpers ran out of heap beside the stopped agent" if full_heap
                                      else "asked for (--maintenance-boot)" if maint_boot
                                      else f"the stopped agent's heap has no {NEED_HEAP}-byte block free "
                                           f"({self.mem_free} bytes free)")
            yield self
        except BaseException as exc:
            self.outcome = self._finish(restart, wait)
            if isinstance(exc, UserError) and exc.args:
                exc.args = (f"{exc.args[0]}; {self.outcome}",) + exc.args[1:]
            elif say:
                say(self.outcome)
            raise
        self.outcome = self._finish(restart, wait)

    def _finish(self, restart: bool, wait: float) -> str:
        out = self._finish_restart(restart, wait)
        if self.maint_boot:
            out += (f"; the write ran in a maintenance boot ({self.maint_boot}: the agent was not started, "
                    f"protection off for the write only, on a {LEASE_S} s lease)")
        return out

    def _finish_restart(self, restart: bool, wait: float) -> str:
        left = self.maint_left
        window = (f"the board resets into the agent by itself within {left + 8} s of its last exchange with "
                  "this host (its maintenance window)"
                  if left is not None else "reset the board (button or power) to start it")
        if not restart:
            if self.raw:
                return f"agent left stopped at the REPL (--no-restart): protection is OFF; {window}"
            return "agent not restarted (--no-restart)"
        if not (self.maint_left is not None or self.wait_for_agent):
            wait = 0.0  # not our agent (an older one, or none): nothing to wait for
        with sigint_deferred() as hits:
            try:
                out = self.restart_agent(wait=wait)
                if not out.startswith("agent restarted") and left is not None:
                    out += f"; if it is still stopped, {window}"
            except Exception as exc:
                out = f"could not restart the agent ({exc}): protection is OFF; {window}"
        if not self.reached and out == "agent restarted":
            out = "agent restart sent (Ctrl-C, Ctrl-D), but no MicroPython REPL ever answered on this port"
        if hits:
            out += " (Ctrl-C held back while restarting)"
        return out

    # ---- code execution ------------------------------------------------------------------
    def _raw_paste(self, data: bytes, deadline: float) -> None:
        """mpremote's raw-paste write, with an overall deadline."""
        from mpremote.transport import TransportError

        s = self.t.serial
        hdr = s.read(2)
        if len(hdr) != 2:
            raise TransportError("no raw-paste window size")
        window = struct.unpack("<H", hdr)[0]
        remain = window
        i = 0
        while i < len(data):
            while remain == 0 or s.in_waiting:
                if time.monotonic() > deadline:
                    raise TransportError("the board stopped taking the code (raw paste)")
                c = s.read(1)
                if c == b"\x01":
                    remain += window
                elif c == b"\x04":  # abrupt end (the board refused the code): acknowledge
                    s.write(b"\x04")
                    return
                elif c:
                    raise TransportError(f"unexpected read during raw paste: {c!r}")
            part = data[i:i + remain]
            s.write(part)
            remain -= len(part)
            i += len(part)
        s.write(b"\x04")
        if not self._read_until(b"\x04", deadline).endswith(b"\x04"):
            raise TransportError("the board did not acknowledge the code (raw paste)")

    def _exec_raw(self, code: str, timeout: float) -> tuple[bytes, bytes]:
        """Run `code` in the raw REPL: (stdout, stderr); TransportError past `timeout` overall."""
        from mpremote.transport import TransportError

        t = self.t
        s = t.serial
        deadline = time.monotonic() + timeout
        if not self._read_until(b">", min(deadline, time.monotonic() + 5)).endswith(b">"):
            raise TransportError("no raw REPL prompt")
        data = code.encode()
        pasted = False
        if t.use_raw_paste:
            s.write(b"\x05A\x01")
            r = s.read(2)
            if r == b"R\x01":
                self._raw_paste(data, deadline)
                pasted = True
            elif r == b"R\x00":  # the board has no raw paste
                t.use_raw_paste = False
            else:
                said = r + self._drain(limit=1.0)
                if not said:
                    raise TransportError("nothing came back (cable pulled, or the board lost power?)")
                raise TransportError("the board did not take the code (it answered %r)" % said[-200:].decode(errors="replace"))
        if not pasted:
            for i in range(0, len(data), 256):
                s.write(data[i:i + 256])
                time.sleep(0.01)
            s.write(b"\x04")
            r = s.read(2)
            if r != b"OK":
                said = r + self._drain(limit=1.0)
                raise TransportError("the board did not take the code (it answered %r)" % said[-200:].decode(errors="replace"))
        out = self._read_output(deadline)
        if not out.endswith(b"\x04"):
            raise TransportError(f"no answer within {timeout:g} s")
        err = self._read_until(b"\x04", max(deadline, time.monotonic() + 1))
        if not err.endswith(b"\x04"):
            raise TransportError(f"no answer within {timeout:g} s")
        return out[:-1], err[:-1]

    def _read_output(self, deadline: float) -> bytes:
        """An exec's output up to its \\x04; TransportError at once if the board resets meanwhile
        (a power cut with the USB-serial adapter still powered: the boot's lines come instead)."""
        from mpremote.transport import TransportError

        data = b""
        while True:
            data += self._read_until(b"\x04", min(deadline, time.monotonic() + 0.5))
            if data.endswith(b"\x04") or time.monotonic() >= deadline:
                return data
            if any(m in data for m in REBOOT_MARKS):
                raise TransportError("the board reset while running the code")

    def exec(self, code: str, timeout: float = 10) -> bytes:
        from mpremote.transport import TransportError

        if not self.raw:
            self.enter_raw()
        if self.maint_left is not None and time.monotonic() - self._kept >= KEEP_EVERY:
            code = "_gs_keep(%d,1)\n" % LEASE_S + code  # still working: the board's maintenance window goes on
            self._kept = time.monotonic()
        try:
            out, err = self._exec_raw(code, timeout=timeout)
        except TransportError as exc:
            raise BoardError(f"{self.port}: board stopped answering: {exc}") from None
        except OSError as exc:  # serial.SerialException: the cable / pty went away
            raise BoardError(f"{self.port}: lost the connection: {exc}") from None
        if err:
            said = err.decode(errors='replace').strip().splitlines()[-1]
            raise (BoardMemoryError if "MemoryError" in said else BoardError)(f"{self.port}: error on the board: {said}")
        return out

    def eval(self, expr: str) -> Any:
        out = self.exec("print(repr(%s))" % expr)
        return ast.literal_eval(out.decode().strip())

    # ---- filesystem ----------------------------------------------------------------------
    def hashes(self, paths: Iterable[str]) -> dict[str, str | None]:
        """sha256 (hex) of each file computed on the board; None when the file is missing."""
        paths = list(paths)
        result: dict[str, str | None] = {}
        for i in range(0, len(paths), 40):
            part = paths[i:i + 40]
            out = self.exec(_HASH_CODE.format(paths=part), timeout=30).decode()
            for line in out.splitlines():
                if " " not in line:
                    continue
                p, h = line.rsplit(" ", 1)
                result[p] = None if h == "-" else h
        return result

    def walk(self, root: str = "") -> dict[str, int]:
        """Every file under `root` (relative to the board's cwd): {path: size}."""
        out = self.exec(_WALK_CODE.format(root=root.strip("/")), timeout=30).decode()
        files = {}
        for line in out.splitlines():
            size, _, path = line.partition(" ")
            if path:
                files[path] = int(size)
        return files

    def makedirs(self, dirs: Iterable[str]) -> None:
        dirs = sorted({d for d in dirs if d})
        if not dirs:
            return
        self.exec("import os\nfor d in %r:\n try:\n  os.mkdir(d)\n except OSError:\n  pass\n" % dirs)

    def put(self, path: str, data: bytes, progress: Callable[[int], None] | None = None) -> None:
        """Write `data` to `path` on the board (base64 chunks through the raw REPL)."""
        self.exec("import binascii\n_gs_f=open(%s,'wb')\n_gs_w=_gs_f.write\n_gs_a=binascii.a2b_base64" % _quote(path))
        try:
            for i in range(0, len(data), self.chunk):
                part = data[i:i + self.chunk]
                self.exec("_gs_w(_gs_a(%r))" % binascii.b2a_base64(part, newline=False).decode())
                if progress:
                    progress(len(part))
        except BaseException as exc:
            # the first error is the one to report; after a host Ctrl-C the console is in an
            # unknown state: the soft reset that restarts the agent closes the file
            if not isinstance(exc, KeyboardInterrupt):
                with contextlib.suppress(UserError):
                    self.exec("_gs_f.close()")
            raise
        self.exec("_gs_f.close()")

    def get(self, path: str) -> bytes | None:
        """A file's bytes, or None when it does not exist."""
        code = ("import binascii\ntry:\n f=open(%s,'rb')\nexcept OSError:\n print('-')\nelse:\n"
                " while 1:\n  b=f.read(%d)\n  if not b:break\n  print(binascii.b2a_base64(b).decode().strip())\n"
                " f.close()\n print('.')\n" % (_quote(path), min(self.chunk, 384)))
        out = self.exec(code, timeout=30).decode().split()
        if out[:1] == ["-"]:
            return None
        return b"".join(binascii.a2b_base64(x) for x in out if x != ".")

    def remove(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        if paths:
            self.exec("import os\nfor p in %r:\n try:\n  os.remove(p)\n except OSError:\n  pass\n" % paths)

    def rename(self, old: str, new: str) -> None:
        self.exec("import os\nos.rename(%s,%s)" % (_quote(old), _quote(new)))

    def switch_over(self, renames: list[tuple[str, ...]], removes: list[str], plan_path: str,
                    commit: bool = True) -> None:
        """Commit and run a switch-over: staged files (already verified) renamed over their targets.

        renames: (staged, target, sha256 of the staged file). commit=False finishes a plan already
        committed on the board (finish_interrupted). Otherwise the plan goes to the board first as
        `plan_path`.tmp; ONE exec then renames it into place (the commit), renames every staged
        file over its target, removes `removes` and deletes the plan. It runs on the board by
        itself, so a host that disappears midway does not stop it; a reset midway is finished by
        the firmware at the next boot (agent/boot.py finish_switch), and by finish_interrupted()
        on a board whose firmware predates that.

        When the exec fails (an error on the board, the board reset, the connection), the board
        is asked what happened: committed (finished here, or at its boot) returns as a success;
        not committed raises "nothing was switched"; when it cannot be asked, the error says the
        board has all old or all new files, never a mix.
        """
        if commit:
            plan = {"renames": [list(r) for r in renames], "removes": list(removes)}
            self.put(plan_path + ".tmp", json.dumps(plan).encode())
        code = _SWITCH_CODE.format(commit="_gs_r(%r,%r)" % (plan_path + ".tmp", plan_path) if commit else "",
                                   plan=plan_path, renames=[list(r[:2]) for r in renames], removes=list(removes))
        try:
            out = self.exec(code, timeout=60)
            if b"switched" in out:
                return
            error = f"{self.port}: switch-over did not complete: {out[-200:]!r}"
        except BoardError as exc:
            error = str(exc)
        state = self._switch_state(renames, plan_path) if commit else None
        if state == "done":
            return
        if state == "committed":  # the plan is there: finish it now (its boot would, too)
            self.switch_over(renames, removes, plan_path, commit=False)
            return
        if state == "old":
            raise BoardError(f"{error}; nothing was switched")
        raise BoardError(f"{error}; the board has either all the old files or all the new ones, never a "
                         "mix (a committed switch-over is finished at its next boot): check with `gridshed status`")

    def _switch_state(self, renames: list[tuple[str, ...]], plan_path: str) -> str | None:
        """After a failed switch-over exec: "committed" (the plan is on the board), "done" (every
        target has its new hash), "old" (neither), None (the board cannot be asked)."""
        for _ in range(2):
            try:
                have = self.hashes([r[1] for r in renames] + [plan_path])
            except UserError:
                self.raw = False  # it may have reset and be running the agent: stop it, ask again
                continue
            if have.get(plan_path):
                return "committed"
            if all(have.get(r[1]) == r[2] for r in renames):
                return "done"
            return "old"
        return None


class Console:
    """The agent's line protocol on its console, while it runs."""

    def __init__(self, port: str, baudrate: int = 115200) -> None:
        import serial

        self.port = port
        try:
            self.s = open_retrying(port, lambda: serial.Serial(port, baudrate=baudrate, timeout=0.05, exclusive=True))
        except (serial.SerialException, OSError) as exc:
            raise BoardError(open_error(port, exc)) from None
        self._buf = bytearray()
        self.log_lines: list[str] = []

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.s.close()
        except Exception:
            pass

    def flush_input(self) -> None:
        self.s.reset_input_buffer()
        time.sleep(0.02)
        while self.s.in_waiting:
            self.s.read(self.s.in_waiting)
        self._buf.clear()

    def readline(self, timeout: float) -> str | None:
        end = time.monotonic() + timeout
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i]).rstrip(b"\r")
                del self._buf[:i + 1]
                return line.decode(errors="replace")
            if time.monotonic() >= end:
                return None
            data = self.s.read(max(1, self.s.in_waiting))
            if data:
                self._buf += data

    def request(self, verb: str, arg: str = "", timeout: float = 5.0,
                on_log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """Send ``@verb arg`` and return the answer objects (the last has "end": true)."""
        self.flush_input()
        line = ("@%s %s" % (verb, arg)).strip() + "\n"
        self.s.write(line.encode())
        self.s.flush()
        answers: list[dict[str, Any]] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.readline(end - time.monotonic())
            if text is None:
                break
            if text.startswith("@{"):
                try:
                    obj = json.loads(text[1:])
                except ValueError:
                    continue
                answers.append(obj)
                if obj.get("end"):
                    return answers
            elif text:
                self.log_lines.append(text)
                if on_log:
                    on_log(text)
        tail = " | ".join(self.log_lines[-3:])
        said = self.log_lines[-20:] + [self._buf.decode(errors="replace")]
        # the agent never echoes a request; a REPL does (and answers it with a SyntaxError)
        if any(x.strip().startswith(line.strip()) for x in said) or _at_repl(" ".join(said)):
            raise BoardError(f"{self.port}: no answer to @{verb} within {timeout:.2g} s: the board is at its "
                             "MicroPython REPL, the agent is not running and PROTECTION IS OFF. A stopped agent "
                             "comes back when its maintenance window ends (docs/failsafes.md), at once with Ctrl-D "
                             "in a terminal on the port or the reset button; a board without it needs `gridshed "
                             f"deploy` (last console output: {tail or 'none'})")
        raise BoardError(f"{self.port}: no answer to @{verb} within {timeout:.2g} s; is the agent running, the "
                         "cable in? (an agent out of memory for the answer stays silent too: try again in a moment) "
                         f"(last console output: {tail or 'none'})")

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        ans = self.request("status", timeout=timeout)
        st = dict(ans[-1])
        st.pop("end", None)
        return st

    def events(self, since: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        ans = self.request("events", str(since), timeout=timeout)
        return [a["rec"] for a in ans if "rec" in a]




def run_with_full_heap(work: Callable[[bool], T]) -> T:
    """work(full_heap) (a host operation that opens the board and runs in Board.stopped(full_heap=
    full_heap)); once more in a maintenance boot when its helpers hit MemoryError on the board
    (nothing was switched by then: the write is staged, then switched in one exec)."""
    try:
        return work(False)
    except BoardMemoryError as exc:
        first = str(exc)
    try:
        return work(True)
    except UserError as exc:
        exc.args = (f"{exc.args[0]} (a first try had failed: {first})",) + exc.args[1:]
        raise
