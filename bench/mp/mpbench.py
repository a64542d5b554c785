"""Micro benchmarks on the unix port (bench/README.md sections 1 and 2): Modbus RTU master and
control cycle, each next to a reference in the same process. Run by bench/run.py:
  micropython mpbench.py MODE N SETUP.json WORKDIR   (agent.* on MICROPYPATH)"""
import sys, gc, json, struct, time
import asyncio
from time import ticks_us, ticks_diff

MODE = sys.argv[1]
N = int(sys.argv[2])
SETUP = json.loads(open(sys.argv[3]).read())
WORK = sys.argv[4]

# ---- memory-backed UART: answers every request with a prebuilt response frame ------------
class FakeUart:
    def __init__(self, reply):
        self.reply = reply
        self.n = len(reply)
        self.pending = False
    def write(self, buf):
        self.pending = True
        return len(buf)
    def readinto(self, buf):
        if not self.pending:
            return 0
        self.pending = False
        r = self.reply
        for i in range(self.n):   # byte loop: a slice assignment would allocate
            buf[i] = r[i]
        return self.n

from agent.crc import crc16_modbus
MB = SETUP["modbus"]
reply = bytes(bytearray.fromhex(MB["reply"]))
UNIT = MB["unit"]; FN = MB["fn"]; ADDR = MB["addr"]; CNT = MB["count"]

from agent.modbus_rtu_master import RtuMaster
uart_m = FakeUart(reply)
master = RtuMaster(uart_m, 19200, timeout_ms=100, retries=0)
master._gap_us = 0   # t3.5 line silence is wire time: excluded (the fake has no wire)

async def loop_master(n):
    # the agent's poll path (agent/app.py poll_task): the transaction's state machine driven
    # inline, no coroutine per transaction
    m = master
    r = None
    for _ in range(n):
        m.begin(UNIT, FN, ADDR, CNT)
        w = m.step()
        while w >= 0:
            await asyncio.sleep_ms(w)
            w = m.step()
        m.end()
        r = m._res
    return r

async def loop_master_api(n):
    # the public API: await m.read() (one coroutine object per transaction)
    m = master
    r = None
    for _ in range(n):
        r = await m.read(UNIT, FN, ADDR, CNT)
    return r

# reference: the least a transaction can do -- build the request, CRC it, write, copy the
# canned reply in, check its CRC and header, hand back a view of the data
uart_r = FakeUart(reply)
_tx = bytearray(8)
_rx = bytearray(256)
_rxmv = memoryview(_rx)
_view = _rxmv[3:3 + 2 * CNT]
def ref_txn(u, unit, fn, addr, cnt):
    tx = _tx
    tx[0] = unit; tx[1] = fn; tx[2] = addr >> 8; tx[3] = addr & 0xFF; tx[4] = cnt >> 8; tx[5] = cnt & 0xFF
    c = crc16_modbus(tx, 6)
    tx[6] = c & 0xFF; tx[7] = c >> 8
    u.write(tx)
    n = u.readinto(_rxmv)
    rx = _rx
    c = crc16_modbus(rx, n - 2)
    if rx[n - 2] != (c & 0xFF) or rx[n - 1] != (c >> 8) or rx[0] != unit or rx[1] != fn:
        raise ValueError("bad reply")
    return _view

async def loop_ref(n):
    u = uart_r
    r = None
    for _ in range(n):
        r = ref_txn(u, UNIT, FN, ADDR, CNT)
    return r

def drive(coro):
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    raise RuntimeError("transaction waited: the fake UART should answer at once")

# ---- control cycle: hot-register decode + controller step + journal append --------------
CFG = SETUP["cfg"]
from agent.meter import MeterMap
from agent import control
from agent.journal import Journal
mm = MeterMap(CFG["meter"]["map"])
plan = []
for (a, c), hx in zip(mm.plan_for(("hz", "kw")), SETUP["hot_regs"]):
    items = mm._covered(a, c)
    plan.append((a, items, memoryview(bytearray.fromhex(hx))))
vals = mm.values
i_hz = mm.names.index("hz")
i_kw = mm.names.index("kw")
ctrl = control.Controller(CFG, len(CFG["blocks"]))
journal = Journal(WORK + "/j", seg_size=16384, max_segs=4, clock=time.time)
now_box = [1000]

def cycle(now):
    for a, items, regs in plan:
        mm.update(regs, a, items)
    hz = vals[i_hz]
    kw = vals[i_kw]
    ctrl.step(now, hz, True, False, False)
    journal.append("smp", {"hz": hz, "kw": kw, "mask": ctrl.closed_mask})

def cycle_nojournal(now):
    for a, items, regs in plan:
        mm.update(regs, a, items)
    ctrl.step(now, vals[i_hz], True, False, False)

def journal_only(now):
    journal.append("smp", {"hz": 60.0, "kw": 1000.0, "mask": 15})

# reference cycle: unpack two floats, compare with the pickup, pack a fixed 12-byte record and
# write + flush it to a file (what a hand-written minimal loop would do)
REF_OFF = SETUP["ref_off"]
_r0 = plan[0][2]
_rec = bytearray(12)
_rf = open(WORK + "/ref.bin", "wb")
PICKUP = CFG["trip"]["pickup_hz"]
ref_state = [0]
def ref_cycle(now):
    hz = struct.unpack_from(">f", _r0, REF_OFF[0])[0]
    kw = struct.unpack_from(">f", _r0, REF_OFF[1])[0]
    if hz < PICKUP:
        ref_state[0] = 1
    struct.pack_into(">Iff", _rec, 0, now, hz, kw)
    _rf.write(_rec)
    _rf.flush()

def loop(fn, n):
    now = now_box[0]
    for _ in range(n):
        now += 50
        fn(now)
    now_box[0] = now

CYC = {"cycle": cycle, "cycle_ref": ref_cycle, "cycle_nojournal": cycle_nojournal,
       "journal_only": journal_only}

def timed(fn):
    gc.collect()
    t0 = ticks_us()
    fn()
    return ticks_diff(ticks_us(), t0)

def alloc(fn, n):
    # bytes allocated by n iterations minus the same with 0 iterations (the loop's own setup)
    gc.collect(); gc.disable()
    a0 = gc.mem_alloc(); fn(0); d0 = gc.mem_alloc() - a0
    gc.collect()
    a0 = gc.mem_alloc(); fn(n); d1 = gc.mem_alloc() - a0
    gc.enable(); gc.collect()
    return (d1 - d0) / n

if MODE == "time":
    R = {}
    ROUNDS = int(sys.argv[5]) if len(sys.argv) > 5 else 5
    NC = int(sys.argv[6]) if len(sys.argv) > 6 else N
    # warm-up (first-call allocations, caches)
    drive(loop_master(5)); drive(loop_ref(5)); loop(cycle, 5); loop(ref_cycle, 5)
    assert bytes(drive(loop_master(1))) == bytes(drive(loop_ref(1)))
    drive(loop_master_api(5))
    assert bytes(drive(loop_master_api(1))) == bytes(drive(loop_ref(1)))
    tm = {"master": [], "master_api": [], "ref": []}
    for _ in range(ROUNDS):  # interleaved rounds: drift hits both sides alike
        tm["master"].append(timed(lambda: drive(loop_master(N))) / N)
        tm["master_api"].append(timed(lambda: drive(loop_master_api(N))) / N)
        tm["ref"].append(timed(lambda: drive(loop_ref(N))) / N)
    R["modbus_us"] = tm
    R["modbus_alloc"] = {"master": alloc(lambda k: drive(loop_master(k)), 40),
                         "master_api": alloc(lambda k: drive(loop_master_api(k)), 40),
                         "ref": alloc(lambda k: drive(loop_ref(k)), 40)}
    tc = {k: [] for k in CYC}
    for _ in range(ROUNDS):
        for k in CYC:
            tc[k].append(timed(lambda: loop(CYC[k], NC)) / NC)
    R["cycle_us"] = tc
    R["cycle_alloc"] = {k: alloc(lambda n, f=CYC[k]: loop(f, n), 40) for k in CYC}
    R["ctrl_state"] = control.STATE_NAMES[ctrl.state]
    R["journal"] = journal.stats()
    print(json.dumps(R))
else:
    # instruction counting under valgrind: the same setup and warm-up in every run (so the
    # runs subtract cleanly), a collection, then N iterations of one loop
    drive(loop_master(2)); drive(loop_ref(2))
    for k in CYC:
        loop(CYC[k], 2)
    gc.collect()
    if MODE == "none":
        pass
    elif MODE == "modbus_master":
        drive(loop_master(N))
    elif MODE == "modbus_ref":
        drive(loop_ref(N))
    else:
        loop(CYC[MODE], N)
    print(json.dumps({"mode": MODE, "n": N}))
