"""ROMFS: the agent's bytecode in a read-only flash partition, executed in place (docs/romfs.md).

Three parts:

* :func:`make_image` packs a build's .mpy files into a ROMFS image with mpremote's
  ``VfsRomWriter`` (``gridshed build --romfs``);
* :func:`query` / :func:`write_image` / :func:`image_hash` / :func:`check_mounted` speak the ports'
  ``vfs.rom_ioctl`` protocol through the project's own transport (:class:`gridshed.transport.Board`,
  raw REPL over pyserial), in the order mpremote's ``romfs deploy`` uses: query the partition
  (1 count, 2 segment, 6 erase-block size), unmount ``/rom``, erase (3), write (4), complete (5).
  `gridshed deploy --romfs` (deploy.py) adds the filesystem side: main.py, and removing the agent's
  files from the filesystem, which would shadow the ROM copy (``''`` is before ``/rom`` on
  ``sys.path``);
* :func:`measure_imports` runs the real micropython to compare the heap cost of importing modules
  from .mpy files with importing them from a ``VfsRom`` image.

main.py stays on the filesystem: MicroPython runs boot.py / main.py from the filesystem only,
never from /rom.
"""
from __future__ import annotations

import ast
import binascii
import hashlib
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from .errors import UserError
from .transport import Board, BoardError

IMAGE = "romfs.img"          # the image's name in a build folder
HEADER = b"\xd2\xcd\x31"     # every ROMFS image starts with it
CHUNK = 2048                 # image bytes per raw-REPL exec (base64: ~2.8 KB of code)
ERASE_STEP = 32768           # erase in steps, as mpremote: one long C call stalls the USB
DOC = "docs/romfs.md"

Progress = Callable[[str, dict[str, Any]], None]


class RomfsError(UserError):
    """The board cannot take the image (no ROMFS partition, image too big, write refused)."""


# ---- image ---------------------------------------------------------------------------------
def make_image(root: str | Path, files: Iterable[str]) -> bytes:
    """A ROMFS image holding `files` (paths relative to `root`, as on the board)."""
    from mpremote.romfs import VfsRomWriter

    tree: dict[str, Any] = {}
    for f in sorted(set(files)):
        parts = PurePosixPath(f).parts
        node = tree
        for d in parts[:-1]:
            node = node.setdefault(d, {})
            if not isinstance(node, dict):
                raise UserError(f"ROMFS image: {f} is under a file, not a directory")
        node[parts[-1]] = f
    w = VfsRomWriter()

    def add(node: dict[str, Any]) -> None:
        for name in sorted(node):
            sub = node[name]
            if isinstance(sub, dict):
                w.opendir(name)
                add(sub)
                w.closedir()
            else:
                w.mkfile(name, (Path(root) / sub).read_bytes())

    add(tree)
    return bytes(w.finalise())


def image_size(head: bytes) -> int | None:
    """Length of the ROMFS image that starts with `head` (its header), None if it is not one."""
    if not head.startswith(HEADER):
        return None
    n = 0
    for i, b in enumerate(head[3:12]):
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            return 3 + i + 1 + n
    return None


def top_names(files: Iterable[str]) -> list[str]:
    """The image's top-level entries (``agent`` for ``agent/app.mpy``)."""
    return sorted({PurePosixPath(f).parts[0] for f in files})


def shadow_candidates(files: Iterable[str]) -> list[str]:
    """Filesystem names that would be found before /rom for the image's modules.

    A directory on the filesystem named like a package in the image shadows it whole (MicroPython
    imports a directory without __init__ as a namespace package), so the directory is listed.
    """
    out = set()
    for f in files:
        parts = PurePosixPath(f).parts
        if len(parts) > 1:
            out.add(parts[0])
        elif f.endswith(".mpy"):
            out.update((f, f[:-4] + ".py"))
        else:
            out.add(f)
    return sorted(out)


# ---- on the board: the ports' vfs.rom_ioctl protocol -----------------------------------------
def query(b: Board, rom_id: int = 0) -> dict[str, Any]:
    """The ROMFS partition `rom_id`: {"size", "block", "object"}; RomfsError (one line) if none.

    ``object``: the port hands out a block device (ioctl / writeblocks) rather than a memoryview.
    """
    b.exec("import vfs")
    if not b.eval("hasattr(vfs,'rom_ioctl')"):
        raise RomfsError(f"{b.port}: the board has no ROMFS support (no vfs.rom_ioctl: MicroPython older than "
                         f"1.25 or a firmware built without it); see {DOC}")
    count = b.eval("vfs.rom_ioctl(1)")
    if not isinstance(count, int) or count <= rom_id:
        raise RomfsError(f"{b.port}: the board has no ROMFS partition {rom_id} (vfs.rom_ioctl(1) = {count}); "
                         f"flash a firmware / partition table with one, see {DOC}")
    b.exec("_gs_dev=vfs.rom_ioctl(2,%d)" % rom_id)
    if b.eval("isinstance(_gs_dev,int)"):
        raise RomfsError(f"{b.port}: ROMFS partition {rom_id} not found (vfs.rom_ioctl(2) = "
                         f"{b.eval('_gs_dev')}); see {DOC}")
    if b.eval("hasattr(_gs_dev,'ioctl')"):
        block = b.eval("_gs_dev.ioctl(5,0)")
        return {"id": rom_id, "object": True, "block": block, "size": b.eval("_gs_dev.ioctl(4,0)") * block}
    size = b.eval("len(_gs_dev)")
    try:
        block = b.eval("vfs.rom_ioctl(6,%d)" % rom_id)   # newer ports: erase in blocks
    except BoardError:
        block = 0
    if not isinstance(block, int) or block <= 0:
        block = size                                     # older ports: the whole partition at once
    return {"id": rom_id, "object": False, "block": block, "size": size}


_QUIET = """
import machine
for _p in {pins!r}:
 try:
  machine.Pin(_p).irq(handler=None)
 except Exception:
  pass
"""


def agent_pins(b: Board, board: dict[str, Any]) -> list[int]:
    """Pins the agent may have left an interrupt handler on: the board's inputs and the site
    config's ac_sense pin (agent/features/ac_sense.py keeps a hard IRQ on it, which Ctrl-C does not remove)."""
    pins = {v for v in (board.get("inputs") or {}).values() if isinstance(v, int)}
    raw = b.get("config.cbor")
    if raw:
        try:
            from .siteconfig import read_settings

            acs = read_settings(raw).get("ac_sense") or {}
            if isinstance(acs.get("pin"), int):
                pins.add(acs["pin"])
        except Exception:
            pass
    return sorted(pins)


def quiet_irqs(b: Board, pins: list[int]) -> None:
    """Remove pin interrupt handlers before the flash their bytecode runs from is rewritten.

    Ctrl-C stops the agent's tasks but not a pin IRQ: with the agent in ROMFS its handler runs
    from the partition, and an edge during the erase would execute half-written bytecode.
    (mpremote soft-resets instead, which would also stop the maintenance window's watchdog feeder,
    maint.py, compiled into RAM for that reason.)
    """
    if pins:
        b.exec(_QUIET.format(pins=pins), timeout=10)


_HASH_ROM = """
import hashlib
_h=hashlib.sha256();_n={n}
if hasattr(_gs_dev,'readblocks'):
 _k={block};_b=bytearray(_k);_i=0
 while _i*_k<_n:
  _gs_dev.readblocks(_i,_b);_h.update(memoryview(_b)[:min(_k,_n-_i*_k)]);_i+=1
 del _b
else:
 _m=memoryview(_gs_dev)
 for _i in range(0,_n,1024):_h.update(_m[_i:min(_i+1024,_n)])
 del _m
print(''.join('%02x'%_x for _x in _h.digest()))
"""


def image_hash(b: Board, part: dict[str, Any], n: int) -> str:
    """sha256 of the partition's first `n` bytes, computed on the board."""
    n = min(n, part["size"])
    out = b.exec(_HASH_ROM.format(n=n, block=part["block"]), timeout=60).decode().split()
    return out[-1] if out else ""


def _check(b: Board, code: str, what: str) -> None:
    """Run an ioctl expression on the board; a negative int result is the port's -errno."""
    r = b.eval(code)
    if isinstance(r, int) and r < 0:
        raise RomfsError(f"{b.port}: {what} failed on the board (error {-r}); the ROMFS partition "
                         "may hold a partial image now: run the deploy again")


def check_fits(b: Board, part: dict[str, Any], image: bytes, manifest: dict[str, Any] | None = None) -> None:
    """RomfsError (one line) unless `image` is a ROMFS image that fits the partition; checked
    before anything is erased. Too big: how to fit it (a build with only the site's features when
    `manifest` carries more than one could leave out, else a bigger partition)."""
    if not image.startswith(HEADER):
        raise RomfsError("not a ROMFS image (bad header); rebuild with `gridshed build --romfs`")
    if len(image) > part["size"]:
        m = manifest or {}
        if m.get("all_features") and m.get("features"):
            how = (f"build only the site's features: `gridshed build --board {m.get('board', 'BOARD')} --site SITE.toml "
                   f"--romfs` (this build carries {', '.join(m['features'])})")
        else:
            how = "make the partition bigger"
        raise RomfsError(f"{b.port}: the ROMFS image is {len(image)} bytes, the board's ROMFS partition "
                         f"{part['size']} bytes; {how}; nothing was written (see {DOC})")


def write_image(b: Board, part: dict[str, Any], image: bytes, progress: Progress | None = None) -> None:
    """Erase and write `image` into the partition (the mpremote romfs deploy sequence)."""
    progress = progress or (lambda e, i: None)
    rid, size, block = part["id"], part["size"], part["block"]
    check_fits(b, part, image)
    # nothing may run from the old image while it is rewritten (the agent is stopped)
    b.exec("try:\n vfs.umount('/rom')\nexcept OSError:\n pass")
    progress("rom-prepare", {"size": len(image), "partition": size})
    min_write = 1
    if part["object"]:
        for blk in range(-(-len(image) // block)):
            _check(b, "_gs_dev.ioctl(6,%d)" % blk, "erasing block %d" % blk)
        chunk = min(CHUNK, block)
    else:
        if block < size:
            off = 0
            while off < len(image):
                step = min(len(image) - off, ERASE_STEP)
                step = -(-step // block) * block
                r = b.eval("vfs.rom_ioctl(3,%d,%d,%d)" % (rid, off, step))
                if not isinstance(r, int) or r <= 0:
                    raise RomfsError(f"{b.port}: erasing the ROMFS partition at {off} failed (result {r})")
                min_write = r
                off += step
        else:
            r = b.eval("vfs.rom_ioctl(3,%d,%d)" % (rid, len(image)))
            if not isinstance(r, int) or r <= 0:
                raise RomfsError(f"{b.port}: erasing the ROMFS partition failed (result {r})")
            min_write = r
        chunk = -(-max(CHUNK, min_write) // min_write) * min_write
    b.exec("from binascii import a2b_base64 as _gs_a")
    progress("rom-write", {"size": len(image), "chunk": chunk})
    # the first chunk (the image header) last: a write cut short leaves an erased header, which
    # the port does not mount at boot, never a mountable image with missing modules
    offs = list(range(0, len(image), chunk))
    for off in offs[1:] + offs[:1]:
        part_bytes = image[off:off + chunk]
        # whole write units (a block device: whole chunks, as mpremote), never past the partition
        unit = chunk if part["object"] else min_write
        part_bytes += bytes(-len(part_bytes) % unit)
        data = binascii.b2a_base64(part_bytes, newline=False).decode()
        if part["object"]:
            code = "_gs_dev.writeblocks(%d,_gs_a(%r),%d)" % (off // block, data, off % block)
            b.exec(code, timeout=30)
        else:
            _check(b, "vfs.rom_ioctl(4,%d,%d,_gs_a(%r))" % (rid, off, data), "writing at offset %d" % off)
        progress("bytes", {"n": min(chunk, len(image) - off)})
    if not part["object"]:
        _check(b, "vfs.rom_ioctl(5,%d)" % rid, "completing the write")


_MOUNT_CHECK = """
import vfs,os
try:
 vfs.umount('/rom')
except OSError:
 pass
vfs.mount(vfs.VfsRom(_gs_dev),'/rom')
_l=os.listdir('/rom')
print(repr(_l))
"""


def check_mounted(b: Board, part: dict[str, Any], top: list[str]) -> None:
    """Mount the new image at /rom on the board (as the next boot will) and find its entries."""
    if part["object"]:
        return  # a block-device partition is mounted by the port's own driver at boot
    try:
        out = b.exec(_MOUNT_CHECK, timeout=10).decode().strip()
    except BoardError as exc:
        raise RomfsError(f"{b.port}: the board cannot mount the written image ({exc}); run the deploy again") from None
    have = set(ast.literal_eval(out.splitlines()[-1]))
    missing = [t for t in top if t not in have]
    if missing:
        raise RomfsError(f"{b.port}: /rom lacks {missing[0]} after the write; run the deploy again")


_FIND_SHADOWS = """
import os
def _gs_s(p):
 try:
  m=os.stat(p)[0]
 except OSError:
  return
 print(('d ' if m&0x4000 else 'f ')+p)
 if m&0x4000:
  for e in os.ilistdir(p):
   _gs_s(p+'/'+e[0])
for _p in {names!r}:
 _gs_s(_p)
"""

_RMTREE = """
import os
def _gs_r(p):
 try:
  m=os.stat(p)[0]
 except OSError:
  return
 if m&0x4000:
  for e in list(os.ilistdir(p)):
   _gs_r(p+'/'+e[0])
  os.rmdir(p)
 else:
  os.remove(p)
for _p in {names!r}:
 _gs_r(_p)
print('removed')
"""


def find_shadows(b: Board, names: list[str]) -> tuple[list[str], list[str]]:
    """(files, dirs) on the board's filesystem under `names` (relative to its cwd)."""
    files, dirs = [], []
    for line in b.exec(_FIND_SHADOWS.format(names=names), timeout=30).decode().splitlines():
        kind, _, path = line.partition(" ")
        if path:
            (dirs if kind == "d" else files).append(path)
    return files, dirs


def remove_trees(b: Board, names: list[str]) -> None:
    out = b.exec(_RMTREE.format(names=names), timeout=30)
    if b"removed" not in out:
        raise BoardError(f"{b.port}: removing the filesystem copy of the agent did not complete")


# ---- measurement ---------------------------------------------------------------------------
_MEASURE = """
import gc,sys,vfs,os
_img={image!r};_fs={files!r};_mods={mods!r};_top={top!r}
sys.path[:]=[_fs,'.frozen']
for _m in {pre!r}:
 __import__(_m)
_b=bytearray(os.stat(_img)[6])
_f=open(_img,'rb');_f.readinto(_b);_f.close();del _f
vfs.mount(vfs.VfsRom(_b),'/rom')
def _load(path):
 sys.path[:]=[path,'.frozen']
 gc.collect();a=gc.mem_alloc()
 for m in _mods:
  __import__(m)
 gc.collect();c=gc.mem_alloc()-a
 for k in list(sys.modules):
  if k.split('.')[0] in _top:
   del sys.modules[k]
 gc.collect()
 return c
print('RESULT',' '.join(str(_load(p)) for p in {order!r}),len(_b))
"""

_DEPS = """
import sys
sys.path[:]=[{files!r},'.frozen']
for _m in {mods!r}:
 __import__(_m)
print('DEPS',' '.join(k for k in sys.modules if k.split('.')[0] not in {top!r} and k!='vfs'))
"""


def _mp(exe: str, heapsize: str, code: str, tag: str) -> list[str]:
    proc = subprocess.run([exe, "-X", "heapsize=%s" % heapsize, "-c", code], capture_output=True, text=True,
                          timeout=60)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)]
    if proc.returncode != 0 or not line:
        raise UserError("import measurement failed: %s" % (proc.stderr or proc.stdout).strip()[-400:])
    return line[-1].split()[1:]


# What the demo agent keeps loaded while it runs (sys.modules of a running demo board, minus
# asyncio): the code every site pays for. Used by the import measurement (tests, make bench).
RESIDENT = ["agent", "agent.app", "agent.base", "agent.cbor", "agent.compat", "agent.control", "agent.crc", "agent.features", "agent.hal",
            "agent.hal.unix", "agent.journal", "agent.meter", "agent.modbus_base", "agent.modbus_errors",
            "agent.modbus_rtu_master", "agent.modbus_rtu", "agent.modbus_pdu", "agent.journal_recorder", "agent.relays"]


def measure_imports(image: str | Path, files_dir: str | Path, modules: list[str], heapsize: str = "4m",
                    exe: str | None = None) -> dict[str, Any]:
    """Heap bytes that importing `modules` costs from the ROMFS `image` and from the .mpy files in
    `files_dir`, measured by the real micropython.

    Every process first allocates and mounts the image's buffer (in flash on a board) and imports
    the modules' non-agent dependencies (asyncio, frozen), so no figure includes either.

    * ``rom_heap`` / ``files_heap``: each import alone in a fresh process (the fair comparison);
    * ``files_heap_after_rom``: in ONE process, ROM first, then (modules dropped) the files: the
      file import finds the modules' names (qstrs) already interned by the ROM import, whose
      strings stay in the image, so this figure is a lower bound of the file import's cost.
    """
    from .vboard import micropython_exe

    exe = exe or micropython_exe()
    files = str(Path(files_dir).resolve())
    top = sorted({m.split(".")[0] for m in modules})
    pre = _mp(exe, heapsize, _DEPS.format(files=files, mods=modules, top=top), "DEPS")

    def run(order: list[str]) -> list[int]:
        code = _MEASURE.format(image=str(Path(image).resolve()), files=files, mods=modules, top=top, pre=pre,
                               order=order)
        return [int(x) for x in _mp(exe, heapsize, code, "RESULT")]

    rom, buf = run(["/rom"])
    fil, _ = run([files])
    _, fil2, _ = run(["/rom", files])
    mpy = 0
    for m in modules:
        rel = m.replace(".", "/")
        p = Path(files_dir) / (rel + ".mpy")
        if not p.exists():
            p = Path(files_dir) / rel / "__init__.mpy"
        mpy += p.stat().st_size if p.exists() else 0
    return {"modules": len(modules), "mpy_bytes": mpy, "preloaded": pre, "image_buffer": buf,
            "rom_heap": rom, "files_heap": fil, "saved": fil - rom, "ratio": round(rom / fil, 3),
            "files_heap_after_rom": fil2, "ratio_one_process": round(rom / fil2, 3)}


def manifest_entry(image: bytes, files: list[str]) -> dict[str, Any]:
    return {"file": IMAGE, "size": len(image), "sha256": hashlib.sha256(image).hexdigest(),
            "files": sorted(files)}

