"""ROMFS (docs/romfs.md): the image, its memory effect, and `deploy --romfs` to a virtual board;
a build for a site (`gridshed build --site`: only the features it turns on) and the refusals
that keep a board from a build that cannot run its config (a full image too big for the
partition, a build without a feature the config turns on).

The virtual board emulates the flash partition (host_tools/gridshed/vboard.py, ROM_BOOT); the
import and heap figures come from the real unix-port micropython.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gridshed import build as buildmod
from gridshed import cli, romfs
from gridshed.deploy import deploy
from gridshed.errors import UserError
from gridshed.transport import Board
from gridshed.vboard import VirtualBoard, make_romfs_partition, micropython_exe

ROOT = Path(__file__).resolve().parents[2]
PARTITION = 0x20000  # 128 KiB, as MicroPython's partitions-4MiB-romfs.csv
RESIDENT = romfs.RESIDENT  # what the running demo agent keeps loaded


DEMO = ROOT / "scenarios" / "demo-site.toml"
MARKET = ROOT / "scenarios" / "market-site.toml"


@pytest.fixture(scope="module")
def fw(tmp_path_factory) -> dict:
    """The real firmware built for the demo site on the virtual board, with its ROMFS image."""
    feats, board = buildmod.site_features(DEMO, None)
    assert board == "unix-sim" and feats == ["signals"]  # the demo site's dry contact
    return buildmod.build(board, out=tmp_path_factory.mktemp("romfs") / "unix-sim", romfs=True, features=feats)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict:
    """Every optional feature: its image is bigger than the 128 KiB partition."""
    return buildmod.build("unix-sim", out=tmp_path_factory.mktemp("romfs") / "full", romfs=True)


def test_a_site_build_carries_only_the_features_the_site_turns_on(fw, full, tmp_path, capfd):
    feats = buildmod.all_features()
    assert {"dnp3", "market"} <= set(feats)
    assert full["features"] == feats and full["all_features"] and full["left_out"] == []
    assert fw["features"] == ["signals"] and not fw["all_features"]
    files = {e["file"] for e in fw["files"]}
    # the features' modules and the helpers only they import are left out (from the import graph)
    for mod in ("agent.features.dnp3", "agent.features.market", "agent.dnp3_link", "agent.market"):
        assert mod in fw["left_out"] and mod.replace(".", "/") + ".mpy" not in files
        assert mod.replace(".", "/") + ".mpy" in {e["file"] for e in full["files"]}
    # a helper the core imports too stays (the DNP3 config check is the validator's)
    assert "agent/dnp3_check.mpy" in files and "agent/control.mpy" in files
    assert fw["romfs"]["size"] <= PARTITION < full["romfs"]["size"]
    assert fw["build_id"] != full["build_id"]
    # the market site: market and what it pulls in, no DNP3
    out = tmp_path / "m"
    assert cli.main(["build", "--site", str(MARKET), "-o", str(out), "--json"]) == 0
    m = json.loads(capfd.readouterr().out)
    mfiles = {e["file"] for e in m["files"]}
    assert m["features"] == ["market", "signals"] and {"agent/features/market.mpy", "agent/market.mpy"} <= mfiles
    assert not {"agent/features/dnp3.mpy", "agent/dnp3_link.mpy"} & mfiles
    assert buildmod.missing_features(m, {"dnp3": {"enabled": True}, "market": {}}) == ["dnp3"]
    assert buildmod.missing_features(full, {"dnp3": {"enabled": True}}) == []
    # a name that is no feature: one line naming the ones there are
    assert cli.main(["build", "--board", "unix-sim", "--features", "dnp3,modbus_srv", "-o", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no feature modbus_srv" in err[0] and "dnp3" in err[0], err


def mp(code: str, heap: str = "1m") -> str:
    proc = subprocess.run([micropython_exe(), "-X", "heapsize=" + heap, "-c", code], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr or proc.stdout
    return proc.stdout


def test_build_writes_an_image_the_real_micropython_mounts_and_imports(fw):
    d = Path(fw["path"])
    rom = fw["romfs"]
    image = (d / romfs.IMAGE).read_bytes()
    assert rom["size"] == len(image) and romfs.image_size(image[:16]) == len(image)
    mpys = sorted(e["file"] for e in fw["files"] if e["file"].endswith(".mpy"))
    assert rom["files"] == mpys and "main.py" not in rom["files"]   # main.py stays on the filesystem
    assert json.loads((d / "manifest.json").read_text())["romfs"]["sha256"] == rom["sha256"]
    out = mp(f"""
import vfs,sys,os
f=open({str(d / romfs.IMAGE)!r},'rb');b=f.read();f.close()
vfs.mount(vfs.VfsRom(b),'/rom')
sys.path[:]=['/rom','.frozen']
import agent.app, agent.base
print(agent.__path__, agent.base.BUILD, sorted(os.listdir('/rom')), len(os.listdir('/rom/agent')))
""")
    path, build_id, top, n = out.split(maxsplit=3)
    assert path == "/rom/agent" and build_id == fw["build_id"]
    assert top == "['agent']" and int(n) == len({f.split("/")[1] for f in mpys})
    # a tampered image is refused like a tampered module
    (d / romfs.IMAGE).write_bytes(image[:-1] + b"\x00")
    try:
        with pytest.raises(UserError, match="romfs.img does not match"):
            buildmod.load_manifest(d)
    finally:
        (d / romfs.IMAGE).write_bytes(image)


def test_importing_from_romfs_leaves_the_bytecode_out_of_the_heap(fw):
    d = Path(fw["path"])
    m = romfs.measure_imports(d / romfs.IMAGE, d, RESIDENT)
    print("\nimport heap, %d resident modules (%d bytes of .mpy): ROMFS %d, files %d (files after the ROM "
          "import in one process %d): saved %d, ratio %.3f" % (
              m["modules"], m["mpy_bytes"], m["rom_heap"], m["files_heap"], m["files_heap_after_rom"],
              m["saved"], m["ratio"]))
    # the image buffer exists before the measurement and is not counted in either figure
    assert m["image_buffer"] == fw["romfs"]["size"]
    # what a file import copies into the heap (the bytecode and its names) stays in the image:
    # measured 90 % of the .mpy bytes on this port
    assert m["saved"] >= 0.8 * m["mpy_bytes"]
    # what remains is the modules' runtime objects; measured 0.56 here (64-bit objects: on a
    # 32-bit board they are about half the size, the saving is not)
    assert m["ratio"] <= 2 / 3
    # even when the files find every name already interned, the ROM import is cheaper
    assert m["rom_heap"] < m["files_heap_after_rom"]


def test_virtual_board_gives_the_agent_the_heap_it_asks_for(tmp_path):
    """The partition buffer and the shim come on top of heapsize: main.py sees what a board without
    ROMFS sees (the buffer is in flash on a real board)."""
    main = "import gc\ngc.collect()\nprint('free', gc.mem_free())\n"
    free = {}
    for name, rom in (("plain", None), ("rom", PARTITION)):
        fs = tmp_path / name
        fs.mkdir()
        (fs / "main.py").write_text(main)
        with VirtualBoard(fs, heapsize="48wK", romfs=rom) as vb:
            assert vb.wait_output("free ", 30) and vb.wait_output("\n", 30, since=vb.output().index(b"free "))
            free[name] = int(re.search(rb"free (\d+)", vb.output()).group(1))
    assert -256 <= free["rom"] - free["plain"] <= 512, free


def test_deploy_romfs_to_a_virtual_board(fw, tmp_path, capsys):
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "notes.txt").write_text("user file")
    from gridshed import siteconfig
    from gridshed.provision import prepare_config

    # a board whose config turns on the market: the demo site's build (no market) is refused
    # before anything is written, in one line saying how to build for it
    (fs / "config.cbor").write_bytes(siteconfig.config_bytes(prepare_config(MARKET)))
    with VirtualBoard(fs, heapsize="64wK", romfs=PARTITION) as vb:
        assert cli.main(["deploy", "--port", vb.port, "--build", fw["path"]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"gridshed: error: {vb.port}: the board's config (site 'market-site') turns on market, which "
                       "this build leaves out; build for the site: `gridshed build --board unix-sim --site "
                       "SITE.toml` (nothing was written); agent restarted"], err
        assert not (fs / "agent").exists() and not (fs / "build.json").exists()
        (fs / "config.cbor").unlink()
        # the board runs the agent from its filesystem first: the site's build, without the
        # modules it left out
        s = deploy(vb.port, fw["path"])
        assert (fs / "agent" / "app.mpy").exists() and s["restarted"]
        assert not (fs / "agent" / "features" / "dnp3.mpy").exists() and not (fs / "agent" / "market.mpy").exists()
        assert json.loads((fs / "build.json").read_text())["features"] == ["signals"]
        mark = vb.mark()
        assert cli.main(["deploy", "--port", vb.port, "--build", fw["path"], "--romfs", "--json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert s["romfs"]["written"] and s["romfs"]["image_size"] == fw["romfs"]["size"]
        assert s["romfs"]["partition_size"] == PARTITION
        # the filesystem's agent, which would shadow /rom ('' is first on sys.path), is gone
        assert not (fs / "agent").exists() and "agent/" in s["removed"]
        assert sorted(p.name for p in fs.iterdir() if p.suffix != ".cbor" and not p.name.startswith("journal")) \
            == ["build.json", "main.py", "maint.py", "maint_boot.py", "notes.txt"]
        assert json.loads((fs / "build.json").read_text())["mode"] == "romfs"
        assert vb.romfs_path.read_bytes()[:fw["romfs"]["size"]] == (Path(fw["path"]) / romfs.IMAGE).read_bytes()
        assert vb.wait_output("config", 30, since=mark)  # rebooted: the agent (unprovisioned) speaks
        with Board(vb.port) as b:
            assert b.eval("__import__('sys').path[:4]") == ["", ".frozen", "/rom", "/rom/lib"]
            assert b.eval("__import__('agent').__path__") == "/rom/agent"
            assert b.eval("__import__('agent.base').base.BUILD") == fw["build_id"]
            b.restart_agent()
        # provisioning a site whose feature the board's build lacks: refused, nothing written,
        # the agent runs again
        mark = vb.mark()
        assert cli.main(["provision", "--port", vb.port, "--site", str(MARKET),
                         "--inventory", str(tmp_path / "inv.sqlite")]) == 2
        err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.endswith("...")]  # progress
        assert len(err) == 1 and f"market-site.toml turns on market but the board runs build {fw['build_id']} " \
            "without it; build and deploy for the site first: `gridshed deploy --board unix-sim --site " in err[0], err
        assert not (fs / "config.cbor").exists()
        assert vb.wait_output("config", 30, since=mark)
        # again: the partition already holds the image, nothing is written
        s = deploy(vb.port, fw["path"], romfs=True)
        assert not s["romfs"]["written"] and s["written"] == [] and s["bytes_written"] == 0
        # forced, through the progress-bar path of the CLI
        assert cli.main(["deploy", "--port", vb.port, "--build", fw["path"], "--romfs", "--force"]) == 0
        assert "ROMFS image %d bytes written" % fw["romfs"]["size"] in capsys.readouterr().out
        with Board(vb.port) as b:
            assert b.eval("__import__('agent').__path__") == "/rom/agent"
        # a rewrite of the partition cut short (Ctrl-C) on a board that runs its agent from it:
        # the build's copy in /lib (written first) runs, and the next deploy puts it back in ROM
        events: list[str] = []

        def cut(ev: str, info: dict) -> None:
            events.append(ev)
            if ev == "bytes" and "rom-write" in events and events[events.index("rom-write"):].count("bytes") == 3:
                raise KeyboardInterrupt

        said: list[str] = []
        with pytest.raises(KeyboardInterrupt):
            deploy(vb.port, fw["path"], romfs=True, force=True, progress=cut, say=said.append)
        assert "fallback" in events and said and said[0].startswith("agent restarted"), (said, events[-5:])
        with Board(vb.port) as b:
            assert b.eval("__import__('agent').__path__") == "lib/agent"
            assert b.eval("__import__('agent.base').base.BUILD") == fw["build_id"]
            b.restart_agent()
        s = deploy(vb.port, fw["path"], romfs=True)
        # (the copy in /lib is already this build's: nothing written for it)
        assert s["romfs"]["written"] and s["fallback_written"] == 0 and "lib/agent/" in s["removed"]
        assert not (fs / "lib" / "agent").exists()
        with Board(vb.port) as b:
            assert b.eval("__import__('agent').__path__") == "/rom/agent"


def test_deploy_romfs_to_a_port_that_erases_the_whole_partition(fw, tmp_path):
    """Older ports report no erase block: the image's length is prepared in one rom_ioctl(3, 0, n)."""
    with VirtualBoard(tmp_path / "fs", heapsize="64wK", romfs=PARTITION, romfs_block=PARTITION) as vb:
        vb.romfs_path.write_bytes(b"\x00" * PARTITION)   # not erased: the write relies on the prepare
        s = deploy(vb.port, fw["path"], romfs=True, restart=False)
        assert s["romfs"]["written"]
        assert vb.romfs_path.read_bytes()[:fw["romfs"]["size"]] == (Path(fw["path"]) / romfs.IMAGE).read_bytes()


@pytest.mark.parametrize("partition, message, which", [
    (None, re.escape("has no ROMFS support (no vfs.rom_ioctl"), "fw"),
    (0, re.escape("has no ROMFS partition 0 (vfs.rom_ioctl(1) = 0)"), "fw"),
    (0x10000, r"the ROMFS image is \d+ bytes, the board's ROMFS partition 65536 bytes; make the partition "
              r"bigger; nothing was written", "fw"),
    # the full build on the 128 KiB partition: how to fit it, in the same line
    (PARTITION, r"the ROMFS image is \d+ bytes, the board's ROMFS partition 131072 bytes; build only the site's "
                r"features: `gridshed build --board unix-sim --site SITE.toml --romfs` \(this build carries "
                r".*dnp3.*market.*\); nothing was written", "full"),
])
def test_deploy_romfs_refusals_are_one_line(request, tmp_path, capfd, partition, message, which):
    build = request.getfixturevalue(which)
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "main.py").write_text("print('old firmware')\n")
    with VirtualBoard(fs, heapsize="64wK", romfs=partition) as vb:
        assert vb.wait_output("old firmware", 30)
        mark = vb.mark()
        assert cli.main(["deploy", "--port", vb.port, "--build", build["path"], "--romfs", "--json"]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("gridshed: error: ") and re.search(message, err[0]), err
        assert "docs/romfs.md" in err[0] and "Traceback" not in err[0]
        assert (fs / "main.py").read_text() == "print('old firmware')\n"   # nothing was touched
        if partition:
            assert set(vb.romfs_path.read_bytes()) == {0xFF}
        assert vb.wait_output("old firmware", 30, since=mark)   # and what ran before runs again


def test_deploy_romfs_needs_a_romfs_build(tmp_path, capfd):
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.py").write_text("print(1)\n")
    (src / "app.py").write_text("X = 1\n")
    out = tmp_path / "b"
    buildmod.build("unix-sim", src=src, out=out)
    assert cli.main(["deploy", "--port", "/dev/null", "--build", str(out), "--romfs"]) == 2
    err = capfd.readouterr().err.strip()
    assert err == f"gridshed: error: {out} has no ROMFS image; run `gridshed build --board unix-sim --romfs`"


def test_demo_dip_runs_with_the_agent_in_romfs_at_48wK(fw, tmp_path):
    """The point of ROMFS: the demo site at the 48wK target, counting only the agent's own heap
    (the virtual board adds the partition buffer, which a board keeps in flash). Bisected on this
    port: 46wK runs, 44wK does not; from the filesystem it needs 64wK (62wK fails)."""
    from gridshed import siteconfig
    from gridshed.sim.scenario import load_scenario
    from gridshed.sim.site import run_site

    scn = tmp_path / "dip.csv"
    scn.write_text("t_s,hz\n0,60\n1.5,59.98\n2.0,59.62\n3.0,59.65\n4.0,59.95\n9,60\n")
    text = (ROOT / "scenarios" / "demo-site.toml").read_text()
    for k, v in dict(min_off_s=3, restore_hold_s=1, stagger_s=0.5, jitter_s=0.1).items():
        text = re.sub(rf"(?m)^{k} = .*$", f"{k} = {json.dumps(v)}", text)
    (tmp_path / "site.toml").write_text(text)
    cfg = siteconfig.load_site(tmp_path / "site.toml")
    main_only = tmp_path / "fw"
    main_only.mkdir()
    shutil.copyfile(Path(fw["path"]) / "main.py", main_only / "main.py")
    board = tmp_path / "board"
    board.mkdir()
    make_romfs_partition(board, PARTITION, (Path(fw["path"]) / romfs.IMAGE).read_bytes())
    s = asyncio.run(run_site(load_scenario(scn), cfg, heapsize="48wK", settle_s=0.3, keep_dir=board,
                             firmware_dir=main_only))
    log = Path(str(board) + ".console.log").read_text(errors="replace")
    assert "ROMFS0 131072 bytes" in log and not (board / "agent").exists()   # code from the partition
    assert log.count("] start ") == 1 and "MemoryError" not in log, log[-2000:]
    uf = [t for t in s["trips"] if t["cause"] == "under-frequency"]
    assert len(uf) == 1 and uf[0]["relay_open_s"] is not None
    assert set(s["opens_per_block"].values()) == {1} and s["all_restored"]
    st = s["board_status"]
    assert st is not None and st["build"] == fw["build_id"]
    print("\ndemo dip, agent in ROMFS, heap 48wK (+ partition): %d bytes free at the end" % st["mem_free"])
