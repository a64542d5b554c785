"""CLI: signed commands to boards (shed, restore, arm, disarm, test, ping) and `sign` to a file.

Each command is a COSE_Mac0 signed with the target device's key from the inventory, with a fresh
seq (never reused) and an expiry; see docs/security.md. Transports: the agent's console
(serial), a UDP datagram, or MQTT (one message per device on gridshed/<site>/<device>/cmd).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from .output import emit

VERBS = {
    "shed": "open the relays now (a signed shed command)",
    "restore": "end a commanded shed; the board restores per program rules (hold, min-off, stagger)",
    "arm": "arm under-frequency tripping",
    "disarm": "disarm under-frequency tripping (signals and commands still shed)",
    "test": "signed round trip that changes nothing; the board answers with its status",
    "ping": "signed status request (proves key, seq and path end to end)",
    "time-sync": "give the board the host's time, signed (its clock is trusted from then on; exp enforced)",
}

TARGET_HELP = """
target and transport:
  --device ID          one board (its key from the inventory)
  --site SITE          every board of the site in the inventory (MQTT: one message per board,
                       each signed with that board's own key)
  --via serial         the agent's console (--port); the default when --port is given
  --via udp            one datagram to --host (--udp-port, default 4700)
  --via mqtt           the broker (--broker HOST:PORT, default $GRIDSHED_BROKER or 127.0.0.1:1883);
                       the answer is the board's retained state carrying the seq; a site whose
                       [mqtt] asks for TLS and a login (recorded by provision) gets them by itself
freshness: restore, disarm and time-sync first ask the board for its current nonce (same
  transport) and sign it in, so they work before the board trusts its clock; a board trusts
  its clock only after `gridshed time-sync` (signed, with the nonce), and from then on
  enforces every command's --expires. docs/security.md.
exit status: 0 all accepted, 1 a board refused or did not answer, 2 usage errors."""


def _add_target(p: argparse.ArgumentParser, with_via: bool = True, kw: bool = True, all_: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--device", help="target device id (as in the inventory)")
    g.add_argument("--site", help="target every device of this site")
    if kw:  # only shed takes a kW target: restore, arm, disarm, test and ping do not offer it
        p.add_argument("--kw", type=float, help="partial shed target in kW (shed only)")
    else:
        p.set_defaults(kw=None)
    if all_:
        p.add_argument("--all", dest="all_", action="store_true",
                       help="release every issuer's shed (Modbus, dry contact latch, heartbeat loss, other "
                            "signers), if the board's [authority] restore_all lists this key; without it a "
                            "restore releases only the sheds this key issued")
    p.add_argument("--expires", default="60s", help="command lifetime, e.g. 30s, 5m (default 60s)")
    p.add_argument("--inventory", help="inventory database (default: user data dir, or $GRIDSHED_INVENTORY)")
    p.add_argument("--seq-file", help="seq counter file (default: seq.json beside the inventory)")
    if with_via:
        p.add_argument("--via", choices=("serial", "udp", "mqtt"), help="transport (default from the options given)")
        p.add_argument("--port", "-p", help="serial port of the board's console")
        p.add_argument("--host", help="board address for --via udp")
        p.add_argument("--udp-port", type=int, default=None, help="board UDP port (default 4700)")
        p.add_argument("--broker", help="MQTT broker HOST[:PORT] (port default 1883; 8883 for a site with [mqtt] tls, "
                       "which also brings the TLS and login settings recorded in the inventory)")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for answers (default 10)")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    for verb, text in VERBS.items():
        ex = {
            "shed": "  gridshed shed --device site1-ctl1 --port /dev/ttyUSB0 --expires 60s\n"
                    "  gridshed shed --device site1-ctl1 --kw 250 --via udp --host 10.0.0.21\n"
                    "  gridshed shed --site site1 --via mqtt --broker 10.0.0.5:1883 --json\n",
            "restore": "  gridshed restore --device site1-ctl1 --port /dev/ttyUSB0\n"
                       "  gridshed restore --site site1 --via mqtt --broker 10.0.0.5\n",
            "time-sync": "  gridshed time-sync --device site1-ctl1 --port /dev/ttyUSB0\n"
                         "  gridshed time-sync --site site1 --via mqtt --broker 10.0.0.5\n",
        }.get(verb, f"  gridshed {verb} --device site1-ctl1 --port /dev/ttyUSB0\n"
                    f"  gridshed {verb} --site site1 --via mqtt --broker 10.0.0.5 --json\n")
        p = sub.add_parser(verb, parents=[common], help=text, description=text,
                           epilog="examples:\n" + ex + TARGET_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_target(p, kw=verb == "shed", all_=verb == "restore")
        p.set_defaults(func=cmd_send, verb=verb)

    p = sub.add_parser("sign", parents=[common], help="write a signed command (raw COSE bytes) to a file",
                       description="Sign a command for another transport (mosquitto_pub -f, netcat, a "
                                   "utility gateway). The seq is reserved now: send the file once.",
                       epilog="examples:\n"
                              "  gridshed sign shed --device site1-ctl1 -o shed.cose\n"
                              "  mosquitto_pub -t gridshed/site1/site1-ctl1/cmd -f shed.cose\n"
                              "  gridshed sign restore --site site1 --expires 10m -o restore/   (one file per device)\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("verb", choices=[v for v in VERBS if v != "time-sync"],
                   help="the command (restore and disarm from a file are accepted only by a board "
                        "that trusts its clock: see `gridshed time-sync`)")
    _add_target(p, with_via=False, all_=True)
    p.add_argument("-o", "--out", required=True,
                   help="output file (--device) or directory (--site: DEVICE.cose per device)")
    p.set_defaults(func=cmd_sign)


def _check(args: argparse.Namespace) -> None:
    if args.kw is not None and args.verb != "shed":
        raise UserError("--kw only applies to shed")
    if getattr(args, "all_", False) and args.verb != "restore":
        raise UserError("--all only applies to restore")


def _sign(args: argparse.Namespace, nonces: dict | None = None) -> list:
    from .. import fleet_client as fc

    _check(args)
    if args.kw is not None and not 0 <= args.kw < 1e9:
        raise UserError(f"--kw must be >= 0, got {args.kw:g}")
    expires = fc.parse_duration(args.expires)
    tgts = fc.targets(args.inventory, args.device, args.site)
    return fc.sign(tgts, args.verb, fc.seq_file(args.inventory, args.seq_file), expires, args.kw,
                   all_=getattr(args, "all_", False), nonces=nonces)


def _via(args: argparse.Namespace) -> str:
    if args.via:
        return args.via
    given = [v for v, opt in (("serial", args.port), ("udp", args.host), ("mqtt", args.broker)) if opt]
    if len(given) == 1:
        return given[0]
    if args.site and not given:
        return "mqtt"
    raise UserError("say how to reach the board: --port PORT (serial), --host H (udp) or --broker H:P (mqtt)")


def _summary(rep: dict[str, Any]) -> str:
    if rep.get("ok"):
        st = rep.get("state") or rep.get("status") or rep
        bits = [f"{k}={st[k]}" for k in ("state", "armed", "mask") if isinstance(st, dict) and k in st]
        return "accepted" + (" (" + " ".join(bits) + ")" if bits else "")
    if rep.get("refused"):
        return f"REFUSED: {rep['refused']}"
    return f"NO ANSWER: {rep.get('error', 'unknown')}"


def cmd_send(args: argparse.Namespace) -> int:
    from .. import fleet_client as fc

    _check(args)
    via = _via(args)
    if args.site and via != "mqtt":
        raise UserError("--site reaches many boards: use --via mqtt (serial and UDP reach one board, use --device)")
    if via == "serial" and not args.port:
        raise UserError("--via serial needs --port PORT (the board's console)")
    if via == "udp" and not args.host:
        raise UserError("--via udp needs --host ADDRESS")
    if via != "udp" and args.udp_port is not None:
        raise UserError("--udp-port only applies to --via udp")
    if args.timeout <= 0:
        raise UserError("--timeout must be > 0")
    broker = args.broker or os.environ.get("GRIDSHED_BROKER") or "127.0.0.1:1883"
    nonces = None
    if fc.CLI_COMMANDS.get(args.verb, args.verb) in fc.FRESH:
        # freshness while the board does not trust its clock: its current nonce, signed in
        tgts = fc.targets(args.inventory, args.device, args.site)
        nonces = fc.nonces(via, tgts, port=args.port, host=args.host, udp_port=args.udp_port or fc.UDP_PORT,
                           broker=broker, timeout=args.timeout)
    signed = _sign(args, nonces)
    if via == "serial":
        replies = [fc.send_serial(args.port, signed[0].msg, timeout=args.timeout)]
    elif via == "udp":
        replies = [fc.send_udp(args.host, args.udp_port or fc.UDP_PORT, signed[0].msg, timeout=args.timeout)]
    else:
        replies = fc.send_mqtt(broker, signed, timeout=args.timeout)
    results = [{"device": s.target.device, "cmd": s.cmd, "seq": s.seq, "exp": s.exp, "ok": bool(r.get("ok")),
                "reply": r} for s, r in zip(signed, replies)]
    ok = all(r["ok"] for r in results)
    lines = [f"{r['device']:<20} {args.verb} seq={r['seq']}  {_summary(r['reply'])}" for r in results]
    if len(results) > 1:
        lines.append(f"{sum(r['ok'] for r in results)}/{len(results)} boards accepted")
    held = _still_held(args, via, results)
    if held is not None:
        results[0]["still_held"] = held
    emit(args, {"verb": args.verb, "via": via, "ok": ok, "results": results}, lines)
    if held and not args.json:
        from .output import warn

        warn(f"{results[0]['device']}: the restore was accepted, but the shed is still held by "
             f"{', '.join(held)} (a restore releases only the sheds its own key issued; a key replaced by "
             "rotate-key can no longer release its own): `gridshed restore --all` releases every issuer's shed "
             "(docs/control.md, Shed authority)")
    return 0 if ok else 1


def _still_held(args: argparse.Namespace, via: str, results: list[dict[str, Any]]) -> list[str] | None:
    """After an accepted restore over the console: who still holds a shed (@status `held`), so
    "accepted" is not read as "the load comes back" while another issuer's shed stays. None when
    not asked (another verb or transport, --all, or the board did not say)."""
    if (args.verb != "restore" or via != "serial" or getattr(args, "all_", False) or len(results) != 1
            or not results[0]["ok"]):
        return None
    from ..transport import Console

    try:
        with Console(args.port) as con:
            st = con.status(timeout=min(args.timeout, 5.0))
    except UserError:
        return None
    held = st.get("held")
    return [str(h) for h in held] if isinstance(held, list) else None


def cmd_sign(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.site and out.exists() and not out.is_dir():
        raise UserError(f"{out}: --site writes one file per device: give a directory")
    if args.device and out.is_dir():
        raise UserError(f"{out} is a directory: give a file name")
    signed = _sign(args)
    files = []
    try:
        if args.site:
            out.mkdir(parents=True, exist_ok=True)
            for s in signed:
                f = out / f"{s.target.device}.cose"
                f.write_bytes(s.msg)
                files.append((s, f))
        else:
            out.write_bytes(signed[0].msg)
            files.append((signed[0], out))
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc}") from None
    rows = [{"device": s.target.device, "cmd": s.cmd, "seq": s.seq, "exp": s.exp, "kid": s.target.kid.hex(),
             "file": str(f), "bytes": len(s.msg),
             "topic": f"gridshed/{s.target.site}/{s.target.device}/cmd" if s.target.site else None}
            for s, f in files]
    emit(args, {"signed": rows}, [f"{r['file']}: {r['cmd']} for {r['device']} seq={r['seq']} ({r['bytes']} bytes; "
                                  f"MQTT topic {r['topic']})" for r in rows])
    return 0
