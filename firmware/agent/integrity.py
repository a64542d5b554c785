# Integrity wrapper of the settings files (/config.cbor, /keys.cbor, /state.cbor): the same pure
# module writes them on the host (gridshed.siteconfig, provision) and checks them on the board
# (agent/boot.py, agent/app.py, agent/mac0.py). Wire format (docs/site-config.md, "Integrity"):
#
#   "GSI1" | alg (1 byte, "C") | u32 length of the payload, big-endian | payload | u32 CRC-32
#
# The CRC-32 (IEEE, binascii.crc32) covers everything before it: magic, alg, length and payload.
# It detects every 1-, 2- and 3-bit error, every odd number of flipped bits and every burst of up
# to 32 bits in a file this size; the length catches truncation and appended bytes; the magic
# tells an old unwrapped file (refused, with its own reason) from a damaged one.
# Comments, not docstrings: this module is compiled from source on small boards.
import binascii
import struct

MAGIC = b"GSI1"
ALG_CRC32 = 0x43  # "C"
HEAD = 9          # magic 4 + alg 1 + length 4
TAIL = 4


def _crc(data, n):
    return binascii.crc32(memoryview(data)[:n]) & 0xFFFFFFFF


def wrap(payload):
    # payload bytes -> the file's bytes
    n = len(payload)
    out = bytearray(HEAD + n + TAIL)
    out[0:4] = MAGIC
    out[4] = ALG_CRC32
    struct.pack_into(">I", out, 5, n)
    out[HEAD:HEAD + n] = payload
    struct.pack_into(">I", out, HEAD + n, _crc(out, HEAD + n))
    return bytes(out)


def check(data):
    # None when data is a sound file, else the reason (a short English phrase)
    n = len(data)
    if n < HEAD + TAIL:
        return "too short (%d bytes)" % n
    if data[0:4] != MAGIC:
        return "no integrity header (written by an older gridshed, or damaged)"
    if data[4] != ALG_CRC32:
        return "unknown integrity algorithm %d" % data[4]
    ln = struct.unpack_from(">I", data, 5)[0]
    if ln != n - HEAD - TAIL:
        return "length %d does not match the file (%d bytes)" % (ln, n - HEAD - TAIL)
    if struct.unpack_from(">I", data, n - TAIL)[0] != _crc(data, n - TAIL):
        return "CRC-32 mismatch (the file is damaged)"
    return None


def unwrap(data):
    # (payload, None) for a sound file, else (None, reason); payload is a memoryview of data
    why = check(data)
    if why is not None:
        return None, why
    return memoryview(data)[HEAD:len(data) - TAIL], None


def load(data, cbor):
    # host convenience: the CBOR object of a wrapped file; ValueError with the reason if unsound
    p, why = unwrap(data)
    if why is not None:
        raise ValueError(why)
    return cbor.loads(bytes(p))
