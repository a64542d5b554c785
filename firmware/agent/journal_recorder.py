"""Disturbance recorder: a ring of the most recent meter samples, captured around an event.

Pure module (MicroPython and CPython). The ring is preallocated; add() runs in the control
loop at the poll rate and allocates nothing. trigger(ms) marks an event (t0); once post_s has
elapsed after t0, capture() returns a compact dict for the journal (kind "capture"), and
decode_capture() turns it back into samples (on the host or the board).

Capture record (fields of the journal body, besides n/t/ms/k):
  "v":   1 (layout version)
  "t0":  uptime ms of the trigger (same clock as the journal's "ms")
  "dt":  nominal poll interval, ms
  "pre": number of samples taken before t0
  "ms0": ms of the first sample relative to t0 (int, usually negative)
  "smp": bytes, SAMPLE_SIZE (10) bytes per sample, oldest first, big-endian:
         u16 dms   ms since the previous sample (0 for the first; saturates at 65535)
         u16 mhz   frequency in mHz (round(hz*1000)); 65535 = no reading (NaN or out of range)
         f32 kw    total active power, kW (float32 as stored; NaN = no reading)
         u16 mask  relay state, bit i = block i closed (energised)
Absolute sample time = t0 + ms0 + running sum of dms (exact unless a gap exceeded 65.5 s).
"""
import struct
from array import array

from agent.compat import const

SAMPLE_SIZE = const(10)
_FMT = ">HHfH"
HZ_NONE = const(0xFFFF)
# Sample times are kept modulo 2**30 (fits array('i'), never allocates, and is consistent with
# both tick periods: 2**30 on 32-bit ports, 2**62 on the 64-bit unix port). Windows are
# seconds long, far below the 12-day period.
_MASK = const(0x3FFFFFFF)
_HALF = const(0x20000000)
_PERIOD = const(0x40000000)


def _diff(a, b):
    d = (a - b) & _MASK
    return d - _PERIOD if d >= _HALF else d


def _zeros(code, n):
    a = array(code)
    for _ in range(n):
        a.append(0)
    return a


class Recorder:
    def __init__(self, pre_s=5.0, post_s=10.0, poll_ms=50):
        if poll_ms <= 0:
            poll_ms = 50
        self.poll_ms = int(poll_ms)
        self.pre_ms = int(pre_s * 1000)
        self.post_ms = int(post_s * 1000)
        n_pre = (self.pre_ms + self.poll_ms - 1) // self.poll_ms
        n_post = (self.post_ms + self.poll_ms - 1) // self.poll_ms
        self.cap = n_pre + n_post + 2
        self.ms = _zeros("i", self.cap)
        self.hz = _zeros("f", self.cap)
        self.kw = _zeros("f", self.cap)
        self.mask = _zeros("H", self.cap)
        self.head = 0  # next slot to write
        self.count = 0
        self.t0 = 0
        self.t0m = 0
        self.pending = False
        self.last_ms = 0
        self._left = 0  # samples of the capture in progress not yet handed out
        self._pos = 0
        self._part = 0

    @classmethod
    def from_config(cls, cfg):
        """From the normalized site config: section "capture" {"pre_s", "post_s"} and the
        meter poll interval."""
        c = cfg.get("capture") or {}
        return cls(c.get("pre_s", 5.0), c.get("post_s", 10.0),
                   (cfg.get("meter") or {}).get("poll_ms", 50))

    def add(self, ms, hz, kw, mask):
        """Record one sample. No allocation (values go straight into the arrays)."""
        i = self.head
        self.ms[i] = ms & _MASK
        self.hz[i] = hz
        self.kw[i] = kw
        self.mask[i] = mask
        i += 1
        if i == self.cap:
            i = 0
        self.head = i
        if self.count < self.cap:
            self.count += 1
        self.last_ms = ms

    def trigger(self, ms):
        """Mark an event at ms. False if a capture is already pending (it covers this one)."""
        if self.pending:
            return False
        self.t0 = ms
        self.t0m = ms & _MASK
        self.pending = True
        return True

    def ready(self, ms=None):
        if not self.pending:
            return False
        if self._left:
            return True
        if ms is None:
            ms = self.last_ms
        return _diff(ms & _MASK, self.t0m) >= self.post_ms

    def cancel(self):
        self.pending = False
        self._left = 0

    def capture(self, ms=None, max_samples=0):
        """The capture record once post_s has elapsed after the trigger, else None.

        Holds the samples from t0 - pre_s to t0 + post_s still in the ring (all of them when
        the poll rate is the configured one). With max_samples > 0 the window comes out as
        several records ("part" 0, 1, ...), one per call, each decodable on its own: the board
        writes one small record per tick instead of allocating the whole window at once.
        """
        if self._left == 0:
            if not self.ready(ms):
                return None
            t0 = self.t0m
            cap = self.cap
            start = (self.head - self.count) % cap
            first = -1
            n = 0
            for j in range(self.count):
                d = _diff(self.ms[(start + j) % cap], t0)
                if d < -self.pre_ms or d > self.post_ms:
                    continue
                if first < 0:
                    first = j
                n = j - first + 1
            self._pos = (start + first) % cap if n else 0
            self._left = n
            self._part = 0
            if n == 0:
                self.pending = False
                return None
        n = self._left if max_samples <= 0 or self._left < max_samples else max_samples
        t0 = self.t0m
        cap = self.cap
        out = bytearray(n * SAMPLE_SIZE)
        prev = None
        ms0 = 0
        pre = 0
        i = self._pos
        for j in range(n):
            m = self.ms[i]
            if prev is None:
                ms0 = _diff(m, t0)
                dms = 0
            else:
                dms = _diff(m, prev)
                if dms < 0:
                    dms = 0
                elif dms > 0xFFFF:
                    dms = 0xFFFF
            if _diff(m, t0) < 0:
                pre += 1
            prev = m
            hz = self.hz[i]
            if hz != hz or hz < 0 or hz >= 65.535:
                mhz = HZ_NONE
            else:
                mhz = int(hz * 1000 + 0.5)
            struct.pack_into(_FMT, out, j * SAMPLE_SIZE, dms, mhz, self.kw[i], self.mask[i])
            i += 1
            if i == cap:
                i = 0
        self._pos = i
        self._left -= n
        rec = {"v": 1, "t0": self.t0, "dt": self.poll_ms, "pre": pre, "ms0": ms0, "smp": out}
        if max_samples > 0:
            rec["part"] = self._part
        self._part += 1
        if self._left == 0:
            self.pending = False
        return rec

