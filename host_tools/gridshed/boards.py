"""Board files (boards/<name>.json): load, list, and check them against the chip they name.

The format is fixed in docs/architecture.md. Two optional keys are understood here as well:
`reserved` (pins the board itself uses: flash, Ethernet PHY, Wi-Fi chip...; nothing of ours may
sit on them) and `notes` (free text: sources, assumptions, caveats). The checks are plain Python,
no schema library: each problem is one readable string naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .datafiles import ROOT_ENV, list_entries, load_entry, repo_root  # noqa: F401


KEYS_REQUIRED = ("name", "title", "chip", "arch", "port", "firmware", "flash", "uarts", "relays",
                 "inputs", "led", "network", "usb")
KEYS_OPTIONAL = ("notes", "reserved", "memory")
CHIPS: dict[str, tuple[str, str]] = {  # chip -> (arch, port)
    "esp32": ("xtensawin", "esp32"),
    "esp32s3": ("xtensawin", "esp32"),
    "rp2040": ("armv6m", "rp2"),
    "rp2350": ("armv7emsp", "rp2"),
    "unix": ("x64", "unix"),
}
NETWORKS = ("wifi", "ethernet", "none", "host")
UART_ROLES = ("meter", "utility")
INPUTS = ("dry_contact", "override", "ac_sense")


class Chip:
    """What a chip allows: valid GPIOs, input-only ones, forbidden ones, strapping ones, UARTs."""

    def __init__(self, gpios: set[int], input_only: set[int], forbidden: dict[int, str],
                 strapping: set[int], uart_ids: set[int]) -> None:
        self.gpios = gpios
        self.input_only = input_only
        self.forbidden = forbidden
        self.strapping = strapping
        self.uart_ids = uart_ids


_ESP32_FLASH = {p: "connected to the SPI flash" for p in range(6, 12)}
_ESP32_FLASH.update({1: "UART0 TX (console/REPL)", 3: "UART0 RX (console/REPL)"})
_S3_FORBID = {p: "SPI flash/PSRAM bus" for p in range(26, 33)}
_S3_FORBID.update({p: "octal flash/PSRAM on R8/N16R8 modules" for p in range(33, 38)})
_S3_FORBID.update({19: "native USB D-", 20: "native USB D+", 43: "UART0 TX (console)",
                   44: "UART0 RX (console)"})

CHIP_PINS: dict[str, Chip] = {
    "esp32": Chip(
        gpios=set(range(0, 20)) | {21, 22, 23, 25, 26, 27} | set(range(32, 40)),
        input_only=set(range(34, 40)),
        forbidden=_ESP32_FLASH,
        strapping={0, 2, 5, 12, 15},
        uart_ids={1, 2},
    ),
    "esp32s3": Chip(
        gpios=set(range(0, 22)) | set(range(26, 49)),
        input_only=set(),
        forbidden=_S3_FORBID,
        strapping={0, 3, 45, 46},
        uart_ids={1, 2},
    ),
    "rp2040": Chip(gpios=set(range(0, 30)), input_only=set(), forbidden={}, strapping=set(),
                   uart_ids={0, 1}),
    "rp2350": Chip(gpios=set(range(0, 30)), input_only=set(), forbidden={}, strapping=set(),
                   uart_ids={0, 1}),
    "unix": Chip(gpios=set(range(0, 64)), input_only=set(), forbidden={}, strapping=set(),
                 uart_ids=set(range(0, 8))),
}


def rp2_uart_function(pin: int) -> tuple[int, str] | None:
    """RP2040/RP2350 fixed pin functions: (uart id, "tx"|"rx"|"cts"|"rts") of a GPIO."""
    if not 0 <= pin <= 29:
        return None
    uart = ((pin + 4) // 8) % 2
    return uart, ("tx", "rx", "cts", "rts")[pin % 4]


def boards_dir() -> Path:
    return repo_root() / "boards"


def list_boards() -> list[str]:
    """Names of the board files (sorted)."""
    return list_entries("boards")


def load_board(name: str) -> dict[str, Any]:
    """Board dict by name (file stem); UserError if missing or invalid."""
    return load_entry("boards", "board", name, "name", validate_board)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _pin_errors(where: str, pin: Any, chip: Chip | None, output: bool, reserved: set[int],
                allow_name: bool = False) -> list[str]:
    if isinstance(pin, str) and allow_name:
        return [] if pin else [f"{where}: empty pin name"]
    if not _is_int(pin):
        return [f"{where}: must be a GPIO number"]
    if chip is None:
        return []
    if pin not in chip.gpios:
        return [f"{where}: GPIO{pin} does not exist on this chip"]
    if pin in chip.forbidden:
        return [f"{where}: GPIO{pin} is {chip.forbidden[pin]}"]
    if pin in reserved:
        return [f"{where}: GPIO{pin} is reserved by the board (see reserved)"]
    if output and pin in chip.input_only:
        return [f"{where}: GPIO{pin} is input-only, cannot drive an output"]
    return []


def _check_flash(flash: Any, errors: list[str]) -> None:
    if not isinstance(flash, dict):
        errors.append("flash: must be an object {size, fs_offset, fs_size, block_size}")
        return
    for k in ("size", "fs_offset", "fs_size", "block_size"):
        if not _is_int(flash.get(k)) or flash[k] < 0:
            errors.append(f"flash.{k}: must be a non-negative integer (bytes)")
            return
    bs = flash["block_size"]
    if bs < 256 or bs & (bs - 1):
        errors.append("flash.block_size: must be a power of two >= 256")
        return
    if flash["fs_size"] == 0 or flash["fs_offset"] % bs or flash["fs_size"] % bs:
        errors.append("flash: fs_offset and fs_size must be non-zero multiples of block_size")
    if flash["fs_offset"] + flash["fs_size"] > flash["size"]:
        errors.append("flash: filesystem runs past the end of the flash")


MEMORY_KEYS = ("gc_heap_bytes", "source", "margin_bytes", "agent_budget_kb", "margin_reason")


def _check_memory(mem: Any, errors: list[str]) -> None:
    """The heap a board leaves MicroPython, where that figure comes from, and the agent's share."""
    if not isinstance(mem, dict) or set(mem) != set(MEMORY_KEYS):
        errors.append(f"memory: must be an object with exactly {', '.join(MEMORY_KEYS)}")
        return
    for k in ("gc_heap_bytes", "margin_bytes", "agent_budget_kb"):
        if not _is_int(mem[k]) or mem[k] <= 0:
            errors.append(f"memory.{k}: must be a positive integer")
            return
    for k in ("source", "margin_reason"):
        if not isinstance(mem[k], str) or not mem[k]:
            errors.append(f"memory.{k}: must say where the figure comes from")
    if mem["agent_budget_kb"] * 1024 > mem["gc_heap_bytes"] - mem["margin_bytes"]:
        errors.append("memory.agent_budget_kb: larger than gc_heap_bytes less margin_bytes")


def agent_budget_kb(board: dict[str, Any]) -> int:
    """The heap (KB on the board) every agent flow must work in: its board file's stated budget."""
    return int(board["memory"]["agent_budget_kb"])


def smallest_budget_kb() -> int:
    """The smallest supported board's budget: the heap the virtual board and the tests run at.

    The unix port is 64-bit, so it is given as MicroPython's word-scaled `-X heapsize=<k>wK`
    (k KB on a 32-bit board).
    """
    return min(agent_budget_kb(load_board(n)) for n in list_boards() if load_board(n)["chip"] != "unix")


def budget_heapsize(board: dict[str, Any] | None = None) -> str:
    """`-X heapsize=` value for a board's budget (the smallest board's when None)."""
    return "%dwK" % (agent_budget_kb(board) if board else smallest_budget_kb())


def validate_board(board: Any) -> list[str]:
    """Problems with a board dict (empty list: usable)."""
    if not isinstance(board, dict):
        return ["board: must be a JSON object"]
    errors: list[str] = []
    for k in KEYS_REQUIRED:
        if k not in board:
            errors.append(f"{k}: missing")
    for k in board:
        if k not in KEYS_REQUIRED and k not in KEYS_OPTIONAL:
            errors.append(f"{k}: unknown key")
    for k in ("name", "title", "firmware"):
        if k in board and (not isinstance(board[k], str) or not board[k]):
            errors.append(f"{k}: must be a non-empty string")
    if "notes" in board and not isinstance(board["notes"], str):
        errors.append("notes: must be a string")
    chip_name = board.get("chip")
    chip: Chip | None = None
    if chip_name not in CHIPS:
        errors.append(f"chip: must be one of {', '.join(CHIPS)}")
    else:
        chip = CHIP_PINS[chip_name]
        arch, port = CHIPS[chip_name]
        if board.get("arch") != arch:
            errors.append(f"arch: {chip_name} needs mpy-cross -march={arch}")
        if board.get("port") != port:
            errors.append(f"port: {chip_name} runs the MicroPython {port} port")
    reserved: set[int] = set()
    if "reserved" in board:
        r = board["reserved"]
        if not isinstance(r, list) or not all(_is_int(p) for p in r):
            errors.append("reserved: must be a list of GPIO numbers")
        else:
            reserved = set(r)
    if "flash" in board:
        _check_flash(board["flash"], errors)
    if "memory" in board:
        _check_memory(board["memory"], errors)
    used: dict[Any, str] = {}

    def claim(where: str, pin: Any) -> None:
        if pin is None:
            return
        key = pin if not isinstance(pin, str) else "name:" + pin
        if key in used:
            errors.append(f"{where}: pin {pin} already used by {used[key]}")
        else:
            used[key] = where

    uarts = board.get("uarts")
    if not isinstance(uarts, dict) or "meter" not in uarts:
        errors.append("uarts: must be an object with at least a meter UART")
        uarts = uarts if isinstance(uarts, dict) else {}
    ids: dict[Any, str] = {}
    for role, u in uarts.items():
        where = f"uarts.{role}"
        if role not in UART_ROLES:
            errors.append(f"{where}: unknown role (known: {', '.join(UART_ROLES)})")
            continue
        if not isinstance(u, dict):
            errors.append(f"{where}: must be an object {{id, tx, rx, de, re}}")
            continue
        for k in u:
            if k not in ("id", "tx", "rx", "de", "re"):
                errors.append(f"{where}.{k}: unknown key")
        uid: Any = u.get("id")
        if not _is_int(uid) or (chip is not None and uid not in chip.uart_ids):
            ok = ", ".join(str(i) for i in sorted(chip.uart_ids)) if chip else "an integer"
            errors.append(f"{where}.id: must be {ok}")
        elif uid in ids:
            errors.append(f"{where}.id: UART {uid} already used by uarts.{ids[uid]}")
        else:
            ids[uid] = role
        for k in ("tx", "rx", "de", "re"):
            if k not in u:
                errors.append(f"{where}.{k}: missing (use null for no pin)")
                continue
            pin = u[k]
            if pin is None:
                if k in ("tx", "rx"):
                    errors.append(f"{where}.{k}: required")
                continue
            errs = _pin_errors(f"{where}.{k}", pin, chip, output=(k != "rx"), reserved=reserved)
            errors.extend(errs)
            if not errs and board.get("port") == "rp2" and k in ("tx", "rx") and _is_int(uid):
                fn = rp2_uart_function(pin)
                if fn != (uid, k):
                    errors.append(f"{where}.{k}: GP{pin} cannot be UART{uid} {k.upper()} on rp2"
                                  + (f" (it is UART{fn[0]} {fn[1].upper()})" if fn else ""))
            claim(f"{where}.{k}", pin)
    relays = board.get("relays")
    if not isinstance(relays, list) or not relays:
        errors.append("relays: must be a non-empty list of {name, pin, active}")
        relays = []
    names: set[str] = set()
    for i, r in enumerate(relays):
        where = f"relays[{i}]"
        if not isinstance(r, dict):
            errors.append(f"{where}: must be an object {{name, pin, active}}")
            continue
        for k in r:
            if k not in ("name", "pin", "active"):
                errors.append(f"{where}.{k}: unknown key")
        n = r.get("name")
        if not isinstance(n, str) or not n:
            errors.append(f"{where}.name: must be a non-empty string")
        elif n in names:
            errors.append(f"{where}.name: duplicate relay name {n!r}")
        else:
            names.add(n)
        if r.get("active") not in (0, 1) or isinstance(r.get("active"), bool):
            errors.append(f"{where}.active: must be 1 (high closes the relay) or 0")
        errs = _pin_errors(f"{where}.pin", r.get("pin"), chip, output=True, reserved=reserved)
        errors.extend(errs)
        if not errs:
            claim(f"{where}.pin", r.get("pin"))
    inputs = board.get("inputs")
    if not isinstance(inputs, dict):
        errors.append("inputs: must be an object {dry_contact, override, ac_sense}")
        inputs = {}
    for k in inputs:
        if k not in INPUTS:
            errors.append(f"inputs.{k}: unknown input (known: {', '.join(INPUTS)})")
    for k in INPUTS:
        if k not in inputs:
            errors.append(f"inputs.{k}: missing (use null for none)")
        elif inputs[k] is not None:
            errs = _pin_errors(f"inputs.{k}", inputs[k], chip, output=False, reserved=reserved)
            errors.extend(errs)
            if not errs:
                claim(f"inputs.{k}", inputs[k])
    if "led" in board and board["led"] is not None:
        led = board["led"]
        if isinstance(led, str) and board.get("port") != "rp2":
            errors.append("led: a named pin (\"LED\") is only known on rp2 boards")
        else:
            # The LED may sit on a pin the board reserves for it (Pico GP25): only chip checks.
            errs = _pin_errors("led", led, chip, output=True, reserved=set(), allow_name=True)
            errors.extend(errs)
            if not errs:
                claim("led", led)
    if "network" in board and board["network"] not in NETWORKS:
        errors.append(f"network: must be one of {', '.join(NETWORKS)}")
    if chip_name == "unix" and board.get("network") not in (None, "host"):
        errors.append("network: the unix port uses the host's network (\"host\")")
    if chip_name != "unix" and board.get("network") == "host":
        errors.append("network: \"host\" is only for the unix port")
    usb = board.get("usb")
    if "usb" in board:
        if not isinstance(usb, list):
            errors.append("usb: must be a list of {vid, pid}")
        else:
            for i, e in enumerate(usb):
                if (not isinstance(e, dict) or set(e) != {"vid", "pid"}
                        or not all(_is_int(e[k]) and 0 <= e[k] <= 0xFFFF for k in ("vid", "pid"))):
                    errors.append(f"usb[{i}]: must be {{vid, pid}} with integers 0..65535")
    return errors


def board_warnings(board: dict[str, Any]) -> list[str]:
    """Legal but risky choices (strapping pins): worth a line in the board's notes."""
    chip = CHIP_PINS.get(board.get("chip", ""))
    if chip is None:
        return []
    out = []
    pins: list[tuple[str, Any]] = []
    for role, u in (board.get("uarts") or {}).items():
        for k in ("tx", "rx", "de", "re"):
            pins.append((f"uarts.{role}.{k}", u.get(k)))
    for i, r in enumerate(board.get("relays") or []):
        pins.append((f"relays[{i}].pin", r.get("pin")))
    for k, p in (board.get("inputs") or {}).items():
        pins.append((f"inputs.{k}", p))
    pins.append(("led", board.get("led")))
    for where, p in pins:
        if _is_int(p) and p in chip.strapping:
            out.append(f"{where}: GPIO{p} is a strapping pin (level at reset selects boot mode)")
    return out


def used_pins(board: dict[str, Any]) -> dict[int | str, str]:
    """Every pin the board file assigns -> where (for wiring tables and collision checks)."""
    out: dict[int | str, str] = {}
    for role, u in (board.get("uarts") or {}).items():
        for k in ("tx", "rx", "de", "re"):
            if u.get(k) is not None:
                out[u[k]] = f"uarts.{role}.{k}"
    for r in board.get("relays") or []:
        out[r["pin"]] = f"relay {r['name']}"
    for k, p in (board.get("inputs") or {}).items():
        if p is not None:
            out[p] = f"inputs.{k}"
    if board.get("led") is not None:
        out[board["led"]] = "led"
    return out
