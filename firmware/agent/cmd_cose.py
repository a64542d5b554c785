"""COSE_Mac0 (RFC 9052) with HMAC 256/256 (alg 5); MicroPython and CPython.

Message: ``17([protected: bstr .cbor {1: 5}, unprotected: {4: kid}, payload: bstr, tag: bstr])``
(the tag 17 is optional on input). The MAC is HMAC-SHA256 over
``["MAC0", protected (the received bytes), external_aad = b"", payload]`` in CBOR, full 32 bytes.

Verification rules (anything else is refused with ``CoseError(reason)``):
- ``malformed``: not CBOR, longer than MAX_MESSAGE, not a 4-element array (optionally
  tag 17), wrong field types, detached (nil) payload, protected header not a CBOR map, a
  label in both header buckets, a ``crit`` header (no critical extensions are supported),
  kid not a byte string, tag not 32 bytes.
- ``bad-alg``: alg missing from the protected header, not 5, or (also) in the unprotected one.
- ``unknown-kid``: no kid, or kid not in ``keys``.
- ``bad-mac``: the tag does not match (constant-time compare).
The kid is taken from the unprotected header (label 4), or from the protected header.

The checks and the MAC are agent.cmd_mac0's, the code the board runs (it loads only that module to
verify a command's COSE_Mac0); this module is their API for host tools and tests, plus
``mac0_create``. An internal error is refused as ``malformed``.
"""
from agent import cbor
from agent import cmd_mac0 as _m
from agent.compat import const

ALG_HMAC_256_256 = const(5)
HDR_ALG = const(1)
HDR_CRIT = const(2)
HDR_KID = const(4)
COSE_MAC0_TAG = const(17)
TAG_LEN = const(32)
MAX_MESSAGE = const(4096)

PROTECTED_HMAC256 = b"\xa1\x01\x05"  # CBOR of {1: 5}

compare_digest = _m.compare_digest  # constant-time equality for equal-length byte strings


class CoseError(ValueError):
    """A COSE message was refused; ``reason`` is a short stable string (see module doc)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason


def hmac_sha256(key, msg):
    """HMAC-SHA256 (RFC 2104) over hashlib.sha256; MicroPython has no hmac module."""
    return _m.hmac_sha256(key, (msg,))


def mac0_create(key, kid, payload, tagged=True):
    """Build a COSE_Mac0 message (bytes) authenticating ``payload`` with ``key``."""
    if not isinstance(kid, (bytes, bytearray)) or not isinstance(payload, (bytes, bytearray)):
        raise TypeError("kid and payload must be bytes")
    payload = bytes(payload)
    tag = _m.tag(key, PROTECTED_HMAC256, payload)
    msg = [PROTECTED_HMAC256, {HDR_KID: bytes(kid)}, payload, tag]
    if tagged:
        msg = cbor.Tag(COSE_MAC0_TAG, msg)
    return cbor.dumps(msg)


def mac0_verify(buf, keys):
    """Verify a COSE_Mac0 message; return ``(kid, payload)`` or raise CoseError.

    ``keys`` maps kid (bytes) -> key (bytes).
    """
    r = _m.verify(buf, keys, MAX_MESSAGE)
    if isinstance(r, str):
        raise CoseError(r)
    return r
