"""`gridshed sim`: run a whole simulated site from a scenario CSV."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .datafiles import repo_root
from .errors import UserError

ROOT = repo_root()

EXAMPLES = """examples:
  gridshed sim scenarios/ercot_ffr_dip.csv --site scenarios/demo-site.toml
  gridshed sim scenarios/gb_50hz_event.csv --site scenarios/gb-site.toml --transport tcp
  gridshed sim scenarios/ercot_ffr_dip.csv --baud 9600 --json > run.json

scenario CSV: header t_s,hz plus optional meter_ok (0 = meter silent), signal (1 = utility
shed asserted), kw_base; rows at any time step, linear in between (see docs/quickstart.md)."""


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
    p.add_argument("--keep", metavar="DIR", help="keep the board's filesystem (journal, state) in DIR")
    p.add_argument("--report", metavar="FILE", help="also write an event report (.png or .html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from . import siteconfig
    from .sim.scenario import load_scenario
    from .sim.site import FIRMWARE, run_site
    from .sim.summary import render_text

    scenario = load_scenario(args.scenario)
    cfg = siteconfig.load_site(args.site, board_name=args.board)
    if args.board and args.board != "unix-sim":
        raise UserError(f"the simulator runs the virtual board only (unix-sim); {args.board} is a real board")
    for w in cfg.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    live = None if args.json else (lambda line: print(line, flush=True))
    keep = Path(args.keep) if args.keep else None
    from .boards import budget_heapsize, load_board

    heap = args.heapsize or budget_heapsize(load_board("unix-sim"))
    fw = Path(args.firmware) if args.firmware else FIRMWARE
    if not (fw / "main.py").is_file() or not (fw / "agent").is_dir():
        raise UserError(f"{fw} is not a firmware tree (main.py and agent/)")
    summary = asyncio.run(run_site(scenario, cfg, heapsize=heap, meter_update_ms=args.meter_update_ms,
                                   transport=args.transport, baud=args.baud, on_line=live, keep_dir=keep,
                                   firmware_dir=fw))
    if args.report:
        try:
            from .report import report_from_sim
        except ImportError:
            raise UserError("reports are not available in this build") from None
        report_from_sim(summary, args.report)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(render_text(summary))
    from .sim.site import health_problems

    bad = health_problems(summary["health"])
    if bad:  # an agent that crashed or stopped answering fails the run, whatever the relays did
        err = UserError("the board was not healthy: %s; console log: %s" % (
            "; ".join(bad), summary["health"]["console_log"]))
        err.exit_code = 1  # the run failed, as a missed trip does
        raise err
    ok = all(t.get("relay_open_s") is not None for t in summary["trips"])
    return 0 if ok else 1
