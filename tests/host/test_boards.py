"""Board files: schema, pins valid for the chip, no pin used twice, relays/UARTs don't collide."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from gridshed import boards
from gridshed.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
NAMES = sorted(p.stem for p in (ROOT / "boards").glob("*.json"))
EXPECTED = {"unix-sim", "esp32-devkitc-max3485", "esp32-s3-devkitc", "olimex-esp32-poe",
            "kincony-kc868-a4", "rpi-pico", "rpi-pico-w", "rpi-pico2-w"}


def _load(name: str) -> dict:
    return json.loads((ROOT / "boards" / f"{name}.json").read_text())


def test_board_set_and_listing():
    assert EXPECTED <= set(NAMES)
    assert boards.list_boards() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_board_schema(name):
    b = _load(name)
    assert boards.validate_board(b) == []
    assert b["name"] == name
    assert boards.load_board(name) == b
    assert boards.CHIPS[b["chip"]] == (b["arch"], b["port"])


@pytest.mark.parametrize("name", NAMES)
def test_pins_unique_and_sane_for_chip(name):
    b = _load(name)
    chip = boards.CHIP_PINS[b["chip"]]
    reserved = set(b.get("reserved", []))
    outputs = [r["pin"] for r in b["relays"]]
    outputs += [u[k] for u in b["uarts"].values() for k in ("tx", "de", "re") if u[k] is not None]
    inputs = [u["rx"] for u in b["uarts"].values()]
    inputs += [p for p in b["inputs"].values() if p is not None]
    pins = outputs + inputs + ([b["led"]] if b["led"] is not None else [])
    assert len(pins) == len(set(pins)), f"{name}: a pin is used twice: {sorted(map(str, pins))}"
    for p in outputs:
        assert p in chip.gpios and p not in chip.input_only, (name, p)
        assert p not in chip.forbidden and p not in reserved, (name, p)
    for p in inputs:
        assert p in chip.gpios and p not in chip.forbidden and p not in reserved, (name, p)
    relay_pins = {r["pin"] for r in b["relays"]}
    uart_pins = {u[k] for u in b["uarts"].values() for k in ("tx", "rx", "de", "re")} - {None}
    assert not relay_pins & uart_pins
    ids = [u["id"] for u in b["uarts"].values()]
    assert len(ids) == len(set(ids)) and set(ids) <= chip.uart_ids
    if b["chip"] == "esp32":
        assert not set(pins) & set(range(6, 12)), "ESP32 flash pins 6-11 used"
    if b["port"] == "rp2":
        for u in b["uarts"].values():
            assert boards.rp2_uart_function(u["tx"]) == (u["id"], "tx")
            assert boards.rp2_uart_function(u["rx"]) == (u["id"], "rx")
    if b["port"] != "unix":
        f = b["flash"]
        assert f["fs_offset"] + f["fs_size"] <= f["size"]
        assert f["fs_offset"] >= 0x10000 or b["port"] == "rp2", "fs overlaps the firmware image"


@pytest.mark.parametrize("name", NAMES)
def test_strapping_pins_are_acknowledged(name):
    b = _load(name)
    warnings = boards.board_warnings(b)
    if warnings:
        assert "strapping" in b.get("notes", ""), f"{name}: {warnings} without a note"


def test_esp32_generic_flash_layouts_agree():
    """Boards running the same 4 MiB ESP32 firmware family share MicroPython's partition table."""
    fl = {n: _load(n)["flash"] for n in ("esp32-devkitc-max3485", "olimex-esp32-poe", "kincony-kc868-a4")}
    assert all(f == {"size": 0x400000, "fs_offset": 0x200000, "fs_size": 0x200000, "block_size": 4096}
               for f in fl.values()), fl
    assert _load("rpi-pico")["flash"]["fs_size"] == 1408 * 1024


def _errs(mutate, base="esp32-devkitc-max3485"):
    b = copy.deepcopy(_load(base))
    mutate(b)
    return "\n".join(boards.validate_board(b))


def test_validator_catches_bad_boards():
    def relay_on_input_only(b):
        b["relays"][0]["pin"] = 34
    assert "input-only" in _errs(relay_on_input_only)

    def flash_pin(b):
        b["relays"][0]["pin"] = 7
    assert "SPI flash" in _errs(flash_pin)

    def collide(b):
        b["relays"][1]["pin"] = b["uarts"]["meter"]["tx"]
    assert "already used" in _errs(collide)

    def dup_name(b):
        b["relays"][1]["name"] = b["relays"][0]["name"]
    assert "duplicate relay name" in _errs(dup_name)

    def wrong_arch(b):
        b["arch"] = "armv6m"
    assert "xtensawin" in _errs(wrong_arch)

    def bad_flash(b):
        b["flash"]["fs_size"] = b["flash"]["size"]
    assert "past the end" in _errs(bad_flash)

    def console_uart(b):
        b["uarts"]["meter"]["id"] = 0
    assert "uarts.meter.id" in _errs(console_uart)

    def no_pin(b):
        b["relays"][0]["pin"] = 20
    assert "does not exist" in _errs(no_pin)

    def missing(b):
        del b["inputs"]["ac_sense"]
        del b["usb"]
    e = _errs(missing)
    assert "inputs.ac_sense: missing" in e and "usb: missing" in e

    def active(b):
        b["relays"][0]["active"] = True
    assert "active" in _errs(active)

    def rp2_wrong_uart_pin(b):
        b["uarts"]["meter"]["tx"] = 3
    assert "cannot be UART0 TX" in _errs(rp2_wrong_uart_pin, "rpi-pico")

    def reserved(b):
        b["relays"][0]["pin"] = 23
    assert "reserved" in _errs(reserved, "olimex-esp32-poe")

    def s3_psram(b):
        b["relays"][0]["pin"] = 35
    assert "PSRAM" in _errs(s3_psram, "esp32-s3-devkitc")

    def named_led_on_esp32(b):
        b["led"] = "LED"
    assert "led" in _errs(named_led_on_esp32)

    assert boards.validate_board([]) == ["board: must be a JSON object"]


def test_load_board_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="known boards"):
        boards.load_board("no-such-board")
    with pytest.raises(UserError):
        boards.load_board("../meters/eastron_sdm630")
    (tmp_path / "boards").mkdir()
    b = _load("rpi-pico")
    b["name"] = "other"
    (tmp_path / "boards" / "mine.json").write_text(json.dumps(b))
    (tmp_path / "boards" / "broken.json").write_text("{")
    monkeypatch.setenv("GRIDSHED_ROOT", str(tmp_path))
    assert boards.list_boards() == ["broken", "mine"]
    with pytest.raises(UserError, match="differs from the file name"):
        boards.load_board("mine")
    with pytest.raises(UserError, match="cannot read"):
        boards.load_board("broken")
