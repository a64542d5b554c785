"""The secure fleet channel's broker side on a real Mosquitto (issue 17): TLS listeners with
certificates made here (gridshed.brokerauth, `cryptography`), a password file in Mosquitto's own
PBKDF2 format, the ACL `gridshed broker-config` writes; the host client (paho, as `gridshed
shed --via mqtt` and `openadr-ven` use it) refusing an expired certificate, an unknown CA, a
hostname mismatch and a wrong password, each with its clear error."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from gridshed import brokerauth as ba
from gridshed import fleet_client as fc
from gridshed.errors import UserError
from gridshed.inventory import Inventory
from mosquitto_broker import HOST, Certs, Mosquitto

SITE = "s1"
USERS = {"dev1": "pw-dev1", "dev2": "pw-dev2", ba.HOST_USER: "pw-host"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def broker(certs: Certs, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    m = Mosquitto(tmp_path_factory.mktemp("mq"), users=USERS, acl=ba.acl_text({SITE: ["dev1", "dev2"]}),
                  tls=(certs, "server")).start()
    yield m
    m.stop()


def opts(certs: Certs, user: str | None = ba.HOST_USER, password: str | None = "pw-host", ca: bytes | None = None,
         server_name: str | None = None) -> fc.BrokerOpts:
    return fc.BrokerOpts(True, (ca or certs.ca).decode(), server_name, user, password)


class Client:
    """A logged-in paho client keeping every message it receives."""

    def __init__(self, port: int, o: fc.BrokerOpts, cid: str) -> None:
        self.msgs: list[tuple[str, bytes]] = []
        self.cv = threading.Condition()
        self.c = fc.paho_client(cid, o, HOST)
        self.c.on_message = self._on
        fc.connect_paho(self.c, HOST, port)

    def _on(self, client, userdata, m) -> None:  # type: ignore[no-untyped-def]
        with self.cv:
            self.msgs.append((m.topic, bytes(m.payload)))
            self.cv.notify_all()

    def sub(self, topic: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(topic, 1)
        assert done.wait(10)

    def wait_for(self, topic: str, payload: bytes, timeout: float = 15) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: (topic, payload) in self.msgs, timeout), self.msgs

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_passwd_format_is_mosquittos(tmp_path: Path) -> None:
    # the shape mosquitto_passwd 2.0 writes; the login tests below prove Mosquitto verifies it
    line = ba.passwd_line("u", "secret", salt=b"0123456789ab")
    user, h = line.split(":", 1)
    assert user == "u" and h.startswith("$7$101$") and len(h.split("$")[4]) == 88


def test_acl_device_confined_to_its_topics(broker: Mosquitto, certs: Certs) -> None:
    host = Client(broker.port, opts(certs), "host")
    dev1 = Client(broker.port, opts(certs, "dev1", "pw-dev1"), "dev1")
    try:
        host.sub(f"gridshed/{SITE}/+/state")
        dev1.sub(f"gridshed/{SITE}/#")  # asks for everything; the ACL lets only its own cmd through
        # dev1 poses as dev2 (state), and publishes a command: both dropped by the broker
        dev1.c.publish(f"gridshed/{SITE}/dev2/state", b"forged", qos=1, retain=True).wait_for_publish(5)
        dev1.c.publish(f"gridshed/{SITE}/dev2/cmd", b"forged-cmd", qos=1).wait_for_publish(5)
        dev1.c.publish(f"gridshed/{SITE}/dev1/state", b"mine", qos=1).wait_for_publish(5)
        host.wait_for(f"gridshed/{SITE}/dev1/state", b"mine")
        # the host publishes to dev2's cmd, dev1's cmd and the site's cmd
        for t, p in (("dev2/cmd", b"to-dev2"), ("dev1/cmd", b"to-dev1"), ("cmd", b"to-site")):
            host.c.publish(f"gridshed/{SITE}/{t}", p, qos=1).wait_for_publish(5)
        dev1.wait_for(f"gridshed/{SITE}/cmd", b"to-site")
        dev1.wait_for(f"gridshed/{SITE}/dev1/cmd", b"to-dev1")
        time.sleep(0.3)  # anything the broker would (wrongly) relay after the ordered messages
        assert (f"gridshed/{SITE}/dev2/state", b"forged") not in host.msgs
        got = {t for t, _ in dev1.msgs}
        assert got == {f"gridshed/{SITE}/cmd", f"gridshed/{SITE}/dev1/cmd"}, dev1.msgs
    finally:
        host.close()
        dev1.close()
    # a later subscriber to dev2's state finds nothing retained from dev1's forgery
    h2 = Client(broker.port, opts(certs), "host2")
    try:
        h2.sub(f"gridshed/{SITE}/dev2/state")
        time.sleep(0.5)
        assert not h2.msgs
    finally:
        h2.close()


def test_wrong_password_refused(broker: Mosquitto, certs: Certs) -> None:
    with pytest.raises(UserError, match="login refused"):
        Client(broker.port, opts(certs, "dev1", "wrong"), "x")
    with pytest.raises(UserError, match="login refused"):
        Client(broker.port, opts(certs, None, None), "anon")


def test_unknown_ca_refused(broker: Mosquitto, certs: Certs) -> None:
    with pytest.raises(UserError, match="TLS refused: unknown CA"):
        Client(broker.port, opts(certs, ca=certs.other_ca), "x")


def test_hostname_checked_against_server_name(broker: Mosquitto, certs: Certs) -> None:
    with pytest.raises(UserError, match="TLS refused: hostname mismatch"):
        Client(broker.port, opts(certs, server_name="broker.example"), "x")
    Client(broker.port, opts(certs, server_name="localhost"), "ok").close()  # a name in the SAN


@pytest.mark.parametrize("which,why", [("expired", "expired certificate"), ("future", "certificate not yet valid"),
                                       ("wrong_ca", "unknown CA"),
                                       ("wrong_host", "hostname mismatch")])
def test_bad_server_certificates_refused(certs: Certs, tmp_path: Path, which: str, why: str) -> None:
    m = Mosquitto(tmp_path, users=USERS, acl="", tls=(certs, which)).start()
    try:
        with pytest.raises(UserError, match=f"TLS refused: {why}"):
            Client(m.port, opts(certs), "x")
    finally:
        m.stop()


def test_broker_config_files_work(tmp_path: Path) -> None:
    # what `gridshed broker-config` writes runs a Mosquitto that lets the host and a provisioned
    # device in (and out of each other's way)
    with Inventory(tmp_path / "inv.sqlite") as inv:
        inv.record_provision("d1", "vboard", SITE, "00" * 8, b"k" * 32, None, "h")
        row = ba.record_site(inv, SITE, {"tls": True, "auth": "password"})
        creds = ba.issue_device(inv, "d1", row)
        assert creds and creds["password"]
        port = __import__("mosquitto_broker").free_port()
        out = ba.broker_config(inv, SITE, tmp_path / "conf", port=port, bind=HOST, server_names=["127.0.0.1"])
        host_opts = fc._site_opts(inv.site(SITE))
    conf = Path(out["files"]["conf"]).read_text()
    m = Mosquitto(tmp_path, port=port, listener_conf=conf).start()
    try:
        Client(port, host_opts, "host").close()
        dev = fc.BrokerOpts(True, host_opts.ca_pem, None, "d1", creds["password"])
        Client(port, dev, "d1").close()
        with pytest.raises(UserError, match="login refused"):
            Client(port, fc.BrokerOpts(True, host_opts.ca_pem, None, "d1", "nope"), "d1")
    finally:
        m.stop()


def test_inventory_backup_keeps_broker_secrets(tmp_path: Path) -> None:
    # `gridshed inventory export --show-keys` / `import` carry the site CA, the operator login and
    # each device's broker credentials (without them a restored host could not reach the broker)
    with Inventory(tmp_path / "a.sqlite") as inv:
        inv.record_provision("d1", "vboard", SITE, "00" * 8, b"k" * 32, None, "h")
        row = ba.record_site(inv, SITE, {"tls": True, "auth": "password"})
        ba.issue_device(inv, "d1", row)
        text = inv.export(show_key=True)
        plain = inv.export()
        want_site, want_creds = inv.site(SITE), inv.broker_creds("d1")
    assert "sites" not in plain and row["host_password"] not in plain
    with Inventory(tmp_path / "b.sqlite") as inv:
        assert inv.import_json(text) == 1
        got = inv.site(SITE)
        assert {k: got[k] for k in got if k != "updated_at"} == {k: want_site[k] for k in want_site if k != "updated_at"}
        got_c = inv.broker_creds("d1")
        assert {k: got_c[k] for k in ("kind", "username", "password")} == \
            {k: want_creds[k] for k in ("kind", "username", "password")}


def test_host_client_certificate_login(certs: Certs, tmp_path: Path) -> None:
    # auth = "cert": the broker requires a client certificate and takes its CN as the user name
    # (the ACL's); the host's certificate from the site CA logs in, no certificate is refused
    m = Mosquitto(tmp_path, users={}, acl=ba.acl_text({SITE: ["dev1"]}), tls=(certs, "server"),
                  client_certs=True).start()
    try:
        cert, key = certs.client(ba.HOST_USER)
        host = Client(m.port, fc.BrokerOpts(True, certs.ca.decode(), None, None, None, cert.decode(), key.decode()),
                      "host")
        host.sub(f"gridshed/{SITE}/+/state")
        host.close()
        assert f"u'{ba.HOST_USER}'" in m.logtext(10 ** 6)
        with pytest.raises(UserError, match="closed before CONNACK|TLS refused"):
            Client(m.port, opts(certs, None, None), "nocert")
    finally:
        m.stop()


def test_openadr_bridge_uses_the_sites_tls_and_login(broker: Mosquitto, certs: Certs, tmp_path: Path) -> None:
    # `gridshed openadr-ven --via mqtt` (its SiteSender) reaches a secured broker with the site's
    # TLS settings and operator login from the inventory, nothing given on its command line
    from gridshed.openadr import SiteSender

    inv_path = tmp_path / "inv.sqlite"
    with Inventory(inv_path) as inv:
        inv.record_provision("dev1", "unix-sim", SITE, "11" * 8, b"k" * 32, None, "h")
        inv.set_site(SITE, tls=1, auth="password", trust_ca=certs.ca.decode(), host_user=ba.HOST_USER,
                     host_password="pw-host")
    dev1 = Client(broker.port, opts(certs, "dev1", "pw-dev1"), "dev1-oadr")
    try:
        dev1.sub(f"gridshed/{SITE}/dev1/cmd")
        s = SiteSender(inv_path, via="mqtt", broker=f"{HOST}:{broker.port}", ack_timeout=0.3)
        res = s("shed", SITE, None, 60)
        assert res[0]["device"] == "dev1" and "error" in res[0]  # no board answers here
        with dev1.cv:
            assert dev1.cv.wait_for(lambda: dev1.msgs, 15)
        assert dev1.msgs[0][0] == f"gridshed/{SITE}/dev1/cmd" and dev1.msgs[0][1][:2] == b"\xd1\x84"
    finally:
        dev1.close()
    with Inventory(inv_path) as inv:  # the wrong operator password: the bridge says so
        inv.set_site(SITE, host_password="wrong")
    with pytest.raises(UserError, match="login refused"):
        SiteSender(inv_path, via="mqtt", broker=f"{HOST}:{broker.port}", ack_timeout=0.3)("shed", SITE, None, 60)


def test_issued_certificates_valid_from_2000() -> None:
    # a board whose clock is unset (2000 on an ESP32, 2021 on an RP2040) still accepts them
    from cryptography import x509

    ca, ca_key = ba.make_ca("c")
    for pem in (ca, ba.issue_cert(ca, ca_key, "b", sans=("10.0.0.5",))[0], ba.issue_cert(ca, ca_key, "d1", server=False)[0]):
        c = x509.load_pem_x509_certificate(pem)
        assert c.not_valid_before_utc.year == 2000 and c.not_valid_after_utc.year >= 2027
