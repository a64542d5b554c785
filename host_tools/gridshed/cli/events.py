"""`gridshed events` (pull / read / export the journal) and `gridshed report` (figure + HTML for utilities)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UserError
from .output import emit
from .output import warn as _warn

EVENTS_EXAMPLES = """examples:
  gridshed events --port /dev/ttyUSB0                    new records since the last pull, as a listing
  gridshed events --port /dev/ttyUSB0 -o events.json     ... saved for `gridshed report`
  gridshed events --port /dev/ttyUSB0 --all -o all.csv --samples
  gridshed events --dir board-fs/ -o events.csv          journal files of a board filesystem or
                                                         `gridshed sim --keep board-fs/`
  gridshed events --port /dev/ttyUSB0 --json             the JSON document on stdout

The board keeps running while it is read (console protocol, `@events <since>`). The highest
sequence number pulled from each device (site/device) is remembered in a small state file
(default: <user data dir>/gridshed/events-state.json, or $GRIDSHED_EVENTS_STATE, or --state),
so the next pull without --since transfers only newer records. --since N asks for records after
N; --all means --since 0. --dir reads everything (filter with --since).

CSV columns: n,t,ms,kind then each field (nested maps as a.b); a capture's bytes as smp.b64;
--samples adds one row per recorded meter sample after each capture (kind "sample", n of its
capture, ms/t of the sample, hz, kw, mask). See docs/journal.md."""

REPORT_EXAMPLES = """examples:
  gridshed report events.json -o report.html      figure + summary + event table, one file
  gridshed report events.json -o report.png       the figure only
  gridshed report board-fs/ -o report.html        straight from a board directory
  gridshed report events.json --trip 412 -o trip412.html   the boot holding record 412
  gridshed report events.csv --site site.toml -o r.html    thresholds/blocks from the site file

EVENTS is a .json (or .csv) from `gridshed events`, or a directory holding journal.<i> files.
The figure: frequency with the pickup and restore lines, site kW, one bar per relay block (green
= closed); each trip annotated with its response time (trigger -> relay open) and the kW shed.
`gridshed sim SCENARIO --report out.png` draws the same from a simulated run."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("events", parents=[common], help="pull the event journal from a board (or a directory), export CSV/JSON",
                       description="Read the board's event journal without stopping the agent, incrementally, "
                                   "and list it or export it as CSV or JSON.",
                       epilog=EVENTS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--port", "-p", help="serial port of the running board (default: the one attached board)")
    src.add_argument("--dir", metavar="DIR", help="read journal.<i> files from this directory instead")
    p.add_argument("--since", type=int, metavar="N", help="records with sequence number above N "
                   "(default: above the last pull from this device; 0 for --dir)")
    p.add_argument("--all", action="store_true", help="every record the board still has (same as --since 0)")
    p.add_argument("-o", "--output", metavar="FILE", help="write FILE (.csv or .json) instead of printing")
    p.add_argument("--samples", action="store_true", help="expand capture records into one row per sample")
    p.add_argument("--state", metavar="FILE", help="incremental state file (default: see below)")
    p.add_argument("--no-state", action="store_true", help="neither read nor update the state file")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the whole answer (default 60)")
    p.set_defaults(func=run_events)

    r = sub.add_parser("report", parents=[common], help="event report for a utility: figure (.png) or page (.html)",
                       description="Draw frequency, site kW and relay blocks from pulled events, annotate "
                                   "each trip (response time, kW shed) and the restore sequence.",
                       epilog=REPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("events", metavar="EVENTS", help="events .json/.csv from `gridshed events`, or a board directory")
    r.add_argument("-o", "--output", metavar="FILE", required=True, help="report.png or report.html")
    r.add_argument("--site", metavar="SITE_TOML", help="site file for thresholds and block names when the "
                   "events carry no config (a CSV export, or a board that could not send it)")
    r.add_argument("--trip", type=int, metavar="SEQ", help="report the boot holding this record "
                   "(default: the latest one with a trip)")
    r.set_defaults(func=run_report)


def run_events(args: argparse.Namespace) -> int:
    from .. import events as evmod

    since = 0 if args.all else args.since
    if since is not None and since < 0:
        raise UserError("--since must be 0 or more")
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise UserError(f"{args.output}: output must end in .csv or .json")  # before touching the board
    state = Path(args.state) if args.state else None
    if args.dir:
        ev = evmod.load_dir(args.dir, since=since or 0)
        src = args.dir
    else:
        from ..ports import choose_port

        port = choose_port(args.port)
        if since is None and args.no_state:
            since = 0
        ev = evmod.pull(port, since=since, state_path=state, timeout=args.timeout, warn=_warn)
        src = port
    for e in ev.errors[:5]:
        if e.get("reason") == "torn":
            _warn(f"{e.get('file')}: torn tail of {e.get('bytes')} bytes at offset {e.get('offset')} skipped "
                  "(an interrupted write; the records before it are intact)")
        elif "file" in e:
            _warn(f"{e['file']}: {e.get('bytes')} bad bytes at offset {e.get('offset')} skipped ({e.get('reason')})")
        else:
            _warn(f"{src}: {e.get('detail')}")
    if len(ev.errors) > 5:
        _warn(f"... {len(ev.errors) - 5} more bad regions")

    if args.output:
        fmt = evmod.write_file(ev, args.output, samples=args.samples)
    elif args.json:
        emit(args, evmod.to_document(ev, samples=args.samples))
        fmt = "stdout"
    else:
        print(evmod.listing(ev) if ev.records else f"no records after seq {ev.since}")
        fmt = "listing"
    if not args.dir and not args.no_state:
        evmod.save_state(state, ev)

    first = ev.records[0]["n"] if ev.records else None
    info: dict[str, Any] = {"source": ev.source, "site": ev.site, "device": ev.device, "since": ev.since,
                            "count": len(ev.records), "first_seq": first, "last_seq": ev.last_seq,
                            "board_seq": ev.board_seq, "complete": ev.complete, "bad_regions": len(ev.errors),
                            "output": args.output, "format": fmt}
    if args.output:
        rng = f" (seq {first}..{ev.last_seq})" if ev.records else ""
        emit(args, info, f"{len(ev.records)} records after seq {ev.since}{rng} from {ev.site or '?'}/"
                         f"{ev.device or '?'} -> {args.output}")
    if not ev.complete:
        stop = next((e for e in ev.errors if e.get("reason") == "board"), None)
        if stop is not None:
            _warn(f"the board could not send the record after seq {stop['after']} ({stop['detail']}), 3 times in "
                  f"a row; the {len(ev.records)} records before it are saved. Pull again later (the agent frees "
                  f"what it holds), or pass --since {stop['after'] + 1} to skip that record")
        else:
            _warn(f"the pull is incomplete after {len(ev.records)} records; run the same command again "
                  "to continue from there")
        return 1
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..report import CAUSE_TEXT, report

    if Path(args.output).suffix.lower() not in (".png", ".html", ".htm"):
        raise UserError(f"{args.output}: report must end in .png or .html")
    from ..events import read_file, slim_config

    ev = read_file(args.events)
    if args.site:
        from .. import siteconfig

        site_cfg = slim_config(siteconfig.load_site(args.site))
        ev.config = {**site_cfg, **{k: v for k, v in ev.config.items() if v is not None}}
        ev.site = ev.site or site_cfg.get("site")
        ev.device = ev.device or site_cfg.get("device")
    e = report(ev, args.output, trip_seq=args.trip)
    for why in e.incomplete:
        _warn(f"incomplete records: {why}")
    if args.json:
        emit(args, {"output": args.output, "site": e.site, "device": e.device,
                    "trips": [{"cause": t.cause, "relay_open_s": t.t_open, "trigger_s": t.t_trigger,
                               "response_ms": t.response_ms, "kw_before": t.kw_before, "kw_after": t.kw_after,
                               "kw_shed": t.kw_shed, "when": t.when or None} for t in e.trips],
                    "restores": [{"block": r.block, "t_s": r.t, "when": r.when or None} for r in e.restores],
                    "notes": e.notes, "incomplete": e.incomplete})
        return 0
    print(f"report written: {args.output}")
    for k, t in enumerate(e.trips):
        line = f"  trip #{k + 1} ({CAUSE_TEXT.get(t.cause, t.cause)})"
        if t.response_ms is not None:
            line += f": response {t.response_ms:.0f} ms ({t.trigger_label} -> relay open)"
        if t.kw_shed is not None:
            line += f", {t.kw_shed:,.1f} kW shed"
        print(line)
    for n in e.notes:
        print(f"  note: {n}")
    return 0
