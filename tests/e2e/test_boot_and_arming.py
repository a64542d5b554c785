"""The real agent at the budget heap: `failsafe.boot_state = "open"` (the load stays off after a
boot until the agent has seen a healthy grid, then comes back by the normal restore rules), and
a signed `disarm` that survives a power cut (a disarmed board does not trip on frequency after
a reboot; `arm` brings protection back)."""
from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path
from typing import Any

from gridshed import siteconfig
from gridshed.signing import make_command, new_key
from gridshed.transport import Console

from rig import HEAP, Rig

ROOT = Path(__file__).resolve().parents[2]
KID = b"ops-7"


def site(tmp_path: Path, **keys: Any) -> dict:
    text = (ROOT / "scenarios" / "demo-site.toml").read_text()
    for k, v in keys.items():
        text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {json.dumps(v)}", text)
        assert n == 1, k
    p = tmp_path / "site.toml"
    p.write_text(text)
    return siteconfig.load_site(p)


def test_boot_state_open_keeps_load_off_until_a_healthy_grid(tmp_path):
    async def main() -> None:
        cfg = site(tmp_path, boot_state="open", restore_hold_s=1, stagger_s=0.3, jitter_s=0, min_off_s=30)
        open_level = {p: 1 - b["active"] for b in cfg["blocks"] for p in b["pins"]}
        async with Rig(cfg, tmp_path / "board", heapsize=HEAP) as rig:
            rig.hz = 59.5  # the grid is not healthy at boot: nothing may close
            st = await rig.agent_window(2000)  # well past the restore hold, on the agent's clock
            assert st["mask"] == 0 and rig.all_open()
            first = {}
            for t, boot, pin, level in rig.pin_log:
                first.setdefault(pin, level)
            assert {p: first[p] for p in open_level} == open_level  # relays opened first thing
            assert not any(closed for *_, closed in rig.block_log)
            rig.hz = 60.0  # healthy: restored by the rules (hold, then staggered), min-off not applied
            await rig.until(rig.all_closed, 60, "restore after boot_state open")
            closes = sorted(t for t, boot, i, closed in rig.block_log if closed)
            assert len(closes) == len(cfg["blocks"])
            assert all(b - a >= 0.3 - 0.02 for a, b in zip(closes, closes[1:]))  # staggered, never sooner

            def ctl_events():
                return [r.get("ev") for r in rig.journal()[0] if r["k"] == "ctl"]

            # the last block closing comes before its restore_done record: wait for the record
            await rig.until(lambda: "restore_done" in ctl_events(), 30, "restore_done journaled")
            recs, _ = rig.journal()
            boot = next(r for r in recs if r["k"] == "boot")
            assert boot["mask"] == 0
            evs = ctl_events()
            assert "restore_done" in evs and not any(e and e.startswith("trip") for e in evs), evs

    asyncio.run(main())


def test_disarm_survives_a_reboot(tmp_path):
    async def main() -> None:
        cfg = site(tmp_path, min_off_s=1, restore_hold_s=0.3, stagger_s=0.2, jitter_s=0)
        key = new_key()
        bdir = tmp_path / "board"
        bdir.mkdir()
        (bdir / "keys.cbor").write_bytes(siteconfig.keys_bytes({KID: key}))
        seq = [0]

        async def cmd(rig: Rig, name: str) -> dict:
            seq[0] += 1

            def ask() -> dict:
                with Console(rig.board.port) as con:
                    kw = {}
                    if name in ("restore", "disarm"):  # freshness: the board's nonce (docs/security.md)
                        kw["nonce"] = bytes.fromhex(con.request("nonce", timeout=30)[-1]["nonce"])
                    buf = make_command(key, KID, name, seq[0], target_device=cfg["device"], **kw)
                    return con.request("cmd", base64.b64encode(buf).decode(), timeout=30)[-1]

            return await asyncio.to_thread(ask)

        async with Rig(cfg, bdir, heapsize=HEAP) as rig:
            await rig.until(rig.all_closed, 60, "relays closed")
            res = await cmd(rig, "disarm")
            assert res.get("ok") is True, res
            await rig.until(lambda: (rig.state() or {}).get("armed") is False, 30, "disarm persisted")
            await rig.kill_board()  # power cut
            st = await rig.status()
            assert st["armed"] is False and st["state"] == "disarmed"
            n = len(rig.block_log)
            rig.hz = 59.5  # under-frequency: a disarmed board does not trip on it
            st = await rig.agent_window(1500)  # it polled and decided for 1.5 s of its own clock
            assert st["hz"] is not None and st["hz"] < 59.7 and st["mask"] == 15
            assert len(rig.block_log) == n and rig.all_closed()
            res = await cmd(rig, "arm")
            assert res.get("ok") is True, res
            await rig.until(rig.all_open, 30, "trip once armed again")
            assert (rig.state() or {}).get("armed") is True
            rig.hz = 60.0
            await rig.until(rig.all_closed, 60, "restore")
        recs, _ = rig.journal()
        evs = [r.get("ev") for r in recs if r["k"] == "ctl"]
        assert evs.index("disarmed") < evs.index("armed") < evs.index("trip_uf"), evs

    asyncio.run(main())
