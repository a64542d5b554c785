"""AC sense for the simulated site: zero-crossing edge streams from the scenario's hz trace.

`edge_times()` integrates the phase of the scenario's frequency (linear between rows, so one
period P starting at t satisfies P = 1 / f(t + P/2) exactly) and yields rising-edge times with
the options below; `AcSense` sends them in real time to the virtual board over the GPIO socket
as `X <pin> <t_us> ...` lines (docs/virtual-board.md, docs/ac-sense.md). Edge times are on the
host's time.monotonic() clock, the CLOCK_MONOTONIC that the unix port's ticks_us() reads, so the
board gets the timestamps an MCU's IRQ would have taken (plus the modelled jitter). Each edge is
sent at its true time (`batch_ms` 0, the default; before, every 4 ms, which delayed an edge by up
to 4 ms on top of the loop's own lag); loopback delivery delays processing by about a
millisecond, and that delay does count in the measured trip time.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .scenario import Scenario


@dataclass
class AcOptions:
    """What the sensing chain adds to the ideal crossings (all off by default except jitter)."""

    jitter_us: float = 20.0                  # uniform +-jitter on each timestamp (detector + IRQ latency)
    extra_edge_prob: float = 0.0             # per cycle: an extra crossing (noise / harmonics chatter)
    missing_edge_prob: float = 0.0           # per cycle: the edge is lost
    phase_jumps: list[tuple[float, float]] = field(default_factory=list)  # (t_s, degrees), + = earlier
    offset_hz: float = 0.0                   # a wrong sensor (tests the secondary cross-check)
    seed: int = 1


def edge_times(hz: Callable[[float], float], t_end: float, opts: AcOptions | None = None,
               t_start: float = 0.0) -> Iterator[tuple[float, float]]:
    """Yield (true_crossing_s, stamped_s) for rising edges from t_start to t_end (scenario seconds)."""
    o = opts or AcOptions()
    rnd = random.Random(o.seed)
    jumps = sorted(o.phase_jumps)
    t = t_start
    shift = 0.0
    j = 0
    while True:
        f = hz(t) + o.offset_hz
        p = 1.0 / f
        for _ in range(3):
            p = 1.0 / (hz(t + p / 2) + o.offset_hz)
        t += p
        if t > t_end:
            return
        while j < len(jumps) and jumps[j][0] <= t:
            shift -= jumps[j][1] / 360.0 * p
            j += 1
        if o.missing_edge_prob and rnd.random() < o.missing_edge_prob:
            continue
        ts = t + shift + rnd.uniform(-o.jitter_us, o.jitter_us) * 1e-6
        yield t, ts
        if o.extra_edge_prob and rnd.random() < o.extra_edge_prob:
            yield t, ts + rnd.uniform(0.0002, 0.6 * p)


class AcSense:
    """Streams the scenario's crossings to the board's ac_sense pin in real time."""

    def __init__(self, scenario: Scenario, send: Callable[[bytes], None], pin: int, t0: float,
                 opts: AcOptions | None = None, batch_ms: float = 0.0, lead_s: float = 0.0) -> None:
        self.scenario = scenario
        self.send = send
        self.pin = pin
        self.t0 = t0          # host monotonic time of scenario t = 0
        self.opts = opts or AcOptions()
        self.batch_s = batch_ms / 1000
        self.lead_s = lead_s  # start the stream this long before scenario t = 0
        self.sent = 0

    async def run(self) -> None:
        # batch_ms 0 (the default): each edge goes out at its true crossing time, as soon as the
        # host loop wakes (about 1 ms later at most on an idle host), the way an MCU's GPIO IRQ
        # has it at once; batch_ms > 0 sends what is due every batch_ms (coarser, cheaper).
        sc = self.scenario
        it = edge_times(lambda t: sc.value("hz", t), sc.duration + 1.0, self.opts, t_start=-self.lead_s)
        pending: list[int] = []
        nxt = next(it, None)
        while nxt is not None:
            now = time.monotonic() - self.t0
            while nxt is not None and nxt[0] <= now:
                pending.append(int((self.t0 + nxt[1]) * 1e6))
                nxt = next(it, None)
            if pending:
                self.send(b"X %d %s\n" % (self.pin, b" ".join(b"%d" % t for t in pending)))
                self.sent += len(pending)
                pending.clear()
            if nxt is None:
                break
            if self.batch_s:
                await asyncio.sleep(self.batch_s)
            else:
                await asyncio.sleep(max(0.0, nxt[0] - (time.monotonic() - self.t0)))
