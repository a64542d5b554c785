"""CLI: `gridshed inventory` (list, show, export, import the provisioned devices)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .board import _parser
from .output import emit


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _parser(sub, common, "inventory", "provisioned devices: list, show, export",
                "  gridshed inventory list\n  gridshed inventory show site1-ctl1 --json\n"
                "  gridshed inventory export --format csv > fleet.csv\n"
                "  gridshed inventory export --show-keys > backup.json   (keys! keep it safe)\n"
                "  gridshed inventory import backup.json\n")
    p.add_argument("--inventory", help="inventory database (default: user data dir, or $GRIDSHED_INVENTORY)")
    isub = p.add_subparsers(dest="inv_cmd", metavar="ACTION")
    q = isub.add_parser("list", parents=[common], help="all devices")
    q.add_argument("--site", help="only this site")
    q = isub.add_parser("show", parents=[common], help="one device and its history")
    q.add_argument("device_id")
    q.add_argument("--show-key", action="store_true", help="print the command key (secret)")
    q = isub.add_parser("export", parents=[common], help="export as JSON (default) or CSV")
    q.add_argument("--format", choices=("json", "csv"), default="json")
    q.add_argument("--show-keys", action="store_true", help="include the command keys (secret)")
    q.add_argument("--site")
    q.add_argument("-o", "--out", help="write to a file instead of stdout")
    q = isub.add_parser("import", parents=[common], help="merge an export made with --show-keys")
    q.add_argument("file")
    p.set_defaults(func=cmd_inventory)


def cmd_inventory(args: argparse.Namespace) -> int:
    from ..inventory import Inventory

    action = args.inv_cmd or "list"
    with Inventory(args.inventory) as inv:
        if action == "list":
            rows = inv.list(site=getattr(args, "site", None))
            emit(args, rows, lambda: _table(inv.path, rows))
        elif action == "show":
            d = inv.require(args.device_id, show_key=args.show_key)
            d["history"] = inv.history(args.device_id)
            emit(args, d, [f"{k:15} {v}" for k, v in d.items() if k != "history"]
                 + [f"  {h['at']}  {h['action']:12} key {h['key_id'] or '-'}  config {h['config_hash'] or '-'}"
                    for h in d["history"]])
        elif action == "export":
            text = inv.export(args.format, show_key=args.show_keys, site=args.site)
            if args.out:
                Path(args.out).write_text(text)
                if args.show_keys:
                    Path(args.out).chmod(0o600)
            else:  # the export is the answer: JSON (--format json, the default) or CSV
                sys.stdout.write(text)
        elif action == "import":
            n = inv.import_json(Path(args.file).read_text())
            emit(args, {"imported": n, "inventory": str(inv.path)}, f"imported {n} devices into {inv.path}")
    return 0


def _table(path: Any, rows: list[dict[str, Any]]) -> list:
    from rich.table import Table

    t = Table(title=f"inventory {path}")
    for c in ("device", "board", "site", "key id", "firmware", "config", "provisioned", "last seen"):
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(r["device_id"], r["board"], r["site"] or "", r["key_id"], r["firmware_build"] or "",
                  r["config_hash"] or "", r["provisioned_at"], r["last_seen"] or "")
    return [t] + ([] if rows else ["(no devices yet: gridshed provision ...)"])
