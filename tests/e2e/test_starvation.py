"""End to end: junk never starves a real command (issue 13), on the real agent.

- UDP: 200 junk datagrams a second (COSE-shaped, so each would cost a verification) from one
  source while the operator's host sends a genuine signed shed: accepted (the junk source spends
  its own rate bucket; `udp_limited` proves the flood was over the limit).
- MQTT: 100 forged commands published at once (QoS 1) ahead of a genuine shed: the shed is
  accepted, none is dropped (the reader waits while the 4-slot queue is full, so the flood backs
  up at the broker).
- MQTT: a retained 700-byte message on the board's cmd topic (more than a command can be) is
  discarded and counted, with no reconnect loop: the board stays on its first connection and
  still accepts a real command.
"""
from __future__ import annotations

import json
import os
import random
import socket
import threading
import time

import paho.mqtt.client as paho
import pytest

from gridshed.signing import make_command
from mosquitto_broker import Mosquitto
from test_signed_commands import Meter, Rig, agent_build, cli, console, meter, rig, site_config  # noqa: F401

# The MQTT channel does not fit the smallest board's budget (80wK: the agent runs out of RAM in
# its poll loop); its floor is 88wK (docs/mqtt.md, "Memory": 88wK passed 2 of 2, 86wK failed),
# too close for a loaded CI machine (a fresh-clone run failed the flood at 88wK once): the tests
# run 4wK above it. GS_FLEET_HEAP overrides.
MQTT_HEAP = os.environ.get("GS_FLEET_HEAP") or "92wK"


def errors(r: Rig) -> dict:
    return console(r, "status")["errors"]


def test_udp_flood_does_not_starve_a_signed_shed(rig):  # noqa: F811  (fixture imported above)
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        rnd = random.Random(13)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))  # the attacker's own address
            while not stop.is_set():
                t0 = time.monotonic()
                for _ in range(20):  # 200 a second, in bursts of 20 every 100 ms
                    s.sendto(b"\xd1\x84" + bytes(rnd.getrandbits(8) for _ in range(100)),
                             ("127.0.0.1", rig.udp_port))
                    sent[0] += 1
                time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))

    th = threading.Thread(target=flood, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 30
        # a second of flood (200 datagrams), over the junk source's limit, before the real shed
        while sent[0] < 200 or errors(rig).get("udp_limited", 0) < 20:
            assert time.monotonic() < deadline, "the flood never reached the rate limit"
            time.sleep(0.2)
        r = cli("shed", "--device", rig.dev, "--host", "127.0.0.1", "--udp-port", str(rig.udp_port),
                "--inventory", str(rig.inventory), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["results"][0]["reply"]["ok"] is True
        assert rig.gpio.wait(lambda: not any(rig.closed()), 20), "the shed did not open the relays"
    finally:
        stop.set()
        th.join(5)
    assert sent[0] > 200
    st = console(rig, "status")
    assert st["commands"]["accepted"] == 1 and st["commands"]["malformed"] > 0


@pytest.fixture
def mqtt_rig(tmp_path, agent_build, meter):  # noqa: F811
    broker = Mosquitto(tmp_path).start()
    cfg = site_config(meter_port=meter.port, min_off_s=1, restore_hold_s=0.3, stagger_s=0.2, jitter_s=0.05,
                      extra={"mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port,
                                      "keepalive_s": 10, "telemetry_s": 5.0}})
    r = Rig(tmp_path, agent_build, cfg, tmp_path / "inv.sqlite", heap=MQTT_HEAP)
    r.inventory = tmp_path / "inv.sqlite"
    r.broker = broker
    r.cmd_topic = f"gridshed/{cfg['site']}/{r.dev}/cmd"
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="attacker", protocol=paho.MQTTv311)
    c.connect("127.0.0.1", broker.port, 30)
    c.loop_start()
    r.pub = c
    try:
        yield r
    finally:
        c.loop_stop()
        c.disconnect()
        r.stop()
        broker.stop()


def mqtt_stats(r: Rig) -> dict:
    return console(r, "status")["mqtt"]


def wait_connected(r: Rig) -> None:
    deadline = time.monotonic() + 60
    while not (console(r, "status").get("mqtt") or {}).get("connected"):
        assert time.monotonic() < deadline, "the board never connected to the broker"
        time.sleep(0.2)


def test_retained_oversize_message_is_discarded_without_a_reconnect_loop(mqtt_rig):
    r = mqtt_rig
    # retained before the board connects: the broker hands it over with every SUBSCRIBE
    r.pub.publish(r.cmd_topic, b"\xd1\x84" + bytes(700), qos=1, retain=True).wait_for_publish(5)
    r.start()
    r.wait_up()
    wait_connected(r)
    deadline = time.monotonic() + 30
    while mqtt_stats(r)["oversize"] < 1:
        assert time.monotonic() < deadline, "the oversize message never arrived"
        time.sleep(0.2)
    # a real command afterwards is accepted on the same connection (positive marker that the
    # session went on past the oversize message)
    out = cli("shed", "--device", r.dev, "--broker", f"127.0.0.1:{r.broker.port}", "--inventory",
              str(r.inventory), "--timeout", "30", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    st = mqtt_stats(r)
    assert st["connects"] == 1 and st["failures"] == 0 and st["malformed"] == 0, st


def test_mqtt_flood_does_not_drop_a_qos1_shed(mqtt_rig):
    r = mqtt_rig
    r.start()
    r.wait_up()
    wait_connected(r)
    # 100 forgeries (a known kid, a wrong key: each one costs a MAC check), then the real shed
    junk = [make_command(os.urandom(32), r.kid, "shed", 10 + i, target_device=r.dev) for i in range(100)]
    for j in junk:
        r.pub.publish(r.cmd_topic, j, qos=1)
    out = cli("shed", "--device", r.dev, "--broker", f"127.0.0.1:{r.broker.port}", "--inventory",
              str(r.inventory), "--timeout", "90", "--json", timeout=180)
    assert out.returncode == 0, (console(r, "status"), out.stdout[-500:])
    assert r.gpio.wait(lambda: not any(r.closed()), 20)
    st = console(r, "status")
    assert st["commands"]["accepted"] == 1 and st["commands"]["bad-mac"] >= 1
    assert st["errors"].get("mqtt_cmd_dropped", 0) == 0, st["errors"]
