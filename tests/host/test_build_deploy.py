"""build (mpy-cross per arch, manifest) and deploy (full, incremental, interrupted) on a virtual board."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from gridshed import build as buildmod
from gridshed import deploy as deploymod
from gridshed import cli
from gridshed.deploy import PLAN, STAGE, deploy
from gridshed.errors import UserError
from gridshed.transport import Board
from gridshed.vboard import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]

MAIN = """\
import time
import appver
print("booted", appver.V)
while True:
    time.sleep(0.05)
"""


def make_src(d: Path, v: int, extra: bool = True) -> Path:
    d.mkdir(exist_ok=True)
    (d / "main.py").write_text(MAIN)
    (d / "appver.py").write_text("V = %d\n" % v)
    pkg = d / "pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    if extra:
        (pkg / "extra.py").write_text("X = 1\n")
    elif (pkg / "extra.py").exists():
        (pkg / "extra.py").unlink()
    return d


def test_build_manifest_per_arch(tmp_path):
    m = buildmod.build("rpi-pico", out=tmp_path / "pico")
    assert m["arch"] == "armv6m" and m["board"] == "rpi-pico"
    d = Path(m["path"])
    names = {e["file"] for e in m["files"]}
    # main.py, and maint.py (compiled into RAM when the agent is stopped), stay source
    assert "main.py" in names and "maint.py" in names and "agent/app.mpy" in names
    assert not any(n.endswith(".py") and n not in ("main.py", "maint.py", "maint_boot.py") for n in names)
    for e in m["files"]:
        blob = (d / e["file"]).read_bytes()
        assert len(blob) == e["size"] and hashlib.sha256(blob).hexdigest() == e["sha256"]
        if e["file"].endswith(".mpy"):
            assert blob[0:1] == b"M" and blob[1] == 6       # mpy v6
    assert m["total_size"] == sum(e["size"] for e in m["files"])
    assert json.loads((d / "manifest.json").read_text())["build_id"] == m["build_id"]
    # the build id is baked into the agent (agent/base.py) so `status` can report it
    assert m["build_id"].encode() in (d / "agent/base.mpy").read_bytes()
    # same sources, same id; another arch, another id
    assert buildmod.build("rpi-pico", out=tmp_path / "pico2")["build_id"] == m["build_id"]
    assert buildmod.build("esp32-devkitc-max3485", out=tmp_path / "esp")["build_id"] != m["build_id"]


def test_build_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no-such-board"):
        buildmod.build("no-such-board", out=tmp_path / "x")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.py").write_text("def f(:\n")
    with pytest.raises(UserError, match="broken.py"):
        buildmod.build("unix-sim", src=bad, out=tmp_path / "b")
    # a tampered build folder is refused
    out = Path(buildmod.build("unix-sim", src=make_src(tmp_path / "s", 1), out=tmp_path / "ok")["path"])
    (out / "appver.mpy").write_bytes(b"M\x06junk")
    with pytest.raises(UserError, match="does not match the manifest"):
        deploy("/dev/null", out)


@pytest.fixture
def board(tmp_path):
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "notes.txt").write_text("user file, must survive deploys")
    vb = VirtualBoard(fs).start()   # blank board: REPL only
    yield vb
    vb.stop()


def test_deploy_full_incremental_interrupted(tmp_path, board):
    src = make_src(tmp_path / "src", 1)
    b1 = buildmod.build("unix-sim", src=src, out=tmp_path / "b1")
    s = deploy(board.port, b1["path"])
    assert sorted(s["written"]) == sorted(e["file"] for e in b1["files"]) and s["restarted"]
    assert board.wait_output("booted 1", 30)
    on_board = json.loads((board.fs_dir / "build.json").read_text())
    assert on_board["build_id"] == b1["build_id"]

    # incremental: one module changed, one removed
    make_src(src, 2, extra=False)
    b2 = buildmod.build("unix-sim", src=src, out=tmp_path / "b2")
    mark = board.mark()
    s = deploy(board.port, b2["path"])
    assert s["written"] == ["appver.mpy"], s
    assert "main.py" in s["unchanged"] and s["removed"] == ["pkg/extra.mpy"]
    assert board.wait_output("booted 2", 30, since=mark)
    assert not (board.fs_dir / "pkg/extra.mpy").exists()
    assert (board.fs_dir / "notes.txt").exists()

    # nothing changed: nothing written, also from the same build made again (`deploy --board`
    # builds first: only its time stamp differs); a staged copy an interrupted deploy left
    # beside an unchanged file is removed (flash space)
    again = buildmod.build("unix-sim", src=src, out=tmp_path / "b2again")
    mf = Path(again["path"]) / "manifest.json"
    mf.write_text(json.dumps(dict(json.loads(mf.read_text()), created="2000-01-01T00:00:00Z")))
    (board.fs_dir / ("main.py" + STAGE)).write_bytes(b"left by an interrupted deploy")
    s = deploy(board.port, again["path"], restart=False)
    assert s["written"] == [] and s["bytes_written"] == 0 and s["stale_removed"] == ["main.py" + STAGE], s
    assert not list(board.fs_dir.rglob("*" + STAGE))
    with Board(board.port) as b:
        b.restart_agent()

    # interrupted while writing: the board keeps running the old build
    make_src(src, 3)
    b3 = buildmod.build("unix-sim", src=src, out=tmp_path / "b3")

    def pull_the_plug(event, info):
        if event == "bytes":
            raise KeyboardInterrupt

    mark = board.mark()
    with pytest.raises(KeyboardInterrupt):
        deploy(board.port, b3["path"], progress=pull_the_plug)
    assert board.wait_output("booted 2", 30, since=mark)
    assert json.loads((board.fs_dir / "build.json").read_text())["build_id"] == b2["build_id"]
    assert list(board.fs_dir.rglob("*" + STAGE))      # staged files beside the old ones
    # a hard reset (power cycle) also boots the old build
    mark = board.mark()
    board.reset()
    assert board.wait_output("booted 2", 30, since=mark)

    # the next deploy completes and cleans up
    mark = board.mark()
    s = deploy(board.port, b3["path"])
    assert set(s["written"]) == {"appver.mpy", "pkg/extra.mpy"}
    assert board.wait_output("booted 3", 30, since=mark)
    assert not list(board.fs_dir.rglob("*" + STAGE))
    for e in b3["files"]:
        assert hashlib.sha256((board.fs_dir / e["file"]).read_bytes()).hexdigest() == e["sha256"]


def test_deploy_finishes_a_switch_cut_by_power_loss(tmp_path, board):
    src = make_src(tmp_path / "src", 1)
    b1 = buildmod.build("unix-sim", src=src, out=tmp_path / "b1")
    deploy(board.port, b1["path"])
    make_src(src, 5)
    b5 = buildmod.build("unix-sim", src=src, out=tmp_path / "b5")
    # power lost after the plan was written and the staged file verified
    (board.fs_dir / ("appver.mpy" + STAGE)).write_bytes((Path(b5["path"]) / "appver.mpy").read_bytes())
    (board.fs_dir / PLAN).write_text(json.dumps({"renames": [["appver.mpy" + STAGE, "appver.mpy"]], "removes": []}))
    mark = board.mark()
    s = deploy(board.port, b5["path"])
    assert s["recovered"] is True and "appver.mpy" not in s["written"]
    assert board.wait_output("booted 5", 30, since=mark)
    assert not (board.fs_dir / PLAN).exists()


def test_deploy_refuses_a_build_for_another_port(tmp_path, board):
    b = buildmod.build("rpi-pico", src=make_src(tmp_path / "src", 1), out=tmp_path / "pico")
    with pytest.raises(UserError, match="rp2"):
        deploy(board.port, b["path"])
    assert not (board.fs_dir / "main.py").exists()
    with pytest.raises(UserError, match="built for rpi-pico"):
        deploy(board.port, b["path"], board_name="unix-sim")


def test_cli_build_and_deploy_json(tmp_path, board, capsys):
    src = make_src(tmp_path / "src", 7)
    out = tmp_path / "cli-build"
    assert cli.main(["build", "--board", "unix-sim", "--src", str(src), "-o", str(out), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["total_size"] > 0
    assert cli.main(["deploy", "--port", board.port, "--build", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["build_id"] == m["build_id"] and len(s["written"]) == len(m["files"])
    assert board.wait_output("booted 7", 30)
    # the progress-bar path (no --json)
    assert cli.main(["deploy", "--port", board.port, "--build", str(out), "--force"]) == 0
    total = sum(e["size"] for e in m["files"]) + len(deploymod.board_manifest_bytes(m))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"deployed build %s to %s: %d written, 0 unchanged, 0 removed, %d bytes in [\d.]+ s; "
                        r"agent restarted" % (m["build_id"], re.escape(board.port), len(m["files"]), total), line), line


BROKEN_KEEP = """\
import builtins
def _keep(*a):
    raise OSError(5)
builtins._gs_keep = _keep
print("broken keep")
while True:
    pass
"""


def test_a_failed_memory_release_is_reported_not_fatal(tmp_path, board, capsys):
    """The board-side cleanup when the host stops the agent (Board._free_memory) fails: here the
    board's maintenance hook raises. The deploy still goes through, and says what went wrong."""
    (board.fs_dir / "main.py").write_text(BROKEN_KEEP)
    with Board(board.port) as b:
        b.restart_agent()
    assert board.wait_output("broken keep", 30)
    src = make_src(tmp_path / "src", 4)
    out = tmp_path / "b4"
    buildmod.build("unix-sim", src=src, out=out)
    assert cli.main(["deploy", "--port", board.port, "--build", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert "main.py" in s["written"] and board.wait_output("booted 4", 30)
    assert len(s["warnings"]) == 1 and "could not release the stopped agent's memory (OSError: [Errno 5] EIO)" in s["warnings"][0]
    # the next session's cleanup works again (the hook is gone with the old main.py): no warning
    with Board(board.port) as b:
        b.enter_raw()
        assert b.free_memory_failures == 0 and b.warnings == [] and b.mem_free
        b.exit_raw()
    # a failure on the host side of the exchange counts and warns the same way
    with Board(board.port) as b:
        b._exec_raw = lambda code, timeout: (_ for _ in ()).throw(OSError("link dropped"))
        b.enter_raw()
        assert b.raw and b.free_memory_failures == 1 and "OSError: link dropped" in b.warnings[0]
        b.exit_raw()
        b.restart_agent()


def test_real_firmware_deploys_to_virtual_board(tmp_path):
    b = buildmod.build("unix-sim", out=tmp_path / "fw")
    with VirtualBoard(tmp_path / "fs", heapsize="1m") as vb:
        s = deploy(vb.port, b["path"], restart=False)
        assert len(s["written"]) == len(b["files"])
        with Board(vb.port) as bd:
            assert bd.eval("__import__('agent.base').base.BUILD") == b["build_id"]


def test_port_auto_detect():
    from gridshed.ports import classify, choose_port, known_ids

    ids = known_ids()
    assert ids[(0x2E8A, 0x0005)] and ids[(0x10C4, 0xEA60)]
    cp = classify("/dev/ttyUSB0", 0x10C4, 0xEA60, ids=ids)
    pico = classify("/dev/ttyACM0", 0x2E8A, 0x0005, ids=ids)
    mouse = classify("/dev/ttyS0", None, None, ids=ids)
    assert cp.known_as and pico.known_as and mouse.known_as is None
    assert choose_port(None, [cp, mouse]) == "/dev/ttyUSB0"
    assert choose_port("/dev/pts/3", [cp, pico]) == "/dev/pts/3"
    with pytest.raises(UserError, match="several boards attached: /dev/ttyUSB0 .*/dev/ttyACM0.*--port"):
        choose_port(None, [cp, pico])
    with pytest.raises(UserError, match="no board found.*--port"):
        choose_port(None, [mouse])
