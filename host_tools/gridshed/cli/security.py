"""CLI: the secure fleet channel: `gridshed broker-config` (Mosquitto password file, ACL, TLS
certificates for a site) and `gridshed rotate-key` (a board's command key or broker login)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UserError
from .board import _parser
from .output import emit


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _parser(sub, common, "broker-config",
                "write a site's Mosquitto password file, ACL and TLS certificates (from the inventory)",
                "  gridshed broker-config site1 --site-config site.toml -o /etc/mosquitto/gridshed\n"
                "  gridshed broker-config site1 -o broker/ --server-name broker.site1.lan --port 8883 --json\n"
                "then in mosquitto.conf: include_dir /etc/mosquitto/gridshed  (or use its mosquitto.conf)\n")
    p.add_argument("site", help="site id (as in site.toml and the inventory)")
    p.add_argument("--site-config", help="site.toml whose [mqtt] section (tls, auth, ca, server_name, username) "
                                         "the site's broker follows; recorded in the inventory")
    p.add_argument("-o", "--out", required=True, help="folder for passwd, acl, ca.crt, server.crt/key, mosquitto.conf")
    p.add_argument("--server-name", action="append", default=[],
                   help="name or address in the broker's certificate (repeat; default: [mqtt] server_name)")
    p.add_argument("--port", type=int, default=None, help="listener port (default 8883 with TLS, else 1883)")
    p.add_argument("--bind", default="", help="listener address (default: all)")
    p.add_argument("--inventory", help="inventory database (default: user data dir, or $GRIDSHED_INVENTORY)")
    p.set_defaults(func=cmd_broker_config)

    p = _parser(sub, common, "rotate-key",
                "replace a board's command key (or --broker: its broker login); never leaves it without one",
                "  gridshed rotate-key site1-ctl1 --port /dev/ttyUSB0\n"
                "  gridshed rotate-key site1-ctl1 --port /dev/ttyUSB0 --broker   (then broker-config + reload)\n"
                "  gridshed rotate-key site1-ctl1 --json\n")
    p.add_argument("device", help="device id (in the inventory)")
    p.add_argument("--port", help="the board's serial port (default: the one attached board)")
    p.add_argument("--broker", action="store_true", help="rotate the broker password / client certificate instead")
    p.add_argument("--inventory", help="inventory database (default: user data dir, or $GRIDSHED_INVENTORY)")
    p.add_argument("--seq-file", help="host seq counters (default: seq.json beside the inventory)")
    p.set_defaults(func=cmd_rotate_key)


def cmd_broker_config(args: argparse.Namespace) -> int:
    from .. import brokerauth as ba
    from ..inventory import Inventory

    with Inventory(args.inventory) as inv:
        if args.site_config:
            from .. import siteconfig

            site = siteconfig.read_toml(args.site_config)
            if site.get("site") and site.get("site") != args.site:
                raise UserError(f"{args.site_config}: site = {site.get('site')!r}, not {args.site!r}")
            mq = site.get("mqtt")
            if not isinstance(mq, dict):
                raise UserError(f"{args.site_config}: no [mqtt] section")
            ba.record_site(inv, args.site, mq, Path(args.site_config).resolve().parent)
        row = inv.site(args.site) or {}
        port = args.port or (8883 if row.get("tls") else 1883)
        if not 0 < port < 65536:
            raise UserError(f"--port {port}: out of range")
        res = ba.broker_config(inv, args.site, Path(args.out), port=port, bind=args.bind,
                               server_names=args.server_name)
    lines = [f"{k:7} {v}" for k, v in res["files"].items()]
    lines.append(f"{len(res['devices'])} device(s) of site {args.site}; start with: mosquitto -c {res['files']['conf']}")
    lines += [f"warning: {w}" for w in res["warnings"]]
    emit(args, res, lines)
    return 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from .. import fleet_client as fc
    from ..rotate import rotate_key
    from .board import _port, _say
    from .output import note, warn

    port = _port(args)
    res = rotate_key(port, args.device, args.inventory, broker=args.broker,
                     seq_path=fc.seq_file(args.inventory, args.seq_file),
                     progress=None if args.json else (lambda m: note(m + "...")), say=_say)
    if args.json:
        emit(args, res)
        return 0
    if args.broker:
        print(f"{args.device}: new broker credentials on the board and in the inventory; {res['restart']}")
        note(res["note"])
    else:
        print(f"{args.device}: command key {res.get('old_key_id')} -> {res['key_id']}"
              + (" (an interrupted rotation, finished)" if res.get("finished_interrupted") else "")
              + f"; {res.get('restart', '')}")
    for w in res.get("warnings", []):
        warn(w)
    return 0
