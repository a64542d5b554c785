"""gridshed.exporter without a broker: what it accepts from the fleet topics, what it drops and
counts, the available figure's sources, Home Assistant configs, and CLI usage errors.
(tests/e2e/test_exporter.py runs it against a real agent and Mosquitto.)"""
from __future__ import annotations

import json
import math
import random
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gridshed.cli import main
from gridshed.exporter import BAD_REASONS, STATES, Fleet, FleetCollector, blocks_from_site, ha_discovery

ROOT = Path(__file__).resolve().parents[2]
T = "gridshed/s1/d1/telemetry"
S = "gridshed/s1/d1/state"


def state(**kw) -> bytes:
    base = {"dev": "d1", "online": True, "state": "normal", "armed": True, "shed": False, "held": 0, "mask": 15,
            "seq": None, "cmd": None, "acc": 0, "ref": 0, "nonce": "00" * 8, "time": False}
    base.update(kw)
    return json.dumps(base).encode()


def scrape(f: Fleet) -> dict:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetCollector(f))
    text = generate_latest(reg).decode()
    return {(s.name, frozenset(s.labels.items())): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples}


def k(name: str, **labels: str):
    return name, frozenset({"site": "s1", "device": "d1", **labels}.items())


VALUES = [None, True, False, 0, -1, 1, 2 ** 40, 1.5, -0.0, 1e308, "", "normal", "tripped", "x", [], [1], {},
          {"a": 1}, "\u0000", "é"]
TOPICS = [T, S, "gridshed/s1/d2/state", "gridshed/s1/d1/cmd", "gridshed/s1/telemetry", "x/s1/d1/state",
          "gridshed/s+1/d1/state", "gridshed//d1/state"]
FUZZED = Fleet()  # one fleet across every case (state carried over, as on a broker); scraped after


def mutations(rng: random.Random, n: int):
    """Valid states and telemetry with a field's value swapped for another type, or their bytes
    flipped, cut or spliced; plus raw random bytes."""
    good = [state(), state(mask=0, state="tripped"), b'{"t": null, "hz": 59.98, "kw": 812.4, "mask": 15, "state": "normal"}',
            b'{"dev": "d1", "online": false, "mac": {}}']
    keys = ["dev", "online", "state", "armed", "shed", "held", "mask", "acc", "ref", "time", "hz", "kw", "t",
            "available_kw", "avail_kw", "integrity"]
    for _ in range(n):
        base = rng.choice(good)
        r = rng.random()
        if r < 0.45:
            obj = json.loads(base)
            for _ in range(rng.randint(1, 3)):
                obj[rng.choice(keys)] = rng.choice(VALUES)
            payload = json.dumps(obj).encode()
        elif r < 0.9:
            b = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                op, i = rng.random(), rng.randrange(len(b))
                if op < 0.4:
                    b[i] = rng.randrange(256)
                elif op < 0.7:
                    del b[i:i + rng.randint(1, 8)]
                else:
                    b[i:i] = rng.choice([b"{", b"}", b"[", b'"', b",", b"NaN", b"1e999", b"\\u", b"\xff"])
                if not b:
                    break
            payload = bytes(b)
        else:
            payload = rng.randbytes(rng.randint(0, 64))
        yield rng.choice(TOPICS), payload


def test_fuzz_never_raises_and_keeps_only_finite_typed_values():
    rng = random.Random(19)
    accepted = 0
    for topic, payload in mutations(rng, 4000):
        bad = sum(FUZZED.bad.values())
        why = FUZZED.on_message(topic, payload)
        assert why is None or why in BAD_REASONS, why
        assert sum(FUZZED.bad.values()) == bad + (0 if why is None else 1)
        accepted += why is None
        for d in FUZZED.devices.values():
            for v in (d.hz, d.kw, d.board_available_kw):
                assert v is None or (isinstance(v, float) and math.isfinite(v)), (topic, payload)
            assert d.state is None or d.state in STATES
            assert d.mask is None or (isinstance(d.mask, int) and 0 <= d.mask < 2 ** 31)
            assert d.online is None or isinstance(d.online, bool)
    # the mix reaches both sides: some accepted, and most reasons seen
    assert accepted > 200
    assert {r for r, n in FUZZED.bad.items() if n} >= {"topic", "encoding", "json", "field", "device"}


def test_fuzzed_fleet_scrapes():
    m = scrape(FUZZED)  # whatever the fuzz left renders and parses
    assert sum(v for (n, _), v in m.items() if n == "gridshed_exporter_bad_messages_total") == sum(FUZZED.bad.values())


def test_bad_messages_by_reason():
    f = Fleet(sites=["s1"])
    cases = [("gridshed/s2/d1/state", state(), "topic"), ("gridshed/s1/d1/status", b"{}", "topic"),
             (T, b"\xc3\x28", "encoding"), (T, b"{", "json"), (T, b"1", "not-object"),
             (T, b'{"hz": true}', "field"), (T, b'{"hz": NaN}', "field"), (T, b'{"mask": 1.5}', "field"),
             (S, state(dev="d2"), "device"), (S, state(online=1), "field"), (S, state(state="boom"), "field"),
             (S, state(mask=-3), "field"), (T, b'{"kw": 1, "pad": "' + b"x" * 5000 + b'"}', "oversize")]
    for topic, payload, why in cases:
        assert f.on_message(topic, payload) == why, (topic, payload[:40])
    assert not f.devices
    assert sum(f.bad.values()) == len(cases)


def test_trips_counted_on_transitions_only():
    f = Fleet()
    f.on_message(T, b'{"hz": 60.0, "kw": 300, "mask": 15, "state": "normal"}')
    for s in ("pickup", "tripped", "tripped", "restore_hold", "restoring", "normal", "tripped"):
        assert f.on_message(T, json.dumps({"hz": 59.5, "kw": 0, "mask": 0, "state": s}).encode()) is None
    m = scrape(f)
    assert m[k("gridshed_trips_total")] == 2.0
    assert m[k("gridshed_state_changes_total")] == 6.0
    assert m[k("gridshed_state", state="tripped")] == 1.0 and m[k("gridshed_state", state="normal")] == 0.0


def test_available_sources():
    blocks = blocks_from_site(str(ROOT / "scenarios" / "demo-site.toml"))
    assert blocks == ("ctl-1", [132.0, 132.0, 105.0, 0.0])
    # config: the closed blocks' nameplate
    f = Fleet(blocks={"d1": blocks[1]})
    f.on_message(S, state(mask=0b0101))
    f.on_message(T, b'{"hz": 60.0, "kw": 812.5, "mask": 5, "state": "normal"}')
    m = scrape(f)
    assert m[k("gridshed_available_megawatts")] == 0.237 and m[k("gridshed_available_source", source="config")] == 1
    # meter: no config, the metered load while a block is closed
    g = Fleet()
    g.on_message(T, b'{"hz": 60.0, "kw": 812.5, "mask": 5, "state": "normal"}')
    assert scrape(g)[k("gridshed_available_megawatts")] == 0.8125
    # board: its own figure wins, under either name
    g.on_message(T, b'{"hz": 60.0, "kw": 812.5, "mask": 5, "state": "normal", "available_kw": 640}')
    m = scrape(g)
    assert m[k("gridshed_available_megawatts")] == 0.64 and m[k("gridshed_available_source", source="board")] == 1
    # disarmed or offline: nothing a trip would shed
    f.on_message(S, state(mask=5, armed=False, state="disarmed"))
    assert scrape(f)[k("gridshed_available_megawatts")] == 0.0
    g.on_message(S, b'{"dev": "d1", "online": false, "mac": {}}')
    m = scrape(g)
    assert m[k("gridshed_available_megawatts")] == 0.0 and m[k("gridshed_online")] == 0.0


def test_ha_discovery_names():
    f = Fleet()
    f.on_message("gridshed/site 1/dev.1/telemetry", b'{"hz": 50.0}')
    (d,) = f.devices.values()
    confs = ha_discovery(d, "ha")
    topics = [t for t, _ in confs]
    assert "ha/sensor/gridshed_site_1_dev_1/frequency/config" in topics
    assert all(c["state_topic"].startswith(("gridshed/site 1/dev.1/")) for _, c in confs)
    assert len({c["unique_id"] for _, c in confs}) == len(confs)


def test_cli_usage_errors(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        for argv, why in ((["--listen", "nope"], "bad --listen"), (["--listen", "1:99999"], "bad port"),
                          (["--site", "a/b"], "bad --site"), (["--broker", "h:0"], "bad port"),
                          (["--site-config", "/nonexistent.toml"], "nonexistent.toml"),
                          (["--listen", f"127.0.0.1:{busy}"], "cannot listen on")):
            assert main(["exporter", *argv]) == 2, argv
            err = capsys.readouterr().err
            assert why in err and "Traceback" not in err and err.count("\n") == 1, err
