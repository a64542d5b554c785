# AC sense: grid frequency and ROCOF measured on the board from zero crossings (docs/ac-sense.md).
#
# start(agent) (cfg["ac_sense"] enabled): rising edges of the AC sense pin are timestamped by a
# GPIO interrupt (hal.edge_input: a hard IRQ on boards, the GPIO socket on the virtual board) into the
# preallocated ring of agent/freqmeter.py; a task wakes every WAKE_MS, drains the ring and, when
# new cycles were measured:
#   role "primary":   agent.hz = local frequency and one control decision per measured cycle;
#                     the meter supplies kW only. While the local measurement is valid, the poll
#                     task's decisions are timer ticks (the agent's frequency hook: this object
#                     is agent.hz_source, its `ok` the switch), so the controller never mixes
#                     meter and local samples; when it is lost (no edges), the meter's
#                     frequency takes over again by itself.
#   role "secondary": the meter stays the frequency source; local vs meter disagreement above
#                     max_disagree_hz for disagree_s -> counter + journal "freq_disagree".
# Either role feeds ROCOF to the controller (ctrl.rocof) for ROCOF stages, and cross-checks.
import asyncio
from time import ticks_us

from agent.base import log
from agent.compat import ticks_diff, ticks_ms
from agent.freqmeter import TICKS_MASK, FreqMeter

WAKE_MS = 10


class Freq:
    def __init__(self, agent):
        c = agent.cfg["ac_sense"]
        self.agent = agent
        self.primary = c.get("role") == "primary"
        self.fm = FreqMeter(agent.cfg.get("nominal_hz", 60), c.get("cycles", 4), c.get("rocof_cycles", 24))
        self.max_dis = c.get("max_disagree_hz", 0.05)
        self.dis_ms = int(c.get("disagree_s", 2.0) * 1000)
        mm = agent.meter_map
        self._i_hz = mm.names.index("hz")
        self.hz = self.rocof = self.meter_hz = None
        self.ok = False
        self.disagree = False
        self.disagreements = self.lost = self.decisions = 0
        self._dis_t0 = None
        self._pin = None
        self._attach(c["pin"])

    def _attach(self, pin):
        # Rising edges reach FreqMeter.edge(t_us) through the HAL: a hard IRQ on a board
        # (hal/mcu.py), the GPIO socket's edge lines on the virtual board (hal/unix.py).
        self._pin = self.agent.hal.edge_input(pin, self.fm.edge)

    async def run(self):
        a = self.agent
        fm = self.fm
        ctl = a.ctrl
        while True:
            await asyncio.sleep_ms(self._wait())
            n = fm.process()
            if fm.expire(ticks_us()) or not fm.valid:
                ctl.rocof = self.rocof = None
                if self.ok:
                    self.ok = False
                    self.lost += 1
                    a.count("ac_sense_lost")
                    a.journal.append("ac_sense", {"ok": False, "counters": fm.counters()})
                    log("E", "ac sense lost: frequency from the meter")
                continue
            if not n:
                continue
            now = ticks_ms()
            if not self.ok:
                self.ok = True
                a.journal.append("ac_sense", {"ok": True, "role": "primary" if self.primary else "secondary"})
                log("E", "ac sense ok")
            self.hz = hz = fm.hz()
            ctl.rocof = self.rocof = fm.rocof()
            if self.primary:
                a.hz = hz
                keep = a.meter_ok
                a.meter_ok = True  # the frequency source is healthy, whatever the meter does
                self.decisions += 1
                a.decide(now, True)
                a.meter_ok = keep
            self.check(now, hz)

    def _wait(self):
        # wake about 1 ms after the next edge is due, so a cycle is judged as soon as it ends
        # (not up to WAKE_MS later: 0.6 of a cycle); WAKE_MS while no edge is expected (starting,
        # signal lost). An edge late by more than that is looked for every millisecond until
        # the meter's gap detection gives up (5 periods).
        fm = self.fm
        if not fm._have:
            return WAKE_MS
        w = (fm._ref - ((ticks_us() - fm._last) & TICKS_MASK)) // 1000 + 1
        return 1 if w < 1 else (w if w < 2 * WAKE_MS else WAKE_MS)

    def check(self, now, hz):
        a = self.agent
        m = a.meter_map.values[self._i_hz] if a.meter_ok else None
        self.meter_hz = m
        if m is None or not (hz - self.max_dis <= m <= hz + self.max_dis):
            if m is None:
                self._dis_t0 = None
                return
            if self._dis_t0 is None:
                self._dis_t0 = now
            elif not self.disagree and ticks_diff(now, self._dis_t0) >= self.dis_ms:
                self.disagree = True
                self.disagreements += 1
                a.count("freq_disagree")
                a.journal.append("freq_disagree", {"local_hz": hz, "meter_hz": m, "max_hz": self.max_dis})
                log("E", "freq_disagree local=%.3f meter=%.3f" % (hz, m))
            return
        self._dis_t0 = None
        if self.disagree:
            self.disagree = False
            a.journal.append("freq_agree", {"local_hz": hz, "meter_hz": m})

    def status(self):
        d = self.fm.counters()
        d.update({"role": "primary" if self.primary else "secondary", "ok": self.ok, "hz": self.hz,
                  "rocof": self.rocof, "meter_hz": self.meter_hz, "disagree": self.disagree,
                  "disagreements": self.disagreements, "lost": self.lost, "decisions": self.decisions})
        return d


def start(agent):
    f = Freq(agent)
    if f.primary:  # the agent's frequency hook: while f.ok, the meter's samples are ticks
        agent.hz_source = f
    asyncio.create_task(agent.keep(f.run, WAKE_MS))  # (a MemoryError: counted, begun again)
    return f
