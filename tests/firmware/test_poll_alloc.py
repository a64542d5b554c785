"""Allocation-free steady state of the poll path (issue 18, docs/modbus.md "Read plan"), in the
real micropython (the .mpy build, at the budget heap) against the real pymodbus RTU server of
tests/firmware/test_modbus_master.py over a pty.

The poll path is what agent/app.py poll_task runs per cycle: the RTU master's transaction driven
through begin()/step()/end() under asyncio (sleep_ms between steps), MeterMap.update() of the
reply and Controller.step() (the decision). gc.mem_alloc() is read before and after N steady
cycles: the delta must be 0 bytes. Then what still allocates, and must (so the test shows the
measurement can fail): the public read() API (a coroutine object per call) and a register whose
value changed (one float, a heap object on this port).
"""
from __future__ import annotations

import json

from test_modbus_master import rig, run_mpy  # noqa: F401  (the module's pymodbus rig)

from gridshed.boards import budget_heapsize

SCRIPT = r'''
import asyncio, gc, json, termios
from agent.compat import ticks_ms
from agent.modbus_rtu_master import RtuMaster, DONE
from agent.meter import MeterMap
from agent import control

def open_pty(path):
    f = open(path, "r+b", buffering=0)
    fd = f.fileno()
    termios.setraw(fd)
    a = termios.tcgetattr(fd)
    a[6][6] = 0
    a[6][5] = 0
    termios.tcsetattr(fd, termios.TCSANOW, a)
    return f

CFG = json.loads(CFG_JSON)
MAP = {"model": "t", "function": 3, "quantities": {
    "hz": {"addr": 190, "type": "f32"}, "kw": {"addr": 194, "type": "f32", "scale": 0.001}}}
m = RtuMaster(open_pty(PTY), 19200, timeout_ms=300, retries=1)
mm = MeterMap(MAP)
ctrl = control.Controller(CFG, len(CFG["blocks"]))
HOT = (190, 2, (0,))
SLOW = (194, 2, (1,))
R = {"fails": 0}
N = NCYC

async def poll(n, slow_every):
    for i in range(n):
        # hot read, decode, decide
        m.begin(1, 3, 190, 2)
        w = m.step()
        while w >= 0:
            await asyncio.sleep_ms(w)
            w = m.step()
        m.end()
        if w != DONE:
            R["fails"] += 1
            continue
        mm.update(m._res, 190, HOT[2])
        ctrl.step(ticks_ms(), mm.values[0], True, False, False)
        if slow_every and i % slow_every == 0:  # a slow read taking its turn (kW)
            m.begin(1, 3, 194, 2)
            w = m.step()
            while w >= 0:
                await asyncio.sleep_ms(w)
                w = m.step()
            m.end()
            if w == DONE:
                mm.update(m._res, 194, SLOW[2])
            else:
                R["fails"] += 1

async def api(n):
    for i in range(n):
        await m.read(1, 3, 190, 2)

async def measure(coro_fn, n, *args):
    # bytes allocated by n cycles minus the same call with 0 cycles (the coroutine object of
    # this harness's own loop, made once)
    gc.collect()
    a0 = gc.mem_alloc()
    await coro_fn(0, *args)
    d0 = gc.mem_alloc() - a0
    gc.collect()
    a0 = gc.mem_alloc()
    await coro_fn(n, *args)
    return gc.mem_alloc() - a0 - d0

async def main():
    # 60.0 Hz at 190..191, 1234.5 W at 194..195 (holding registers, f32 big endian)
    await m.write_registers(1, 190, [0x4270, 0x0000])
    await m.write_registers(1, 194, [0x449A, 0x5000])
    await poll(20, 4)   # warm-up: first-call allocations, the views of both read sizes
    R["ok_before"] = m.ok
    R["steady_hot"] = await measure(poll, N, 0)
    R["steady_hot_and_slow"] = await measure(poll, N, 4)
    R["ok_after"] = m.ok
    R["hz"] = mm.values[0]
    R["kw"] = mm.values[1]
    R["state"] = control.STATE_NAMES[ctrl.state]
    R["api"] = await measure(api, 10)
    await m.write_registers(1, 190, [0x426F, 0xF5C3])  # 59.99 Hz: a changed register
    R["changed"] = await measure(poll, 1, 0)
    R["hz2"] = mm.values[0]
    R["counters"] = m.counters()
    for k in R:
        print(json.dumps([k, R[k]]))

asyncio.run(main())
'''

N = 200


def test_poll_path_allocates_nothing_in_steady_state(rig, mp, mpy_dir):  # noqa: F811
    from pathlib import Path

    from gridshed import siteconfig

    cfg = siteconfig.load_site(Path(__file__).resolve().parents[2] / "scenarios" / "demo-site.toml")
    cfg.pop("warnings", None)
    code = (SCRIPT.replace("PTY", repr(rig["pty"])).replace("CFG_JSON", repr(json.dumps(cfg)))
            .replace("NCYC", str(N)))
    out = run_mpy(mp, mpy_dir, code, heapsize=budget_heapsize())
    r = dict(json.loads(ln) for ln in out.strip().splitlines() if ln.startswith("["))
    print({k: r[k] for k in ("steady_hot", "steady_hot_and_slow", "api", "changed")})
    # the cycles really ran against the server: every transaction answered, values decoded
    assert r["fails"] == 0
    assert r["ok_after"] - r["ok_before"] == N + (N + 3) // 4 + N
    assert abs(r["hz"] - 60.0) < 1e-9 and abs(r["kw"] - 1.2345) < 1e-6
    assert r["state"] == "normal"
    c = r["counters"]
    assert c["timeouts"] == 0 and c["crc_errors"] == 0 and c["bad_frames"] == 0
    # the claim: 0 bytes per poll transaction + decode + decision, with or without slow reads
    assert r["steady_hot"] == 0, r
    assert r["steady_hot_and_slow"] == 0, r
    # and what still allocates (the measurement sees allocation when there is some)
    assert r["api"] > 0
    assert r["changed"] > 0 and abs(r["hz2"] - 59.99) < 1e-5


TCP_SCRIPT = r'''
import asyncio, gc, json
from agent.compat import ticks_ms
from agent.modbus_tcp_master import TcpMaster, DONE
from agent.meter import MeterMap
from agent import control

CFG = json.loads(CFG_JSON)
MAP = {"model": "t", "function": 3, "quantities": {
    "hz": {"addr": 190, "type": "f32"}, "kw": {"addr": 194, "type": "f32", "scale": 0.001}}}
m = TcpMaster("127.0.0.1", TCP_PORT, timeout_ms=500, retries=1)
mm = MeterMap(MAP)
ctrl = control.Controller(CFG, len(CFG["blocks"]))
R = {"fails": 0}
N = NCYC

def done(w, addr, items):
    if w != DONE:
        R["fails"] += 1
        R["err"] = repr(m._err)
        return False
    mm.update(m._res, addr, items)
    return True

HOT = (0,)
SLOW = (1,)

async def poll(n, slow_every):
    # (inline, as agent/app.py's poll task: an awaited helper would be a coroutine per read)
    for i in range(n):
        m.begin(1, 3, 190, 2)
        w = m.step()
        while w >= 0:
            await asyncio.sleep_ms(w)
            w = m.step()
        m.end()
        if done(w, 190, HOT):
            ctrl.step(ticks_ms(), mm.values[0], True, False, False)
        if slow_every and i % slow_every == 0:
            m.begin(1, 3, 194, 2)
            w = m.step()
            while w >= 0:
                await asyncio.sleep_ms(w)
                w = m.step()
            m.end()
            done(w, 194, SLOW)

async def api(n):
    for i in range(n):
        await m.read(1, 3, 190, 2)

async def measure(coro_fn, n, *args):
    gc.collect()
    a0 = gc.mem_alloc()
    await coro_fn(0, *args)
    d0 = gc.mem_alloc() - a0
    gc.collect()
    a0 = gc.mem_alloc()
    await coro_fn(n, *args)
    return gc.mem_alloc() - a0 - d0

async def main():
    await m.write_registers(1, 190, [0x4270, 0x0000])
    await m.write_registers(1, 194, [0x449A, 0x5000])
    await poll(20, 4)
    R["ok_before"] = m.ok
    R["steady_hot"] = await measure(poll, N, 0)
    R["steady_hot_and_slow"] = await measure(poll, N, 4)
    R["ok_after"] = m.ok
    R["hz"] = mm.values[0]
    R["kw"] = mm.values[1]
    R["state"] = control.STATE_NAMES[ctrl.state]
    R["api"] = await measure(api, 10)
    await m.write_registers(1, 190, [0x426F, 0xF5C3])
    R["changed"] = await measure(poll, 1, 0)
    R["hz2"] = mm.values[0]
    m.close()  # a reconnect runs as a task of its own (allocates, once) and the poll goes on
    R["reconnect"] = await measure(poll, 1, 0)
    R["counters"] = m.counters()
    for k in R:
        print(json.dumps([k, R[k]]))

asyncio.run(main())
'''


def test_tcp_poll_path_allocates_nothing_in_steady_state(rig, mp, mpy_dir):  # noqa: F811
    """The same poll path on Modbus TCP (agent/modbus_tcp_master.py begin/step/end) against the
    real pymodbus TCP server on loopback: 0 B per transaction + decode + decision."""
    from pathlib import Path

    from gridshed import siteconfig

    cfg = siteconfig.load_site(Path(__file__).resolve().parents[2] / "scenarios" / "demo-site.toml")
    cfg.pop("warnings", None)
    code = (TCP_SCRIPT.replace("TCP_PORT", str(rig["tcp_port"])).replace("CFG_JSON", repr(json.dumps(cfg)))
            .replace("NCYC", str(N)))
    out = run_mpy(mp, mpy_dir, code, heapsize=budget_heapsize())
    r = dict(json.loads(ln) for ln in out.strip().splitlines() if ln.startswith("["))
    print({k: r[k] for k in ("steady_hot", "steady_hot_and_slow", "api", "changed", "reconnect")})
    assert r["fails"] == 0, r
    assert r["ok_after"] - r["ok_before"] == N + (N + 3) // 4 + N
    assert abs(r["hz"] - 60.0) < 1e-9 and abs(r["kw"] - 1.2345) < 1e-6
    assert r["state"] == "normal"
    c = r["counters"]
    assert c["timeouts"] == 0 and c["bad_frames"] == 0 and c["conn_errors"] == 0
    assert c["connects"] == 2  # the first connect and the one after close()
    assert r["steady_hot"] == 0, r
    assert r["steady_hot_and_slow"] == 0, r
    assert r["api"] > 0  # the coroutine API still allocates (the measurement sees it)
    assert r["changed"] > 0 and abs(r["hz2"] - 59.99) < 1e-5
    assert r["reconnect"] > 0
