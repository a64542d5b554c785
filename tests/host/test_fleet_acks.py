"""Authenticated acknowledgements (issue 13): the host accepts a board's MQTT state only when its
"mac" verifies with the device's key. An attacker who reads the clear command (its seq) and
publishes a retained state carrying that seq no longer confirms a command the board never saw.

A real Mosquitto broker; the "board" here is played by a paho client publishing states signed the
way agent/features/mqtt.py signs them (the real agent's states are verified by tests/e2e/test_fleet.py).
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from mosquitto_broker import Mosquitto
from gridshed import fleet_client as fc
from gridshed.inventory import Inventory

ROOT = Path(__file__).resolve().parents[2]
SITE, DEV = "s1", "d1"


def board_state(kid: bytes, key: bytes, topic: str, obj: dict) -> bytes:
    body = json.dumps(obj)
    return (body[:-1] + ', "mac": {"%s": "%s"}}' % (kid.hex(), fc.state_mac(key, topic, body))).encode()


def test_verify_state_matches_the_board_format() -> None:
    """The board's own code (agent/features/mqtt.py Fleet.sign, run here under CPython) and the host's
    check agree; any change of a byte, of the topic or of the key fails."""
    from agent.features.mqtt import Fleet

    key, kid = secrets.token_bytes(32), secrets.token_bytes(8)
    site_key, site_kid = secrets.token_bytes(32), secrets.token_bytes(8)
    f = Fleet.__new__(Fleet)
    f.keys = [(site_kid, site_key), (kid, key)]  # every provisioned key MACs it
    topic = f"gridshed/{SITE}/{DEV}/state"
    msg = f.sign(topic, json.dumps({"dev": DEV, "seq": 7, "mask": 0}))
    assert fc.verify_state(key, topic, msg.encode(), kid) == {"dev": DEV, "seq": 7, "mask": 0}
    assert fc.verify_state(site_key, topic, msg.encode(), site_kid) is not None
    assert fc.verify_state(key, topic, msg.encode(), site_kid) is None  # the other key's entry
    assert fc.verify_state(key, topic, msg.replace('"seq": 7', '"seq": 8').encode()) is None
    assert fc.verify_state(key, topic + "x", msg.encode()) is None
    assert fc.verify_state(secrets.token_bytes(32), topic, msg.encode()) is None
    assert fc.verify_state(key, topic, b'{"dev": "d1", "seq": 7}') is None  # no mac: a forgery
    assert fc.verify_state(key, topic, b"\xff\xfe") is None


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gridshed.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_forged_ack_is_ignored_and_a_real_one_accepted(tmp_path, broker) -> None:
    inv = tmp_path / "inv.sqlite"
    kid, key = secrets.token_bytes(8), secrets.token_bytes(32)
    with Inventory(inv) as i:
        i.record_provision(DEV, "unix-sim", SITE, kid.hex(), key, None, "h")
    st_topic = f"gridshed/{SITE}/{DEV}/state"
    cmd_topic = f"gridshed/{SITE}/{DEV}/cmd"
    mode = {"sign": False}
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="attacker-or-board", protocol=paho.MQTTv311)
    seen = threading.Event()

    def on_message(client, userdata, m):  # reads the clear command, answers with its seq
        from agent import cbor

        seq = cbor.loads(cbor.loads(m.payload).value[2])["seq"]
        st = {"dev": DEV, "online": True, "state": "tripped", "mask": 0, "seq": seq, "cmd": "shed",
              "acc": 1, "ref": 0}
        payload = board_state(kid, key, st_topic, st) if mode["sign"] else json.dumps(st).encode()
        client.publish(st_topic, payload, qos=1, retain=True)
        seen.set()

    c.on_message = on_message
    c.connect("127.0.0.1", broker.port)
    c.subscribe(cmd_topic, 1)
    c.loop_start()
    try:
        args = ("shed", "--device", DEV, "--broker", f"127.0.0.1:{broker.port}", "--inventory", str(inv),
                "--seq-file", str(tmp_path / "seq.json"), "--timeout", "3", "--json")
        r = cli(*args)
        assert seen.is_set(), "the forger never saw the command"
        assert r.returncode == 1, r.stdout + r.stderr
        rep = json.loads(r.stdout)["results"][0]["reply"]
        assert rep["ok"] is False and "unauthenticated state message" in rep["error"], rep
        mode["sign"] = True  # the board (holding the key) answers
        r = cli(*args[:-3], "--timeout", "20", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["results"][0]["ok"] is True
    finally:
        c.loop_stop()
        c.disconnect()
