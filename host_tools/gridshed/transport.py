"""Board access over a serial port: mpremote's SerialTransport for the raw REPL, pyserial for the console.

Two ways to talk to a board:

* :class:`Board` stops the agent (Ctrl-C), enters the raw REPL and runs code there (file hashes,
  writes, renames). It never soft-resets on entry (mpremote's ``resume`` semantics: on the virtual
  board Ctrl-D ends the process). :meth:`Board.restart_agent` leaves the raw REPL and presses
  Ctrl-D at the friendly REPL: a board soft-reboots and runs main.py; the virtual board's
  supervisor starts the process again.
* :class:`Console` speaks the agent's console protocol (``@status`` ... answered by ``@{json}``
  lines, the last with ``"end": true``) without interrupting it.
"""
from __future__ import annotations

import ast
import binascii
import json
import time
from typing import Any, Callable, Iterable

from .errors import UserError


class BoardError(UserError):
    """The board did not answer as expected (not running MicroPython, busy, unplugged...)."""


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


_FREE_CODE = """
import sys,gc
for _k in list(sys.modules):
 if _k.startswith('agent') or _k=='main':
  del sys.modules[_k]
for _k in list(globals()):
 if _k[0]!='_' and _k not in ('sys','gc'):
  del globals()[_k]
gc.collect()
"""


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
            self.t = SerialTransport(port, baudrate=baudrate, timeout=1)
        except TransportError as exc:
            import os

            if not os.path.exists(port):
                why = "no such port (is the board plugged in? `gridshed ports` lists the attached ones)"
            elif not os.access(port, os.R_OK | os.W_OK):
                why = "permission denied (on Linux: add yourself to the dialout group and log in again)"
            else:
                why = f"{exc} (is another program using it?)"
            raise BoardError(f"cannot open {port}: {why}") from None
        except Exception as exc:  # serial.SerialException and OSError
            raise BoardError(f"cannot open {port}: {exc}") from None
        self.raw = False

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

    def enter_raw(self, attempts: int = 3) -> None:
        """Stop whatever runs (Ctrl-C) and enter the raw REPL, without a soft reset."""
        s = self.t.serial
        seen = b""
        for _ in range(attempts):
            s.write(b"\r\x03")
            # wait for the friendly prompt (a running agent prints its traceback first)
            seen = self.t.read_until(1, b">>> ", timeout=0.5, timeout_overall=2)
            self._drain()
            s.write(b"\r\x01")
            data = self.t.read_until(1, b"raw REPL; CTRL-B to exit\r\n", timeout=1, timeout_overall=3)
            if data.endswith(b"raw REPL; CTRL-B to exit\r\n"):
                self.t.in_raw_repl = True
                self.raw = True
                self._free_memory()
                return
            seen = data or seen
            s.write(b"\r\x02")  # back to the friendly REPL and try again
            self._drain(limit=0.5)
        tail = seen[-120:].decode(errors="replace").strip()
        raise BoardError(f"{self.port}: no MicroPython raw REPL answered (last output: {tail!r}); "
                         "is this a MicroPython board, and is no other program using the port?")

    def _free_memory(self) -> None:
        """Drop the stopped agent's modules so the small heap has room for our helpers."""
        try:
            self.t.exec_raw(_FREE_CODE, timeout=5)
        except Exception:
            pass

    def exit_raw(self) -> None:
        self.t.serial.write(b"\r\x02")
        self.t.in_raw_repl = False
        self.raw = False

    def restart_agent(self) -> None:
        """Soft reset from the friendly REPL: the board reboots and runs main.py."""
        if not self.raw:
            self.enter_raw()
        self.exit_raw()
        self.t.read_until(1, b">>> ", timeout=0.5, timeout_overall=2)
        self.t.serial.write(b"\x04")
        self.t.serial.flush()
        time.sleep(0.05)

    # ---- code execution ------------------------------------------------------------------
    def exec(self, code: str, timeout: float = 10) -> bytes:
        from mpremote.transport import TransportError

        if not self.raw:
            self.enter_raw()
        try:
            out, err = self.t.exec_raw(code, timeout=timeout)
        except TransportError as exc:
            raise BoardError(f"{self.port}: board stopped answering: {exc}") from None
        if err:
            raise BoardError(f"{self.port}: error on the board: {err.decode(errors='replace').strip().splitlines()[-1]}")
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
        finally:
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

    def run_plan(self, renames: list[tuple[str, str]], removes: list[str], plan_path: str) -> None:
        """Renames then removes, all in one exec on the board, then delete the plan file.

        The whole switch-over runs on the board in one go: a host that disappears midway does
        not stop it. The plan file (written before) lets the next deploy finish a switch-over
        cut short by power loss.
        """
        code = ("import os\nfor a,b in %r:\n try:\n  os.remove(b)\n except OSError:\n  pass\n"
                " try:\n  os.rename(a,b)\n except OSError:\n  pass\n"
                "for p in %r:\n try:\n  os.remove(p)\n except OSError:\n  pass\n"
                "try:\n os.remove(%r)\nexcept OSError:\n pass\nprint('switched')\n" % (renames, removes, plan_path))
        out = self.exec(code, timeout=30)
        if b"switched" not in out:
            raise BoardError(f"{self.port}: switch-over did not complete: {out[-200:]!r}")


class Console:
    """The agent's line protocol on its console, while it runs."""

    def __init__(self, port: str, baudrate: int = 115200) -> None:
        import serial

        self.port = port
        try:
            self.s = serial.Serial(port, baudrate=baudrate, timeout=0.05, exclusive=True)
        except (serial.SerialException, OSError) as exc:
            raise BoardError(f"cannot open {port}: {exc}") from None
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
        raise BoardError(f"{self.port}: no answer to @{verb} within {timeout:g} s; is the agent running? "
                         f"(last console output: {tail or 'none'})")

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        ans = self.request("status", timeout=timeout)
        st = dict(ans[-1])
        st.pop("end", None)
        return st

    def events(self, since: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        ans = self.request("events", str(since), timeout=timeout)
        return [a["rec"] for a in ans if "rec" in a]
