"""`gridshed rotate-key DEVICE`: replace a board's command-signing key (or, with broker=True,
its broker credentials) without ever leaving it without a working one (docs/security.md,
"Rotation").

1. The new key id and key are recorded in the inventory as the device's *pending* key first: a
   host that dies at any later point still knows both keys.
2. The board's agent is stopped; /keys.cbor is read, the device's old entry replaced by the new
   one (other entries, e.g. a site-wide key, kept), written beside the old file, its sha256
   checked on the board, then switched over with the same committed plan as provision
   (Board.switch_over, agent/boot.py finish_switch): after a power cut at any point the board
   holds either the old table or the new one, never none and never a mix.
3. The board's file is read back; only then does the inventory's key become the new one. A
   rotation that was cut short is finished by the next `rotate-key`: if the board already holds
   the pending key it is committed, otherwise it is dropped and a new one made.
4. The replay state survives: /seq.cbor is not touched, and the host's seq counter for the new
   key id continues above the old key's last seq (never lower). A command signed with the old
   key is refused (`unknown-kid`) as soon as the switch is done.
"""
from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any, Callable

from .deploy import PLAN, STAGE, finish_interrupted
from .errors import UserError
from .provision import BROKER_FILE, KEYS_FILE, KID_LEN, send_time
from .transport import AGENT_UP_WAIT, Board, BoardError, run_with_full_heap


def _board_keys(b: Board) -> dict[bytes, bytes]:
    from . import siteconfig

    raw = b.get(KEYS_FILE)
    if raw is None:
        return {}
    try:
        k = siteconfig.read_settings(raw)
    except ValueError:
        return {}
    return {bytes(kid): bytes(v) for kid, v in k.items()} if isinstance(k, dict) else {}


def rotate_key(port: str, device: str, inventory_path: str | Path | None = None, broker: bool = False,
               seq_path: Path | None = None, restart: bool = True,
               progress: Callable[[str], None] | None = None,
               say: Callable[[str], None] | None = None) -> dict[str, Any]:
    from . import brokerauth, signing, siteconfig
    from .inventory import Inventory

    step = progress or (lambda msg: None)
    inv = Inventory(inventory_path)
    res: dict[str, Any] = {"device_id": device, "what": "broker credentials" if broker else "command key"}
    try:
        row = inv.require(device, show_key=True)
        old_kid, old_key = bytes.fromhex(row["key_id"]), bytes.fromhex(row["key"])
        def work(full_heap: bool) -> Board:
            with Board(port) as b:
                step("stopping the agent")
                with b.stopped(restart=restart, wait=AGENT_UP_WAIT, say=say, full_heap=full_heap):
                    finish_interrupted(b)
                    keys = _board_keys(b)
                    if broker:
                        site = inv.site(row["site"] or "")
                        if not site or (site.get("auth") or "none") == "none":
                            raise UserError(f"site {row['site']!r} has no broker login to rotate "
                                            "([mqtt] auth = \"password\" or \"cert\", then provision)")
                        if old_kid not in keys:
                            raise UserError(f"{port}: the board does not hold {device}'s key {old_kid.hex()}: "
                                            "is this the right board?")
                        creds = brokerauth.issue_device(inv, device, site)
                        blobs = {BROKER_FILE: brokerauth.board_file(site, creds)}
                        res["note"] = ("run `gridshed broker-config` and reload Mosquitto: the board logs in "
                                       "with its new credentials (refused, with back-off, until then)")
                    else:
                        pend = inv.pending_key(device)
                        if pend and pend[0] in keys and keys[pend[0]] == pend[1]:
                            step("an interrupted rotation had switched already: committing it")
                            inv.commit_key(device, pend[0].hex(), pend[1], action="rotate-key (finished)")
                            if seq_path is not None:
                                c = signing.SeqCounter(seq_path)
                                c.next(pend[0], at_least=c.last(old_kid) + 1)
                            res.update(key_id=pend[0].hex(), old_key_id=old_kid.hex(), finished_interrupted=True)
                            return b
                        if old_kid not in keys:
                            raise UserError(f"{port}: the board does not hold {device}'s key {old_kid.hex()}: "
                                            "is this the right board? (provision it again to start over)")
                        new_kid, new_key = secrets.token_bytes(KID_LEN), signing.new_key()
                        inv.set_pending_key(device, new_kid.hex(), new_key)  # before the board has it
                        table = {k: v for k, v in keys.items() if k != old_kid}
                        table[new_kid] = new_key
                        blobs = {KEYS_FILE: siteconfig.keys_bytes(table)}
                    want = {f: hashlib.sha256(d).hexdigest() for f, d in blobs.items()}
                    step("writing the new file")
                    for f, data in blobs.items():
                        b.put(f + STAGE, data)
                    staged = b.hashes([f + STAGE for f in blobs])
                    if any(staged.get(f + STAGE) != want[f] for f in blobs):
                        raise BoardError(f"{port}: the new file does not verify after writing; nothing was "
                                         "switched, the old key stays active")
                    step("switching over")
                    b.switch_over([(f + STAGE, f, want[f]) for f in blobs], [], PLAN)
                    final = b.hashes(list(blobs))
                    if any(final.get(f) != want[f] for f in blobs):
                        raise BoardError(f"{port}: files differ after the switch-over; run rotate-key again")
                    if not broker:
                        inv.commit_key(device, new_kid.hex(), new_key)
                        if seq_path is not None:  # the new kid's seqs continue above the old kid's
                            c = signing.SeqCounter(seq_path)
                            c.next(new_kid, at_least=c.last(old_kid) + 1)
                        res.update(key_id=new_kid.hex(), old_key_id=old_kid.hex())
                    if restart:
                        step("restarting the agent")
            return b

        b = run_with_full_heap(work)
    finally:
        inv.close()
    res["restart"] = b.outcome
    warning = None
    if restart:  # signed with the key the inventory now holds (the new one)
        said, warning = send_time(port, b, b.agent_status, device, inventory_path, seq_path)
        res["restart"] = (res["restart"] or "") + said
    res["warnings"] = list(b.warnings) + ([warning] if warning else [])
    old = res.get("old_key_id")
    held = (b.agent_status or {}).get("held") if restart else None
    mine = [h for h in held or () if old and str(h).split("#")[0] == f"signed:{old}"]
    if mine:  # the old key is gone from the board: its shed's own release can never come
        res["warnings"].append(f"{port}: a shed signed with the old key is still held ({', '.join(mine)}); the old "
                               f"key is gone, so only `gridshed restore --device {device} --all` releases it")
    return res
