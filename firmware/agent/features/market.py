# The market feature ([market] in site.toml, docs/market.md): runs agent/market.py on the board.
# Once a second it steps the decision core with the board's trusted time and the blocks that
# protection and commands leave closed, journals every economic transition, and hands the mask
# of blocks economics holds open to the agent (Agent.econ_off): the relays are
# ctrl.closed_mask & ~econ_off, so economics only ever adds open blocks and a frequency trip
# always overrides it. The signed "schedule" command (agent/cmd_run.py) and the utility Modbus
# map's market registers (agent/features/modbus_server.py) reach it through Agent.market.
# (Comments, not docstrings: less RAM when compiled from source.)
import asyncio

from agent.compat import ticks_diff, ticks_ms

PATH = "market.cbor"
PERIOD_MS = 1000


def _io():
    # the settings-file and log helpers (the shared leaf)
    from agent import base

    return base


class Feature:
    saved = None  # (off, fin) last written to market.cbor: a change is written by the next second
    t_boot = 0

    def __init__(self, agent):
        from agent.market import Market  # here: a start without RAM can unload it again

        self.a = agent
        self.m = m = Market(agent.cfg)
        self.file = None  # why market.cbor was refused at boot (None: sound or absent)
        self.refusals = 0  # schedules refused (replay, malformed)
        self.dirty = False  # a schedule taken but not yet in market.cbor
        self.t_boot = ticks_ms()
        rec, why = _io().read_checked(PATH)
        if why is None and rec is not None:
            try:
                why = m.set_schedule(rec["sid"], rec["iv"], True, rec.get("ts"))
                x = rec.get("x")
                if x:
                    m.set_extra(x[0], float(x[1]))
                c = rec.get("cycles")  # today's economic sheds survive a reboot (the cycle cap)
                if c:
                    for i in range(m.n):
                        m.cycles[i] = int(c[i])
                    m.day = int(rec["day"])
                h = rec.get("hold")  # which blocks economics held open and since when (min times)
                if h:
                    m.set_holds(h)
            except Exception:
                why = "not a schedule record"
        if why is not None:
            # a damaged schedule: none is executed (economics holds nothing), the host is told
            self.file = why
            agent.count("market_file")
            agent.journal.append("integrity", {"file": PATH, "why": why})
        agent.market = self

    def status(self):
        s = self.m.status()
        s["refused_schedules"] = self.refusals
        s["stored"] = not self.dirty
        if self.file:
            s["file"] = self.file
        return s

    def tele(self, d):
        # MQTT telemetry (agent/features/mqtt.py): availability, and the obligation warning
        m = self.m
        d["avail_kw"] = m.avail_kw
        if m.short or (m.oblig and m.why_count(6)):
            d["market_warning"] = "%s obligation: %s" % (m.program, "short" if m.short else "refusing curtailment")

    def save(self):
        m = self.m
        try:
            import gc

            gc.collect()  # the writer's module loads for the write only: room first
            rec = m.schedule()
            if m.x_price is not None or m.x_kw:
                rec["x"] = [m.x_price, m.x_kw]
            for c in m.cycles:
                if c:
                    rec["day"] = m.day
                    rec["cycles"] = m.cycles
                    break
            h = m.holds()
            if h:
                rec["hold"] = h
            _io().write_cbor_atomic(PATH, rec)
            self.saved = (m.off, m.fin)
            return True
        except (OSError, MemoryError):
            self.a.count("market_write")
            return False

    def schedule(self, sid, iv, src, ts=None):
        # a verified "schedule" command: None when taken, else why it is refused
        why = self.m.set_schedule(sid, iv, False, ts)
        a = self.a
        if why is None:
            # written now, or (no RAM beside the command's own modules) by the feature's next
            # second, retried until it is: @status market.stored says which
            self.dirty = not self.save()
            self.file = None
            a.journal.append("market", {"ev": "schedule", "sid": sid, "intervals": self.m.niv + self.m.ts_n, "src": src,
                                        "stored": not self.dirty})
        else:
            self.refusals += 1
            a.count("market_refused")
            a.journal.append("market", {"ev": "refused", "why": why, "sid": sid, "src": src})
        self.step()
        return why

    def set_extra(self, price, kw):
        # the utility register (trusted line only): a price / kW target that only adds curtailment
        self.m.set_extra(price, kw)
        self.dirty = not self.save()
        self.step()

    def step(self):
        a = self.a
        m = self.m
        now = a.now_unix()
        if now is None and m.boot_hold:  # held open at the reboot: until its min off has run
            m.boot_release(ticks_diff(ticks_ms(), self.t_boot) // 1000)
            self._journal(m.nev)
        off = m.step(now, a.ctrl.closed_mask)
        self._journal(m.nev)
        if self.saved != (m.off, m.fin) and m.fin >= 0:
            self.dirty = True  # the holds (min times across a reboot): written by the next second
        if off != a.econ_off:
            a.econ_off = off
            a.decide(ticks_ms(), False)

    def _journal(self, n):
        a = self.a
        m = self.m
        for k in range(n):
            e = m.event(k)
            a.journal.append("market", e)
            if e["ev"] == "shed":
                self.dirty = True  # today's cycles: written by the next second
            if e["why"] == "obligation":
                a.count("market_obligation_refusal")
                _io().log("W", "market: %s refused: %s obligation" % (e["block"], m.program))

    async def run(self):
        while True:
            try:
                if self.dirty and self.save():
                    self.dirty = False
                    self.a.journal.append("market", {"ev": "stored", "sid": self.m.sid})
                self.step()
            except MemoryError:
                self.a.count("market_mem")
            await asyncio.sleep_ms(PERIOD_MS)


def boot(agent, persisted):
    # early, before the relays are first driven: the blocks economics held open at the reboot
    # with a min off (market.cbor "hold") start open, so a power cut gives them no extra cycle;
    # the feature's start takes the same holds over (Market.set_holds, boot_release)
    try:
        rec, why = _io().read_checked(PATH)
        if why is None and rec:
            off = int(rec["hold"][0])
            bl = agent.cfg["blocks"]
            m = 0
            for i in range(len(bl)):
                if (off >> i) & 1 and bl[i].get("min_off_s", 0) > 0 and bl[i].get("class") != "firm":
                    m |= 1 << i
            agent.econ_off = m
    except Exception:
        pass


class NoRoom:
    # the feature could not start (no RAM for it): the agent runs on without economics; a
    # schedule is refused ("no-market") and @status says why
    m = None

    def tele(self, d):
        pass

    def status(self):
        return {"error": "no memory to start the market feature", "clock": None}


def start(agent):
    try:
        f = agent.market if isinstance(agent.market, Feature) else Feature(agent)
    except MemoryError:
        agent.econ_off = 0  # no economics: no hold read back at boot either
        agent.market = f = NoRoom()
        agent.count("market_mem")
        _io().unload("agent.market")  # its bytecode back to the agent
        import gc

        gc.collect()
        _io().log("E", "market: no memory to start; no economic action")
        try:
            agent.journal.append("market", {"ev": "no_memory"})
        except MemoryError:
            pass
        return f
    if f.m.boot_hold or agent.econ_off:
        f.step()  # blocks held open at the reboot: open again at once, not after a second
    asyncio.create_task(agent.keep(f.run, PERIOD_MS))  # (a MemoryError: counted, begun again)
    return f
