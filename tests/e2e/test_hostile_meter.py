"""The real agent (.mpy build, real MicroPython at the smallest board's budget) against a hostile
meter of our own (tests/e2e/hostile_meter.py) on the paced RS-485 pty wire and on TCP.

Each case runs until the meter has seen enough requests in that mode (the positive marker), then
asserts on the agent's own counters: the right counter moved and no other, no relay moved (no
false trip), the process never restarted and printed no traceback. A genuine dip at the end must
still trip (no missed trip). The mixed soak checks that free memory stays flat.
"""
from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from gridshed import siteconfig

from hostile_meter import HostileMeter
from rig import HEAP, Rig

ROOT = Path(__file__).resolve().parents[2]
NAN, INF = float("nan"), float("inf")


def hostile_cfg(transport: str = "rtu") -> dict:
    cfg = siteconfig.load_site(ROOT / "scenarios" / "demo-site.toml")
    # hold: a lost meter moves nothing, so any relay change below would be a false trip
    cfg["failsafe"] = dict(cfg["failsafe"], meter_loss="hold")
    if transport == "tcp":
        cfg["meter"] = dict(cfg["meter"], transport="tcp", host="127.0.0.1", port=0)
    return cfg


class HostileRig(Rig):
    async def start_meter(self) -> None:
        m = self.cfg["meter"]
        self.meter = HostileMeter(m["map"], unit=m["unit"])
        if m["transport"] == "rtu":
            self.meter.serve_rtu(self.wire.meter_path)
        else:
            m["port"] = self.meter.serve_tcp()

    async def stop_meter(self) -> None:
        if self.meter is not None:
            self.meter.stop()
        self.meter = None


async def phase(rig: HostileRig, mode: str, n: int = 8, timeout: float = 30, **kw) -> tuple[dict, dict]:
    """Set the meter's behaviour, wait until it answered n requests that way (the marker that the
    window passed), and return (status before, status after)."""
    m = rig.meter
    for k, v in kw.items():
        if k in ("hz", "kw"):
            m.values[k] = v
        else:
            setattr(m, k, v)
    m.mode = mode
    # two requests in the new mode first: what the agent had in flight before is settled
    base = m.seen.get(mode, 0)
    await rig.until(lambda: m.seen.get(mode, 0) >= base + 2, timeout, f"requests in mode {mode}")
    before = await rig.status()
    base = m.seen.get(mode, 0)
    await rig.until(lambda: m.seen.get(mode, 0) >= base + n, timeout, f"{n} requests in mode {mode}")
    after = await rig.status()
    return before, after


def delta(a: dict, b: dict) -> dict:
    return {k: b["modbus"][k] - a["modbus"][k] for k in b["modbus"]}


def no_harm(rig: HostileRig, st: dict) -> None:
    moved = rig.block_log[rig.booted_moves:]
    assert moved == [], f"a relay moved: {moved}"
    assert st["state"] == "normal" and st["mask"] == (1 << len(rig.cfg["blocks"])) - 1, st
    assert rig.board.restarts == 0 and b"Traceback" not in rig.board.output(), rig.board.output()[-1500:]


def test_hostile_rtu_meter_every_case(tmp_path):
    cfg = hostile_cfg()

    async def main() -> None:
        async with HostileRig(cfg, tmp_path / "board", heapsize=HEAP) as rig:
            await phase(rig, "ok", 10)
            rig.booted_moves = len(rig.block_log)  # the boot closes every block once
            # an adapter that echoes the request: skipped as junk, every poll good
            a, b = await phase(rig, "echo", 10)
            d = delta(a, b)
            assert d["junk"] >= 8 * 9 and d["timeouts"] == 0 and d["ok"] >= 9, d
            no_harm(rig, b)
            # noise in front of replies: skipped, polls keep working
            a, b = await phase(rig, "noise", 12)
            d = delta(a, b)
            assert d["junk"] > 0 and d["ok"] >= 6, d
            no_harm(rig, b)
            # late replies (after the timeout): listened for, counted, never taken as an answer
            a, b = await phase(rig, "late", 8, late_s=0.18)
            d = delta(a, b)
            assert d["ok"] == 0 and d["timeouts"] >= 6 and d["late"] >= 4, d
            assert b["meter_ok"] is False and b["kw_stale"] is True and b["hz"] is None
            no_harm(rig, b)
            await phase(rig, "ok", 6)
            # wrong unit / wrong function: bad frames, not timeouts and junk
            for mode in ("wrong_unit", "wrong_fn"):
                a, b = await phase(rig, mode, 8)
                d = delta(a, b)
                assert d["bad_frames"] >= 7 and d["timeouts"] == 0 and d["ok"] == 0, (mode, d)
                no_harm(rig, b)
            # exceptions: counted, never retried; busy (6) retried after a back-off, polls good
            a, b = await phase(rig, "exception", 8, exc_code=2)
            d = delta(a, b)
            assert d["exceptions"] >= 7 and d["retries"] == 0 and d["ok"] == 0, d
            a, b = await phase(rig, "exception", 12, exc_code=6)
            d = delta(a, b)
            assert d["exceptions"] >= 5 and d["retries"] >= 5 and d["ok"] >= 5, d
            assert b["meter_errors"] - a["meter_errors"] <= 1, (a["meter_errors"], b["meter_errors"])
            no_harm(rig, b)
            # broken CRC: counted as such
            a, b = await phase(rig, "bad_crc", 8)
            d = delta(a, b)
            assert d["crc_errors"] >= 7 and d["ok"] == 0, d
            # silence
            a, b = await phase(rig, "silence", 6)
            d = delta(a, b)
            assert d["timeouts"] >= 5 and d["ok"] == 0 and b["kw_stale"] is True, d
            no_harm(rig, b)
            # values no power system produces: implausible, counted by reason, shown, never a trip
            for hz, why in ((NAN, "nan"), (INF, "nan"), (0.0, "band"), (1e30, "band"), (30.1, "band"),
                            (89.9, "band")):
                a, b = await phase(rig, "ok", 6, hz=hz)
                assert b["implausible"][why] - a["implausible"][why] >= 5, (hz, a["implausible"], b["implausible"])
                assert b["hz"] is None and b["implausible"]["now"] is True, b  # valid JSON: null, with a reason
                assert b["implausible"]["last"]["why"] == why, b["implausible"]
                no_harm(rig, b)
            # words swapped: 60.0 decodes as a denormal; the agent names the word order
            a, b = await phase(rig, "ok", 6, hz=60.0, swap_words=True)
            assert b["implausible"]["band"] > a["implausible"]["band"] and "swapped" in (b["word_order"] or ""), b
            no_harm(rig, b)
            # a genuine dip still trips: no missed trip
            rig.meter.swap_words = False
            await phase(rig, "ok", 6, hz=60.0)
            rig.meter.values["hz"] = 59.5
            await rig.until(rig.all_open, 20, "the genuine dip to trip")
            st = await rig.status()
            assert st["reason"] == "underfrequency" and rig.board.restarts == 0
            recs, _ = rig.journal()
            kinds = [r["k"] for r in recs]
            assert "meter_comm" in kinds and "meter_words" in kinds, kinds
            assert any(r["k"] == "meter_comm" and r.get("first") in ("ModbusTimeout", "band", "nan") for r in recs)
            print(f"\nhostile RTU: requests {rig.meter.seen}, counters {st['modbus']}, implausible {st['implausible']}")

    asyncio.run(main())


def test_hostile_meter_mixed_soak_memory_flat(tmp_path):
    """25 s of every behaviour at random, 0.2-0.6 s each: no crash, no relay move, counters add up,
    free memory (after a collection, as @status reports it) flat."""
    cfg = hostile_cfg()
    rng = random.Random(20261206)

    async def main() -> None:
        async with HostileRig(cfg, tmp_path / "board", heapsize=HEAP) as rig:
            await phase(rig, "ok", 20)
            rig.booted_moves = len(rig.block_log)
            first = await rig.status()
            m = rig.meter
            t_end = time.monotonic() + 25
            while time.monotonic() < t_end:
                m.mode = rng.choice(("ok", "ok", "echo", "noise", "late", "wrong_unit", "wrong_fn", "exception",
                                     "bad_crc", "silence"))
                m.exc_code = rng.choice((2, 4, 6))
                m.values["hz"] = rng.choice((60.0, 60.01, 59.99, NAN, INF, 0.0, 1e30, 30.1, 89.9))
                m.swap_words = rng.random() < 0.1
                await asyncio.sleep(rng.uniform(0.2, 0.6))
            m.mode, m.swap_words, m.values["hz"] = "ok", False, 60.0
            await phase(rig, "ok", 20)
            last = await rig.status()
            no_harm(rig, last)
            c = last["modbus"]
            assert c["tx"] > first["modbus"]["tx"] + 100
            # every attempt has exactly one outcome (the one in flight while @status answers: none yet)
            assert 0 <= c["tx"] - sum(c[k] for k in ("ok", "timeouts", "crc_errors", "bad_frames", "exceptions")) <= 1, c
            drift = first["mem_free"] - last["mem_free"]
            print(f"\nsoak: {sum(m.seen.values())} requests {m.seen}; mem_free {first['mem_free']} -> {last['mem_free']}"
                  f"; counters {c}; implausible {last['implausible']['total']}")
            assert drift < 1024, (first["mem_free"], last["mem_free"])
            rig.meter.values["hz"] = 59.5
            await rig.until(rig.all_open, 20, "the genuine dip to trip after the soak")

    asyncio.run(main())


def test_hostile_tcp_meter(tmp_path):
    cfg = hostile_cfg("tcp")

    async def main() -> None:
        async with HostileRig(cfg, tmp_path / "board", heapsize=HEAP) as rig:
            await phase(rig, "ok", 10)
            rig.booted_moves = len(rig.block_log)  # the boot closes every block once
            a, b = await phase(rig, "late", 6, late_s=0.25)  # stale transaction ids skipped
            d = delta(a, b)
            assert d["ok"] == 0 and d["timeouts"] >= 5, d
            await phase(rig, "ok", 6)
            a, b = await phase(rig, "wrong_unit", 6)
            assert delta(a, b)["bad_frames"] >= 5, delta(a, b)
            a, b = await phase(rig, "exception", 10, exc_code=6)
            d = delta(a, b)
            assert d["exceptions"] >= 4 and d["retries"] >= 4 and d["ok"] >= 4, d
            for hz, why in ((NAN, "nan"), (89.9, "band"), (30.1, "band")):
                a, b = await phase(rig, "ok", 6, hz=hz)
                assert b["implausible"][why] - a["implausible"][why] >= 5 and b["hz"] is None
            no_harm(rig, b)
            # a gateway that hangs up at once: reconnects back off (100 ms doubling to 2 s)
            rig.meter.values["hz"] = 60.0
            a = await rig.status()
            c0 = rig.meter.connections
            rig.meter.mode = "refuse"
            await rig.until(lambda: rig.meter.seen.get("refuse", 0) >= 3, 30, "3 refused connections")
            await rig.agent_window(3000, polled=False)  # 3 s on the agent's own clock
            n = rig.meter.connections - c0
            b = await rig.status()
            dt = (b["uptime_ms"] - a["uptime_ms"]) / 1000  # the agent's clock, not this host's
            assert b["modbus"]["backoffs"] > a["modbus"]["backoffs"], b["modbus"]
            assert n / dt < 10, f"{n} connects in {dt:.1f} s"  # ~40/s before the back-off
            no_harm(rig, b)
            rig.meter.mode = "ok"
            await phase(rig, "ok", 6)
            rig.meter.values["hz"] = 59.5
            await rig.until(rig.all_open, 20, "the genuine dip to trip")

    asyncio.run(main())
