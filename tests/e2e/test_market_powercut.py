"""Min off across a power cut on the real agent (docs/market.md "On the board"): a block that
economics opened, with a min off of 10 minutes, stays open through a SIGKILL reset (the relay
never closes: the feature's early boot hook reads the holds before the relays are first driven)
with the clock unknown (no new cycle counted); the blocks without a min off come back at once as
before; when the host's time is back, a lower price does not bring it back before its min off,
counted from before the cut."""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from gridshed import siteconfig
from gridshed.signing import new_key

from rig import Rig
from test_market_board import KID, Host

ROOT = Path(__file__).resolve().parents[2]
HEAP = "88wK"  # as test_market_dispatch (the market feature's test heap)


def test_min_off_holds_a_block_open_through_a_power_cut(tmp_path):
    text = (ROOT / "scenarios" / "market-site.toml").read_text()
    for k, v in {"restore_hold_s": "1", "min_off_s": "0", "stagger_s": "0.3", "jitter_s": "0",
                 "min_run_s": "0", "ramp_kw_per_min": "0", "obligation_mw": "0"}.items():
        text, n = re.subn(rf"(?m)^{k} = [^#\n]*", f"{k} = {v} ", text)
        assert n >= 1, k
    p = tmp_path / "site.toml"
    p.write_text(text)
    cfg = siteconfig.load_site(p)
    names = [b["name"] for b in cfg["blocks"]]
    cfg["blocks"][names.index("row-a")]["min_off_s"] = 600  # economic min off (the protection's stays 0)
    key = new_key()
    board_dir = tmp_path / "board"
    board_dir.mkdir()
    (board_dir / "keys.cbor").write_bytes(siteconfig.keys_bytes({KID: key}))
    a, b = names.index("row-a"), names.index("row-b")

    async def main() -> None:
        async with Rig(cfg, board_dir, heapsize=HEAP) as rig:
            host = Host(rig, key)
            await rig.until(lambda: rig.good_polls() > 5, 30, "meter polls")
            assert (await host("time")).get("ok") is True
            now = int(time.time())
            res = await host("schedule", schedule={"sid": 1, "iv": [[now - 600, now + 7200, "p", 70.0]]})
            assert res.get("ok") is True, res
            want = [i not in (a, b) for i in range(len(names))]  # 70 $/MWh: row-a (45) and row-b (65)
            await rig.until(lambda: rig.closed() == want, 20, "row-a and row-b open for the price")
            await rig.agent_window(2500)  # the holds written by the feature's next second
            t_cut = time.monotonic()
            await rig.kill_board()
            await rig.until(lambda: rig.good_polls() > 5, 30, "meter polls after the reboot")
            # clock unknown: row-b (no min off) back on, row-a held open from the first relay
            # setting of the boot (the feature's early boot hook) while its min off runs: never
            # closed, no new cycle
            await rig.until(lambda: rig.closed() == [i != a for i in range(len(names))], 20,
                            "row-b back, row-a held open through the cut")
            on_a = [t for t, boot, i, on in rig.block_log if t > t_cut and i == a and on]
            assert not on_a, "row-a came on after the cut: " + repr(on_a)
            st = (await rig.status())["market"]
            assert st["clock"] is False and st["off"] == 1 << a and st["holds"][a] == "min_off", st
            assert st["cycles"][a] == 1, st
            # the time back and a new schedule at 10 $/MWh: row-b stays on, row-a stays open for
            # the rest of its min off, counted from before the cut
            assert (await host("time")).get("ok") is True
            res = await host("schedule", schedule={"sid": 2, "iv": [[now - 600, now + 7200, "p", 10.0]]})
            assert res.get("ok") is True, res
            await rig.agent_window(2500)
            assert rig.closed() == [i != a for i in range(len(names))]
            st = (await rig.status())["market"]
            assert st["clock"] is True and st["off"] == 1 << a and st["holds"][a] == "min_off", st
            assert st["cycles"][a] == 1 and t_cut, st

    asyncio.run(main())
