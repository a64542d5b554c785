"""`gridshed deploy`: copy a build folder onto a board, only what changed, safely.

Sequence (raw REPL through mpremote's SerialTransport; the agent is stopped by Ctrl-C):

1. finish a switch-over a previous deploy could not complete (``deploy-plan.json`` on the board);
2. check the board runs the port the build is for (sys.platform);
3. hash every target file on the board (sha256 computed there) and pick the ones that differ;
4. write each changed file *beside* the old one as ``<file>.gsnew`` and verify its hash on the
   board (a staged file left by an interrupted deploy is reused when its hash is right);
5. the switch-over (Board.switch_over): write the plan (staged file, target, sha256) as a .tmp,
   then in ONE exec on the board rename it into place (the commit), rename every staged file
   over its old copy, remove files the old build had and the new one does not, delete the plan;
6. verify every file's hash again, then restart the agent (soft reset) and wait until it says
   "agent up" and answers @status.

Until step 5 commits, the board holds the complete old firmware, so an interrupted deploy (Ctrl-C,
unplugged cable, MemoryError on the board) leaves it runnable; step 5 runs on the board by itself
in milliseconds, and a reset during it is finished at the next boot by the firmware
(agent/boot.py finish_switch), or by the next deploy on a board whose firmware predates that.
Whatever happens after the agent was stopped, it is restarted (Board.stopped): the CLI says how
in one line; without a connection left, the board resets into the agent when its maintenance
window ends (docs/failsafes.md).

``romfs=True`` (`gridshed deploy --romfs`, docs/romfs.md): after step 2 the build's ROMFS image is
written into the board's ROMFS partition (romfs.py: the ports' vfs.rom_ioctl protocol), unless the
partition already holds it, verified by its hash on the board and mounted once at /rom as a
check. Only main.py (and /build.json) then go to the filesystem, and the switch-over also removes
the filesystem's copy of the agent package: ``''`` comes before ``/rom`` on ``sys.path``, so any
``agent`` directory left there would be imported instead of the ROM one. A ROM write cut short
leaves a partial image; the old filesystem agent, if any, is still there and still shadows it
until the switch-over, so a board that ran from its filesystem keeps running; a board that ran
from ROM needs the deploy run again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from .build import BOARD_MANIFEST, load_manifest
from .errors import UserError
from .transport import Board, BoardError, run_with_full_heap

STAGE = ".gsnew"
FALLBACK = "lib/"                      # deploy --romfs: the agent's copy while the partition is rewritten
PLAN = "switch-plan.json"              # the firmware's agent/boot.py PLAN_PATH
LEGACY_PLANS = ("deploy-plan.json",)   # written by earlier gridshed versions (no hashes)
PLATFORMS = {"esp32": ("esp32",), "rp2": ("rp2",), "unix": ("linux", "darwin", "unix")}

Progress = Callable[[str, dict[str, Any]], None]


def _noop(event: str, info: dict[str, Any]) -> None:
    pass


def board_manifest_bytes(manifest: dict[str, Any]) -> bytes:
    keep = {k: v for k, v in manifest.items() if k not in ("path", "source")}
    return (json.dumps(keep, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _ancestors(path: str) -> list[str]:
    parts = PurePosixPath(path).parts[:-1]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def finish_interrupted(b: Board) -> bool:
    """Complete a committed switch-over a reset cut short, if the firmware did not at boot (it
    predates agent/boot.py finish_switch, or did not boot since); True if there was one."""
    for name in (PLAN,) + LEGACY_PLANS:
        raw = b.get(name)
        if raw is None:
            continue
        try:
            plan = json.loads(raw)
            renames = [tuple(x) for x in plan["renames"]]
            removes = list(plan["removes"])
        except (ValueError, KeyError, TypeError):
            b.remove([name])  # torn (a legacy plan was written in place): nothing was switched yet
            continue
        # only renames whose staged file is still there and right (the rest already happened)
        staged = b.hashes([r[0] for r in renames])
        todo = [r for r in renames if staged.get(r[0]) and (len(r) < 3 or staged[r[0]] == r[2])]
        b.switch_over(todo, removes, name, commit=False)
        return True
    return False


def check_platform(b: Board, manifest: dict[str, Any]) -> str:
    from .boards import load_board

    platform = b.eval("__import__('sys').platform")
    port = load_board(manifest["board"])["port"]
    if platform not in PLATFORMS.get(port, (port,)):
        raise UserError(f"{b.port}: the board runs MicroPython for {platform!r} but this build is for "
                        f"{manifest['board']} ({port}); pass the right --board")
    return platform


def check_board_config(b: Board, manifest: dict[str, Any]) -> bool:
    """Refuse (before anything is written) a build that lacks a feature the board's config turns
    on: the agent would not start with it (docs/romfs.md, "A build for the site"). True when the
    board has a config it could read (a provisioned board)."""
    from .build import missing_features
    from .siteconfig import read_settings

    raw = b.get("config.cbor")
    if not raw:
        return False
    try:
        cfg = read_settings(raw)
    except ValueError:
        return False  # a damaged config: the agent refuses it at boot whatever the build
    if not isinstance(cfg, dict):
        return False
    missing = missing_features(manifest, cfg)
    if missing:
        raise UserError(f"{b.port}: the board's config (site {cfg.get('site')!r}) turns on {', '.join(missing)}, which "
                        f"this build leaves out; build for the site: `gridshed build --board {manifest['board']} "
                        f"--site SITE.toml` (nothing was written)")
    return True


def deploy(port: str, build_dir: str | Path, board_name: str | None = None, force: bool = False,
           restart: bool = True, progress: Progress | None = None, baudrate: int = 115200,
           romfs: bool = False, say: Callable[[str], None] | None = None,
           inventory_path: str | Path | None = None, signed_time: bool = True,
           maintenance_boot: bool = False) -> dict[str, Any]:
    """Deploy `build_dir` to the board on `port`; returns a summary dict.

    say: gets the one line on the agent's restart when the deploy fails (the summary's "restart"
    has it otherwise). signed_time: after the restart, when the inventory (`inventory_path`, or
    the default one) holds the key the board has for its device, send the board the signed time
    its restart forgot, as provision does (provision.send_time); the summary's "signed_time"
    says whether it was sent and why not. It never fails the deploy: a failure is a warning.
    maintenance_boot: write in a maintenance boot even when the stopped agent's heap would do
    (Board.stopped; otherwise that happens only when the heap is too full)."""
    from . import romfs as rf

    given = progress or _noop
    switched = [False]

    def progress(event: str, info: dict[str, Any]) -> None:
        if event == "switch":
            switched[0] = True
        given(event, info)

    def said(line: str) -> None:  # the restart line after Ctrl-C (or an unexpected error)
        if say:
            say(line + ("" if switched[0] or romfs else "; nothing was switched: the board keeps its old firmware"))

    t0 = time.monotonic()
    manifest = load_manifest(build_dir)
    if board_name and manifest["board"] != board_name:
        raise UserError(f"{build_dir} was built for {manifest['board']}, not {board_name}; "
                        f"run `gridshed build --board {board_name}`")
    bdir = Path(build_dir)
    agent_files = [e["file"] for e in manifest["files"]]
    rom = manifest.get("romfs") if romfs else None
    full_manifest = manifest
    image = b""
    rom_top: list[str] = []
    if romfs:
        if not rom:
            raise UserError(f"{build_dir} has no ROMFS image; run `gridshed build --board {manifest['board']} --romfs`")
        image = (bdir / rom["file"]).read_bytes()
        rom_top = rf.shadow_candidates(rom["files"])
        in_rom = set(rom["files"])
        fs_entries = [e for e in manifest["files"] if e["file"] not in in_rom]
        # the board's /build.json lists what is on its filesystem, and the image apart
        manifest = dict(manifest, files=fs_entries, total_size=sum(e["size"] for e in fs_entries), mode="romfs")

    def work(full_heap: bool) -> tuple[dict[str, Any], Board]:
        summary: dict[str, Any] = {"port": port, "board": manifest["board"], "build_id": manifest["build_id"],
                                   "written": [], "unchanged": [], "resumed": [], "removed": [],
                                   "bytes_written": 0, "recovered": False, "restarted": False}
        if romfs:
            summary["romfs"] = {"image_size": len(image), "sha256": rom["sha256"], "written": False}
        with Board(port, baudrate=baudrate) as b:
            with b.stopped(restart=restart, say=said, full_heap=full_heap, maint_boot=maintenance_boot):
                progress("connect", {"port": port})
                summary["recovered"] = finish_interrupted(b)
                summary["platform"] = check_platform(b, manifest)
                summary["had_config"] = check_board_config(b, manifest)
                if restart and signed_time:
                    summary["board_kids"] = board_kids(b)
                fallback = romfs and _needs_fallback(b, image, rom, force, rom_top, manifest)
                if fallback:
                    # the board runs its agent from ROM and the image must be rewritten: a copy of
                    # the new build's agent goes to /lib first (after /rom on sys.path: it shadows
                    # nothing), so a write cut short (its header is written last: the port then
                    # mounts nothing) leaves a board that boots the agent from /lib
                    progress("fallback", {})
                    summary["fallback_written"] = _write_fallback(b, port, bdir, full_manifest, progress)
                if romfs:
                    from .boards import load_board

                    rf.quiet_irqs(b, rf.agent_pins(b, load_board(manifest["board"])))
                    _deploy_image(b, image, rom, force, summary["romfs"], progress, manifest)
                _write_fs(b, port, bdir, manifest, force, progress, summary, agent_files, rom_top if romfs else None)
                if romfs:
                    left, left_dirs = rf.find_shadows(b, [FALLBACK + t for t in rom_top])
                    if left or left_dirs:  # the image verified and mounted: the copy is not needed
                        rf.remove_trees(b, [FALLBACK + t for t in rom_top])
                        summary["removed"] = summary["removed"] + [FALLBACK + t + "/" for t in rom_top]
                if restart:
                    progress("restart", {})
        return summary, b

    summary, b = run_with_full_heap(work)
    summary["restarted"] = bool(b.outcome and b.outcome.startswith("agent restarted"))
    summary["restart"] = b.outcome
    summary["agent_status"] = b.agent_status
    # the new build refuses the config the board had (a blank board has none yet: not this)
    summary["config_refused"] = b.config_refused if summary.pop("had_config", False) else None
    if summary["config_refused"]:
        summary["restart"] = (summary["restart"] or "") + ": PROTECTION IS OFF"
    kids = summary.pop("board_kids", None)
    summary["signed_time"] = {"sent": False, "device": None, "why": "not asked (--no-restart)" if not restart
                              else "not asked"}
    if restart and signed_time:
        summary["signed_time"] = _send_time_after_restart(port, b, kids, inventory_path)
        if summary["signed_time"].get("said"):
            summary["restart"] = (summary["restart"] or "") + summary["signed_time"].pop("said")
    summary["warnings"] = list(b.warnings)
    summary["seconds"] = round(time.monotonic() - t0, 2)
    return summary


def board_kids(b: Board) -> set[str] | None:
    """The key ids (hex) in the board's /keys.cbor; None when it has none or it cannot be read."""
    from .siteconfig import read_settings

    try:
        raw = b.get("keys.cbor")
        keys = read_settings(raw) if raw else None
    except (ValueError, BoardError):
        return None
    if not isinstance(keys, dict):
        return None
    return {bytes(k).hex() for k in keys if isinstance(k, (bytes, bytearray))}


def _send_time_after_restart(port: str, b: Board, kids: set[str] | None,
                             inventory_path: str | Path | None) -> dict[str, Any]:
    """After deploy's restart: the signed time (provision.send_time, the same exchange provision
    and rotate-key make) when this host holds the board's key; the inventory's record of the
    device then gets the build the agent now runs (and last seen). {"sent", "device", "why"} plus
    "said" (for the one-line result) when sent; a failure goes to b.warnings."""
    from .inventory import Inventory, default_path
    from .provision import send_time

    st = b.agent_status
    dev = st.get("device") if isinstance(st, dict) else None
    out: dict[str, Any] = {"sent": False, "device": dev, "why": None}
    if not st or "error" in st:
        out["why"] = "the agent did not answer @status after the restart"
        return out
    if not dev:
        out["why"] = "the agent reports no device id (not provisioned)"
        return out
    path = Path(inventory_path) if inventory_path else default_path()
    row = None
    if path.exists():
        try:
            with Inventory(path) as inv:
                row = inv.get(dev)
                if row is not None and kids is not None and row["key_id"] in kids:
                    inv.touch(dev, firmware_build=st.get("build"), config_hash=st.get("config_hash"))
        except UserError as exc:
            out["why"] = str(exc)
            return out
    if row is None:
        out["why"] = f"device {dev} is not in the inventory {path}"
        if kids and st.get("time_trusted") is False:  # a provisioned board, its key elsewhere
            b.warnings.append(f"{port}: signed time not sent: {out['why']} (pass --inventory); the board's clock "
                              f"is not trusted until `gridshed time-sync --device {dev}` from the host that holds "
                              "its key (until then signed restore / disarm need the board's nonce)")
    elif kids is None:
        out["why"] = "the board's key file could not be read"
    elif row["key_id"] not in kids:
        out["why"] = (f"the inventory {path} holds key {row['key_id']} for {dev}, the board another one "
                      "(provisioned from another inventory?)")
        b.warnings.append(f"{port}: signed time not sent: {out['why']}; signed commands from this inventory "
                          "will be refused (unknown-kid): pass the right --inventory, or provision again")
    elif st.get("time_trusted") is not False:
        out["why"] = ("its clock is trusted already" if st.get("time_trusted")
                      else "its firmware has no trusted time")
    else:
        said, warning = send_time(port, b, st, dev, inventory_path)
        if said:
            out.update(sent=True, said=said)
        else:
            out["why"] = warning or "not sent"
            if warning:
                b.warnings.append(warning)
    return out


def _write_fs(b: Board, port: str, bdir: Path, manifest: dict[str, Any], force: bool, progress: Progress,
              summary: dict[str, Any], agent_files: list[str], rom_top: list[str] | None) -> None:
    """The filesystem part of a deploy: `manifest`'s files and /build.json staged, verified,
    switched over in one step; with `rom_top` (a ROMFS deploy) the filesystem's copy of the agent
    is removed in the same switch-over."""
    from . import romfs as rf

    romfs = rom_top is not None
    rom_top = rom_top or []
    files = {e["file"]: e for e in manifest["files"]}
    bm_bytes = board_manifest_bytes(manifest)
    import hashlib

    bm_hash = hashlib.sha256(bm_bytes).hexdigest()
    old_raw = b.get(BOARD_MANIFEST)
    old_files: set[str] = set()
    if old_raw:
        try:
            old_obj = json.loads(old_raw)
            old_files = {e["file"] for e in old_obj.get("files", [])}
            if _same_build(old_obj, json.loads(bm_bytes)):
                # the same build made again (`deploy --board` builds first): only its time stamp
                # differs, so the board keeps its /build.json and a deploy again writes nothing
                bm_bytes, bm_hash = old_raw, hashlib.sha256(old_raw).hexdigest()
        except (ValueError, AttributeError, KeyError, TypeError):
            old_files = set()
    # what the board has now, and what an interrupted deploy may have staged
    shadows = [f[:-4] + ".py" for f in files if f.endswith(".mpy")]
    rom_dirs: list[str] = []
    if romfs:  # the filesystem's agent would be imported before the ROM's
        rom_files, rom_dirs = rf.find_shadows(b, rom_top)
        shadows += rom_files
    targets = list(files) + [BOARD_MANIFEST]
    probe = targets + [t + STAGE for t in targets] + shadows
    progress("hash", {"files": len(probe)})
    have = b.hashes(probe)
    want = {f: e["sha256"] for f, e in files.items()}
    want[BOARD_MANIFEST] = bm_hash
    changed = [f for f in targets if force or have.get(f) != want[f]]
    summary["unchanged"] = [f for f in files if f not in changed]
    # staged copies an interrupted deploy left beside files that need no change: flash space
    stale = [f + STAGE for f in targets if f not in changed and have.get(f + STAGE)]
    if stale:
        b.remove(stale)
    summary["stale_removed"] = stale
    blobs = {f: (bdir / f).read_bytes() for f in changed if f != BOARD_MANIFEST}
    blobs[BOARD_MANIFEST] = bm_bytes
    to_write = [f for f in changed if have.get(f + STAGE) != want[f]]
    summary["resumed"] = [f for f in changed if f not in to_write]
    progress("plan", {"changed": changed, "to_write": to_write,
                      "total_bytes": sum(len(blobs[f]) for f in to_write)})
    b.makedirs(d for f in to_write for d in _ancestors(f))
    for f in to_write:
        progress("file", {"file": f, "size": len(blobs[f])})
        b.put(f + STAGE, blobs[f], progress=lambda n: progress("bytes", {"n": n}))
        summary["bytes_written"] += len(blobs[f])
    summary["written"] = [f for f in changed if f != BOARD_MANIFEST]
    # verify every staged file before switching over
    progress("verify", {"files": len(changed)})
    staged = b.hashes([f + STAGE for f in changed])
    bad = [f for f in changed if staged.get(f + STAGE) != want[f]]
    for f in bad:  # one retry per file: flaky USB
        b.put(f + STAGE, blobs[f])
    if bad:
        staged = b.hashes([f + STAGE for f in bad])
        still = [f for f in bad if staged.get(f + STAGE) != want[f]]
        if still:
            raise BoardError(f"{port}: {still[0]} does not verify after writing (hash differs); "
                             "nothing was switched, the board still has the old firmware")
    removes = sorted((old_files - set(files)) | {s for s in shadows if have.get(s)})
    removes = [r for r in removes if r not in files and r != BOARD_MANIFEST]
    renames: list[tuple[str, ...]] = [(f + STAGE, f, want[f]) for f in changed]
    if renames or removes:
        progress("switch", {"renames": len(renames), "removes": len(removes)})
        # from here the board may have the new build: with the agent in it, the restart
        # waits until it says "agent up" and answers @status
        b.wait_for_agent = any(f.startswith("agent/app.") for f in agent_files)
        b.switch_over(renames, removes, PLAN)
    summary["removed"] = removes
    if romfs:
        if rom_dirs:
            rf.remove_trees(b, [d for d in rom_top if d in rom_dirs])
            summary["removed"] = removes + sorted(d + "/" for d in rom_dirs)
        left, left_dirs = rf.find_shadows(b, rom_top)
        if left or left_dirs:
            raise BoardError(f"{port}: {(left + left_dirs)[0]} is still on the filesystem and would be "
                             "imported instead of the ROM copy; run deploy again")
    final = b.hashes(targets)
    wrong = [f for f in targets if final.get(f) != want[f]]
    if wrong:
        raise BoardError(f"{port}: after the switch-over {wrong[0]} has the wrong hash; run deploy again")


def _same_build(old: Any, new: dict[str, Any]) -> bool:
    """Two board manifests of one build (all but the time it was made are equal)."""
    if not isinstance(old, dict):
        return False
    return {k: v for k, v in old.items() if k != "created"} == {k: v for k, v in new.items() if k != "created"}


def _needs_fallback(b: Board, image: bytes, rom: dict[str, Any], force: bool, rom_top: list[str],
                    manifest: dict[str, Any]) -> bool:
    """True when the partition must be rewritten while no agent is on the filesystem (the board
    runs it from the partition about to be erased)."""
    from . import romfs as rf

    files, dirs = rf.find_shadows(b, rom_top)
    if files or dirs:
        return False
    part = rf.query(b)
    rf.check_fits(b, part, image, manifest)
    return force or rf.image_hash(b, part, len(image)) != rom["sha256"]


def _write_fallback(b: Board, port: str, bdir: Path, manifest: dict[str, Any], progress: Progress) -> int:
    """The build's agent package under /lib (FALLBACK), staged, verified, switched over; the
    number of files written (files already there and right are kept)."""
    from . import romfs as rf

    tops = rf.shadow_candidates([e["file"] for e in manifest["files"] if e["file"].endswith(".mpy")])
    src = {FALLBACK + e["file"]: e for e in manifest["files"]
           if any(e["file"].startswith(t + "/") for t in tops)}
    have = b.hashes(list(src) + [f + STAGE for f in src])
    changed = [f for f in src if have.get(f) != src[f]["sha256"]]
    to_write = [f for f in changed if have.get(f + STAGE) != src[f]["sha256"]]
    b.makedirs(d for f in to_write for d in _ancestors(f))
    for f in to_write:
        progress("file", {"file": f, "size": src[f]["size"]})
        b.put(f + STAGE, (bdir / src[f]["file"]).read_bytes(), progress=lambda n: progress("bytes", {"n": n}))
    staged = b.hashes([f + STAGE for f in changed])
    bad = [f for f in changed if staged.get(f + STAGE) != src[f]["sha256"]]
    if bad:
        raise BoardError(f"{port}: {bad[0]} does not verify after writing (hash differs); nothing was switched, "
                         "the board still runs its agent from ROM")
    if changed:
        b.switch_over([(f + STAGE, f, src[f]["sha256"]) for f in changed], [], PLAN)
    return len(to_write)


def _deploy_image(b: Board, image: bytes, rom: dict[str, Any], force: bool, info: dict[str, Any],
                  progress: Progress, manifest: dict[str, Any] | None = None) -> None:
    """Put the ROMFS image into the board's partition 0 unless it holds it already; verify."""
    from . import romfs as rf

    progress("rom-query", {})
    part = rf.query(b)
    info["partition_size"] = part["size"]
    rf.check_fits(b, part, image, manifest)
    if not force and rf.image_hash(b, part, len(image)) == rom["sha256"]:
        progress("rom", {"size": 0, "unchanged": True})
    else:
        progress("rom", {"size": len(image), "unchanged": False})
        rf.write_image(b, part, image, progress)
        info["written"] = True
        progress("rom-verify", {})
        if rf.image_hash(b, part, len(image)) != rom["sha256"]:
            raise BoardError(f"{b.port}: the ROMFS partition does not hold the image after writing "
                             "(hash differs); run deploy again")
    rf.check_mounted(b, part, rf.top_names(rom["files"]))


def read_board_build(b: Board) -> dict[str, Any] | None:
    """The build manifest a board carries (/build.json), or None."""
    raw = b.get(BOARD_MANIFEST)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
