"""`gridshed rotate-key` on a virtual board over its serial console (issue 17, docs/security.md
"Rotation"): the new key works at once, a command signed with the old key is refused, the
replay state survives (seqs continue above the old key's, /seq.cbor untouched), and a power cut
mid-rotation leaves the board with exactly one working key (the switch-over plan: committed ->
the new key at boot, not committed -> the old one), which the next rotate-key settles in the
inventory."""
from __future__ import annotations

import hashlib
import json
import secrets
import time

import cbor2

from gridshed import siteconfig
from gridshed.inventory import Inventory
from gridshed.signing import make_command
from test_signed_commands import agent_build, cli, console, meter, rig, send  # noqa: F401


def _shed_ok(rig, inv: str, verb: str = "shed") -> int:  # type: ignore[no-untyped-def]  # noqa: F811
    r = cli(verb, "--device", rig.dev, "--port", rig.board.port, "--inventory", inv, "--json", timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"], out
    return out["results"][0]["seq"]


def _kid(inv: str, dev: str) -> tuple[bytes, bytes]:
    with Inventory(inv) as i:
        return i.key_for(dev)


def test_rotate_key(rig, tmp_path):  # type: ignore[no-untyped-def]  # noqa: F811
    inv = str(rig.inventory)
    old_kid, old_key = _kid(inv, rig.dev)
    seq1 = _shed_ok(rig, inv)
    seq_before = (rig.dir / "seq.cbor").read_bytes()
    r = cli("rotate-key", rig.dev, "--port", rig.board.port, "--inventory", inv, "--json", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    new_kid, new_key = _kid(inv, rig.dev)
    assert res["key_id"] == new_kid.hex() != old_kid.hex() and res["old_key_id"] == old_kid.hex()
    keys = siteconfig.read_settings((rig.dir / "keys.cbor").read_bytes())
    assert set(keys) == {new_kid}  # the old key is gone from the board
    # the replay state survived: the old key's last seq untouched (the new key's: the signed time)
    seqs = cbor2.loads((rig.dir / "seq.cbor").read_bytes())["seq"]
    assert cbor2.loads(seq_before)["seq"] == {old_kid: seqs[old_kid]} and set(seqs) == {old_kid, new_kid}
    # the agent is back, and rotate-key gave it the signed time (new key) its restart forgot
    assert res["restart"].endswith("; signed time sent (its clock is trusted)"), res
    assert console(rig, "status")["time_trusted"] is True
    # the old key: refused (unknown kid), nothing moves
    m = rig.gpio.mark()
    old = make_command(old_key, old_kid, "restore", int(time.time()) + 10**6, target_device=rig.dev)
    assert send(rig, old) == {"ok": False, "refused": "unknown-kid"}
    assert rig.gpio.since(m) == []
    # the new key through the CLI: accepted, its seqs continue above the old key's
    seq2 = _shed_ok(rig, inv, "arm")
    assert seq2 > seq1
    # the old key's shed (seq1) is still held and its own release can never come: rotate-key
    # said so, a plain restore says so, a restore --all releases it
    held = f"signed:{old_kid.hex()}"
    assert [w for w in res["warnings"] if held in w and f"restore --device {rig.dev} --all" in w], res
    r = cli("restore", "--device", rig.dev, "--port", rig.board.port, "--inventory", inv, "--json", timeout=90)
    assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["still_held"] == [held], r.stdout + r.stderr
    r = cli("restore", "--device", rig.dev, "--port", rig.board.port, "--inventory", inv, "--all", timeout=90)
    assert r.returncode == 0 and "still held" not in r.stderr, r.stdout + r.stderr
    assert not console(rig, "status").get("held")
    with Inventory(inv) as i:
        assert [h["action"] for h in i.history(rig.dev)][-1] == "rotate-key"
        assert i.pending_key(rig.dev) is None
    rig.expect_restarts = 1  # the agent restarted after the rotation (the host's stop/start)


def _cut_mid_rotation(rig, commit: bool) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]  # noqa: F811
    # what rotate-key does up to the switch, then a power cut: the pending key in the inventory,
    # the new table staged on the board, the plan committed (or not), the board reset before any
    # rename
    kid, key = secrets.token_bytes(8), secrets.token_bytes(32)
    with Inventory(rig.inventory) as i:
        i.set_pending_key(rig.dev, kid.hex(), key)
    data = siteconfig.keys_bytes({kid: key})
    rig.board.stop()
    (rig.dir / "keys.cbor.gsnew").write_bytes(data)
    if commit:
        plan = {"renames": [["keys.cbor.gsnew", "keys.cbor", hashlib.sha256(data).hexdigest()]], "removes": []}
        (rig.dir / "switch-plan.json").write_text(json.dumps(plan))
    mark = rig.board.mark()
    rig.board.start()
    assert rig.board.wait_output("agent up", 60, since=mark), rig.board.output()[-2000:]
    return kid, key


def test_power_cut_mid_rotation_leaves_one_working_key(rig):  # type: ignore[no-untyped-def]  # noqa: F811
    inv = str(rig.inventory)
    old_kid, _ = _kid(inv, rig.dev)
    # 1. cut after the commit: the board finishes the switch at boot and runs the new key
    kid, key = _cut_mid_rotation(rig, commit=True)
    assert set(siteconfig.read_settings((rig.dir / "keys.cbor").read_bytes())) == {kid}
    assert send(rig, make_command(key, kid, "arm", int(time.time()) - 100, target_device=rig.dev))["ok"]
    r = cli("rotate-key", rig.dev, "--port", rig.board.port, "--inventory", inv, "--json", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout).get("finished_interrupted") and _kid(inv, rig.dev) == (kid, key)
    _shed_ok(rig, inv, "arm")  # the host signs with the key the board holds
    # 2. cut before the commit: the staged file is never used, the old key stays
    kid3, _ = _cut_mid_rotation(rig, commit=False)
    assert set(siteconfig.read_settings((rig.dir / "keys.cbor").read_bytes())) == {kid}
    _shed_ok(rig, inv, "arm")
    r = cli("rotate-key", rig.dev, "--port", rig.board.port, "--inventory", inv, "--json", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    new_kid, _ = _kid(inv, rig.dev)
    assert new_kid not in (kid, kid3, old_kid)
    assert set(siteconfig.read_settings((rig.dir / "keys.cbor").read_bytes())) == {new_kid}
    _shed_ok(rig, inv)
    rig.expect_restarts = 2  # the agent restarted after each rotate-key (the host's stop/start)
