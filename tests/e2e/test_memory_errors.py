"""A MemoryError in the agent's tasks is counted, never a crash (docs/architecture.md "Memory").

The real agent (unix port, its .mpy build, at the budget heap) runs beside a hog that, every
quarter second, takes every free byte of the heap for 100 ms, while the meter times out: the
poll task's failure path then fails to allocate (the meter log line, the communication summaries'
module), as in the crash of a market + MQTT board at 96wK (a MemoryError in its poll task through
the log helper, docs/architecture.md "Test heaps"). The agent
must count those (`mem_errors` in @status), never crash or print a traceback, never move a relay
for them (the meter reads a steady 60 Hz), and still trip on a dip that comes while the hog goes
on. The meter is the agent's own poll path with its register read replaced by the test's
frequency (no bus: the hog must not starve a meter simulator instead).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from gridshed import siteconfig

from rig import HEAP, install

ROOT = Path(__file__).resolve().parents[2]
DEMO_SITE = ROOT / "scenarios" / "demo-site.toml"
MEM_HEAP = os.environ.get("GS_MEM_HEAP") or HEAP  # the smallest board's budget (80wK)

SCRIPT = """
import sys, gc, asyncio
sys.path.insert(0, ".")
import agent.app as app
from agent.hal import load
from agent.base import read_cbor
cfg = read_cbor("config.cbor")
a = app.Agent(cfg, load(cfg["board"]))
mm = a.meter_map
I_HZ = mm.names.index("hz")
I_KW = mm.names.index("kw")
HZ = [60.0]

class Meter:  # the poll path's read, without a bus: the registers are the test's values;
    # while the hog holds the heap the meter times out too (its failure path allocates: the log
    # line, the communication summaries' module, as in the crash this test comes from)
    async def read(self, unit, fn, addr, count):
        await asyncio.sleep_ms(2)
        if HOLD[0]:
            raise OSError(110)
        return None

def update(regs, addr, items):
    mm.values[I_HZ] = HZ[0]
    mm.values[I_KW] = 500.0

a.master = Meter()
mm.update = update
HOGS = [0]
HOLD = [False]

async def hog():
    while True:
        await asyncio.sleep_ms(150)
        held = []
        for size in (1024, 64, 16):  # every free byte, large pieces first
            try:
                while True:
                    held.append(bytearray(size))
            except MemoryError:
                pass
        chain = None
        try:  # and every block left (a chain of 1-tuples: one GC block each, no list to grow)
            while True:
                chain = (chain,)
        except MemoryError:
            pass
        HOGS[0] += 1
        HOLD[0] = True
        await asyncio.sleep_ms(100)  # the agent's tasks run with no RAM left
        HOLD[0] = False
        held = chain = None
        gc.collect()

async def script():
    await asyncio.sleep_ms(3000)
    moved = a.relays.transitions
    HZ[0] = 59.5  # the dip, while the hog goes on
    for _ in range(300):
        await asyncio.sleep_ms(20)
        if a.relays.mask == 0:
            break
    gc.collect()
    print("RESULT " + repr((a.mem_errors, HOGS[0], moved, a.relays.mask, a.ctrl.state, a.samples)))
    sys.exit(0)

asyncio.create_task(hog())
asyncio.create_task(script())
asyncio.run(a.main())
"""


def test_memory_errors_are_counted_not_a_crash(tmp_path):
    text = DEMO_SITE.read_text()
    text, n = re.subn(r"(?m)^meter_loss = .*$", 'meter_loss = "hold"', text)  # (no second reason to shed)
    assert n == 1
    p = tmp_path / "site.toml"
    p.write_text(text)
    cfg = siteconfig.load_site(p)
    cfg["meter"] = dict(cfg["meter"], transport="tcp", host="127.0.0.1", port=9)  # (replaced above)
    board = tmp_path / "board"
    install(board, cfg, {})
    from gridshed.vboard import micropython_exe

    env = dict(os.environ, MICROPYPATH=str(board) + ":.frozen")
    proc = subprocess.run([micropython_exe(), "-X", f"heapsize={MEM_HEAP}", "-c", SCRIPT], cwd=board, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    m = re.search(r"RESULT \((\d+), (\d+), (\d+), (\d+), (\d+), (\d+)\)", out)
    assert proc.returncode == 0 and m, out[-3000:]
    mem_errors, hogs, moved, mask, state, samples = map(int, m.groups())
    print(json.dumps({"mem_errors": mem_errors, "hog_rounds": hogs, "samples": samples}))
    assert "Traceback" not in out and "agent crashed" not in out and "Task exception" not in out, out[-3000:]
    assert hogs >= 5 and mem_errors >= 1, (hogs, mem_errors)  # the MemoryErrors happened, were counted
    assert moved == 0, "a relay moved before the dip (only MemoryErrors happened)"
    assert samples > 20  # the poll task went on between the hog's rounds
    assert mask == 0, "the dip under the hog did not open the relays"
