"""`gridshed image`: one flashable factory image = MicroPython firmware + a LittleFS filesystem.

The filesystem (littlefs-python, LittleFS v2 as MicroPython's vfs.VfsLfs2 mounts it) holds the
compiled agent (a `gridshed build` folder, with /build.json) and /config.cbor, laid out at the
board file's ``flash.fs_offset`` / ``fs_size`` / ``block_size``:

* ESP32: a .bin to write at 0x0: 0xFF padding, the firmware at the chip's bootloader offset,
  the filesystem at fs_offset.
* RP2040 / RP2350: a .uf2: the firmware's UF2 blocks followed by the filesystem at
  0x10000000 + fs_offset, 256-byte pages with the chip's family id (0xe48bff56 / 0xe48bff59).
* unix-sim: the bare filesystem image (a block device for the virtual board).

No per-device key goes in: a factory image is the same for every board; `gridshed provision`
adds the device id and key afterwards.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable

from .build import BOARD_MANIFEST, load_manifest
from .deploy import board_manifest_bytes
from .errors import UserError
from .flash import (RP2_FLASH_BASE, UF2_FLAG_FAMILY, UF2_MAGIC0, UF2_MAGIC1, UF2_MAGIC_END,
                    UF2_TARGET_FAMILY, check_firmware, esp_flash_offset, inspect_firmware, parse_uf2)

LFS_READ_SIZE = 32   # MicroPython's VfsLfs2 defaults
LFS_PROG_SIZE = 32
LFS_LOOKAHEAD = 32
UF2_PAGE = 256


def make_fs(board: dict[str, Any], files: dict[str, bytes]) -> bytes:
    """A LittleFS image of the board's fs_size holding `files` ({path: bytes})."""
    from littlefs import LittleFS

    fl = board["flash"]
    bs, size = fl["block_size"], fl["fs_size"]
    if size % bs:
        raise UserError(f"board {board['name']}: flash.fs_size {size} is not a multiple of block_size {bs}")
    fs = LittleFS(block_size=bs, block_count=size // bs, read_size=LFS_READ_SIZE, prog_size=LFS_PROG_SIZE,
                  lookahead_size=LFS_LOOKAHEAD, name_max=255)
    for path in sorted(files):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            try:
                fs.mkdir(d)
            except FileExistsError:
                pass
        with fs.open(path.strip("/"), "wb") as f:
            f.write(files[path])
    img = bytes(fs.context.buffer)
    if len(img) != size:
        raise UserError(f"internal: LittleFS image is {len(img)} bytes, expected {size}")
    return img


def fs_files(build_dir: str | Path, config: bytes | None) -> dict[str, bytes]:
    manifest = load_manifest(build_dir)
    d = Path(build_dir)
    files = {e["file"]: (d / e["file"]).read_bytes() for e in manifest["files"]}
    files[BOARD_MANIFEST] = board_manifest_bytes(manifest)
    if config is not None:
        files["config.cbor"] = config
    return files




def _uf2_pack(items: list[tuple[int, bytes, int | None, int]]) -> bytes:
    n = len(items)
    out = bytearray()
    for i, (addr, data, family, flags) in enumerate(items):
        hdr = struct.pack("<8I", UF2_MAGIC0, UF2_MAGIC1, flags, addr, len(data), i, n, family or 0)
        out += hdr + data + bytes(476 - len(data)) + struct.pack("<I", UF2_MAGIC_END)
    return bytes(out)


def build_image(board: dict[str, Any], build_dir: str | Path, config: bytes | None = None,
                firmware: str | Path | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> tuple[bytes, dict[str, Any]]:
    """(image bytes, layout description)."""
    say = progress or (lambda stage, done, total: None)
    manifest = load_manifest(build_dir)
    if manifest["board"] != board["name"]:
        raise UserError(f"{build_dir} was built for {manifest['board']}, not {board['name']}")
    fl = board["flash"]
    files = fs_files(build_dir, config)
    say("filesystem", 0, 1)
    fs = make_fs(board, files)
    say("filesystem", 1, 1)
    layout: dict[str, Any] = {"board": board["name"], "chip": board["chip"], "fs_offset": fl["fs_offset"],
                              "fs_size": fl["fs_size"], "block_size": fl["block_size"],
                              "files": sorted(files), "build_id": manifest["build_id"]}
    port = board["port"]
    if port == "unix":
        layout.update(format="lfs", size=len(fs))
        return fs, layout
    if not firmware:
        raise UserError(f"board {board['name']}: pass --firmware (the MicroPython "
                        f"{'.bin' if port == 'esp32' else '.uf2'} for {board['firmware']})")
    info = inspect_firmware(firmware)
    check_firmware(board, info)
    fw = Path(firmware).read_bytes()
    if port == "esp32":
        off = esp_flash_offset(board["chip"])
        if off + len(fw) > fl["fs_offset"]:
            raise UserError(f"firmware ({len(fw)} bytes at 0x{off:x}) overlaps the filesystem at 0x{fl['fs_offset']:x}")
        if fl["fs_offset"] + fl["fs_size"] > fl["size"]:
            raise UserError(f"board {board['name']}: filesystem ends past the flash size")
        img = bytearray(b"\xff" * (fl["fs_offset"] + fl["fs_size"]))
        img[off:off + len(fw)] = fw
        img[fl["fs_offset"]:] = fs
        layout.update(format="esp-bin", firmware_offset=off, firmware_size=len(fw), write_at=0, size=len(img))
        say("image", 1, 1)
        return bytes(img), layout
    # rp2: firmware blocks + filesystem pages
    family = UF2_TARGET_FAMILY[board["chip"]]
    fw_blocks = parse_uf2(fw)
    fs_start = RP2_FLASH_BASE + fl["fs_offset"]
    items: list[tuple[int, bytes, int | None, int]] = []
    for b in fw_blocks:
        if b["addr"] < fs_start + fl["fs_size"] and b["addr"] + b["size"] > fs_start and b["family"] == family:
            raise UserError(f"firmware UF2 writes 0x{b['addr']:x}, inside the filesystem at 0x{fs_start:x}")
        items.append((b["addr"], b["data"], b["family"], b["flags"]))
    total = len(fs) // UF2_PAGE
    for i in range(total):
        items.append((fs_start + i * UF2_PAGE, fs[i * UF2_PAGE:(i + 1) * UF2_PAGE], family, UF2_FLAG_FAMILY))
        if i % 512 == 0:
            say("uf2", i, total)
    say("uf2", total, total)
    out = _uf2_pack(items)
    layout.update(format="uf2", family="0x%08x" % family, fs_address="0x%08x" % fs_start,
                  uf2_blocks=len(items), size=len(out))
    return out, layout


def extract_fs(board: dict[str, Any], image: bytes) -> bytes:
    """The filesystem region back out of an image built by build_image (for checks and tests)."""
    fl = board["flash"]
    if board["port"] == "unix":
        return image
    if board["port"] == "esp32":
        return image[fl["fs_offset"]:fl["fs_offset"] + fl["fs_size"]]
    start = RP2_FLASH_BASE + fl["fs_offset"]
    buf = bytearray(b"\xff" * fl["fs_size"])
    for b in parse_uf2(image):
        if start <= b["addr"] < start + fl["fs_size"]:
            o = b["addr"] - start
            buf[o:o + b["size"]] = b["data"]
    return bytes(buf)
