"""Host side of signed commands: keys, command building, seq bookkeeping.

Commands are built with the very same codec the board verifies with (agent.cbor, agent.cmd_cose),
so there is one implementation of the wire format. See docs/security.md.
"""
from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path

from agent import cbor
from agent import cmd_cose as cose
from agent.cmd_api import COMMANDS

from gridshed.errors import UserError

KEY_LEN = 32


def new_key() -> bytes:
    """A fresh 32-byte HMAC-SHA256 key from the OS CSPRNG."""
    return secrets.token_bytes(KEY_LEN)


def build_payload(cmd: str, seq: int, exp: int, target_device: str | None = None,
                  target_site: str | None = None, kw: float | None = None,
                  blocks: list[str | int] | None = None, iss: str | None = None,
                  all_: bool = False, nonce: bytes | None = None, t: int | None = None,
                  schedule: dict | None = None) -> dict:
    """The command payload map, keys always in the same order (deterministic bytes).

    ``iss``: the signer's issuer label (its own entry on the board, e.g. "openadr");
    ``all_``: a restore of every issuer's shed (the board's authority.restore_all decides);
    ``nonce``: the board's current nonce (freshness before the board trusts its clock);
    ``t``: the host's unix time (the ``time`` command). docs/security.md.
    ``schedule``: {"sid": int, "iv": [[start, end, "p"|"kw", value], ...]} for the ``schedule``
    command (docs/market.md); the board checks the intervals."""
    if cmd not in COMMANDS:
        raise UserError(f"unknown command {cmd!r} (one of: {', '.join(COMMANDS)})")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**64:
        raise UserError(f"seq must be an unsigned 64-bit int, got {seq!r}")
    if target_device is None and target_site is None:
        raise UserError("a command needs a target: a device id or a site id")
    payload: dict = {"cmd": cmd, "seq": seq, "exp": int(exp)}
    if target_device is not None:
        payload["dev"] = str(target_device)
    if target_site is not None:
        payload["site"] = str(target_site)
    if kw is not None:
        if isinstance(kw, bool) or not isinstance(kw, (int, float)) or not 0 <= kw < 1e9:
            raise UserError(f"kw must be a number >= 0, got {kw!r}")
        payload["kw"] = kw
    if blocks is not None:
        payload["blocks"] = list(blocks)
    if iss is not None:
        if not isinstance(iss, str) or not 0 < len(iss) <= 16 or "#" in iss:
            raise UserError(f"issuer label must be 1..16 characters without '#', got {iss!r}")
        payload["iss"] = iss
    if all_:
        if cmd != "restore":
            raise UserError("--all only applies to restore")
        payload["all"] = True
    if nonce is not None:
        payload["nonce"] = bytes(nonce)
    if t is not None:
        payload["t"] = int(t)
    if schedule is not None and cmd != "schedule":
        raise UserError("a schedule goes with the schedule command only")
    if schedule is not None:
        sid, iv, ts = schedule.get("sid"), schedule.get("iv", [] if "ts" in schedule else None), schedule.get("ts")
        if isinstance(sid, bool) or not isinstance(sid, int) or not 0 <= sid < 2**31 or not isinstance(iv, list):
            raise UserError("schedule: need sid (0 <= int < 2**31) and iv (a list of [start, end, \"p\"|\"kw\", value]) "
                            "and/or ts ([t0, dt, \"pc\"|\"kw\", [values]])")
        payload["sid"] = sid
        if ts is not None:
            payload["ts"] = ts
        payload["iv"] = [list(x) for x in iv]
    return payload


def make_command(key: bytes, kid: bytes, cmd: str, seq: int, target_device: str | None = None,
                 target_site: str | None = None, kw: float | None = None, expires_s: float = 60,
                 now: float | None = None, blocks: list[str | int] | None = None,
                 tagged: bool = True, iss: str | None = None, all_: bool = False,
                 nonce: bytes | None = None, t: int | None = None, schedule: dict | None = None) -> bytes:
    """A signed command (tagged COSE_Mac0 bytes) ready for any transport.

    ``exp`` = int(now + expires_s) with ``now`` defaulting to the host clock.
    """
    if isinstance(kid, str):
        kid = kid.encode()
    if now is None:
        now = time.time()
    payload = build_payload(cmd, seq, int(now + expires_s), target_device, target_site, kw, blocks,
                            iss=iss, all_=all_, nonce=nonce, t=t, schedule=schedule)
    return cose.mac0_create(key, kid, cbor.dumps(payload), tagged=tagged)


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX host
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


class SeqCounter:
    """Last used seq per kid in a JSON file ({"kid-hex": seq}), so the CLI never reuses one.

    ``next(kid)`` reserves and returns max(last + 1, at_least) and writes the file (atomic
    replace, fsync) before returning, under an exclusive lock so two CLI processes never get
    the same seq. Passing ``at_least=int(time.time())`` keeps seqs increasing even if this
    file is lost (the board refuses seq <= its high-water mark as a replay).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()

    def _read(self) -> dict[str, int]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{self.path}: corrupt seq file ({e}); fix it or pass a higher seq") from e
        if not isinstance(data, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data.values()):
            raise UserError(f"{self.path}: corrupt seq file (expected {{kid-hex: int}})")
        return data

    def last(self, kid: bytes) -> int:
        """Last seq used for ``kid``, or -1."""
        return self._read().get(kid.hex(), -1)

    def next(self, kid: bytes, at_least: int = 0) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock(fd)
            data = self._read()
            seq = max(data.get(kid.hex(), -1) + 1, at_least)
            data[kid.hex()] = seq
            tmp = tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=self.path.name,
                                              suffix=".tmp", delete=False)
            try:
                with tmp:
                    json.dump(data, tmp, indent=1, sort_keys=True)
                    tmp.flush()
                    os.fsync(tmp.fileno())
                os.replace(tmp.name, self.path)
            except BaseException:
                Path(tmp.name).unlink(missing_ok=True)
                raise
            return seq
        finally:
            os.close(fd)  # releases the lock
