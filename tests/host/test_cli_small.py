"""CLI details a technician trips over (issue 11, smaller items), each through the real `gridshed`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gridshed.cli import main

ROOT = Path(__file__).resolve().parents[2]
GRIDSHED = [sys.executable, "-m", "gridshed.cli"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDSHED, *args], capture_output=True, text=True, timeout=120, **kw)


def test_closed_pipe_is_quiet():
    # `gridshed meters | head -1`: the reader leaves after one line
    p = subprocess.run(f"{sys.executable} -m gridshed.cli meters | head -1; "
                       f"{sys.executable} -m gridshed.cli boards | head -1; "
                       f"{sys.executable} -m gridshed.cli meters --json | head -c 10",
                       shell=True, capture_output=True, text=True, timeout=120)
    assert p.stdout.startswith("model")
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_kw_is_offered_by_shed_only(capsys):
    for verb in ("restore", "arm", "disarm", "test", "ping"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--kw" not in capsys.readouterr().out, verb
        with pytest.raises(SystemExit) as exc:
            main([verb, "--device", "d1", "--port", "/dev/null", "--kw", "5"])
        assert exc.value.code == 2 and "unrecognized arguments: --kw 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shed", "--help"])
    assert "--kw" in capsys.readouterr().out


def test_json_before_the_subcommand_counts(tmp_path, capsys):
    from gridshed.inventory import Inventory

    db = tmp_path / "inv.sqlite"
    with Inventory(db) as inv:
        inv.record_provision("a-very-long-device-name-that-is-wider-than-a-column-01", "esp32-devkitc-max3485",
                             "a-site-with-a-long-name", "00" * 8, b"k" * 32, "build1", "0123456789abcdef")
    for argv in (["inventory", "--inventory", str(db), "--json", "list"],
                 ["inventory", "--json", "--inventory", str(db), "list"],
                 ["inventory", "--inventory", str(db), "list", "--json"]):
        assert main(argv) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows[0]["device_id"].startswith("a-very-long-device-name"), argv
    # names are never cut, also when the output is not a terminal (80 columns by default)
    p = run("inventory", "--inventory", str(db), "list", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert "a-very-long-device-name-that-is-wider-than-a-column-01" in p.stdout
    assert "a-site-with-a-long-name" in p.stdout and "…" not in p.stdout
    p = run("boards", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert "esp32-devkitc-max3485" in p.stdout and "…" not in p.stdout


def test_missing_port_is_named_as_missing():
    from gridshed.errors import UserError
    from gridshed.transport import Board

    with pytest.raises(UserError) as exc:
        Board("/dev/ttyGRIDSHED-NOPE")
    msg = str(exc.value)
    assert "no such port" in msg and "another program" not in msg


def test_a_port_held_by_another_program_is_waited_for():
    """`gridshed monitor` holds the port once per refresh: Board (mpremote) and Console (pyserial)
    opens wait for it (transport.BUSY_WAIT) instead of failing at once; a missing port is named so
    by both at once."""
    import os
    import threading

    import serial

    from gridshed.errors import UserError
    from gridshed.transport import Board, Console

    master, slave = os.openpty()
    port = os.ttyname(slave)
    try:
        for opener in (Board, Console):
            held = serial.Serial(port, exclusive=True)  # another program has it, for 0.5 s
            threading.Timer(0.5, held.close).start()
            opener(port).close()  # before: "failed to access" / "Could not exclusively lock port"
        for opener in (Board, Console):
            with pytest.raises(UserError) as exc:
                opener("/dev/ttyGRIDSHED-NOPE")
            assert "no such port (is the board plugged in?" in str(exc.value)
    finally:
        os.close(master)
        os.close(slave)


def test_other_grid_settings_are_refused(tmp_path, capsys):
    """50 Hz settings on a 60 Hz site (and the reverse): one line naming the keys, exit 2."""
    demo = (ROOT / "scenarios" / "demo-site.toml").read_text()
    site = tmp_path / "site.toml"
    site.write_text(demo.replace("pickup_hz = 59.7", "pickup_hz = 49.7").replace("restore_hz = 59.9", "restore_hz = 49.9"))
    assert main(["provision", "--site", str(site), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gridshed: error: {site}: trip.pickup_hz: 49.7 is not a plausible under-frequency pickup for a "
                   f"60 Hz grid (57.0..60 Hz); trip.restore_hz: 49.9 is more than 3.0 Hz below the 60 Hz nominal"]
    site.write_text(demo.replace("nominal_hz = 60", "nominal_hz = 50"))
    assert main(["provision", "--site", str(site), "--check"]) == 2
    assert "59.7 is not a plausible under-frequency pickup for a 50 Hz grid" in capsys.readouterr().err
    # the shipped sites are inside the band
    for name in ("demo-site.toml", "gb-site.toml", "signal-site.toml"):
        assert main(["provision", "--site", name, "--check"]) == 0, name
        capsys.readouterr()


def test_vboard_user_errors_are_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for argv, why in ((["--heapsize", "abc"], "--heapsize abc: not a heap size"),
                      (["--dir", str(f)], "not a directory"),
                      (["--scenario", str(tmp_path / "nope.csv")], "cannot read scenario"),
                      (["--site", "gb-site.toml", "--scenario", "ercot_ffr_dip.csv", "--heapsize", "1x"],
                       "not a heap size")):
        assert main(["vboard", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, err
    # a 60 Hz scenario on a 50 Hz site is warned about before anything starts
    assert "plays a 60 Hz grid but gb-site.toml is a 50 Hz site" in err


def test_a_board_error_instead_of_a_nonce_is_said(tmp_path):
    """A board short of RAM answers `@nonce` with its error: the line says that, not "firmware
    older than the freshness rules" (found on the market site at 80wK)."""
    from gridshed.errors import UserError
    from gridshed.fleet_client import nonce_serial
    from gridshed.vboard import VirtualBoard

    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "main.py").write_text(
        "import sys\nprint('I agent up')\nwhile True:\n l = sys.stdin.readline()\n"
        " if l.startswith('@'):\n  print('@{\"error\": \"MemoryError(\\'memory allocation failed\\',)\", \"end\": true}')\n")
    with VirtualBoard(fs, heapsize="32wK") as vb:
        assert vb.wait_output("agent up", 30)
        with pytest.raises(UserError) as e:
            nonce_serial(vb.port)
        assert str(e.value) == f"{vb.port}: the agent could not give a nonce: MemoryError('memory allocation failed',)"


def test_a_restart_that_forgets_the_time_of_a_market_schedule_is_said(tmp_path):
    """Every host op that restarts the agent (deploy, provision, rotate-key) leaves a market
    schedule unexecuted until the next signed time (the walk found the economic load back on,
    silently): the op's warnings say so, naming the time-sync to run."""
    from gridshed.transport import Board
    from gridshed.vboard import VirtualBoard

    fs = tmp_path / "fs"
    fs.mkdir()
    st = '{"state": "normal", "device": "mkt-1", "time_trusted": false, "market": {"sid": 7}, "end": true}'
    (fs / "main.py").write_text(
        "import sys\nprint('I 1 agent up: site=s')\nwhile True:\n l = sys.stdin.readline()\n"
        f" if l.startswith('@status'):\n  print('@' + {st!r})\n")
    with VirtualBoard(fs, heapsize="32wK") as vb:
        assert vb.wait_output("agent up", 30)
        with Board(vb.port) as b:
            with b.stopped(wait=30):
                b.wait_for_agent = True  # as deploy sets it (this stand-in has no maintenance window)
        assert b.outcome.startswith("agent restarted: it answers @status"), b.outcome
        assert b.warnings == [f"{vb.port}: the restarted agent has no trusted time, so its market schedule is not "
                              "executed (what economics held open comes back on after its min off) until "
                              "`gridshed time-sync --device mkt-1`"]


def test_status_alarms_for_every_feature_left_out_for_ram():
    """`gridshed status` shows an ALARM whether the hub left the optional features out
    (features_memory) or one feature found no RAM for its buffers (dnp3_memory, market_mem)."""
    from gridshed.cli.board import _alarm_rows

    for errs in ({"features_memory": 1}, {"dnp3_memory": 1}, {"market_mem": 2}):
        rows = [r for r in _alarm_rows({"errors": errs}) if r[0] == "ALARM"]
        assert len(rows) == 1 and "optional features NOT started" in rows[0][1], (errs, rows)
        assert next(iter(errs)) in rows[0][1]
    assert not _alarm_rows({"errors": {"meter_timeout": 3}})
    rows = _alarm_rows({"errors": {"feature_error": 1}})
    assert len(rows) == 1 and rows[0][0] == "ALARM" and "did not start" in rows[0][1], rows


def test_status_table_shows_a_capture_without_its_sample_blob():
    from gridshed.cli.board import _event_text

    rec = {"k": "capture", "n": 8, "part": 0, "dt": 50, "smp": {"b64": "AAAA" * 200}}
    text = _event_text(rec)
    assert "AAAA" not in text and "gridshed events" in text and '"part": 0' in text
    assert "59.99" in _event_text({"k": "ctl", "ev": "restore_block", "hz": 59.99})
