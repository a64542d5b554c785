"""TLS to the broker (issue 17, docs/mqtt.md "Securing the broker"): the board's handshake on the
unix port with the event loop's longest gap during it, next to a plain connection measured the
same way in the same run (the reference), against a private Mosquitto set up as `gridshed
broker-config` writes it (TLS 1.2, EC P-256 site CA, password file, ACL)."""
from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import MP_DIR, ROOT, dist, free_port, last_json, run_mp, say

SECTIONS = ("tls",)
DEFAULT = True
sys.path.insert(0, str(ROOT / "host_tools"))


def add_args(ap: argparse.ArgumentParser) -> None:
    pass


def _pki() -> dict[str, Any]:
    """A site CA, the broker's certificate for 127.0.0.1 and the board's /broker.cbor (CA, login dev1)."""
    from gridshed import brokerauth as ba

    ca, ca_key = ba.make_ca("bench CA")
    cert, key = ba.issue_cert(ca, ca_key, "broker", sans=("127.0.0.1",))
    blob = ba.board_file({"tls": 1, "ca_cert": ca.decode()}, {"username": "dev1", "password": "pw"})
    return {"ca": ca, "cert": cert, "key": key, "blob": blob}


def _broker(work: Path, pki: dict[str, Any] | None) -> tuple[subprocess.Popen, int]:
    """A private Mosquitto: plain and anonymous, or (pki) TLS + password file + ACL as
    `gridshed broker-config` writes them."""
    from gridshed import brokerauth as ba

    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    head = (f"persistence false\nuser {pwd.getpwuid(os.getuid()).pw_name}\nmax_connections -1\n"
            f"log_dest file {work / 'mosquitto.log'}\n")
    if pki:
        files = {}
        for name, data in (("ca", pki["ca"]), ("cert", pki["cert"]), ("key", pki["key"]),
                           ("passwd", ba.passwd_line("dev1", "pw") + "\n"), ("acl", "user dev1\ntopic readwrite #\n")):
            p = work / name
            p.write_bytes(data if isinstance(data, bytes) else data.encode())
            files[name] = str(p)
        conf = head + ba.mosquitto_conf(port, files, bind="127.0.0.1")
    else:
        conf = head + f"listener {port} 127.0.0.1\nallow_anonymous true\n"
    (work / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen([exe, "-c", str(work / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def bench_tls(res: dict[str, Any], quick: bool) -> None:
    reps = 5 if quick else 30
    out: dict[str, Any] = {}
    for tls in (False, True):
        with tempfile.TemporaryDirectory() as d:
            work = Path(d)
            pki = _pki() if tls else None
            proc, port = _broker(work, pki)
            try:
                if pki:
                    (work / "broker.cbor").write_bytes(pki["blob"])  # read from the working directory, as on a board
                script = work / "tls_handshake.py"
                shutil.copyfile(MP_DIR / "tls_handshake.py", script)
                say(f"tls: {reps} {'TLS' if tls else 'plain'} connections on the unix port")
                r = last_json(run_mp(script, [str(port), str(reps), "1" if tls else "0"], heapsize="256wK",
                                     cwd=str(work))[0])
            finally:
                proc.kill()
                proc.wait(5)
        out["tls" if tls else "plain"] = {"connect_ms": dist(r["connect_ms"]), "gap_ms": dist(r["gap_ms"])}
    out["connect_ratio_p50"] = round(out["tls"]["connect_ms"]["p50"] / max(out["plain"]["connect_ms"]["p50"], 0.01), 1)
    res["tls"] = out
    # fleet fan-out: N client boards (bench/mp/fleet_client.py), one signed site command, the last
    # board's acknowledgement; plain and TLS + login in turn, same run (bench/fleet.py's round)
    import fleet
    from gridshed.fleet_client import BrokerOpts

    n, reps = (10, 3) if quick else (20, 5)
    fan: dict[str, Any] = {"n": n, "reps": reps}
    for name in ("plain", "tls"):
        with tempfile.TemporaryDirectory() as d:
            say(f"tls: fan-out to {n} client boards, {name}")
            if name == "tls":
                pki = _pki()
                opts = BrokerOpts(True, pki["ca"].decode(), None, "dev1", "pw")
                r = fleet.fleet_round(n, "client", reps, Path(d), tls=(lambda w: _broker(w, pki), pki["blob"], opts))
            else:
                r = fleet.fleet_round(n, "client", reps, Path(d))
        fan[name] = r
    try:
        fan["last_acted_ratio_p50"] = round(fan["tls"]["last_acted_ms"]["p50"] / fan["plain"]["last_acted_ms"]["p50"], 2)
    except (KeyError, TypeError, ZeroDivisionError):
        fan["last_acted_ratio_p50"] = None
    out["fanout"] = fan
    # the heap floor of the full-feature agent (bench/memory.py's bisect) with [mqtt] tls = true
    # and a password login; the plain floor is the memory section's figure
    import memory

    pki = _pki()
    say("tls: heap floor of the full-feature agent with MQTT over TLS + login")
    out["full_features_tls"] = memory.bench_full_features(
        quick, tls=(lambda work: _broker(work, pki), {"tls": True, "auth": "password", "server_name": "127.0.0.1"},
                    pki["blob"]), guess=136)


def run(res: dict[str, Any], a: argparse.Namespace) -> None:
    bench_tls(res, a.quick)


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    t = res.get("tls")
    if not t:
        return []
    ff = t.get("full_features_tls") or {}
    plain = ((res.get("memory") or {}).get("full_features") or {}).get("min_heapsize_wK")
    rows = [("10 full-feature agent, MQTT over TLS", "%swK" % ff.get("min_heapsize_wK"),
             "plain MQTT: %s (section 4)" % ("%swK" % plain if plain else "not run"))] if ff else []
    fo = t.get("fanout")
    if fo:
        rows.append(("10 fan-out N=%d over TLS (last acted)" % fo["n"],
                     "p50 %s ms" % (fo["tls"].get("last_acted_ms") or {}).get("p50"),
                     "plain p50 %s ms: x%s" % ((fo["plain"].get("last_acted_ms") or {}).get("p50"), fo["last_acted_ratio_p50"])))
    return rows + [("10 TLS connect (open -> CONNACK)", "p50 %s max %s ms" % (t["tls"]["connect_ms"]["p50"], t["tls"]["connect_ms"]["max"]),
             "plain p50 %s ms: x%s" % (t["plain"]["connect_ms"]["p50"], t["connect_ratio_p50"])),
            ("10 TLS longest loop gap in a handshake", "p50 %s max %s ms" % (t["tls"]["gap_ms"]["p50"], t["tls"]["gap_ms"]["max"]),
             "plain: max %s ms (1 ms ticker)" % t["plain"]["gap_ms"]["max"])]
