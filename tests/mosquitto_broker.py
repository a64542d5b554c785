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


class Mosquitto:
    """A private Mosquitto on loopback: own config in a tmp dir, ephemeral port, killed at end."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.exe = require_tool("mosquitto", "mosquitto")
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
        self.conf.write_text(
            f"listener {self.port} {HOST}\nallow_anonymous true\npersistence false\n"
            f"user {pwd.getpwuid(os.getuid()).pw_name}\nlog_dest file {self.log}\n"
            "log_type all\n")
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

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(5)

    def logtext(self, tail: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""
