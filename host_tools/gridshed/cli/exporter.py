"""`gridshed exporter`: Prometheus / OpenMetrics metrics of a fleet, fed by its MQTT channel.

Subscribes to the boards' state and telemetry topics (docs/mqtt.md) and serves per-device
frequency, load, control state, trips, command counters and available MW on an HTTP /metrics
endpoint (prometheus-client). Optionally announces every board to Home Assistant by MQTT
discovery. Runs until Ctrl-C. docs/metrics.md lists every metric.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

from ..errors import UserError
from .output import emit_event

DEFAULT_LISTEN = "127.0.0.1:9855"

EXAMPLES = """examples:
  gridshed exporter                                      (broker 127.0.0.1:1883, metrics on 127.0.0.1:9855)
  gridshed exporter --broker 10.0.0.5:1883 --listen 0.0.0.0:9855
  gridshed exporter --site site1 --inventory fleet.sqlite   (only site1; its TLS/login from the inventory,
                                                          states accepted only with a MAC of the device's key)
  gridshed exporter --site-config site1-ctl1.toml        (available MW from the closed blocks' nameplate kW)
  gridshed exporter --ha-discovery                       (Home Assistant MQTT discovery, retained configs)
  gridshed exporter --json                               (one JSON object per line: listening, connected, ...)
  gridshed exporter --dashboard > gridshed.json           (the Grafana dashboard, to import)

then:
  curl -s http://127.0.0.1:9855/metrics
  Prometheus: scrape_configs: [{job_name: gridshed, static_configs: [{targets: ["127.0.0.1:9855"]}]}]
  Grafana: import `gridshed exporter --dashboard` (docs/grafana/gridshed.json; datasource: your Prometheus)

available MW (gridshed_available_megawatts) is what a trip would shed now: the board's own figure
when its messages carry one (available_kw); else the nameplate kW (miners x kw_per_miner) of the
closed blocks from --site-config; else the metered kW while any block is closed (an upper bound).
0 while the board is offline, disarmed or shed. Messages that are not what a board sends are
dropped and counted (gridshed_exporter_bad_messages_total{reason}). docs/metrics.md.
Ctrl-C (or SIGTERM) stops the exporter and exits 0."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("exporter", parents=[common],
                       help="serve fleet metrics (Prometheus/OpenMetrics) from the MQTT channel until Ctrl-C",
                       description="Subscribe to the boards' MQTT state and telemetry and serve per-device "
                                   "frequency, load, state, trips, counters and available MW on /metrics "
                                   "(prometheus-client); optional Home Assistant MQTT discovery.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", help="MQTT broker HOST[:PORT] (default $GRIDSHED_BROKER or 127.0.0.1:1883)")
    p.add_argument("--listen", default=DEFAULT_LISTEN,
                   help=f"HTTP address [HOST:]PORT for /metrics (default {DEFAULT_LISTEN}; port 0: any free port)")
    p.add_argument("--site", action="append", default=[],
                   help="only this site's boards (repeatable; default: every site on the broker)")
    p.add_argument("--inventory", help="inventory: accept a board's state only with a MAC of its key; with one "
                                       "--site, the site's broker TLS and login (default: none, plain)")
    p.add_argument("--site-config", action="append", default=[], metavar="TOML",
                   help="a board's site.toml: its blocks' nameplate kW for the available figure (repeatable)")
    p.add_argument("--ha-discovery", action="store_true",
                   help="publish retained Home Assistant MQTT discovery configs for every board seen")
    p.add_argument("--ha-prefix", default="homeassistant", help="Home Assistant discovery prefix (default "
                                                                "homeassistant)")
    p.add_argument("--dashboard", action="store_true",
                   help="print the Grafana dashboard built on these metrics (JSON, to import in Grafana) and exit")
    p.set_defaults(func=run)


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        raise UserError(f"bad --listen {text!r}: use [HOST:]PORT") from None
    if not 0 <= p < 65536:
        raise UserError(f"bad port in --listen {text!r}")
    if host.startswith("[") and host.endswith("]"):  # [::]:9855
        host = host[1:-1]
    return host or "127.0.0.1", p


def _keys(inventory: str | None, sites: list[str]) -> dict[str, bytes]:
    from ..inventory import Inventory

    out = {}
    with Inventory(inventory) as inv:
        rows = [r for s in sites for r in inv.list(site=s)] if sites else inv.list()
        for r in rows:
            out[r["device_id"]] = inv.key_for(r["device_id"])[1]
    return out


def dashboard() -> str:
    """The Grafana dashboard JSON (docs/grafana/gridshed.json; shipped inside the wheel)."""
    from ..datafiles import repo_root

    path = repo_root() / "docs" / "grafana" / "gridshed.json"
    try:
        return path.read_text()
    except OSError as e:
        raise UserError(f"cannot read the Grafana dashboard {path}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    from ..exporter import Exporter, Fleet, blocks_from_site

    if args.dashboard:
        print(dashboard(), end="")
        return 0
    from ..fleet_client import BrokerOpts, broker_opts, parse_hostport

    broker = parse_hostport(args.broker or os.environ.get("GRIDSHED_BROKER") or "127.0.0.1:1883", 1883)
    listen = _listen(args.listen)
    for s in args.site:
        if not s or any(ch in s for ch in "/+#\x00"):
            raise UserError(f"bad --site {s!r}: a site name has no '/', '+', '#' or NUL")
    blocks = {}
    for path in args.site_config:
        dev, kws = blocks_from_site(path)
        blocks[dev] = kws
    keys: dict[str, bytes] = {}
    opts: Any = BrokerOpts()
    if args.inventory:
        keys = _keys(args.inventory, args.site)
        if len(args.site) == 1:
            opts = broker_opts(args.inventory, args.site[0])

    def event(name: str, data: dict[str, Any]) -> None:
        text = {
            "listening": lambda: f"listening: {data['url']}",
            "connected": lambda: f"connected: broker {data['broker']}, subscribed to {' '.join(data['topics'])}",
            "disconnected": lambda: f"disconnected from broker {data['broker']} ({data['reason']}); reconnecting",
            "refused": lambda: f"broker {data['broker']} refused the connection ({data['reason']}); retrying",
            "unreachable": lambda: f"broker {data['broker']} not reachable (no connection, or TLS refused); retrying",
        }.get(name, lambda: f"{name}: {data}")()
        emit_event(args, {"event": name, **data}, text)

    fleet = Fleet(sites=args.site or None, blocks=blocks, keys=keys)
    exp = Exporter(broker, listen, fleet, ha_prefix=args.ha_prefix if args.ha_discovery else None,
                   client_id=f"gridshed-exporter-{os.getpid()}", opts=opts, on_event=event)
    stop = threading.Event()
    # Ctrl-C and SIGTERM stop it; SIGINT handled here too, since a shell starts a background job
    # with SIGINT ignored
    prev = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        exp.start()
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
        exp.stop()
    with fleet.lock:
        bad = sum(fleet.bad.values())
        seen = len(fleet.devices)
    emit_event(args, {"event": "stopped", "devices": seen, "bad_messages": bad},
               f"stopped: {seen} device(s) seen, {bad} bad message(s) dropped")
    return 0
