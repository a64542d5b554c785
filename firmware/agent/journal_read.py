"""Reading the journal back (console `@events`, host tools): not needed while the agent only
appends, so it lives apart from agent.journal and is loaded on demand (the console's @events is
answered from here, events(), with no other on-demand module loaded).

JSON view of records (console replies, host exports): bytes fields such as a capture's "smp"
become {"b64": "<base64>"}; agent.journal_host.from_jsonable() (the host's) reverses it.
"""
import binascii
import gc

from agent.journal import _fsize
from agent.journal_scan import MAX_BODY, _FileReader, _scan, _try_record  # freed by events()


def _first_seq(path):
    try:
        f = open(path, "rb")
    except OSError:
        return None
    try:
        obj, _ = _try_record(_FileReader(f), 0, _fsize(path), MAX_BODY)
    except Exception:
        obj = None
    f.close()
    return None if obj is None else obj["n"]

def read(self, since_seq=0, limit=None):
    """Yield record dicts with n > since_seq from all segments, oldest first.

    Corrupt regions are skipped and counted in self.read_errors (reset per call).
    """
    self.read_errors = 0
    segs = list(self._segs)
    count = 0
    firsts = [None] * len(segs)
    if since_seq > 0:
        for i in range(1, len(segs)):
            firsts[i] = _first_seq(self._path(segs[i]))
    for i in range(len(segs)):
        nxt = firsts[i + 1] if i + 1 < len(segs) else None
        if nxt is not None and nxt <= since_seq + 1:
            continue  # every record in this segment is older than since_seq
        path = self._path(segs[i])
        try:
            f = open(path, "rb")
            size = _fsize(path)
        except OSError:
            continue  # deleted by a rotation meanwhile
        it = _scan(_FileReader(f), size)
        try:
            while True:
                try:
                    off, end, obj, why = next(it)
                except StopIteration:
                    break
                except MemoryError:  # not the flash's fault: the caller answers an error, retries
                    raise
                except Exception:  # unreadable segment: count it, go on with the next
                    self.read_errors += 1
                    break
                if obj is None:
                    self.read_errors += 1
                    continue
                if obj["n"] <= since_seq:
                    continue
                yield obj
                count += 1
                if limit is not None and count >= limit:
                    return
        finally:
            f.close()



def events(a, arg):
    """Console `@events [since]`: one reply line per record, then a summary line."""
    from agent.base import reply, unload

    try:
        since = int(arg) if arg.isdigit() else 0
        n = 0
        for rec in read(a.journal, since):
            reply({"rec": jsonable(rec)}, False)
            rec = None
            n += 1
            # each record's garbage freed before the next is read: its allocations then reuse the
            # same room instead of cutting up the heap's largest free blocks (a line on the serial
            # link takes longer than a collection)
            gc.collect()
        reply({"ok": True, "count": n, "read_errors": a.journal.read_errors}, True)
    finally:
        unload("agent.journal_scan")  # the parser this module loaded (the caller frees this one)


def jsonable(obj):
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"b64": binascii.b2a_base64(bytes(obj)).decode().strip()}
    if isinstance(obj, dict):
        out = {}
        for k in obj:
            out[k if isinstance(k, str) else str(k)] = jsonable(obj[k])
        return out
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None  # JSON has no NaN/inf
    return obj
