"""Large transfers over the virtual board's console arrive intact, and a second deploy to the
same board works after the real agent ran (regression: the pty bridge dropped bytes whenever
one read of board output pushed its host-side buffer over 4 KB)."""
from __future__ import annotations

from gridshed.build import build
from gridshed.deploy import deploy
from gridshed.transport import Board
from gridshed.vboard import VirtualBoard


def test_big_file_comes_back_intact(tmp_path):
    fs = tmp_path / "board"
    fs.mkdir()
    (fs / "main.py").write_text("print(1)\n")
    blob = bytes(range(256)) * 80  # 20 KB, every byte value
    (fs / "blob.bin").write_bytes(blob)
    vb = VirtualBoard(fs, heapsize="1m").start()
    try:
        assert vb.wait_output(">>> ", 30), vb.output()  # main.py ran, the REPL is up
        with Board(vb.port) as bd:
            for _ in range(3):
                assert bd.get("blob.bin") == blob
    finally:
        vb.stop()


def test_redeploy_after_the_agent_ran(tmp_path):
    b = build("unix-sim", out=tmp_path / "build")
    vb = VirtualBoard(tmp_path / "board", heapsize="1m").start()
    try:
        mark = vb.mark()
        first = deploy(vb.port, b["path"], restart=True)
        assert first["written"]
        # the agent boots (no config: it says so and waits, as on a board)
        assert vb.wait_output("config: no /config.cbor", 30, since=mark), vb.output()[-1500:]
        again = deploy(vb.port, b["path"], restart=False)
        assert again["written"] == []  # nothing changed: nothing written, hashes verified
    finally:
        vb.stop()
