"""A private Mosquitto on loopback for tests (MQTT codec, client, fleet, OpenADR bridge): its own
config in a tmp dir, an ephemeral port, killed at teardown. One implementation for every suite."""
from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import require_tool

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Certs:
    """Certificates made in the test with `cryptography` (gridshed.brokerauth): a site CA, the
    broker's server certificate (SAN 127.0.0.1 and localhost), one that expired, one not valid
    before the day after tomorrow (a board whose clock is behind), one whose SAN
    names another host, one from another CA (each with its key), written as PEM files in workdir."""

    def __init__(self, workdir: Path) -> None:
        import datetime as dt

        from gridshed import brokerauth as ba

        self.dir = workdir
        self.ca, self.ca_key = ba.make_ca("gridshed test site CA")
        self.other_ca, other_key = ba.make_ca("some other CA")
        self.server = ba.issue_cert(self.ca, self.ca_key, "broker", sans=("127.0.0.1", "localhost"))
        old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)
        self.expired = ba.issue_cert(self.ca, self.ca_key, "broker", sans=("127.0.0.1", "localhost"),
                                     not_before=old, not_after=old + dt.timedelta(days=30))
        soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
        self.future = ba.issue_cert(self.ca, self.ca_key, "broker", sans=("127.0.0.1", "localhost"),
                                    not_before=soon, not_after=soon + dt.timedelta(days=30))
        self.wrong_host = ba.issue_cert(self.ca, self.ca_key, "broker", sans=("broker.example",))
        self.wrong_ca = ba.issue_cert(self.other_ca, other_key, "broker", sans=("127.0.0.1", "localhost"))
        self.files: dict[str, Path] = {}
        for name, pem in (("ca", self.ca), ("other_ca", self.other_ca)):
            self.files[name] = self._write(name + ".pem", pem)
        for name in ("server", "expired", "future", "wrong_host", "wrong_ca"):
            cert, key = getattr(self, name)
            self.files[name] = self._write(name + ".crt", cert)
            self.files[name + "_key"] = self._write(name + ".key", key)

    def _write(self, name: str, data: bytes) -> Path:
        p = self.dir / name
        p.write_bytes(data)
        p.chmod(0o600)
        return p

    def client(self, cn: str) -> tuple[bytes, bytes]:
        """A client certificate for user cn (mutual TLS), signed by the site CA."""
        from gridshed import brokerauth as ba

        return ba.issue_cert(self.ca, self.ca_key, cn, server=False)


class Mosquitto:
    """A private Mosquitto on loopback: own config in a tmp dir, ephemeral port, killed at end.

    Secure options: users {name: password} (a password file, anonymous refused), acl (the ACL
    file's text), tls: (certs, which server certificate: "server", "expired", "wrong_host",
    "wrong_ca"), client_certs (require one; its CN is the user name)."""

    def __init__(self, workdir: Path, port: int | None = None, users: dict[str, str] | None = None,
                 acl: str | None = None, tls: "tuple[Certs, str] | None" = None,
                 client_certs: bool = False, listener_conf: str | None = None) -> None:
        self.exe = require_tool("mosquitto", "mosquitto")
        self.users = users
        self.acl = acl
        self.tls = tls
        self.client_certs = client_certs
        self.listener_conf = listener_conf  # a whole listener block (gridshed broker-config's)
        self.dir = workdir
        self.auto_port = port is None
        self.started = False
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        # an auto-chosen port is found free here and bound by mosquitto later: a race with the
        # rest of the machine, so a first start that exits at once is retried on another port
        for _ in range(3):
            if self._start():  # False only for an auto-chosen port that never started
                return self
            self.port = free_port()
        pytest.fail(f"mosquitto exited {self.proc.returncode}: {self.logtext()}")

    def _start(self) -> bool:
        self.conf.write_text(self.config_text())
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self.auto_port and not self.started:
                    return False
                pytest.fail(f"mosquitto exited {self.proc.returncode}: {self.logtext()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                if self.proc.poll() is None:
                    self.started = True
                    return True
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"mosquitto did not listen on {self.port}: {self.logtext()}")

    def config_text(self) -> str:
        from gridshed import brokerauth as ba

        head = (f"persistence false\nuser {pwd.getpwuid(os.getuid()).pw_name}\n"
                f"log_dest file {self.log}\nlog_type all\n")
        if self.listener_conf is not None:
            return head + self.listener_conf
        if self.users is None and self.acl is None and self.tls is None:
            return head + f"listener {self.port} {HOST}\nallow_anonymous true\n"
        files: dict[str, str] = {}
        pw = self.dir / "passwd"
        pw.write_text("".join(ba.passwd_line(u, p) + "\n" for u, p in (self.users or {}).items()))
        pw.chmod(0o600)
        files["passwd"] = str(pw)
        acl = self.dir / "acl"
        acl.write_text(self.acl if self.acl is not None else "")
        acl.chmod(0o600)
        files["acl"] = str(acl)
        if self.tls is not None:
            certs, which = self.tls
            files["ca"] = str(certs.files["ca"])
            files["cert"] = str(certs.files[which])
            files["key"] = str(certs.files[which + "_key"])
        return head + ba.mosquitto_conf(self.port, files, tls=self.tls is not None,
                                        client_certs=self.client_certs, bind=HOST)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(5)

    def logtext(self, tail: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""
