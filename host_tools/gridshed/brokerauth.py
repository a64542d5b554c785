"""Broker credentials for the secure fleet channel (docs/mqtt.md "Securing the broker").

Made with the `cryptography` package, nothing by hand:

* a site CA (EC P-256, self-signed) that signs the broker's server certificate and, for mutual
  TLS, each board's client certificate (:func:`make_ca`, :func:`issue_cert`);
* Mosquitto password-file lines in the PBKDF2-SHA512 format Mosquitto 2 writes itself
  (``user:$7$<iterations>$<salt b64>$<hash b64>``, :func:`passwd_line`);
* the ACL (:func:`acl_text`): a device publishes only its own ``state`` and ``telemetry`` and
  reads only its own and its site's ``cmd``; the site's host user reads every state and
  telemetry of the site and publishes its ``cmd`` topics; nobody else gets anything.

The topic layout is docs/mqtt.md's: ``gridshed/<site>/<device>/{cmd,state,telemetry}`` and
``gridshed/<site>/cmd``.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import ipaddress
import secrets
from pathlib import Path
from typing import Iterable

from .errors import UserError

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
HOST_USER = "gridshed-host"
_BAD = set("/+#\x00: \t\n\r")


def check_name(what: str, name: str) -> str:
    if not name or any(ch in _BAD for ch in name):
        raise UserError(f"{what} {name!r}: must be non-empty without / + # : NUL or spaces")
    return name


def new_password() -> str:
    return secrets.token_urlsafe(24)


def passwd_line(user: str, password: str, salt: bytes | None = None,
                iterations: int = PBKDF2_ITERATIONS) -> str:
    """One Mosquitto password-file line (PBKDF2-SHA512, as `mosquitto_passwd` 2.0 makes it)."""
    check_name("user", user)
    salt = salt if salt is not None else secrets.token_bytes(12)
    h = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return "%s:$7$%d$%s$%s" % (user, iterations, base64.b64encode(salt).decode(), base64.b64encode(h).decode())


def acl_text(sites: dict[str, list[str]], host_user: dict[str, str] | None = None) -> str:
    """A Mosquitto ACL file: {site: [device, ...]}; host_user: {site: user name}."""
    out = ["# gridshed broker ACL (gridshed broker-config): a device publishes only its own state",
           "# and telemetry and reads only its own and its site's cmd topics.", ""]
    for site in sorted(sites):
        check_name("site", site)
        hu = (host_user or {}).get(site) or HOST_USER
        out += [f"user {check_name('user', hu)}",
                f"topic read gridshed/{site}/+/state",
                f"topic read gridshed/{site}/+/telemetry",
                f"topic write gridshed/{site}/+/cmd",
                f"topic write gridshed/{site}/cmd", ""]
        for dev in sorted(sites[site]):
            check_name("device", dev)
            out += [f"user {dev}",
                    f"topic write gridshed/{site}/{dev}/state",
                    f"topic write gridshed/{site}/{dev}/telemetry",
                    f"topic read gridshed/{site}/{dev}/cmd",
                    f"topic read gridshed/{site}/cmd", ""]
    return "\n".join(out)


# ---- certificates ---------------------------------------------------------------------------
def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _name(cn: str):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


# Certificates gridshed issues are valid from 2000-01-01: mbedTLS on a board checks the validity
# period against the board's clock, which on an MCU without NTP or a battery RTC starts in 2000
# (ESP32) or 2021 (RP2040) until set; a notBefore of "now" would make every board refuse the
# broker as "not yet valid" after each power cycle. Expiry is still checked (docs/mqtt.md).
VALID_FROM = _dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc)


def make_ca(cn: str, days: int = 3650) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a new self-signed site CA (EC P-256), valid from
    VALID_FROM for `days` from now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key_pem = new_key_pem()
    key = serialization.load_pem_private_key(key_pem, None)
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(VALID_FROM).not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def issue_cert(ca_cert_pem: bytes, ca_key_pem: bytes, cn: str, sans: Iterable[str] = (), server: bool = True,
               days: int = 825, not_before: _dt.datetime | None = None,
               not_after: _dt.datetime | None = None) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) signed by the CA, valid from VALID_FROM (or not_before)
    for `days` from now (or until not_after). sans: DNS names or IP literals (server
    certificates); server=False makes a client certificate (CN = the broker user name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    key_pem = new_key_pem()
    key = serialization.load_pem_private_key(key_pem, None)
    nb = not_before or VALID_FROM
    na = not_after or _now() + _dt.timedelta(days=days)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(nb).not_valid_after(na)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    alt: list[x509.GeneralName] = []
    for s in sans:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            alt.append(x509.DNSName(s))
    if alt:
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def pem_to_der(pem: bytes) -> bytes:
    """The DER of a PEM certificate or private key (what the board loads: smaller, no parser)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if b"PRIVATE KEY" in pem:
        k = serialization.load_pem_private_key(pem, None)
        return k.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                               serialization.NoEncryption())
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def cert_info(pem: bytes) -> dict[str, str]:
    from cryptography import x509

    c = x509.load_pem_x509_certificate(pem)
    return {"subject": c.subject.rfc4514_string(), "not_after": c.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}


def mosquitto_conf(port: int, files: dict[str, str], tls: bool = True, client_certs: bool = False,
                   bind: str = "") -> str:
    """A listener block for mosquitto.conf (files: passwd, acl, and for TLS ca, cert, key)."""
    lines = ["per_listener_settings false", "allow_anonymous false",
             f"password_file {files['passwd']}", f"acl_file {files['acl']}",
             f"listener {port}" + (f" {bind}" if bind else "")]
    if tls:
        lines += [f"cafile {files['ca']}", f"certfile {files['cert']}", f"keyfile {files['key']}",
                  "tls_version tlsv1.2"]
        if client_certs:
            # a board with a client certificate logs in as its CN (= its device id, the ACL's user)
            lines += ["require_certificate true", "use_identity_as_username true"]
    return "\n".join(lines) + "\n"


# ---- the site's broker setup in the inventory ------------------------------------------------
BROKER_FILE = "broker.cbor"


def record_site(inv, site: str, mqtt: dict, base_dir: Path | None = None) -> dict:  # type: ignore[no-untyped-def]
    """Record a site's [mqtt] security settings in the inventory (what the host's fleet commands
    use to reach the broker) and make what they need once: the site CA (TLS or client
    certificates), the host user's password or client certificate. Returns the site row."""
    check_name("site", site)
    tls = bool(mqtt.get("tls"))
    auth = mqtt.get("auth") or "none"
    row = inv.site(site) or {}
    fields: dict = {"tls": int(tls), "auth": auth, "server_name": mqtt.get("server_name") or None,
                    "host_user": check_name("username", mqtt.get("username") or HOST_USER)}
    if (tls or auth == "cert") and not row.get("ca_cert"):
        fields["ca_cert"], fields["ca_key"] = (x.decode() for x in make_ca(f"gridshed site CA {site}"))
    ca = mqtt.get("ca") or ""
    if ca:
        p = Path(ca).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        try:
            pem = p.read_bytes()
            from cryptography import x509

            x509.load_pem_x509_certificates(pem)
        except OSError as exc:
            raise UserError(f"mqtt.ca: cannot read {p}: {exc}") from None
        except ValueError as exc:
            raise UserError(f"mqtt.ca: {p} is not a PEM certificate: {exc}") from None
        fields["trust_ca"] = pem.decode()
    else:
        fields["trust_ca"] = None  # the site CA (broker-config issues the broker's certificate)
    if auth == "password" and not row.get("host_password"):
        fields["host_password"] = new_password()
    site_row = inv.set_site(site, **fields)
    if auth == "cert" and (not row.get("host_cert") or row.get("host_user") != fields["host_user"]):
        cert, key = issue_cert(site_row["ca_cert"].encode(), site_row["ca_key"].encode(), fields["host_user"],
                               server=False)
        site_row = inv.set_site(site, host_cert=cert.decode(), host_key=key.decode())
    return site_row


def issue_device(inv, device: str, site_row: dict) -> dict | None:  # type: ignore[no-untyped-def]
    """New broker credentials for a device (auth password: a random password; cert: a client
    certificate with CN = the device id from the site CA), recorded in the inventory."""
    auth = site_row.get("auth") or "none"
    check_name("device", device)
    if auth == "password":
        inv.set_broker_creds(device, "password", device, password=new_password())
    elif auth == "cert":
        cert, key = issue_cert(site_row["ca_cert"].encode(), site_row["ca_key"].encode(), device, server=False)
        inv.set_broker_creds(device, "cert", device, cert=cert.decode(), key=key.decode())
    else:
        return None
    return inv.broker_creds(device)


def board_file(site_row: dict | None, creds: dict | None) -> bytes | None:
    """The /broker.cbor bytes (integrity-wrapped CBOR: ca, user, pass, cert, key; DER), or None
    when the site's broker needs neither TLS nor a login."""
    from agent import cbor, integrity

    if not site_row or (not site_row.get("tls") and not creds):
        return None
    d: dict = {}
    if site_row.get("tls"):
        trust = site_row.get("trust_ca") or site_row.get("ca_cert")
        d["ca"] = pem_to_der(trust.encode())
    if creds:
        d["user"] = creds["username"]
        if creds.get("password"):
            d["pass"] = creds["password"]
        if creds.get("cert"):
            d["cert"] = pem_to_der(creds["cert"].encode())
            d["key"] = pem_to_der(creds["key"].encode())
    return integrity.wrap(cbor.dumps(d))


def broker_config(inv, site: str, out_dir: Path, port: int = 8883, bind: str = "",  # type: ignore[no-untyped-def]
                  server_names: Iterable[str] = ()) -> dict:
    """Write the site's Mosquitto files into out_dir: passwd (the host user and every device of
    the site with credentials), acl, and with TLS ca.crt plus a server certificate for
    server_names issued by the site CA (unless the site trusts another CA), and mosquitto.conf."""
    row = inv.site(site)
    if not row:
        raise UserError(f"site {site!r} has no broker settings in the inventory {inv.path}: "
                        "give --site-config site.toml (its [mqtt] section) once")
    if (row.get("auth") or "none") == "none":
        raise UserError(f"site {site!r}: [mqtt] auth = \"none\": no login to configure "
                        "(set auth = \"password\" or \"cert\")")
    devices = [r["device_id"] for r in inv.list(site=site)]
    missing = [d for d in devices if not inv.broker_creds(d)]
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: str | bytes, secret: bool = False) -> str:
        p = out_dir / name
        if secret:
            p.touch(0o600)
            p.chmod(0o600)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(p.resolve())

    files: dict[str, str] = {}
    lines = []
    if row["auth"] == "password":
        lines.append(passwd_line(row["host_user"], row["host_password"]))
    for d in devices:
        c = inv.broker_creds(d)
        if c and c.get("password"):
            lines.append(passwd_line(c["username"], c["password"]))
    files["passwd"] = write("passwd", "".join(x + "\n" for x in lines), secret=True)
    files["acl"] = write("acl", acl_text({site: devices}, {site: row["host_user"]}))
    warnings = [f"device {d!r} has no broker credentials: provision it again" for d in missing]
    if row.get("tls"):
        files["ca"] = write("ca.crt", row["ca_cert"])
        names = list(server_names) or [x for x in (row.get("server_name"),) if x]
        if not names:
            raise UserError("give --server-name NAME (the broker's host name or address the boards dial)")
        cert, key = issue_cert(row["ca_cert"].encode(), row["ca_key"].encode(), names[0], sans=names)
        files["cert"] = write("server.crt", cert)
        files["key"] = write("server.key", key, secret=True)
        if row.get("trust_ca"):
            warnings.append("the site trusts its own CA (mqtt.ca): use that CA's server certificate; "
                            "server.crt here is signed by the site CA")
    files["conf"] = write("mosquitto.conf", mosquitto_conf(port, files, tls=bool(row.get("tls")),
                                                            client_certs=row["auth"] == "cert", bind=bind))
    return {"site": site, "dir": str(out_dir.resolve()), "files": files, "devices": devices, "warnings": warnings}
