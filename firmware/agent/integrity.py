# Integrity wrapper of the settings files (/config.cbor, /keys.cbor, /state.cbor): the same pure
# module writes them on the host (gridshed.siteconfig, provision) and checks them on the board
# (agent/boot.py, agent/app.py). Wire format (docs/site-config.md, "Integrity"):
#
#   "GSI1" | alg (1 byte, "C") | u32 length of the payload, big-endian | payload | u32 CRC-32
#
# The CRC-32 (IEEE, binascii.crc32) covers everything before it: magic, alg, length and payload.
# It detects every 1-, 2- and 3-bit error, every odd number of flipped bits and every burst of up
# to 32 bits in a file this size; the length catches truncation and appended bytes; the magic
# tells an old unwrapped file (refused, with its own reason) from a damaged one.
# Comments, not docstrings: this module is compiled from source on small boards.
from binascii import crc32
from struct import pack_into, unpack_from

MAGIC = b"GSI1"
ALG_CRC32 = 0x43  # "C"


def wrap(payload):
    # payload bytes -> the file's bytes
    n = len(payload)
    out = bytearray(n + 13)
    out[0:4] = MAGIC
    out[4] = ALG_CRC32
    pack_into(">I", out, 5, n)
    out[9:9 + n] = payload
    pack_into(">I", out, 9 + n, crc32(memoryview(out)[:9 + n]) & 0xFFFFFFFF)
    return bytes(out)


def unwrap(data):
    # (payload, None) for a sound file, else (None, reason): "too short", "no integrity header
    # (older gridshed, or damaged)", "unknown algorithm", "length mismatch (cut or grown)",
    # "CRC-32 mismatch (damaged)". payload is a memoryview of data.
    n = len(data) - 4
    if n < 9:
        return None, "too short"
    if data[0:4] != MAGIC:
        return None, "no integrity header (older gridshed, or damaged)"
    if data[4] != ALG_CRC32:
        return None, "unknown algorithm"
    if unpack_from(">I", data, 5)[0] != n - 9:
        return None, "length mismatch (cut or grown)"
    mv = memoryview(data)
    if unpack_from(">I", data, n)[0] != crc32(mv[:n]) & 0xFFFFFFFF:
        return None, "CRC-32 mismatch (damaged)"
    return mv[9:n], None


def check(data):
    # None when data is a sound file, else the reason
    return unwrap(data)[1]
