"""`gridshed exporter` on a secured broker (a real Mosquitto with TLS, logins and the ACL that
`gridshed broker-config` writes): with `--site S --inventory I` it connects with the site's CA and
host login from the inventory, accepts the state a device signed with its key (as the board's
agent/features/mqtt.py signs it) and drops a forged one; a wrong host password is reported, not fatal.
(The exporter against a real agent: tests/e2e/test_exporter.py.)"""
from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gridshed import brokerauth as ba
from gridshed import fleet_client as fc
from gridshed.inventory import Inventory
from mosquitto_broker import HOST, Certs, Mosquitto

ROOT = Path(__file__).resolve().parents[2]
SITE, DEV = "tls-site", "dev1"
USERS = {DEV: "pw-dev1", ba.HOST_USER: "pw-host"}


def signed_state(key: bytes, kid: bytes, topic: str, obj: dict) -> bytes:
    """A state message as the board publishes it: JSON text, then "mac" {kid hex: HMAC} last."""
    body = json.dumps(obj)
    return (body[:-1] + ', "mac": {"%s": "%s"}}' % (kid.hex(), fc.state_mac(key, topic, body))).encode()


class Proc:
    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "host_tools"), str(ROOT / "firmware")]))
        self.p = subprocess.Popen([sys.executable, "-m", "gridshed.cli", "exporter", "--json", "--listen",
                                   "127.0.0.1:0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(x) for x in self.p.stdout] + [self.q.put("")],  # type: ignore[union-attr]
                         daemon=True).start()
        self.seen: list[dict] = []
        self.port = self.wait("listening")["port"]

    def wait(self, event: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            assert line, f"exporter exited: {self.seen} {self.p.stderr.read()}"  # type: ignore[union-attr]
            self.seen.append(json.loads(line))
            if self.seen[-1]["event"] == event:
                return self.seen[-1]
        raise AssertionError(f"no {event!r}: {self.seen}")

    def scrape(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text)
                for s in f.samples}

    def stop(self) -> tuple[int, str]:
        self.p.send_signal(signal.SIGINT)
        rc = self.p.wait(30)
        return rc, self.p.stderr.read()  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp-tls")
    certs = Certs(tmp)
    broker = Mosquitto(tmp, users=USERS, acl=ba.acl_text({SITE: [DEV]}), tls=(certs, "server")).start()
    inv = tmp / "inv.sqlite"
    kid, key = secrets.token_bytes(8), secrets.token_bytes(32)
    with Inventory(inv) as iv:
        iv.record_provision(DEV, "unix-sim", SITE, kid.hex(), key, None, "0" * 16)
        iv.set_site(SITE, tls=1, trust_ca=certs.ca.decode(), host_user=ba.HOST_USER, host_password="pw-host")
    yield broker, certs, inv, kid, key
    broker.stop()


def test_exporter_logs_in_over_tls_and_checks_state_macs(secured):
    broker, certs, inv, kid, key = secured
    exp = Proc("--broker", f"{HOST}:{broker.port}", "--site", SITE, "--inventory", str(inv))
    dev = None
    try:
        exp.wait("connected")
        # the device, logged in with its own password, publishes as the board does
        dev = fc.paho_client("dev1", fc.BrokerOpts(True, certs.ca.decode(), None, DEV, "pw-dev1"), HOST)
        fc.connect_paho(dev, HOST, broker.port)
        st_topic, tel_topic = f"gridshed/{SITE}/{DEV}/state", f"gridshed/{SITE}/{DEV}/telemetry"
        good = {"dev": DEV, "online": True, "state": "normal", "armed": True, "shed": False, "held": 0,
                "mask": 3, "seq": None, "cmd": None, "acc": 2, "ref": 1, "nonce": "00" * 8, "time": True}
        dev.publish(st_topic, signed_state(key, kid, st_topic, good), qos=1).wait_for_publish(10)
        dev.publish(tel_topic, json.dumps({"t": 1, "hz": 59.99, "kw": 250.5, "mask": 3, "state": "normal"}),
                    qos=1).wait_for_publish(10)
        forged = dict(good, state="disarmed", armed=False)
        dev.publish(st_topic, signed_state(secrets.token_bytes(32), kid, st_topic, forged), qos=1).wait_for_publish(10)
        k = {"site": SITE, "device": DEV}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = exp.scrape()
            if m.get(("gridshed_exporter_bad_messages_total", frozenset({"reason": "unverified"}.items()))) == 1 \
                    and m.get(("gridshed_frequency_hertz", frozenset(k.items()))) is not None:
                break
            time.sleep(0.2)
        assert m[("gridshed_online", frozenset(k.items()))] == 1.0
        assert m[("gridshed_frequency_hertz", frozenset(k.items()))] == 59.99
        assert m[("gridshed_commands_refused_total", frozenset(k.items()))] == 1.0
        assert m[("gridshed_armed", frozenset(k.items()))] == 1.0  # the forged "disarmed" was dropped
        assert m[("gridshed_exporter_bad_messages_total", frozenset({"reason": "unverified"}.items()))] == 1.0
    finally:
        if dev is not None:
            dev.loop_stop()
            dev.disconnect()
        rc, err = exp.stop()
    assert rc == 0 and "Traceback" not in err, err


def test_wrong_host_password_is_reported_and_retried(secured, tmp_path):
    broker, certs, inv, kid, key = secured
    bad = tmp_path / "inv.sqlite"
    with Inventory(bad) as iv:
        iv.set_site(SITE, tls=1, trust_ca=certs.ca.decode(), host_user=ba.HOST_USER, host_password="wrong")
    exp = Proc("--broker", f"{HOST}:{broker.port}", "--site", SITE, "--inventory", str(bad))
    try:
        ev = exp.wait("refused")
        assert "authori" in ev["reason"].lower() or "password" in ev["reason"].lower(), ev
        m = exp.scrape()  # the endpoint still answers, and says it is not connected
        assert m[("gridshed_exporter_mqtt_connected", frozenset())] == 0.0
    finally:
        rc, err = exp.stop()
    assert rc == 0 and "Traceback" not in err, err


def test_unknown_ca_is_reported_unreachable(secured, tmp_path):
    broker, certs, inv, kid, key = secured
    bad = tmp_path / "inv.sqlite"
    with Inventory(bad) as iv:  # trusts another CA than the one that signed the broker's certificate
        iv.set_site(SITE, tls=1, trust_ca=certs.other_ca.decode(), host_user=ba.HOST_USER, host_password="pw-host")
    exp = Proc("--broker", f"{HOST}:{broker.port}", "--site", SITE, "--inventory", str(bad))
    try:
        exp.wait("unreachable")
        assert exp.scrape()[("gridshed_exporter_mqtt_connected", frozenset())] == 0.0
    finally:
        rc, err = exp.stop()
    assert rc == 0 and "Traceback" not in err, err
