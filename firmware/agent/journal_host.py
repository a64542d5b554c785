"""The journal on the host: the records of pulled segment files (parse_stream), a record's bytes
(encode_record: tests, host tools; the board writes with Journal.append), the samples of a
capture record (decode_capture) and a record back from its JSON view (from_jsonable, the inverse
of agent.journal_read.jsonable). Built on the board's own parser and format (agent/journal.py,
agent/journal_recorder.py); pure, but the board never imports it: gridshed.build HOST_ONLY, not
deployed.
"""
import binascii
import struct

from agent import cbor
from agent.journal_scan import MAGIC, MAX_BODY, _crc, _scan
from agent.journal_recorder import _FMT, HZ_NONE, SAMPLE_SIZE


def parse_stream(data, max_body=MAX_BODY):
    """Decode one segment's bytes (or several concatenated). Returns (records, errors).

    records: list of body dicts in file order. errors: list of (offset, nbytes, reason) for each
    skipped region; reason is "torn" for a bad tail, else magic/length/short/crc/cbor/body.
    """
    if not isinstance(data, bytes):
        data = bytes(data)

    def read_at(off, n):
        return data[off : off + n]

    recs = []
    errs = []
    for off, end, obj, why in _scan(read_at, len(data), max_body):
        if obj is None:
            errs.append((off, end - off, why))
        else:
            recs.append(obj)
    return recs, errs


def encode_record(body_obj):
    """Bytes of one record for a body dict (host tools, tests; the board uses Journal.append)."""
    body = cbor.dumps(body_obj)
    ln = len(body)
    if ln == 0 or ln > MAX_BODY:
        raise ValueError("record body size")
    lb = bytes(((ln >> 8) & 0xFF, ln & 0xFF))
    return bytes((MAGIC,)) + lb + body + struct.pack(">I", _crc(lb + body))


def decode_capture(rec):
    """Samples of a capture record: list of (ms, hz, kw, mask), ms absolute (t0 + offset).

    hz is None when the sample had no reading; kw may be NaN. Raises ValueError on a bad record.
    """
    try:
        v = rec.get("v", 1)
        t0 = rec["t0"]
        ms0 = rec["ms0"]
        smp = rec["smp"]
    except (KeyError, AttributeError, TypeError):
        raise ValueError("not a capture record")
    if v != 1 or not isinstance(smp, (bytes, bytearray)) or len(smp) % SAMPLE_SIZE:
        raise ValueError("bad capture layout")
    out = []
    ms = t0 + ms0
    for j in range(len(smp) // SAMPLE_SIZE):
        dms, mhz, kw, mask = struct.unpack_from(_FMT, smp, j * SAMPLE_SIZE)
        ms += dms
        out.append((ms, None if mhz == HZ_NONE else mhz / 1000.0, kw, mask))
    return out


def from_jsonable(obj):
    """A record from its JSON view: {"b64": ...} back to bytes (agent.journal_read.jsonable)."""
    if isinstance(obj, dict):
        if len(obj) == 1 and "b64" in obj and isinstance(obj["b64"], str):
            return binascii.a2b_base64(obj["b64"])
        out = {}
        for k in obj:
            out[k] = from_jsonable(obj[k])
        return out
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj
