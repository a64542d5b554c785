"""Run a whole simulated site: meter + wire + virtual board + load model + utility signal.

Every time here is the host's monotonic clock: when the scenario crosses the pickup, when the
meter's registers first show it, when the board polled them, when a relay pin changed (the GPIO
line arrives the moment the firmware writes the pin). From those the summary computes what a
utility would measure.
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import siteconfig
from ..datafiles import repo_root
from ..errors import UserError
from .meter import Reading, SimMeter
from .scenario import Scenario
from .wire import Wire

FIRMWARE = repo_root() / "firmware"


@dataclass
class PinEvent:
    t: float
    pin: int
    level: int


@dataclass
class BlockEvent:
    t: float        # scenario seconds (-1.0 before the scenario started)
    block: int
    closed: bool
    at: float | None = None   # host monotonic time of the pin write (times before the start too)


@dataclass
class SiteRun:
    cfg: dict[str, Any]
    scenario: Scenario
    board_dir: Path
    t0: float = 0.0
    pin_events: list[PinEvent] = field(default_factory=list)
    block_events: list[BlockEvent] = field(default_factory=list)
    console: list[tuple[float, str]] = field(default_factory=list)
    meter: SimMeter | None = None
    wire: Wire | None = None


SIM_KID = b"gridshed-sim"


def price_intervals(scenario: Scenario, wall0: int) -> list[list[Any]]:
    """The scenario's price column as schedule intervals (docs/market.md) from unix second
    wall0 = scenario time 0: one interval per price step, whole seconds, the last one held a
    minute past the end."""
    ts, ps = scenario.t, scenario.cols["price"]
    iv: list[list[Any]] = []
    for i, (t, p) in enumerate(zip(ts, ps)):
        start = wall0 + int(round(t))
        end = wall0 + (int(round(ts[i + 1])) if i + 1 < len(ts) else int(round(scenario.duration)) + 60)
        if iv and iv[-1][3] == p and iv[-1][1] == start:
            iv[-1][1] = end
        elif end > start:
            iv.append([start, end, "p", float(p)])
    if len(iv) > 16:
        raise UserError(f"scenario {scenario.name}: {len(iv)} price steps; one signed command carries a "
                        f"schedule of at most 16 (docs/market.md, Limits)")
    return iv


def send_market(port: str, key: bytes, cfg: dict[str, Any], iv: list[list[Any]]) -> None:
    """The host's part of the market loop: the signed time, then the signed schedule."""
    import base64

    from ..signing import make_command
    from ..transport import Console

    with Console(port) as con:
        r = con.request("nonce", timeout=30)[-1]
        if "nonce" not in r:
            raise UserError(f"the virtual board did not give its command nonce: {r.get('error') or r}")
        nonce = bytes.fromhex(r["nonce"])
        for seq, cmd, kw in ((1, "time", {"nonce": nonce, "t": int(time.time())}),
                             (2, "schedule", {"schedule": {"sid": 1, "iv": iv}})):
            buf = make_command(key, SIM_KID, cmd, seq, target_device=cfg["device"], **kw)
            r = con.request("cmd", base64.b64encode(buf).decode(), timeout=30)[-1]
            if r.get("ok") is not True:
                raise UserError(f"the virtual board refused the market {cmd} command: {r.get('refused') or r}")


def install_firmware(board_dir: Path, cfg: dict[str, Any], sim_cfg: dict[str, Any],
                     firmware_dir: Path = FIRMWARE) -> None:
    """Lay the board's filesystem as `gridshed build` + deploy would: .mpy agent, /config.cbor, sim.json."""
    from ..build import build

    with tempfile.TemporaryDirectory(prefix="gridshed-build-") as tmp:
        manifest = build("unix-sim", src=firmware_dir, out=Path(tmp) / "unix-sim")
        out = Path(manifest["path"])
        for e in manifest["files"]:
            dst = board_dir / e["file"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / e["file"], dst)
        # /build.json as `gridshed deploy` leaves it: provision and inventory name the build
        from ..deploy import board_manifest_bytes

        (board_dir / "build.json").write_bytes(board_manifest_bytes(manifest))
    (board_dir / "config.cbor").write_bytes(siteconfig.config_bytes(cfg))
    import json

    (board_dir / "sim.json").write_text(json.dumps(sim_cfg))


class GpioServer:
    """The virtual board's GPIO: output lines in, input lines out, all timestamped."""

    def __init__(self, on_out: Callable[[float, int, int], None]) -> None:
        self.on_out = on_out
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.bad_lines = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.connected.set()
        while True:
            try:
                line = await reader.readline()
            except ConnectionError:  # the board process died mid-line (e.g. out of memory)
                line = b""
            t = time.monotonic()
            if not line:
                break
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"O":
                try:
                    self.on_out(t, int(parts[1]), int(parts[2]))
                except ValueError:
                    self.bad_lines += 1
            else:
                self.bad_lines += 1
        self.connected.clear()

    def send(self, data: bytes) -> None:
        """Raw lines to the board (edge streams: `X <pin> <t_us> ...`, see sim/acsense.py)."""
        if self.writer is not None:
            self.writer.write(data)

    def set_input(self, pin: int, level: int) -> None:
        if self.writer is not None:
            self.writer.write(b"I %d %d\n" % (pin, level))

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.server is not None:
            self.server.close()


class LoadModel:
    """kW the meter sees: site base load plus the miners behind every closed block."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.blocks = cfg["blocks"]
        self.pin_block = {}
        for i, b in enumerate(self.blocks):
            for p in b["pins"]:
                self.pin_block[p] = i
        self.pin_level: dict[int, int] = {}
        self.closed = [False] * len(self.blocks)
        # optional per-block kW source while the relay is closed (e.g. sim.miners.MinerFarm),
        # and callbacks (block, closed) on every block change (the farm powers its miners)
        self.power: dict[int, Callable[[], float]] = {}
        self.listeners: list[Callable[[int, bool], None]] = []

    def pin(self, pin: int, level: int) -> int | None:
        """Record a pin write; returns the block index whose state changed, else None."""
        self.pin_level[pin] = level
        i = self.pin_block.get(pin)
        if i is None:
            return None
        b = self.blocks[i]
        closed = all(self.pin_level.get(p, -1) == b["active"] for p in b["pins"])
        if closed != self.closed[i]:
            self.closed[i] = closed
            for cb in self.listeners:
                cb(i, closed)
            return i
        return None

    def block_kw(self, i: int) -> float:
        if i in self.power:
            return self.power[i]()
        b = self.blocks[i]
        return b["miners"] * b["kw_per_miner"]

    def kw(self, base: float) -> float:
        return base + sum(self.block_kw(i) for i, c in enumerate(self.closed) if c)


def _board_status(port: str, timeout: float) -> dict[str, Any] | None:
    from ..transport import Console

    with Console(port) as con:
        answers = con.request("status", timeout=timeout)
    return answers[-1] if answers else None


TRACEBACK = "Traceback (most recent call last)"


def console_health(output: bytes | str, restarts: int) -> dict[str, Any]:
    """What the board's console says about its health: process restarts (reboots: the
    supervisor's count), MemoryErrors and tracebacks anywhere in its output, and
    "agent crashed" lines (main.py's last line of defence). A traceback that ends in
    KeyboardInterrupt is a technician's Ctrl-C (deploy, provision: "agent stopped (Ctrl-C)"),
    counted apart as "interrupts", not as a traceback."""
    text = output.decode(errors="replace") if isinstance(output, (bytes, bytearray)) else output
    tracebacks = interrupts = 0
    last = None
    for part in text.split(TRACEBACK)[1:]:
        # the exception line: the first one after the header that is not a "  File ..." frame
        exc = next((ln for ln in part.splitlines()[1:] if ln and not ln.startswith(" ")), "")
        if exc.startswith("KeyboardInterrupt"):
            interrupts += 1
        else:
            tracebacks += 1
            last = exc.strip()[:120] or None
    return {"restarts": restarts, "memory_errors": text.count("MemoryError"),
            "tracebacks": tracebacks, "interrupts": interrupts, "crashes": text.count("agent crashed"),
            "last_exception": last}


def health_problems(h: dict[str, Any], restarts: int = 0) -> list[str]:
    """Everything wrong in a health dict (console_health + "status_answered"/"status_error"),
    as short phrases; `restarts` is how many reboots the caller caused on purpose."""
    out = []
    if h.get("restarts", 0) != restarts:
        out.append("board restarted %d time(s)%s" % (h["restarts"], " (expected %d)" % restarts if restarts else ""))
    for key, what in (("memory_errors", "MemoryError"), ("tracebacks", "traceback"), ("crashes", "agent crash")):
        if h.get(key):
            last = " (last: %s)" % h["last_exception"] if key == "tracebacks" and h.get("last_exception") else ""
            out.append("%d %s(s) on the console%s" % (h[key], what, last))
    if "status_answered" in h and not h["status_answered"]:
        out.append("@status not answered (%s)" % (h.get("status_error") or "no answer"))
    return out


async def run_site(scenario: Scenario, cfg: dict[str, Any], *, heapsize: str = "64wK",
                   meter_update_ms: float = 50.0, transport: str | None = None, baud: int | None = None,
                   on_line: Callable[[str], None] | None = None, keep_dir: Path | None = None,
                   settle_s: float = 1.0, firmware_dir: Path = FIRMWARE,
                   ac_opts: Any = None, extra_files: dict[str, bytes] | None = None,
                   on_load: Callable[[LoadModel], None] | None = None,
                   before_status: Callable[[str], Any] | None = None,
                   boot_timeout: float = 60.0, status_timeout: float = 15.0) -> dict[str, Any]:
    """Run the scenario in real time; returns the measured summary (see summary.py).

    Optional hooks: ``extra_files`` are written into the board's filesystem before it boots
    (e.g. ``{"keys.cbor": ...}``); ``on_load(load_model)`` runs once the load model exists (e.g.
    ``MinerFarm.attach``); ``before_status(console_port)`` runs in a thread after the scenario,
    before the final ``@status``, and its result is ``summary["before_status"]`` (an exception
    is recorded there as ``{"error": ...}``).

    ``summary["health"]`` says whether the board stayed well (see ``console_health``): its
    restarts, MemoryErrors, tracebacks and crashes on the console, whether the final
    ``@status`` answered (``status_answered``, else ``status_error`` says why) and the console
    log's path; ``health_problems(summary["health"])`` lists what is wrong.

    ``boot_timeout`` bounds the wait for the board's GPIO connection and first polls, and
    ``status_timeout`` the final ``@status``: a healthy board needs well under a second for
    either; the generous defaults only keep a loaded machine from failing a healthy run (the
    memory bisection of ``make bench`` passes short ones, since it expects failures).
    """
    from ..vboard import VirtualBoard
    from .summary import summarize

    cfg = dict(cfg)
    cfg["meter"] = dict(cfg["meter"])
    # a price column for a site with [market]: a key of the run's own signs the time and the
    # schedule the board then executes on its clock (docs/market.md)
    market_key = None
    if scenario.has("price") and isinstance(cfg.get("market"), dict):
        from ..signing import new_key
        from ..siteconfig import keys_bytes

        market_key = new_key()
        extra_files = dict(extra_files or {})
        extra_files["keys.cbor"] = keys_bytes({SIM_KID: market_key})
    if transport:
        cfg["meter"]["transport"] = transport
    if baud:
        cfg["meter"]["baud"] = baud
    m = cfg["meter"]
    board_dir = keep_dir or Path(tempfile.mkdtemp(prefix="gridshed-board-"))
    board_dir.mkdir(parents=True, exist_ok=True)
    run = SiteRun(cfg, scenario, board_dir)
    load = LoadModel(cfg)
    if on_load is not None:
        on_load(load)
    say = on_line or (lambda s: None)
    started = asyncio.Event()
    before: Any = None  # before_status() result

    def sc_time(t: float) -> float:
        return t - run.t0 if started.is_set() else -1.0

    def source(t: float) -> Reading:
        st = sc_time(t)
        if st < 0:
            base = scenario.value("kw_base", 0.0, 0.0)
            return Reading(scenario.value("hz", 0.0), load.kw(base))
        ok = scenario.value("meter_ok", st, 1.0) >= 0.5
        return Reading(scenario.value("hz", st), load.kw(scenario.value("kw_base", st, 0.0)), ok)

    def on_out(t: float, pin: int, level: int) -> None:
        run.pin_events.append(PinEvent(t, pin, level))
        i = load.pin(pin, level)
        if i is not None:
            ev = BlockEvent(sc_time(t), i, load.closed[i], t)
            run.block_events.append(ev)
            if started.is_set():
                say(f"{ev.t:8.3f}s  relay {cfg['blocks'][i]['name']:<10} {'CLOSED (load on)' if ev.closed else 'OPEN   (shed)'}")

    gpio = GpioServer(on_out)
    gpio_port = await gpio.start()
    meter = SimMeter(m["map"], source, unit=m["unit"], update_ms=meter_update_ms)
    run.meter = meter
    sim_cfg: dict[str, Any] = {"gpio": f"127.0.0.1:{gpio_port}", "uarts": {}}
    tasks = []
    if m["transport"] == "rtu":
        wire = Wire(m["baud"]).start()
        run.wire = wire
        sim_cfg["uarts"]["meter"] = wire.board_path
        tasks.append(asyncio.create_task(meter.serve_rtu(wire.meter_path, m["baud"])))
    else:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cfg["meter"]["host"], cfg["meter"]["port"] = "127.0.0.1", port
        tasks.append(asyncio.create_task(meter.serve_tcp("127.0.0.1", port)))
    await asyncio.sleep(0.2)
    install_firmware(board_dir, cfg, sim_cfg, firmware_dir)
    for name, data in (extra_files or {}).items():
        (board_dir / name).write_bytes(data)
    board = VirtualBoard(board_dir, heapsize=heapsize)
    dry_pin = (cfg.get("signals") or {}).get("dry_contact_pin") or cfg.get("_dry_contact_pin")
    try:
        board.start()
        try:
            await asyncio.wait_for(gpio.connected.wait(), boot_timeout)
        except asyncio.TimeoutError:
            raise UserError(f"virtual board did not come up (no GPIO connection in {boot_timeout:g} s); "
                            f"console log: {board.log_path}") from None
        # wait for the first good polls: the site is "running" from here on
        deadline = time.monotonic() + boot_timeout
        while len([p for p in meter.polls if p.hz is not None]) < 3:
            if time.monotonic() > deadline:
                raise UserError(f"the board never polled the meter; console log: {board.log_path}")
            await asyncio.sleep(0.02)
        # [ac_sense] enabled: the site's AC waveform reaches the board's sense pin as zero-crossing
        # edges from the scenario's hz (sim/acsense.py; options ac_opts: AcOptions)
        acs = cfg.get("ac_sense") or {}
        ac_t0 = time.monotonic() + settle_s
        if acs.get("enabled") and acs.get("pin") is not None:
            from .acsense import AcSense

            ac = AcSense(scenario, gpio.send, acs["pin"], ac_t0, ac_opts, lead_s=settle_s)
            tasks.append(asyncio.create_task(ac.run()))
        if market_key is not None:
            wall0 = int(time.time()) + 3  # scenario time 0 on the board's clock, a whole second
            iv = price_intervals(scenario, wall0)
            await asyncio.to_thread(send_market, board.port, market_key, cfg, iv)
            await asyncio.sleep(max(0.0, wall0 - time.time()))
            ac_t0 = time.monotonic()
        else:
            await asyncio.sleep(settle_s)
        run.t0 = ac_t0 if acs.get("enabled") else time.monotonic()
        started.set()
        say(f"{0:8.3f}s  scenario {scenario.name} starts ({scenario.duration:.1f} s), "
            f"pickup {cfg['trip']['pickup_hz']} Hz, restore {cfg['trip']['restore_hz']} Hz")
        if market_key is not None:
            mk = cfg["market"]
            say(f"{0:8.3f}s  market: clock set, schedule of {len(iv)} price intervals sent"
                + (f"; {mk.get('program', 'RRS')} obligation {mk['obligation_mw']} MW" if mk.get("obligation_mw") else ""))
        last_status = -1.0
        last_signal = None
        while True:
            st = time.monotonic() - run.t0
            if st > scenario.duration:
                break
            if scenario.has("signal") and dry_pin is not None:
                sig = 1 if scenario.value("signal", st) >= 0.5 else 0
                if sig != last_signal:
                    active = (cfg.get("signals") or {}).get("dry_contact_active", 1)
                    gpio.set_input(dry_pin, sig if active else 1 - sig)
                    if last_signal is not None or sig:
                        say(f"{st:8.3f}s  utility signal {'ASSERTED' if sig else 'released'}")
                    last_signal = sig
            if st - last_status >= 1.0:
                last_status = st
                r = source(time.monotonic())
                bar = "".join("#" if c else "." for c in load.closed)
                price = f"  {scenario.value('price', st):8.2f} $/MWh" if market_key is not None else ""
                say(f"{st:8.3f}s  {r.hz:7.3f} Hz  {load.kw(scenario.value('kw_base', st, 0.0)):8.1f} kW  "
                    f"blocks [{bar}]{price}{'' if r.ok else '  METER SILENT'}")
            await asyncio.sleep(0.01)
        if before_status is not None:
            try:
                before = await asyncio.to_thread(before_status, board.port)
            except Exception as e:
                before = {"error": "%s: %s" % (type(e).__name__, e)}
        status = None
        status_error = None
        try:
            status = await asyncio.to_thread(_board_status, board.port, status_timeout)
        except Exception as e:  # recorded in summary["health"], never swallowed
            status_error = "%s: %s" % (type(e).__name__, e)
        if status is None and status_error is None:
            status_error = "no answer in %g s" % status_timeout
        elif status is not None and "error" in status:
            status_error = "the board answered an error: %s" % status["error"]
    finally:
        board.stop()
        await gpio.stop()
        await meter.stop()
        for t in tasks:
            t.cancel()
        if run.wire:
            run.wire.stop()
    try:
        run.console = [(0.0, line) for line in Path(board.log_path).read_text(errors="replace").splitlines()]
    except OSError:
        run.console = []
    summary = summarize(run, load)
    summary["board_status"] = status
    health = console_health(board.output(), board.restarts)
    health["status_answered"] = status_error is None
    health["status_error"] = status_error
    health["console_log"] = str(board.log_path)
    summary["health"] = health
    if before_status is not None:
        summary["before_status"] = before
    summary["board_dir"] = str(board_dir)
    if keep_dir is None:
        shutil.rmtree(board_dir, ignore_errors=True)
        summary["board_dir"] = None
    return summary
