"""Fuzz the serial console of a running agent (the real firmware on a virtual board).

The console is reachable by anyone with a USB cable: random bytes, mutated request lines,
oversize lines and forged `@cmd` payloads must leave the agent running (no restart, no
traceback), never move a relay, and be counted.
"""
from __future__ import annotations

import asyncio
import base64
import random
from pathlib import Path

from gridshed import siteconfig

from rig import HEAP, Rig

ROOT = Path(__file__).resolve().parents[2]
VERBS = [b"@status", b"@events 0", b"@events 99999", b"@config", b"@cmd AAAA", b"@cmd", b"@", b"@nope"]


def fuzz_lines(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:  # random bytes, no Ctrl-C (0x03 interrupts the agent on purpose, like a board)
            b = bytes(rng.choice([x for x in range(256) if x not in (3, 4)]) for _ in range(rng.randrange(1, 80)))
        elif kind == 1:  # a request with a byte flipped
            b = bytearray(rng.choice(VERBS))
            b[rng.randrange(len(b))] = rng.randrange(32, 127)
            b = bytes(b)
        elif kind == 2:  # oversize line
            b = b"@status " + b"A" * rng.randrange(1100, 3000)
        elif kind == 3:  # base64 garbage posing as a signed command
            b = b"@cmd " + base64.b64encode(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        elif kind == 4:  # bad base64
            b = b"@cmd " + bytes(rng.randrange(33, 127) for _ in range(rng.randrange(1, 60)))
        else:  # unknown verbs and numbers out of range
            b = b"@events " + str(rng.randrange(-10**12, 10**12)).encode()
        out.append(b.replace(b"\n", b" ") + b"\n")
    return out


def status_after_backlog(port: str, tries: int = 60) -> dict:
    """@status once the agent has worked through the queued garbage: late answers to fuzz lines
    come first, so ask until a status answer (it carries "mask") arrives."""
    import json
    import time

    import serial

    s = serial.Serial(port, 115200, timeout=0.1)
    try:
        for _ in range(tries):
            s.write(b"@status\n")
            end = time.monotonic() + 1.0
            buf = b""
            while time.monotonic() < end:
                buf += s.read(4096)
                for line in buf.split(b"\n"):
                    if line.startswith(b"@{") and b'"samples"' in line and b'"rec"' not in line:
                        try:
                            return json.loads(line[1:])
                        except ValueError:
                            pass
        return {}
    finally:
        s.close()


def test_console_garbage_is_counted_never_crashes_or_moves_a_relay(tmp_path):
    cfg = siteconfig.load_site(ROOT / "scenarios" / "demo-site.toml")

    async def main() -> None:
        # at the budget (rig.HEAP); Rig's teardown checks no restart, MemoryError or traceback
        async with Rig(cfg, tmp_path / "board", heapsize=HEAP) as rig:
            before = len(rig.block_log)
            import serial

            rng = random.Random(20261127)
            lines = fuzz_lines(rng, 300)
            s = serial.Serial(rig.board.port, 115200, timeout=0.05)
            try:
                for i, line in enumerate(lines):
                    s.write(line)
                    if i % 20 == 0:
                        s.flush()
                        await asyncio.sleep(0.1)  # let the agent answer; a real cable is slow too
                        s.reset_input_buffer()
            finally:
                s.close()
            st = await asyncio.to_thread(status_after_backlog, rig.board.port)
            assert rig.board.restarts == 0, "the agent restarted"
            out = rig.board.output()
            assert b"Traceback" not in out, out[-2000:]
            assert len(rig.block_log) == before, "a relay moved"
            assert "mask" in st, st
            assert st["mask"] == (1 << len(cfg["blocks"])) - 1 and st["state"] == "normal"
            errs = st["errors"]
            assert errs.get("console_bad", 0) > 20, errs
            refused = st.get("commands", {})
            assert refused.get("accepted", 0) == 0
            assert sum(v for k, v in refused.items() if k != "accepted") > 0, refused
            print(f"\nconsole fuzz: {len(lines)} lines, counters {errs}, commands {refused}")

    asyncio.run(main())
