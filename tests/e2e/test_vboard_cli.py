"""`gridshed vboard` as a technician uses it: started as a program, its port printed first, the
other gridshed commands pointed at that port, Ctrl-C to stop.

The status hash check is the one issue 11 reported: `gridshed status` must show (and write into
the inventory) the config hash the board, `monitor` and `provision` report.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gridshed.boards import budget_heapsize, load_board

HEAP = budget_heapsize(load_board("unix-sim"))
GRIDSHED = [sys.executable, "-m", "gridshed.cli"]


class VboardProc:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen([*GRIDSHED, "vboard", "--heapsize", HEAP, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # EOF

    def wait_line(self, needle: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if needle in line:
                return line
            assert line or self.p.poll() is None, f"vboard exited: {self.seen} {self.p.stderr.read()}"
        raise AssertionError(f"no {needle!r} from gridshed vboard; got {self.seen}")

    def interrupt(self) -> tuple[int, str, str]:
        self.p.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal does
        rc = self.p.wait(60)
        while True:  # the reader thread puts "" at EOF
            line = self.lines.get(timeout=30)
            if line == "":  # gridshed vboard prints no empty line
                break
            self.seen.append(line)
        return rc, "\n".join(self.seen), self.p.stderr.read()


def gs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDSHED, *args], capture_output=True, text=True, timeout=180, env=env)


def test_vboard_status_provision_same_hash_then_ctrl_c(tmp_path):
    env = dict(os.environ, GRIDSHED_INVENTORY=str(tmp_path / "inv.sqlite"))
    vb = VboardProc("--dir", str(tmp_path / "board"), env=env)
    try:
        first = vb.wait_line("", timeout=60)
        assert first.startswith("port: /dev/pts/"), vb.seen
        port = first.split()[1]
        vb.wait_line("ready: the agent polls the meter")
        st = gs("status", "--port", port, "--json", env=env)
        assert st.returncode == 0, st.stderr
        s = json.loads(st.stdout)
        assert s["device"] == "ctl-1" and s["meter_ok"] and abs(s["hz"] - 60.0) < 0.01 and s["state"] == "normal"
        assert s["kw"] == 369.0  # the simulated load behind the four closed blocks
        # provision it, then status / monitor / inventory all show the board's own hash
        pr = gs("provision", "--port", port, "--site", "demo-site.toml", "--device-id", "train-1", "--json", env=env)
        assert pr.returncode == 0, pr.stderr
        h = json.loads(pr.stdout)["config_hash"]
        st = gs("status", "--port", port, "--json", env=env)
        s = json.loads(st.stdout)
        assert s["device"] == "train-1" and s["config_hash"] == h and s["inventory_updated"]
        mon = gs("monitor", "--port", port, "--json", "--count", "1", env=env)
        assert json.loads(mon.stdout.splitlines()[0])["config_hash"] == h
        inv = json.loads(gs("inventory", "--json", "show", "train-1", env=env).stdout)
        assert inv["config_hash"] == h and inv["firmware_build"] == s["build"]
        vb.wait_line("board restarted")  # provision restarted the agent: the tool said so
    finally:
        rc, out, err = vb.interrupt()
    assert rc == 0, err
    last = out.rstrip().splitlines()[-1]
    assert "stopped: board and simulated meter shut down" in last
    # the agent's health over the session (provision restarted it once): no MemoryError, no
    # traceback, no crash on its console
    assert last.endswith("1 restart(s), 0 MemoryError(s), 0 traceback(s), 0 crash(es))"), last
    assert "Traceback" not in err, err
    # the board's files stay in --dir: a second start boots the provisioned config
    vb = VboardProc("--dir", str(tmp_path / "board"), "--json", env=env)
    try:
        first = json.loads(vb.wait_line("", timeout=60))
        assert first["event"] == "port" and first["port"].startswith("/dev/pts/")
        board = json.loads(vb.wait_line('"event": "board"'))
        assert board["kept_config"] is True and board["device"] == "train-1" and board["pid"] == vb.p.pid
        vb.wait_line('"event": "ready"')
        # training a pulled cable: SIGUSR1 pulls it (nothing passes), the next one plugs it back
        vb.p.send_signal(signal.SIGUSR1)
        assert json.loads(vb.wait_line('"event": "cable"'))["plugged"] is False
        r = gs("status", "--port", first["port"], "--timeout", "1", env=env)
        assert r.returncode == 2 and "no answer to @status within 1 s; is the agent running, the cable in?" in r.stderr, r.stderr
        vb.p.send_signal(signal.SIGUSR1)
        assert json.loads(vb.wait_line('"event": "cable"'))["plugged"] is True
        s = json.loads(gs("status", "--port", first["port"], "--json", env=env).stdout)
        assert s["device"] == "train-1" and s["config_hash"] == h
    finally:
        rc, out, err = vb.interrupt()
    assert rc == 0 and "Traceback" not in err, err
    stopped = json.loads(out.rstrip().splitlines()[-1])
    assert stopped["event"] == "stopped" and stopped["health"]["memory_errors"] == 0
    assert stopped["health"]["tracebacks"] == 0 and stopped["health"]["restarts"] == 0


def test_vboard_plays_a_scenario_and_the_trip_shows(tmp_path):
    scn = tmp_path / "dip.csv"
    scn.write_text("t_s,hz\n0,60\n1,60\n1.3,59.5\n30,59.5\n")
    env = dict(os.environ, GRIDSHED_INVENTORY=str(tmp_path / "inv.sqlite"))
    vb = VboardProc("--scenario", str(scn), env=env)
    try:
        port = vb.wait_line("", timeout=60).split()[1]
        vb.wait_line("scenario dip starts")
        vb.wait_line("relay row-a      OPEN   (shed)")
        s = json.loads(gs("status", "--port", port, "--json", env=env).stdout)
        assert s["state"] == "tripped" and s["mask"] == 0
    finally:
        rc, out, err = vb.interrupt()
    assert rc == 0 and "Traceback" not in err, err
    assert "0 restart(s), 0 MemoryError(s), 0 traceback(s), 0 crash(es)" in out
    assert not Path(out.splitlines()[1].split("files in ")[1].split(" ")[0]).exists()  # temporary dir removed


def doc_walkthrough() -> list[str]:
    """The technician's commands of docs/bring-up.md's training walk-through (terminal 2)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "bring-up.md").read_text()
    part = text.split("## Practising without hardware", 1)[1].split("Terminal 2", 1)[1]
    block = part.split("```", 2)[1]
    cmds = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith("gridshed "):
            cmds.append(line)
    return cmds


def test_bring_up_training_walkthrough_runs_as_written(tmp_path):
    """Every command of the walk-through, as the doc writes it, against a running gridshed vboard."""
    cmds = doc_walkthrough()
    assert len(cmds) >= 9 and any(c.startswith("gridshed shed ") for c in cmds), cmds
    env = dict(os.environ, GRIDSHED_INVENTORY=str(tmp_path / "inventory.sqlite"),
               GRIDSHED_EVENTS_STATE=str(tmp_path / "events-state.json"))
    vb = VboardProc("--dir", str(tmp_path / "board1"), env=env)
    try:
        port = vb.wait_line("", timeout=60).split()[1]
        vb.wait_line("ready: the agent polls the meter")
        for c in cmds:
            argv = [a.replace("$P", port) for a in c.split()[1:]]
            r = subprocess.run([*GRIDSHED, *argv], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
            assert r.returncode == 0 and "Traceback" not in r.stderr, (c, r.stdout[-2000:], r.stderr[-2000:])
            if argv[0] == "shed":
                vb.wait_line("relay row-a      OPEN   (shed)")
                assert "accepted" in r.stdout
        page = (tmp_path / "training.html").read_text()
        assert "signed command" in page and "train-1" in page
    finally:
        rc, out, err = vb.interrupt()
    assert rc == 0 and "Traceback" not in err, err
