"""A controllable virtual site for fault-injection tests: the real agent (.mpy build) on a
virtual board, a pymodbus meter on a paced RS-485 wire, GPIO with a load model, and handles to
break things: SIGKILL the board process (the supervisor boots it again, like a reset), stop and
restart the meter, drive inputs, read the journal files and state.cbor between boots.

Everything is async (the GPIO server and the meter live on the test's event loop)::

    async with Rig(cfg, tmp_path / "board") as rig:
        rig.hz = 59.5
        await rig.until(lambda: rig.all_open(), 5)
        await rig.kill_board()
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from gridshed import siteconfig
from gridshed.sim.meter import Reading, SimMeter
from gridshed.sim.site import FIRMWARE, GpioServer, LoadModel
from gridshed.sim.wire import Wire
from gridshed.vboard import VirtualBoard

from gridshed.boards import budget_heapsize

# the smallest supported board's budget (boards/*.json "memory"), word-scaled: k KB on a 32-bit board
HEAP = budget_heapsize()
_BUILD: dict[str, Any] = {}


def built_firmware() -> tuple[Path, list[str]]:
    """The agent compiled once per test session with mpy-cross (as `gridshed build` does)."""
    if "dir" not in _BUILD:
        from gridshed.build import build

        out = Path(tempfile.mkdtemp(prefix="gridshed-rig-build-")) / "unix-sim"
        manifest = build("unix-sim", src=FIRMWARE, out=out)
        _BUILD["dir"] = Path(manifest["path"])
        _BUILD["files"] = [e["file"] for e in manifest["files"]]
    return _BUILD["dir"], _BUILD["files"]


def install(board_dir: Path, cfg: dict[str, Any] | None, sim_cfg: dict[str, Any],
            firmware: tuple[Path, list[str]] | None = None) -> None:
    """Lay out a board filesystem: built agent (`firmware`: another build's (dir, files)),
    /config.cbor (unless cfg is None), sim.json."""
    import json

    src, files = firmware or built_firmware()
    board_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = board_dir / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, dst)
    if cfg is not None:
        write_config(board_dir, cfg)
    (board_dir / "sim.json").write_text(json.dumps(sim_cfg))


def write_config(board_dir: Path, cfg: dict[str, Any]) -> None:
    (board_dir / "config.cbor").write_bytes(siteconfig.config_bytes(cfg))


def journal_records(board_dir: Path) -> tuple[list[dict], list[tuple]]:
    """Every record in the board's journal segments (host parser), and the skipped regions.

    Safe to call while the agent runs: a segment the agent rotates away between the listing and
    the read (seen on a loaded runner) means a new listing is taken."""
    from agent.journal import segment_index
    from agent.journal_host import parse_stream

    for _ in range(20):
        segs = sorted((p for p in board_dir.glob("journal.*") if segment_index(p.name) is not None),
                      key=lambda p: segment_index(p.name))
        try:
            blobs = [(p.name, p.read_bytes()) for p in segs]
        except FileNotFoundError:
            continue
        break
    else:
        raise AssertionError(f"journal segments of {board_dir} keep vanishing while read")
    recs: list[dict] = []
    errs: list[tuple] = []
    for name, data in blobs:
        r, e = parse_stream(data)
        recs += r
        errs += [(name,) + tuple(x) for x in e]
    return recs, errs


def read_state(board_dir: Path) -> dict | None:
    try:
        return siteconfig.read_settings((board_dir / "state.cbor").read_bytes())
    except (OSError, ValueError, EOFError):
        return None


def check_board(board: VirtualBoard, restarts: int = 0, status: bool = True,
                status_timeout: float = 30.0) -> dict[str, Any]:
    """The checks every end-to-end test makes when it is done with a board (each rig's teardown
    calls this): the agent answered `@status` now (a crash since boot that the board's restart
    hid is caught below), and its console shows no restart beyond the `restarts` the test caused
    on purpose, no MemoryError, no traceback and no "agent crashed". Returns the health dict."""
    from gridshed.sim.site import console_health, health_problems
    from gridshed.transport import Console

    h = console_health(board.output(), board.restarts)
    if status:
        h["status_answered"], h["status_error"] = False, "board not running"
        if board.running:
            try:
                with Console(board.port) as con:
                    st = con.status(timeout=status_timeout)
                h["status_error"] = st.get("error") and "error answer: %s" % st["error"]
                h["status_answered"] = not h["status_error"]
            except Exception as e:
                h["status_error"] = "%s: %s" % (type(e).__name__, e)
        h.update(console_health(board.output(), board.restarts))  # the status request's output too
    bad = health_problems(h, restarts)
    assert not bad, "board %s: %s (console log: %s)" % (board.fs_dir.name, "; ".join(bad), board.log_path)
    return h


def agent_window(port: str, ms: int, polled: bool = True, timeout: float = 90.0) -> dict[str, Any]:
    """Wait until the agent's own clock (`@status` uptime_ms) has advanced `ms` from now and, with
    `polled`, it took new meter samples meanwhile: the positive marker that a window passed on
    the board (whatever the host's load), after which a test may assert that nothing happened in
    it. Returns the last status."""
    from gridshed.transport import Console

    with Console(port) as con:
        st = con.status(timeout=30)
        u0, s0 = st["uptime_ms"], st["samples"]
        t_end = time.monotonic() + timeout
        while not (st["uptime_ms"] >= u0 + ms and (not polled or st["samples"] > s0)):
            if time.monotonic() > t_end:
                raise AssertionError(f"the agent's clock did not advance {ms} ms in {timeout:g} s: {st}")
            time.sleep(0.1)
            st = con.status(timeout=30)
    return st


def check_summary(summary: dict[str, Any], restarts: int = 0) -> None:
    """check_board for a `run_site` summary (its health is measured by run_site itself)."""
    from gridshed.sim.site import health_problems

    bad = health_problems(summary["health"], restarts)
    assert not bad, "%s (console log: %s)" % ("; ".join(bad), summary["health"]["console_log"])


class _Gpio(GpioServer):
    """GpioServer that counts connections (one per boot) and re-sends input levels to each."""

    def __init__(self, rig: "Rig") -> None:
        super().__init__(rig._on_out)
        self.rig = rig
        self.connections = 0

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.rig.boot = self.connections
        for pin, level in self.rig.inputs.items():
            writer.write(b"I %d %d\n" % (pin, level))
        await super()._client(reader, writer)


class Rig:
    def __init__(self, cfg: dict[str, Any], board_dir: Path, heapsize: str = HEAP,
                 meter_update_ms: float = 50.0) -> None:
        self.cfg = cfg
        self.board_dir = Path(board_dir)
        self.heapsize = heapsize
        self.load = LoadModel(cfg)
        self.hz = float(cfg.get("nominal_hz", 60))
        self.kw_base = 0.0
        self.inputs: dict[int, int] = {}
        self.boot = 0
        self.pin_log: list[tuple[float, int, int, int]] = []    # (t, boot, pin, level)
        self.block_log: list[tuple[float, int, int, bool]] = []  # (t, boot, block, closed)
        self.meter_update_ms = meter_update_ms
        self.meter: SimMeter | None = None
        self._meter_task: asyncio.Task | None = None
        self.wire: Wire | None = None
        self.gpio: _Gpio | None = None
        self.board: VirtualBoard | None = None
        self.kills = 0
        self.expect_restarts = 0   # reboots the test causes besides kill_board (reset, deploy...)
        self.check = True          # check_board at close (off only for a test that checks itself)
        self.uarts: dict[str, str] = {}  # more sim.json UART roles (e.g. "utility": a Wire's board_path)
        self.romfs: int | None = None    # a ROMFS partition of this many bytes (deploy --romfs)
        self.firmware: tuple[Path, list[str]] | None = None  # another build (dir, files) than built_firmware()

    # ---- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> "Rig":
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None and self.check and self.board is not None:
                await asyncio.to_thread(check_board, self.board, self.kills + self.expect_restarts)
        finally:
            await self.close()

    async def start(self, wait: bool = True) -> None:
        m = self.cfg["meter"]
        self.gpio = _Gpio(self)
        port = await self.gpio.start()
        self.wire = Wire(m["baud"]).start()
        await self.start_meter()
        install(self.board_dir, self.cfg, {"gpio": f"127.0.0.1:{port}",
                                           "uarts": {"meter": self.wire.board_path, **self.uarts}},
                self.firmware)
        self.board = VirtualBoard(self.board_dir, heapsize=self.heapsize, romfs=self.romfs)
        self.board.start()
        if wait:
            await self.wait_up(1)

    async def close(self) -> None:
        if self.board is not None:
            self.board.stop()
        if self.gpio is not None:
            await self.gpio.stop()
        await self.stop_meter()
        if self.wire is not None:
            self.wire.stop()

    # ---- the site --------------------------------------------------------------------------
    def _source(self, t: float) -> Reading:
        return Reading(self.hz, self.load.kw(self.kw_base), True)

    def _on_out(self, t: float, pin: int, level: int) -> None:
        self.pin_log.append((t, self.boot, pin, level))
        i = self.load.pin(pin, level)
        if i is not None:
            self.block_log.append((t, self.boot, i, self.load.closed[i]))

    def closed(self) -> list[bool]:
        return list(self.load.closed)

    def all_open(self) -> bool:
        return not any(self.load.closed)

    def all_closed(self) -> bool:
        return all(self.load.closed)

    def set_input(self, pin: int, level: int) -> None:
        self.inputs[pin] = level
        if self.gpio is not None:
            self.gpio.set_input(pin, level)

    async def start_meter(self) -> None:
        m = self.cfg["meter"]
        self.meter = SimMeter(m["map"], self._source, unit=m["unit"], update_ms=self.meter_update_ms)
        self._meter_task = asyncio.create_task(self.meter.serve_rtu(self.wire.meter_path, m["baud"]))
        await asyncio.sleep(0.2)

    async def stop_meter(self) -> None:
        """The meter process dies: the server closes its port, nothing answers on the bus."""
        if self.meter is not None:
            await self.meter.stop()
        if self._meter_task is not None:
            self._meter_task.cancel()
            try:
                await self._meter_task
            except (asyncio.CancelledError, Exception):
                pass
        self.meter = None
        self._meter_task = None

    def good_polls(self) -> int:
        return len([p for p in self.meter.polls if p.hz is not None]) if self.meter else 0

    # ---- the board -------------------------------------------------------------------------
    async def wait_up(self, boot: int, timeout: float = 60.0) -> None:
        """Until the boot-th process of this board is connected and says `agent up` (generous
        bound: a loaded CI runner boots the unix port much slower than a quiet machine)."""
        t_end = time.monotonic() + timeout
        while self.boot < boot:
            if time.monotonic() > t_end:
                raise AssertionError(f"board boot {boot} never connected; log: {self.board.log_path}")
            await asyncio.sleep(0.02)
        # the n-th "agent up" in the console output
        while self.board.output().count(b"agent up") < boot:
            if time.monotonic() > t_end:
                raise AssertionError(f"board boot {boot} never said 'agent up'; log: {self.board.log_path}")
            await asyncio.sleep(0.02)

    async def kill_board(self, wait: bool = True) -> None:
        """SIGKILL the agent process (a power cut / hard reset); the supervisor boots it again."""
        pid = self.board.pid
        assert pid is not None, "board not running"
        n = self.boot
        os.killpg(pid, signal.SIGKILL)
        self.kills += 1
        if wait:
            await self.wait_up(n + 1)

    async def status(self, timeout: float = 20.0) -> dict[str, Any]:
        from gridshed.transport import Console

        def ask() -> dict[str, Any]:
            with Console(self.board.port) as con:
                return con.status(timeout=timeout)

        st = await asyncio.to_thread(ask)
        assert "error" not in st, st
        return st

    async def events(self, since: int = 0) -> list[dict]:
        from gridshed.transport import Console

        def ask() -> list[dict]:
            with Console(self.board.port) as con:
                return con.events(since, timeout=30)

        return await asyncio.to_thread(ask)

    async def agent_window(self, ms: int, polled: bool = True) -> dict[str, Any]:
        """agent_window() on this board: returns once the agent itself saw `ms` pass."""
        return await asyncio.to_thread(agent_window, self.board.port, ms, polled)

    def journal(self) -> tuple[list[dict], list[tuple]]:
        return journal_records(self.board_dir)

    def state(self) -> dict | None:
        return read_state(self.board_dir)

    @staticmethod
    async def until(pred: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        t_end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > t_end:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            await asyncio.sleep(0.02)
