"""Serial port discovery: which attached USB-serial devices could be a gridshed board.

A port is "known" when its USB VID:PID is in a board file's ``usb`` list or is one of the common
USB-serial bridges these boards carry. Auto-detect picks the port only when exactly one known
device is attached; otherwise the user is asked for ``--port`` with the list in the message.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

# (vid, pid) -> description; pid None = any product of that vendor's USB-serial line
COMMON_USB_SERIAL: dict[tuple[int, int | None], str] = {
    (0x10C4, 0xEA60): "Silicon Labs CP210x",
    (0x10C4, 0xEA70): "Silicon Labs CP2105",
    (0x1A86, 0x7523): "WCH CH340",
    (0x1A86, 0x55D4): "WCH CH9102",
    (0x1A86, 0x55D3): "WCH CH343",
    (0x0403, 0x6001): "FTDI FT232R",
    (0x0403, 0x6010): "FTDI FT2232",
    (0x0403, 0x6014): "FTDI FT232H",
    (0x0403, 0x6015): "FTDI FT-X",
    (0x2E8A, 0x0005): "Raspberry Pi RP2 MicroPython",
    (0x303A, 0x1001): "Espressif USB JTAG/serial",
    (0x303A, 0x4001): "Espressif USB CDC (TinyUSB)",
}


@dataclass
class PortInfo:
    device: str
    vid: int | None
    pid: int | None
    serial_number: str | None
    description: str
    known_as: str | None  # why it is considered a candidate board (None = not known)

    def as_dict(self) -> dict:
        return {"device": self.device, "vid": "%04x" % self.vid if self.vid is not None else None,
                "pid": "%04x" % self.pid if self.pid is not None else None,
                "serial_number": self.serial_number, "description": self.description,
                "known_as": self.known_as}


def _int(v: object) -> int:
    return int(v, 16) if isinstance(v, str) else int(v)  # type: ignore[arg-type]


def known_ids() -> dict[tuple[int, int | None], str]:
    """USB ids from boards/*.json ("usb": [{"vid", "pid"}]) plus the common bridges."""
    ids = dict(COMMON_USB_SERIAL)
    try:
        from .boards import list_boards, load_board
    except ImportError:
        return ids
    for item in list_boards():
        board = item if isinstance(item, dict) else load_board(item)
        for u in board.get("usb") or []:
            try:
                ids[(_int(u["vid"]), _int(u["pid"]) if u.get("pid") is not None else None)] = f"board {board['name']}"
            except (KeyError, ValueError, TypeError):
                continue
    return ids


def classify(device: str, vid: int | None, pid: int | None, serial_number: str | None = None,
             description: str = "", ids: dict[tuple[int, int | None], str] | None = None) -> PortInfo:
    ids = known_ids() if ids is None else ids
    known = None
    if vid is not None:
        known = ids.get((vid, pid)) or ids.get((vid, None))
    return PortInfo(device, vid, pid, serial_number, description or "", known)


def list_ports(all_ports: bool = False) -> list[PortInfo]:
    """Attached serial ports (USB ones that look like boards; every port with all_ports)."""
    from serial.tools import list_ports as lp

    ids = known_ids()
    out = []
    for p in sorted(lp.comports(), key=lambda p: p.device):
        info = classify(p.device, p.vid, p.pid, p.serial_number, p.description, ids)
        if all_ports or info.known_as:
            out.append(info)
    return out


def choose_port(port: str | None, candidates: list[PortInfo] | None = None) -> str:
    """The port to use: --port if given, else the single known board attached."""
    if port:
        return port
    cands = list_ports() if candidates is None else [c for c in candidates if c.known_as]
    if len(cands) == 1:
        return cands[0].device
    if not cands:
        raise UserError("no board found on USB (no known USB-serial device attached); "
                        "plug it in, or pass --port (e.g. --port /dev/ttyUSB0)")
    listing = ", ".join(f"{c.device} ({c.known_as})" for c in cands)
    raise UserError(f"several boards attached: {listing}; pass --port to pick one")
