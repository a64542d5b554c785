"""Fail-safes under injected faults, on virtual boards running the real agent (.mpy build).

Faults: SIGKILL of the agent process at seeded random moments (during journal writes and during
a shed), the meter server killed and restarted, journal files corrupted between boots, the
journal filled past its size, a rejected config at boot, a hung poll task and a blocked event
loop (watchdog), the technician's lockout switch across a reboot. Assertions are about
behaviour and evidence (relay states, journal sequence numbers, state.cbor, status counters);
times are only lower bounds ("not before min-off") or generous upper bounds against hangs.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest

from gridshed import siteconfig

from rig import HEAP, Rig, install, journal_records, read_state, write_config

ROOT = Path(__file__).resolve().parents[2]
DEMO_SITE = ROOT / "scenarios" / "demo-site.toml"
SEED = int(os.environ.get("GRIDSHED_FAULT_SEED", "20261124"))
FAULTS = {"injected": 0, "lost": 0}
# the smallest board's budget (rig.HEAP, from boards/*.json "memory"; the variable overrides)
FAULT_HEAP = os.environ.get("GRIDSHED_FAULT_HEAP") or HEAP


def site(tmp_path: Path, extra: str = "", **keys: object) -> dict:
    text = DEMO_SITE.read_text()
    for k, v in keys.items():
        text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {json.dumps(v)}", text)
        assert n == 1, k
    p = tmp_path / "site.toml"
    p.write_text(text + "\n" + extra)
    return siteconfig.load_site(p)


def seqs(recs: list[dict]) -> list[int]:
    return [r["n"] for r in recs]


def report(injected: int, lost: int) -> None:
    FAULTS["injected"] += injected
    FAULTS["lost"] += lost
    print(f"faults injected: {injected}, records lost: {lost}")


# ---- boot: a rejected config never touches a relay -----------------------------------------
def test_rejected_config_at_boot_keeps_relays_untouched(tmp_path):
    async def main() -> None:
        cfg = site(tmp_path)
        cfg["trip"]["pickup_hz"] = 59.95  # above restore_hz: the board must refuse it
        rig = Rig(cfg, tmp_path / "board")
        from rig import _Gpio

        rig.gpio = _Gpio(rig)
        port = await rig.gpio.start()
        board_dir = tmp_path / "board"
        install(board_dir, None, {"gpio": f"127.0.0.1:{port}", "uarts": {"meter": "/dev/null"}})
        # written raw: the host's own validation would refuse it before it reached the board
        import cbor2

        from agent import integrity

        (board_dir / "config.cbor").write_bytes(integrity.wrap(cbor2.dumps(cfg)))
        from gridshed.vboard import VirtualBoard

        board = VirtualBoard(board_dir, heapsize=HEAP).start()
        try:
            assert await asyncio.to_thread(board.wait_output, "config: trip.pickup_hz", 60), board.output()[-800:]
            # the refusal said again (every 10 s): the same process kept refusing, no crash loop
            mark = board.mark()
            assert await asyncio.to_thread(board.wait_output, "config: trip.pickup_hz", 60, mark)
            assert board.running and board.restarts == 0
            out = board.output().decode(errors="replace")
            assert "Traceback" not in out
        finally:
            board.stop()
            await rig.gpio.stop()
        # the HAL was never loaded: no GPIO connection, not one pin written
        assert rig.gpio.connections == 0 and rig.pin_log == []
        assert not (board_dir / "state.cbor").exists()

    asyncio.run(main())


# ---- SIGKILL at random moments during journal writes and during a shed ---------------------
def test_sigkill_during_shed_and_journal_writes(tmp_path):
    rnd = random.Random(SEED)
    kills = 6

    async def main() -> None:
        cfg = site(tmp_path, min_off_s=3, restore_hold_s=0.5, stagger_s=0.3, jitter_s=0.0)
        async with Rig(cfg, tmp_path / "board", heapsize=FAULT_HEAP) as rig:
            await rig.until(rig.all_closed, 30, "relays closed at boot")
            rig.hz = 59.5  # under-frequency: trip
            await rig.until(rig.all_open, 20, "trip")
            await rig.until(lambda: (rig.state() or {}).get("tripped") is True, 20, "state.cbor tripped")
            # frequency hunting around restore_hz: restore-hold start/reset records, ~10 a second
            flip = {"on": True}

            async def hunt() -> None:
                while flip["on"]:
                    rig.hz = 59.95 if rig.hz < 59.9 else 59.8
                    await asyncio.sleep(0.1)

            hunter = asyncio.create_task(hunt())
            seen: dict[int, dict] = {}
            for k in range(kills):
                await asyncio.sleep(rnd.uniform(0.3, 1.2))
                recs, _ = rig.journal()
                for r in recs:
                    seen[r["n"]] = r
                await rig.kill_board()
                # after every reboot, the shed in progress stays shed: every pin written by the
                # new process is at its open level, no block ever closed (checked once the new
                # process has polled the meter and decided)
                polls = rig.good_polls()
                await rig.until(lambda: rig.good_polls() > polls + 2, 30, "polls after the reboot")
                assert rig.all_open(), f"kill {k}: a block closed after the reboot"
            flip["on"] = False
            await hunter
            t_boot = time.monotonic()
            rig.hz = 60.0
            await rig.until(rig.all_closed, 60, "restore after the last reboot")
            first_close = min(t for t, boot, i, closed in rig.block_log if closed and boot == rig.boot)
            booted = min(t for t, boot, pin, level in rig.pin_log if boot == rig.boot)  # relays set at boot
            st = await rig.status()

        # min-off restarted at the reboot (from the persisted remainder): nothing came back sooner
        assert first_close - booted >= 3.0 - 0.05
        for t, boot, i, closed in rig.block_log:
            if boot > 1:
                assert boot == rig.boot or not closed, "a block closed during the kill phase"
        # boot writes of every rebooted process were at the open level
        blocks = cfg["blocks"]
        open_level = {p: 1 - b["active"] for b in blocks for p in b["pins"]}
        for t, boot, pin, level in rig.pin_log:
            if pin in open_level and (1 < boot < rig.boot or (boot == rig.boot and t < t_boot)):
                assert level == open_level[pin], (boot, pin, level)
        # the journal: every record seen before a kill is still there, seqs strictly increasing
        recs, errs = journal_records(tmp_path / "board")
        ns = seqs(recs)
        assert ns == sorted(set(ns)), "sequence numbers not strictly increasing"
        lost = sorted(set(seen) - set(ns))
        for n in set(seen) & set(ns):
            assert next(r for r in recs if r["n"] == n) == seen[n]
        boots = [r for r in recs if r["k"] == "boot"]
        assert len(boots) == kills + 1
        assert all(b["resumed_trip"] for b in boots[1:]) and all(b["mask"] == 0 for b in boots[1:])
        assert [e for e in errs if e[-1] != "torn"] == []
        evs = [r.get("ev") for r in recs if r["k"] == "ctl"]
        assert evs.count("trip_uf") == 1 and "restore_done" in evs
        assert st["state"] == "normal" and st["journal"]["seq"] == ns[-1]
        assert (read_state(tmp_path / "board") or {}).get("tripped") is False
        report(kills, len(lost))
        assert lost == []

    asyncio.run(main())


# ---- the meter dies and comes back -----------------------------------------------------------
def test_meter_killed_and_restarted_follows_policy(tmp_path):
    async def main() -> None:
        cfg = site(tmp_path, meter_loss_after_s=1.0, min_off_s=1, restore_hold_s=0.5, stagger_s=0.2, jitter_s=0.0)
        async with Rig(cfg, tmp_path / "board", heapsize=FAULT_HEAP) as rig:
            await rig.until(rig.all_closed, 30, "relays closed")
            # the meter is healthy first (relays close at boot, before any poll): a loss is
            # then counted from a real last good reading
            await rig.until(lambda: rig.good_polls() > 5, 30, "polls")
            meter = rig.meter
            await rig.stop_meter()
            # meter_loss_after_s counts from the last good reading the agent got: the meter's
            # last answer (host time it was answered; the agent had it a little later)
            t_last_good = max(p.t for p in meter.polls if p.hz is not None)
            await rig.until(rig.all_open, 30, "meter-loss shed")
            t_open = min(t for t, boot, i, closed in rig.block_log if not closed)
            st = await rig.status()
            assert st["meter_ok"] is False and st["meter_errors"] > 0 and st["reason"] == "meter_loss"
            assert st["watchdog"]["starved"] == 0  # failed polls are still healthy cycles
            await rig.start_meter()
            await rig.until(rig.all_closed, 40, "restore once the meter is back")
            st2 = await rig.status()
            assert st2["meter_ok"] is True and st2["state"] == "normal"

            # same board, policy "hold": rewrite the config, reboot, kill the meter again
            cfg2 = dict(cfg)
            cfg2["failsafe"] = dict(cfg["failsafe"], meter_loss="hold")
            write_config(tmp_path / "board", cfg2)
            await rig.kill_board()
            await rig.until(lambda: rig.good_polls() > 5, 30, "polls after the reboot")
            n_before = len(rig.block_log)

            def meter_lost_records() -> int:
                return sum(1 for r in rig.journal()[0] if r["k"] == "ctl" and r.get("ev") == "meter_lost")

            lost_before = meter_lost_records()
            await rig.stop_meter()
            # the agent declared the meter lost (journal: under "shed" it would trip in that very
            # decision), then well past meter_loss_after_s nothing has moved
            await rig.until(lambda: meter_lost_records() > lost_before, 30, "meter_lost under hold")
            # then the agent's own clock runs well past meter_loss_after_s: nothing has moved
            st3 = await rig.agent_window(1500, polled=False)
            assert st3["meter_ok"] is False and st3["meter_errors"] > 0
            assert rig.all_closed() and len(rig.block_log) == n_before  # hold: nothing moved
            await rig.start_meter()
            await rig.until(lambda: rig.good_polls() > 3, 30, "meter back (hold)")
        assert t_open - t_last_good >= 1.0 - 0.05  # not before meter_loss_after_s
        recs, errs = journal_records(tmp_path / "board")
        evs = [r.get("ev") for r in recs if r["k"] == "ctl"]
        for e in ("meter_lost", "trip_meter_loss", "meter_back", "restore_done"):
            assert e in evs, e
        report(3, 0)

    asyncio.run(main())


# ---- corrupt flash between runs, then fill the journal past its size --------------------------
def test_corrupt_journal_between_runs_then_rotation(tmp_path):
    async def main() -> None:
        board = tmp_path / "board"
        cfg = site(tmp_path, extra="[journal]\nsegment_bytes = 1024\nsegments = 2\n",
                   min_off_s=0.5, restore_hold_s=0.2, stagger_s=0.1, jitter_s=0.0)
        async with Rig(cfg, board, heapsize=FAULT_HEAP) as rig:
            def last_ctl() -> str | None:
                evs = [r.get("ev") for r in journal_records(board)[0] if r["k"] == "ctl"]
                return evs[-1] if evs else None

            for _ in range(3):  # a few trips and restores: records in the journal
                rig.hz = 59.5
                await rig.until(rig.all_open, 20, "trip")
                rig.hz = 60.0
                await rig.until(rig.all_closed, 30, "restore")
                # the episode's last record (written in the decision that closed the last relay)
                await rig.until(lambda: last_ctl() == "restore_done", 20, "restore_done journaled")
            await asyncio.sleep(0.3)
            # power off the board, corrupt its flash, power on
            rig.board.stop()
            before, errs0 = journal_records(board)
            assert errs0 == [] and len(before) > 10
            segs = sorted(board.glob("journal.[0-9]*"))
            newest = segs[-1]
            data = bytearray(newest.read_bytes())
            # flip one byte inside a middle record's body (its CRC no longer matches)
            from agent.journal_host import parse_stream

            offs = [i for i in range(len(data)) if data[i] == 0xFC]
            victim_off = offs[len(offs) // 2]
            data[victim_off + 5] ^= 0x55
            data += b"\xfc\x00\x40garbage-of-a-torn-write"  # and a torn tail
            newest.write_bytes(bytes(data))
            recs_c, errs_c = parse_stream(bytes(data))
            bad = {r["n"] for r in before} - {r["n"] for r in journal_records(board)[0]}
            assert len(bad) == 1 and {e[2] for e in errs_c} >= {"torn"}
            last = before[-1]["n"]
            rig.board.start()
            await rig.wait_up(rig.boot + 1)
            st = await rig.status()
            assert st["journal"]["torn"] >= 1
            evs = await rig.events(0)  # the board reads past the bad record and counts it
            st = await rig.status()
            assert st["journal"]["read_errors"] >= 1
            after, errs = journal_records(board)
            boot = [r for r in after if r["k"] == "boot"][-1]
            assert boot["n"] == last + 1 and boot["torn"] >= 1  # seq continues, nothing reused
            kept = {r["n"] for r in after}
            assert ({r["n"] for r in before} - bad) <= kept  # only the corrupted record is gone
            assert len(errs) == 1 and errs[0][-1] in ("crc", "cbor", "body", "length")  # the flip only
            assert {r["n"] for r in evs} >= {r["n"] for r in after if r["n"] <= boot["n"]}

            # fill: hunting frequency writes records until the journal has rotated several times
            rig.hz = 59.5
            await rig.until(rig.all_open, 20, "trip")
            flip = {"on": True}

            async def hunt() -> None:
                while flip["on"]:
                    rig.hz = 59.95 if rig.hz < 59.9 else 59.8
                    await asyncio.sleep(0.08)

            hunter = asyncio.create_task(hunt())
            await rig.until(lambda: max(seqs(journal_records(board)[0]), default=0) > last + 80, 60, "records")
            await rig.kill_board()  # a reboot in the middle of it
            await rig.until(lambda: max(seqs(journal_records(board)[0]), default=0) > last + 120, 60, "records")
            flip["on"] = False
            await hunter
            st = await rig.status()
        segs = sorted(board.glob("journal.[0-9]*"))
        assert len(segs) <= 2 and all(p.stat().st_size <= 1024 for p in segs)
        final, errs = journal_records(board)
        ns = seqs(final)
        assert ns == list(range(ns[0], ns[0] + len(ns))), "gap or repeat in the retained records"
        assert ns[0] > last  # the old ones rotated away; numbering continued past them
        assert st["journal"]["rotations"] >= 1 and st["journal"]["segments"] <= 2
        assert errs == []
        report(3, 0)  # bit flip, torn tail, kill during the fill

    asyncio.run(main())


# ---- override: lockout holds the load off, across a reboot ----------------------------------
def test_lockout_override_holds_and_survives_reboot(tmp_path):
    async def main() -> None:
        cfg = site(tmp_path, extra="[override]\nmode = \"lockout\"\n",
                   min_off_s=1, restore_hold_s=0.3, stagger_s=0.2, jitter_s=0.0)
        pin = cfg["override"]["pin"]
        active = cfg["override"]["active"]
        async with Rig(cfg, tmp_path / "board", heapsize=FAULT_HEAP) as rig:
            rig.set_input(pin, 1 - active)
            await rig.until(rig.all_closed, 30, "relays closed")
            rig.set_input(pin, active)  # technician throws the lockout switch
            await rig.until(rig.all_open, 20, "lockout opens every block")
            st = await rig.status()
            assert st["override"] == {"mode": "lockout", "on": True, "changes": 1}
            # min-off (1 s) and hold (0.3 s) long over on the agent's clock, frequency fine: still open
            st = await rig.agent_window(2000)
            assert rig.all_open() and st["min_off_left_ms"] == 0 and st["mask"] == 0
            await rig.until(lambda: (rig.state() or {}).get("lockout") is True, 20, "lockout persisted")
            # reboot with the switch still thrown: the new process never closes a relay
            await rig.kill_board()
            # the new process runs its loop (polls the meter) for longer than min-off + hold
            st = await rig.agent_window(1500)  # past min-off + hold on the new process's clock
            assert rig.all_open() and st["min_off_left_ms"] == 0 and st["mask"] == 0
            assert not any(closed for t, boot, i, closed in rig.block_log if boot == rig.boot)
            st = await rig.status()
            assert st["override"]["on"] is True
            t_rel = time.monotonic()
            rig.set_input(pin, 1 - active)  # released: deliberate restore by the normal rules
            await rig.until(rig.all_closed, 30, "restore after the lockout")
            first = min(t for t, boot, i, closed in rig.block_log if closed and boot == rig.boot)
        assert first - t_rel >= 0.3 - 0.05  # restore hold, not an instant re-energise
        recs, _ = journal_records(tmp_path / "board")
        ov = [(r["on"], r["mode"]) for r in recs if r["k"] == "override"]
        assert ov[0] == (True, "lockout") and ov[-1] == (False, "lockout")
        assert [r for r in recs if r["k"] == "boot"][-1]["lockout"] is True
        report(1, 0)

    asyncio.run(main())


def test_override_shed_mode_is_a_manual_trip(tmp_path):
    async def main() -> None:
        cfg = site(tmp_path, extra="[override]\nmode = \"shed\"\n",
                   min_off_s=1, restore_hold_s=0.3, stagger_s=0.2, jitter_s=0.0)
        pin, active = cfg["override"]["pin"], cfg["override"]["active"]
        async with Rig(cfg, tmp_path / "board", heapsize=FAULT_HEAP) as rig:
            rig.set_input(pin, 1 - active)
            await rig.until(rig.all_closed, 30, "relays closed")
            t_on = time.monotonic()
            rig.set_input(pin, active)  # the local "shed now" button, held down
            await rig.until(rig.all_open, 20, "manual shed")
            # restore follows the normal rules even while the switch stays asserted
            await rig.until(rig.all_closed, 30, "restore after min-off")
            first = min(t for t, boot, i, closed in rig.block_log if closed and t > t_on)
            st = await rig.status()
        assert first - t_on >= 1.0 - 0.05  # min-off honoured
        assert st["override"]["on"] is True and st["override"]["mode"] == "shed"
        recs, _ = journal_records(tmp_path / "board")
        assert "trip_command" in [r.get("ev") for r in recs if r["k"] == "ctl"]

    asyncio.run(main())


# ---- watchdog: the real agent, a hung poll task / a blocked loop -----------------------------
WDT_SCRIPT = """
import sys, asyncio, time
sys.path.insert(0, ".")
import agent.app as app
app.WDT_MS = 1500
from agent.hal import load
from agent.base import read_cbor
cfg = read_cbor("config.cbor")
a = app.Agent(cfg, load(cfg["board"]))
MODE = %r

async def hung():
    await asyncio.Event().wait()  # a poll that never completes (no timeout on some await)

async def blocker():
    await asyncio.sleep(1.0)
    time.sleep(30)  # something blocks the whole loop

async def done():
    await asyncio.sleep(4.0)
    print("ALIVE feeds=%%d starved=%%d" %% (a.wdt[1], a.wdt[2]))
    sys.exit(0)

if MODE == "hung":
    a.poll_task = hung
elif MODE == "blocked":
    asyncio.create_task(blocker())
else:
    asyncio.create_task(done())
asyncio.run(a.main())
"""


# The driver script is compiled from source in the board process (the agent itself is .mpy);
# it fits the budget like the agent alone.
WDT_HEAP = os.environ.get("GRIDSHED_WDT_HEAP") or HEAP


@pytest.mark.parametrize("mode", ["hung", "blocked", "healthy"])
def test_watchdog_resets_a_hung_agent(tmp_path, mode):
    cfg = site(tmp_path)
    cfg["meter"] = dict(cfg["meter"], transport="tcp", host="127.0.0.1", port=9)  # refused: every poll fails fast
    board = tmp_path / "board"
    install(board, cfg, {})
    from gridshed.vboard import micropython_exe

    env = dict(os.environ, MICROPYPATH=str(board) + ":.frozen")
    p = subprocess.run([micropython_exe(), "-X", f"heapsize={WDT_HEAP}", "-c", WDT_SCRIPT % mode], cwd=board,
                       env=env, capture_output=True, timeout=60)
    out = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
    recs, _ = journal_records(board)
    if mode == "healthy":
        assert p.returncode == 0, out
        m = re.search(r"ALIVE feeds=(\d+) starved=(\d+)", out)
        assert m and int(m.group(1)) > 20 and int(m.group(2)) == 0, out
        assert not (board / "wdt_reset").exists()
    else:
        assert p.returncode == -9, out  # killed like a hardware reset
        assert "watchdog: not fed" in out  # (a hang would end in the run's timeout, not pass)
        assert (board / "wdt_reset").exists()
        if mode == "hung":
            assert "poll task overdue" in out
            assert [r for r in recs if r["k"] == "watchdog"], recs[-3:]
        # the next boot reads the cause and journals it
        p2 = subprocess.run([micropython_exe(), "-X", f"heapsize={WDT_HEAP}", "-c",
                             "import sys\nsys.path.insert(0, '.')\nimport agent.app as app\nfrom agent.hal import load\nfrom agent.base import read_cbor\n"
                             "cfg = read_cbor('config.cbor')\napp.Agent(cfg, load(cfg['board']))\n"],
                            cwd=board, env=env, capture_output=True, timeout=30)
        assert p2.returncode == 0, p2.stderr
        boot = [r for r in journal_records(board)[0] if r["k"] == "boot"][-1]
        assert boot["cause"] == "watchdog"
        report(1, 0)
