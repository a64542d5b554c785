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
"""
import hashlib

from agent import cbor
from agent.compat import const

ALG_HMAC_256_256 = const(5)
HDR_ALG = const(1)
HDR_CRIT = const(2)
HDR_KID = const(4)
COSE_MAC0_TAG = const(17)
TAG_LEN = const(32)
MAX_MESSAGE = const(4096)

PROTECTED_HMAC256 = b"\xa1\x01\x05"  # CBOR of {1: 5}

_BLOCK = const(64)


class CoseError(ValueError):
    """A COSE message was refused; ``reason`` is a short stable string (see module doc)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason


def hmac_sha256(key, msg):
    """HMAC-SHA256 (RFC 2104) over hashlib.sha256; MicroPython has no hmac module."""
    key = bytes(key)
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key + bytes(_BLOCK - len(key))
    ipad = bytes([b ^ 0x36 for b in key])
    opad = bytes([b ^ 0x5C for b in key])
    inner = hashlib.sha256(ipad)
    inner.update(msg)
    outer = hashlib.sha256(opad)
    outer.update(inner.digest())
    return outer.digest()


def compare_digest(a, b):
    """Constant-time equality for equal-length byte strings (the length is not secret)."""
    if len(a) != len(b):
        return False
    acc = 0
    for i in range(len(a)):
        acc |= a[i] ^ b[i]
    return acc == 0


def _mac_structure(protected, payload, external_aad=b""):
    return cbor.dumps(["MAC0", protected, external_aad, payload])


def mac0_create(key, kid, payload, tagged=True):
    """Build a COSE_Mac0 message (bytes) authenticating ``payload`` with ``key``."""
    if not isinstance(kid, (bytes, bytearray)) or not isinstance(payload, (bytes, bytearray)):
        raise TypeError("kid and payload must be bytes")
    payload = bytes(payload)
    tag = hmac_sha256(key, _mac_structure(PROTECTED_HMAC256, payload))
    msg = [PROTECTED_HMAC256, {HDR_KID: bytes(kid)}, payload, tag]
    if tagged:
        msg = cbor.Tag(COSE_MAC0_TAG, msg)
    return cbor.dumps(msg)


def mac0_verify(buf, keys):
    """Verify a COSE_Mac0 message; return ``(kid, payload)`` or raise CoseError.

    ``keys`` maps kid (bytes) -> key (bytes).
    """
    if len(buf) > MAX_MESSAGE:
        raise CoseError("malformed", "too long")
    try:
        msg = cbor.loads(buf, 4)
    except ValueError as e:
        raise CoseError("malformed", str(e))
    if isinstance(msg, cbor.Tag):
        if msg.tag != COSE_MAC0_TAG:
            raise CoseError("malformed", "not a COSE_Mac0 tag")
        msg = msg.value
    if not isinstance(msg, list) or len(msg) != 4:
        raise CoseError("malformed", "not a 4-element array")
    protected, unprotected, payload, tag = msg
    if not isinstance(protected, bytes) or not isinstance(unprotected, dict):
        raise CoseError("malformed", "bad headers")
    if not isinstance(payload, bytes):
        raise CoseError("malformed", "payload missing or detached")
    if not isinstance(tag, bytes):
        raise CoseError("malformed", "bad tag")
    if protected:
        try:
            phdr = cbor.loads(protected, 2)
        except ValueError as e:
            raise CoseError("malformed", "protected header: " + str(e))
        if not isinstance(phdr, dict):
            raise CoseError("malformed", "protected header not a map")
    else:
        phdr = {}
    for label in phdr:
        if label in unprotected:
            raise CoseError("malformed", "label in both header buckets")
    if HDR_CRIT in phdr or HDR_CRIT in unprotected:
        raise CoseError("malformed", "critical headers not supported")
    alg = phdr.get(HDR_ALG)
    if not isinstance(alg, int) or isinstance(alg, bool) or alg != ALG_HMAC_256_256:
        raise CoseError("bad-alg")
    if HDR_ALG in unprotected:
        raise CoseError("bad-alg", "alg must be protected")
    if len(tag) != TAG_LEN:
        raise CoseError("malformed", "tag length")
    kid = unprotected.get(HDR_KID, phdr.get(HDR_KID))
    if kid is None:
        raise CoseError("unknown-kid", "no kid")
    if not isinstance(kid, bytes):
        raise CoseError("malformed", "kid not bytes")
    key = keys.get(kid)
    if key is None:
        raise CoseError("unknown-kid")
    expect = hmac_sha256(key, _mac_structure(protected, payload))
    if not compare_digest(expect, tag):
        raise CoseError("bad-mac")
    return kid, payload
