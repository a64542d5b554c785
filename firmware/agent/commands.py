"""Signed command policy on the board (pure; MicroPython and CPython).

A command is a COSE_Mac0 (see agent.cose) whose payload is a CBOR map:

    {"cmd": "shed"|"restore"|"arm"|"disarm"|"test"|"status",
     "seq": uint (strictly increasing per kid),
     "exp": int unix seconds (checked only when the board knows wall time),
     "dev": device id (str) and/or "site": site id (str),
     optional "kw": number >= 0 (partial shed target), "blocks": [name (str) or index (int)]}

``CommandVerifier.verify`` returns the accepted command as a dict or raises
``CommandRefused(reason)``. Checks run in this order, the first failure wins:

1. ``malformed``    too long, not a COSE_Mac0 with HMAC 256/256 (a wrong alg counts here)
2. ``unknown-kid``  kid missing or not provisioned
3. ``bad-mac``      tag does not verify
4. ``malformed``    payload not a CBOR map; cmd/seq/exp missing; seq not a uint; exp not an
                    int; no target; dev/site/kw/blocks of the wrong type or range
5. ``bad-cmd``      "cmd" not one of COMMANDS
6. ``wrong-target`` "dev" (if present) is not this device or "site" (if present) is not this site
7. ``expired``      now_unix is known and now_unix > exp
8. ``replay``       seq <= the highest seq accepted so far for this kid
9. ``store-error``  the seq store could not be read at boot or written now (fail closed)

Payload checks (4-8) run only on authenticated payloads. The new high-water mark is
written to the store BEFORE the command is returned, so a reboot can never make an
accepted command acceptable again. Unknown payload keys are ignored (not returned).
Each call increments exactly one entry of ``counters`` ("accepted" or a reason).
No relay logic lives here.
"""
import os

from agent import cbor
from agent import cose
from agent.compat import const

COMMANDS = ("shed", "restore", "arm", "disarm", "test", "status")
REASONS = ("malformed", "unknown-kid", "bad-mac", "bad-cmd", "wrong-target", "expired",
           "replay", "store-error")

MAX_COMMAND_LEN = const(512)
MAX_BLOCKS = const(32)
_UINT64_MAX = 0xFFFFFFFFFFFFFFFF
_STORE_VERSION = const(1)

_COSE_REASON = {"malformed": "malformed", "bad-alg": "malformed",
                "unknown-kid": "unknown-kid", "bad-mac": "bad-mac"}


class CommandRefused(ValueError):
    """A command was refused; ``reason`` is one of REASONS, ``detail`` is for logs."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class MemorySeqStore:
    """Seq store kept in RAM (tests, or boards without a filesystem: no reboot protection)."""

    def __init__(self, data=None):
        self.data = dict(data or {})
        self.saves = 0

    def load(self):
        return dict(self.data)

    def save(self, data):
        self.data = dict(data)
        self.saves += 1


class FileSeqStore:
    """Seq high-water marks {kid: seq} in a CBOR file, replaced atomically.

    save() writes ``path + ".tmp"``, flushes it and renames it over ``path`` (on a VFS whose
    rename refuses to replace, the old file is removed first; load() then finds the .tmp).
    load() reads both files and keeps the highest seq per kid; a missing store is empty, a
    corrupt one with no valid copy raises ValueError (the verifier then fails closed).
    """

    def __init__(self, path):
        self.path = path
        self.tmp = path + ".tmp"

    @staticmethod
    def _parse(data):
        obj = cbor.loads(data)
        if not isinstance(obj, dict) or obj.get("v") != _STORE_VERSION:
            raise ValueError("seq store: bad format")
        seqs = obj.get("seq")
        if not isinstance(seqs, dict):
            raise ValueError("seq store: bad format")
        for k in seqs:
            v = seqs[k]
            if not isinstance(k, bytes) or not _is_int(v) or v < 0:
                raise ValueError("seq store: bad entry")
        return seqs

    def load(self):
        best = None
        corrupt = False
        for p in (self.path, self.tmp):
            try:
                with open(p, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            try:
                seqs = self._parse(data)
            except ValueError:
                corrupt = corrupt or p == self.path
                continue
            if best is None:
                best = seqs
            else:
                for k in seqs:
                    if seqs[k] > best.get(k, -1):
                        best[k] = seqs[k]
        if best is None:
            if corrupt:
                raise ValueError("seq store corrupt: " + self.path)
            return {}
        return best

    def save(self, data):
        blob = cbor.dumps({"v": _STORE_VERSION, "seq": data})
        with open(self.tmp, "wb") as f:
            f.write(blob)
            f.flush()
            if hasattr(os, "fsync") and hasattr(f, "fileno"):
                os.fsync(f.fileno())
        try:
            os.rename(self.tmp, self.path)
        except OSError:
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.rename(self.tmp, self.path)
        if hasattr(os, "sync"):
            os.sync()


class CommandVerifier:
    """Checks signed commands for one device; see the module docstring for the rules.

    keys: {kid (bytes): key (bytes)}; store: object with load() -> dict and save(dict).
    """

    def __init__(self, keys, device_id, site_id, store, max_len=MAX_COMMAND_LEN):
        self.keys = keys
        self.device_id = device_id
        self.site_id = site_id
        self.store = store
        self.max_len = max_len
        self.counters = {"accepted": 0}
        for r in REASONS:
            self.counters[r] = 0
        self.last_refusal = None
        try:
            self._hwm = dict(store.load())
            self.store_ok = True
        except Exception as e:  # OSError, ValueError, anything: fail closed, never crash
            self._hwm = {}
            self.store_ok = False
            self.last_refusal = "store-error: " + str(e)

    def high_water(self, kid):
        """Highest seq accepted for ``kid`` (or -1)."""
        return self._hwm.get(kid, -1)

    def verify(self, buf, now_unix=None):
        """Return the accepted command dict, or raise CommandRefused(reason)."""
        try:
            cmd = self._verify(buf, now_unix)
        except CommandRefused as e:
            self.counters[e.reason] += 1
            self.last_refusal = str(e)
            raise
        except Exception as e:  # defence in depth: a bug must not crash the caller
            self.counters["malformed"] += 1
            self.last_refusal = "malformed: internal " + type(e).__name__
            raise CommandRefused("malformed", "internal " + type(e).__name__)
        self.counters["accepted"] += 1
        return cmd

    def _verify(self, buf, now_unix):
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise CommandRefused("malformed", "not bytes")
        if len(buf) > self.max_len:
            raise CommandRefused("malformed", "too long")
        try:
            kid, payload = cose.mac0_verify(buf, self.keys)
        except cose.CoseError as e:
            raise CommandRefused(_COSE_REASON.get(e.reason, "malformed"), str(e))

        # authenticated from here on
        try:
            p = cbor.loads(payload, 3)
        except ValueError as e:
            raise CommandRefused("malformed", "payload: " + str(e))
        if not isinstance(p, dict):
            raise CommandRefused("malformed", "payload not a map")
        name = p.get("cmd")
        seq = p.get("seq")
        exp = p.get("exp")
        if name is None or seq is None or exp is None:
            raise CommandRefused("malformed", "cmd, seq and exp are required")
        if not _is_int(seq) or seq < 0 or seq > _UINT64_MAX:
            raise CommandRefused("malformed", "seq")
        if not _is_int(exp):
            raise CommandRefused("malformed", "exp")
        dev = p.get("dev")
        site = p.get("site")
        if dev is None and site is None:
            raise CommandRefused("malformed", "no target")
        if (dev is not None and not isinstance(dev, str)) or (
                site is not None and not isinstance(site, str)):
            raise CommandRefused("malformed", "target")
        out = {"cmd": name, "seq": seq, "exp": exp, "kid": kid}
        if "kw" in p:
            kw = p["kw"]
            if not (isinstance(kw, (int, float)) and not isinstance(kw, bool)) or not (
                    0 <= kw < 1e9):
                raise CommandRefused("malformed", "kw")
            out["kw"] = kw
        if "blocks" in p:
            blocks = p["blocks"]
            if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
                raise CommandRefused("malformed", "blocks")
            for b in blocks:
                if not (isinstance(b, str) or (_is_int(b) and 0 <= b < 256)):
                    raise CommandRefused("malformed", "blocks")
            out["blocks"] = blocks
        if not isinstance(name, str) or name not in COMMANDS:
            raise CommandRefused("bad-cmd", repr(name)[:32])
        if dev is not None:
            if dev != self.device_id:
                raise CommandRefused("wrong-target", "dev")
            out["dev"] = dev
        if site is not None:
            if site != self.site_id:
                raise CommandRefused("wrong-target", "site")
            out["site"] = site
        if now_unix is not None and now_unix > exp:
            raise CommandRefused("expired")
        if seq <= self._hwm.get(kid, -1):
            raise CommandRefused("replay", "seq %d <= %d" % (seq, self._hwm.get(kid, -1)))
        if not self.store_ok:
            raise CommandRefused("store-error", "seq store unreadable at boot")
        new = dict(self._hwm)
        new[kid] = seq
        # Raise the in-memory mark first: even if the write fails, this seq is spent.
        self._hwm[kid] = seq
        try:
            self.store.save(new)
        except Exception as e:
            raise CommandRefused("store-error", type(e).__name__)
        return out
