"""RtuMaster paths no other test runs, in the real micropython against the pymodbus server of
tests/firmware/test_modbus_master.py (its RTU and TCP servers share one datastore, so what the
board wrote is read back independently by the pymodbus client over TCP):

* function 1 / 2 reads (coils, discrete inputs) and function 5 (write_coil);
* two tasks sharing the bus: their transactions never interleave on the line;
* the DE pin with a UART that reports the end of transmission (txdone): DE drops only after
  txdone() said the last bit is out;
* a UART whose txdone() never comes true (stuck transmitter): the attempt ends in a timeout,
  and a transaction cancelled while transmitting releases DE (the bus is never left jammed).
"""
from __future__ import annotations

import json

from test_modbus_master import rig, run_mpy  # noqa: F401  (the module's pymodbus rig)

SCRIPT = r'''
import asyncio, json, struct, termios
from agent.modbus_rtu_master import RtuMaster
from agent.modbus_errors import ModbusTimeout, ModbusError

def open_pty(path):
    f = open(path, "r+b", buffering=0)
    fd = f.fileno()
    termios.setraw(fd)
    a = termios.tcgetattr(fd)
    a[6][6] = 0
    a[6][5] = 0
    termios.tcsetattr(fd, termios.TCSANOW, a)
    return f

LOG = []

class Pin:
    def value(self, v):
        LOG.append("de%d" % v)

class Uart:
    # the pty with a transmitter that reports its end: txdone() false for `polls` calls after
    # every write (forever when stuck); every write and every non-empty read logged
    def __init__(self, f):
        self.f = f
        self.polls = 3
        self.left = 0
        self.stuck = False
        self.stuck_polls = 0
    def write(self, b):
        LOG.append("w")
        self.left = self.polls
        return self.f.write(b)
    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            LOG.append("r")
        return n
    def txdone(self):
        if self.stuck:  # counted, not logged: a stuck transmitter is polled many times
            self.stuck_polls += 1
            return False
        if self.left:
            self.left -= 1
            LOG.append("busy")
            return False
        LOG.append("done")
        return True

def bits(mv):
    return list(bytes(mv))

async def main():
    R = {}
    u = Uart(open_pty(PTY))
    m = RtuMaster(u, 19200, timeout_ms=150, retries=0, de=Pin())
    R["coils"] = bits(await m.read(1, 1, 100, 16))
    R["inputs"] = bits(await m.read(1, 2, 100, 16))
    R["coils_odd"] = bits(await m.read(1, 1, 100, 11))
    await m.write_coil(1, 100, True)
    R["coils_on"] = bits(await m.read(1, 1, 100, 16))
    await m.write_coil(1, 100, False)
    R["coils_off"] = bits(await m.read(1, 1, 100, 16))
    await m.write_coil(1, 100, True)
    R["coils_after"] = bits(await m.read(1, 1, 100, 16))
    R["log_single"] = list(LOG)
    # two tasks on one bus
    del LOG[:]
    async def rd(*a):  # the result is a view of the master's buffer: valid until the next transaction
        return bytes(await m.read(*a))
    res = await asyncio.gather(rd(1, 3, 100, 2), rd(1, 4, 120, 3), rd(1, 1, 100, 8), rd(1, 3, 130, 1))
    R["gather"] = [list(struct.unpack(">%dH" % (len(x) // 2), x)) if i != 2 else bits(x) for i, x in enumerate(res)]
    R["log_gather"] = list(LOG)
    # a stuck transmitter: the attempt must end (a timeout), DE released
    del LOG[:]
    u.stuck = True
    try:
        await m.read(1, 3, 100, 2)
        R["stuck"] = "no error"
    except ModbusError as e:
        R["stuck"] = type(e).__name__
    R["stuck_polls"] = u.stuck_polls > 0
    R["stuck_de"] = [x for x in LOG if x.startswith("de")]
    # cancelled while transmitting
    del LOG[:]
    t = asyncio.create_task(m.read(1, 3, 100, 2))
    for _ in range(20):
        await asyncio.sleep_ms(1)
    R["cancel_de_before"] = [x for x in LOG if x.startswith("de")]
    t.cancel()
    try:
        await t
        R["cancelled"] = "finished"
    except asyncio.CancelledError:
        R["cancelled"] = "cancelled"
    except ModbusError as e:
        R["cancelled"] = type(e).__name__
    R["cancel_de_after"] = [x for x in LOG if x.startswith("de")]
    u.stuck = False
    R["after_cancel"] = list(struct.unpack(">2H", await m.read(1, 3, 100, 2)))
    R["counters"] = m.counters()
    for k in R:
        print(json.dumps([k, R[k]]))

asyncio.run(main())
'''


def pymodbus_bits(path: str, fn: int, addr: int, n: int) -> list[int]:
    """The bits as the pymodbus client reads them on the same RTU line (the board's end of the
    rig's relay, while no micropython holds it), packed as on the wire (LSB first)."""
    from pymodbus.client import ModbusSerialClient

    c = ModbusSerialClient(path, baudrate=19200, timeout=2, retries=2)
    assert c.connect()
    try:
        rr = (c.read_coils if fn == 1 else c.read_discrete_inputs)(addr, count=n, device_id=1)
        assert not rr.isError(), rr
        b = list(rr.bits[:n])
    finally:
        c.close()
    out = [0] * ((n + 7) // 8)
    for i, v in enumerate(b):
        out[i // 8] |= int(v) << (i % 8)
    return out


def test_rtu_master_paths(rig, mp, mpy_dir):  # noqa: F811
    path = rig["pty"]
    before_coils = pymodbus_bits(path, 1, 100, 16)
    before_inputs = pymodbus_bits(path, 2, 100, 16)
    out = run_mpy(mp, mpy_dir, SCRIPT.replace("PTY", repr(rig["pty"])), heapsize="256k")  # the driver from source
    R = dict(json.loads(ln) for ln in out.strip().splitlines() if ln.startswith("["))
    # function 1 / 2: what pymodbus serves, bit for bit (an odd count: the last byte's high bits 0)
    assert R["coils"] == before_coils and R["inputs"] == before_inputs
    assert R["coils_odd"] == [before_coils[0], before_coils[1] & 0x07]
    # function 5: coil 100 on, off, on; nothing else moved; pymodbus reads what the board wrote
    b0 = before_coils[0] & ~1
    assert R["coils_on"] == R["coils_after"] == [b0 | 1, before_coils[1]]
    assert R["coils_off"] == [b0, before_coils[1]]
    after = pymodbus_bits(path, 1, 100, 16)
    assert after == R["coils_after"]
    # DE with txdone: high for the write, low only after txdone() said done, every transaction
    log = R["log_single"]
    assert log.count("de1") == 9 and log.count("de0") == 10  # nine transactions (+ the constructor's de0)
    for i, x in enumerate(log):
        if x == "de0" and i > 0:  # the constructor's first de0 comes before any write
            assert log[i - 1] == "done", log[max(0, i - 4):i + 1]
        if x == "de1":
            assert log[i + 1] == "w" and log[i + 2] == "busy"  # txdone polled: not done at once
    # two tasks on one bus: requests and replies strictly alternate, DE brackets each request
    g = R["log_gather"]
    seq = [x for x in g if x in ("w", "r", "de1", "de0")]
    writes = [i for i, x in enumerate(seq) if x == "w"]
    assert len(writes) == 4
    for a, b in zip(writes, writes[1:]):
        between = seq[a:b]
        assert "r" in between and between.count("de0") == 1, seq  # the reply came before the next request
    assert len(R["gather"][0]) == 2 and len(R["gather"][1]) == 3
    assert len(R["gather"][3]) == 1 and R["gather"][2] == [after[0]]
    # a stuck transmitter ends in a timeout with DE released; a cancel mid-transmission too
    assert R["stuck"] == "ModbusTimeout" and R["stuck_de"][-1] == "de0"
    assert R["cancel_de_before"] == ["de1"]          # it was transmitting when cancelled
    assert R["cancelled"] == "cancelled" and R["cancel_de_after"] == ["de1", "de0"]
    assert R["after_cancel"] == R["gather"][0]       # the bus works again: the same registers
    assert R["counters"]["timeouts"] >= 1
