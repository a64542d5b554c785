"""CLI: openadr-ven, an OpenADR 2.0b VEN that turns VTN events into signed site commands."""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserError
from .output import to_json

EPILOG = """examples:
  gridshed openadr-ven --vtn https://vtn.example/OpenADR2/Simple/2.0b --ven-name site1-ven \\
      --cert ven.crt --key ven.key --ca-file vtn-ca.crt --vtn-fingerprint AA:BB:...:11 \\
      --site site1 --broker 10.0.0.5:1883 --site-kw 1200 --log openadr.jsonl
  gridshed openadr-ven --vtn http://127.0.0.1:8080/OpenADR2/Simple/2.0b --ven-name lab --insecure \\
      --via udp --addr ctl1=192.168.1.40 --level 1=full --json
  gridshed openadr-ven ... --via serial                      (each device's port from the inventory)

SIMPLE levels (default 0=none 1=50% 2=full 3=full; a percentage is of --site-kw):
  --level 1=40%   --level 1=250kw   --level 2=full   --level 0=none
LOAD_DISPATCH: delta sheds |value| kW; setpoint sheds (--site-kw - value) kW.
ELECTRICITY_PRICE (price): the intervals become one signed price schedule to the site's boards
  (mqtt or serial; each block sheds while the price is above its strike, docs/market.md);
  currencyPerKWh x 1000 = $/MWh; a price without a measurement is in --price-unit (default kwh).
Runs until Ctrl-C (or --run-for). Stopping the bridge never sends restore by itself.
Secure by default: https and OpenADR XML signatures (--cert, --key, --vtn-fingerprint); plain
http without signatures only with --insecure. Every command carries the issuer label "openadr":
the bridge's restores release only the sheds the bridge issued.
See docs/openadr.md."""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    help_ = "OpenADR 2.0b VEN: VTN events -> signed shed/restore commands to a site"
    p = sub.add_parser("openadr-ven", parents=[common], help=help_, description=help_, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vtn", required=True, metavar="URL",
                   help="VTN base URL, e.g. http://host:8080/OpenADR2/Simple/2.0b")
    p.add_argument("--ven-name", required=True, help="this VEN's name as the VTN knows it")
    p.add_argument("--ven-id", help="VEN id, if the VTN assigned one out of band")
    p.add_argument("--site", help="site id the commands target (default: the only site in the inventory)")
    p.add_argument("--inventory", help="inventory database (default: user data dir, or $GRIDSHED_INVENTORY)")
    p.add_argument("--seq-file", help="seq counter file (default: seq.json beside the inventory)")
    p.add_argument("--via", choices=("mqtt", "udp", "serial"), default="mqtt", help="transport (default mqtt)")
    p.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker HOST[:PORT] (default 127.0.0.1:1883)")
    p.add_argument("--addr", action="append", default=[], metavar="[DEVICE=]ADDR",
                   help="UDP HOST[:PORT] or serial port of a device (repeat; bare ADDR for a one-device site)")
    p.add_argument("--level", action="append", default=[], metavar="N=SPEC",
                   help="SIMPLE level mapping: N=full, N=none, N=P%%, N=KWkw (repeat)")
    p.add_argument("--site-kw", type=float, help="site's sheddable load in kW (for %% levels and setpoints)")
    p.add_argument("--price-unit", choices=("kwh", "mwh"), default="kwh",
                   help="unit of an ELECTRICITY_PRICE signal without a measurement: $/kWh (default) or $/MWh")
    p.add_argument("--expires", default="60s", help="lifetime of each command, e.g. 30s (default 60s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for board answers (default 10)")
    p.add_argument("--log", metavar="FILE", help="append every log record to FILE (JSON lines)")
    p.add_argument("--cert", help="VEN certificate (PEM): TLS client cert and XML signing")
    p.add_argument("--key", help="VEN private key (PEM)")
    p.add_argument("--ca-file", help="CA bundle to check the VTN's TLS certificate")
    p.add_argument("--vtn-fingerprint", help="VTN certificate fingerprint: check signatures on its messages")
    p.add_argument("--run-for", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a plain http VTN and run without OpenADR XML signatures (lab use only); "
                        "without it the VTN must be https and --cert, --key, --vtn-fingerprint are required")
    p.set_defaults(func=cmd_openadr_ven)


def _addrs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items:
        dev, sep, addr = it.partition("=")
        if not sep:
            dev, addr = "", it
        if not addr.strip():
            raise UserError(f"bad --addr {it!r}: use DEVICE=ADDR or ADDR")
        out[dev.strip()] = addr.strip()
    return out


def _default_site(inventory: str | None) -> str:
    from ..inventory import Inventory

    with Inventory(inventory) as inv:
        sites = sorted({d["site"] for d in inv.list() if d.get("site")})
        path = inv.path
    if len(sites) != 1:
        raise UserError(f"give --site: the inventory {path} has "
                        + (f"sites {', '.join(sites)}" if sites else "no site"))
    return sites[0]


class _Sink:
    """Log records to stdout (text or JSON lines) and optionally a JSON-lines file."""

    def __init__(self, as_json: bool, path: str | None, out: TextIO = sys.stdout) -> None:
        self.as_json = as_json
        self.out = out
        self.file: TextIO | None = None
        if path:
            try:
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
                self.file = open(Path(path).expanduser(), "a", encoding="utf-8")
            except OSError as exc:
                raise UserError(f"--log {path}: {exc}") from None

    def __call__(self, rec: dict[str, Any]) -> None:
        line = to_json(rec, lines=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        if self.as_json:
            print(line, file=self.out, flush=True)
        else:
            rest = {k: v for k, v in rec.items() if k not in ("t", "kind")}
            print(f"{rec['t']} {rec['kind']:<15} {to_json(rest, lines=True)}", file=self.out, flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()


def cmd_openadr_ven(args: argparse.Namespace) -> int:
    from ..fleet_client import parse_duration
    from ..openadr import LevelMap, SiteSender, VenBridge

    if not args.vtn.startswith(("http://", "https://")):
        raise UserError(f"--vtn {args.vtn!r}: give the VTN's http(s) URL")
    if not args.insecure and not args.vtn.startswith("https://"):
        raise UserError(f"--vtn {args.vtn!r}: https is required (plain http only with --insecure)")
    if bool(args.cert) != bool(args.key):
        raise UserError("--cert and --key go together")
    if not args.insecure and not (args.cert and args.vtn_fingerprint):
        raise UserError("signed OpenADR messages need --cert, --key and --vtn-fingerprint (or --insecure)")
    for f in (args.cert, args.key, args.ca_file):
        if f and not Path(f).is_file():
            raise UserError(f"{f}: no such file")
    if args.run_for is not None and args.run_for <= 0:
        raise UserError("--run-for must be > 0 seconds")
    levels = LevelMap.parse(args.level, args.site_kw)
    expires = int(parse_duration(args.expires))
    site = args.site or _default_site(args.inventory)
    sender = SiteSender(args.inventory, via=args.via, broker=args.broker, addrs=_addrs(args.addr),
                        seq_path=args.seq_file, ack_timeout=args.timeout)
    devices = sender.check(site)
    client_kwargs: dict[str, Any] = {}
    if args.cert:
        client_kwargs.update(cert=args.cert, key=args.key, ca_file=args.ca_file)
    if args.vtn_fingerprint:
        client_kwargs["vtn_fingerprint"] = args.vtn_fingerprint
    sink = _Sink(args.json, args.log)
    bridge = VenBridge(args.vtn, args.ven_name, site, sender, levels=levels, site_kw=args.site_kw,
                       expires_s=expires, ven_id=args.ven_id, on_log=sink, client_kwargs=client_kwargs,
                       insecure=args.insecure, send_schedule=sender.schedule if args.via != "udp" else None,
                       price_unit=args.price_unit)
    sender.warn = lambda msg: bridge.log("warning", detail=msg)  # into the log, not the terminal by itself
    bridge.log("site", site=site, devices=devices, via=args.via,
               broker=args.broker if args.via == "mqtt" else None)

    async def run() -> None:
        try:
            await bridge.start()
            if args.run_for is not None:
                await asyncio.sleep(args.run_for)
            else:
                await asyncio.Event().wait()
        finally:
            await bridge.stop()

    try:
        asyncio.run(run())
    finally:
        sink.close()
    return 0
