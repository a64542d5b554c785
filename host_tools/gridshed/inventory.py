"""The provisioning inventory: which board has which key, firmware and config (SQLite).

Default location: ``<user data dir>/gridshed/inventory.sqlite`` (platformdirs), overridden by
``--inventory PATH`` or the environment variable ``GRIDSHED_INVENTORY``. Keys are stored here
(the host needs them to sign commands) but never printed unless asked (``--show-keys``).
Every provisioning is also appended to the ``history`` table (audit trail).
"""
from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from .errors import UserError

ENV = "GRIDSHED_INVENTORY"
SCHEMA_VERSION = 1
COLUMNS = ("device_id", "board", "site", "key_id", "firmware_build", "config_hash", "port",
           "provisioned_at", "last_seen")
SECRET = ("key",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id      TEXT PRIMARY KEY,
    board          TEXT NOT NULL,
    site           TEXT,
    key_id         TEXT NOT NULL,
    key            TEXT NOT NULL,
    firmware_build TEXT,
    config_hash    TEXT,
    port           TEXT,
    provisioned_at TEXT NOT NULL,
    last_seen      TEXT
);
CREATE TABLE IF NOT EXISTS broker_creds (
    device_id  TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    username   TEXT NOT NULL,
    password   TEXT,
    cert       TEXT,
    key        TEXT,
    issued_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sites (
    site          TEXT PRIMARY KEY,
    tls           INTEGER NOT NULL DEFAULT 0,
    auth          TEXT NOT NULL DEFAULT 'none',
    trust_ca      TEXT,
    server_name   TEXT,
    host_user     TEXT,
    host_password TEXT,
    host_cert     TEXT,
    host_key      TEXT,
    ca_cert       TEXT,
    ca_key        TEXT,
    updated_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_keys (
    device_id TEXT PRIMARY KEY,
    key_id    TEXT NOT NULL,
    key       TEXT NOT NULL,
    at        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    at        TEXT NOT NULL,
    action    TEXT NOT NULL,
    key_id    TEXT,
    firmware_build TEXT,
    config_hash    TEXT
);
CREATE TABLE IF NOT EXISTS schedules (
    device_id TEXT PRIMARY KEY,
    last_id   INTEGER NOT NULL,
    sent_at   TEXT NOT NULL,
    intervals INTEGER
);
"""


def default_path() -> Path:
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("gridshed", appauthor=False)) / "inventory.sqlite"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Inventory:
    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=10)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"inventory {self.path}: cannot open: {exc}") from None
        self.db.row_factory = sqlite3.Row
        try:
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.commit()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"inventory {self.path}: not a gridshed inventory ({exc})") from None
        try:
            os.chmod(self.path, 0o600)  # it holds keys
        except OSError:
            pass

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Inventory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes --------------------------------------------------------------------------
    def record_provision(self, device_id: str, board: str, site: str | None, key_id: str, key: bytes,
                         firmware_build: str | None, config_hash: str, port: str | None = None,
                         at: str | None = None) -> dict[str, Any]:
        at = at or now_iso()
        existed = self.get(device_id) is not None
        with self.db:
            self.db.execute(
                "INSERT INTO devices (device_id, board, site, key_id, key, firmware_build, config_hash, port,"
                " provisioned_at, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(device_id) DO UPDATE SET board=excluded.board, site=excluded.site,"
                " key_id=excluded.key_id, key=excluded.key, firmware_build=excluded.firmware_build,"
                " config_hash=excluded.config_hash, port=excluded.port,"
                " provisioned_at=excluded.provisioned_at, last_seen=excluded.last_seen",
                (device_id, board, site, key_id, key.hex(), firmware_build, config_hash, port, at, at))
            self.db.execute(
                "INSERT INTO history (device_id, at, action, key_id, firmware_build, config_hash)"
                " VALUES (?,?,?,?,?,?)",
                (device_id, at, "reprovision" if existed else "provision", key_id, firmware_build, config_hash))
        return self.get(device_id)  # type: ignore[return-value]

    def touch(self, device_id: str, at: str | None = None, firmware_build: str | None = None,
              config_hash: str | None = None) -> bool:
        """Update last-seen (and what the board reported); False when the device is unknown."""
        sets, vals = ["last_seen=?"], [at or now_iso()]
        if firmware_build:
            sets.append("firmware_build=?")
            vals.append(firmware_build)
        if config_hash:
            sets.append("config_hash=?")
            vals.append(config_hash)
        with self.db:
            cur = self.db.execute(f"UPDATE devices SET {', '.join(sets)} WHERE device_id=?", (*vals, device_id))
        return cur.rowcount > 0

    def remove(self, device_id: str) -> bool:
        with self.db:
            cur = self.db.execute("DELETE FROM devices WHERE device_id=?", (device_id,))
            if cur.rowcount:
                self.db.execute("INSERT INTO history (device_id, at, action) VALUES (?,?,?)",
                                (device_id, now_iso(), "remove"))
        return cur.rowcount > 0

    # ---- broker credentials, site broker settings, key rotation (docs/mqtt.md) -----------
    def set_broker_creds(self, device_id: str, kind: str, username: str, password: str | None = None,
                         cert: str | None = None, key: str | None = None) -> None:
        at = now_iso()
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO broker_creds (device_id, kind, username, password, cert, key, issued_at)"
                " VALUES (?,?,?,?,?,?,?)", (device_id, kind, username, password, cert, key, at))
            self.db.execute("INSERT INTO history (device_id, at, action) VALUES (?,?,?)",
                            (device_id, at, "broker-creds:" + kind))

    def broker_creds(self, device_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM broker_creds WHERE device_id=?", (device_id,)).fetchone()
        return dict(row) if row else None

    def site(self, site: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM sites WHERE site=?", (site,)).fetchone()
        return dict(row) if row else None

    def set_site(self, site: str, **fields: Any) -> dict[str, Any]:
        """Create or update a site's broker settings (columns of the sites table)."""
        cols = ("tls", "auth", "trust_ca", "server_name", "host_user", "host_password", "host_cert",
                "host_key", "ca_cert", "ca_key")
        bad = set(fields) - set(cols)
        if bad:
            raise ValueError(f"unknown site fields {sorted(bad)}")
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO sites (site, updated_at) VALUES (?,?)", (site, now_iso()))
            for k, v in fields.items():
                self.db.execute(f"UPDATE sites SET {k}=?, updated_at=? WHERE site=?", (v, now_iso(), site))
        return self.site(site)  # type: ignore[return-value]

    def set_pending_key(self, device_id: str, key_id: str, key: bytes) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO pending_keys (device_id, key_id, key, at) VALUES (?,?,?,?)",
                            (device_id, key_id, key.hex(), now_iso()))

    def pending_key(self, device_id: str) -> tuple[bytes, bytes] | None:
        row = self.db.execute("SELECT key_id, key FROM pending_keys WHERE device_id=?", (device_id,)).fetchone()
        return (bytes.fromhex(row["key_id"]), bytes.fromhex(row["key"])) if row else None

    def commit_key(self, device_id: str, key_id: str, key: bytes, action: str = "rotate-key") -> None:
        """The device's key is now (key_id, key); any pending key is dropped."""
        at = now_iso()
        with self.db:
            self.db.execute("UPDATE devices SET key_id=?, key=? WHERE device_id=?", (key_id, key.hex(), device_id))
            self.db.execute("DELETE FROM pending_keys WHERE device_id=?", (device_id,))
            self.db.execute("INSERT INTO history (device_id, at, action, key_id) VALUES (?,?,?,?)",
                            (device_id, at, action, key_id))

    def next_schedule_id(self, device_id: str, at_least: int = 0, intervals: int | None = None) -> int:
        """Reserve the device's next schedule id: max(last + 1, at_least), written before it is
        returned (gridshed dispatch; the board keeps the schedule with the highest id)."""
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                sid = self.peek_schedule_id(device_id, at_least)
                self.db.execute(
                    "INSERT INTO schedules (device_id, last_id, sent_at, intervals) VALUES (?,?,?,?)"
                    " ON CONFLICT(device_id) DO UPDATE SET last_id=excluded.last_id, sent_at=excluded.sent_at,"
                    " intervals=excluded.intervals", (device_id, sid, now_iso(), intervals))
        except sqlite3.Error as exc:
            raise UserError(f"inventory {self.path}: cannot record the schedule id: {exc}") from None
        return sid

    def peek_schedule_id(self, device_id: str, at_least: int = 0) -> int:
        """The id next_schedule_id would give now (nothing written)."""
        row = self.db.execute("SELECT last_id FROM schedules WHERE device_id=?", (device_id,)).fetchone()
        return max((row["last_id"] + 1) if row else 0, int(at_least))

    def schedule_info(self, device_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM schedules WHERE device_id=?", (device_id,)).fetchone()
        return dict(row) if row else None

    # ---- reads ---------------------------------------------------------------------------
    @staticmethod
    def _row(row: sqlite3.Row, show_key: bool) -> dict[str, Any]:
        d = {k: row[k] for k in COLUMNS}
        if show_key:
            d["key"] = row["key"]
        return d

    def get(self, device_id: str, show_key: bool = False) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM devices WHERE device_id=?", (device_id,)).fetchone()
        return self._row(row, show_key) if row else None

    def require(self, device_id: str, show_key: bool = False) -> dict[str, Any]:
        d = self.get(device_id, show_key)
        if d is None:
            raise UserError(f"device {device_id!r} is not in the inventory {self.path} "
                            "(see `gridshed inventory list`)")
        return d

    def key_for(self, device_id: str) -> tuple[bytes, bytes]:
        """(kid, key) for signing commands to a device."""
        row = self.db.execute("SELECT key_id, key FROM devices WHERE device_id=?", (device_id,)).fetchone()
        if row is None:
            raise UserError(f"device {device_id!r} is not in the inventory {self.path}")
        return bytes.fromhex(row["key_id"]), bytes.fromhex(row["key"])

    def list(self, site: str | None = None, show_key: bool = False) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM devices", ()
        if site:
            q, args = q + " WHERE site=?", (site,)
        return [self._row(r, show_key) for r in self.db.execute(q + " ORDER BY device_id", args)]

    def history(self, device_id: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM history", ()
        if device_id:
            q, args = q + " WHERE device_id=?", (device_id,)
        return [dict(r) for r in self.db.execute(q + " ORDER BY id", args)]

    def export(self, fmt: str = "json", show_key: bool = False, site: str | None = None) -> str:
        rows = self.list(site=site, show_key=show_key)
        if fmt == "json":
            doc: dict[str, Any] = {"inventory": str(self.path), "devices": rows}
            if show_key:  # the secure fleet channel's secrets: site CAs, host and device logins
                q, args = "SELECT * FROM sites", ()
                if site:
                    q, args = q + " WHERE site=?", (site,)
                doc["sites"] = [dict(r) for r in self.db.execute(q, args)]
                names = {r["device_id"] for r in rows}
                doc["broker_creds"] = [dict(r) for r in self.db.execute("SELECT * FROM broker_creds")
                                       if r["device_id"] in names]
            return json.dumps(doc, indent=1) + "\n"
        if fmt == "csv":
            buf = io.StringIO()
            cols = list(COLUMNS) + (["key"] if show_key else [])
            w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            return buf.getvalue()
        raise UserError(f"export format {fmt!r}: use json or csv")

    def import_json(self, text: str) -> int:
        """Merge an export made with --show-keys back in (round trip); returns the count."""
        try:
            data = json.loads(text)
            rows = data["devices"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"not a gridshed inventory export: {exc}") from None
        n = 0
        for r in rows:
            if "key" not in r:
                raise UserError(f"device {r.get('device_id')!r}: export has no key (export with --show-keys)")
            self.record_provision(r["device_id"], r["board"], r.get("site"), r["key_id"], bytes.fromhex(r["key"]),
                                  r.get("firmware_build"), r.get("config_hash") or "", r.get("port"),
                                  at=r.get("provisioned_at"))
            if r.get("last_seen"):
                self.touch(r["device_id"], at=r["last_seen"])
            n += 1
        try:
            for srow in data.get("sites") or []:
                self.set_site(srow["site"], **{k: v for k, v in srow.items() if k not in ("site", "updated_at")})
            for c in data.get("broker_creds") or []:
                self.set_broker_creds(c["device_id"], c["kind"], c["username"], c.get("password"), c.get("cert"),
                                      c.get("key"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"not a gridshed inventory export (sites / broker_creds): {exc}") from None
        return n
