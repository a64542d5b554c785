# Utility-facing Modbus server: a small register map for a utility RTU / SCADA (docs/utility-modbus.md).
#
# Modbus TCP (asyncio server, here) or RTU on the second UART (agent/modbus_server_rtu.py). Framing is
# agent.modbus_tcp here, agent.modbus_rtu there (a TCP server never loads the RTU framing nor its
# CRC table), the PDU agent.modbus_pdu; this module only maps registers. A write sets the Modbus
# issuer's own entry (Agent.issue: control.I_MODBUS, I_HEARTBEAT) and runs one decision at once:
# relays still change only in Agent.decide. Every frame is untrusted: garbage is counted, never
# acted on, never a crash. The channel has no authentication: it may shed, and release only its
# own shed; unless authority.trusted lists "modbus" it never satisfies trip.release_required,
# never clears another issuer's shed and never ends a heartbeat-loss shed. Broadcast (RTU unit
# 0, TCP unit 0/255) never acts in the restore direction; restore-direction writes are rate
# limited per source (the SCADA master has its own bucket), shed-direction writes never are.
# (Comments, not docstrings: less RAM when compiled from source.)
import asyncio

from agent import modbus_pdu as pdu
from agent import modbus_tcp as tcp
from agent.base import log
from agent.compat import const, ticks_ms, ticks_diff
from agent.control import I_MODBUS, I_CONTACT, I_HEARTBEAT
from agent.modbus_errors import ModbusError, ModbusException

_MAP_VERSION = const(1)
# register addresses (0-based, protocol addressing); the same map answers function 3 and 4
_R_VERSION = const(0)
_R_STATUS = const(1)
_R_STATE = const(2)
_R_REASON = const(3)
_R_HZ = const(4)         # u32 mHz, high word first (0 = no valid reading)
_R_KW = const(6)         # s32 0.1 kW, high word first
_R_MASK = const(8)       # bit i = block i closed (load on)
_R_BLOCKS = const(9)
_R_SHED = const(10)      # RW: 1 = shed, 0 = clear the utility shed
_R_RELEASE = const(11)   # W: 1 = release (one shot; also clears the utility shed); reads 0
_R_SHED_KW = const(12)   # RW: partial shed target in kW, 0 = none (whole program)
_R_HEARTBEAT = const(13)  # RW: the utility keeps changing it when heartbeat_s > 0
_R_REQUESTS = const(14)
_R_EXCEPTIONS = const(15)
_R_BAD = const(16)
_R_HB_LOSSES = const(17)
_R_COMMANDS = const(18)
_R_AVAIL = const(19)     # kW a frequency trip would shed now (the market's availability)
_R_MARKET = const(20)    # market bits: 1 running, 2 clock trusted, 4 obligation hour, 8 short, 16 refusing
_R_MPRICE = const(21)    # RW (trusted line only): s16 $/MWh that only adds curtailment; -32768 = none
_R_MKW = const(22)       # RW (trusted line only): kW to curtail, only adds to the schedule's; 0 = none
_NREGS = const(23)

_ST_ARMED = const(1)
_ST_TRIPPED = const(2)
_ST_METER_OK = const(4)
_ST_SHED_REQ = const(8)
_ST_HB_OK = const(16)
_ST_UTIL_SHED = const(32)

_MAX_CONN = const(2)  # other clients: a third evicts the oldest (a dead link never locks us out);
# the configured SCADA master ("master") has a connection of its own that no other client evicts
_REL_BURST = const(4)     # restore-direction writes: burst, then one per _REL_MS, per source
_REL_MS = const(1000)
_NOTE_BURST = const(10)   # journaled write records: burst, then one per _NOTE_MS (all counted)
_NOTE_MS = const(1000)


class UtilityServer:
    def __init__(self, agent, cfg):
        self.a = agent
        self.unit = cfg["unit"]
        self.hb_ms = int(cfg["heartbeat_s"] * 1000)
        self.hb_shed = cfg["heartbeat_action"] == "shed"
        self.img = bytearray(2 * _NREGS)
        self.imv = memoryview(self.img)
        self.tx = bytearray(tcp.MAX_ADU)
        self.txmv = memoryview(self.tx)
        self.requests = self.exceptions = self.bad = self.hb_losses = self.commands = 0
        self.hb_val = -1     # -1: no heartbeat written yet (monitoring starts with the first one)
        self.hb_t = 0
        self.hb_lost = False
        self.conns = []
        self.mconn = None    # the SCADA master's connection (task)
        self.master = cfg.get("master") or None
        self.allow = cfg.get("allow") or ()
        self.server = None
        self.src = "tcp"
        self.bcast = False   # the request being executed is a broadcast
        self.from_master = False
        self.rel = [_REL_BURST, 0, _REL_BURST, 0]  # restore-direction tokens, last refill: others, master
        self.notes = _NOTE_BURST
        self.note_t = 0
        self.unnoted = 0     # write records not journaled (rate limit), told in the next one
        self.limited = self.refused_bcast = self.refused_peer = 0

    # ---- register image ------------------------------------------------------------------
    def _put(self, r, v):
        i = r + r
        self.img[i] = (v >> 8) & 0xFF
        self.img[i + 1] = v & 0xFF

    def _put32(self, r, v):
        self._put(r, (v >> 16) & 0xFFFF)
        self._put(r + 1, v & 0xFFFF)

    def status(self):
        # @status "modbus_server"
        return {"requests": self.requests, "exceptions": self.exceptions, "bad": self.bad,
                "heartbeat_losses": self.hb_losses, "commands": self.commands}

    def hb_ok(self):
        return self.hb_ms == 0 or (self.hb_val >= 0 and not self.hb_lost)

    def refresh(self):
        a = self.a
        c = a.ctrl
        st = 0
        if c.armed:
            st |= _ST_ARMED
        if c.shed_mask:
            st |= _ST_TRIPPED
        if a.meter_ok:
            st |= _ST_METER_OK
        if a.shed_requested():
            st |= _ST_SHED_REQ
        if self.hb_ok():
            st |= _ST_HB_OK
        own = a.auth.held >> I_MODBUS & 1
        if own:
            st |= _ST_UTIL_SHED
        p = self._put
        p(_R_VERSION, _MAP_VERSION)
        p(_R_STATUS, st)
        p(_R_STATE, c.state)
        p(_R_REASON, c.reason)
        hz = a.hz
        # NaN/inf from a bad meter map fail every comparison: they read as 0 (no reading)
        self._put32(_R_HZ, int(hz * 1000 + 0.5) if hz is not None and 0 < hz < 1000000 else 0)
        kw = a.kw
        if kw is None or not -2e8 < kw < 2e8:
            kw = 0.0
        self._put32(_R_KW, int(kw * 10 + (0.5 if kw >= 0 else -0.5)))
        p(_R_MASK, a.relays.mask)
        p(_R_BLOCKS, len(a.cfg["blocks"]))
        p(_R_SHED, own)
        p(_R_RELEASE, 0)
        t = a.auth.kw[I_MODBUS]
        p(_R_SHED_KW, 65535 if t > 65535 else int(t))
        p(_R_HEARTBEAT, self.hb_val if self.hb_val >= 0 else 0)
        p(_R_REQUESTS, self.requests & 0xFFFF)
        p(_R_EXCEPTIONS, self.exceptions & 0xFFFF)
        p(_R_BAD, self.bad & 0xFFFF)
        p(_R_HB_LOSSES, self.hb_losses & 0xFFFF)
        p(_R_COMMANDS, self.commands & 0xFFFF)
        mk = a.market
        m = mk and mk.m
        av = 0.0
        if m:
            av = m.avail_kw
        else:  # no market: what the frequency stages would shed with the relays as they are
            sm = 0
            for x in c._smask:
                sm |= x
            sm &= a.relays.mask
            for i in range(c.nblocks):
                if sm >> i & 1:
                    av += c.kw[i]
        p(_R_AVAIL, 65535 if av > 65535 else int(av + 0.5))
        p(_R_MARKET, 0 if not m else (1 | m.known << 1 | m.oblig << 2 | m.short << 3 | (m.why_count(6) > 0) << 4))
        p(_R_MPRICE, 0x8000 if not m or m.x_price is None else int(m.x_price) & 0xFFFF)
        p(_R_MKW, 0 if not m else int(m.x_kw))

    # ---- requests ------------------------------------------------------------------------
    def execute(self, fn, addr, arg, data, unit):
        # Returns the register bytes for a read, None for a write; ModbusException otherwise.
        if fn == 3 or fn == 4:
            if addr + arg > _NREGS:
                raise ModbusException(pdu.ILLEGAL_DATA_ADDRESS, fn, unit)
            self.refresh()
            return self.imv[2 * addr:2 * (addr + arg)]
        if fn == 6:
            n = 1
        elif fn == 16:
            n = arg
        else:
            raise ModbusException(pdu.ILLEGAL_FUNCTION, fn, unit)
        if addr >= _R_MPRICE and addr + n <= _R_MKW + 1:
            # the market registers: only a line the site trusts (authority.trusted), never a
            # broadcast, only with the market running (docs/market.md)
            mk = self.a.market
            if not self.a.trusted >> I_MODBUS & 1 or self.bcast or mk is None or mk.m is None:
                self.a.count("utility_market_refused")
                raise ModbusException(pdu.ILLEGAL_FUNCTION, fn, unit)
        elif addr < _R_SHED or addr + n > _R_HEARTBEAT + 1:
            raise ModbusException(pdu.ILLEGAL_DATA_ADDRESS, fn, unit)
        restore = False
        for i in range(n):  # check every value first: a multi-write is all or nothing
            r = addr + i
            v = arg if data is None else (data[2 * i] << 8) | data[2 * i + 1]
            if (r == _R_SHED or r == _R_RELEASE) and v > 1:
                raise ModbusException(pdu.ILLEGAL_DATA_VALUE, fn, unit)
            if self._restores(r, v):
                restore = True
        if restore:
            if self.bcast:  # a broadcast never brings load back
                self.refused_bcast += 1
                self.a.count("utility_bcast_refused")
                raise ModbusException(pdu.ILLEGAL_FUNCTION, fn, unit)
            if not self._token():
                self.limited += 1
                self.a.count("utility_limited")
                raise ModbusException(pdu.SERVER_DEVICE_BUSY, fn, unit)
        act = False
        for i in range(n):
            v = arg if data is None else (data[2 * i] << 8) | data[2 * i + 1]
            if self._set(addr + i, v):
                act = True
        self.commands += 1
        if act:
            self.apply()
        return None

    def _restores(self, r, v):
        # would this write release something (the restore direction)?
        a = self.a
        if r == _R_SHED:
            return v == 0 and a.auth.held >> I_MODBUS & 1
        if r == _R_RELEASE:
            return v == 1
        if r == _R_SHED_KW:
            return v < a.auth.kw[I_MODBUS]
        if r == _R_MPRICE:
            x = a.market.m.x_price
            return x is not None and (v == 0x8000 or _s16(v) < x)
        if r == _R_MKW:
            return v < a.market.m.x_kw
        return False

    def _token(self):
        # one restore-direction write from this source's bucket (the master has its own)
        b = self.rel
        j = 2 if self.from_master else 0
        now = ticks_ms()
        g = ticks_diff(now, b[j + 1]) // _REL_MS
        if g > 0:
            b[j] = _REL_BURST if b[j] + g > _REL_BURST else b[j] + g
            b[j + 1] = now
        if b[j] <= 0:
            return False
        b[j] -= 1
        return True

    def _note(self, what, v):
        # journaled from a bucket (_NOTE_BURST, one more per _NOTE_MS): a write flood must not
        # roll real evidence out of the journal; the next record says how many were skipped
        now = ticks_ms()
        g = ticks_diff(now, self.note_t) // _NOTE_MS
        if g > 0:
            self.notes = _NOTE_BURST if self.notes + g > _NOTE_BURST else self.notes + g
            self.note_t = now
        if self.notes <= 0:
            self.unnoted += 1
            return
        self.notes -= 1
        d = {"cmd": what, "v": v, "src": self.src}
        if self.unnoted:
            d["skipped"] = self.unnoted
            self.unnoted = 0
        self.a.journal.append("utility", d)
        log("E", "utility %s %d (%s)" % (what, v, self.src))

    def _set(self, r, v):
        a = self.a
        if r == _R_SHED:
            if a.issue(I_MODBUS, v == 1):
                self._note("shed", v)
                return True
        elif r == _R_RELEASE:
            if v:
                ch = a.issue(I_MODBUS, False, 0)  # its own entry: full shed and kW target
                if a.trusted >> I_MODBUS & 1:  # a site that trusts this line (authority.trusted)
                    ch = a.auth.release(1 << I_HEARTBEAT | 1 << I_CONTACT) or ch
                    a.auth_sync()
                    if a.signal is not None:
                        a.signal.clear()
                    a.release = True
                self._note("release", v)
                return True
        elif r == _R_SHED_KW:
            if v != int(a.auth.kw[I_MODBUS]):
                if v:
                    a.issue(I_MODBUS, True, v)
                else:
                    a.issue(I_MODBUS, False, 0, False)
                self._note("shed_kw", v)
                return True
        elif r == _R_MPRICE or r == _R_MKW:
            m = a.market.m
            if r == _R_MPRICE:
                x = None if v == 0x8000 else _s16(v)
                if x == m.x_price:
                    return False
                a.market.set_extra(x, m.x_kw)
            else:
                if v == m.x_kw:
                    return False
                a.market.set_extra(m.x_price, float(v))
            self._note("market_price" if r == _R_MPRICE else "market_kw", v)
            return True
        elif v != self.hb_val:  # _R_HEARTBEAT: only a change counts as alive
            self.hb_val = v
            self.hb_t = ticks_ms()
            if self.hb_lost:
                self.hb_lost = False
                a.journal.append("utility", {"ev": "heartbeat_ok", "src": self.src})
                log("E", "utility heartbeat back")
            # a heartbeat-loss shed ends with the heartbeat only on a trusted line (never a
            # broadcast); otherwise a signed restore-all ends it
            if a.auth.held >> I_HEARTBEAT & 1 and a.trusted >> I_MODBUS & 1 and not self.bcast:
                a.issue(I_HEARTBEAT, False)
                return True
        return False

    def apply(self):
        self.a.decide(ticks_ms(), False)

    def check_heartbeat(self, now):
        if self.hb_ms and self.hb_val >= 0 and not self.hb_lost and ticks_diff(now, self.hb_t) > self.hb_ms:
            self.hb_lost = True
            self.hb_losses += 1
            self.a.count("utility_heartbeat_lost")
            act = "shed" if self.hb_shed else "alarm"
            self.a.journal.append("utility", {"ev": "heartbeat_lost", "action": act, "src": self.src})
            log("W", "utility heartbeat lost (%d ms): %s" % (self.hb_ms, act))
            if self.hb_shed:
                self.a.issue(I_HEARTBEAT, True)
                self.apply()

    def handle_tcp(self, rx, n):
        # One whole MBAP frame in rx[:n]; the response goes to self.tx, its length is returned.
        self.requests += 1
        try:
            tid, unit, fn, addr, arg, data = tcp.parse_request(rx, n)
            if unit != self.unit and unit != 0 and unit != 255:
                raise ModbusException(pdu.GATEWAY_TARGET_FAILED, fn, unit)
            self.bcast = unit == 0 or unit == 255
            return tcp.build_response(self.tx, tid, unit, fn, addr, arg, self.execute(fn, addr, arg, data, unit))
        except ModbusException as e:
            self.exceptions += 1
            return tcp.build_exception(self.tx, tcp.request_tid(rx), e.unit, e.fn, e.code)
        except ModbusError:
            self._bad()
            return 0

    def _bad(self):
        self.bad += 1
        self.a.count("utility_bad_frame")
        if self.bad < 4 or self.bad % 100 == 0:
            log("W", "utility: bad frame (%d)" % self.bad)

    # ---- transports ----------------------------------------------------------------------
    async def _fill(self, r, mv, got, need):
        while got < need:
            k = await r.readinto(mv[got:need])
            if k is None:
                continue
            if not k:
                return got  # end of stream
            got += k
        return got

    async def _client(self, r, w):
        ip = _peer_ip(w.get_extra_info("peername"))
        if self.allow and ip not in self.allow:  # modbus_server.allow: not on the list
            self.refused_peer += 1
            self.a.count("utility_peer_refused")
            try:
                await w.wait_closed()
            except Exception:
                pass
            return
        conns = self.conns
        t = asyncio.current_task()
        master = self.master is not None and ip == self.master
        if master:  # its own slot: a new master connection replaces its old one only
            if self.mconn is not None:
                self.mconn.cancel()
            self.mconn = t
        else:
            if len(conns) >= _MAX_CONN:
                conns.pop(0).cancel()  # the oldest client goes; its finally closes its socket
            conns.append(t)
        rx = bytearray(tcp.MAX_ADU)
        mv = memoryview(rx)
        try:
            while True:
                g = await self._fill(r, mv, 0, tcp.HEAD_LEN)
                if g < tcp.HEAD_LEN:
                    if g:  # the peer went away mid-frame
                        self.requests += 1
                        self._bad()
                    break
                try:
                    n = tcp.frame_len(rx, tcp.HEAD_LEN)
                except ModbusError:
                    # protocol id / length nonsense: a TCP stream cannot be resynchronised, close it
                    self.requests += 1
                    self._bad()
                    break
                if await self._fill(r, mv, tcp.HEAD_LEN, n) < n:
                    self.requests += 1
                    self._bad()
                    break
                try:
                    self.from_master = master
                    k = self.handle_tcp(rx, n)
                except Exception as e:  # a bug must not take the server down: count, keep serving
                    self.a.count("utility_error")
                    log("E", "utility: %r" % e)
                    k = 0
                if k:
                    w.write(self.txmv[:k])
                    await w.drain()
        except Exception:
            self.a.count("utility_io")
        finally:
            if t in conns:
                conns.remove(t)
            if self.mconn is t:
                self.mconn = None
            try:
                await w.wait_closed()  # MicroPython: this closes the socket (close() does nothing)
            except Exception:
                pass

    async def tcp_task(self, port):
        # On a board: every interface. On the virtual board: sim.json "utility_bind" (default loopback).
        # modbus_server.bind (an interface address) wins over both.
        sim = getattr(self.a.hal, "sim", None)
        host = sim.get("utility_bind", "127.0.0.1") if isinstance(sim, dict) else "0.0.0.0"
        host = self.a.cfg["modbus_server"].get("bind") or host
        while True:
            try:
                self.server = await asyncio.start_server(self._client, host, port)
                log("I", "utility modbus server: tcp %s:%d unit %d" % (host, port, self.unit))
                return
            except OSError as e:
                self.a.count("utility_listen")
                log("E", "utility modbus server: cannot listen on %d: %r (retry in 10 s)" % (port, e))
                await asyncio.sleep(10)

    async def hb_task(self):
        step = self.hb_ms // 4
        step = 20 if step < 20 else (500 if step > 500 else step)
        while True:
            await asyncio.sleep_ms(step)
            self.check_heartbeat(ticks_ms())


def _s16(v):
    return v - 0x10000 if v & 0x8000 else v


def _peer_ip(addr):
    # the client's IPv4 address as text: a (host, port) tuple (lwIP ports) or a raw sockaddr_in
    # (the unix port: family, port, 4 address bytes)
    try:
        if isinstance(addr, tuple):
            return addr[0]
        return "%d.%d.%d.%d" % (addr[4], addr[5], addr[6], addr[7])
    except Exception:
        return "?"


def start(agent):
    cfg = agent.cfg["modbus_server"]
    s = UtilityServer(agent, cfg)
    if cfg["transport"] == "rtu":
        from agent import modbus_server_rtu as utility_rtu  # only boards serving RTU pay for its code

        s.src = "rtu"
        asyncio.create_task(utility_rtu.serve(s, cfg))
    else:
        asyncio.create_task(s.tcp_task(cfg["port"]))
    if s.hb_ms:  # (a MemoryError: counted, begun again)
        asyncio.create_task(agent.keep(s.hb_task, 20))
    return s
