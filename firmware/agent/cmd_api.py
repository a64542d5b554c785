"""Signed command policy on the board (pure; MicroPython and CPython).

A command is a COSE_Mac0 (see agent.cmd_cose) whose payload is a CBOR map:

    {"cmd": "shed"|"restore"|"arm"|"disarm"|"test"|"status",
     "seq": uint (strictly increasing per kid),
     "exp": int unix seconds (checked once the board trusts its clock),
     "dev": device id (str) and/or "site": site id (str),
     optional "kw": number >= 0 (partial shed target), "blocks": [name (str) or index (int)],
     "iss": issuer label (str, its own shed entry), "all": true (restore every issuer's shed),
     "nonce": the board's current nonce (bytes), "t": unix seconds (the "time" command)}

``CommandVerifier.verify`` returns the accepted command as a dict or raises
``CommandRefused(reason)``. Checks run in this order, the first failure wins:

1. ``malformed``    too long, not a COSE_Mac0 with HMAC 256/256 (a wrong alg counts here)
2. ``unknown-kid``  kid missing or not provisioned
3. ``bad-mac``      tag does not verify
4. ``malformed``    payload not a CBOR map; cmd/seq/exp missing; seq not a uint; exp not an
                    int; no target; dev/site/kw/blocks of the wrong type or range
5. ``bad-cmd``      "cmd" not one of COMMANDS
6. ``wrong-target`` "dev" (if present) is not this device or "site" (if present) is not this site
7. ``expired``      now_unix is known (the board's trusted clock) and now_unix > exp
8. ``replay``       seq <= the highest seq accepted so far for this kid
9. ``stale``        a "nonce" that is not the board's current one; or a command of FRESH
                    (restore, disarm, time) without a nonce while the clock is not trusted
                    ("time" always needs the nonce)
10. ``store-error`` the seq store could not be read at boot or written now (fail closed)

Payload checks (4-8) run only on authenticated payloads. The new high-water mark is
written to the store BEFORE the command is returned, so a reboot can never make an
accepted command acceptable again. Unknown payload keys are ignored (not returned).
Each call increments exactly one entry of ``counters`` ("accepted" or a reason); an internal
error is refused as ``malformed``. ``last_refusal`` is the last reason. No relay logic lives
here.

The checks are the code the board runs, agent.cmd_mac0.verify (COSE_Mac0) then agent.cmd_check.check
(the rest), each loaded for its step of a command and freed after it (Agent.signed_command);
this module is their API for host tools and tests.
"""
from agent import cmd_check as cmdcheck
from agent import cmd_run as cmdrun
from agent import cmd_mac0 as mac0
from agent.compat import const

COMMANDS = cmdcheck.COMMANDS
FRESH = cmdcheck.FRESH
REASONS = ("malformed", "unknown-kid", "bad-mac", "bad-cmd", "wrong-target", "expired", "replay",
           "stale", "store-error")

MAX_COMMAND_LEN = const(512)
MAX_BLOCKS = const(32)


class CommandRefused(ValueError):
    """A command was refused; ``reason`` is one of REASONS, ``detail`` is for logs."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


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
    File format: CBOR ``{"v": 1, "seq": {kid: seq}}``. Code: agent.cmd_check.load and
    agent.cmd_run.save (the board's).
    """

    def __init__(self, path):
        self.path = path
        self.tmp = path + ".tmp"

    @staticmethod
    def _parse(data):
        return cmdcheck.parse(data)

    def load(self):
        return cmdcheck.load(self.path)

    def save(self, data):
        cmdrun.save(self.path, data)


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

    def verify(self, buf, now_unix=None, nonce=None):
        """Return the accepted command dict, or raise CommandRefused(reason).

        now_unix: the board's trusted time or None; nonce: the board's current nonce."""
        c = cmdcheck.check(mac0.verify(buf, self.keys, self.max_len), self.device_id, self.site_id,
                           now_unix, self._hwm if self.store_ok else None, self.store.save, nonce)
        if isinstance(c, str):
            self.counters[c] += 1
            self.last_refusal = c
            raise CommandRefused(c)
        self.counters["accepted"] += 1
        return c
