"""The virtual board: real micropython on a pty, Ctrl-C to the REPL, reboots behind one stable port."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

from gridshed.transport import Board
from gridshed.vboard import VirtualBoard

MAIN = """\
import time
print("booted", "%s")
while True:
    time.sleep(0.05)
"""


def read_until(s: serial.Serial, token: bytes, timeout: float = 20.0) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while token not in buf and time.monotonic() < end:
        buf += s.read(s.in_waiting or 1)
    return buf


@pytest.fixture
def vb(tmp_path: Path):
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "main.py").write_text(MAIN % "v1")
    board = VirtualBoard(fs, sim_config={"gpio": "127.0.0.1:1", "uarts": {}})
    board.start()
    assert board.wait_output("booted v1", 30), board.output()
    yield board
    board.stop()


def test_ctrl_c_from_host_reaches_the_repl(vb):
    with serial.Serial(vb.port, 115200, timeout=0.05) as s:
        s.write(b"\x03")
        out = read_until(s, b">>> ")
        assert b"KeyboardInterrupt" in out and out.endswith(b">>> ")
        s.write(b"print(6*7)\r")
        assert b"42" in read_until(s, b"42")


def test_reboot_keeps_the_same_port_open(vb):
    port = vb.port
    with serial.Serial(port, 115200, timeout=0.05) as s:
        s.write(b"\x03")
        read_until(s, b">>> ")
        s.write(b"\x04")                      # Ctrl-D at the REPL: the unix process exits
        assert vb.wait_restarts(1, 30)
        out = read_until(s, b"booted v1")     # same open port sees the new boot
        assert b"booted v1" in out
    assert vb.port == port and vb.restarts == 1 and vb.exit_codes[0] == 0


def test_mpremote_resume_works_on_the_port(vb):
    r = subprocess.run([str(Path(sys.executable).with_name("mpremote")), "connect", vb.port, "resume",
                        "exec", "import os; print(sorted(os.listdir()))"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "'main.py'" in r.stdout and "'sim.json'" in r.stdout


def test_board_helper_and_log_capture(vb):
    with Board(vb.port) as b:
        assert b.eval("1+2") == 3
        b.put("x.txt", b"hello")
        assert b.get("x.txt") == b"hello"
        assert b.get("nope.txt") is None
        b.restart_agent()
    assert vb.wait_restarts(1, 30)
    assert vb.wait_output("booted v1", 30, since=0)
    log = vb.log_path.read_text(errors="replace")
    assert "raw REPL; CTRL-B to exit" in log and "[vboard" in log and "exit 0" in log
    assert (vb.fs_dir / "x.txt").read_bytes() == b"hello"


def test_blank_board_boots_to_repl_and_hard_reset(tmp_path):
    with VirtualBoard(tmp_path / "blank") as b:
        with serial.Serial(b.port, 115200, timeout=0.05) as s:
            s.write(b"\r")
            assert b">>> " in read_until(s, b">>> ")
        pid = b.pid
        b.reset()
        assert b.wait_restarts(1, 30) and b.pid != pid
