"""The board's TLS and login to the broker (agent/mqtt_tls.py, agent.mqtt_client) in the real
micropython (its `ssl` module, mbedTLS) against real Mosquitto TLS listeners whose certificates
are made in the test: the good broker (CA and name checked, password login) is reached; an
expired server certificate, one from another CA, one for another host name and a wrong password
are each refused and named (the names agent/features/mqtt.py counts, journals and shows in @status)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gridshed import brokerauth as ba
from mosquitto_broker import Certs, Mosquitto

USERS = {"dev1": "pw-dev1"}

SCRIPT = r"""
import sys, json, asyncio, time
sys.path.insert(0, ".")
from agent import mqtt_tls
from agent.mqtt_client import MqttClient
cases = json.loads(open("cases.json").read())
res = {}
gap = [0]
async def ticker():
    last = time.ticks_ms()
    while True:
        await asyncio.sleep_ms(1)
        n = time.ticks_ms()
        d = time.ticks_diff(n, last)
        if d > gap[0]:
            gap[0] = d
        last = n
def client(name, c):
    open("broker.cbor", "wb").write(bytes.fromhex(c["file"]))
    kw, why = mqtt_tls.options({"host": "127.0.0.1", "tls": True, "auth": c.get("auth", "password"),
                                "server_name": c.get("name", "")}, c["user"])
    assert why is None, why
    r = res[name] = {"fail": [], "connected": 0}
    def on_fail(e):
        r["fail"].append(mqtt_tls.reason(e))
        return r["fail"][-1] is not None
    def on_connect(cl):
        r["connected"] += 1
        cl.publish("gridshed/s1/dev1/state", "hello", True, 1)
    return MqttClient("127.0.0.1", c["port"], name, on_fail=on_fail, on_connect=on_connect,
                      backoff_min=0.2, backoff_max=0.4, **kw)
async def main():
    asyncio.create_task(ticker())
    cs = [client(n, c) for n, c in cases.items()]
    for cl in cs:
        asyncio.create_task(cl.run())
    t0 = time.ticks_ms()
    while time.ticks_diff(time.ticks_ms(), t0) < 60000:
        await asyncio.sleep_ms(100)
        if all(r["connected"] or len(r["fail"]) >= 2 for r in res.values()):
            break
    for n, cl in zip(cases, cs):
        res[n]["stats"] = cl.stats()
        res[n]["err"] = repr(cl.last_error)
    print("RESULT", json.dumps({"res": res, "gap_ms": gap[0]}))
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    certs = Certs(tmp_path_factory.mktemp("certs"))
    acl = ba.acl_text({"s1": ["dev1"]})
    ms = {w: Mosquitto(tmp_path_factory.mktemp(w), users=USERS, acl=acl, tls=(certs, w)).start()
          for w in ("server", "expired", "future", "wrong_ca", "wrong_host")}
    # mutual TLS: a client certificate required, its CN is the user name the ACL knows
    ms["mtls"] = Mosquitto(tmp_path_factory.mktemp("mtls"), users={}, acl=acl, tls=(certs, "server"),
                           client_certs=True).start()
    yield certs, ms
    for m in ms.values():
        m.stop()


def board_file(certs: Certs, user: str, password: str) -> str:
    row = {"tls": 1, "ca_cert": certs.ca.decode()}
    return ba.board_file(row, {"username": user, "password": password}).hex()  # type: ignore[union-attr]


def cert_file(certs: Certs, cn: str) -> str:
    cert, key = certs.client(cn)
    row = {"tls": 1, "ca_cert": certs.ca.decode()}
    return ba.board_file(row, {"username": cn, "cert": cert.decode(), "key": key.decode()}).hex()  # type: ignore[union-attr]


def test_tls_refusals_named(mp, brokers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    certs, ms = brokers
    good = board_file(certs, "dev1", "pw-dev1")
    cases = {
        "ok": {"port": ms["server"].port, "user": "dev1", "file": good},
        "ok_by_name": {"port": ms["server"].port, "user": "dev1", "file": good, "name": "localhost"},
        "expired": {"port": ms["expired"].port, "user": "dev1", "file": good},
        "future": {"port": ms["future"].port, "user": "dev1", "file": good},
        "wrong_ca": {"port": ms["wrong_ca"].port, "user": "dev1", "file": good},
        "wrong_host": {"port": ms["wrong_host"].port, "user": "dev1", "file": good},
        "name_mismatch": {"port": ms["server"].port, "user": "dev1", "file": good, "name": "broker.example"},
        "password": {"port": ms["server"].port, "user": "dev1", "file": board_file(certs, "dev1", "nope")},
        "mtls": {"port": ms["mtls"].port, "user": "dev1", "auth": "cert", "file": cert_file(certs, "dev1")},
    }
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    # the module reads /broker.cbor from the working directory, as on a board
    r = mp.run(SCRIPT, heapsize="256k", cwd=tmp_path, timeout=120)
    line = [x for x in r.out.splitlines() if x.startswith("RESULT ")]
    assert line, r.out + r.err
    out = json.loads(line[0][7:])
    res = out["res"]
    for ok in ("ok", "ok_by_name", "mtls"):
        assert res[ok]["connected"] == 1 and not res[ok]["fail"], res[ok]
    want = {"expired": "tls-expired", "future": "tls-not-yet-valid", "wrong_ca": "tls-unknown-ca", "wrong_host": "tls-hostname",
            "name_mismatch": "tls-hostname", "password": "login-refused"}
    for case, why in want.items():
        assert not res[case]["connected"], res[case]
        assert res[case]["fail"][:2] == [why, why], (case, {k: (v["fail"], v["err"]) for k, v in res.items()})
        st = res[case]["stats"]
        assert st["malformed"] == 0 and st["failures"] >= 2, (case, st)  # back-off, then again
    print(f"\nlongest event-loop gap with 8 TLS clients connecting: {out['gap_ms']} ms")
    # the client certificate's CN was the login: Mosquitto names the user dev1 for it
    assert "u'dev1'" in ms["mtls"].logtext(10 ** 6), ms["mtls"].logtext()


def test_missing_credentials_never_connect_in_clear(mp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = mp.run(r"""
from agent import mqtt_tls
print(mqtt_tls.options({"host": "h", "tls": True, "auth": "none"}, "d"))
print(mqtt_tls.options({"host": "h", "tls": False, "auth": "password"}, "d"))
print(mqtt_tls.options({"host": "h", "tls": False, "auth": "none"}, "d"))
""", heapsize="256k", cwd=tmp_path)
    assert r.out.split() == ["(None,", "'no-credentials')", "(None,", "'no-credentials')", "({},", "None)"], r.out


STEADY = r"""
from agent import control, mqtt_tls
class C:
    restore_hz = 59.95
    bad_why = 0
class R:
    mask = 15
class A:
    pass
a = A(); a.ctrl = C(); a.relays = R(); a.meter_ok = True; a.hz = 60.0
out = []
def t(**kw):
    for k, v in kw.items():
        setattr(a.ctrl if k in ("state", "bad_why") else a.relays if k == "mask" else a, k, v)
    out.append(mqtt_tls.steady(a))
t(state=control.NORMAL)                    # healthy
t(hz=59.9)                                 # below restore_hz: a trip may be coming
t(hz=60.0, state=control.PICKUP)           # the pickup timer runs
t(state=control.RESTORE_HOLD)              # a timed restore step
t(state=control.RESTORING)
t(state=control.TRIPPED)                   # shed, frequency healthy
t(meter_ok=False)                          # meter silent, blocks still closed
t(mask=0)                                  # ... every block open: nothing left to trip
t(state=control.DISARMED, mask=15, meter_ok=True)
t(state=control.NORMAL, bad_why=2)         # an implausible sample
print(out)
"""


def test_tls_connects_only_while_steady(mp) -> None:  # type: ignore[no-untyped-def]
    r = mp.run(STEADY, heapsize="256k")
    assert r.out.strip() == "[True, False, False, False, False, True, False, True, True, False]", r.out


FUZZ = r"""
import json
from agent import mqtt_tls, cbor, integrity
cases = json.loads(open("fuzz.json").read())
out = {}
for name, c in cases.items():
    raw = bytes.fromhex(c["raw"]) if "raw" in c else integrity.wrap(cbor.dumps(c["obj"]))
    open("broker.cbor", "wb").write(raw)
    for auth in ("password", "cert", "none"):
        try:
            kw, why = mqtt_tls.options({"host": "127.0.0.1", "tls": True, "auth": auth, "server_name": ""}, "dev1")
            res = why if why else "ok"
        except Exception as e:  # must never happen: the agent's feature start would fail
            res = "RAISED %r" % (e,)
        out[name + "/" + auth] = res
print("RESULT", json.dumps(out))
"""


def test_damaged_broker_file_never_raises(mp, brokers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import random

    import cbor2

    from gridshed import siteconfig

    certs, _ = brokers
    good = bytes.fromhex(board_file(certs, "dev1", "pw"))
    cases: dict = {"good": {"raw": good.hex()}, "empty": {"raw": ""}, "not-cbor": {"raw": "47534931"},
                   "list": {"obj": [1, 2]}, "ca-int": {"obj": {"ca": 5, "user": "d", "pass": "p"}},
                   "ca-str": {"obj": {"ca": "x", "user": "d", "pass": "p"}},
                   "ca-junk": {"obj": {"ca": "##", "user": "d", "pass": "p"}},
                   "pass-bytes": {"obj": {"ca": "@@", "user": "d", "pass": "@@"}},
                   "user-int": {"obj": {"ca": "@@", "user": 7, "pass": "p"}},
                   "cert-junk": {"obj": {"ca": "@@", "user": "d", "cert": "@@", "key": "@@"}}}
    ca_der = bytes(siteconfig.read_settings(good)["ca"])
    for c in cases.values():  # "@@": the real CA's bytes as "ca", else junk DER; "##": junk
        if "obj" in c and isinstance(c["obj"], dict):
            for k, v in list(c["obj"].items()):
                if v == "@@":
                    c["obj"][k] = ca_der if k == "ca" else b"\x30\x03junk"
                elif v == "##":
                    c["obj"][k] = b"\x30\x03junk"
    rnd = random.Random(17)
    for i in range(40):  # flipped bytes of the good file: the CRC refuses them, or they parse
        b = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        cases[f"flip{i}"] = {"raw": bytes(b).hex()}
    enc = {n: ({"raw": c["raw"]} if "raw" in c else {"raw": siteconfig.integrity.wrap(cbor2.dumps(c["obj"])).hex()})
           for n, c in cases.items()}
    (tmp_path / "fuzz.json").write_text(json.dumps(enc))
    r = mp.run(FUZZ, heapsize="256k", cwd=tmp_path, timeout=120)
    line = [x for x in r.out.splitlines() if x.startswith("RESULT ")]
    assert line, r.out + r.err
    out = json.loads(line[0][7:])
    raised = {k: v for k, v in out.items() if v.startswith("RAISED")}
    assert not raised, raised
    assert out["good/password"] == "ok" and out["good/cert"] == "no-credentials"
    assert all(out[f"{n}/password"] == "no-credentials" for n in
               ("empty", "not-cbor", "list", "ca-int", "ca-str", "ca-junk", "pass-bytes", "user-int"))
    assert out["cert-junk/cert"] == "no-credentials"
