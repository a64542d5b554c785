# What every firmware module shares: the build id, the settings paths, the log line, the console
# reply and request lines, freeing a one-off module, the checked CBOR settings files and
# HMAC-SHA256. A leaf of the import graph: it imports only the port shim (agent.compat), the CBOR
# codec and the settings files' CRC wrapper (agent.integrity, loaded per read / write), so any
# module may import it and nothing here imports back (tests/test_imports.py).
# (Comments, not docstrings: less RAM when compiled from source.)
import json
import sys

from agent import cbor
from agent.compat import ticks_ms

# the build id: `gridshed build` rewrites the next line (host_tools/gridshed/build.py)
BUILD = "dev"
CONFIG_PATH = "config.cbor"
STATE_PATH = "state.cbor"
KEYS_PATH = "keys.cbor"
SEQ_PATH = "seq.cbor"
LINE_MAX = 1024  # longest console line kept; a longer one is discarded as it arrives


def log(level, msg):
    # never what raises: a line without RAM for it is dropped (the caller's message, formatted
    # before the call, is the caller's: a task's MemoryError guard covers that)
    try:
        print("%s %d %s" % (level, ticks_ms(), msg))
    except MemoryError:
        pass


def unload(name):
    # Free a module loaded for a one-off job: drop it from sys.modules and from its package.
    sys.modules.pop(name, None)
    i = name.rfind(".")
    pkg = sys.modules.get(name[:i]) if i > 0 else None
    short = name[i + 1:]
    if pkg is not None and short in pkg.__dict__:
        delattr(pkg, short)


def reply(obj, end):
    # One JSON object per line, streamed (json.dump): no reply or value string in RAM. obj: a
    # dict, or (key, value) pairs made one at a time (the status).
    w = sys.stdout.write
    w("@{")
    for k, v in obj.items() if isinstance(obj, dict) else obj:
        w(json.dumps(k))
        w(": ")
        json.dump(v, sys.stdout)
        w(", ")
    w('"end": true}\n' if end else '"end": false}\n')


def read_checked(path):
    # A settings file in its integrity wrapper (agent/integrity.py): (obj, None); (None, None)
    # when there is no such file; (None, reason) when it is there but fails its check.
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None, None
    from agent import integrity  # loaded for the read only (2.3 KB resident otherwise)

    body, why = integrity.unwrap(raw)
    unload("agent.integrity")
    if why is None:
        try:
            return cbor.loads(body), None
        except ValueError:
            why = "sound CRC but not CBOR"
    return None, why


def read_cbor(path):
    return read_checked(path)[0]


def write_cbor_atomic(path, obj):
    import os

    from agent.integrity import wrap

    data = wrap(cbor.dumps(obj))
    unload("agent.integrity")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def hmac_sha256(key, parts):
    # HMAC-SHA256 (RFC 2104; MicroPython has no hmac module) of the concatenated byte strings
    # in parts: one 64-byte pad buffer, flipped from the inner to the outer pad in place. Used by
    # signed commands (agent/cmd_mac0.py) and signed telemetry (the mqtt feature).
    import hashlib

    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    pad = bytearray(64)
    pad[:len(key)] = key
    for i in range(64):
        pad[i] ^= 0x36
    h = hashlib.sha256(pad)
    for p in parts:
        h.update(p)
    parts = h.digest()
    for i in range(64):
        pad[i] ^= 0x6A  # 0x36 ^ 0x5C
    h = hashlib.sha256(pad)
    h.update(parts)
    return h.digest()


def _chunk(s):
    # (awaited) the next piece of a console line, at most 256 bytes, up to and with its
    # newline: the wait is asyncio's (as in its Stream), the read is the stream's own readline
    from asyncio import core  # type: ignore[attr-defined]  # the ports' asyncio package (frozen); not in the stubs

    yield core._io_queue.queue_read(s)
    return s.readline(256)


class ConsoleLines:
    # Console request lines (str, stripped), for the agent and for a refused config
    # (agent/refused.py). A line that arrives in one piece (every request but a long signed
    # command) is taken as read; a longer one is gathered in a buffer made for it (LINE_MAX) and
    # freed after it. An over-long line is thrown away a piece at a time as it arrives (counted
    # console_long, never held in RAM), a line that is not UTF-8 is counted console_utf8, a read
    # error console_io.
    def __init__(self, count):
        self.count = count
        self.s = getattr(sys.stdin, "buffer", sys.stdin)

    async def next(self):
        import asyncio

        buf = None
        n = 0
        long = False
        while True:
            try:
                c = await _chunk(self.s)
            except Exception:
                self.count("console_io")
                await asyncio.sleep_ms(500)
                continue
            if not c:
                await asyncio.sleep_ms(50)
                continue
            if isinstance(c, str):  # a port whose stdin has no binary buffer
                c = c.encode()
            k = len(c)
            end = c[k - 1] == 10
            if end and n == 0 and not long:
                line = c
            else:
                if not long:
                    if n + k > LINE_MAX:
                        long = True
                    else:
                        if buf is None:
                            try:
                                buf = bytearray(LINE_MAX)
                            except MemoryError:
                                long = True
                        if buf is not None:
                            buf[n:n + k] = c
                            n += k
                del c
                if not end:
                    continue
                if long:
                    self.count("console_long")
                    buf = None
                    long = False
                    n = 0
                    continue
                line = bytes(buf[:n])
                buf = None
                n = 0
            try:
                line = line.decode().strip()
            except UnicodeError:
                line = None
                self.count("console_utf8")
            if line:
                return line
