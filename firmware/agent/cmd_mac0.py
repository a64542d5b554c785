# COSE_Mac0 (RFC 9052) with HMAC 256/256: the board's verify code for signed commands.
#
# Loaded for one step of a signed command and freed after it (Agent.signed_command), next to the
# running agent in a small heap, so it is written for RAM: plain functions, a refusal is the
# returned reason (a short string) rather than an exception with a detail text (a string
# constant of more than 10 characters is an object allocated at every load), and the MAC is
# computed by feeding MAC_structure to SHA-256 in pieces, so no copy of the message is built.
# agent.cmd_cose is the documented API over this (the rules, mac0_create for the host).
# (Comments, not docstrings: less RAM when this is compiled from source.)

from agent import cbor
from agent.base import hmac_sha256  # noqa: F401  (agent.cmd_cose uses mac0.hmac_sha256)


def compare_digest(a, b):
    # Constant-time equality for equal-length byte strings (the length is not secret).
    if len(a) != len(b):
        return False
    acc = 0
    for i in range(len(a)):
        acc |= a[i] ^ b[i]
    return acc == 0


def tag(key, protected, payload):
    # The tag: HMAC over CBOR(["MAC0", protected, h'' (external_aad), payload]), hashed as
    # head, protected, head, payload.
    h1 = bytearray(b"\x84\x64MAC0")
    cbor._head(h1, 2, len(protected))
    h2 = bytearray(b"\x40")
    cbor._head(h2, 2, len(payload))
    return hmac_sha256(key, (h1, protected, h2, payload))


def verify(buf, keys, max_len=4096):
    # (kid, payload), or why the message is refused: "malformed", "bad-alg", "unknown-kid" or
    # "bad-mac" (agent.cmd_cose documents when). keys: {kid: key}. Never raises: an internal
    # error is "malformed".
    try:
        if not isinstance(buf, (bytes, bytearray, memoryview)) or len(buf) > max_len:
            return "malformed"
        try:
            msg = cbor.loads(buf, 4)
            if isinstance(msg, cbor.Tag):
                if msg.tag != 17:
                    return "malformed"
                msg = msg.value
            prot, unprot, payload, t = msg  # ValueError unless 4 items, TypeError: none
            if not (isinstance(msg, list) and isinstance(prot, bytes) and isinstance(unprot, dict)
                    and isinstance(payload, bytes) and isinstance(t, bytes)):
                return "malformed"  # header types, detached (nil) payload, tag type
            phdr = cbor.loads(prot, 2) if prot else {}
        except (ValueError, TypeError):
            return "malformed"  # not CBOR, not a 4-element array, protected header not CBOR
        if not isinstance(phdr, dict):
            return "malformed"
        for label in phdr:
            if label in unprot:
                return "malformed"  # a label in both header buckets
        if 2 in phdr or 2 in unprot:
            return "malformed"  # crit: no critical extensions are supported
        alg = phdr.get(1)
        if not isinstance(alg, int) or isinstance(alg, bool) or alg != 5 or 1 in unprot:
            return "bad-alg"  # not HMAC 256/256, or not (only) in the protected header
        kid = unprot.get(4, phdr.get(4))
        if len(t) != 32 or not (kid is None or isinstance(kid, bytes)):
            return "malformed"
        key = None if kid is None else keys.get(kid)
        if key is None:
            return "unknown-kid"
        if not compare_digest(tag(key, prot, payload), t):
            return "bad-mac"
        return kid, payload
    except Exception:
        return "malformed"


def run(a, buf):
    # The agent's step (Agent.signed_command): verify with the provisioned keys (/keys.cbor).
    # buf may be the console's base64 text: None when it is not base64.
    from agent.base import KEYS_PATH, read_cbor

    if isinstance(buf, str):
        import binascii

        try:
            buf = binascii.a2b_base64(buf)
        except Exception:
            return None

    keys = read_cbor(KEYS_PATH)  # None when missing or failing its integrity check (alarm at boot)
    return verify(buf, keys if isinstance(keys, dict) else {}, 512)
