"""agent.cmd_api (signed command policy) and gridshed.signing (host side).

CPython unit tests, then the same code under the real MicroPython: reboot persistence of the
seq high-water mark, and a seeded fuzz of 2000 hostile messages."""
from __future__ import annotations

import json
import random

import pytest

from agent import cbor, integrity
from agent import cmd_cose as cose
from agent.cmd_api import (COMMANDS, REASONS, CommandRefused, CommandVerifier, FileSeqStore,
                            MemorySeqStore)
from gridshed.errors import UserError
from gridshed.signing import SeqCounter, make_command, new_key

KEY = bytes(range(100, 132))
KID = b"util"
OTHER_KEY = bytes(range(32))
DEV, SITE = "dev-7", "site-a"
T0 = 1_800_000_000


def verifier(store=None, keys=None) -> CommandVerifier:
    return CommandVerifier(keys or {KID: KEY}, DEV, SITE, store if store is not None else MemorySeqStore())


def cmd(seq: int, name: str = "shed", dev: str | None = DEV, site: str | None = None,
        key: bytes = KEY, kid: bytes = KID, **kw) -> bytes:
    return make_command(key, kid, name, seq, target_device=dev, target_site=site, now=T0,
                        expires_s=kw.pop("expires_s", 60), **kw)


def signed(payload, key: bytes = KEY, kid: bytes = KID) -> bytes:
    """A correctly MACed message around an arbitrary payload (bytes or a CBOR-able value)."""
    if not isinstance(payload, bytes):
        payload = cbor.dumps(payload)
    return cose.mac0_create(key, kid, payload)


def refused(v: CommandVerifier, buf, now=None, nonce=None) -> str:
    with pytest.raises(CommandRefused) as ei:
        v.verify(buf, now, nonce)
    return ei.value.reason


# ------------------------------------------------------------------ CPython: policy

def test_accept_and_fields() -> None:
    v = verifier()
    got = v.verify(cmd(1, kw=250.5, blocks=["b1", 2]), now_unix=T0)
    assert got == {"cmd": "shed", "seq": 1, "exp": T0 + 60, "kid": KID, "dev": DEV,
                   "kw": 250.5, "blocks": ["b1", 2]}
    for i, name in enumerate(COMMANDS):  # (the board's trusted clock: T0; "time" needs its nonce)
        extra = {"t": T0, "nonce": b"n0nce123"} if name == "time" else {}
        if name == "schedule":  # the market schedule (docs/market.md): its id and intervals
            extra = {"schedule": {"sid": 3, "iv": [[T0, T0 + 900, "p", 42.5]]}}
        assert v.verify(cmd(10 + i, name, dev=None, site=SITE, **extra), now_unix=T0,
                        nonce=b"n0nce123")["cmd"] == name
    assert v.counters["accepted"] == 1 + len(COMMANDS)
    assert v.high_water(KID) == 10 + len(COMMANDS) - 1
    got = v.verify(cmd(99, "schedule", schedule={"sid": 4, "iv": [[T0, T0 + 900, "kw", 100]]}), now_unix=T0)
    assert got["sid"] == 4 and got["iv"] == [[T0, T0 + 900, "kw", 100]]
    got = v.verify(cmd(100, "schedule", schedule={"sid": 5, "ts": [T0, 900, "pc", [4250]]}), now_unix=T0)
    assert got["sid"] == 5 and got["iv"] == [] and got["ts"] == [T0, 900, "pc", [4250]]  # the compact form alone
    for bad in ({"sid": "4", "iv": []}, {"sid": 4}, {"iv": []}, {"sid": 4, "iv": 7}, {"sid": 4, "ts": [], "iv": 7}):
        p = {"cmd": "schedule", "seq": 101, "exp": T0 + 60, "dev": DEV, **bad}
        assert refused(v, signed(p)) == "malformed", bad


def test_replay_and_gaps() -> None:
    v = verifier()
    m5 = cmd(5)
    v.verify(m5)
    assert refused(v, m5) == "replay"
    assert refused(v, cmd(5, "restore")) == "replay"  # same seq, other content
    assert refused(v, cmd(3)) == "replay"
    assert v.verify(cmd(9))["seq"] == 9  # gaps are fine (site-wide kids)
    assert refused(v, cmd(6)) == "replay"
    # seq is per kid
    v2 = verifier(keys={KID: KEY, b"k2": OTHER_KEY})
    v2.verify(cmd(5))
    assert v2.verify(cmd(1, key=OTHER_KEY, kid=b"k2"))["kid"] == b"k2"


def test_expiry_only_with_wall_time() -> None:
    v = verifier()
    assert refused(v, cmd(1), now=T0 + 61) == "expired"
    assert v.high_water(KID) == -1  # an expired command does not consume its seq
    assert v.verify(cmd(1), now_unix=T0 + 60)["seq"] == 1  # exp is inclusive
    assert v.verify(cmd(2, expires_s=-3600), now_unix=None)["seq"] == 2  # no clock: not checked
    assert refused(v, cmd(3, expires_s=-1), now=T0) == "expired"


def test_freshness_without_a_trusted_clock() -> None:
    """Issue 13: until the board trusts its clock, restore / disarm / time need the board's
    current nonce; sheds are always accepted; a year-old captured disarm is refused."""
    v = verifier()
    year_old = make_command(KEY, KID, "disarm", 5, target_device=DEV, now=T0 - 365 * 86400)
    assert refused(v, year_old) == "stale"                       # no clock, no nonce
    assert refused(v, year_old, now=T0) == "expired"             # clock trusted: exp enforced
    assert v.verify(cmd(1, expires_s=-3600))["cmd"] == "shed"    # a shed: always (safe direction)
    for name in ("restore", "disarm"):
        assert refused(v, cmd(2, name)) == "stale"
        assert refused(v, cmd(2, name, nonce=b"old-nonce"), None) == "stale"
    assert v.verify(cmd(2, "restore", nonce=b"cur-nonce"), None, b"cur-nonce")["nonce"] == b"cur-nonce"
    assert v.verify(cmd(3, "disarm"), now_unix=T0)["cmd"] == "disarm"  # clock trusted: exp is the freshness
    assert refused(v, cmd(4, "disarm", nonce=b"other"), T0) == "stale"  # a wrong nonce never passes
    # the time command: always with the nonce, and its "t"
    assert refused(v, cmd(4, "time", t=T0), T0) == "stale"
    assert refused(v, signed({"cmd": "time", "seq": 4, "exp": T0 + 60, "dev": DEV, "nonce": b"abcd"})) == "malformed"
    assert v.verify(cmd(4, "time", t=T0, nonce=b"abcd"), None, b"abcd")["t"] == T0
    assert v.counters["stale"] == 7


def test_targets() -> None:
    v = verifier()
    assert refused(v, cmd(1, dev="dev-8")) == "wrong-target"
    assert refused(v, cmd(1, dev=None, site="site-b")) == "wrong-target"
    assert refused(v, cmd(1, dev=DEV, site="site-b")) == "wrong-target"  # both must match
    assert v.verify(cmd(1, dev=DEV, site=SITE))["site"] == SITE
    assert refused(v, signed({"cmd": "shed", "seq": 2, "exp": T0})) == "malformed"  # no target
    assert v.high_water(KID) == 1


def test_keys_and_forgery() -> None:
    v = verifier()
    good = cmd(1)
    assert refused(v, cmd(1, key=OTHER_KEY)) == "bad-mac"
    assert refused(v, cmd(1, kid=b"nobody")) == "unknown-kid"
    for i in range(len(good)):
        assert refused(v, good[:i]) == "malformed"
    forged = bytearray(good)
    forged[-5] ^= 0x40
    assert refused(v, bytes(forged)) == "bad-mac"
    # swap in a different payload, keep the tag
    obj = cbor.loads(good)
    obj.value[2] = cbor.dumps({"cmd": "restore", "seq": 1, "exp": T0 + 60, "dev": DEV})
    assert refused(v, cbor.dumps(obj)) == "bad-mac"
    assert refused(v, "text") == "malformed"
    assert refused(v, good + bytes(600)) == "malformed"
    assert v.counters["accepted"] == 0
    assert v.verify(good)["seq"] == 1


@pytest.mark.parametrize("payload,reason", [
    (b"\xff", "malformed"), (cbor.dumps([1, 2]), "malformed"), ({"seq": 1, "exp": T0, "dev": DEV}, "malformed"),
    ({"cmd": "shed", "exp": T0, "dev": DEV}, "malformed"), ({"cmd": "shed", "seq": 1, "dev": DEV}, "malformed"),
    ({"cmd": "shed", "seq": True, "exp": T0, "dev": DEV}, "malformed"),
    ({"cmd": "shed", "seq": -1, "exp": T0, "dev": DEV}, "malformed"),
    ({"cmd": "shed", "seq": 1.0, "exp": T0, "dev": DEV}, "malformed"),
    ({"cmd": "shed", "seq": 1, "exp": "soon", "dev": DEV}, "malformed"),
    ({"cmd": "shed", "seq": 1, "exp": T0, "dev": 7}, "malformed"),
    ({"cmd": "shed", "seq": 1, "exp": T0, "dev": DEV, "kw": -1}, "malformed"),
    ({"cmd": "shed", "seq": 1, "exp": T0, "dev": DEV, "kw": float("nan")}, "malformed"),
    ({"cmd": "shed", "seq": 1, "exp": T0, "dev": DEV, "kw": True}, "malformed"),
    ({"cmd": "shed", "seq": 1, "exp": T0, "dev": DEV, "blocks": "b1"}, "malformed"),
    ({"cmd": "shed", "seq": 1, "exp": T0, "dev": DEV, "blocks": [[1]]}, "malformed"),
    ({"cmd": "shed", "seq": 1, "exp": T0, "dev": DEV, "blocks": list(range(33))}, "malformed"),
    ({"cmd": "reboot", "seq": 1, "exp": T0, "dev": DEV}, "bad-cmd"),
    ({"cmd": b"shed", "seq": 1, "exp": T0, "dev": DEV}, "bad-cmd"),
    ({"cmd": "SHED", "seq": 1, "exp": T0, "dev": DEV}, "bad-cmd"),
    ({"cmd": "shed", "seq": 1, "exp": T0, "dev": DEV, "future": [1]}, None),
])
def test_payload_rules(payload, reason) -> None:
    v = verifier()
    if reason is None:
        assert v.verify(signed(payload)) == {"cmd": "shed", "seq": 1, "exp": T0, "kid": KID, "dev": DEV}
    else:
        assert refused(v, signed(payload)) == reason
        assert v.high_water(KID) == -1


def test_counters_add_up() -> None:
    v = verifier()
    msgs = [cmd(1), cmd(1), cmd(2, dev="x"), cmd(2, key=OTHER_KEY), b"", cmd(3, "test"),
            cmd(4, kid=b"?"), signed({"cmd": "nope", "seq": 9, "exp": T0, "dev": DEV})]
    for m in msgs:
        try:
            v.verify(m, T0)
        except CommandRefused:
            pass
    assert set(v.counters) == {"accepted", *REASONS}
    assert sum(v.counters.values()) == len(msgs)
    assert v.counters == {"accepted": 2, "malformed": 1, "unknown-kid": 1, "bad-mac": 1, "bad-cmd": 1,
                          "wrong-target": 1, "expired": 0, "replay": 1, "stale": 0, "store-error": 0}


class RecordingStore(MemorySeqStore):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail

    def save(self, data) -> None:
        if self.fail:
            raise OSError(28, "ENOSPC")
        super().save(data)


def test_seq_saved_before_accept_and_fail_closed() -> None:
    store = RecordingStore()
    v = verifier(store)
    assert v.verify(cmd(3))["seq"] == 3
    assert store.data == {KID: 3} and store.saves == 1
    assert refused(v, cmd(2)) == "replay" and store.saves == 1  # refusals never write

    bad = RecordingStore(fail=True)
    v = verifier(bad)
    assert refused(v, cmd(3)) == "store-error"
    assert refused(v, cmd(3)) == "replay"  # the seq is spent even though the write failed

    class Unreadable:
        def load(self):
            raise ValueError("corrupt")

        def save(self, data):
            raise AssertionError("must not write")

    v = verifier(Unreadable())
    assert refused(v, cmd(1)) == "store-error"
    assert refused(v, cmd(1, key=OTHER_KEY)) == "bad-mac"  # still authenticates and counts
    assert v.counters["store-error"] == 1 and v.counters["bad-mac"] == 1


def test_file_store_atomic_and_recovery(tmp_path) -> None:
    path = str(tmp_path / "seq.cbor")
    st = FileSeqStore(path)
    assert st.load() == {}
    st.save({KID: 7, b"k2": 2**40})
    assert st.load() == {KID: 7, b"k2": 2**40}
    assert not (tmp_path / "seq.cbor.tmp").exists()
    assert cbor.loads((tmp_path / "seq.cbor").read_bytes()) == {"v": 1, "seq": {KID: 7, b"k2": 2**40}}
    # crash after the tmp file was written but before the rename: the newer seq wins
    (tmp_path / "seq.cbor.tmp").write_bytes(cbor.dumps({"v": 1, "seq": {KID: 9}}))
    assert st.load() == {KID: 9, b"k2": 2**40}
    # main file lost (FAT-style remove then rename): the tmp copy is used
    (tmp_path / "seq.cbor").unlink()
    assert st.load() == {KID: 9}
    # a torn tmp next to a good main file is ignored
    st.save({KID: 10})
    (tmp_path / "seq.cbor.tmp").write_bytes(b"\xa2\x61")
    assert st.load() == {KID: 10}
    # a corrupt main file with no valid copy: refuse to guess (verifier fails closed)
    (tmp_path / "seq.cbor.tmp").unlink()
    (tmp_path / "seq.cbor").write_bytes(b"\xa2\x61v")
    with pytest.raises(ValueError):
        st.load()
    assert refused(verifier(st), cmd(11)) == "store-error"
    (tmp_path / "seq.cbor").write_bytes(cbor.dumps({"v": 1, "seq": {KID: "x"}}))
    with pytest.raises(ValueError):
        st.load()


# ------------------------------------------------------------------ host signing

def test_host_signing(tmp_path) -> None:
    k1, k2 = new_key(), new_key()
    assert len(k1) == 32 and k1 != k2
    m = make_command(k1, "kidA", "restore", 4, target_site=SITE, now=T0, expires_s=30)
    kid, payload = cose.mac0_verify(m, {b"kidA": k1})
    assert kid == b"kidA" and cbor.loads(payload) == {"cmd": "restore", "seq": 4, "exp": T0 + 30, "site": SITE}
    assert m == make_command(k1, b"kidA", "restore", 4, target_site=SITE, now=T0, expires_s=30)
    for bad in (dict(cmd="explode"), dict(target_device=None), dict(seq=-1), dict(seq=True), dict(kw=-5)):
        args = dict(key=k1, kid=b"k", cmd="shed", seq=1, target_device=DEV, now=T0) | bad
        with pytest.raises(UserError):
            make_command(**args)


def test_seq_counter_never_reuses(tmp_path) -> None:
    path = tmp_path / "state" / "seq.json"
    c = SeqCounter(path)
    assert c.last(KID) == -1
    assert [c.next(KID) for _ in range(3)] == [0, 1, 2]
    assert c.next(b"other") == 0
    c2 = SeqCounter(path)  # a new CLI process
    assert c2.last(KID) == 2 and c2.next(KID) == 3
    assert c2.next(KID, at_least=T0) == T0 and c2.next(KID) == T0 + 1
    assert json.loads(path.read_text()) == {KID.hex(): T0 + 1, b"other".hex(): 0}
    path.write_text("{not json")
    with pytest.raises(UserError):
        c2.next(KID)


# ------------------------------------------------------------------ the board's steps

class StepAgent:
    """What the board's command steps (agent.cmd_mac0, agent.cmd_check, agent.cmd_run) use of the Agent."""

    def __init__(self) -> None:
        self.cfg = {"device": DEV, "site": SITE}
        self.hal = self
        self.seq_counters = None
        self.refused_at = None
        from agent.control import Authority

        self.signal = None
        self.auth = Authority()
        self.trusted = 0
        self.cmd_shed = False
        self.shed_kw = None
        self.release = False
        self.journal = self
        self.records: list[tuple[str, dict]] = []
        self.errors: dict[str, int] = {}

    def wall_time(self):
        return T0

    nonce = None
    time_off = 0

    def now_unix(self):  # the board's clock, trusted (a signed time was received)
        return T0

    def issue(self, *args, **kw):  # the Agent's own code: the shed authority's entry points
        from agent.app import Agent

        return Agent.issue(self, *args, **kw)

    def auth_sync(self):
        from agent.app import Agent

        return Agent.auth_sync(self)

    def append(self, kind, fields):
        self.records.append((kind, fields))

    def count(self, what):
        self.errors[what] = self.errors.get(what, 0) + 1


def test_board_steps_persist_the_seq_before_acting(tmp_path, monkeypatch) -> None:
    """Agent.signed_command's three steps, each its own module on the board (freed before the
    next loads): the same verdicts as CommandVerifier, the seq written by the last step before it
    acts, so a command that never reaches that step has consumed nothing."""
    from agent import cmd_check as cmdcheck
    from agent import cmd_run as cmdrun
    from agent import cmd_mac0 as mac0

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys.cbor").write_bytes(integrity.wrap(cbor.dumps({KID: KEY})))
    a = StepAgent()

    def command(buf: bytes) -> dict:
        return cmdrun.run(a, cmdcheck.run(a, mac0.run(a, buf)), "serial")

    assert command(cmd(5)) == {"ok": True, "cmd": "shed", "seq": 5} and a.cmd_shed
    assert FileSeqStore(str(tmp_path / "seq.cbor")).load() == {KID: 5}
    assert a.seq_counters == {"accepted": 1, **{r: 0 for r in REASONS}, "forbidden": 0}
    pending = cmdcheck.run(a, mac0.run(a, cmd(6, "restore")))  # checked, never carried out
    assert isinstance(pending, tuple) and pending[0]["seq"] == 6
    assert FileSeqStore(str(tmp_path / "seq.cbor")).load() == {KID: 5} and not a.release
    assert command(cmd(6, "restore")) == {"ok": True, "cmd": "restore", "seq": 6}
    assert a.release and not a.cmd_shed
    assert command(cmd(6)) == {"ok": False, "refused": "replay"}
    assert command(cmd(7, key=OTHER_KEY)) == {"ok": False, "refused": "bad-mac"}
    assert command(cmd(7, expires_s=-1)) == {"ok": False, "refused": "expired"}
    # a status / test command: the transport adds the status it carries
    assert command(cmd(7, "test")) == {"ok": True, "cmd": "test", "seq": 7, "status": None}
    assert [(k, f.get("cmd") or f["why"]) for k, f in a.records] == [
        ("cmd", "shed"), ("cmd", "restore"), ("cmd_refused", "replay"), ("cmd_refused", "bad-mac"),
        ("cmd_refused", "expired"), ("cmd", "test")]

    def no_room(path, data):
        raise OSError(28, "ENOSPC")

    monkeypatch.setattr(cmdrun, "save", no_room)
    assert command(cmd(8)) == {"ok": False, "refused": "store-error"} and not a.cmd_shed
    assert FileSeqStore(str(tmp_path / "seq.cbor")).load() == {KID: 7}
    assert a.seq_counters == {"accepted": 3, "malformed": 0, "unknown-kid": 0, "bad-mac": 1,
                              "bad-cmd": 0, "wrong-target": 0, "expired": 1, "replay": 1, "stale": 0,
                              "store-error": 1, "forbidden": 0}
    # unreadable store: fail closed; no keys file: unknown-kid
    (tmp_path / "seq.cbor").write_bytes(b"\xa2\x61")
    assert command(cmd(9)) == {"ok": False, "refused": "store-error"}
    (tmp_path / "keys.cbor").unlink()
    assert command(cmd(9)) == {"ok": False, "refused": "unknown-kid"}


# ------------------------------------------------------------------ under MicroPython

MP_VERIFY = """
import binascii
from agent.cmd_api import CommandVerifier, FileSeqStore, CommandRefused
v = CommandVerifier({%r: %r}, %r, %r, FileSeqStore('seq.cbor'))
def run(h, now=1800000000):
    try:
        c = v.verify(binascii.unhexlify(h), now)
        return 'ok:%%d' %% c['seq']
    except CommandRefused as e:
        return e.reason
""" % (KID, KEY, DEV, SITE)


def test_reboot_keeps_seq_micropython(mp, tmp_path) -> None:
    m5, m6, m4 = cmd(5), cmd(6, "restore"), cmd(4)
    boot1 = mp.run(MP_VERIFY + f"print(run({m5.hex()!r}), run({m5.hex()!r}))", cwd=tmp_path)
    assert boot1.out.split() == ["ok:5", "replay"]
    assert (tmp_path / "seq.cbor").exists()
    # reboot: a new interpreter and verifier reading the same store file
    boot2 = mp.run(MP_VERIFY + f"print(run({m5.hex()!r}), run({m4.hex()!r}), run({m6.hex()!r}))",
                   cwd=tmp_path)
    assert boot2.out.split() == ["replay", "replay", "ok:6"]
    assert FileSeqStore(str(tmp_path / "seq.cbor")).load() == {KID: 6}
    # the host reads the board's store with the same code
    boot3 = mp.run(MP_VERIFY + f"print(run({m6.hex()!r}), v.high_water({KID!r}))", cwd=tmp_path)
    assert boot3.out.split() == ["replay", "6"]


def test_policy_cases_micropython(mp, tmp_path) -> None:
    cases = [
        (cmd(1, dev="dev-8"), None, "wrong-target"), (cmd(1, key=OTHER_KEY), None, "bad-mac"),
        (cmd(1, kid=b"x"), None, "unknown-kid"), (cmd(1)[:-1], None, "malformed"),
        (cmd(1), T0 + 61, "expired"), (cmd(1), T0, "ok:1"), (cmd(1), T0, "replay"),
        (signed({"cmd": "fly", "seq": 2, "exp": T0, "dev": DEV}), None, "bad-cmd"),
        (signed({"cmd": "shed", "seq": 2, "exp": T0, "dev": DEV, "kw": -2}), None, "malformed"),
        (cmd(2, dev=None, site=SITE, kw=100, blocks=[0, "b"]), T0, "ok:2"),
        (cmd(2 ** 64 - 1), None, "ok:18446744073709551615"), (cmd(2 ** 64 - 1), None, "replay"),
    ]
    code = MP_VERIFY + "for h, now in %r:\n    print(run(h, now))\nprint(sorted(v.counters.items()))\n" % (
        [(m.hex(), now) for m, now, _ in cases],)
    res = mp.run(code, cwd=tmp_path)
    lines = res.out.splitlines()
    assert lines[:-1] == [want for _, _, want in cases]
    assert sum(n for _, n in eval(lines[-1])) == len(cases)


def _mutate(r: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        op = r.randrange(7)
        i = r.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << r.randrange(8)
        elif op == 1 and b:
            b[min(i, len(b) - 1)] = r.randrange(256)
        elif op == 2 and b:
            del b[min(i, len(b) - 1)]
        elif op == 3:
            b[i:i] = bytes([r.choice([0x00, 0x18, 0x5b, 0x9b, 0xbb, 0xff, 0xd1, r.randrange(256)])])
        elif op == 4:
            del b[i:]
        elif op == 5:
            b += r.randbytes(r.randrange(1, 9))
        else:
            j = r.randrange(len(b) + 1)
            b[i:i] = b[j:j + r.randrange(1, 12)]
    return bytes(b)


def _fuzz_corpus(seed: int = 20260101, n: int = 2000):
    r = random.Random(seed)
    plain = tuple(c for c in COMMANDS if c not in ("time", "schedule"))  # "time": the nonce; "schedule": its body
    base = [cmd(s, r.choice(plain), dev=DEV, site=r.choice([SITE, None]), expires_s=3600)
            for s in range(1, 21)]
    hwm = 20
    fields = ["cmd", "seq", "exp", "dev", "site", "kw", "blocks", "x", 1]
    vals = [None, True, -1, 0, 5, hwm, 2**64 - 1, 1.5, float("nan"), "", "shed", "restore", DEV, SITE,
            "dev-8", b"\x00", [], [1, "b"], {}, {"cmd": "shed"}, T0, T0 + 10**6]
    out = []
    while len(out) < n:
        kind = r.randrange(10)
        if kind < 4:  # byte-level mutation of an already-accepted message
            out.append(_mutate(r, r.choice(base)))
        elif kind == 4:  # noise, sometimes with a COSE_Mac0-looking prefix
            out.append(r.choice([b"", b"\xd1\x84", b"\x84\x43\xa1\x01\x05"]) + r.randbytes(r.randrange(0, 120)))
        elif kind == 5:  # fresh seq but wrong key or unknown kid
            out.append(cmd(1000 + len(out), key=r.randbytes(32)) if r.random() < 0.5
                       else cmd(1000 + len(out), kid=r.randbytes(r.randrange(0, 6))))
        else:  # correctly MACed but hostile payloads
            if kind < 8:  # a near-valid command with a few fields replaced or dropped
                p = {"cmd": r.choice(COMMANDS + ("zap",)), "seq": r.randrange(0, hwm + 1),
                     "exp": T0 + r.choice([-5, 100, 100])}
                p[r.choice(["dev", "site"])] = r.choice([DEV, SITE, "dev-9"])
                for _ in range(r.randrange(0, 3)):
                    if r.random() < 0.3:
                        p.pop(r.choice(fields), None)
                    else:
                        p[r.choice(fields)] = r.choice(vals)
                payload = cbor.dumps(p)
            else:
                payload = _mutate(r, cbor.dumps({"cmd": r.choice(COMMANDS), "seq": r.randrange(1, hwm + 1),
                                                 "exp": T0 + 100, "dev": DEV}))
            try:  # keep only payloads that could never be fresh: seq absent, odd, or <= hwm
                s = cbor.loads(payload).get("seq")
                if isinstance(s, int) and not isinstance(s, bool) and s > hwm:
                    continue
            except (ValueError, AttributeError):
                pass
            out.append(signed(payload))
    return base, out


def test_fuzz_2000_micropython(mp, tmp_path) -> None:
    base, fuzz = _fuzz_corpus()
    assert len(fuzz) == 2000
    (tmp_path / "fuzz.txt").write_text("".join(m.hex() + "\n" for m in base + fuzz))
    res = mp.run(MP_VERIFY + f"""
import json
out = []
n = 0
for line in open('fuzz.txt'):
    n += 1
    try:
        c = v.verify(binascii.unhexlify(line.strip()), {T0})
        r = 'ok:%d' % c['seq']
    except CommandRefused as e:
        r = e.reason
    print(r)
print(json.dumps(v.counters))
""", cwd=tmp_path, heapsize="64k")
    lines = res.out.splitlines()
    results, counters = lines[:-1], json.loads(lines[-1])
    assert results[:20] == ["ok:%d" % s for s in range(1, 21)]
    fuzz_results = results[20:]
    assert len(fuzz_results) == 2000
    assert all(r in REASONS for r in fuzz_results), set(fuzz_results) - set(REASONS)
    assert counters["accepted"] == 20 and sum(counters.values()) == 2020
    for reason in REASONS:
        assert counters[reason] == fuzz_results.count(reason)
    # every refusal path is exercised, and the fuzz really reached the payload checks
    for reason in ("malformed", "unknown-kid", "bad-mac", "bad-cmd", "wrong-target", "expired", "replay"):
        assert counters[reason] > 5, counters
    # CPython running the same module on the same sequence gives the same verdicts
    v = CommandVerifier({KID: KEY}, DEV, SITE, MemorySeqStore())
    host = []
    for m in base + fuzz:
        try:
            host.append("ok:%d" % v.verify(m, T0)["seq"])
        except CommandRefused as e:
            host.append(e.reason)
    assert host == results


def test_time_command_trusts_the_clock_with_an_rtc_sanity_bound(tmp_path, monkeypatch) -> None:
    """The board's steps for `time`: it needs the board's nonce; an RTC that looks set (after
    2026) bounds it (300 s); a port-default RTC (rp2: 2021) is ignored; the nonce is single use."""
    from agent import cmd_check as cmdcheck
    from agent import cmd_run as cmdrun
    from agent import cmd_mac0 as mac0

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys.cbor").write_bytes(integrity.wrap(cbor.dumps({KID: KEY})))
    a = StepAgent()
    a.time_off = None
    a.now_unix = lambda: None  # not trusted yet

    def command(buf: bytes) -> dict:
        return cmdrun.run(a, cmdcheck.run(a, mac0.run(a, buf)), "serial")

    a.nonce = b"nonce-01"
    assert command(cmd(1, "time", t=T0 + 1000, nonce=b"nonce-01")) == {"ok": False, "refused": "time-skew"}
    assert a.time_off is None and a.nonce is None  # the nonce was used (seq spent too)
    a.nonce = b"nonce-02"
    assert command(cmd(2, "time", t=T0 + 10, nonce=b"nonce-02"))["ok"] and a.time_off is not None
    a.wall_time = lambda: 1609459200  # rp2's RTC default (2021-01-01): not a bound
    a.nonce = b"nonce-03"
    assert command(cmd(3, "time", t=T0, nonce=b"nonce-03"))["ok"]
    assert command(cmd(4, "time", t=T0, nonce=b"nonce-03")) == {"ok": False, "refused": "stale"}
    assert [f.get("why") for k, f in a.records if k == "cmd_refused"] == ["time-skew", "stale"]
