# Secure fleet channel on the board (docs/mqtt.md "Securing the broker"): TLS to the broker,
# its certificate checked against the CA provisioned in /broker.cbor and the configured name
# (server_name, default host), an optional client certificate, the MQTT login; every refused
# connection named (expired certificate, unknown CA, hostname mismatch, refused login), counted,
# journaled once per change and shown in @status, then the client's back-off.
#
# The handshake's public-key steps run in one go each (mbedTLS): on an MCU a step can take a
# large part of a second, so a TLS connection is attempted only while the site is steady
# (steady() below): never while a trip may be pending. Nothing here touches a relay.
# Comments, not docstrings: this module is compiled from source on small boards.
from agent import control

BROKER_PATH = "broker.cbor"

# failure names (counter "mqtt_<name>", journal record "mqtt_fail", @status mqtt "fail")
EXPIRED = "tls-expired"
NOT_YET = "tls-not-yet-valid"
UNKNOWN_CA = "tls-unknown-ca"
HOSTNAME = "tls-hostname"
TLS_OTHER = "tls-error"
LOGIN = "login-refused"
NO_CREDS = "no-credentials"
NO_TLS = "no-tls"  # the firmware has no ssl module


def client_kw(f, m):
    # MqttClient's keyword arguments for the fleet channel f (agent/fleet.py) of a site with TLS
    # or a login: never a connection in clear when they cannot be had
    kw, why = options(m, f.dev)
    if why is not None:  # TLS or a login asked for and not provisioned: never in clear
        kw = {"may_connect": lambda: False}
        on_fail(f, why)
    elif m.get("tls"):
        kw["may_connect"] = lambda: steady(f.a)
    kw["on_fail"] = lambda e: on_fail(f, e)
    return kw


def on_fail(f, e):
    # a connection refused for a reason worth naming: counted, journaled when it changes
    why = e if isinstance(e, str) else reason(e)
    if why is None:
        return False
    a = f.a
    a.count("mqtt_" + why)
    if why != f.fail:
        a.journal.append("mqtt_fail", {"why": why})
        print("W mqtt: connection refused: %s" % why)
    f.fail = why
    return True


def options(m, dev):
    # (keyword arguments for MqttClient, None) or (None, NO_CREDS) when the site asks for TLS or a
    # login and /broker.cbor cannot give it, (None, NO_TLS) when the port has no ssl module: the
    # board then never connects (never in clear)
    auth = m.get("auth") or "none"
    tls = m.get("tls")
    if not tls and auth == "none":
        return {}, None
    from agent.base import read_cbor

    try:
        b = read_cbor(BROKER_PATH)
    except Exception:
        b = None
    if not isinstance(b, dict):
        return None, NO_CREDS
    kw = {}
    if auth == "password":
        u = b.get("user") or dev
        p = b.get("pass")
        if not (isinstance(p, str) and p and isinstance(u, str) and len(u) + len(p) < 512):
            return None, NO_CREDS  # (a damaged or hostile file: never a crash, never in clear)
        kw["username"] = u
        kw["password"] = p
    if tls:
        ca = b.get("ca")
        if not isinstance(ca, (bytes, bytearray)) or not ca:
            return None, NO_CREDS
        if auth == "cert" and not (isinstance(b.get("cert"), (bytes, bytearray)) and isinstance(b.get("key"), (bytes, bytearray))):
            return None, NO_CREDS
        try:
            import ssl
        except ImportError:  # a port built without TLS: never in clear either
            return None, NO_TLS
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.verify_mode = ssl.CERT_REQUIRED  # type: ignore[attr-defined]  # (stubs lag the port)
        try:
            ctx.load_verify_locations(cadata=bytes(ca))
            if auth == "cert":
                ctx.load_cert_chain(bytes(b["cert"]), bytes(b["key"]))
        except Exception:
            return None, NO_CREDS
        kw["ssl"] = ctx
        kw["server_hostname"] = m.get("server_name") or m["host"]
    return kw, None


def reason(e):
    # the name of a connection failure, or None (a network error: not named)
    s = str(e.args[0]) if getattr(e, "args", None) else str(e)
    if isinstance(e, OSError) and s.startswith("CONNACK refused"):
        return LOGIN if s.endswith((": 4", ": 5")) else None
    if not isinstance(e, ValueError):
        return None
    # mbedTLS's verification text (one line per failed check)
    if "expired" in s:
        return EXPIRED
    if "future" in s:  # not yet valid: mostly the board's clock (unset RTC, no NTP)
        return NOT_YET
    if "Common Name" in s or "CN" in s or "hostname" in s:
        return HOSTNAME
    if "trusted CA" in s or "not correctly signed" in s or "CA" in s:
        return UNKNOWN_CA
    if "MBEDTLS" in s or "SSL" in s or "certificate" in s:
        return TLS_OTHER
    return None


def steady(a):
    # True when a TLS handshake may run: no trip can be pending behind it. Either every relay
    # block is open already (nothing left to trip), or the controller is normal / tripped /
    # disarmed (no pickup timer, no timed restore step) with a plausible meter reading at or
    # above the restore threshold (the frequency is where restoring would be allowed)
    c = a.ctrl
    st = c.state
    if st == control.TRIPPED and a.relays.mask == 0:
        return True
    if st not in (control.NORMAL, control.TRIPPED, control.DISARMED):
        return False
    hz = a.hz
    return bool(a.meter_ok) and not c.bad_why and hz is not None and hz >= c.restore_hz
