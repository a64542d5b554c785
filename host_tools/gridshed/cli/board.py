"""CLI: boards, ports, build, deploy, provision, status, monitor, flash, image (one board at a time)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .output import console, emit, emit_event, note, to_json, warn


def _parser(sub: Any, common: argparse.ArgumentParser, name: str, help: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], help=help, description=help, epilog="examples:\n" + epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _port(args: argparse.Namespace) -> str:
    from ..ports import choose_port

    return choose_port(getattr(args, "port", None))


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _parser(sub, common, "boards", "list supported boards (boards/*.json)",
                "  gridshed boards\n  gridshed boards --json\n")
    p.set_defaults(func=cmd_boards)

    p = _parser(sub, common, "ports", "list attached serial ports that look like boards",
                "  gridshed ports\n  gridshed ports --all --json\n")
    p.add_argument("--all", action="store_true", help="every serial port, not only known USB-serial chips")
    p.set_defaults(func=cmd_ports)

    p = _parser(sub, common, "build", "compile firmware/ to .mpy for a board's architecture",
                "  gridshed build --board esp32-devkitc-max3485                (every optional feature)\n"
                "  gridshed build --site site.toml --romfs    (the core + the features the site turns on)\n"
                "  gridshed build --board rpi-pico --features dnp3,market -o /tmp/pico-build --json\n"
                "  gridshed build --board esp32-devkitc-max3485 --romfs   (also a ROMFS image, docs/romfs.md)\n")
    p.add_argument("--board", "-b", help="board name (see `gridshed boards`; default: board = ... of --site)")
    _feature_args(p)
    p.add_argument("--src", help="firmware source folder (default: the repository's firmware/)")
    p.add_argument("-o", "--out", help="build folder (default: build/BOARD)")
    p.add_argument("--romfs", action="store_true",
                   help="also pack the agent's .mpy into a ROMFS image (romfs.img) for `deploy --romfs`")
    p.set_defaults(func=cmd_build)

    p = _parser(sub, common, "deploy", "copy a build onto a board (changed files only, verified)",
                "  gridshed deploy --board rpi-pico              (port auto-detected)\n"
                "  gridshed deploy --port /dev/ttyUSB0 --board esp32-devkitc-max3485 --inventory fleet.sqlite\n"
                "      (a provisioned board whose key this inventory holds gets the signed time after the\n"
                "       restart, as after provision: signed commands work at once)\n"
                "  gridshed deploy --port /dev/ttyUSB0 --board esp32-devkitc-max3485\n"
                "  gridshed deploy --port /dev/pts/5 --build build/unix-sim --force\n"
                "  gridshed deploy --board rpi-pico --romfs       (agent in the ROMFS partition, docs/romfs.md)\n"
                "  gridshed deploy --site site.toml --romfs       (built for the site: its features only)\n")
    p.add_argument("--port", "-p", help="serial port (default: the one attached board)")
    p.add_argument("--board", "-b", help="board name (the build is made first when --build is not given)")
    p.add_argument("--build", dest="build_dir", help="an existing build folder (default: build it now)")
    _feature_args(p, " when it builds now")
    p.add_argument("--force", action="store_true", help="write every file, even unchanged ones")
    p.add_argument("--no-restart", action="store_true", help="leave the agent stopped at the REPL")
    p.add_argument("--inventory", help="inventory with the board's key: after the restart the board gets the "
                                       "signed time from it (default: user data dir, or $GRIDSHED_INVENTORY)")
    p.add_argument("--romfs", action="store_true",
                   help="write the agent into the board's ROMFS partition (bytecode runs from flash, not "
                        "the heap); main.py stays on the filesystem, the filesystem's agent is removed")
    p.add_argument("--maintenance-boot", action="store_true",
                   help="write in a maintenance boot (the board resets without starting the agent: the whole "
                        "heap free, protection off for the write only, on a 30 s lease; docs/failsafes.md); "
                        "deploy does this by itself when the stopped agent's heap is too full")
    p.set_defaults(func=cmd_deploy)

    p = _parser(sub, common, "provision", "write site config and a new command key; record in the inventory",
                "  gridshed provision --port /dev/ttyUSB0 --site site.toml --device-id site1-ctl1\n"
                "  gridshed provision --site site.toml --device-id site1-ctl2 --inventory fleet.sqlite\n")
    p.add_argument("--port", "-p", help="serial port (default: the one attached board)")
    p.add_argument("--site", required=True, help="site.toml")
    p.add_argument("--device-id", help="device id (default: device = ... in the site file)")
    p.add_argument("--board", "-b", help="board name (default: from the board's build, or the site file)")
    p.add_argument("--inventory", help="inventory database (default: user data dir, or $GRIDSHED_INVENTORY)")
    p.add_argument("--keep-key", action="store_true", help="re-use the device's key from the inventory")
    p.add_argument("--check", action="store_true", help="only validate site.toml for the board, touch nothing")
    p.set_defaults(func=cmd_provision)

    p = _parser(sub, common, "status", "one-shot status of a running board (agent keeps running)",
                "  gridshed status --port /dev/ttyUSB0\n  gridshed status --json\n")
    p.add_argument("--port", "-p", help="serial port (default: the one attached board)")
    p.add_argument("--events", type=int, default=10, help="how many recent events (default 10)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--inventory", help="update last-seen in this inventory (default one, if it exists)")
    p.set_defaults(func=cmd_status)

    p = _parser(sub, common, "monitor", "live view of a running board",
                "  gridshed monitor --port /dev/ttyUSB0\n  gridshed monitor --interval 0.5 --count 20\n\n"
                "It holds the port only while it asks (once per refresh): `gridshed shed|restore|status|deploy`\n"
                "in another window wait for it and go through; a refresh that gets no answer (the agent\n"
                "restarting) is shown as an ALARM row and the next one tries again.\n")
    p.add_argument("--port", "-p", help="serial port (default: the one attached board)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--count", type=int, default=0, help="stop after N refreshes (default: until Ctrl-C)")
    p.set_defaults(func=cmd_monitor)

    p = _parser(sub, common, "flash", "write MicroPython firmware onto the chip (esptool / UF2)",
                "  gridshed flash --board esp32-devkitc-max3485 --port /dev/ttyUSB0 --firmware ESP32_GENERIC.bin\n"
                "  gridshed flash --board rpi-pico --firmware RPI_PICO.uf2          (BOOTSEL drive mounted)\n"
                "  gridshed flash --board rpi-pico2-w --firmware RPI_PICO2_W.uf2 --dry-run\n")
    p.add_argument("--board", "-b", required=True)
    p.add_argument("--port", "-p", help="serial port (ESP32; default: the one attached board)")
    p.add_argument("--firmware", required=True, help="MicroPython .bin (ESP32) or .uf2 (RP2)")
    p.add_argument("--baud", type=int, default=460800)
    p.add_argument("--drive", help="mounted BOOTSEL drive (RP2; default: found automatically)")
    p.add_argument("--erase", action="store_true", help="erase the whole flash first (ESP32)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, touch nothing")
    p.set_defaults(func=cmd_flash)

    p = _parser(sub, common, "image", "factory image: firmware + LittleFS with the agent and config",
                "  gridshed image --board esp32-devkitc-max3485 --site site.toml --firmware ESP32_GENERIC.bin -o factory.bin\n"
                "  gridshed image --board rpi-pico --site site.toml --firmware RPI_PICO.uf2 -o factory.uf2\n"
                "  gridshed image --board unix-sim --site site.toml -o fs.img\n")
    p.add_argument("--board", "-b", required=True)
    p.add_argument("--site", help="site.toml to include as /config.cbor")
    p.add_argument("--device-id", help="device id for the config (default: from the site file)")
    p.add_argument("--firmware", help="MicroPython firmware (.bin for ESP32, .uf2 for RP2)")
    p.add_argument("--build", dest="build_dir", help="existing build folder (default: build now)")
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(func=cmd_image)


def _feature_args(p: argparse.ArgumentParser, when: str = "") -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--site", dest="build_site", metavar="SITE.toml",
                   help="carry only the optional features this site turns on" + when
                        + " (the rest, and the modules only they import, are left out: a smaller image)")
    g.add_argument("--features", help="carry only these optional features" + when
                                      + ", comma-separated (agent/features/<name>.py); '' for none")


def _features(args: argparse.Namespace) -> tuple[list[str] | None, str | None]:
    """(features for build(), board) from --site / --features / --board."""
    from ..build import site_features

    board = getattr(args, "board", None)
    if getattr(args, "build_site", None):
        feats, board = site_features(args.build_site, board)
        return feats, board
    if getattr(args, "features", None) is not None:
        return [f.strip() for f in args.features.split(",") if f.strip()], board
    return None, board


# ---- handlers --------------------------------------------------------------------------------
def cmd_boards(args: argparse.Namespace) -> int:
    from ..boards import list_boards, load_board

    rows = []
    for name in list_boards():
        b = load_board(name)
        m = b["uarts"].get("meter", {})
        rows.append({"name": name, "chip": b["chip"], "port": b["port"], "arch": b["arch"],
                     "rs485_meter": {k: m.get(k) for k in ("id", "tx", "rx", "de", "re")},
                     "relays": {r["name"]: r["pin"] for r in b["relays"]}, "title": b["title"]})
    emit(args, rows, lambda: _boards_table(rows))
    return 0


def _boards_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    t = Table(title="supported boards")
    for c in ("board", "chip", "port", "RS-485 meter (uart tx/rx/de)", "relays (pins)"):
        t.add_column(c, overflow="fold")
    for r in rows:
        m = r["rs485_meter"]
        rs = f"UART{m['id']} {m['tx']}/{m['rx']}/{m['de']}" if m.get("id") is not None else "-"
        t.add_row(r["name"], r["chip"], r["port"], rs, " ".join(str(p) for p in r["relays"].values()))
    return t


def cmd_ports(args: argparse.Namespace) -> int:
    from ..ports import list_ports

    ports = list_ports(all_ports=args.all)
    lines = [f"{p.device}  {f'{p.vid:04x}:{p.pid:04x}' if p.vid is not None else '-'}  {p.known_as or p.description}"
             for p in ports] or ["no board found on USB" + ("" if args.all else " (try --all)")]
    emit(args, [p.as_dict() for p in ports], lines)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from ..build import build

    feats, board = _features(args)
    if not board:
        raise UserError("pass --board BOARD (or --site SITE.toml with board = ... in it)")
    m = build(board, src=args.src, out=args.out, romfs=args.romfs, features=feats)
    lines = [f"built {len(m['files'])} files for {m['board']} ({m['arch']}) into {m['path']}: "
             f"{m['total_size']} bytes, build {m['build_id']}; features: "
             + (", ".join(m["features"]) or "none") + ("" if m["all_features"] else " (built for the site)")]
    if m.get("romfs"):
        r = m["romfs"]
        lines.append(f"ROMFS image {m['path']}/{r['file']}: {len(r['files'])} modules, {r['size']} bytes, "
                     f"sha256 {r['sha256'][:16]}")
    emit(args, m, lines)
    return 0


def _build_dir(args: argparse.Namespace) -> str:
    if args.build_dir:
        if getattr(args, "build_site", None) or getattr(args, "features", None) is not None:
            raise UserError("--site / --features choose what a build carries: pass them to `gridshed build`, "
                            "or leave out --build to build now")
        return args.build_dir
    feats, board = _features(args)
    if not board:
        raise UserError("pass --board BOARD (to build now) or --build FOLDER")
    from ..build import build

    return build(board, romfs=bool(getattr(args, "romfs", False)), features=feats)["path"]


def cmd_deploy(args: argparse.Namespace) -> int:
    from ..deploy import deploy

    port = _port(args)
    bdir = _build_dir(args)
    romfs = bool(args.romfs)
    if args.json:
        s = deploy(port, bdir, board_name=args.board, force=args.force, restart=not args.no_restart, romfs=romfs,
                   say=_say, inventory_path=args.inventory, maintenance_boot=args.maintenance_boot)
        emit(args, s)
        return _refused(s, port)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=False) as prog:
        task = prog.add_task("connecting", total=None)

        def cb(event: str, info: dict[str, Any]) -> None:
            if event == "plan":
                prog.update(task, total=info["total_bytes"] or 1, completed=0 if info["total_bytes"] else 1,
                            description=f"{len(info['to_write'])} files to write")
            elif event == "file":
                prog.update(task, description=info["file"])
            elif event == "bytes":
                prog.advance(task, info["n"])
            elif event == "rom":
                prog.update(task, total=info["size"] or 1, completed=0 if info["size"] else 1,
                            description="ROMFS image unchanged" if info["unchanged"] else "ROMFS image")
            elif event == "fallback":
                prog.update(task, description="agent copy in /lib (while the partition is rewritten)")
            elif event in ("hash", "verify", "switch", "restart", "rom-query", "rom-prepare", "rom-verify"):
                prog.update(task, description=event)

        s = deploy(port, bdir, board_name=args.board, force=args.force, restart=not args.no_restart, progress=cb,
                   romfs=romfs, say=_say, inventory_path=args.inventory, maintenance_boot=args.maintenance_boot)
    print(f"deployed build {s['build_id']} to {port}: {len(s['written'])} written, {len(s['unchanged'])} unchanged, "
          f"{len(s['removed'])} removed, {s['bytes_written']} bytes in {s['seconds']} s"
          + ("; finished an interrupted deploy first" if s["recovered"] else "")
          + (("; ROMFS image %d bytes %s" % (s["romfs"]["image_size"],
                                              "written" if s["romfs"]["written"] else "unchanged")) if romfs else "")
          + "; " + s["restart"])
    for w in s.get("warnings", []):
        warn(w)
    return _refused(s, port)


def _refused(s: dict[str, Any], port: str) -> int:
    """A deploy whose build refuses the board's config left the board without its agent: one
    error line with the way back, exit 1 (the write itself is done: --json has the summary)."""
    why = s.get("config_refused")
    if not why:
        return 0
    from .output import error

    error(UserError(f"{port}: build {s['build_id']} refuses the board's config ({why}): the agent does not run, "
                    "PROTECTION IS OFF. Deploy a build that knows the config (`gridshed deploy --board "
                    f"{s['board']}` builds this gridshed's firmware), or provision a config this build knows"))
    return 1


def _say(line: str) -> None:
    """The one line on the agent after a board write cut short (Ctrl-C), before "interrupted"."""
    note(f"gridshed: {line}")


def cmd_provision(args: argparse.Namespace) -> int:
    from ..provision import prepare_config, provision

    if args.check:
        cfg = prepare_config(args.site, args.board, args.device_id)
        res = {"ok": True, "device": cfg["device"], "board": cfg["board"], "warnings": cfg.get("warnings", [])}
        emit(args, res, f"{args.site}: OK for board {cfg['board']}, device {cfg['device']}")
        if not args.json:
            for w in res["warnings"]:
                warn(w)
        return 0
    port = _port(args)
    res = provision(port, args.site, device_id=args.device_id, board_name=args.board,
                    inventory_path=args.inventory, keep_key=args.keep_key, verify_agent=5.0,
                    progress=None if args.json else (lambda m: note(m + "...")), say=_say)
    if args.json:
        emit(args, res)
    else:
        print(f"provisioned {res['device_id']} ({res['board']}, site {res['site']}): key id {res['key_id']}, "
              f"config {res['config_hash']}, firmware {res['firmware_build'] or 'unknown'}; "
              f"recorded in {res['inventory']}; {res['restart']}")
        for w in res["warnings"]:
            warn(w)
    return 0


def _alarm_rows(st: dict[str, Any]) -> list[tuple[str, str]]:
    """What a technician must not miss (docs/failsafes.md, docs/meters.md), one row each."""
    out = []
    if st.get("state") == "refused":
        out.append(("ALARM", "config refused: " + "; ".join(st.get("config_errors") or [])))
    # a feature left out for RAM: the hub's features_memory, or the feature's own counter when
    # only its buffers found none (dnp3_memory, market_mem)
    nomem = sorted(k for k, v in (st.get("errors") or {}).items() if v and k.endswith(("_memory", "_mem")))
    if nomem:
        out.append(("ALARM", "optional features NOT started: not enough RAM for them beside protection "
                             "(%s; docs/failsafes.md, \"A feature without RAM\")" % ", ".join(nomem)))
    if (st.get("errors") or {}).get("feature_error"):
        out.append(("ALARM", "optional features NOT started: a section they cannot run with (the console's "
                             "'ALARM <section> did not start' line says which and why; provision again)"))
    for f, why in (st.get("integrity") or {}).items():
        out.append(("ALARM", f"{f} refused: {why} (provision again)"))
    imp = st.get("implausible") or {}
    if imp.get("total"):
        last = imp.get("last") or {}
        out.append(("ALARM" if imp.get("now") else "implausible",
                    f"{imp['total']} implausible samples (nan {imp.get('nan')}, band {imp.get('band')}, "
                    f"rate {imp.get('rate')}, undervoltage {imp.get('undervoltage')}); last: {last.get('why')} "
                    f"{last.get('hz', last.get('value'))}" + (" NOW" if imp.get("now") else "")))
    wo = st.get("word_order")
    if wo and wo != "as mapped":
        out.append(("ALARM", "meter word order " + wo))
    if st.get("kw_stale") and st.get("kw") is not None:
        out.append(("kW", f"{st.get('kw')} is STALE (last read {st.get('kw_age_ms')} ms ago)"))
    return out


def _status_table(st: dict[str, Any]):
    from rich.table import Table

    t = Table(show_header=False, title=f"{st.get('device', '?')} @ {st.get('site', '?')}")
    t.add_column("key", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    blocks = st.get("blocks") or []
    mask = st.get("mask")
    relays = ", ".join(f"{b}={'closed' if (mask or 0) >> i & 1 else 'OPEN'}" for i, b in enumerate(blocks)) \
        if mask is not None else "?"
    rows = [("firmware build", st.get("build")), ("config hash", st.get("config_hash")),
            ("board", st.get("board")), ("state", f"{st.get('state')} ({st.get('reason')})"),
            ("meter", f"{st.get('hz')} Hz, {st.get('kw')} kW, {'ok' if st.get('meter_ok') else 'NOT READING'}"),
            ("relays", relays),
            ("counters", f"samples {st.get('samples')}, meter errors {st.get('meter_errors')}, "
                         f"transitions {st.get('transitions')}, errors {st.get('errors')}"),
            ("uptime", f"{(st.get('uptime_ms') or 0) / 1000:.1f} s, free mem {st.get('mem_free')}")]
    if st.get("held"):  # the shed authority's entries holding a shed (docs/control.md)
        rows.append(("shed held by", ", ".join(st["held"])))
    dn = st.get("dnp3")
    if isinstance(dn, dict) and "link" in dn:  # the DNP3 outstation (docs/dnp3.md)
        lk, ap = dn["link"], dn["app"]
        rows.append(("dnp3", f"{dn.get('transport')} {dn.get('port') if dn.get('transport') == 'tcp' else ''}".strip()
                     + f", master {dn.get('peer') or 'not connected'}, {ap.get('requests')} requests, "
                     f"{ap.get('controls')} controls ({ap.get('controls_refused')} refused), "
                     f"bad frames {lk.get('hdr_crc', 0) + lk.get('data_crc', 0)}, events waiting {dn.get('events')}"))
    elif (st.get("errors") or {}).get("dnp3_memory"):
        rows.append(("ALARM", "dnp3 outstation NOT started: not enough RAM (docs/dnp3.md, Memory)"))
    mk = st.get("market")
    if isinstance(mk, dict):  # the market loop (docs/market.md)
        if mk.get("error"):
            rows.append(("ALARM", f"market NOT running: {mk['error']}"))
        else:
            off = mk.get("off") or 0
            held = ", ".join(b for i, b in enumerate(blocks) if off >> i & 1) or "none"
            rows.append(("market", f"schedule {mk.get('sid')} ({mk.get('intervals')} intervals"
                         + ("" if mk.get("stored", True) else ", NOT yet stored") + f"), now {mk.get('mode')} "
                         f"{mk.get('value')}, economics holds open: {held}; available {mk.get('avail_kw')} kW"
                         + (f", {mk.get('program')} {mk.get('obligation_kw')} kW committed this hour"
                            if mk.get("obligation_hour") else "")))
            if mk.get("warning"):
                rows.append(("market", "WARNING: " + mk["warning"]))
            if mk.get("file"):
                rows.append(("ALARM", f"market.cbor refused: {mk['file']} (send the schedule again)"))
    if "time_trusted" in st:
        rows.append(("clock", "trusted (signed time)" if st["time_trusted"]
                     else "NOT trusted: run `gridshed time-sync` (restore/disarm use the board's nonce)"))
    rows += _alarm_rows(st)
    for k, v in rows:
        t.add_row(k, str(v))
    for e in st.get("events", [])[-10:]:
        t.add_row("event", _event_text(e))
    return t


def _event_text(e: Any) -> str:
    """One journal record for the status table: a disturbance capture's samples (base64) are the
    trace `gridshed events` and `gridshed report` show, not text for a technician to read."""
    if isinstance(e, dict) and e.get("k") == "capture" and "smp" in e:
        e = dict(e, smp="(samples: gridshed events / gridshed report)")
    return to_json(e, lines=True)


def cmd_status(args: argparse.Namespace) -> int:
    from ..provision import read_status, touch_inventory

    port = _port(args)
    st = read_status(port, timeout=args.timeout, events=args.events)
    st["port"] = port
    st["inventory_updated"] = touch_inventory(st, args.inventory)
    emit(args, st, lambda: _status_table(st))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """Each refresh opens the port, asks @status and lets it go: `gridshed shed|restore|status`
    in another window get the port between refreshes (they wait for it, transport.BUSY_WAIT).
    After the first answer, a refresh that fails (the agent restarting after a deploy, the port
    held by a long write) is shown, and the next one tries again."""
    from collections import deque

    from ..transport import BoardError
    from ..transport import Console as BoardConsole

    port = _port(args)
    log: deque[str] = deque(maxlen=5)
    n = 0

    def once() -> dict[str, Any]:
        with BoardConsole(port) as c:
            st = c.status()
            log.extend(c.log_lines)
            return st

    def refresh() -> dict[str, Any]:
        try:
            return once()
        except BoardError as exc:
            if n == 0:
                raise  # a wrong port, no agent at all: the one error line
            return {"error": str(exc)}

    if args.json:
        while not args.count or n < args.count:
            emit_event(args, refresh(), None)
            n += 1
            time.sleep(args.interval)
        return 0
    from rich.live import Live

    st = refresh()
    with Live(refresh_per_second=4, console=console()) as live:
        while True:
            if "error" in st and "state" not in st:
                from rich.table import Table

                t = Table(show_header=False, title=port)
                t.add_row("ALARM", f"no status this refresh (next one in {args.interval:g} s): {st['error']}")
                live.update(t)
            else:
                st["events"] = [{"log": line} for line in log]
                live.update(_status_table(st))
            n += 1
            if args.count and n >= args.count:
                break
            time.sleep(args.interval)
            st = refresh()
    return 0


def cmd_flash(args: argparse.Namespace) -> int:
    from ..boards import load_board
    from ..flash import plan_flash, run_flash

    board = load_board(args.board)
    port = args.port
    if board["port"] == "esp32" and not port and not args.dry_run:
        port = _port(args)
    plan = plan_flash(board, args.firmware, port=port, baud=args.baud, drive=args.drive, erase=args.erase)
    if args.json:
        emit(args, dict(plan, dry_run=args.dry_run))
    else:
        print(f"{'would flash' if args.dry_run else 'flashing'} {board['name']} ({board['chip']}) by {plan['method']}:")
        for s in plan["steps"]:
            print("  -", s)
        print("  equivalent:", plan["command"])
    if not args.dry_run:
        run_flash(plan)
        if not args.json:
            print("done: next `gridshed deploy --board %s`" % board["name"])
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from ..boards import load_board
    from ..image import build_image

    board = load_board(args.board)
    config = None
    if args.site:
        from .. import siteconfig
        from ..provision import prepare_config

        config = siteconfig.config_bytes(prepare_config(args.site, board["name"], args.device_id))
    if args.build_dir:
        bdir = args.build_dir
    else:
        from ..build import build

        bdir = build(board["name"])["path"]
    if args.json:
        img, layout = build_image(board, bdir, config=config, firmware=args.firmware)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as prog:
            task = prog.add_task("image", total=None)

            def cb(stage: str, done: int, total: int) -> None:
                prog.update(task, description=stage, completed=done, total=total)

            img, layout = build_image(board, bdir, config=config, firmware=args.firmware, progress=cb)
    Path(args.out).write_bytes(img)
    layout["out"] = args.out
    if args.json:
        emit(args, layout)
    else:
        print(f"wrote {args.out}: {layout['format']}, {layout['size']} bytes; filesystem {layout['fs_size']} bytes at "
              f"0x{layout['fs_offset']:x} with {len(layout['files'])} files (build {layout['build_id']})")
    return 0
