"""flash (file checks, offsets, dry-run plans, UF2 copy) and image (firmware + LittleFS) on files.

The LittleFS inside every image is mounted by the real micropython (vfs.VfsLfs2 over a block
device backed by the image file) and code is run from it.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from gridshed import build as buildmod
from gridshed import cli
from gridshed.boards import load_board
from gridshed.errors import UserError
from gridshed.flash import (FAMILY_RP2040, FAMILY_RP2350_ARM_S, UF2_FLAG_FAMILY, check_firmware,
                            inspect_firmware, parse_uf2, plan_flash, run_flash)
from gridshed.image import _uf2_pack, build_image, extract_fs

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "scenarios" / "demo-site.toml"


def esp_image(chip_id: int, size: int = 70000) -> bytes:
    """A synthetic ESP app image: magic 0xE9, 1 segment, DIO, 4MB/40MHz, entry, extended header."""
    head = struct.pack("<BBBBI", 0xE9, 1, 2, 0x20, 0x40080000)
    ext = struct.pack("<B3sHBHH4sB", 0xEE, b"\0\0\0", chip_id, 0, 0, 0xFFFF, b"\0" * 4, 0)
    body = bytes((i * 7) & 0xFF for i in range(size - len(head) - len(ext)))
    return head + ext + body


def uf2_firmware(family: int, start: int = 0x10000000, pages: int = 40) -> bytes:
    items = [(start + i * 256, bytes([i & 0xFF]) * 256, family, UF2_FLAG_FAMILY) for i in range(pages)]
    return _uf2_pack(items)


BLOCKDEV = """
import vfs, os, sys
class FileBlockDev:
    def __init__(self, path, offset, size, bs):
        self.f = open(path, 'r+b'); self.off = offset; self.bs = bs; self.n = size // bs
    def readblocks(self, n, buf, o=0):
        self.f.seek(self.off + n * self.bs + o); self.f.readinto(buf)
    def writeblocks(self, n, buf, o=0):
        self.f.seek(self.off + n * self.bs + o); self.f.write(buf)
    def ioctl(self, op, arg):
        if op == 4: return self.n
        if op == 5: return self.bs
        return 0
vfs.mount(vfs.VfsLfs2(FileBlockDev(%r, %d, %d, %d)), '/flash')
os.chdir('/flash')
sys.path.insert(0, '/flash')
print(sorted(os.listdir('/flash')))
"""


def mount_and_run(mp, path: Path, offset: int, board: dict, code: str) -> str:
    fl = board["flash"]
    r = mp.run(BLOCKDEV % (str(path), offset, fl["fs_size"], fl["block_size"]) + code, heapsize="512k")
    return r.out


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    (d / "main.py").write_text("import hello\nhello.run()\n")
    (d / "hello.py").write_text("def run():\n    print('agent ran from flash', __file__)\n")
    return d


def test_inspect_and_check_files(tmp_path):
    esp32, s3 = load_board("esp32-devkitc-max3485"), load_board("esp32-s3-devkitc")
    pico, pico2 = load_board("rpi-pico"), load_board("rpi-pico2-w")
    f = tmp_path / "fw.bin"
    f.write_bytes(esp_image(0))
    info = inspect_firmware(f)
    assert info["kind"] == "esp" and info["chip"] == "esp32"
    check_firmware(esp32, info)
    with pytest.raises(UserError, match="esp32s3"):
        check_firmware(s3, info)
    f.write_bytes(esp_image(9))
    check_firmware(s3, inspect_firmware(f))
    with pytest.raises(UserError, match="UF2"):
        check_firmware(pico, inspect_firmware(f))
    u = tmp_path / "fw.uf2"
    u.write_bytes(uf2_firmware(FAMILY_RP2040))
    ui = inspect_firmware(u)
    assert ui["kind"] == "uf2" and ui["families"] == [FAMILY_RP2040] and ui["blocks"] == 40
    check_firmware(pico, ui)
    with pytest.raises(UserError, match="0xe48bff56"):
        check_firmware(pico2, ui)
    u.write_bytes(uf2_firmware(FAMILY_RP2350_ARM_S))
    check_firmware(pico2, inspect_firmware(u))
    with pytest.raises(UserError, match="ESP32 .bin"):
        check_firmware(esp32, inspect_firmware(u))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"PK\x03\x04" + bytes(600))
    with pytest.raises(UserError, match="neither an ESP image"):
        inspect_firmware(junk)
    bad = tmp_path / "bad.uf2"
    data = bytearray(uf2_firmware(FAMILY_RP2040, pages=2))
    data[512 + 508] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="bad magic"):
        inspect_firmware(bad)


def test_flash_dry_run_plans(tmp_path, capsys):
    f = tmp_path / "fw.bin"
    f.write_bytes(esp_image(0))
    assert cli.main(["flash", "--board", "esp32-devkitc-max3485", "--port", "/dev/ttyUSB9", "--firmware", str(f),
                     "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "esptool" and plan["offset"] == 0x1000 and plan["dry_run"]
    assert "write-flash 0x1000" in plan["command"] and "--chip esp32 " in plan["command"]
    f.write_bytes(esp_image(9))
    assert cli.main(["flash", "--board", "esp32-s3-devkitc", "--firmware", str(f), "--dry-run"]) == 0
    assert "write-flash 0x0 " in capsys.readouterr().out
    # wrong file for the board: refused before anything else
    assert cli.main(["flash", "--board", "esp32-devkitc-max3485", "--port", "/dev/ttyUSB9", "--firmware", str(f)]) == 2
    assert "esp32s3" in capsys.readouterr().err
    assert cli.main(["flash", "--board", "unix-sim", "--firmware", str(f), "--dry-run"]) == 2


def test_uf2_copy_to_boot_drive(tmp_path, capsys):
    u = tmp_path / "RPI_PICO.uf2"
    u.write_bytes(uf2_firmware(FAMILY_RP2040))
    media = tmp_path / "media"
    drive = media / "RPI-RP2"
    drive.mkdir(parents=True)
    (drive / "INFO_UF2.TXT").write_text("UF2 Bootloader v3.0\nModel: Raspberry Pi RP2\nBoard-ID: RPI-RP2\n")
    plan = plan_flash(load_board("rpi-pico"), u, drive_search=[str(media)])
    assert plan["method"] == "uf2-copy" and plan["drive"] == str(drive)
    u2 = tmp_path / "RPI_PICO2.uf2"
    u2.write_bytes(uf2_firmware(FAMILY_RP2350_ARM_S))
    plan2 = plan_flash(load_board("rpi-pico2-w"), u2, drive_search=[str(media)])
    assert plan2["drive"] is None or plan2["method"] == "picotool"   # an RP2040 drive is not an RP2350 one
    run_flash(plan)
    assert (drive / "RPI_PICO.uf2").read_bytes() == u.read_bytes()
    assert cli.main(["flash", "--board", "rpi-pico", "--firmware", str(u), "--drive", str(drive), "--dry-run"]) == 0
    assert "would flash" in capsys.readouterr().out


def test_esp32_factory_image_mounts_and_runs(tmp_path, mp, src):
    board = load_board("esp32-devkitc-max3485")
    b = buildmod.build(board["name"], src=src, out=tmp_path / "b")
    fw = esp_image(0)
    (tmp_path / "fw.bin").write_bytes(fw)
    out = tmp_path / "factory.bin"
    assert cli.main(["image", "--board", board["name"], "--site", str(SITE), "--device-id", "img-1",
                     "--firmware", str(tmp_path / "fw.bin"), "--build", b["path"], "-o", str(out)]) == 2  # site is unix-sim
    site = tmp_path / "site.toml"
    text = SITE.read_text().replace('board = "unix-sim"', 'board = "esp32-devkitc-max3485"')
    site.write_text("[[blocks]]".join(text.split("[[blocks]]")[:4]))   # the 3 blocks on relay1..4
    assert cli.main(["image", "--board", board["name"], "--site", str(site), "--device-id", "img-1",
                     "--firmware", str(tmp_path / "fw.bin"), "--build", b["path"], "-o", str(out), "--json"]) == 0
    img = out.read_bytes()
    fl = board["flash"]
    assert len(img) == fl["fs_offset"] + fl["fs_size"]
    assert img[:0x1000] == b"\xff" * 0x1000 and img[0x1000:0x1000 + len(fw)] == fw
    res = mount_and_run(mp, out, fl["fs_offset"], board, """
import json
print(json.load(open('build.json'))['board'])
print(len(open('config.cbor','rb').read()) > 100)
import main
""")
    assert "'build.json'" in res and "'config.cbor'" in res and "esp32-devkitc-max3485" in res
    assert "True" in res and "agent ran from flash /flash/hello.mpy" in res
    too_big = tmp_path / "big.bin"
    too_big.write_bytes(esp_image(0, size=fl["fs_offset"]))
    with pytest.raises(UserError, match="overlaps the filesystem"):
        build_image(board, b["path"], firmware=too_big)


def test_rp2_uf2_image_with_family_and_fs_address(tmp_path, mp, src):
    for name, fam in (("rpi-pico", 0xE48BFF56), ("rpi-pico2-w", 0xE48BFF59)):
        board = load_board(name)
        b = buildmod.build(name, src=src, out=tmp_path / name)
        fwf = tmp_path / (name + ".uf2")
        fwf.write_bytes(uf2_firmware(fam))
        img, layout = build_image(board, b["path"], config=b"\xa0", firmware=fwf)
        blocks = parse_uf2(img)
        assert {bl["family"] for bl in blocks} == {fam} and layout["family"] == "0x%08x" % fam
        assert [bl["blockno"] for bl in blocks] == list(range(len(blocks)))
        assert all(bl["nblocks"] == len(blocks) for bl in blocks)
        fs_start = 0x10000000 + board["flash"]["fs_offset"]
        assert min(bl["addr"] for bl in blocks if bl["addr"] >= fs_start) == fs_start
        assert max(bl["addr"] for bl in blocks) == fs_start + board["flash"]["fs_size"] - 256
        fs_file = tmp_path / (name + ".lfs")
        fs_file.write_bytes(extract_fs(board, img))
        res = mount_and_run(mp, fs_file, 0, board, "import main\n")
        assert "agent ran from flash /flash/hello.mpy" in res
    # firmware pages inside the filesystem are refused
    board = load_board("rpi-pico")
    clash = tmp_path / "clash.uf2"
    clash.write_bytes(uf2_firmware(0xE48BFF56, start=0x10000000 + board["flash"]["fs_offset"]))
    with pytest.raises(UserError, match="inside the filesystem"):
        build_image(board, tmp_path / "rpi-pico", firmware=clash)


def test_real_agent_image_for_the_virtual_board(tmp_path, mp):
    board = load_board("unix-sim")
    b = buildmod.build("unix-sim", out=tmp_path / "fw")
    out = tmp_path / "fs.img"
    assert cli.main(["image", "--board", "unix-sim", "--site", str(SITE), "--build", b["path"], "-o", str(out)]) == 0
    res = mount_and_run(mp, out, 0, board, """
from agent import cbor, config, integrity
cfg = cbor.loads(bytes(integrity.unwrap(open('config.cbor', 'rb').read())[0]))
print('errors', config.validate(cfg), cfg['device'])
import agent.app, agent.base
print(agent.app.__file__, agent.base.BUILD)
""")
    assert "errors [] ctl-1" in res
    assert "/flash/agent/app.mpy %s" % b["build_id"] in res
