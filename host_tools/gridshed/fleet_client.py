"""Host side of signed commands on the wire: sign per device, send over serial, UDP or MQTT.

Keys and key ids come from the inventory (one key per device, written by `gridshed provision`),
seqs from :class:`gridshed.signing.SeqCounter` (never reused, kept beside the inventory). The
board's answer is returned as a dict per device:

* serial: the agent's reply to ``@cmd <base64>`` (``{"ok", "cmd", "seq"}`` or ``{"ok": false,
  "refused": reason}``);
* UDP: the board's reply datagram (same keys, JSON; see agent/features/udp.py);
* MQTT: the board's retained state on ``gridshed/<site>/<device>/state`` once it carries the
  seq that was sent (or a new refusal); only states whose "mac" verifies with the device's key
  count (:func:`verify_state`), anything else is ignored and counted. See docs/mqtt.md and
  docs/security.md.

Restore, disarm and time need freshness while the board does not trust its clock: the board's
current nonce, fetched first over the same transport (``@nonce`` on the console, a ``@nonce``
datagram, the "nonce" of the board's authenticated MQTT state) and signed into the payload.
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SEQ_FILE = "seq.json"
CLI_COMMANDS = {"shed": "shed", "restore": "restore", "arm": "arm", "disarm": "disarm",
                "test": "test", "ping": "status", "time-sync": "time"}
UDP_PORT = 4700
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$")


def parse_duration(text: str) -> float:
    """'60s', '5m', '1h', '250ms' or a bare number of seconds -> seconds (UserError if bad)."""
    m = _DURATION.match(str(text))
    if not m:
        raise UserError(f"bad duration {text!r}: use e.g. 60s, 5m, 1h")
    v = float(m.group(1))
    unit = m.group(2) or "s"
    v *= {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}[unit]
    if not 1 <= v <= 7 * 86400:
        raise UserError(f"duration {text!r} out of range (1 s .. 7 days)")
    return v


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep:
        return str(text), default_port
    try:
        p = int(port)
    except ValueError:
        raise UserError(f"bad address {text!r}: use HOST:PORT") from None
    if not 0 < p < 65536:
        raise UserError(f"bad port in {text!r}")
    return host or "127.0.0.1", p


@dataclass
class Target:
    device: str
    site: str | None
    kid: bytes
    key: bytes = field(repr=False)
    broker: "BrokerOpts | None" = None  # how to reach the site's broker (TLS, login)


@dataclass
class Signed:
    target: Target
    cmd: str
    seq: int
    exp: int
    msg: bytes


def targets(inventory: str | os.PathLike | None, device: str | None, site: str | None) -> list[Target]:
    """The devices a command goes to, with their keys (UserError when none match)."""
    from .inventory import Inventory

    if bool(device) == bool(site):
        raise UserError("give exactly one of --device ID or --site SITE")
    with Inventory(inventory) as inv:
        if device:
            row = inv.require(device)
            if site is not None and row.get("site") != site:
                raise UserError(f"device {device!r} belongs to site {row.get('site')!r}")
            rows = [row]
        else:
            rows = inv.list(site=site)
            if not rows:
                raise UserError(f"no device of site {site!r} in the inventory {inv.path} "
                                "(see `gridshed inventory list`)")
        out = []
        opts: dict[Any, BrokerOpts] = {}
        for r in rows:
            kid, key = inv.key_for(r["device_id"])
            st = r.get("site")
            if st not in opts:
                opts[st] = _site_opts(inv.site(st) if st else None)
            out.append(Target(r["device_id"], st, kid, key, opts[st]))
        return out


def seq_file(inventory: str | os.PathLike | None, override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    from .inventory import default_path

    inv = Path(inventory) if inventory else default_path()
    return inv.with_name(SEQ_FILE)


def sign(tgts: list[Target], cmd: str, seq_path: Path, expires_s: float = 60.0, kw: float | None = None,
         now: float | None = None, iss: str | None = None, all_: bool = False,
         nonces: dict[str, bytes] | None = None) -> list[Signed]:
    """One signed command per target (its own key, its own fresh seq). cmd is a CLI verb.

    iss: the issuer label (its own entry on the board: a restore with it releases only the
    sheds it issued); all_: restore every issuer's shed; nonces: {device: the board's current
    nonce} for commands that need freshness before the board trusts its clock."""
    from agent import cbor
    from agent import cmd_cose as cose

    from .signing import SeqCounter, build_payload

    wire = CLI_COMMANDS.get(cmd, cmd)
    counter = SeqCounter(seq_path)
    now = time.time() if now is None else now
    out = []
    for t in tgts:
        seq = counter.next(t.kid, at_least=int(now))
        payload = build_payload(wire, seq, int(now + expires_s), target_device=t.device,
                                target_site=t.site, kw=kw, iss=iss, all_=all_,
                                nonce=(nonces or {}).get(t.device), t=int(now) if wire == "time" else None)
        msg = cose.mac0_create(t.key, t.kid, cbor.dumps(payload), tagged=True)
        out.append(Signed(t, wire, seq, payload["exp"], msg))
    return out


FRESH = ("restore", "disarm", "time")  # = agent.cmd_check.FRESH
NONCE_REQ = b"@nonce" + b" " * 42     # a UDP nonce request: no shorter than its answer


def state_mac(key: bytes, topic: str, body: str) -> str:
    """The board's MAC of a state message with one key (agent/features/mqtt.py Fleet.sign)."""
    import hashlib
    import hmac

    return hmac.new(key, topic.encode() + b"\x00" + body.encode(), hashlib.sha256).hexdigest()


def verify_state(key: bytes, topic: str, payload: bytes, kid: bytes | None = None) -> dict[str, Any] | None:
    """The state object if its "mac" (the last field: {kid hex: mac hex}) has an entry that
    verifies with key (the entry of kid, when given), else None."""
    import hmac

    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return None
    i = text.rfind(', "mac": {')
    if i < 0 or not text.endswith("}}"):
        return None
    body = text[:i] + "}"
    try:
        macs = json.loads(text[i + 9:-1])
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(macs, dict) or not isinstance(obj, dict):
        return None
    want = state_mac(key, topic, body)
    cands = [macs.get(kid.hex())] if kid is not None else list(macs.values())
    if not any(isinstance(m, str) and hmac.compare_digest(m, want) for m in cands):
        return None
    return obj


def nonce_serial(port: str, timeout: float = 5.0) -> bytes:
    from .transport import Console

    with Console(port) as con:
        ans = con.request("nonce", timeout=timeout)
    try:
        return bytes.fromhex(ans[-1]["nonce"])
    except (KeyError, ValueError, TypeError, IndexError):
        err = ans[-1].get("error") if ans and isinstance(ans[-1], dict) else None
        if err:  # the board answered, with an error (e.g. MemoryError on a board short of RAM)
            raise UserError(f"{port}: the agent could not give a nonce: {err}") from None
        raise UserError(f"{port}: the agent gave no nonce (firmware older than the freshness rules?)") from None


def nonce_udp(host: str, port: int, timeout: float = 3.0) -> bytes:
    rep = send_udp(host, port, NONCE_REQ, timeout=timeout)
    try:
        return bytes.fromhex(rep["nonce"])
    except (KeyError, ValueError, TypeError):
        raise UserError(f"udp {host}:{port}: no nonce from the board ({rep.get('error') or rep})") from None


def nonces_mqtt(broker: str, tgts: list[Target], timeout: float = 10.0, strict: bool = True,
                opts: BrokerOpts | None = None) -> dict[str, bytes]:
    """{device: nonce} from each board's authenticated retained state (strict: all, or UserError)."""
    opts = opts or (tgts[0].broker if tgts else None)
    host, port = parse_hostport(broker, 8883 if opts and opts.tls else 1883)
    w = _StateWatch(host, port, [state_topic(t) for t in tgts], {state_topic(t): (t.kid, t.key) for t in tgts},
                    opts)
    try:
        with w.cv:
            w.cv.wait_for(lambda: all(w.state.get(state_topic(t), {}).get("nonce") for t in tgts), timeout)
            out = {}
            for t in tgts:
                n = w.state.get(state_topic(t), {}).get("nonce")
                if not n and not strict:
                    continue
                if not n:
                    raise UserError(f"{t.device}: no authenticated state with a nonce on {broker} within "
                                    f"{timeout:g} s (board offline, or firmware older than issue 13)")
                out[t.device] = bytes.fromhex(n)
            return out
    finally:
        w.close()


def nonces(via: str, tgts: list[Target], port: str | None = None, host: str | None = None,
           udp_port: int = UDP_PORT, broker: str | None = None, timeout: float = 10.0,
           opts: BrokerOpts | None = None) -> dict[str, bytes]:
    if via == "serial":
        return {tgts[0].device: nonce_serial(port, timeout)}
    if via == "udp":
        return {tgts[0].device: nonce_udp(host, udp_port, timeout)}
    return nonces_mqtt(broker, tgts, timeout, opts=opts)


def time_sync_serial(port: str, inventory: str | os.PathLike | None, device: str,
                     seq_path: Path | None = None, expires_s: float = 60.0, timeout: float = 5.0) -> dict[str, Any]:
    """`gridshed time-sync --device DEVICE --port PORT`: the board's nonce, then the signed `time`
    command carrying it (its key from the inventory); the agent's reply. provision and rotate-key
    send it after their restart (a restart forgets the trusted time)."""
    tgts = targets(inventory, device, None)
    signed = sign(tgts, "time-sync", seq_path or seq_file(inventory), expires_s,
                  nonces=nonces("serial", tgts, port=port, timeout=timeout))
    return send_serial(port, signed[0].msg, timeout=timeout)


# ---- transports ---------------------------------------------------------------------------
def send_serial(port: str, msg: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """``@cmd <base64>`` on the agent's console; the agent's reply object."""
    from .transport import Console

    with Console(port) as con:
        ans = con.request("cmd", base64.b64encode(msg).decode(), timeout=timeout)
    rep = dict(ans[-1])
    rep.pop("end", None)
    return rep


def send_udp(host: str, port: int, msg: bytes, timeout: float = 3.0, retries: int = 2) -> dict[str, Any]:
    """One datagram, one reply datagram (re-sent on silence: a duplicate is refused as a replay,
    so a reply "replay" after a re-send means the first copy was accepted and its reply lost)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise UserError(f"cannot resolve {host!r}: {exc}") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout / (retries + 1))
        for attempt in range(retries + 1):
            s.sendto(msg, addr)
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError as exc:  # ICMP port unreachable on a connected path, ...
                raise UserError(f"udp {host}:{port}: {exc}") from None
            try:
                rep = json.loads(data)
            except ValueError:
                return {"ok": False, "error": "unreadable reply", "raw": data[:80].hex()}
            if attempt and rep.get("refused") == "replay":
                rep["note"] = "first copy's reply lost; its re-send was refused as a replay"
            return rep
    return {"ok": False, "error": f"no reply from {host}:{port} within {timeout:g} s"}


@dataclass
class BrokerOpts:
    """How the host reaches a site's broker (the inventory's record of the site's [mqtt] section,
    written by `gridshed provision` / `gridshed broker-config`): TLS with the CA it trusts and
    the host name it checks, and the host's own login (password or client certificate)."""
    tls: bool = False
    ca_pem: str | None = None
    server_name: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cert_pem: str | None = None
    key_pem: str | None = field(default=None, repr=False)


def broker_opts(inventory: str | os.PathLike | None, site: str | None) -> BrokerOpts:
    """The site's broker options from the inventory (plain, no login, for a site never set up)."""
    from .inventory import Inventory

    if not site:
        return BrokerOpts()
    with Inventory(inventory) as inv:
        return _site_opts(inv.site(site))


def _site_opts(s: dict[str, Any] | None) -> BrokerOpts:
    if not s:
        return BrokerOpts()
    return BrokerOpts(bool(s["tls"]), s["trust_ca"] or s["ca_cert"], s["server_name"] or None,
                      s["host_user"] or None, s["host_password"] or None, s["host_cert"], s["host_key"])


def tls_reason(exc: BaseException) -> str:
    """One of expired certificate / unknown CA / hostname mismatch / ... for a TLS failure."""
    text = str(exc).lower()
    if "not yet valid" in text:
        return "certificate not yet valid (check the clocks)"
    if "expired" in text or "validity" in text:
        return "expired certificate"
    if "hostname" in text or "ip address mismatch" in text or "common name" in text:
        return "hostname mismatch"
    if "unknown ca" in text or "unable to get local issuer" in text or "self-signed" in text \
            or "self signed" in text or "not correctly signed" in text:
        return "unknown CA"
    return "TLS error"


def _named_context_class():  # type: ignore[no-untyped-def]
    import ssl

    class Ctx(ssl.SSLContext):
        """Checks the broker's certificate against server_name when it differs from the address."""
        gs_name: str | None = None

        def wrap_socket(self, sock, *a, server_hostname=None, **k):  # type: ignore[no-untyped-def,override]
            return super().wrap_socket(sock, *a, server_hostname=self.gs_name or server_hostname, **k)

    return Ctx


def paho_client(client_id: str, opts: BrokerOpts | None, host: str):  # type: ignore[no-untyped-def]
    """A paho client set up for the site's broker options (TLS, login)."""
    import ssl
    import tempfile

    import paho.mqtt.client as paho

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    if opts is None:
        return c
    if opts.tls:
        if not opts.ca_pem:
            raise UserError("the site's broker uses TLS but no CA is recorded: run `gridshed broker-config` "
                            "or set [mqtt] ca in site.toml and provision")
        ctx = _named_context_class()(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname
        ctx.gs_name = opts.server_name if opts.server_name and opts.server_name != host else None
        try:
            ctx.load_verify_locations(cadata=opts.ca_pem)
            if opts.cert_pem and opts.key_pem:
                with tempfile.TemporaryDirectory() as d:  # ssl loads a chain only from files
                    cp, kp = Path(d) / "c.pem", Path(d) / "k.pem"
                    cp.write_text(opts.cert_pem)
                    kp.touch(0o600)
                    kp.write_text(opts.key_pem)
                    ctx.load_cert_chain(str(cp), str(kp))
        except (ssl.SSLError, ValueError) as exc:
            raise UserError(f"the site's broker CA / client certificate in the inventory is unusable: {exc}") from None
        c.tls_set_context(ctx)
    if opts.username:
        c.username_pw_set(opts.username, opts.password)
    return c


def connect_error(host: str, port: int, exc: BaseException) -> UserError:
    import ssl

    if isinstance(exc, ssl.SSLError):
        return UserError(f"MQTT broker {host}:{port}: TLS refused: {tls_reason(exc)} "
                         f"({getattr(exc, 'verify_message', None) or exc})")
    return UserError(f"MQTT broker {host}:{port}: {exc}")


CONNACK_WHY = {1: "protocol refused", 2: "client id refused", 3: "server unavailable",
               4: "login refused (bad user name or password)", 5: "login refused (not authorized)"}


def connect_paho(c, host: str, port: int, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """connect + loop_start, then wait for the CONNACK: UserError naming a refusal (TLS: expired
    certificate, unknown CA, hostname mismatch; login: CONNACK 4/5)."""
    got = threading.Event()
    res: list[Any] = []
    prev = c.on_connect

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        res.append(rc)
        got.set()
        if prev is not None:
            prev(client, userdata, flags, rc, props)

    def on_disconnect(client: Any, userdata: Any, flags: Any, rc: Any = None, props: Any = None) -> None:
        if not got.is_set():  # closed before any CONNACK: a TLS alert after the handshake (a
            res.append(None)  # client certificate required or refused), or the broker went away
            got.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    try:
        c.connect(host, port, keepalive=30)
    except OSError as exc:
        raise connect_error(host, port, exc) from None
    c.loop_start()
    if not got.wait(timeout):
        c.loop_stop()
        raise UserError(f"MQTT broker {host}:{port}: no CONNACK within {timeout:g} s")
    rc = res[0]
    if rc is None:
        c.loop_stop()
        why = "client certificate refused or missing" if c._ssl_context is not None else "connection closed"
        raise UserError(f"MQTT broker {host}:{port}: closed before CONNACK (TLS: {why}?)")
    if getattr(rc, "is_failure", False) or (isinstance(rc, int) and rc):
        c.loop_stop()
        val = getattr(rc, "value", rc)
        why = CONNACK_WHY.get(val, f"refused ({rc})")
        if val in (0x86, 0x87, 134, 135):  # paho maps 3.1.1 rc 4/5 onto MQTT 5 reason codes
            why = CONNACK_WHY[4 if val in (0x86, 134) else 5]
        raise UserError(f"MQTT broker {host}:{port}: {why}")


class _StateWatch:
    """paho-mqtt subscriber to the targets' state topics; keeps only states whose MAC verifies
    with the device's key (``forged`` counts the others)."""

    def __init__(self, host: str, port: int, topics: list[str], keys: dict[str, tuple[bytes, bytes]],
                 opts: BrokerOpts | None = None) -> None:
        import paho.mqtt.client as paho

        self.paho = paho
        self.keys = keys
        self.forged = 0
        self.cv = threading.Condition()
        self.state: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()
        self.c = paho_client("gridshed-cli-%d-%d" % (os.getpid(), int(time.time() * 1000) % 100000), opts, host)
        self.c.on_message = self._on
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        connect_paho(self.c, host, port)
        rc, _ = self.c.subscribe([(t, 1) for t in topics])
        if rc != 0 or not subscribed.wait(5):
            self.close()
            raise UserError(f"MQTT broker {host}:{port}: subscribe not acknowledged")

    def _on(self, client: Any, userdata: Any, m: Any) -> None:
        k = self.keys.get(m.topic)
        obj = verify_state(k[1], m.topic, bytes(m.payload), k[0]) if k else None
        if obj is None:  # not from the board (or from another key): never an answer
            with self.cv:
                self.forged += 1
            return
        with self.cv:
            self.state[m.topic] = obj
            self.seen.add(m.topic)
            self.cv.notify_all()

    def publish(self, topic: str, payload: bytes) -> Any:
        return self.c.publish(topic, payload, qos=1, retain=False)

    def close(self) -> None:
        try:
            self.c.loop_stop()
            self.c.disconnect()
        except Exception:
            pass


def state_topic(t: Target) -> str:
    return f"gridshed/{t.site}/{t.device}/state"


def send_mqtt(broker: str, signed: list[Signed], timeout: float = 10.0, settle: float = 1.5,
              opts: BrokerOpts | None = None) -> list[dict[str, Any]]:
    """Publish each command on its device's cmd topic (QoS 1) and wait for each board's
    retained state to carry the seq (accepted) or a new refusal."""
    opts = opts or (signed[0].target.broker if signed else None)
    host, port = parse_hostport(broker, 8883 if opts and opts.tls else 1883)  # MQTT over TLS: 8883
    for s in signed:
        if not s.target.site:
            raise UserError(f"device {s.target.device!r} has no site in the inventory: cannot address it over MQTT")
    topics = [state_topic(s.target) for s in signed]
    w = _StateWatch(host, port, topics, {state_topic(s.target): (s.target.kid, s.target.key) for s in signed},
                    opts)
    try:
        # the retained states first (a board that is offline says so in its last will)
        deadline = time.monotonic() + settle
        with w.cv:
            w.cv.wait_for(lambda: all(t in w.seen for t in topics), max(0.0, deadline - time.monotonic()))
        infos = []
        for s in signed:
            infos.append(w.publish(f"gridshed/{s.target.site}/{s.target.device}/cmd", s.msg))
        for i in infos:
            i.wait_for_publish(5)

        def answer(s: Signed, t: str) -> dict[str, Any] | None:
            st = w.state.get(t)
            if not st:
                return None
            if st.get("seq") == s.seq:
                return {"ok": True, "cmd": st.get("cmd"), "seq": s.seq, "state": st}
            # a refusal of this very message (its tag's last 4 bytes): not another's, in a flood
            if st.get("online") and st.get("refused") and st.get("rid") == s.msg[-4:].hex():
                return {"ok": False, "refused": st.get("refused"), "state": st}
            return None

        end = time.monotonic() + timeout
        with w.cv:
            w.cv.wait_for(lambda: all(answer(s, t) for s, t in zip(signed, topics)),
                          max(0.0, end - time.monotonic()))
            out = []
            for s, t in zip(signed, topics):
                a = answer(s, t)
                if a is None:
                    st = w.state.get(t)
                    if st is None:
                        why = "no state from the board (never connected to this broker?)"
                    elif st.get("online") is False:
                        why = "board offline (last will)"
                    else:
                        why = f"no answer within {timeout:g} s"
                    if w.forged:
                        why += f" ({w.forged} unauthenticated state message(s) ignored)"
                    a = {"ok": False, "error": why, "state": st}
                out.append(a)
            return out
    finally:
        w.close()
