"""site.toml (what a human edits) -> the normalized config the board stores as /config.cbor.

The board file resolves relay names to pins and gives the UARTs; the meter library gives the
register map. Validation is agent.config.validate, the very code the board runs at boot.
"""
from __future__ import annotations

import copy
import hashlib
import tomllib
from pathlib import Path
from typing import Any

from agent import cbor
from agent import integrity
from agent import config as fwconfig
from agent.config_defaults import apply_defaults

from .boards import load_board
from .errors import UserError
from .meters import load_meter

TOP_KEYS = {"site", "device", "board", "nominal_hz", "meter", "trip", "failsafe", "blocks",
            "signals", "mqtt", "modbus_server", "udp", "journal", "capture", "miners",
            "ac_sense", "override", "stages", "authority", "maintenance", "market", "dnp3"}
BLOCK_KEYS = {"name", "relays", "miners", "kw_per_miner", "priority", "active", "class", "strike_usd_mwh",
              "revenue_usd_mwh", "min_run_s", "min_off_s", "max_cycles_day", "ramp_kw_per_min",
              "efficiency_j_th"}
HOST_BLOCK_KEYS = {"efficiency_j_th"}  # read by host tools (gridshed breakeven), not sent to the board


def read_toml(path: str | Path) -> dict[str, Any]:
    from .datafiles import shipped

    p = shipped(path, "scenarios")  # a bare name of a shipped site (demo-site.toml) works anywhere
    try:
        text = p.read_text()
    except OSError as exc:
        raise UserError(f"cannot read site file {p}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: not valid TOML: {exc}") from None


def normalize(site: dict[str, Any], board_name: str | None = None, device_id: str | None = None,
              source: str = "site.toml") -> dict[str, Any]:
    """Merge site + board + meter map into the board's config; UserError naming the key."""
    site = copy.deepcopy(site)
    unknown = sorted(set(site) - TOP_KEYS)
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    board_name = board_name or site.get("board")
    if not board_name:
        raise UserError(f"{source}: board: missing (name a file in boards/, or pass --board)")
    board = load_board(board_name)
    cfg: dict[str, Any] = {
        "v": fwconfig.VERSION,
        "site": site.get("site"),
        "device": device_id or site.get("device"),
        "board": board["name"],
        "nominal_hz": site.get("nominal_hz", 60),
    }
    meter = dict(site.get("meter") or {})
    model = meter.pop("model", None)
    if not model:
        raise UserError(f"{source}: meter.model: missing (see `gridshed meters` / docs/meters.md)")
    cfg["meter"] = meter
    mmap = load_meter(model)
    cfg["meter"]["map"] = {k: mmap[k] for k in ("model", "function", "quantities") if k in mmap}
    for sec in ("trip", "failsafe"):
        cfg[sec] = dict(site.get(sec) or {})
    for sec in ("signals", "mqtt", "modbus_server", "udp", "journal", "capture", "miners", "ac_sense", "override",
                "authority", "maintenance", "market", "dnp3"):
        if sec in site:
            cfg[sec] = site[sec]
    relays = {r["name"]: r for r in board.get("relays", [])}
    blocks_in = site.get("blocks")
    if not isinstance(blocks_in, list) or not blocks_in:
        raise UserError(f"{source}: blocks: define at least one [[blocks]] table with relays = [...]")
    blocks = []
    for i, b in enumerate(blocks_in):
        where = f"{source}: blocks[{i}]"
        if not isinstance(b, dict):
            raise UserError(f"{where}: must be a table")
        bad = sorted(set(b) - BLOCK_KEYS)
        if bad:
            raise UserError(f"{where}.{bad[0]}: unknown key (known: {', '.join(sorted(BLOCK_KEYS))})")
        names = b.get("relays")
        if not isinstance(names, list) or not names:
            raise UserError(f"{where}.relays: list the board's relay outputs, e.g. relays = [\"relay1\"]")
        pins, levels = [], set()
        for n in names:
            if n not in relays:
                raise UserError(f"{where}.relays: board {board['name']} has no relay {n!r} "
                                f"(has {', '.join(relays) or 'none'})")
            pins.append(relays[n]["pin"])
            levels.add(relays[n]["active"])
        if "active" in b:
            active = b["active"]
        elif len(levels) == 1:
            active = levels.pop()
        else:
            raise UserError(f"{where}.relays: relays with different active levels in one block; set active = 0|1")
        nb = {k: v for k, v in b.items() if k != "relays" and k not in HOST_BLOCK_KEYS}
        nb.setdefault("name", f"block{i + 1}")
        nb["pins"] = pins
        nb["active"] = active
        blocks.append(nb)
    cfg["blocks"] = blocks
    if "stages" in site:
        cfg["trip"]["stages"] = _stage_blocks(site["stages"], blocks, source)
    sig = cfg.get("signals")
    if isinstance(sig, dict) and sig.get("dry_contact") and sig.get("dry_contact_pin") is None:
        pin = (board.get("inputs") or {}).get("dry_contact")
        if pin is None:
            raise UserError(f"{source}: signals.dry_contact: board {board['name']} has no dry-contact input")
        sig["dry_contact_pin"] = pin
    for sec in ("ac_sense", "override"):
        d = cfg.get(sec)
        if isinstance(d, dict) and d.get("enabled", True) and d.get("pin") is None:
            pin = (board.get("inputs") or {}).get(sec)
            if pin is None:
                raise UserError(f"{source}: {sec}: board {board['name']} has no {sec} input pin")
            d["pin"] = pin
    uarts = board.get("uarts", {})
    cfg["uart"] = {role: uarts[role] for role in uarts}
    apply_defaults(cfg)
    errors = fwconfig.validate(cfg)
    if errors:
        raise UserError(f"{source}: " + "; ".join(errors))
    if cfg["meter"]["transport"] == "rtu" and "meter" not in uarts:
        raise UserError(f"{source}: meter.transport: board {board['name']} has no meter UART; use transport = \"tcp\"")
    res = cfg["meter"]["map"].get("resolution_hz") or mmap.get("resolution_hz")
    if res and res >= 0.05 and "ac_sense" not in site:
        # A coarse meter cannot see a 59.85 Hz pickup: say so loudly, the tool does not guess.
        cfg.setdefault("warnings", []).append(
            f"meter {model} reports frequency in {res} Hz steps: too coarse for a "
            f"{cfg['trip']['pickup_hz']} Hz pickup; use local frequency measurement ([ac_sense]) or a finer meter")
    return cfg


def _stage_blocks(stages: Any, blocks: list[dict[str, Any]], source: str) -> Any:
    """[[stages]] blocks = ["row-a", ...] (block names, or indices) -> block indices."""
    if not isinstance(stages, list):
        return stages  # agent.config.validate reports it
    names = [b["name"] for b in blocks]
    out = []
    for i, st in enumerate(stages):
        if isinstance(st, dict) and isinstance(st.get("blocks"), list):
            st = dict(st)
            idx = []
            for b in st["blocks"]:
                if isinstance(b, str):
                    if b not in names:
                        raise UserError(f"{source}: stages[{i}].blocks: no block named {b!r} (have {', '.join(names)})")
                    idx.append(names.index(b))
                else:
                    idx.append(b)
            st["blocks"] = idx
        out.append(st)
    return out


def load_site(path: str | Path, board_name: str | None = None, device_id: str | None = None) -> dict[str, Any]:
    from .datafiles import shipped

    path = shipped(path, "scenarios")
    return normalize(read_toml(path), board_name=board_name, device_id=device_id, source=str(path))


def config_bytes(cfg: dict[str, Any]) -> bytes:
    """The exact /config.cbor bytes (warnings are host-side only), in the integrity wrapper the
    board checks at boot (agent/integrity.py: CRC-32 over magic, length and CBOR)."""
    return integrity.wrap(cbor.dumps({k: v for k, v in cfg.items() if k != "warnings"}))


def keys_bytes(keys: dict[bytes, bytes]) -> bytes:
    """The exact /keys.cbor bytes ({kid: key}) in the same integrity wrapper."""
    return integrity.wrap(cbor.dumps(keys))


def read_settings(data: bytes) -> Any:
    """The object in a settings file's bytes (/config.cbor, /keys.cbor, /state.cbor); ValueError
    naming the reason when its integrity check fails."""
    p, why = integrity.unwrap(data)
    if why is not None:
        raise ValueError(why)
    return cbor.loads(bytes(p))


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(config_bytes(cfg)).hexdigest()[:16]
