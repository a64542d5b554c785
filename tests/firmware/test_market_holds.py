"""Min run / min off across a power cut (docs/market.md "On the board"): which blocks economics
holds open and since when, and when blocks came on, are kept in market.cbor (the CRC wrapper);
after the reboot a block held open stays open (no extra thermal cycle) until its min off has
run, by the board's own count while the clock is unknown, by the real time once it is back;
min run counts from when the block really came on, not from the first decision."""
from __future__ import annotations

from agent import market as M
from agent.features import market as feat
from agent.market import Market

T0 = 1796083200
BL = [{"name": "a", "miners": 1, "kw_per_miner": 100.0, "strike_usd_mwh": 50.0, "min_run_s": 300, "min_off_s": 600},
      {"name": "b", "miners": 1, "kw_per_miner": 100.0, "strike_usd_mwh": 50.0}]


class J:
    def __init__(self):
        self.recs = []

    def append(self, k, d):
        self.recs.append((k, d))


class Ctrl:
    closed_mask = 0b11


class A:
    def __init__(self, t):
        self.cfg = {"blocks": BL, "trip": {}, "market": {}}
        self.journal, self.ctrl, self.errors = J(), Ctrl(), {}
        self.market, self.econ_off, self.t = None, 0, t

    def count(self, w):
        self.errors[w] = self.errors.get(w, 0) + 1

    def now_unix(self):
        return self.t

    def decide(self, now, sample):
        pass


def boot(tmp_path, t):
    a = A(t)
    f = feat.Feature(a)
    if f.m.boot_hold:
        f.step()
    return a, f


def test_min_run_and_min_off_survive_a_power_cut(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, f = boot(tmp_path, None)
    iv = [[T0, T0 + 500, "p", 60.0], [T0 + 500, T0 + 7200, "p", 10.0]]
    assert f.schedule(1, iv, "serial") is None
    a.t = T0 + 10
    f.step()  # a came on (for economics) at T0+10: held by min run until T0+310; b sheds
    assert a.econ_off == 0b10 and f.m.why[0] == 3
    a.t = T0 + 100
    f.step()
    assert f.dirty and f.save()
    # power cut at T0+100, the time back at T0+150: min run still counts from T0+10
    a, f = boot(tmp_path, None)
    assert a.econ_off == 0  # b had no min off: no hold without the clock
    f.step()
    a.t = T0 + 150
    f.step()
    assert a.econ_off == 0b10 and f.m.why[0] == 3
    a.t = T0 + 309
    f.step()
    assert a.econ_off == 0b10
    a.t = T0 + 310
    f.step()
    assert a.econ_off == 0b11  # not at T0+450 (150 + 300): the min run survived the cut
    a.t = T0 + 400
    f.step()
    assert f.save()
    # power cut at T0+400: a is held open through the reboot (its min off runs to T0+910)
    a, f = boot(tmp_path, None)
    assert a.econ_off == 0b01 and f.m.boot_hold and f.status()["off"] == 1
    f.step()
    assert a.econ_off == 0b01  # clock unknown, min off not run by the board's count: still open
    a.t = T0 + 700  # the price is 10 now, but min off holds until T0+910
    f.step()
    assert a.econ_off == 0b01 and f.m.why[0] == 4
    a.t = T0 + 910
    f.step()
    assert a.econ_off == 0
    ev = [d for k, d in a.journal.recs if k == "market" and d.get("ev") == "restore"]
    assert ev and ev[-1]["block"] == "a" and ev[-1]["why"] == "price_at_or_below_strike"


def test_without_the_clock_a_boot_hold_ends_when_min_off_has_run_since_boot():
    m = Market({"blocks": BL, "trip": {}, "market": {}})
    m.set_holds([0b11, 0, [T0 - M.EPOCH, T0 - M.EPOCH], [0, 0]])
    assert m.off == 0b01 and m.boot_hold  # b has no min off: not held
    assert m.step(None, 0b11) == 0b01
    m.boot_release(599)
    assert m.off == 0b01 and m.nev == 0
    m.boot_release(600)
    assert m.off == 0 and not m.boot_hold and m.event(0)["why"] == "clock_unknown"
    assert m.step(None, 0b11) == 0
