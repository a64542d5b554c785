"""8: optional (not in the default run; `--only soak`): the real agent against the hostile meter
(tests/e2e/hostile_meter.py), every misbehaviour at random for --soak-s seconds: free memory over
time, counters, relay moves (must be none)."""
from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DEMO_SITE, ROOT

SECTIONS = ("soak",)  # the names `--only` takes for this module
DEFAULT = False  # part of a plain `make bench`


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--soak-s", type=float, default=600.0, help="length of the optional hostile-meter soak")


def bench_soak(res: dict[str, Any], seconds: float) -> None:
    """The real agent (budget heap) against the hostile meter, every misbehaviour at random for
    `seconds`: @status free memory every 10 s, the Modbus counters, relay moves (none allowed)."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import random as _random

    from hostile_meter import HostileMeter  # type: ignore[import-not-found]
    from rig import HEAP, Rig  # type: ignore[import-not-found]

    from gridshed import siteconfig

    class _Rig(Rig):
        async def start_meter(self) -> None:
            m = self.cfg["meter"]
            self.meter = HostileMeter(m["map"], unit=m["unit"]).serve_rtu(self.wire.meter_path)

        async def stop_meter(self) -> None:
            if self.meter is not None:
                self.meter.stop()

    cfg = siteconfig.load_site(DEMO_SITE)
    cfg["failsafe"] = dict(cfg["failsafe"], meter_loss="hold")
    rng = _random.Random(1)
    out: dict[str, Any] = {"seconds": seconds, "heap": HEAP, "mem_free": []}

    async def run() -> None:
        work = Path(tempfile.mkdtemp(prefix="gridshed-bench-soak-"))
        try:
            async with _Rig(cfg, work / "board") as rig:
                await asyncio.sleep(2)
                moves0 = len(rig.block_log)
                t_end = time.monotonic() + seconds
                t_next = 0.0
                m = rig.meter
                while time.monotonic() < t_end:
                    if time.monotonic() >= t_next:
                        m.mode = "ok"
                        await asyncio.sleep(0.3)
                        out["mem_free"].append((await rig.status(60))["mem_free"])
                        t_next = time.monotonic() + 10
                    m.mode = rng.choice(("ok", "ok", "echo", "noise", "late", "wrong_unit", "wrong_fn", "exception",
                                         "bad_crc", "silence"))
                    m.exc_code = rng.choice((2, 4, 6))
                    m.values["hz"] = rng.choice((60.0, 60.01, 59.99, float("nan"), float("inf"), 0.0, 1e30, 30.1, 89.9))
                    m.swap_words = rng.random() < 0.1
                    await asyncio.sleep(rng.uniform(0.2, 0.6))
                m.mode, m.swap_words, m.values["hz"] = "ok", False, 60.0
                await asyncio.sleep(1)
                st = await rig.status(60)
                out["mem_free"].append(st["mem_free"])
                out.update(requests=m.requests, seen=m.seen, modbus=st["modbus"], implausible=st["implausible"],
                           relay_moves=len(rig.block_log) - moves0, restarts=rig.board.restarts)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    asyncio.run(run())
    res["soak"] = out


def run(res: dict[str, Any], a: argparse.Namespace) -> None:
    bench_soak(res, a.soak_s)


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """This section's rows of the table `make bench` prints (figure, value, vs reference / note)."""
    rows: list[tuple[str, str, str]] = []
    s = res.get("soak")
    if s:
        rows.append(("8 hostile-meter soak, free memory", "%s -> %s B (min %s)" % (s["mem_free"][0], s["mem_free"][-1], min(s["mem_free"])),
                     "%.0f s, %d requests, relay moves %d" % (s["seconds"], s["requests"], s["relay_moves"])))
    return rows
