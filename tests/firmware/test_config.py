"""Every refusal of agent/config.py `validate` (the board's boot gate and the host's check),
one table row each, under CPython and under the real MicroPython unix port.

Each row mutates a valid normalized config (the demo site) and names the exact error list the
validator must return: the path, the problem and the value as the technician reads them on the
console. The same table runs through both interpreters; their answers must be identical.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import config, config_optional
from gridshed import siteconfig

ROOT = Path(__file__).resolve().parents[2]

# the mutation language, run as-is under both interpreters: ops on a config dict
MUTATE = r'''
def _walk(cfg, path):
    keys = path.split(".")
    d = cfg
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    last = keys[-1]
    return d, int(last) if isinstance(d, list) else last


def mutate(cfg, ops):
    for op in ops:
        if op[0] == "root":
            return op[1]
        d, k = _walk(cfg, op[1])
        if op[0] == "del":
            del d[k]
        else:
            d[k] = op[2]
    return cfg
'''
_ns: dict = {}
exec(MUTATE, _ns)
mutate = _ns["mutate"]


def S(path, value):  # set
    return ("set", path, value)


def D(path):  # delete
    return ("del", path)


STAGE = {"pickup_hz": 59.5, "delay_ms": 0, "blocks": [0]}

# (id, ops, exact error list)
ROWS = [
    ("not-a-map", [("root", [1, 2])], ["config: must be a map"]),
    ("version", [S("v", 2)], ["v: config version 2 not supported (want 1)"]),
    ("site-empty", [S("site", "")], ["site: must be a non-empty string of at most 64 characters"]),
    ("device-too-long", [S("device", "d" * 65)], ["device: must be a non-empty string of at most 64 characters"]),
    ("board-not-str", [S("board", 7)], ["board: must be a non-empty string of at most 64 characters"]),
    ("nominal", [S("nominal_hz", 55)], ["nominal_hz: must be 50 or 60, got 55"]),
    ("section-missing", [D("failsafe")], ["failsafe: section missing or not a table"]),
    ("section-not-table", [S("journal", 3)], ["journal: section missing or not a table"]),
    ("key-missing", [D("meter.baud")], ["meter.baud: missing"]),
    ("choice", [S("meter.parity", "X")], ["meter.parity: must be one of N/E/O, got 'X'"]),
    ("bool", [S("trip.release_required", 1)], ["trip.release_required: must be true or false, got 1"]),
    ("string", [S("meter.host", 5)], ["meter.host: must be a string, got 5"]),
    ("whole-number", [S("meter.unit", 1.5)], ["meter.unit: must be a whole number, got 1.5"]),
    ("whole-number-bool", [S("trip.samples", True)], ["trip.samples: must be a whole number, got True"]),
    ("number", [S("trip.min_off_s", "8")], ["trip.min_off_s: must be a number, got '8'"]),
    ("range-int", [S("meter.poll_ms", 5)], ["meter.poll_ms: 5 is outside 10..10000"]),
    ("range-float", [S("trip.deadband_hz", 1.5)], ["trip.deadband_hz: 1.5 is outside 0.0..1.0"]),
    ("pin-kind", [S("signals.dry_contact_pin", "GPIO4")], ["signals.dry_contact_pin: must be a whole number, got 'GPIO4'"]),
    ("pin-range", [S("signals.dry_contact_pin", 300)], ["signals.dry_contact_pin: 300 is outside 0..255"]),
    ("unknown-key", [S("trip.pickup", 59.7)], ["trip.pickup: unknown key"]),
    ("optional-not-table", [S("mqtt", True)], ["mqtt: must be a table"]),
    ("optional-unknown-key", [S("udp", {"enabled": True, "prot": 4700})], ["udp.prot: unknown key"]),
    ("optional-list", [S("miners", {"hosts": "10.0.0.2"})], ["miners.hosts: must be a list, got '10.0.0.2'"]),
    ("optional-range", [S("mqtt", {"keepalive_s": 2})], ["mqtt.keepalive_s: 2 is outside 5..3600"]),
    ("mqtt-cert-needs-tls", [S("mqtt", {"auth": "cert"})],
     ['mqtt.auth: "cert" (a client certificate) needs mqtt.tls = true']),
    ("pickup-above-restore", [S("trip.pickup_hz", 59.95)],
     ["trip.pickup_hz: must be below trip.restore_hz (59.95 >= 59.9)"]),
    ("pickup-implausible", [S("trip.pickup_hz", 45.0)],
     ["trip.pickup_hz: 45.0 is not a plausible under-frequency pickup for a 60 Hz grid (57.0..60 Hz)"]),
    # 50 Hz settings on a 60 Hz site (and the reverse): outside nominal - 3 Hz
    ("other-grid-settings", [S("trip.pickup_hz", 49.7), S("trip.restore_hz", 49.9)],
     ["trip.pickup_hz: 49.7 is not a plausible under-frequency pickup for a 60 Hz grid (57.0..60 Hz)",
      "trip.restore_hz: 49.9 is more than 3.0 Hz below the 60 Hz nominal"]),
    ("other-grid-settings-50", [S("nominal_hz", 50)],
     ["trip.pickup_hz: 59.7 is not a plausible under-frequency pickup for a 50 Hz grid (47.0..50 Hz)",
      "trip.restore_hz: 59.9 is above nominal + 1 Hz"]),
    ("restore-above-nominal", [S("trip.restore_hz", 61.5)], ["trip.restore_hz: 61.5 is above nominal + 1 Hz"]),
    ("stages-not-list", [S("trip.stages", {"a": 1})], ["trip.stages: must be a list of 1 to 4 stages"]),
    ("stages-too-many", [S("trip.stages", [STAGE] * 5)], ["trip.stages: must be a list of 1 to 4 stages"]),
    ("stage-bad", [S("trip.stages", [STAGE, dict(STAGE, blocks=[4])])],
     ["trip.stages[1]: need pickup_hz (<= restore_hz - deadband_hz) or rocof_hz_s (-20..0), "
      "delay_ms 0..600000, blocks = [0..3]; other keys: below_hz, deadband_hz_s, name"]),
    ("stage-both-triggers", [S("trip.stages", [dict(STAGE, rocof_hz_s=-1.0)])],
     ["trip.stages[0]: need pickup_hz (<= restore_hz - deadband_hz) or rocof_hz_s (-20..0), "
      "delay_ms 0..600000, blocks = [0..3]; other keys: below_hz, deadband_hz_s, name"]),
    ("authority-trusted", [S("authority", {"trusted": ["udp"]})],
     ["authority.trusted: 'udp' is not an unauthenticated channel (modbus, dry_contact)"]),
    ("authority-restore-all", [S("authority", {"restore_all": ["0042", "XYZ"]})],
     ['authority.restore_all: \'XYZ\' is not a key id in hex or "*"']),
    # not lists: refused, never a crash of the checks that read the items (a TypeError at boot)
    ("authority-not-lists", [S("authority", {"trusted": 5, "restore_all": 1.5})],
     ["authority.trusted: must be a list, got 5", "authority.restore_all: must be a list, got 1.5"]),
    ("modbus-server-allow-not-list", [S("modbus_server", {"allow": 3})],
     ["modbus_server.allow: must be a list, got 3"]),
    ("modbus-server-address", [S("modbus_server", {"allow": ["10.0.0.300"]})],
     ["modbus_server: '10.0.0.300' is not an IPv4 address (bind, allow, master)"]),
    ("dnp3-address", [S("dnp3", {"allow": ["127.0.0.1", "1.2.3"]})],
     ["dnp3: '1.2.3' is not an IPv4 address (bind, allow)"]),
    ("dnp3-masters", [S("dnp3", {"address": 10, "masters": [1, 10, 65535, True]})],
     ["dnp3.masters: 10 is not a master link address (0..65519, not the outstation's)",
      "dnp3.masters: 65535 is not a master link address (0..65519, not the outstation's)",
      "dnp3.masters: True is not a master link address (0..65519, not the outstation's)"]),
    ("dnp3-port", [S("dnp3", {"port": 0})], ["dnp3.port: 0 is outside 1..65535"]),
    ("dnp3-unsol-serial", [S("dnp3", {"transport": "serial", "unsolicited": True})],
     ['dnp3.unsolicited: TCP only (transport = "serial" has one master polling the line)']),
    ("dnp3-uart-taken", [S("dnp3", {"transport": "serial"}), S("modbus_server", {"transport": "rtu"})],
     ["dnp3.transport: the utility UART already serves Modbus RTU (modbus_server.transport)"]),
    ("dry-contact-no-pin", [S("signals.dry_contact", True)], ["signals.dry_contact: the board has no dry-contact input pin"]),
    ("map-missing", [D("meter.map")], ["meter.map: missing meter register map"]),
    ("map-no-hz", [D("meter.map.quantities.hz")], ["meter.map: quantity 'hz' missing"]),
    ("blocks-empty", [S("blocks", [])], ["blocks: at least one relay block is required"]),
    ("blocks-too-many", [S("blocks", [{"name": "b%d" % i, "miners": 0, "kw_per_miner": 0.0, "priority": 1,
                                       "active": 1, "pins": [i]} for i in range(17)])],
     ["blocks: at most 16 blocks"]),
    ("block-not-table", [S("blocks.1", "row-b")], ["blocks[1]: must be a table"]),
    ("block-key-missing", [D("blocks.0.priority")], ["blocks[0].priority: missing"]),
    ("block-value", [S("blocks.2.active", 2)], ["blocks[2].active: 2 is outside 0..1"]),
    ("block-no-pins", [S("blocks.0.pins", [])], ["blocks[0].pins: at least one relay pin is required"]),
    ("block-bad-pin", [S("blocks.1.pins", [-1])], ["blocks[1].pins: bad pin -1"]),
    ("block-pin-reused", [S("blocks.3.pins", [12])], ["blocks[3].pins: pin 12 already used by blocks[1]"]),
]

# paths refused by _check: every kind of SCHEMA/OPTIONAL/BLOCK_SCHEMA has a row above
KINDS_COVERED = {"choice", "b", "s", "i", "f", "p", "l"}


def base() -> dict:
    cfg = siteconfig.load_site(ROOT / "scenarios" / "demo-site.toml")
    assert config.validate(cfg) == []
    return json.loads(json.dumps(cfg))


def cpython_answers() -> dict[str, list[str]]:
    out = {}
    for rid, ops, _ in ROWS:
        out[rid] = config.validate(mutate(base(), ops))
    return out


@pytest.mark.parametrize("rid,ops,want", ROWS, ids=[r[0] for r in ROWS])
def test_refusal_cpython(rid, ops, want):
    assert config.validate(mutate(base(), ops)) == want


def test_every_schema_kind_has_a_row():
    kinds = set()
    for table in list(config.SCHEMA.values()) + list(config_optional.OPTIONAL.values()) + [config.BLOCK_SCHEMA]:
        for _, kind, _, _ in table.values():
            kinds.add("choice" if isinstance(kind, tuple) else kind)
    assert kinds == KINDS_COVERED, kinds


def test_every_refusal_message_of_validate_has_a_row():
    """Each refusal format string in config.py's source and config_optional.py's (the checks it
    loads for the feature sections and trip stages; every errors.append and the early return)
    matches an error some row expects: a new refusal without a row fails here."""
    import re

    src = "".join((ROOT / "firmware" / "agent" / f).read_text() for f in ("config.py", "config_optional.py"))
    fmts = [f.replace('\\"', '"') for f in
            re.findall(r'(?:errors\.append\(|return \[)(?:p \+ )?"((?:[^"\\]|\\.)+)"', src)]
    assert len(fmts) >= 28, fmts
    produced = [e for _, _, want in ROWS for e in want]
    missing = []
    for f in fmts:
        pat = re.escape(f)
        for spec in (r"%r", r"%s", r"%d"):
            pat = pat.replace(re.escape(spec), ".+")
        if not any(re.search(pat, e) for e in produced):  # a literal split over lines: its first part
            missing.append(f)
    assert missing == [], missing


def test_same_refusals_under_micropython(mp):
    """The whole table through the real unix port (the board's own check at boot)."""
    rows = [[rid, ops] for rid, ops, _ in ROWS]
    code = MUTATE + "\nimport json\nfrom agent import config\nbase = %r\nrows = json.loads(%r)\nout = {}\n" \
        "for rid, ops in rows:\n    out[rid] = config.validate(mutate(json.loads(base), ops))\n" \
        "print(json.dumps(out))\n" % (json.dumps(base()), json.dumps(rows))
    res = mp.run(code, heapsize="256k")
    got = json.loads(res.out.strip().splitlines()[-1])
    want = {rid: w for rid, _, w in ROWS}
    assert got == want
    assert got == cpython_answers()


def test_feature_checks_load_only_for_a_site_that_has_them(board):
    """agent/config_optional.py is on demand (tests/test_static.py ON_DEMAND): the board's boot
    check (the built modules, the real unix port) loads it for a config with a feature section
    or trip stages, and never for a site without them (the demo site: core sections, blocks,
    uart), whatever its answer."""
    plain = base()
    cases = {"plain": plain, "mqtt": dict(plain, mqtt={"enabled": False}),
             "stages": json.loads(json.dumps(plain)), "bad_udp": dict(plain, udp={"port": 0})}
    cases["stages"]["trip"]["stages"] = [{"pickup_hz": 59.7, "blocks": [0]}]
    res = board.run("""
        import json, sys
        from agent import config
        from agent.base import unload
        out = {}
        for name, cfg in json.loads(%r).items():
            unload("agent.config_optional")  # as agent/boot.py does after the check
            errors = config.validate(cfg)
            out[name] = ["agent.config_optional" in sys.modules, errors]
        print(json.dumps(out))
    """ % json.dumps(cases), heapsize="256k")
    got = json.loads(res.out.strip().splitlines()[-1])
    assert got == {"plain": [False, []], "mqtt": [True, []], "stages": [True, []],
                   "bad_udp": [True, ["udp.port: 0 is outside 1..65535"]]}, got


def test_a_check_that_fails_refuses_the_config_at_boot(board, tmp_path):
    """The board's boot (agent/boot.py load_config, the built modules, the real unix port): a
    validator that raises on a value it did not foresee (three such holes were found by the fuzz
    below: [authority] trusted = 5, [market] obligation_hours = 5, a meter map type = [...])
    gives a refusal with the reason, not a TypeError out of the boot (main.py: 'agent crashed',
    a reset every 5 s, no @status, no config_refused record). The fault is injected in the real
    module: its validate replaced by one that raises."""
    from agent import cbor, integrity

    (tmp_path / "config.cbor").write_bytes(integrity.wrap(cbor.dumps(base())))
    res = board.run("""
        import json
        from agent import config
        def boom(cfg):
            raise TypeError("'int' object is not iterable")
        config.validate = boom
        from agent import boot
        cfg, errors, chash = boot.load_config()
        import sys
        print(json.dumps([cfg is not None, errors, len(chash), [m for m in ("agent.config", "agent.meter_check") if m in sys.modules]]))
    """, heapsize="256k", cwd=tmp_path)
    got = json.loads(res.out.strip().splitlines()[-1])
    assert got == [True, ["/config.cbor: the check failed (TypeError(\"'int' object is not iterable\",)): "
                          "refused, provision the board again"], 16, []], (got, res.out, res.err)


def test_validate_never_raises_on_mangled_sections():
    """Fuzz (CPython, seeded, ~2 s): feature sections, trip stages, [market], [dnp3], blocks
    and the meter map mangled with values of every type; validate() and the meter map check
    return refusals and never raise (before: TypeErrors in config_optional.check_authority /
    check_links, market_check, meter_check on a list as a register type)."""
    import copy
    import random

    from agent import meter_check

    demo = base()
    demo.update({"modbus_server": {"enabled": True, "port": 1502, "allow": ["10.0.0.1"]},
                 "authority": {"trusted": ["modbus"], "restore_all": ["*"]}, "udp": {"port": 4700},
                 "mqtt": {"host": "10.0.0.5"}, "override": {"pin": 5}, "miners": {"hosts": ["10.0.0.9"]},
                 "dnp3": {"enabled": True, "address": 10, "masters": [1], "allow": ["10.0.0.5"]}})
    demo["trip"]["stages"] = [{"pickup_hz": 59.7, "blocks": [0, 1]}, {"pickup_hz": 59.5, "blocks": [2, 3]}]
    market = json.loads(json.dumps(siteconfig.load_site(ROOT / "scenarios" / "market-site.toml")))
    assert config.validate(demo) == [] and config.validate(market) == []
    vals = [None, 0, -1, 5, 1.5, float("nan"), 2 ** 70, "", "x", [], [5], [None], [[1]], {}, {"a": 1}, True]
    rng = random.Random(5)
    for n in range(3000):
        c = copy.deepcopy(demo if n % 2 else market)
        for _ in range(rng.randint(1, 3)):
            sec = rng.choice([k for k in c if k not in ("v", "site", "device", "board", "nominal_hz")])
            d = c[sec]
            if sec == "meter" and isinstance(d, dict) and rng.random() < 0.5:
                q = d.get("map") if isinstance(d.get("map"), dict) else {}
                q = q.get("quantities") if isinstance(q.get("quantities"), dict) else {}
                d = q.get(rng.choice(["hz", "kw"]))
            elif sec == "trip" and isinstance(d, dict) and isinstance(d.get("stages"), list) and d["stages"] \
                    and rng.random() < 0.5:
                d = rng.choice(d["stages"])
            elif isinstance(d, list) and d:
                d = rng.choice(d)
            if rng.random() < 0.1:
                c[sec] = rng.choice(vals)
            elif isinstance(d, dict):
                d[rng.choice(list(d) + ["x"])] = rng.choice(vals)
        errs = config.validate(c)
        if not errs:
            meter_check.validate(c["meter"]["map"])


def test_boot_check_leaves_no_checker_resident(board, tmp_path):
    """agent/boot.py load_config frees the validator and every check it loaded, the market's
    included (agent/market_check.py stayed resident on every market site: boot freed the DNP3,
    feature and meter map checks, not it)."""
    from agent import cbor, integrity

    cfg = json.loads(json.dumps(siteconfig.load_site(ROOT / "scenarios" / "market-site.toml")))
    cfg["dnp3"] = {"enabled": True}
    (tmp_path / "config.cbor").write_bytes(integrity.wrap(cbor.dumps(cfg)))
    res = board.run("""
        import json, sys
        from agent import boot
        cfg, errors, chash = boot.load_config()
        print(json.dumps([errors, sorted(m for m in sys.modules if m.endswith("_check") or m in ("agent.config", "agent.config_optional"))]))
    """, heapsize="256k", cwd=tmp_path)
    got = json.loads(res.out.strip().splitlines()[-1])
    assert got == [[], []], (got, res.err)
