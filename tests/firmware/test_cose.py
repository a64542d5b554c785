"""agent.cmd_cose (COSE_Mac0, HMAC 256/256) against pycose, under CPython and the real MicroPython."""
from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Mapping

import cbor2
import pytest
from pycose.algorithms import HMAC256, HMAC384
from pycose.headers import KID, Algorithm
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

from agent import cbor
from agent import cmd_cose as cose

KEY = bytes(range(32))
KID1 = b"utility-1"


def _thaw(x):
    """cbor2 >= 6 decodes arrays/maps inside tags as tuple/frozendict, which pycose 1.1 rejects
    (TimothyClaeys/pycose#141); give pycose the lists and dicts it expects."""
    if isinstance(x, (list, tuple)):
        return [_thaw(v) for v in x]
    if isinstance(x, Mapping):
        return {k: _thaw(v) for k, v in x.items()}
    return x


def pycose_decode(buf: bytes) -> Mac0Message:
    obj = cbor2.loads(buf)
    if isinstance(obj, cbor2.CBORTag):
        assert obj.tag == 17
        obj = obj.value
    return Mac0Message.from_cose_obj(_thaw(obj), True)


def pycose_make(payload: bytes, key: bytes = KEY, kid: bytes = KID1, kid_protected: bool = False,
                alg=HMAC256, external_aad: bytes = b"") -> bytes:
    phdr = {Algorithm: alg}
    uhdr = {}
    if kid_protected:
        phdr[KID] = kid
    else:
        uhdr[KID] = kid
    msg = Mac0Message(phdr=phdr, uhdr=uhdr, payload=payload, external_aad=external_aad)
    msg.key = SymmetricKey(k=key)
    return msg.encode()


def test_hmac_matches_stdlib() -> None:
    r = random.Random(2104)
    for n_key in (0, 1, 31, 32, 63, 64, 65, 200):
        for n_msg in (0, 1, 55, 56, 64, 1000):
            k, m = r.randbytes(n_key), r.randbytes(n_msg)
            assert cose.hmac_sha256(k, m) == hmac.new(k, m, hashlib.sha256).digest()


def test_compare_digest() -> None:
    a = bytes(range(32))
    assert cose.compare_digest(a, bytes(a))
    for i in range(32):
        b = bytearray(a)
        b[i] ^= 1
        assert not cose.compare_digest(a, bytes(b))
    assert not cose.compare_digest(a, a[:31])


def test_wire_layout() -> None:
    msg = cose.mac0_create(KEY, KID1, b"payload")
    obj = cbor.loads(msg)
    assert isinstance(obj, cbor.Tag) and obj.tag == 17
    prot, unprot, payload, tag = obj.value
    assert prot == b"\xa1\x01\x05" and cbor.loads(prot) == {1: 5}
    assert unprot == {4: KID1} and payload == b"payload"
    mac_structure = cbor2.dumps(["MAC0", prot, b"", b"payload"])
    assert tag == hmac.new(KEY, mac_structure, hashlib.sha256).digest()
    assert cbor.loads(cose.mac0_create(KEY, KID1, b"p", tagged=False))[0] == prot


def test_pycose_verifies_ours_cpython() -> None:
    for tagged in (True, False):
        msg = pycose_decode(cose.mac0_create(KEY, KID1, b"\x01hello", tagged=tagged))
        msg.key = SymmetricKey(k=KEY)
        assert msg.verify_tag()
        assert msg.payload == b"\x01hello" and msg.uhdr[KID] == KID1
        msg.key = SymmetricKey(k=bytes(32))
        assert not msg.verify_tag()


def test_ours_verifies_pycose_cpython() -> None:
    keys = {KID1: KEY}
    assert cose.mac0_verify(pycose_make(b"abc"), keys) == (KID1, b"abc")
    assert cose.mac0_verify(pycose_make(b"abc", kid_protected=True), keys) == (KID1, b"abc")
    # byte-identical to pycose for the same inputs (deterministic on both sides)
    assert pycose_make(b"abc") == cose.mac0_create(KEY, KID1, b"abc")


def _refusal(buf, keys=None) -> str:
    with pytest.raises(cose.CoseError) as ei:
        cose.mac0_verify(buf, keys if keys is not None else {KID1: KEY})
    return ei.value.reason


def _raw(prot, unprot, payload, tag, tagged=True) -> bytes:
    body = [prot, unprot, payload, tag]
    return cbor.dumps(cbor.Tag(17, body) if tagged else body)


def test_refusals_cpython() -> None:
    good = cose.mac0_create(KEY, KID1, b"pay")
    prot, unprot, payload, tag = cbor.loads(good).value
    assert _refusal(good, {}) == "unknown-kid"
    assert _refusal(good, {b"other": KEY}) == "unknown-kid"
    assert _refusal(good, {KID1: bytes(32)}) == "bad-mac"
    assert _refusal(cose.mac0_create(bytes(32), KID1, b"pay")) == "bad-mac"
    assert _refusal(pycose_make(b"pay", alg=HMAC384)) == "bad-alg"
    assert _refusal(_raw(prot, unprot, b"pay!", tag)) == "bad-mac"
    assert _refusal(_raw(prot, unprot, payload, tag[:-1] + bytes([tag[-1] ^ 1]))) == "bad-mac"
    # external_aad is empty by contract: a tag computed with another aad does not verify
    assert _refusal(pycose_make(b"pay", external_aad=b"x")) == "bad-mac"
    # protected header that merely re-encodes {1: 5} differently is still the MACed bytes
    assert _refusal(_raw(b"\xa1\x01\x18\x05", unprot, payload, tag)) == "bad-mac"
    assert _refusal(_raw(cbor.dumps({1: 6}), unprot, payload, tag)) == "bad-alg"
    assert _refusal(_raw(b"", unprot, payload, tag)) == "bad-alg"
    assert _refusal(_raw(cbor.dumps({1: True}), unprot, payload, tag)) == "bad-alg"
    assert _refusal(_raw(b"\xa0", {4: KID1, 1: 5}, payload, tag)) == "bad-alg"
    for bad in (
        b"", b"\x00", good[:-1], good + b"\x00", cbor.dumps(cbor.Tag(18, cbor.loads(good).value)),
        _raw(prot, unprot, None, tag), _raw(prot, unprot, payload, tag[:16]),
        _raw(prot, unprot, payload, tag + b"\x00"), _raw(prot, [], payload, tag),
        _raw({1: 5}, unprot, payload, tag), _raw(b"\xff", unprot, payload, tag),
        _raw(b"\x81\x05", unprot, payload, tag), _raw(prot, {4: KID1, 1: 5}, payload, tag),
        _raw(prot, {4: "utility-1"}, payload, tag), _raw(cbor.dumps({1: 5, 2: [99]}), unprot, payload, tag),
        _raw(cbor.dumps({1: 5, 4: KID1}), unprot, payload, tag),
        cbor.dumps([prot, unprot, payload]), cbor.dumps([prot, unprot, payload, tag, b""]),
        b"\x84" * 4000, bytes(5000),
    ):
        assert _refusal(bad) == "malformed", bad.hex()
    assert _refusal(_raw(prot, {}, payload, tag)) == "unknown-kid"


def test_interop_under_micropython(mp, tmp_path) -> None:
    """pycose-made messages verify in MicroPython; MicroPython-made messages verify in pycose."""
    r = random.Random(9052)
    keys = {KID1: KEY, b"k2": r.randbytes(32), b"long": r.randbytes(24)}
    cases = []
    for i in range(40):
        kid = r.choice(sorted(keys))
        payload = r.randbytes(r.randrange(0, 120))
        good = pycose_make(payload, key=keys[kid], kid=kid, kid_protected=(i % 3 == 0))
        cases.append({"hex": good.hex(), "expect": "ok", "kid": kid.hex(), "payload": payload.hex()})
        forged = bytearray(good)
        forged[-1 - r.randrange(32)] ^= 1 << r.randrange(8)  # flip a bit of the tag
        cases.append({"hex": bytes(forged).hex(), "expect": "bad-mac"})
        wrong = pycose_make(payload, key=r.randbytes(32), kid=kid)
        cases.append({"hex": wrong.hex(), "expect": "bad-mac"})
        cases.append({"hex": pycose_make(payload, kid=b"nobody").hex(), "expect": "unknown-kid"})
        cases.append({"hex": good[: r.randrange(len(good))].hex(), "expect": "malformed"})
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    (tmp_path / "keys.json").write_text(json.dumps({k.hex(): v.hex() for k, v in keys.items()}))
    res = mp.run(
        """
        import json, binascii
        from agent import cmd_cose as cose
        u = binascii.unhexlify
        keys = {}
        kj = json.load(open('keys.json'))
        for k in kj:
            keys[u(k)] = u(kj[k])
        bad = n = 0
        for line in open('cases.jsonl'):
            c = json.loads(line)
            n += 1
            try:
                kid, payload = cose.mac0_verify(u(c['hex']), keys)
                got = 'ok'
                if kid != u(c['kid']) or payload != u(c['payload']):
                    got = 'wrong-content'
            except cose.CoseError as e:
                got = e.reason
            if got != c['expect']:
                bad += 1
                print('MISMATCH', c['expect'], got)
        print('checked', n, 'bad', bad)
        import gc; gc.collect()
        # and the other direction: messages made here, checked by pycose on the host
        for i in range(8):
            kid = b'k2' if i % 2 else b'utility-1'
            print('MSG', binascii.hexlify(cose.mac0_create(keys[kid], kid, bytes(range(i * 7)),
                                                           i % 3 != 0)).decode())
        """,
        heapsize="64k", cwd=tmp_path)
    assert f"checked {len(cases)} bad 0" in res.out, res.out
    msgs = [line.split()[1] for line in res.out.splitlines() if line.startswith("MSG ")]
    assert len(msgs) == 8
    for i, h in enumerate(msgs):
        kid = b"k2" if i % 2 else KID1
        m = pycose_decode(bytes.fromhex(h))
        assert m.uhdr[KID] == kid and m.payload == bytes(range(i * 7))
        m.key = SymmetricKey(k=keys[kid])
        assert m.verify_tag()
        m.key = SymmetricKey(k=keys[b"long"])
        assert not m.verify_tag()


def test_refusals_under_micropython(mp) -> None:
    """The hand-made refusal cases give the same reasons on the board's interpreter."""
    good = cose.mac0_create(KEY, KID1, b"pay")
    prot, unprot, payload, tag = cbor.loads(good).value
    cases = {
        "unknown-kid": [_raw(prot, {4: b"x"}, payload, tag), _raw(prot, {}, payload, tag)],
        "bad-mac": [cose.mac0_create(bytes(32), KID1, b"pay"), _raw(prot, unprot, b"pa", tag)],
        "bad-alg": [_raw(cbor.dumps({1: 6}), unprot, payload, tag), pycose_make(b"p", alg=HMAC384)],
        "malformed": [good[:-3], b"\xd1\x9b" + b"\xff" * 8, _raw(prot, unprot, None, tag),
                      _raw(prot, {4: KID1, 1: 5}, payload, tag), b"\x81" * 600 + b"\x00"],
    }
    flat = [(reason, m.hex()) for reason, ms in cases.items() for m in ms]
    res = mp.run(
        f"""
        from agent import cmd_cose as cose
        for reason, h in {flat!r}:
            try:
                cose.mac0_verify(bytes.fromhex(h), {{{KID1!r}: {KEY!r}}})
                print('ACCEPTED')
            except cose.CoseError as e:
                print(reason == e.reason, reason, e.reason)
        """)
    lines = res.out.splitlines()
    assert len(lines) == len(flat) and all(line.startswith("True") for line in lines), res.out
