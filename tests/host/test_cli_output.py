"""One way out for every command (issue 15): only gridshed.cli prints, every `--json` answer is the
one JSON document gridshed.cli.output writes, and an error is one stderr line with stdout left empty."""
from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import pytest

from gridshed.cli import main
from gridshed.cli.output import to_json

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "host_tools" / "gridshed"
SITE = ROOT / "scenarios" / "demo-site.toml"


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_libraries_never_print():
    """Outside gridshed/cli/ nothing writes to the terminal: a library returns data, raises
    UserError or calls the callback it was given. (MicroPython code held in strings, which the
    board runs, is not a call here: the check reads the syntax tree, not the text.)"""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "cli":
            continue
        for node, name in _calls(path):
            if name in ("print", "pprint", "pprint.pprint") or name.endswith(("stdout.write", "stderr.write")):
                found.append(f"{rel}:{node.lineno} {name}()")
        for node in ast.walk(ast.parse(path.read_text())):  # progress bars and tables (rich) too
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{rel}:{node.lineno} import {m}" for m in mods if m.split(".")[0] == "rich"]
    assert not found, "libraries must not print; move these into gridshed/cli/: " + ", ".join(found)


def test_json_is_written_by_the_output_helper_only():
    """No command module formats its own --json: none prints a json.dumps (output.to_json does)."""
    found = []
    for path in sorted((PKG / "cli").glob("*.py")):
        if path.name == "output.py":
            continue
        for node, name in _calls(path):
            if name in ("print",) or name.endswith(("stdout.write", ".print")):
                inner = [n for a in node.args for n in ast.walk(a) if isinstance(n, ast.Call)
                         and ast.unparse(n.func).endswith("json.dumps")]
                if inner:
                    found.append(f"cli/{path.name}:{node.lineno}")
    assert not found, "use gridshed.cli.output.emit / emit_event for --json: " + ", ".join(found)


def esp_image(chip_id: int = 0, size: int = 4096) -> bytes:
    head = struct.pack("<BBBBI", 0xE9, 1, 2, 0x20, 0x40080000)
    ext = struct.pack("<B3sHBHH4sB", 0xEE, b"\0\0\0", chip_id, 0, 0, 0xFFFF, b"\0" * 4, 0)
    return head + ext + bytes(size - len(head) - len(ext))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An inventory with one provisioned device, a journal directory and a firmware file: what the
    commands below read (made with the real modules, no board needed)."""
    from agent.journal_host import encode_record

    from gridshed.inventory import Inventory

    d = tmp_path_factory.mktemp("out")
    inv = d / "inv.sqlite"
    with Inventory(inv) as i:
        i.record_provision("site1-ctl1", "unix-sim", "site1", "0a" * 8, bytes(range(32)), "b1", "0123456789abcdef")
    (d / "backup.json").write_text(Inventory(inv).export("json", show_key=True))
    board = d / "board"
    board.mkdir()
    recs = [{"n": 1, "t": 1.7e9, "ms": 100, "k": "boot", "build": "b1", "resumed_trip": False, "mask": 7},
            {"n": 2, "t": 1.7e9 + 1, "ms": 1100, "k": "ctl", "ev": "trip_uf", "hz": 59.6, "kw": 300.0, "mask": 0,
             "reason": "underfrequency"}]
    (board / "journal.0").write_bytes(b"".join(encode_record(r) for r in recs))
    (d / "fw.bin").write_bytes(esp_image())
    return d


# every command that answers once, with --json: (argv, a check of the decoded answer)
def _cases(d: Path) -> list[tuple[list[str], object]]:
    inv = ["--inventory", str(d / "inv.sqlite")]
    return [
        (["boards"], lambda j: any(b["name"] == "unix-sim" for b in j)),
        (["meters"], lambda j: all("model" in m for m in j) and len(j) > 3),
        (["ports", "--all"], lambda j: isinstance(j, list)),
        (["inventory", *inv, "list"], lambda j: [r["device_id"] for r in j] == ["site1-ctl1"]),
        (["inventory", *inv, "show", "site1-ctl1"], lambda j: j["history"][0]["action"] == "provision"),
        (["inventory", *inv, "import", str(d / "backup.json")], lambda j: j["imported"] == 1),
        (["provision", "--check", "--site", str(SITE)], lambda j: j["ok"] and j["board"] == "unix-sim"),
        (["sign", "shed", "--device", "site1-ctl1", *inv, "-o", str(d / "shed.cose")],
         lambda j: j["signed"][0]["cmd"] == "shed" and (d / "shed.cose").stat().st_size == j["signed"][0]["bytes"]),
        (["events", "--dir", str(d / "board")], lambda j: [r["n"] for r in j["records"]] == [1, 2]),
        (["events", "--dir", str(d / "board"), "-o", str(d / "ev.json")], lambda j: j["count"] == 2),
        (["report", str(d / "ev.json"), "-o", str(d / "r.png")], lambda j: j["output"].endswith("r.png")),
        (["flash", "--board", "esp32-devkitc-max3485", "--port", "/dev/ttyUSB9", "--firmware", str(d / "fw.bin"),
          "--dry-run"], lambda j: j["dry_run"] and j["method"] == "esptool"),
        (["build", "--board", "unix-sim", "-o", str(d / "build")], lambda j: j["board"] == "unix-sim"),
        (["image", "--board", "unix-sim", "--build", str(d / "build"), "-o", str(d / "fs.img")],
         lambda j: j["out"] == str(d / "fs.img")),
    ]


def test_every_json_answer_comes_from_the_helper(world, capsys):
    for argv, check in _cases(world):
        # --json before and after the subcommand's own arguments are the same flag
        rc = main([*argv, "--json"])
        out, err = capsys.readouterr()
        assert rc == 0, (argv, err)
        doc = json.loads(out)
        assert check(doc), (argv, doc)
        assert out == to_json(doc) + "\n", f"{argv}: --json not written by gridshed.cli.output"


def test_a_user_error_is_one_stderr_line_and_no_stdout(world, capsys):
    inv = ["--inventory", str(world / "inv.sqlite")]
    for argv in (["build", "--board", "no-such-board"],
                 ["inventory", *inv, "show", "nobody"],
                 ["provision", "--check", "--site", str(world / "missing.toml")],
                 ["report", str(world / "ev.json"), "-o", str(world / "r.txt")],
                 ["shed", "--device", "site1-ctl1", *inv, "--via", "udp"]):
        for js in ([], ["--json"]):
            rc = main([*argv, *js])
            out, err = capsys.readouterr()
            assert rc == 2 and out == "", (argv, js, out)
            assert len(err.splitlines()) == 1 and err.startswith("gridshed: error: "), (argv, js, err)
