"""Settings integrity (agent/integrity.py): every single-bit flip of a real provisioned
/config.cbor, /keys.cbor and /state.cbor is refused.

The bulk check runs the board's own acceptance chain (integrity check, CBOR, config validation,
meter-map validation: the very pure modules agent/boot.py runs) under CPython for every bit; a
sample of the flips then goes end-to-end through agent/boot.py under the real MicroPython.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from agent import cbor, config, integrity, meter_check
from gridshed import siteconfig

ROOT = Path(__file__).resolve().parents[2]


def provisioned_config() -> bytes:
    return siteconfig.config_bytes(siteconfig.load_site(ROOT / "scenarios" / "demo-site.toml", device_id="ctl-1"))


def board_accepts_config(raw: bytes):
    """The config object agent/boot.py would run with, or None if the board refuses the bytes."""
    body, why = integrity.unwrap(raw)
    if why is not None:
        return None
    try:
        cfg = cbor.loads(bytes(body))
    except ValueError:
        return None
    if config.validate(cfg) or meter_check.validate(cfg["meter"]["map"]):
        return None
    return cfg


def flips(raw: bytes):
    for i in range(len(raw) * 8):
        b = bytearray(raw)
        b[i // 8] ^= 1 << (i % 8)
        yield i, bytes(b)


def test_every_bit_flip_of_a_provisioned_config_is_refused():
    raw = provisioned_config()
    good = board_accepts_config(raw)
    assert good is not None and good["device"] == "ctl-1"
    accepted = [i for i, b in flips(raw) if board_accepts_config(b) is not None]
    reasons = {" ".join(integrity.check(b).split()[:2]) for _, b in flips(raw)}
    print(f"\nconfig.cbor: {len(raw)} bytes, {len(raw) * 8} single-bit flips, accepted: {len(accepted)}; reasons {sorted(reasons)}")
    assert accepted == []
    # without the wrapper the same flips would get through (the defect this check closes)
    body = bytes(integrity.unwrap(raw)[0])
    through = 0
    for i in range(0, len(body) * 8, 7):
        b = bytearray(body)
        b[i // 8] ^= 1 << (i % 8)
        try:
            c = cbor.loads(bytes(b))
        except ValueError:
            continue
        if isinstance(c, dict) and not config.validate(c) and not meter_check.validate(c["meter"]["map"]) and c != good:
            through += 1
    assert through > 0, "the unwrapped control case should let some flips through"


def test_every_bit_flip_of_keys_and_state_is_refused():
    keys = siteconfig.keys_bytes({b"\x01" * 8: bytes(range(32))})
    state = integrity.wrap(cbor.dumps({"v": 1, "tripped": True, "reason": 1, "shed_mask": 3,
                                       "min_off_left_ms": 60000, "released": False, "armed": True,
                                       "cmd_shed": False, "lockout": False, "shed_kw": None}))
    for name, raw in (("keys", keys), ("state", state)):
        assert integrity.check(raw) is None
        bad = [i for i, b in flips(raw) if integrity.check(b) is None]
        assert bad == [], name
    # truncation, appended bytes, an old unwrapped file, another algorithm byte
    assert "short" in integrity.check(keys[:5])
    assert "length" in integrity.check(keys[:-1])
    assert "length" in integrity.check(keys + b"\x00")
    flipped_crc = bytearray(keys)
    flipped_crc[-1] ^= 1
    assert "CRC" in integrity.check(bytes(flipped_crc))
    assert "header" in integrity.check(cbor.dumps({"v": 1}) + b"\x00" * 10)
    other = bytearray(keys)
    other[4] = 0x48
    assert "algorithm" in integrity.check(bytes(other))
    try:
        siteconfig.read_settings(state[:-2])
    except ValueError as e:
        assert "length" in str(e)
    else:
        raise AssertionError("a cut file was read")


def test_sampled_flips_end_to_end_under_micropython(mp, tmp_path):
    """agent/boot.py itself (real MicroPython): the unflipped file boots; each sampled flip is
    refused with a reason naming the integrity check; the same module reads the host's bytes."""
    raw = provisioned_config()
    rng = random.Random(12)
    picks = sorted(rng.sample(range(len(raw) * 8), 40)) + [0, 39, len(raw) * 8 - 1]
    for n, i in enumerate([None] + picks):
        b = bytearray(raw)
        if i is not None:
            b[i // 8] ^= 1 << (i % 8)
        (tmp_path / f"c{n}.cbor").write_bytes(bytes(b))
    res = mp.run(f"""
        import gc
        import json
        import agent.boot as boot
        out = []
        for n in range({len(picks) + 1}):
            boot.CONFIG_PATH = "c%d.cbor" % n
            cfg, errors, chash = boot.load_config()
            out.append([cfg is not None and not errors, errors[:1]])
            cfg = errors = None
            gc.collect()  # each load compiles the validator from source: a heap in one piece for the next
        print(json.dumps(out))
    """, cwd=tmp_path, heapsize="80wK")
    out = json.loads(res.out.strip().splitlines()[-1])
    assert out[0] == [True, []], out[0]
    for ok, errs in out[1:]:
        assert not ok and "integrity" in errs[0], errs
    print(f"\n{len(picks)} sampled flips refused by agent/boot.py under MicroPython")
