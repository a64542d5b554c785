"""`gridshed sim`: run a whole simulated site from a scenario CSV."""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ..datafiles import repo_root
from ..errors import UserError
from .output import emit, note, warn

ROOT = repo_root()

EXAMPLES = """examples:
  gridshed sim scenarios/ercot_ffr_dip.csv --site scenarios/demo-site.toml
  gridshed sim scenarios/gb_50hz_event.csv --site scenarios/gb-site.toml --transport tcp
  gridshed sim scenarios/ercot_ffr_dip.csv --baud 9600 --json > run.json
  gridshed sim scenarios/market_dip.csv --site scenarios/market-sim-site.toml

scenario CSV: header t_s,hz plus optional meter_ok (0 = meter silent), signal (1 = utility
shed asserted), kw_base, price ($/MWh: sent as a signed schedule to a site with [market],
docs/market.md); rows at any time step, linear in between; hz may be 0 (a meter that
lost its voltage reference) or nan (a meter answering Not-a-Number). See docs/quickstart.md.

exit status: 0 every expectation met, 1 an expectation failed (a trip condition that opened no
relay, or a relay that opened with no trip condition; one line on stderr says which),
2 usage errors (bad scenario, bad site file, --keep DIR in use)."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sim", parents=[common], help="run a simulated site (meter, board, load, signals)",
                       description="Run the real firmware on a virtual board against a pymodbus meter "
                                   "that follows SCENARIO, print a timeline and what a utility would measure.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", help="scenario CSV file")
    p.add_argument("--site", default=str(ROOT / "scenarios" / "demo-site.toml"), help="site.toml (default: the demo site)")
    p.add_argument("--board", default=None, help="board file name (default: the site's board, usually unix-sim)")
    p.add_argument("--transport", choices=["rtu", "tcp"], help="override the meter transport")
    p.add_argument("--baud", type=int, help="override the RTU baud rate")
    p.add_argument("--meter-update-ms", type=float, default=50.0, help="how often the meter refreshes its registers")
    p.add_argument("--heapsize", default=None, help="micropython -X heapsize for the virtual board (default: the board file's memory budget, word-scaled: 80wK is 80 KB on a 32-bit board)")
    p.add_argument("--firmware", metavar="DIR", help="firmware source tree to build and run (default: this checkout's firmware/)")
    p.add_argument("--keep", metavar="DIR", help="keep the board's filesystem (journal, state) in DIR; a board "
                                                  "directory left by an earlier run is cleared first (said on "
                                                  "stderr), one in use by a running sim is refused")
    p.add_argument("--report", metavar="FILE", help="also write an event report (.png or .html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import siteconfig
    from ..sim.scenario import load_scenario
    from ..sim.site import FIRMWARE, run_site
    from ..sim.summary import failure_line, render_text

    scenario = load_scenario(args.scenario)
    cfg = siteconfig.load_site(args.site, board_name=args.board)
    if args.board and args.board != "unix-sim":
        raise UserError(f"the simulator runs the virtual board only (unix-sim); {args.board} is a real board")
    for w in cfg.get("warnings", []) + scenario_warnings(scenario, cfg, args.site):
        warn(w)
    live = None if args.json else (lambda line: print(line, flush=True))
    from ..boards import budget_heapsize, load_board

    heap = args.heapsize or budget_heapsize(load_board("unix-sim"))
    if not args.heapsize and isinstance(cfg.get("market"), dict) and int(heap[:-2]) < MARKET_HEAP_WK:
        # the market feature's measured heap (docs/architecture.md, Test heaps; docs/market.md)
        heap = "%dwK" % MARKET_HEAP_WK
        note(f"note: [market]: the virtual board runs at {heap}, the market feature's measured heap")
    fw = Path(args.firmware) if args.firmware else FIRMWARE
    if not (fw / "main.py").is_file() or not (fw / "agent").is_dir():
        raise UserError(f"{fw} is not a firmware tree (main.py and agent/)")
    with keep_dir(args.keep) as keep:
        summary = asyncio.run(run_site(scenario, cfg, heapsize=heap, meter_update_ms=args.meter_update_ms,
                                       transport=args.transport, baud=args.baud, on_line=live, keep_dir=keep,
                                       firmware_dir=fw))
    if args.report:
        try:
            from ..report import report_from_sim
        except ImportError:
            raise UserError("reports are not available in this build") from None
        report_from_sim(summary, args.report)
    emit(args, summary, lambda: render_text(summary))
    from ..sim.site import health_problems

    bad = health_problems(summary["health"])
    if bad:  # an agent that crashed or stopped answering fails the run, whatever the relays did
        err = UserError("the board was not healthy: %s; console log: %s" % (
            "; ".join(bad), summary["health"]["console_log"]))
        err.exit_code = 1  # the run failed, as a missed trip does
        raise err
    why = failure_line(summary)
    if why:
        print(f"gridshed: sim: {why}", file=sys.stderr)
        return 1
    return 0


def scenario_warnings(scenario, cfg: dict, site_path: str) -> list[str]:
    """What the scenario plays that this site cannot see as meant (said before the run)."""
    from ..sim.scenario import nominal_of

    out = []
    nom = nominal_of(scenario)
    if nom is not None and nom != cfg.get("nominal_hz"):
        out.append(f"scenario {scenario.name} plays a {nom} Hz grid but {site_path} is a "
                   f"{cfg.get('nominal_hz')} Hz site (nominal_hz): its frequencies do not mean there what the "
                   f"scenario intends; use a {nom} Hz site (e.g. scenarios/gb-site.toml for 50 Hz)")
    if scenario.has("price") and not isinstance(cfg.get("market"), dict):
        out.append(f"scenario {scenario.name} has a price column but {site_path} has no [market] section: "
                   f"the price is not played (docs/market.md)")
    sig = cfg.get("signals") or {}
    if scenario.has("signal") and not sig.get("dry_contact"):
        out.append(f"scenario {scenario.name} has a signal column but {site_path} has no dry contact "
                   f"([signals] dry_contact = true): the signal is not played")
    return out


LOCK = ".gridshed-sim.lock"
MARKET_HEAP_WK = 84


class keep_dir:
    """--keep DIR for one run: locked against a second sim on the same DIR, and cleared of an
    earlier run's board files (a persisted trip or journal would otherwise carry over)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.fd = None

    def __enter__(self) -> Path | None:
        import fcntl
        import os
        import shutil

        d = self.path
        if d is None:
            return None
        if d.exists() and not d.is_dir():
            raise UserError(f"--keep {d}: not a directory")
        d.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise UserError(f"--keep {d}: another gridshed sim is using this directory; give each run its own "
                            f"--keep DIR") from None
        old = [p for p in d.iterdir() if p.name != LOCK]
        if old:
            if not any((d / f).exists() for f in ("sim.json", "config.cbor", "main.py")):
                raise UserError(f"--keep {d}: the directory holds other files ({old[0].name}, ...), not a board "
                                f"kept by gridshed sim; give an empty or new directory")
            for p in old:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            note(f"note: --keep {d}: cleared the board files of an earlier run ({len(old)} entries)")
        log = d.resolve().with_name(d.resolve().name + ".console.log")
        if log.exists():
            log.unlink()
        return d

    def __exit__(self, *exc: object) -> None:
        import os

        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
