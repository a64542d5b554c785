# Signed commands over UDP (config section "udp": enabled, port). See docs/security.md.
#
# One non-blocking datagram socket polled from its own task (nothing here can block the loop);
# the receive buffer is allocated only when a datagram is waiting. Each datagram is one
# COSE_Mac0; it goes to agent.signed_command(buf, "udp") and the sender gets one small JSON
# datagram back. Untrusted input, cheap checks first, all counted in the agent's status "errors":
#   udp_oversize  datagram longer than a command can be (never verified, no reply)
#   udp_bad       too short / does not start like a COSE_Mac0 (never verified, no reply)
#   udp_limited   over its source's verify rate (burst BURST, then one per REFILL_MS, per source
#                 address: up to NSRC sources have a bucket each, others share one): "busy"
#   udp_io        socket errors
#   udp_mem       no RAM to receive a datagram now (read again later if the port left it queued)
# No reply to the first two: a forged source address must not turn the board into an
# amplifier, and a reply is never larger than a short JSON object. A datagram "@nonce" padded
# to NONCE_LEN bytes is answered with the board's current nonce (docs/security.md).
import asyncio
import gc
import json
import select
import socket

from agent import control
from agent.base import log
from agent.compat import const, ticks_ms, ticks_diff

MAX_DATAGRAM = const(512)   # = agent.cmd_api.MAX_COMMAND_LEN
MIN_DATAGRAM = const(40)    # the smallest COSE_Mac0 with a 32-byte tag and a payload
BURST = const(8)
REFILL_MS = const(250)
IDLE_MS = const(50)
NSRC = const(4)
BUSY = b'{"ok": false, "refused": "busy"}'  # shorter than any datagram it answers
NONCE_LEN = const(48)       # "@nonce" padded: a request no shorter than its answer


class Udp:
    def __init__(self, port):
        self.port = port
        self.commands = 0  # datagrams verified (signed commands and nonce requests)

    def status(self):
        # @status "udp" (what it refused is counted in "errors": udp_bad, udp_limited, ...)
        return {"port": self.port, "commands": self.commands}


async def _run(agent, u):
    port = u.port
    while True:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                except (OSError, AttributeError):
                    pass
                s.bind(socket.getaddrinfo("0.0.0.0", port)[0][-1])
                s.setblocking(False)
                await _loop(agent, s, u)
            finally:
                s.close()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # bind failure...: say so, retry later
            agent.count("udp_io")
            log("W", "udp: %r" % (e,))
            await asyncio.sleep(5)


async def _loop(agent, s, u):
    p = select.poll()
    p.register(s, select.POLLIN)
    srcs = {}  # source address -> [tokens, last refill]: a flood from one source spends its own
    while True:
        buf = None
        for _ in p.ipoll(0):  # allocation-free
            buf = True
        if buf is None:  # nothing to read: no receive buffer either
            await asyncio.sleep_ms(IDLE_MS)
            continue
        try:
            buf, addr = s.recvfrom(MAX_DATAGRAM + 1)
        except OSError as e:
            if e.args and e.args[0] not in (11, 35):  # EAGAIN / EWOULDBLOCK: nothing waiting
                agent.count("udp_io")
            await asyncio.sleep_ms(IDLE_MS)
            continue
        except MemoryError:  # no RAM now: read again later (unless the port took it already)
            agent.count("udp_mem")
            await asyncio.sleep_ms(IDLE_MS)
            continue
        n = len(buf)
        if n > MAX_DATAGRAM:
            agent.count("udp_oversize")
            continue
        nonce = n >= NONCE_LEN and buf[:6] == b"@nonce"  # freshness for restore / disarm / time
        # too short, or not tag 17 (0xd1) + array(4) (0x84) nor the untagged array(4)
        if not nonce and (n < MIN_DATAGRAM or not (buf[0] == 0x84 or (buf[0] == 0xD1 and buf[1] == 0x84))):
            agent.count("udp_bad")
            continue
        now = ticks_ms()
        b = _bucket(srcs, addr, now)
        gained = ticks_diff(now, b[1]) // REFILL_MS
        if gained > 0:
            b[0] = min(BURST, b[0] + gained)
            b[1] = now
        if b[0] <= 0:
            agent.count("udp_limited")
            buf = None
            try:
                s.sendto(BUSY, addr)
            except OSError:
                agent.count("udp_io")
            await asyncio.sleep_ms(0)
            continue
        b[0] -= 1
        u.commands += 1
        gc.collect()  # the verifier's modules load into a small heap: room first
        try:
            if nonce:
                res = {"nonce": agent.step("console", "nonce_hex", agent), "time_trusted": agent.time_off is not None}
            else:
                res = agent.signed_command(buf, "udp")
        except Exception as e:  # never let one datagram end the task
            agent.count("udp_error")
            res = {"ok": False, "error": repr(e)[:60]}
        buf = None
        # the answer: ok, cmd, seq or refused (or error); a "status" / "test" command adds a
        # short status, not the console's (the datagram stays small, no console code loaded)
        if "status" in res:
            del res["status"]
            c = agent.ctrl
            res["device"] = agent.cfg["device"]
            res["state"] = control.STATE_NAMES[c.state]
            res["armed"] = c.armed
            res["mask"] = agent.relays.mask
            res["hz"] = agent.hz
            res["kw"] = agent.kw
        try:
            res = json.dumps(res).encode()
            gc.collect()
            s.sendto(res, addr)
        except OSError:
            agent.count("udp_io")
        await asyncio.sleep_ms(0)


def _bucket(srcs, addr, now):
    # the rate bucket of a source address (raw sockaddr on the unix port: its IPv4 bytes; an
    # (ip, port) tuple on lwIP): NSRC sources get their own; when the table is full, a source
    # idle with a full bucket is replaced, else the newcomer shares the "*" bucket
    k = addr[0] if isinstance(addr, tuple) else bytes(addr[4:8])
    b = srcs.get(k)
    if b is None:
        if len(srcs) >= NSRC:
            for o in srcs:
                if o != "*" and srcs[o][0] >= BURST:
                    del srcs[o]
                    break
            else:
                k = "*"
                b = srcs.get(k)
        if b is None:
            b = srcs[k] = [BURST, now]
    return b


def start(agent):
    u = Udp(agent.cfg["udp"]["port"])
    asyncio.create_task(agent.keep(lambda: _run(agent, u), IDLE_MS))  # (a MemoryError: counted, begun again)
    return u
