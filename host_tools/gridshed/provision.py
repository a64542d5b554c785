"""`gridshed provision` and `gridshed status`: site config + per-device key onto a board, recorded.

provision:
1. read site.toml and the board file and build the normalized config (gridshed.siteconfig,
   the same validation the board runs) -- every mistake is a UserError naming the key, before
   the board is touched;
2. stop the agent, read /build.json (which board/build the board runs) and refuse a site.toml
   written for another board, or one that turns on a feature the board's build leaves out
   (a build for another site, `gridshed build --site`);
3. generate a 256-bit command key and an 8-byte key id, write /config.cbor and /keys.cbor
   ({kid: key}) beside the old files, verify their hashes on the board, have the board's own
   firmware read the new config as it will at boot (agent.boot.load_config: a build older than
   this gridshed may refuse a key it writes; refused = nothing switched), switch them over
   (Board.switch_over: one committed plan, so config and key change together, also across a
   power cut: docs/failsafes.md "Writing to a board");
4. record device id, board, site, key id, key, firmware build, config hash and times in the
   inventory (only once the board has the new files: a failed write leaves the old config and
   key active, and the inventory as it was). The key is never printed;
5. restart the agent whatever happened after it was stopped, and wait until it answers @status.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from .build import missing_features
from .deploy import PLAN, STAGE, finish_interrupted, read_board_build
from .errors import UserError
from .transport import AGENT_UP_WAIT, Board, BoardError, Console, sigint_deferred, run_with_full_heap

CONFIG_FILE = "config.cbor"
KEYS_FILE = "keys.cbor"
BROKER_FILE = "broker.cbor"  # the board's broker CA and login (agent/mqtt_tls.py)
KID_LEN = 8


def prepare_config(site_path: str | Path, board_name: str | None = None,
                   device_id: str | None = None) -> dict[str, Any]:
    """The normalized config (UserError naming the key on any problem)."""
    from . import siteconfig

    site = siteconfig.read_toml(site_path)
    site_board = site.get("board")
    if board_name and site_board and site_board != board_name:
        raise UserError(f"{site_path}: board: {site_board!r} but the board is a {board_name} "
                        "(fix board = ... in the site file, or connect the right board)")
    if not device_id and not site.get("device"):
        raise UserError(f"{site_path}: device: missing; pass --device-id ID or set device = \"...\"")
    cfg = siteconfig.normalize(site, board_name=board_name, device_id=device_id, source=str(site_path))
    if not cfg.get("site"):
        raise UserError(f"{site_path}: site: missing; set site = \"...\" (the site id)")
    return cfg


_CHECK_CONFIG = """
import sys,gc
gc.collect()
try:
 import agent.boot as _gb
 _gb.CONFIG_PATH={path!r}
 _r=_gb.load_config()[1]
 print('GSCHK '+repr(_r))
except Exception as _x:
 print('GSCHK-NO '+repr(_x))
sys.modules.pop('agent.boot',None)
_gb=_r=None
"""


def board_check_config(b: Board, path: str) -> tuple[list[str], str | None]:
    """(errors, None) from the board's own config check (agent.boot.load_config, what it runs at
    boot) of the file `path` on the board; ([], why) when the board could not run it."""
    import ast

    try:
        out = b.exec(_CHECK_CONFIG.format(path=path), timeout=30).decode(errors="replace")
    except BoardError as exc:
        return [], str(exc)
    for line in out.splitlines():
        if line.startswith("GSCHK "):
            try:
                errors = ast.literal_eval(line[6:].strip())
            except (ValueError, SyntaxError):
                break
            return [str(e) for e in errors or ()], None
        if line.startswith("GSCHK-NO "):
            return [], line[9:].strip()
    return [], "no answer: " + out.strip()[-120:]


def provision(port: str, site_path: str | Path, device_id: str | None = None, board_name: str | None = None,
              inventory_path: str | Path | None = None, keep_key: bool = False, restart: bool = True,
              verify_agent: float = 0.0, progress: Callable[[str], None] | None = None,
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write config + key to the board on `port` and record them. progress: step messages; say:
    the one line on the agent's restart when provisioning fails (result["restart"] otherwise)."""

    from . import siteconfig, signing
    from .inventory import Inventory

    step = progress or (lambda msg: None)
    if board_name or siteconfig.read_toml(site_path).get("board"):
        prepare_config(site_path, board_name, device_id)  # fail fast, before the board is touched
    inv = Inventory(inventory_path)
    check_warnings: list[str] = []
    switched = [False]

    def said(line: str) -> None:  # the restart line after Ctrl-C (or an unexpected error)
        if say:
            say(line + ("" if switched[0] else "; nothing was switched: the board keeps its old config and key, "
                                               "the inventory is unchanged"))

    try:
        def work(full_heap: bool) -> tuple[Any, ...]:
            check_warnings.clear()
            with Board(port) as b:
                step("stopping the agent")
                with b.stopped(restart=restart, wait=AGENT_UP_WAIT, say=said, full_heap=full_heap):
                    finish_interrupted(b)
                    build = read_board_build(b)
                    board_on_device = build.get("board") if build else None
                    if board_name and board_on_device and board_on_device != board_name:
                        raise UserError(f"{port}: the board runs a build for {board_on_device}, not {board_name}")
                    cfg = prepare_config(site_path, board_name or board_on_device, device_id)
                    missing = missing_features(build, cfg)
                    if missing:
                        raise UserError(f"{port}: {site_path} turns on {', '.join(missing)} but the board runs build "
                                        f"{build.get('build_id') if build else '?'} without it; build and deploy for the site "
                                        f"first: `gridshed deploy --board {cfg['board']} --site {site_path}`")
                    dev = cfg["device"]
                    existing = inv.get(dev, show_key=True)
                    if keep_key and existing:
                        kid, key = bytes.fromhex(existing["key_id"]), bytes.fromhex(existing["key"])
                    else:
                        kid, key = secrets.token_bytes(KID_LEN), signing.new_key()
                    if len(key) != 32:
                        raise UserError("command key must be 256 bits")
                    blobs = {CONFIG_FILE: siteconfig.config_bytes(cfg), KEYS_FILE: siteconfig.keys_bytes({kid: key})}
                    broker = broker_blob(inv, cfg, site_path)
                    removes = []
                    if broker is not None:
                        blobs[BROKER_FILE] = broker
                    else:
                        removes = [BROKER_FILE]  # a site without broker security: no stale login left
                    want = {f: hashlib.sha256(d).hexdigest() for f, d in blobs.items()}
                    step("writing config and key")
                    for f, data in blobs.items():
                        b.put(f + STAGE, data)
                    staged = b.hashes([f + STAGE for f in blobs])
                    bad = [f for f in blobs if staged.get(f + STAGE) != want[f]]
                    if bad:
                        raise BoardError(f"{port}: {bad[0]} does not verify after writing; nothing was changed, "
                                         "the old config and key stay active")
                    # the board's own firmware reads the staged config as it will at boot: a build
                    # older than this gridshed may not know a key it writes, and a refused config
                    # would leave the board without a running agent
                    refused, unchecked = board_check_config(b, CONFIG_FILE + STAGE)
                    if refused:
                        bid = build.get("build_id") if build else "?"
                        raise UserError(f"{port}: the board's firmware (build {bid}) refuses this config: {refused[0]}; "
                                        "nothing was changed: deploy this gridshed's firmware first (`gridshed deploy "
                                        f"--board {cfg['board']} ...`), then provision again")
                    if unchecked:
                        check_warnings.append(f"{port}: the board could not check the new config itself ({unchecked})")
                    step("switching over")
                    firmware_build = build.get("build_id") if build else None
                    # Ctrl-C waits until the board and the inventory both hold the new key (cut in
                    # between, the inventory would keep a key the board no longer has)
                    with sigint_deferred() as held:
                        switched[0] = True
                        b.switch_over([(f + STAGE, f, want[f]) for f in blobs], removes, PLAN)
                        final = b.hashes(list(blobs))
                        if any(final.get(f) != want[f] for f in blobs):
                            raise BoardError(f"{port}: config/key files differ after the switch-over; provision again")
                        rec = inv.record_provision(dev, cfg["board"], cfg.get("site"), kid.hex(), key, firmware_build,
                                                   siteconfig.config_hash(cfg), port=port)
                    if held:
                        check_warnings.append("Ctrl-C held back until the board and the inventory both had the "
                                              "new key (provisioned)")
                    if restart:
                        step("restarting the agent")
            return b, build, cfg, dev, kid, firmware_build, rec

        b, build, cfg, dev, kid, firmware_build, rec = run_with_full_heap(work)
    finally:
        inv.close()
    result: dict[str, Any] = {"device_id": dev, "board": cfg["board"], "site": cfg.get("site"),
                              "key_id": kid.hex(), "firmware_build": firmware_build,
                              "config_hash": rec["config_hash"], "inventory": str(inv.path),
                              "restart": b.outcome, "warnings": cfg.get("warnings", []) + check_warnings + b.warnings}
    if not build:
        result["warnings"].append("no gridshed build on the board (/build.json missing): run `gridshed deploy`")
    st = b.agent_status
    if restart and st is None and verify_agent > 0:
        try:
            st = read_status(port, timeout=verify_agent, events=0)
        except UserError as exc:
            result["warnings"].append(f"agent did not answer after restart: {exc}")
    if restart:
        said, warning = send_time(port, b, st, dev, inventory_path)
        if said:
            result["restart"] = (result["restart"] or "") + said
            result["warnings"] = [w for w in result["warnings"] if w != b.time_warning]
        if warning:
            result["warnings"].append(warning)
    if st is not None:
        result["agent"] = {"state": st.get("state"), "device": st.get("device")}
        if st.get("device") != dev:
            result["warnings"].append(f"agent reports device {st.get('device')!r}, expected {dev!r}")
    return result


def send_time(port: str, b: Board, st: dict[str, Any] | None, device: str, inventory_path: str | Path | None,
              seq_path: Path | None = None) -> tuple[str, str | None]:
    """After a restart (provision, rotate-key, deploy): the agent forgot its trusted time, so
    signed commands that carry no nonce are refused and a market board's economics wait for it.
    With the device's key in the inventory, send it the signed time as `gridshed time-sync` does
    (fleet_client.time_sync_serial: its nonce, then `time`). Returns (what to add to the one-line
    result, a warning or None); it never raises (the operation before it succeeded: a failure is
    the warning). The restart's time-sync warning (b.time_warning) goes from b.warnings once the
    board took the time."""
    from . import fleet_client as fc

    if not st or st.get("time_trusted") is not False or "error" in st:
        return "", None  # not restarted, not answering, or an agent without the trusted-time rule
    try:
        rep = fc.time_sync_serial(port, inventory_path, device, seq_path=seq_path)
    except UserError as exc:
        why = str(exc)
    except Exception as exc:  # a cable pulled right after the restart (serial/OS errors)
        why = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:  # the operation itself is done: Ctrl-C skips only this last step
        why = "interrupted (Ctrl-C)"
    else:
        if rep.get("ok"):
            if b.time_warning in b.warnings:
                b.warnings.remove(b.time_warning)
            return "; signed time sent (its clock is trusted)", None
        why = f"the board refused it: {rep.get('refused') or rep.get('error') or rep}"
    return "", (f"{port}: could not send the signed time ({why}); the agent runs, but until `gridshed "
                f"time-sync --device {device} --port {port}` its clock is not trusted (signed restore / disarm "
                "need the board's nonce, a market schedule waits)")


def broker_blob(inv: Any, cfg: dict[str, Any], site_path: str | Path) -> bytes | None:
    """/broker.cbor for this device (docs/mqtt.md "Securing the broker"): the site's [mqtt]
    security settings recorded in the inventory, the device's broker credentials (issued once,
    kept across provisionings; `gridshed rotate-key --broker` replaces them). None when the
    site's broker needs neither TLS nor a login."""
    from . import brokerauth

    mq = cfg.get("mqtt") or {}
    if not mq.get("enabled") or (not mq.get("tls") and (mq.get("auth") or "none") == "none"):
        return None
    row = brokerauth.record_site(inv, cfg["site"], mq, Path(site_path).resolve().parent)
    creds = inv.broker_creds(cfg["device"])
    if row["auth"] != "none" and (not creds or creds["kind"] != row["auth"]):
        creds = brokerauth.issue_device(inv, cfg["device"], row)
    return brokerauth.board_file(row, creds if row["auth"] != "none" else None)


def config_hash_of(cfg: dict[str, Any]) -> str:
    from . import siteconfig

    return siteconfig.config_hash(cfg)


def read_status(port: str, timeout: float = 5.0, events: int = 10) -> dict[str, Any]:
    """One-shot status over the console protocol (the agent keeps running)."""
    deadline = time.monotonic() + timeout
    with Console(port) as c:
        last: Exception | None = None
        st: dict[str, Any] | None = None
        while time.monotonic() < deadline:  # a just-restarted agent needs a moment
            try:
                st = c.status(timeout=min(2.0, max(0.2, deadline - time.monotonic())))
                break
            except BoardError as exc:
                last = exc
        if st is None:
            if isinstance(last, BoardError) and last.args:  # the whole wait, not its last try's
                import re

                last.args = (re.sub(r"within [0-9.e+-]+ s", f"within {timeout:g} s", str(last.args[0]), count=1),)
            raise last or BoardError(f"{port}: no status")
        # the agent's own hash of the /config.cbor it booted with (what the inventory records);
        # only an agent too old to report it gets one made from its @config answer (which is
        # the config as it runs: its meter map reduced to the model, so it may not match)
        if not st.get("config_hash"):
            try:
                cfg = c.request("config", timeout=3.0)[-1].get("config")
                if isinstance(cfg, dict):
                    st["config_hash"] = config_hash_of(cfg)
            except UserError:
                pass
        if events:
            since = max(0, int(st.get("journal_seq") or 0) - events + 1)
            try:
                st["events"] = c.events(since, timeout=3.0)[-events:]
            except UserError:
                st["events"] = []
    return st


def touch_inventory(st: dict[str, Any], inventory_path: str | Path | None) -> bool:
    """Record last-seen for the device that answered (only in an existing inventory)."""
    from .inventory import Inventory, default_path

    path = Path(inventory_path) if inventory_path else default_path()
    dev = st.get("device")
    if not dev or not path.exists():
        return False
    with Inventory(path) as inv:
        return inv.touch(dev, firmware_build=st.get("build"), config_hash=st.get("config_hash"))
