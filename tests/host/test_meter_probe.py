"""`gridshed meter probe` against pymodbus servers built from library maps (TCP and RTU on a pty pair).

Each simulated meter answers only its map's function code and only the registers its map
covers (others: illegal address), like a real meter; register values come from
gridshed.meters.register_image (the firmware's own encoder). The probe must name the model.
"""
from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gridshed import probe as pr
from gridshed.errors import UserError
from gridshed.meters import image_blocks, load_meter, register_image
from gridshed.sim.wire import Wire

VALUES = {"hz": 60.02, "kw": 412.5, "kw1": 137.5, "kw2": 137.5, "kw3": 137.5,
          "v1": 239.8, "v2": 240.1, "v3": 240.4, "i1": 573.0, "i2": 574.0, "i3": 571.0}


class FakeMeter:
    """A meter from a library map: its function only, its register blocks only."""

    def __init__(self, model: str, unit: int = 1, values: dict[str, float] | None = None,
                 identify_value: int | None = None) -> None:
        self.map = load_meter(model)
        vals = dict(values or VALUES)
        q = self.map["quantities"]
        image = register_image(self.map, {k: v for k, v in vals.items() if k in q})
        ident = self.map.get("identify")
        self.blocks = image_blocks(image, self.map)
        self.image = {a: w for start, ws in self.blocks for a, w in zip(range(start, start + len(ws)), ws)}
        if ident and identify_value is not None:
            self.image[ident["addr"]] = identify_value
            if not any(s <= ident["addr"] < s + len(ws) for s, ws in self.blocks):
                self.blocks.append((ident["addr"], [identify_value]))
        self.functions = {self.map["function"]} | ({ident["function"]} if ident else set())
        self.top = max(s + len(ws) for s, ws in self.blocks) + 1
        self.unit = unit
        self.reads = 0
        self.server: Any = None

    def _inside(self, addr: int, count: int) -> bool:
        return any(s <= addr and addr + count <= s + len(ws) for s, ws in self.blocks)

    async def _action(self, fc, start, addr, count, regs, set_values):
        self.reads += 1
        if fc not in self.functions or not self._inside(addr, count):
            return ExcCodes.ILLEGAL_ADDRESS
        for a in range(addr, addr + count):
            regs[a - start] = self.image.get(a, 0)
        return None

    def trace(self, unit_at: int):
        """Real meters stay silent for other unit ids (pymodbus 3.16 answers them with exception 4)."""
        def f(sending: bool, data: bytes) -> bytes:
            if sending and len(data) > unit_at and data[unit_at] != self.unit:
                return b""
            return data
        return f

    def device(self) -> SimDevice:
        return SimDevice(id=self.unit, simdata=[SimData(0, count=self.top, values=0, datatype=DataType.REGISTERS)],
                         action=self._action)


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[Any] = []

    def serve_tcp(self, meter: FakeMeter) -> int:
        # a free port found here, bound by the server later: a race with the rest of the
        # machine, so a server that could not bind is retried on another port
        for _ in range(3):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            task = self._start(meter, lambda: ModbusTcpServer(meter.device(), address=("127.0.0.1", port),
                                                              trace_packet=meter.trace(6)))
            deadline = time.monotonic() + 30
            while not task.done():
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    if not task.done():
                        return port
                except OSError:
                    assert time.monotonic() < deadline, "pymodbus server did not listen"
                    time.sleep(0.02)
        raise AssertionError("pymodbus server could not bind a port")

    def serve_rtu(self, meter: FakeMeter, path: str, baud: int) -> None:
        task = self._start(meter, lambda: ModbusSerialServer(meter.device(), port=path, baudrate=baud,
                                                                  trace_packet=meter.trace(0)))
        # serving once the server has opened the port (its transport is set): wait, bounded
        deadline = time.monotonic() + 30
        while meter.server.transport is None:
            assert not task.done() and time.monotonic() < deadline, "pymodbus serial server did not start"
            time.sleep(0.02)

    def _start(self, meter: FakeMeter, make):
        async def go():  # pymodbus servers are made inside their running loop
            meter.server = make()
            self.servers.append(meter.server)
            return asyncio.get_running_loop().create_task(meter.server.serve_forever())

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(30)

    def close(self) -> None:
        for s in self.servers:
            try:
                asyncio.run_coroutine_threadsafe(s.shutdown(), self.loop).result(3)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(3)


@pytest.fixture(scope="module")
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.mark.parametrize("model,ident,expect_same", [
    ("eastron_sdm630", None, {"eastron_sdm72"}),         # same registers: said so, better-sourced map wins
    ("abb_ab_series", None, set()),
    ("abb_m4m", None, set()),                            # same 0x5Bxx block as A/B, other offsets
    ("socomec_diris_a40", None, set()),
    ("siemens_pac3200", None, set()),
    ("carlo_gavazzi_em24", 1650, set()),                 # the model register decides against EM340
    ("carlo_gavazzi_em340", None, set()),
])
def test_probe_tcp_picks_the_model(loop, model, ident, expect_same):
    m = FakeMeter(model, unit=1, identify_value=ident)
    port = loop.serve_tcp(m)
    res = pr.probe(tcp=f"127.0.0.1:{port}", units=[1], timeout=1.0)
    assert len(res["found"]) == 1
    f = res["found"][0]
    assert f["suggested"] == model, [(c["model"], c["score"], c["reasons"]) for c in f["candidates"][:4]]
    assert set(f["indistinguishable"]) == expect_same
    best = f["candidates"][0]
    assert best["values"]["hz"] == pytest.approx(60.02, abs=m.map["resolution_hz"] + 1e-6)
    assert best["values"]["kw"] == pytest.approx(412.5, rel=1e-3)
    # maps of other makers do not decode plausibly from this meter; a sibling model that does
    # (SDM120 reads an SDM630's phase-1 kW as its kW) scores lower
    make = model.split("_")[0]
    for c in f["candidates"][1:]:
        if c["plausible"]:
            assert c["model"].split("_")[0] == make, c
            assert c["score"] < best["score"] or c["model"] in expect_same, c
    if model == "carlo_gavazzi_em24":
        em340 = next(c for c in f["candidates"] if c["model"] == "carlo_gavazzi_em340")
        assert em340["score"] < best["score"] and best["identified"] is True
    if model == "carlo_gavazzi_em340":
        em24 = next(c for c in f["candidates"] if c["model"] == "carlo_gavazzi_em24")
        assert em24["identified"] is False and not em24["plausible"]


def test_probe_rtu_scans_units_on_a_pty_pair(loop):
    wire = Wire(19200).start()
    try:
        m = FakeMeter("abb_ab_series", unit=3)
        loop.serve_rtu(m, wire.meter_path, 19200)
        t0 = time.monotonic()
        # 1 s per answer: a loaded runner can be slow to answer, and a late answer would read
        # as "nobody there" (silent units cost 3 timeouts each)
        res = pr.probe(port=wire.board_path, bauds=[19200], units=[1, 2, 3], timeout=1.0)
        took = time.monotonic() - t0
    finally:
        wire.stop()
    assert [f["unit"] for f in res["found"]] == [3]
    f = res["found"][0]
    assert f["suggested"] == "abb_ab_series" and f["baud"] == 19200
    assert took < 60  # silent units are given up after a few unanswered reads, not every map


def test_cli_probe_json_and_text(loop):
    m = FakeMeter("siemens_pac3200", unit=2, values=dict(VALUES, hz=50.01))
    port = loop.serve_tcp(m)
    r = subprocess.run([sys.executable, "-m", "gridshed.cli", "meter", "probe", "--tcp", f"127.0.0.1:{port}",
                        "--unit", "1..2", "--timeout", "1.0", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [f["unit"] for f in out["found"]] == [2] and out["found"][0]["suggested"] == "siemens_pac3200"
    r = subprocess.run([sys.executable, "-m", "gridshed.cli", "meter", "probe", "--tcp", f"127.0.0.1:{port}",
                        "--unit", "2", "--model", "siemens_pac3200", "--model", "janitza_umg96rm"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'model = "siemens_pac3200"' in r.stdout and "50.010 Hz" in r.stdout


def test_cli_meters_lists_the_library():
    r = subprocess.run([sys.executable, "-m", "gridshed.cli", "meters", "--json"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    models = {x["model"] for x in rows}
    assert {"eastron_sdm630", "carlo_gavazzi_em24", "abb_ab_series"} <= models
    em24 = next(x for x in rows if x["model"] == "carlo_gavazzi_em24")
    assert em24["resolution_hz"] == 0.1 and em24["identify"] is True and em24["confidence"]
    r = subprocess.run([sys.executable, "-m", "gridshed.cli", "meters"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "eastron_sdm630" in r.stdout and "Hz step" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--tcp", "127.0.0.1:1"], "cannot connect"),
    (["--port", "/dev/nonexistent-ttyUSB9"], "cannot open serial port"),
    (["--tcp", "127.0.0.1:502", "--unit", "0..3"], "unit ids are 1..247"),
    (["--port", "/dev/ttyUSB0", "--baud", "fast"], "--baud"),
    (["--tcp", "127.0.0.1:502", "--model", "acme_x"], "acme_x"),
])
def test_cli_probe_user_errors(args, needle):
    r = subprocess.run([sys.executable, "-m", "gridshed.cli", "meter", "probe", *args, "--timeout", "0.2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- scoring without a network ---------------------------------------------------------------
class DictReader:
    def __init__(self, fn: int, image: dict[int, int], default: int | None = None) -> None:
        self.fn, self.image, self.default = fn, image, default

    def read(self, fn: int, addr: int, count: int):
        if fn != self.fn:
            return 2
        out = []
        for a in range(addr, addr + count):
            v = self.image.get(a, self.default)
            if v is None:
                return 2
            out.append(v)
        return out


def test_random_registers_are_not_a_meter():
    rnd = random.Random(5)
    image = {a: rnd.getrandbits(16) for a in range(0, 200)}
    maps = pr.load_maps(["eastron_sdm630", "carlo_gavazzi_em340", "eastron_sdm120"])
    res = pr.verdict([pr.evaluate(m, DictReader(4, image)) for m in maps])
    assert res["suggested"] is None


def test_zero_registers_are_not_a_meter():
    maps = pr.load_maps()
    res = pr.verdict([pr.evaluate(m, DictReader(m["function"], {}, default=0)) for m in maps])
    assert res["suggested"] is None  # 0 Hz is no grid


def test_parse_units_and_bauds():
    assert pr.parse_units("1..5") == [1, 2, 3, 4, 5]
    assert pr.parse_units("1,3, 7-8") == [1, 3, 7, 8]
    assert pr.parse_bauds("9600,19200") == [9600, 19200]
    for bad in ("", "x", "0", "248", "3..x"):
        with pytest.raises(UserError):
            pr.parse_units(bad)


def test_probe_names_a_swapped_word_order():
    """A meter sending its 32-bit floats low word first against a big-endian map: 60 Hz reads as
    a denormal (~2.4e-41); probe says the words are swapped, in --json and in text."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
    from gridshed.meters import load_meter
    from hostile_meter import HostileMeter

    hm = HostileMeter(load_meter("eastron_sdm630"), unit=1)
    hm.swap_words = True
    port = hm.serve_tcp()
    try:
        res = pr.probe(tcp=f"127.0.0.1:{port}", units=[1], timeout=1.0, models=["eastron_sdm630"])
        r = subprocess.run([sys.executable, "-m", "gridshed.cli", "meter", "probe", "--tcp", f"127.0.0.1:{port}",
                            "--unit", "1", "--timeout", "1.0", "--model", "eastron_sdm630"],
                           capture_output=True, text=True, timeout=120)
    finally:
        hm.stop()
    c = res["found"][0]["candidates"][0]
    assert c["word_order"] == "swapped" and not c["plausible"], c
    assert "denormal" in c["reasons"][-1] and "60.000" in c["reasons"][-1], c["reasons"]
    assert "word order" in r.stdout and "swapped" in r.stdout, r.stdout + r.stderr
