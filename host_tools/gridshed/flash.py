"""`gridshed flash`: MicroPython firmware onto the chip, after checking the file fits the chip.

* ESP32 family: an ESP image (magic 0xE9, chip id in the extended header) written with esptool
  used as a library, at the chip's bootloader offset (0x1000 for ESP32 / ESP32-S2, 0x0 for
  ESP32-S3 / C3 / C6, as esptool's target classes say).
* RP2040 / RP2350: a UF2 (family id checked) copied onto the mounted BOOTSEL drive
  (INFO_UF2.TXT), or loaded with picotool when no drive is mounted and picotool is installed.

Nothing touches the board before the file is checked; ``dry_run`` only returns the plan.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

from .errors import UserError

UF2_MAGIC0, UF2_MAGIC1, UF2_MAGIC_END = 0x0A324655, 0x9E5D5157, 0x0AB16F30
UF2_FLAG_FAMILY = 0x00002000
UF2_FLAG_NOT_MAIN_FLASH = 0x00000001
FAMILY_RP2040 = 0xE48BFF56
FAMILY_ABSOLUTE = 0xE48BFF57
FAMILY_RP2350_ARM_S = 0xE48BFF59
FAMILY_RP2350_RISCV = 0xE48BFF5A
FAMILY_RP2350_ARM_NS = 0xE48BFF5B
UF2_FAMILIES = {  # chip -> families a firmware for it may carry
    "rp2040": {FAMILY_RP2040},
    "rp2350": {FAMILY_RP2350_ARM_S, FAMILY_RP2350_RISCV, FAMILY_RP2350_ARM_NS, FAMILY_ABSOLUTE},
}
UF2_TARGET_FAMILY = {"rp2040": FAMILY_RP2040, "rp2350": FAMILY_RP2350_ARM_S}
RP2_FLASH_BASE = 0x10000000
RP2_DRIVE_IDS = {"rp2040": "RPI-RP2", "rp2350": "RP2350"}
ESP_IMAGE_MAGIC = 0xE9


def esp_chips() -> dict[str, Any]:
    from esptool.targets import CHIP_DEFS

    return CHIP_DEFS


def esp_chip_by_image_id(chip_id: int) -> str | None:
    for name, cls in esp_chips().items():
        if getattr(cls, "IMAGE_CHIP_ID", None) == chip_id and name != "esp8266":
            return name
    return None


def esp_flash_offset(chip: str) -> int:
    cls = esp_chips().get(chip)
    if cls is None:
        raise UserError(f"chip {chip!r}: esptool does not know it")
    return int(cls.BOOTLOADER_FLASH_OFFSET)


# ---- file inspection -----------------------------------------------------------------------
def parse_uf2(data: bytes) -> list[dict[str, Any]]:
    if len(data) % 512:
        raise UserError(f"UF2 file size {len(data)} is not a multiple of 512")
    blocks = []
    for off in range(0, len(data), 512):
        b = data[off:off + 512]
        m0, m1, flags, addr, size, blockno, nblocks, family = struct.unpack_from("<8I", b)
        (end,) = struct.unpack_from("<I", b, 508)
        if m0 != UF2_MAGIC0 or m1 != UF2_MAGIC1 or end != UF2_MAGIC_END:
            raise UserError(f"not a UF2 file (bad magic in block at byte {off})")
        if size > 476:
            raise UserError(f"UF2 block {blockno}: payload size {size} > 476")
        blocks.append({"flags": flags, "addr": addr, "size": size, "blockno": blockno, "nblocks": nblocks,
                       "family": family if flags & UF2_FLAG_FAMILY else None, "data": b[32:32 + size]})
    if not blocks:
        raise UserError("empty UF2 file")
    return blocks


def inspect_firmware(path: str | Path) -> dict[str, Any]:
    """What a firmware file is: {"kind": "esp"|"uf2", chip or families, size, ...}."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(f"firmware {p}: cannot read: {exc.strerror or exc}") from None
    if len(data) >= 24 and data[0] == ESP_IMAGE_MAGIC:
        chip_id = struct.unpack_from("<H", data, 12)[0]
        return {"kind": "esp", "file": str(p), "size": len(data), "segments": data[1], "chip_id": chip_id,
                "chip": esp_chip_by_image_id(chip_id)}
    if len(data) >= 512 and struct.unpack_from("<2I", data) == (UF2_MAGIC0, UF2_MAGIC1):
        blocks = parse_uf2(data)
        main = [b for b in blocks if not b["flags"] & UF2_FLAG_NOT_MAIN_FLASH]
        fams = sorted({b["family"] for b in blocks if b["family"] is not None})
        return {"kind": "uf2", "file": str(p), "size": len(data), "blocks": len(blocks), "families": fams,
                "start": min(b["addr"] for b in main) if main else None,
                "end": max(b["addr"] + b["size"] for b in main) if main else None}
    head = data[:4].hex()
    raise UserError(f"firmware {p}: neither an ESP image (first byte 0xE9) nor a UF2 file (starts {head})")


def check_firmware(board: dict[str, Any], info: dict[str, Any]) -> None:
    chip = board["chip"]
    if board["port"] == "esp32":
        if info["kind"] != "esp":
            raise UserError(f"{info['file']}: a {info['kind'].upper()} file, but {board['name']} ({chip}) needs an "
                            "ESP32 .bin (MicroPython firmware.bin for the chip)")
        if info["chip"] != chip:
            raise UserError(f"{info['file']}: an image for {info['chip'] or 'chip id %d' % info['chip_id']}, "
                            f"but {board['name']} is an {chip}")
    elif board["port"] == "rp2":
        if info["kind"] != "uf2":
            raise UserError(f"{info['file']}: not a UF2 file, but {board['name']} ({chip}) is flashed with a .uf2")
        allowed = UF2_FAMILIES.get(chip, set())
        fams = set(info["families"])
        if not fams or not fams & allowed or fams - allowed:
            names = ", ".join("0x%08x" % f for f in sorted(fams)) or "none"
            raise UserError(f"{info['file']}: UF2 family {names} does not fit {chip} "
                            f"(expected {', '.join('0x%08x' % f for f in sorted(allowed))})")
    else:
        raise UserError(f"board {board['name']} ({board['port']}) has no firmware to flash: it is the virtual board")


# ---- plans ---------------------------------------------------------------------------------
def find_boot_drive(chip: str, search: list[str] | None = None) -> Path | None:
    """A mounted BOOTSEL drive (with INFO_UF2.TXT naming the chip's board id)."""
    want = RP2_DRIVE_IDS[chip]
    user = os.environ.get("USER", "")
    roots = search if search is not None else [f"/media/{user}", "/media", f"/run/media/{user}", "/Volumes", "/mnt"]
    for root in roots:
        r = Path(root)
        if not r.is_dir():
            continue
        for d in sorted(r.iterdir()):
            info = d / "INFO_UF2.TXT"
            try:
                if info.is_file() and want in info.read_text(errors="replace"):
                    return d
            except OSError:
                continue
    return None


def plan_flash(board: dict[str, Any], firmware: str | Path, port: str | None = None, baud: int = 460800,
               drive: str | Path | None = None, erase: bool = False,
               drive_search: list[str] | None = None) -> dict[str, Any]:
    info = inspect_firmware(firmware)
    check_firmware(board, info)
    plan: dict[str, Any] = {"board": board["name"], "chip": board["chip"], "firmware": info}
    if board["port"] == "esp32":
        off = esp_flash_offset(board["chip"])
        plan.update(method="esptool", port=port, baud=baud, offset=off, erase=erase)
        steps = [f"connect to {board['chip']} on {port or '(auto-detect)'} at {baud} baud (esptool, default reset)"]
        if erase:
            steps.append("erase the whole flash (the filesystem and config are lost)")
        steps.append(f"write {info['file']} ({info['size']} bytes) at 0x{off:x}, verify, hard reset")
        plan["steps"] = steps
        plan["command"] = (f"esptool --chip {board['chip']} --port {port or 'PORT'} --baud {baud} "
                           + ("erase-flash && esptool ... " if erase else "") + f"write-flash 0x{off:x} {info['file']}")
    else:
        d = Path(drive) if drive else find_boot_drive(board["chip"], drive_search)
        picotool = shutil.which("picotool")
        if d:
            plan.update(method="uf2-copy", drive=str(d))
            plan["steps"] = [f"copy {info['file']} ({info['blocks']} UF2 blocks) to {d}/ ; the board reboots into MicroPython"]
            plan["command"] = f"cp {info['file']} {d}/"
        elif picotool:
            plan.update(method="picotool", picotool=picotool)
            plan["steps"] = [f"picotool load -x {info['file']} (board in BOOTSEL mode on USB)"]
            plan["command"] = f"picotool load -x {info['file']}"
        else:
            plan.update(method="uf2-copy", drive=None)
            plan["steps"] = ["hold BOOTSEL while plugging the board in; it mounts as "
                             f"{RP2_DRIVE_IDS[board['chip']]}; then run again (or pass --drive)"]
            plan["command"] = f"cp {info['file']} /path/to/{RP2_DRIVE_IDS[board['chip']]}/"
    return plan


def run_flash(plan: dict[str, Any]) -> None:
    fw = plan["firmware"]["file"]
    if plan["method"] == "esptool":
        from esptool.cmds import attach_flash, detect_chip, erase_flash, reset_chip, run_stub, write_flash

        port = plan.get("port")
        if not port:
            raise UserError("flashing an ESP32 needs --port (or exactly one attached board)")
        esp = detect_chip(port, plan["baud"] if plan["baud"] <= 115200 else 115200)
        try:
            found = esp.CHIP_NAME.lower().replace("-", "")
            if found != plan["chip"]:
                raise UserError(f"{port}: the chip is an {esp.CHIP_NAME}, the board file says {plan['chip']}")
            esp = run_stub(esp)
            if plan["baud"] > 115200:
                esp.change_baud(plan["baud"])
            attach_flash(esp)
            if plan.get("erase"):
                erase_flash(esp)
            write_flash(esp, [(plan["offset"], fw)])
            reset_chip(esp, "hard-reset")
        finally:
            try:
                esp._port.close()
            except Exception:
                pass
    elif plan["method"] == "uf2-copy":
        if not plan.get("drive"):
            raise UserError(plan["steps"][0])
        dest = Path(plan["drive"]) / Path(fw).name
        shutil.copyfile(fw, dest)
        try:
            os.sync()
        except AttributeError:
            pass
    elif plan["method"] == "picotool":
        res = subprocess.run([plan["picotool"], "load", "-x", fw], capture_output=True, text=True)
        if res.returncode != 0:
            raise UserError(f"picotool failed: {(res.stderr or res.stdout).strip()}")
    else:
        raise UserError(f"unknown flash method {plan['method']}")
