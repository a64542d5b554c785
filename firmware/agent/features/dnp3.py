# DNP3 (IEEE 1815) outstation feature: [dnp3] in site.toml (docs/dnp3.md).
#
# TCP (one master connection at a time: a new one replaces the old) or serial on the utility
# UART ([dnp3] transport = "serial"). The protocol is
# agent/dnp3_link.py (link + transport) and agent/dnp3_app.py (application); this module maps
# the agent onto points, scans them every SCAN_MS into events, and executes controls. DNP3 has
# no authentication here (no SAv5): like the Modbus server it may shed and arm, and release
# only its own shed (control.I_DNP3); it never clears another issuer's shed, never satisfies
# trip.release_required, never disarms; restore-direction controls are rate limited. Allowed
# peers: [dnp3] allow (IPv4 addresses) and masters (link addresses). Every frame is untrusted:
# garbage is counted, never acted on, never a crash. (Comments, not docstrings: less RAM.)
import asyncio
from array import array

from agent.base import log as _log, unload
from agent import dnp3_app as app
from agent import dnp3_link as link
from agent.compat import const, ticks_ms, ticks_diff
from agent.control import I_DNP3

SCAN_MS = const(50)
BI_ARMED = const(0)
BI_TRIPPED = const(1)
BI_METER_OK = const(2)
BI_DNP3_SHED = const(3)
BI_BLOCK = const(4)      # BI 4 + i: block i closed (load on)
AI_HZ = const(0)
AI_KW = const(1)
AI_MW = const(2)
AI_STATE = const(3)      # controller state code (control.STATE_NAMES), class 1
AI_REASON = const(4)     # trip reason code (control.REASON_NAMES), class 1
BO_SHED = const(0)
BO_RESTORE = const(1)
BO_ARM = const(2)
REL_BURST = const(4)     # restore-direction controls: burst, then one per REL_MS
REL_MS = const(1000)
NOTE_BURST = const(10)   # journaled controls: burst, then one per NOTE_MS (all counted)
NOTE_MS = const(1000)


class Dnp3:
    def __init__(self, agent, cfg):
        self.a = agent
        self.cfg = cfg
        blocks = agent.cfg["blocks"]
        self.nb = len(blocks)
        self.bkw = array("f", [b["miners"] * b["kw_per_miner"] for b in blocks])
        db = array("f", [cfg["hz_deadband"], cfg["kw_deadband"], cfg["mw_deadband"], 0.5, 0.5])
        self.app = app.Outstation(BI_BLOCK + self.nb, 5, 3, self.ctl, b"\x02\x02\x03\x01\x01", db,
                                  cfg["unsolicited"] and cfg["transport"] == "tcp")
        self.link = link.Link(self.app, cfg["address"], tuple(cfg["masters"]))
        self.allow = cfg["allow"]
        self.conn = None
        self.w = None      # the connected master's stream (unsolicited answers)
        self.lock = asyncio.Lock()  # one writer at a time on it (answers, unsolicited)
        self.peer = None
        self.refused = 0
        self.rel = REL_BURST
        self.rel_t = ticks_ms()
        self.notes = NOTE_BURST
        self.note_t = 0
        self.unnoted = 0
        self.server = None
        self.m_last = self.s_last = -1  # relay mask and sample count of the last scan
        self.ok_last = None
        t = agent.now_unix()
        if t is not None:  # the agent's trusted (signed) time: events are stamped right from boot
            self.app.set_time(int(t * 1000))
            self.app.counts[app.A_TIME] = 0
        self.scan()

    # ---- points ------------------------------------------------------------------------------
    def scan(self):
        a = self.a
        c = a.ctrl
        o = self.app
        held = a.auth.held >> I_DNP3 & 1
        o.update_bi(BI_ARMED, c.armed)
        o.update_bi(BI_TRIPPED, c.shed_mask)
        o.update_bi(BI_METER_OK, a.meter_ok)
        o.update_bi(BI_DNP3_SHED, held)
        o.update_ai(AI_STATE, c.state, 0x01)  # an event only when the code changes (deadband 0.5)
        o.update_ai(AI_REASON, c.reason, 0x01)
        # the analog points only when what they come from changed (no float work on idle scans)
        m = a.relays.mask
        if m != self.m_last:
            self.m_last = m
            mw = 0.0
            for i in range(self.nb):
                on = m >> i & 1
                o.update_bi(BI_BLOCK + i, on)
                if on:
                    mw += self.bkw[i]
            o.update_ai(AI_MW, mw / 1000, 0x01)
        ok = a.meter_ok
        if a.samples != self.s_last or ok != self.ok_last:
            self.s_last = a.samples
            self.ok_last = ok
            hz = a.hz
            # NaN/inf fail every comparison: no reading (flags: comm lost, not online)
            if hz is not None and 0 < hz < 1000:
                o.update_ai(AI_HZ, hz, 0x01)
            else:
                o.update_ai(AI_HZ, 0.0, 0x04)
            kw = a.kw
            if kw is not None and -2e8 < kw < 2e8 and ok:
                o.update_ai(AI_KW, kw, 0x01)
            else:
                o.update_ai(AI_KW, 0.0 if kw is None or not -2e8 < kw < 2e8 else kw, 0x04)
        o.bo[BO_SHED] = held
        o.bo[BO_ARM] = 1 if c.armed else 0
        o.trouble = not a.meter_ok
        o.now()  # keeps the DNP3 clock anchored

    async def scan_task(self):
        while True:
            await asyncio.sleep_ms(SCAN_MS)
            try:
                self.scan()
                w = self.w
                if w is not None and not self.lock.locked():
                    k = self.app.unsolicited()
                    if k:
                        k = self.link.send(0, k)
                        async with self.lock:
                            w.write(self.link.outmv[:k])
                            await w.drain()
            except Exception as e:  # a bug must not stop the scan silently: counted, logged
                self.a.count("dnp3_error")
                _log("E", "dnp3 scan: %r" % e)

    # ---- controls (dnp3_app calls ctl for each CROB: SELECT checks, OPERATE executes) ----------
    def ctl(self, idx, on, execute):
        a = self.a
        if idx == BO_ARM:
            if not on:  # disarming turns protection off: only a signed command may
                return app.ST_NOT_AUTHORIZED
            if execute:
                now = ticks_ms()
                ev = a.ctrl.arm(now)
                if a.ctrl.nevents:
                    a.events(ev, now)
                self._note("arm")
            return app.ST_OK
        if idx == BO_RESTORE and not on:
            return app.ST_NOT_SUPPORTED
        if idx == BO_SHED and on:
            if execute:
                if a.issue(I_DNP3, True):
                    self._note("shed")
                a.decide(ticks_ms(), False)
            return app.ST_OK
        # BO_SHED off / BO_RESTORE on: the restore direction releases this channel's own shed
        # only (its full shed and any kW target it held), rate limited
        if execute:
            if not self._token():
                a.count("dnp3_limited")
                return app.ST_LIMITED
            if a.issue(I_DNP3, False, 0):
                self._note("release")
            a.decide(ticks_ms(), False)
        return app.ST_OK

    def _token(self):
        now = ticks_ms()
        g = ticks_diff(now, self.rel_t) // REL_MS
        if g > 0:
            self.rel = REL_BURST if self.rel + g > REL_BURST else self.rel + g
            self.rel_t = now
        if self.rel <= 0:
            return False
        self.rel -= 1
        return True

    def _note(self, what):
        # journaled from a bucket: a control flood must not roll real evidence out of the journal
        now = ticks_ms()
        g = ticks_diff(now, self.note_t) // NOTE_MS
        if g > 0:
            self.notes = NOTE_BURST if self.notes + g > NOTE_BURST else self.notes + g
            self.note_t = now
        if self.notes <= 0:
            self.unnoted += 1
            return
        self.notes -= 1
        d = {"cmd": what, "src": self.peer, "master": self.link.peer}
        if self.unnoted:
            d["skipped"] = self.unnoted
            self.unnoted = 0
        self.a.journal.append("dnp3", d)
        _log("E", "dnp3 %s (%s)" % (what, self.peer))

    # ---- TCP ---------------------------------------------------------------------------------
    async def _client(self, r, w):
        ip = _peer_ip(w.get_extra_info("peername"))
        if self.allow and ip not in self.allow:
            self.refused += 1
            self.a.count("dnp3_peer_refused")
            try:
                await w.wait_closed()
            except Exception:
                pass
            return
        if self.conn is not None:  # one master at a time: the new connection replaces the old
            self.conn.cancel()
        t = self.conn = asyncio.current_task()
        self.peer = ip
        self.w = w
        lk = self.link
        lk.reset()
        self.app.session()
        try:
            while True:
                k = await r.readinto(lk.rxmv[lk.have:])
                if not k:
                    break
                lk.have += k
                while True:
                    k = self._step()
                    if k < 0:
                        break
                    if k:
                        async with self.lock:
                            w.write(lk.outmv[:k])
                            await w.drain()
        except Exception:
            self.a.count("dnp3_io")
        finally:
            if self.conn is t:
                self.conn = None
                self.peer = None
                self.w = None
            try:
                await w.wait_closed()  # MicroPython: this closes the socket
            except Exception:
                pass

    def _step(self):
        lk = self.link
        try:
            return lk.step()
        except Exception as e:  # a bug must not take the server down: counted, input dropped
            self.a.count("dnp3_error")
            _log("E", "dnp3: %r" % e)
            lk.have = 0
            return -1

    async def serial_task(self):
        # DNP3 serial on the board's utility UART (RS-485, 8N1): frames delimit themselves
        # (05 64 + length); the link resynchronises on noise. One master on the line.
        a = self.a
        try:
            u = a.hal.uart("utility", self.cfg)
        except Exception as e:
            a.count("dnp3_uart")
            _log("E", "dnp3: no utility UART: %r" % e)
            return
        de = None
        uc = (a.cfg.get("uart") or {}).get("utility") or {}
        if uc.get("de") is not None:
            de = a.hal.out_pin(uc["de"], 0)
        char_us = 10000000 // self.cfg["baud"]
        lk = self.link
        self.peer = "serial"
        _log("I", "dnp3 outstation: serial %d baud address %d" % (self.cfg["baud"], self.cfg["address"]))
        while True:
            try:
                k = u.readinto(lk.rxmv[lk.have:])
            except OSError:
                k = None
            if k:
                lk.have += k
                while True:
                    k = self._step()
                    if k < 0:
                        break
                    if k:
                        try:
                            if de is not None:
                                de.value(1)
                            u.write(lk.outmv[:k])
                            if de is not None:
                                await asyncio.sleep_ms(k * char_us // 1000 + 1)
                                de.value(0)
                        except OSError:
                            a.count("dnp3_io")
            await asyncio.sleep_ms(2 if lk.have else 5)

    async def tcp_task(self, port):
        sim = getattr(self.a.hal, "sim", None)
        host = sim.get("utility_bind", "127.0.0.1") if isinstance(sim, dict) else "0.0.0.0"
        host = self.cfg.get("bind") or host
        while True:
            try:
                self.server = await asyncio.start_server(self._client, host, port)
                _log("I", "dnp3 outstation: tcp %s:%d address %d" % (host, port, self.cfg["address"]))
                return
            except Exception as e:  # OSError (port taken), MemoryError (short of RAM): retried
                self.a.count("dnp3_listen")
                _log("E", "dnp3: cannot listen on %d: %r (retry in 10 s)" % (port, e))
                await asyncio.sleep(10)

    def status(self):
        d = {"transport": self.cfg["transport"], "port": self.cfg["port"], "peer": self.peer, "peers_refused": self.refused,
             "events": self.app.ne, "time_synced": self.app.synced}
        # two small tables rather than one large one (a smaller block to find in a full heap)
        d["link"] = {link.COUNT_NAMES[i]: self.link.counts[i] for i in range(link.NCOUNTS)}
        d["app"] = {app.COUNT_NAMES[i]: self.app.counts[i] for i in range(app.NCOUNTS)}
        return d


def _peer_ip(addr):
    # (host, port) on lwIP ports; a raw sockaddr_in on the unix port
    try:
        if isinstance(addr, tuple):
            return addr[0]
        return "%d.%d.%d.%d" % (addr[4], addr[5], addr[6], addr[7])
    except Exception:
        return "?"


def start(agent):
    cfg = agent.cfg["dnp3"]
    try:
        s = Dnp3(agent, cfg)
    except MemoryError:
        # no RAM for the buffers: counted, and the outstation's code unloaded again (once this
        # returns nothing holds it) so the agent runs on with its usual margin
        import gc

        s = None
        for n in ("agent.dnp3_app", "agent.dnp3_link", "agent.features.dnp3"):
            unload(n)
        gc.collect()
        agent.count("dnp3_memory")
        _log("E", "dnp3: not enough RAM for the outstation: not started")
        return None  # not started: no @status entry (the hub keeps only started features)
    if cfg["transport"] == "serial":
        asyncio.create_task(s.serial_task())
    else:
        asyncio.create_task(s.tcp_task(cfg["port"]))
    asyncio.create_task(agent.keep(s.scan_task, SCAN_MS))  # (a MemoryError: counted, begun again)
    return s
