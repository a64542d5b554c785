"""`gridshed vboard`: a virtual board that keeps running, for training and trying field flows.

The real agent in the unix-port MicroPython (gridshed.vboard.VirtualBoard) on a pseudo-terminal,
wired to the simulator's parts (gridshed.sim: the pymodbus meter on a simulated RS-485 segment
or Modbus TCP, the GPIO server and load model, so a shed shows up in the meter's kW). The meter
reads steady nominal frequency, or plays a scenario once and then holds its last row. The board
runs until Ctrl-C; every gridshed command that takes --port works against it.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .output import emit_event, warn

EXAMPLES = """examples:
  gridshed vboard                                   (demo site, steady 60 Hz; prints port: /dev/pts/N)
  gridshed vboard --site gb-site.toml               (a 50 Hz site)
  gridshed vboard --scenario ercot_ffr_dip.csv      (plays the dip once, then holds its last row)
  gridshed vboard --dir ~/vboard1                   (keeps the board's files: provisioned config and key,
                                                     journal and state survive the next start)
  gridshed vboard --json                            (one JSON object per line: port, ready, relay, restart)

then, in another terminal, with the port it printed:
  gridshed status --port /dev/pts/N
  gridshed monitor --port /dev/pts/N
  gridshed events --port /dev/pts/N
  gridshed deploy --port /dev/pts/N --board unix-sim
  gridshed provision --port /dev/pts/N --site demo-site.toml --device-id train-1

The first line on stdout is `port: /dev/pts/N` (with --json: {"event": "port", "port": ...}).
Ctrl-C (or SIGTERM) stops the board and the simulated meter and exits 0. `kill -USR1 PID` (the
pid on its board line) pulls the board's USB cable: nothing passes the port either way, the
board runs on; the next SIGUSR1 plugs it back (practise a cable pulled mid-deploy). The simulated meter
follows the board's config when it starts: provisioning a site with another meter transport,
unit or baud needs a restart of gridshed vboard --dir DIR to match. See docs/bring-up.md."""

LOCK = ".gridshed-vboard.lock"


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("vboard", parents=[common],
                       help="run a virtual board (real agent, simulated meter and load) until Ctrl-C",
                       description="Start a virtual board running the real agent with a simulated meter and "
                                   "load, at steady nominal frequency or playing a scenario, and keep it running "
                                   "for gridshed status/monitor/deploy/provision/events --port.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", default="demo-site.toml",
                   help="site.toml for the board's config and the simulated site (default: the demo site)")
    p.add_argument("--heapsize", default=None,
                   help="micropython -X heapsize (default: the board file's memory budget, 80wK)")
    p.add_argument("--scenario", metavar="CSV", help="play this scenario once, then hold its last row "
                                                     "(default: steady nominal frequency)")
    p.add_argument("--dir", metavar="DIR", help="the board's filesystem (default: a temporary one, removed "
                                                "at exit); a board already in DIR keeps its files and config")
    p.add_argument("--device-id", help="device id in the board's config (default: device = ... in the site)")
    p.set_defaults(func=run)


def _say(args: argparse.Namespace, event: str, text: str, **data: Any) -> None:
    emit_event(args, {"event": event, **data}, text)


def _board_config(board_dir: Path) -> dict[str, Any] | None:
    """The config a board in board_dir boots from (None: no valid one)."""
    from agent import cbor, integrity

    try:
        raw = (board_dir / "config.cbor").read_bytes()
    except OSError:
        return None
    body, why = integrity.unwrap(raw)
    if why is not None:
        return None
    try:
        cfg = cbor.loads(body)
    except ValueError:
        return None
    return cfg if isinstance(cfg, dict) else None


def run(args: argparse.Namespace) -> int:
    from .. import siteconfig
    from ..boards import budget_heapsize, load_board

    cfg = siteconfig.load_site(args.site, device_id=args.device_id)
    if cfg["board"] != "unix-sim":
        raise UserError(f"{args.site}: board {cfg['board']} is a real board; gridshed vboard runs unix-sim "
                        f"(set board = \"unix-sim\" in the site file)")
    scenario = None
    if args.scenario:
        from .sim import scenario_warnings
        from ..sim.scenario import load_scenario

        scenario = load_scenario(args.scenario)
        for w in scenario_warnings(scenario, cfg, args.site):
            warn(w)
    for w in cfg.get("warnings", []):
        warn(w)
    heap = args.heapsize or budget_heapsize(load_board("unix-sim"))
    from ..vboard import heap_bytes

    try:
        heap_bytes(heap, 4)
    except (ValueError, KeyError):
        raise UserError(f"--heapsize {heap}: not a heap size (e.g. 80wK, 96k, 131072)") from None
    return asyncio.run(_serve(args, cfg, scenario, heap))


async def _serve(args: argparse.Namespace, site_cfg: dict[str, Any], scenario: Any, heap: str) -> int:
    import fcntl
    import os

    from .. import siteconfig
    from ..sim.meter import Reading, SimMeter
    from ..sim.site import GpioServer, LoadModel, install_firmware
    from ..sim.wire import Wire
    from ..vboard import VirtualBoard

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    cable: list[int] = []  # SIGUSR1: pull the USB cable, the next one plugs it back (training)
    loop.add_signal_handler(signal.SIGUSR1, lambda: cable.append(1))

    temp = args.dir is None
    board_dir = Path(tempfile.mkdtemp(prefix="gridshed-vboard-")) if temp else Path(args.dir).expanduser()
    if board_dir.exists() and not board_dir.is_dir():
        raise UserError(f"--dir {board_dir}: not a directory")
    board_dir.mkdir(parents=True, exist_ok=True)
    lock = os.open(board_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        raise UserError(f"--dir {board_dir}: another gridshed vboard runs this board") from None

    # a board already in DIR keeps its files; the simulated site follows the config it boots from
    kept = None if temp else _board_config(board_dir)
    cfg = dict(kept or site_cfg)
    cfg["meter"] = dict(cfg["meter"])
    m = cfg["meter"]
    load = LoadModel(cfg)
    names = [b["name"] for b in cfg["blocks"]]
    nominal = float(cfg.get("nominal_hz", 60))
    t_start: list[float] = []   # scenario clock start (monotonic), once the board polls
    clock0 = time.monotonic()

    def st() -> float:
        return time.monotonic() - clock0

    def source(t: float) -> Reading:
        if scenario is None:
            return Reading(nominal, load.kw(0.0))
        s = t - t_start[0] if t_start else 0.0
        ok = scenario.value("meter_ok", s, 1.0) >= 0.5
        return Reading(scenario.value("hz", s), load.kw(scenario.value("kw_base", s, 0.0)), ok)

    def on_out(t: float, pin: int, level: int) -> None:
        i = load.pin(pin, level)
        if i is not None:
            closed = load.closed[i]
            _say(args, "relay", f"{st():9.3f}s  relay {names[i]:<10} {'CLOSED (load on)' if closed else 'OPEN   (shed)'}",
                 t_s=round(st(), 3), block=names[i], state="closed" if closed else "open")

    gpio = GpioServer(on_out)
    gpio_port = await gpio.start()
    meter = SimMeter(m["map"], source, unit=m.get("unit", 1))
    sim_cfg: dict[str, Any] = {"gpio": f"127.0.0.1:{gpio_port}", "uarts": {}}
    tasks = []
    wire = None
    board = None
    try:
        if m["transport"] == "rtu":
            wire = Wire(m["baud"]).start()
            sim_cfg["uarts"]["meter"] = wire.board_path
            tasks.append(asyncio.create_task(meter.serve_rtu(wire.meter_path, m["baud"])))
            where = f"RTU {m['baud']} baud, unit {m.get('unit', 1)}"
        else:
            import socket

            port = m.get("port") if kept else None
            if not port:
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
                s.close()
            m["host"], m["port"] = "127.0.0.1", port
            tasks.append(asyncio.create_task(meter.serve_tcp("127.0.0.1", port)))
            where = f"Modbus TCP 127.0.0.1:{port}, unit {m.get('unit', 1)}"
        await asyncio.sleep(0.2)
        if kept and (board_dir / "main.py").exists():
            import json as _json

            (board_dir / "sim.json").write_text(_json.dumps(sim_cfg))
            if m["transport"] == "tcp" and kept["meter"].get("port") != m["port"]:
                (board_dir / "config.cbor").write_bytes(siteconfig.config_bytes(cfg))
        else:
            install_firmware(board_dir, cfg, sim_cfg)
        board = VirtualBoard(board_dir, heapsize=heap)
        board.start()
        _say(args, "port", f"port: {board.port}", port=board.port, dir=str(board_dir), heapsize=heap,
             console_log=str(board.log_path))
        _say(args, "board", f"board: unix-sim at heap {heap}, files in {board_dir}"
                            f"{' (temporary)' if temp else ''}; console log {board.log_path}; "
                            f"`kill -USR1 {os.getpid()}` pulls its USB cable (again: plugs it back)",
             site=cfg.get("site"), device=cfg.get("device"), kept_config=bool(kept), pid=os.getpid())
        meter_desc = (f"steady {nominal:g} Hz" if scenario is None else f"scenario {scenario.name} "
                      f"({scenario.duration:g} s, then its last row)")
        _say(args, "site", f"site: {cfg.get('site')} / {cfg.get('device')}{' (config kept from DIR)' if kept else ''}; "
                           f"meter {m['map'].get('model')} over {where}: {meter_desc}; "
                           f"{len(names)} relay blocks ({', '.join(names)})",
             meter=m["map"].get("model"), transport=m["transport"], blocks=names)
        # ready once the agent polls the meter (a board refusing its config never does: say so)
        deadline = time.monotonic() + 60
        ready = False
        restarts = 0
        meter_state: list[str | None] = [None]
        while not stop.is_set():
            if not ready and len([p for p in meter.polls if p.hz is not None]) >= 3:
                ready = True
                _say(args, "ready", f"{st():9.3f}s  ready: the agent polls the meter; use --port {board.port} "
                                    f"(gridshed status, monitor, events, deploy, provision); Ctrl-C to stop",
                     t_s=round(st(), 3))
                if scenario is not None:
                    t_start.append(time.monotonic())
                    _say(args, "scenario", f"{st():9.3f}s  scenario {scenario.name} starts", t_s=round(st(), 3))
            if not ready and time.monotonic() > deadline:
                deadline = float("inf")
                _say(args, "not-ready", f"{st():9.3f}s  the agent has not polled the meter in 60 s: look at the "
                                        f"console log {board.log_path} or `gridshed status --port {board.port}`",
                     t_s=round(st(), 3))
            while cable:
                cable.pop()
                board.unplugged = not board.unplugged
                _say(args, "cable", f"{st():9.3f}s  USB cable "
                                    + ("PULLED: nothing passes the port (the board runs on)" if board.unplugged
                                       else "plugged back in"), t_s=round(st(), 3), plugged=not board.unplugged)
            if board.restarts != restarts:
                restarts = board.restarts
                _say(args, "restart", f"{st():9.3f}s  board restarted (#{restarts})", t_s=round(st(), 3),
                     restarts=restarts)
            if scenario is not None and t_start and len(t_start) == 1:
                r = source(time.monotonic())
                state = ("SILENT (no reply)" if not r.ok else "answers NaN" if r.hz != r.hz
                         else "reports 0 Hz" if r.hz == 0 else "ok")
                if state != meter_state[0]:
                    if meter_state[0] is not None or state != "ok":
                        _say(args, "meter", f"{st():9.3f}s  simulated meter {state}", t_s=round(st(), 3), meter=state)
                    meter_state[0] = state
            if scenario is not None and t_start and len(t_start) == 1 and time.monotonic() - t_start[0] > scenario.duration:
                t_start.append(0.0)  # said once
                _say(args, "scenario-end", f"{st():9.3f}s  scenario {scenario.name} ended; holding its last row "
                                           f"({scenario.value('hz', scenario.duration):g} Hz)", t_s=round(st(), 3))
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
    finally:
        health = None
        if board is not None:
            board.stop()
            from ..sim.site import console_health

            health = console_health(board.output(), board.restarts)
        await gpio.stop()
        await meter.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if wire is not None:
            wire.stop()
        os.close(lock)
        if temp:
            shutil.rmtree(board_dir, ignore_errors=True)
            if board is not None:
                Path(board.log_path).unlink(missing_ok=True)
    h = health or {}
    _say(args, "stopped", f"{st():9.3f}s  stopped: board and simulated meter shut down"
                          + (f" (over the run: {h['restarts']} restart(s), {h['memory_errors']} MemoryError(s), "
                             f"{h['tracebacks']} traceback(s), {h['crashes']} crash(es))" if h else ""),
         t_s=round(st(), 3), health=h)
    return 0
