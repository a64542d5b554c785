"""Settings integrity and the console's hardening on the real agent (virtual board, budget heap).

- a damaged /config.cbor: refused, no pin driven, a `config_refused` journal record, and
  `@status` (and `gridshed status`) still answer with the reason;
- a damaged /state.cbor: boots with every block open (a boot shed), the alarm in `@status` and
  the journal, then restores by the normal rules;
- a damaged /keys.cbor: every signed command refused, the alarm shown;
- a 200 KB console line is discarded as it arrives (counted `console_long`) and the next
  request is answered; a line that is not UTF-8 is counted `console_utf8`.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from gridshed import siteconfig
from gridshed.transport import Console

from rig import HEAP, Rig, install

ROOT = Path(__file__).resolve().parents[2]


def demo(**trip) -> dict:
    cfg = siteconfig.load_site(ROOT / "scenarios" / "demo-site.toml")
    cfg["trip"] = dict(cfg["trip"], **trip)
    return cfg


def flip(path: Path, bit: int) -> None:
    b = bytearray(path.read_bytes())
    b[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(b))


def test_damaged_config_refused_status_still_answers(tmp_path):
    cfg = demo()

    async def main() -> None:
        rig = Rig(cfg, tmp_path / "board")
        from rig import _Gpio

        rig.gpio = _Gpio(rig)
        port = await rig.gpio.start()
        board_dir = tmp_path / "board"
        install(board_dir, cfg, {"gpio": f"127.0.0.1:{port}", "uarts": {"meter": "/dev/null"}})
        flip(board_dir / "config.cbor", 8 * 200 + 3)  # one bit inside the trip settings
        from gridshed.vboard import VirtualBoard

        board = VirtualBoard(board_dir, heapsize=HEAP).start()
        try:
            assert await asyncio.to_thread(board.wait_output, "ALARM config", 60), board.output()[-800:]

            def ask() -> dict:
                with Console(board.port) as c:
                    return c.status(timeout=20)

            st = await asyncio.to_thread(ask)
            assert st["state"] == "refused" and "CRC-32" in st["config_errors"][0], st
            r = subprocess.run([sys.executable, "-m", "gridshed.cli", "status", "--port", board.port],
                               capture_output=True, text=True, timeout=60)
            flat = " ".join(r.stdout.replace("│", " ").split())  # the table wraps long values
            assert r.returncode == 0 and "ALARM" in flat and "config refused" in flat, r.stdout + r.stderr

            def pull() -> list:
                with Console(board.port) as c:
                    return c.events(0, timeout=20)

            recs = await asyncio.to_thread(pull)  # the journal can still be pulled
            assert [r["k"] for r in recs] == ["config_refused"], recs
        finally:
            board.stop()
            await rig.gpio.stop()
        assert rig.gpio.connections == 0 and rig.pin_log == []  # no pin ever driven
        from rig import journal_records

        recs, _ = journal_records(board_dir)
        assert [r["k"] for r in recs] == ["config_refused"] and "CRC-32" in recs[0]["errors"][0]

    asyncio.run(main())


def test_damaged_state_boots_shed_and_restores_by_the_rules(tmp_path):
    cfg = demo(min_off_s=2, restore_hold_s=1, stagger_s=0.3, jitter_s=0.0)

    async def main() -> None:
        async with Rig(cfg, tmp_path / "board") as rig:
            # a trip writes state.cbor; restore, then damage the (not tripped) state and reboot
            rig.hz = 59.5
            await rig.until(rig.all_open, 20, "trip")
            rig.hz = 60.0
            await rig.until(rig.all_closed, 30, "restore")
            await rig.until(lambda: (rig.state() or {}).get("tripped") is False, 10, "state saved untripped")
            st_path = rig.board_dir / "state.cbor"
            n = len(rig.block_log)
            rig.board.stop()
            flip(st_path, 8 * 20 + 1)
            rig.board.start()
            await rig.wait_up(rig.boot + 1)
            st = await rig.status()
            assert "state.cbor" in (st["integrity"] or {}), st
            assert st["state"] in ("tripped", "restore_hold", "restoring") and st["reason"] == "boot", st
            # the reboot drove every block open, never closed one before the hold and min-off
            boot_moves = [m for m in rig.block_log[n:] if m[1] == rig.boot]
            assert boot_moves and not boot_moves[0][3], boot_moves
            await rig.until(rig.all_closed, 30, "restore after the boot shed")
            recs, _ = rig.journal()
            alarm = [r for r in recs if r["k"] == "integrity"]
            assert alarm and alarm[-1]["file"] == "state.cbor" and alarm[-1]["mask"] == 0, alarm

    asyncio.run(main())


def test_damaged_keys_refuse_commands_and_alarm(tmp_path):
    from gridshed.signing import make_command, new_key
    import base64

    cfg = demo()
    key, kid = new_key(), b"\x01" * 8

    async def main() -> None:
        rig = Rig(cfg, tmp_path / "board")
        rig.board_dir.mkdir(parents=True, exist_ok=True)
        (rig.board_dir / "keys.cbor").write_bytes(siteconfig.keys_bytes({kid: key}))
        flip(rig.board_dir / "keys.cbor", 8 * 12)
        async with rig:
            st = await rig.status()
            assert "keys.cbor" in (st["integrity"] or {}), st

            def send() -> dict:
                msg = make_command(key, kid, "shed", 1, target_device=cfg["device"])
                with Console(rig.board.port) as c:
                    return c.request("cmd", base64.b64encode(msg).decode(), timeout=20)[-1]

            ans = await asyncio.to_thread(send)
            assert ans["ok"] is False and ans["refused"] == "unknown-kid", ans
            assert rig.all_closed()

    asyncio.run(main())


def test_console_long_line_and_bad_utf8_counted_and_next_request_answered(tmp_path):
    cfg = demo()

    async def main() -> None:
        async with Rig(cfg, tmp_path / "board") as rig:
            import serial

            s = serial.Serial(rig.board.port, 115200, timeout=0.1)
            try:
                s.write(b"@status " + b"A" * 200_000 + b"\n")
                s.write(b"@status \xff\xfe\xc3\x28\n")
                s.flush()
            finally:
                s.close()
            st = await rig.status(timeout=60)
            errs = st["errors"]
            assert errs.get("console_long") == 1 and errs.get("console_utf8") == 1, errs
            assert "console_io" not in errs and rig.board.restarts == 0 and rig.all_closed()

    asyncio.run(main())
