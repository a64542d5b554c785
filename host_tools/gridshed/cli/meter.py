"""`gridshed meters` (the meter library) and `gridshed meter probe` (identify an unknown meter)."""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError
from .output import emit, note

METERS_EXAMPLES = """examples:
  gridshed meters
  gridshed meters --json | jq '.[] | select(.resolution_hz <= 0.01) | .model'

confidence: reference (checked against a maintained driver), manual (from the maker's
register table), community (from user reports). Hz resolution matters: a meter that reports
frequency in 0.1 Hz steps cannot see a 59.85 Hz pickup (see docs/meters.md)."""

PROBE_EXAMPLES = """examples:
  gridshed meter probe --port /dev/ttyUSB0
  gridshed meter probe --port /dev/ttyUSB0 --baud 9600,19200,38400 --unit 1..5
  gridshed meter probe --port /dev/ttyUSB0 --baud 9600 --parity E --unit 1,2,10
  gridshed meter probe --tcp 192.168.1.50:502 --unit 1..3 --json
  gridshed meter probe --port /dev/ttyUSB0 --model eastron_sdm630 --model eastron_sdm72

Reads every library map's model register (when it has one) and its Hz, kW, V, A registers,
scores what decodes plausibly (45-65 Hz, grid voltages, kW = sum of phases) and suggests the
map to put in site.toml ([meter] model = ...). Only reads (function 3/4), never writes.
Exit status: 0 a meter was identified, 1 nothing plausible answered."""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("meters", parents=[common], help="list the meter library (models, confidence, Hz resolution)",
                       description="List the meter register maps in meters/ (what site.toml's meter.model can name).",
                       epilog=METERS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run_meters)

    m = sub.add_parser("meter", parents=[common], help="meter tools (probe)",
                       description="Meter tools run on the host through a USB RS-485 adapter or Modbus TCP.",
                       epilog="examples:\n  gridshed meter probe --port /dev/ttyUSB0 --unit 1..5",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = m.add_subparsers(dest="meter_command", metavar="COMMAND")
    q = msub.add_parser("probe", parents=[common], help="identify the meter on a bus and suggest its map",
                        description="Identify an unknown meter: try every map of the library, score the "
                                    "decoded values, suggest the model.",
                        epilog=PROBE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="serial device of the RS-485 adapter (e.g. /dev/ttyUSB0)")
    where.add_argument("--tcp", metavar="HOST:PORT", help="Modbus TCP meter or gateway instead of a serial port")
    q.add_argument("--baud", default="9600,19200", help="baud rates to try, comma-separated (default 9600,19200)")
    q.add_argument("--parity", choices=["N", "E", "O"], default="N", help="serial parity (default N)")
    q.add_argument("--unit", default="1", help="unit ids to try: 1 | 1,2,3 | 1..5 (default 1)")
    q.add_argument("--timeout", type=float, default=0.5, help="seconds to wait for each answer (default 0.5)")
    q.add_argument("--model", action="append", help="only try this map (repeatable; default: the whole library)")
    q.set_defaults(func=run_probe)
    m.set_defaults(func=lambda args: _meter_help(m))


def _meter_help(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def run_meters(args: argparse.Namespace) -> int:
    from ..probe import library

    rows = library()
    lines = [f"{'model':<22} {'confidence':<10} {'Hz step':>8} {'fn':>3} {'id':>3}  title"]
    for r in rows:
        res = r["resolution_hz"]
        lines.append(f"{r['model']:<22} {r['confidence']:<10} {res if res is not None else '?':>8} "
                     f"{r['function']:>3} {'yes' if r['identify'] else '':>3}  {r['title']}")
    emit(args, rows, lines)
    return 0


def _fmt_values(v: dict[str, float]) -> str:
    parts = []
    if "hz" in v:
        parts.append(f"{v['hz']:.3f} Hz")
    if "kw" in v:
        parts.append(f"{v['kw']:.1f} kW")
    if "v1" in v:
        parts.append(f"{v['v1']:.1f} V")
    return ", ".join(parts)


def run_probe(args: argparse.Namespace) -> int:
    from ..probe import parse_bauds, parse_units, probe

    if args.timeout <= 0 or args.timeout > 30:
        raise UserError("--timeout: seconds between 0 and 30")
    units = parse_units(args.unit)
    bauds = parse_bauds(args.baud)
    say = None if args.json else note
    res = probe(port=args.port, tcp=args.tcp, bauds=bauds, units=units, parity=args.parity,
                timeout=args.timeout, models=args.model, on_progress=say)
    if args.json:
        emit(args, res)
        return 0 if any(f["suggested"] for f in res["found"]) else 1
    if not res["found"]:
        print(f"no meter answered on {res['address']} (units {args.unit}"
              + (f", baud {args.baud}" if res["transport"] == "rtu" else "")
              + "): check wiring (A/B swapped?), termination, unit id, baud and parity")
        return 1
    ok = False
    for f in res["found"]:
        where = f"unit {f['unit']}" + (f" at {f['baud']} baud {f['parity']}" if f["transport"] == "rtu" else "")
        if not f["suggested"]:
            print(f"{where}: a device answers, but no map of the library decodes plausible values")
            sw = [c for c in f["candidates"] if c.get("word_order") == "swapped"]
            if sw:
                print(f"  word order: {sw[0]['model']} reads a frequency with its 32-bit words swapped: "
                      f"{sw[0]['reasons'][-1]}")
        else:
            ok = True
            best = f["candidates"][0]
            print(f"{where}: {f['suggested']} ({best['title']}) score {best['score']}: {_fmt_values(best['values'])}")
            if best.get("word_order"):
                print(f"  word order: {best['word_order']} (32-bit values decode as the map says)")
            if f["indistinguishable"]:
                print(f"  same registers as: {', '.join(f['indistinguishable'])} "
                      f"(cannot be told apart by registers; check the nameplate)")
            print(f"  site.toml: [meter] model = \"{f['suggested']}\"" +
                  (f", unit = {f['unit']}, baud = {f['baud']}" if f["transport"] == "rtu" else ""))
        for c in f["candidates"][:5]:
            mark = "*" if c["model"] == f["suggested"] else " "
            why = "; ".join(c["reasons"][:2])
            print(f"  {mark} {c['model']:<22} {c['score']:>5}  {'plausible' if c['plausible'] else 'no':<9} {why}")
    return 0 if ok else 1
