# Miner network curtailment: an actuator beside the relays (config section "miners").
#
# A block with miners listed under miners.hosts is "soft": when the controller sheds it for a
# partial (kW) curtailment, agent/relays.py leaves its relay closed and asks this module to put
# the block's miners to sleep over their API (TCP 4028, one JSON request per connection, reply
# read until the miner closes; trailing NULs and concatenated JSON objects tolerated). If any
# miner of the block does not confirm within timeout_ms (no answer, refused, error STATUS) the
# block falls back to its relay. Guaranteed trips never wait on the network: under-frequency,
# meter loss and boot always open relays at once, so do full sheds (signal: dry contact, shed
# command without kW, Modbus/MQTT shed) unless hard_signal = false; hard = true makes every shed
# a relay shed. A block held by the network opens its relay as soon as a guaranteed trip is in
# force or the frequency is below the pickup (escalation). Restore: the relay never opened, so
# the miners are woken one at a time, stagger_ms apart. Policy and examples:
# docs/partial-and-miners.md.
#
# APIs (request shapes as the firmwares document them):
#   cgminer: {"command":"asccount"} -> ASCS[0].Count; then {"command":"ascdisable","parameter":"N"}
#            for each ASC (privileged: the board must be in --api-allow W:); wake: ascenable.
#   luxos:   {"command":"logon"} -> SESSION[0].SessionID; {"command":"curtail",
#            "parameter":"<sid>,sleep"} (wake: "<sid>,wakeup"); then {"command":"logoff",...}.
# Sockets are non-blocking and polled (POLL_MS) under a deadline this module owns, so every
# socket is closed on every path; at most MAX_PAR exchanges run at once (lwIP has few sockets).
import asyncio
import errno
import json
import socket

from agent.base import log
from agent.compat import const, ticks_ms, ticks_diff, ticks_add

MAX_REPLY = const(2048)
MAX_PAR = const(8)
POLL_MS = const(10)
WORK_MS = const(20)
WAKE_RETRY_MS = const(2000)
WAKE_TRIES = const(3)
PORT = const(4028)

AWAKE = const(0)     # hashing (or unknown: powered up again)
SLEEPING = const(1)  # sleep request in flight
ASLEEP = const(2)    # sleep confirmed
WAKING = const(3)    # wake request in flight

# trip reasons that always open relays (agent.control REASON_*: 1 uf, 2 signal, 3 meter loss,
# 4 command (partial), 5 boot)
_HARD = (1, 3, 5)


class MinerError(Exception):
    pass


# ---- pure helpers (CPython-testable) ---------------------------------------------------------
def split_json(buf):
    # The JSON objects in a reply: NULs and whitespace between/after objects ignored, several
    # concatenated objects split. Raises MinerError on anything else.
    s = bytes(buf).replace(b"\x00", b" ").decode()
    out = []
    n = len(s)
    i = 0
    while i < n:
        ch = s[i]
        if ch in " \t\r\n":
            i += 1
            continue
        if ch != "{":
            raise MinerError("not json")
        depth = 0
        q = False
        j = i
        while j < n:
            ch = s[j]
            if q:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    q = False
            elif ch == '"':
                q = True
            elif ch == "{" or ch == "[":
                depth += 1
            elif ch == "}" or ch == "]":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if j >= n:
            raise MinerError("truncated json")
        try:
            out.append(json.loads(s[i:j + 1]))
        except ValueError:
            raise MinerError("bad json")
        i = j + 1
    if not out:
        raise MinerError("empty reply")
    return out


def check(objs, section=None):
    # First object with a STATUS decides: S (success) or I (informational, e.g. "already
    # disabled") pass; E/W/F raise with the miner's message. Returns that object's `section`.
    for o in objs:
        if isinstance(o, dict) and "STATUS" in o:
            st = o["STATUS"]
            st = st[0] if isinstance(st, list) and st else st
            if not isinstance(st, dict):
                raise MinerError("bad STATUS")
            code = st.get("STATUS")
            if code not in ("S", "I"):
                raise MinerError("%s %s: %s" % (code, st.get("Code"), str(st.get("Msg"))[:40]))
            if section is None:
                return None
            sec = o.get(section)
            if not isinstance(sec, list) or not sec or not isinstance(sec[0], dict):
                raise MinerError("no " + section)
            return sec[0]
    raise MinerError("no STATUS")


def parse_hosts(hosts, blocks):
    # [(ip, port, block_index, api or None)] and a list of problems; block by name or index.
    names = [b["name"] for b in blocks]
    out = []
    errs = []
    if not isinstance(hosts, list):
        return out, ["miners.hosts: must be a list"]
    for k, h in enumerate(hosts):
        w = "miners.hosts[%d]" % k
        if not isinstance(h, dict):
            errs.append(w + ": must be a table")
            continue
        ip = h.get("host")
        port = h.get("port", PORT)
        b = h.get("block")
        parts = ip.split(".") if isinstance(ip, str) else ()
        if len(parts) != 4 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
            errs.append(w + ".host: an IPv4 address, got %r" % (ip,))
            continue
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            errs.append(w + ".port: bad port %r" % (port,))
            continue
        if isinstance(b, str) and b in names:
            b = names.index(b)
        if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < len(blocks):
            errs.append(w + ".block: no block %r" % (b,))
            continue
        api = h.get("api")
        if api not in (None, "cgminer", "luxos"):
            errs.append(w + ".api: cgminer or luxos, got %r" % (api,))
            continue
        out.append((ip, port, b, api))
    return out, errs


# ---- one request over TCP --------------------------------------------------------------------
_WAIT = (errno.EAGAIN, errno.EINPROGRESS, errno.ENOTCONN, errno.EALREADY)


async def rpc(addr, req, deadline):
    # One request, one connection, reply read until close; MinerError("timeout") at deadline.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        try:
            s.connect(addr)
        except OSError as e:
            if e.args[0] not in _WAIT:
                raise MinerError("connect: %d" % e.args[0])
        data = json.dumps(req).encode()
        off = 0
        while off < len(data):
            try:
                k = s.send(data[off:])
                if k:
                    off += k
                    continue
            except OSError as e:
                if e.args[0] not in _WAIT:
                    raise MinerError("send: %d" % e.args[0])
            if ticks_diff(deadline, ticks_ms()) <= 0:
                raise MinerError("timeout")
            await asyncio.sleep_ms(POLL_MS)
        buf = bytearray()
        while True:
            try:
                d = s.recv(256)
                if not d:
                    break
                if len(buf) + len(d) > MAX_REPLY:
                    raise MinerError("reply too long")
                buf.extend(d)
                continue
            except OSError as e:
                if e.args[0] not in _WAIT:
                    raise MinerError("recv: %d" % e.args[0])
            if ticks_diff(deadline, ticks_ms()) <= 0:
                raise MinerError("timeout")
            await asyncio.sleep_ms(POLL_MS)
        return split_json(buf)
    finally:
        s.close()


async def cgminer(addr, sleep, deadline):
    n = check(await rpc(addr, {"command": "asccount"}, deadline), "ASCS").get("Count")
    if not isinstance(n, int) or not 0 < n <= 64:
        raise MinerError("asccount %r" % (n,))
    cmd = "ascdisable" if sleep else "ascenable"
    for i in range(n):
        check(await rpc(addr, {"command": cmd, "parameter": str(i)}, deadline))


async def luxos(addr, sleep, deadline):
    sid = check(await rpc(addr, {"command": "logon"}, deadline), "SESSION").get("SessionID")
    if not isinstance(sid, str) or not sid or "," in sid:
        raise MinerError("no session")
    try:
        check(await rpc(addr, {"command": "curtail", "parameter": sid + (",sleep" if sleep else ",wakeup")},
                        deadline))
    finally:
        try:
            await rpc(addr, {"command": "logoff", "parameter": sid}, deadline)
        except Exception:
            pass  # the miner drops idle sessions itself


# ---- the actuator ----------------------------------------------------------------------------
class Miners:
    def __init__(self, agent, mc):
        self.a = agent
        blocks = agent.cfg["blocks"]
        hosts, errs = parse_hosts(mc.get("hosts"), blocks)
        for e in errs:
            agent.count("miners_config")
            log("W", "miners: " + e)
        dflt = mc.get("api", "cgminer")
        self.api = [luxos if (h[3] or dflt) == "luxos" else cgminer for h in hosts]
        self.tmo = mc.get("timeout_ms", 1000)
        self.stagger = mc.get("stagger_ms", 1000)
        self.hard = mc.get("hard", False) is True
        self.hard_signal = mc.get("hard_signal", True) is not False
        self.addr = [socket.getaddrinfo(h[0], h[1])[0][-1] for h in hosts]
        self.name = ["%s:%d" % (h[0], h[1]) for h in hosts]
        self.blk = bytearray(h[2] for h in hosts)
        n = len(hosts)
        self.st = bytearray(n)
        self.tries = bytearray(n)
        self.due = [0] * n
        nb = len(blocks)
        self.t_req = [0] * nb
        self.want = 0       # blocks whose miners should sleep
        self.busy = 0       # exchanges in flight
        self.next_wake = 0
        self.c = {"requests": 0, "ok": 0, "timeouts": 0, "errors": 0, "fallbacks": 0, "slept": 0,
                  "woken": 0, "wake_failed": 0}
        self.last_error = None
        self.ev = asyncio.Event()
        soft = 0
        for b in self.blk:
            soft |= 1 << b
        self.soft = soft
        c = agent.ctrl
        self.pick = c.pickup_hz
        if not hasattr(agent, "lockout"):
            agent.lockout = False
        self.bnames = [b["name"] for b in blocks]

    # -- called from the control task (RelayBank.apply); never blocks, never allocates much --
    def hard_now(self):
        c = self.a.ctrl
        if self.hard or self.a.lockout or c.reason in _HARD or (c.reason == 2 and self.hard_signal):
            return True
        hz = self.a.hz
        return c.armed and hz is not None and hz < self.pick

    def curtail(self, bits):
        if self.hard_now() or not self.a.ctrl.reason:
            return 0
        now = ticks_ms()
        bits &= self.soft
        for b in range(len(self.t_req)):
            if bits & (1 << b):
                self.t_req[b] = now
        self.want |= bits
        self.a.relays.pending |= bits
        self.ev.set()
        return bits

    def resume(self, bits):
        self.want &= ~bits
        self.a.relays.pending &= ~bits
        now = ticks_ms()
        if ticks_diff(self.next_wake, now) < 0:
            self.next_wake = now
        for m in range(len(self.blk)):
            if bits & (1 << self.blk[m]) and self.st[m] != AWAKE:
                self.due[m] = self.next_wake
                self.tries[m] = 0
                self.next_wake = ticks_add(self.next_wake, self.stagger)
        self.ev.set()

    def powered(self, bits, on):
        if on:
            return
        # relay opened: these miners lost power, nothing left to ask them
        self.want &= ~bits
        for m in range(len(self.blk)):
            if bits & (1 << self.blk[m]):
                self.st[m] = AWAKE  # boots hashing when the power comes back

    # -- the worker task ------------------------------------------------------------------------
    def status(self):
        out = dict(self.c)
        out["held"] = self.a.relays.held
        out["pending"] = self.a.relays.pending
        out["relay_fallbacks"] = self.a.relays.fallbacks
        out["asleep"] = sum(1 for s in self.st if s == ASLEEP)
        out["miners"] = len(self.st)
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    def _fallback(self, b, why):
        rel = self.a.relays
        bit = 1 << b
        if not rel.held & bit or not self.want & bit:
            return
        self.want &= ~bit
        rel.pending &= ~bit
        rel.fallback(bit)
        self.c["fallbacks"] += 1
        log("W", "miners: block %s falls back to its relay (%s)" % (self.bnames[b], why))
        self._journal({"ev": "fallback", "block": self.bnames[b], "why": why})

    def _journal(self, rec):
        try:
            self.a.journal.append("miners", rec)
        except Exception:
            self.a.count("miners_journal")

    async def _one(self, m, sleep, deadline):
        self.busy += 1
        self.c["requests"] += 1
        b = self.blk[m]
        bit = 1 << b
        why = None
        try:
            await self.api[m](self.addr[m], sleep, deadline)
        except MinerError as e:
            why = str(e)
        except Exception as e:  # OSError, MemoryError, ...: never ends the worker
            why = repr(e)[:48]
        self.busy -= 1
        rel = self.a.relays
        if why is None:
            self.c["ok"] += 1
            if sleep:
                self.st[m] = ASLEEP if rel.pins & bit else AWAKE
                self.c["slept"] += 1
                if self.want & bit and rel.pending & bit and self._all(b, ASLEEP):
                    rel.pending &= ~bit
                    self._journal({"ev": "slept", "block": self.bnames[b]})
            else:
                self.st[m] = AWAKE
                self.c["woken"] += 1
            return
        self.c["timeouts" if why == "timeout" else "errors"] += 1
        self.last_error = "%s %s: %s" % (self.name[m], "sleep" if sleep else "wake", why)
        if sleep:
            # it may have gone to sleep anyway: treat as asleep so a restore wakes it
            self.st[m] = ASLEEP if rel.pins & bit else AWAKE
            self._fallback(b, self.last_error)
        else:
            self.tries[m] += 1
            if self.tries[m] >= WAKE_TRIES:
                self.st[m] = AWAKE
                self.c["wake_failed"] += 1
                log("W", "miners: %s did not wake (%s)" % (self.name[m], why))
            else:
                self.st[m] = ASLEEP
                self.due[m] = ticks_add(ticks_ms(), WAKE_RETRY_MS)

    def _all(self, b, state):
        for m in range(len(self.blk)):
            if self.blk[m] == b and self.st[m] != state:
                return False
        return True

    def _work(self, now):
        # One pass: start what is due, enforce block deadlines. Returns True while work is left.
        rel = self.a.relays
        left = False
        for m in range(len(self.blk)):
            b = self.blk[m]
            bit = 1 << b
            s = self.st[m]
            if self.want & bit:
                if s == AWAKE and rel.held & bit:
                    left = True
                    if self.busy < MAX_PAR:
                        self.st[m] = SLEEPING
                        asyncio.create_task(self._one(m, True, ticks_add(self.t_req[b], self.tmo)))
                elif s == SLEEPING:
                    left = True
            elif s == ASLEEP and rel.pins & bit and not rel.force & bit:
                left = True
                if self.busy < MAX_PAR and ticks_diff(now, self.due[m]) >= 0:
                    self.st[m] = WAKING
                    asyncio.create_task(self._one(m, False, ticks_add(now, self.tmo)))
            elif s == SLEEPING or s == WAKING:
                left = True
        for b in range(len(self.t_req)):
            bit = 1 << b
            if self.want & bit and rel.pending & bit and ticks_diff(now, self.t_req[b]) >= self.tmo:
                self._fallback(b, "timeout")
        return left

    async def run(self):
        while True:
            await self.ev.wait()
            self.ev.clear()
            while self._work(ticks_ms()):
                await asyncio.sleep_ms(WORK_MS)


def start(agent):
    mc = agent.cfg["miners"]
    m = Miners(agent, mc)
    agent.relays.attach(m, m.soft)
    asyncio.create_task(agent.keep(m.run, WORK_MS))  # (a MemoryError: counted, begun again)
    return m
