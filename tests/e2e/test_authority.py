"""End to end: shed authority per issuer on the real agent (issue 13), attacks with `mbpoll`.

One virtual board (the real firmware, .mpy build, at the smallest board's heap budget) with a
pymodbus TCP meter, its key provisioned, and the utility Modbus server on a loopback port with
the default authority (the Modbus line is not trusted). Every attack of the security review is
played with libmodbus's `mbpoll` (or raw MBAP frames where mbpoll cannot say it) and shown to
fail; the legitimate path (a signed restore) is shown to still work. Absences are asserted only
after a positive marker (meter polls counted by the board after the window) proves the window
passed.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import time

import pytest
from conftest import require_tool
from gridshed.boards import budget_heapsize
from gridshed.signing import make_command
from test_signed_commands import (  # noqa: F401
    Meter,
    Rig,
    agent_build,
    console,
    free_port,
    journal,
    send,
    site_config,
)

# the budget, 80wK (gridshed.boards.budget_heapsize()), 4wK above this test's measured floor: 76wK
# passed 3 runs of 3 beside two busy loops, 74wK failed 2 of 2 and 72wK 1 of 1 (a signed command
# answered MemoryError), after the resident-RAM cuts of 2026-12-07 (docs/architecture.md "Test
# heaps"); from the maintenance boot until then it ran at 84wK. GS_HEAP overrides, to bisect.
HEAP = os.environ.get("GS_HEAP") or budget_heapsize()
R_STATUS, R_STATE, R_MASK, R_SHED, R_RELEASE, R_SHED_KW, R_HB = 1, 2, 8, 10, 11, 12, 13
MASTER = "127.0.0.2"  # the SCADA master's address (loopback aliases: 127.0.0.0/8)


def mbpoll(port: int, *args: str, unit: int = 1) -> subprocess.CompletedProcess:
    exe = require_tool("mbpoll")
    return subprocess.run([exe, "-m", "tcp", "-p", str(port), "-a", str(unit), "-0", "-1", "-o", "5",
                           "-t", "4", *args], capture_output=True, text=True, timeout=60)


def write(port: int, reg: int, value: int, unit: int = 1) -> subprocess.CompletedProcess:
    return mbpoll(port, "-r", str(reg), "127.0.0.1", str(value), unit=unit)


def raw(port: int, unit: int, reg: int, value: int, src: str = "127.0.0.1") -> bytes:
    """One function-6 write in an MBAP frame (unit ids mbpoll will not send); the answer."""
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(15)
    s.connect(("127.0.0.1", port))
    with s:
        s.sendall(struct.pack(">HHHBBHH", 7, 0, 6, unit, 6, reg, value))
        try:
            return s.recv(64)
        except (TimeoutError, ConnectionResetError):
            return b""


def status(r: Rig) -> dict:
    return console(r, "status")


def polls_after(r: Rig, seconds: float) -> None:
    """Positive marker: the board kept deciding (counted meter samples) for `seconds` more."""
    n0 = status(r)["samples"]
    per_s = 1000 / r.cfg["meter"]["poll_ms"]
    deadline = time.monotonic() + 60
    while status(r)["samples"] - n0 < seconds * per_s:
        assert time.monotonic() < deadline, "the board stopped polling"
        time.sleep(0.2)


def signed(r: Rig, cmd: str, seq: int, **kw) -> dict:
    if cmd in ("restore", "disarm"):  # freshness: the board does not trust its clock yet
        kw["nonce"] = bytes.fromhex(console(r, "nonce")["nonce"])
    return send(r, make_command(r.key, r.kid, cmd, seq, target_device=r.dev, expires_s=600, **kw))


@pytest.fixture
def meter():
    cfg = site_config()
    m = Meter(cfg["meter"]["map"])
    yield m
    m.stop()


@pytest.fixture
def rig(tmp_path, agent_build, meter):  # noqa: F811
    port = free_port()
    cfg = site_config(meter_port=meter.port, min_off_s=1, restore_hold_s=0.5, stagger_s=0.2, jitter_s=0.05,
                      extra={"modbus_server": {"enabled": True, "port": port, "heartbeat_s": 1.0,
                                               "heartbeat_action": "shed", "master": MASTER,
                                               "allow": ["127.0.0.1", MASTER]}})
    cfg["trip"]["release_required"] = True
    r = Rig(tmp_path, agent_build, cfg, tmp_path / "inv.sqlite", heap=HEAP).start()
    r.port = port
    r.meter = meter
    try:
        r.wait_up()
        assert r.gpio.wait(lambda: all(r.closed()), 30), "relays not closed at boot"
        deadline = time.monotonic() + 30
        while status(r).get("samples", 0) < 3:
            assert time.monotonic() < deadline, "board never polled the meter"
            time.sleep(0.1)
        yield r
    finally:
        r.stop()


def test_modbus_release_never_satisfies_release_required(rig):
    """Review 1: register 11 = 1 after an under-frequency trip no longer brings load back."""
    rig.meter.hz = 59.5
    assert rig.gpio.wait(lambda: not any(rig.closed()), 20), "no under-frequency trip"
    rig.meter.hz = 60.0
    assert write(rig.port, R_RELEASE, 1).returncode == 0       # the attack, by libmodbus
    assert write(rig.port, R_SHED, 0).returncode == 0
    polls_after(rig, 3.0)  # past min-off (1 s) and the restore hold (0.5 s), with margin
    st = status(rig)
    assert not any(rig.closed()) and st["state"] == "restore_hold", st
    # the legitimate path: a signed restore is the release
    assert signed(rig, "restore", 1)["ok"]
    assert rig.gpio.wait(lambda: all(rig.closed()), 40), "signed restore did not bring load back"


def test_modbus_cannot_cancel_a_signed_shed(rig):
    """Review 2: register 12 = 0, 10 = 0 and 11 = 1 leave a signed partial / full shed alone."""
    assert signed(rig, "shed", 1, kw=40)["ok"]
    assert rig.gpio.wait(lambda: not all(rig.closed()), 20), "partial shed opened nothing"
    for reg, v in ((R_SHED_KW, 0), (R_SHED, 0), (R_RELEASE, 1)):
        p = write(rig.port, reg, v)
        assert p.returncode == 0, p.stdout + p.stderr
    polls_after(rig, 3.0)
    st = status(rig)
    assert not all(rig.closed()) and st["shed_kw"] == 40 and any(h.startswith("signed:") for h in st["held"])
    assert signed(rig, "shed", 2)["ok"]  # the same signer escalates to a full shed
    assert rig.gpio.wait(lambda: not any(rig.closed()), 20)
    write(rig.port, R_RELEASE, 1)
    polls_after(rig, 3.0)
    assert not any(rig.closed())
    assert signed(rig, "restore", 3)["ok"]
    assert rig.gpio.wait(lambda: all(rig.closed()), 40), "signed restore did not bring load back"


def test_a_signers_restore_leaves_the_utility_shed(rig):
    """Review 2: a signed restore from another issuer (the OpenADR bridge's label) releases only
    its own entry: the utility's Modbus shed holds; only the utility's own release (or a
    restore-all) ends it."""
    assert signed(rig, "shed", 1, iss="openadr")["ok"]
    assert write(rig.port, R_SHED, 1).returncode == 0
    assert rig.gpio.wait(lambda: not any(rig.closed()), 20)
    assert signed(rig, "restore", 2, iss="openadr")["ok"]
    polls_after(rig, 3.0)
    st = status(rig)
    assert not any(rig.closed()) and st["held"] == ["modbus"], st
    assert write(rig.port, R_SHED, 0).returncode == 0  # the utility releases its own shed
    polls_after(rig, 1.0)
    assert status(rig)["held"] == []
    # release_required: the utility line's release does not count; the signed restore did
    assert rig.gpio.wait(lambda: all(rig.closed()), 40), "load did not come back"


def test_heartbeat_loss_is_not_revived_by_a_new_value(rig):
    """Review 3: any new value in register 13 no longer ends a heartbeat-loss shed."""
    for v in range(1, 6):
        assert write(rig.port, R_HB, v).returncode == 0
    assert rig.gpio.wait(lambda: not any(rig.closed()), 20), "no heartbeat-loss shed"
    for v in range(100, 110):
        write(rig.port, R_HB, v)
    st = status(rig)
    assert st["held"] == ["heartbeat"]
    polls_after(rig, 3.0)
    assert not any(rig.closed())
    r = signed(rig, "restore", 1)  # the signer's own entry: not the heartbeat's
    assert r["ok"] and status(rig)["held"] == ["heartbeat"]
    assert signed(rig, "restore", 2, all_=True)["ok"]  # restore-all (authority.restore_all)
    assert status(rig)["held"] == []
    assert rig.gpio.wait(lambda: all(rig.closed()), 40)


def test_broadcast_and_peers(rig):
    """Review 6 and deliver 2: unit 0 / 255 shed but never release; a client not on the allow
    list is refused; the SCADA master keeps its reserved connection; 300 writes do not roll
    the journal."""
    p = write(rig.port, R_SHED, 1, unit=0)  # libmodbus: TCP unit 0 (broadcast)
    assert p.returncode == 0, p.stdout + p.stderr        # the shed direction: acted on
    assert rig.gpio.wait(lambda: not any(rig.closed()), 20)
    for unit in (0, 255):
        p = write(rig.port, R_SHED, 0, unit=unit)
        assert p.returncode != 0 and "Illegal function" in p.stdout + p.stderr, p.stdout + p.stderr
        ans = raw(rig.port, unit, R_RELEASE, 1)
        assert ans[7:9] == b"\x86\x01", ans           # illegal function: never the restore direction
    assert status(rig)["held"] == ["modbus"]
    assert raw(rig.port, 1, R_SHED, 0, src="127.0.0.3") == b""  # not on the allow list: closed
    # the master's connection survives two other clients opening and a third evicting
    m = socket.socket()
    m.bind((MASTER, 0))
    m.settimeout(15)
    m.connect(("127.0.0.1", rig.port))
    others = [socket.create_connection(("127.0.0.1", rig.port), 10) for _ in range(3)]
    try:
        m.sendall(struct.pack(">HHHBBHH", 9, 0, 6, 1, 3, 0, 1))
        assert m.recv(64)[:2] == b"\x00\x09"
    finally:
        m.close()
        for s in others:
            s.close()
    # 300 writes: journaled as a bounded summary, the boot record stays in the journal
    from pymodbus.client import ModbusTcpClient

    c = ModbusTcpClient("127.0.0.1", port=rig.port, timeout=10, retries=0)
    assert c.connect()
    try:
        for i in range(300):
            c.write_register(R_SHED_KW, 1000 + i, device_id=1)
    finally:
        c.close()
    recs = journal(rig)
    assert any(x["k"] == "boot" for x in recs)
    util = [x for x in recs if x["k"] == "utility"]
    assert len(util) < 40, len(util)
    assert status(rig)["modbus_server"]["commands"] >= 300
