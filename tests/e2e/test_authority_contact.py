"""End to end: the dry contact's own shed entry (issue 13), on the real agent at the budget heap.

An edge-mode dry contact latches a shed. A signed restore carrying the OpenADR bridge's issuer
label (what the bridge sends when its event ends) releases only the bridge's own shed: the
contact's latch holds, across a reboot too. Only a signed restore-all clears it; then the load
comes back by the normal rules. Absences are asserted after the agent's own window
(rig.agent_window: polls and decisions counted past min-off + hold).
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path

from gridshed import siteconfig
from gridshed.signing import make_command, new_key

from rig import HEAP, Rig

ROOT = Path(__file__).resolve().parents[2]
KID = b"ops-1"


def site(tmp_path: Path) -> dict:
    text = (ROOT / "scenarios" / "demo-site.toml").read_text()
    for k, v in {"min_off_s": 1, "restore_hold_s": 0.3, "stagger_s": 0.2, "jitter_s": 0}.items():
        text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {json.dumps(v)}", text)
        assert n == 1, k
    p = tmp_path / "site.toml"
    p.write_text(text + '\n[signals]\ndry_contact = true\nmode = "edge"\n')
    return siteconfig.load_site(p)


def test_bridge_restore_leaves_the_edge_latched_contact(tmp_path):
    async def main() -> None:
        cfg = site(tmp_path)
        pin = cfg["signals"]["dry_contact_pin"]
        active = cfg["signals"]["dry_contact_active"]
        key = new_key()
        board = tmp_path / "board"
        board.mkdir()
        (board / "keys.cbor").write_bytes(siteconfig.keys_bytes({KID: key}))
        seq = [0]

        async with Rig(cfg, board, heapsize=HEAP) as rig:
            async def cmd(name: str, **kw) -> dict:
                seq[0] += 1
                if name == "restore":  # the board does not trust its clock: its nonce
                    kw["nonce"] = bytes.fromhex((await rig_request(rig, "nonce"))["nonce"])
                buf = make_command(key, KID, name, seq[0], target_device=cfg["device"], **kw)
                return await rig_request(rig, "cmd", base64.b64encode(buf).decode())

            rig.set_input(pin, 1 - active)
            await rig.until(rig.all_closed, 30, "relays closed")
            # the bridge sheds too (its own entry), then the utility pulses the contact
            assert (await cmd("shed", iss="openadr"))["ok"]
            await rig.until(rig.all_open, 20, "the bridge's shed")
            rig.set_input(pin, active)
            await rig.until(lambda: rig.state() and rig.state().get("auth", [0])[0] & 2, 20, "contact latched")
            rig.set_input(pin, 1 - active)  # the pulse ends: edge mode keeps the latch
            # the bridge's event ends: its restore releases its own entry only
            assert (await cmd("restore", iss="openadr"))["ok"]
            st = await rig.agent_window(2000)  # past min-off (1 s) + hold (0.3 s)
            assert rig.all_open() and st["held"] == ["dry_contact"], st
            # a reboot keeps the latch (state.cbor), the contact reading released does not clear it
            await rig.kill_board()
            st = await rig.agent_window(2000)
            assert rig.all_open() and st["held"] == ["dry_contact"], st
            # the operator's restore-all clears it: the load comes back by the normal rules
            assert (await cmd("restore", all_=True))["ok"]
            await rig.until(rig.all_closed, 30, "restore after the restore-all")
            st = await rig.status()
            assert st["held"] == [] and st["commands"]["accepted"] >= 1

    asyncio.run(main())


async def rig_request(rig: Rig, verb: str, arg: str = "") -> dict:
    from gridshed.transport import Console

    def ask() -> dict:
        with Console(rig.board.port) as con:
            return con.request(verb, arg, timeout=30)[-1]

    return await asyncio.to_thread(ask)
