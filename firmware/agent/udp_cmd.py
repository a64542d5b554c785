# Signed commands over UDP (config section "udp": enabled, port). See docs/security.md.
#
# One non-blocking datagram socket polled from its own task (nothing here can block the loop).
# Each datagram is one COSE_Mac0; it goes to agent.signed_command(buf, "udp") and the sender
# gets one small JSON datagram back. Untrusted input, cheap checks first, all counted in the
# agent's status "errors":
#   udp_oversize  datagram longer than a command can be (never verified, no reply)
#   udp_bad       too short / does not start like a COSE_Mac0 (never verified, no reply)
#   udp_limited   over the verify rate (burst BURST, then one per REFILL_MS): refused "busy"
#   udp_io        socket errors
# No reply to the first two: a forged source address must not turn the board into an
# amplifier, and a reply is never larger than a short JSON object.
import asyncio
import gc
import json
import socket

from agent.compat import const, ticks_ms, ticks_diff

MAX_DATAGRAM = const(512)   # = agent.commands.MAX_COMMAND_LEN
MIN_DATAGRAM = const(40)    # the smallest COSE_Mac0 with a 32-byte tag and a payload
BURST = const(8)
REFILL_MS = const(250)
IDLE_MS = const(50)


def _looks_like_mac0(b):
    # tag 17 (0xd1) + array(4) (0x84), or the untagged array(4)
    return (b[0] == 0xD1 and b[1] == 0x84) or b[0] == 0x84


def reply_bytes(res):
    out = {"ok": res.get("ok", False)}
    for k in ("cmd", "seq", "refused", "error"):
        if k in res:
            out[k] = res[k]
    st = res.get("status")
    if isinstance(st, dict):
        # a short status, not the whole console one (the datagram stays small)
        for k in ("device", "state", "armed", "mask", "hz", "kw"):
            out[k] = st.get(k)
    return json.dumps(out).encode()


async def serve(agent, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except (OSError, AttributeError):
        pass
    s.bind(socket.getaddrinfo("0.0.0.0", port)[0][-1])
    s.setblocking(False)
    try:
        await _loop(agent, s)
    finally:
        s.close()


async def _loop(agent, s):
    tokens = BURST
    last = ticks_ms()
    while True:
        try:
            buf, addr = s.recvfrom(MAX_DATAGRAM + 1)
        except OSError as e:
            if e.args and e.args[0] not in (11, 35):  # EAGAIN / EWOULDBLOCK: nothing waiting
                agent.count("udp_io")
            await asyncio.sleep_ms(IDLE_MS)
            continue
        n = len(buf)
        if n > MAX_DATAGRAM:
            agent.count("udp_oversize")
            continue
        if n < MIN_DATAGRAM or not _looks_like_mac0(buf):
            agent.count("udp_bad")
            continue
        now = ticks_ms()
        gained = ticks_diff(now, last) // REFILL_MS
        if gained > 0:
            tokens = min(BURST, tokens + gained)
            last = now
        if tokens <= 0:
            agent.count("udp_limited")
            res = {"ok": False, "refused": "busy"}
        else:
            tokens -= 1
            gc.collect()  # the verifier's modules load into a small heap: room first
            try:
                res = agent.signed_command(buf, "udp")
            except Exception as e:  # never let one datagram end the task
                agent.count("udp_error")
                res = {"ok": False, "error": repr(e)[:60]}
        buf = None
        try:
            res = reply_bytes(res)
            gc.collect()
            s.sendto(res, addr)
        except OSError:
            agent.count("udp_io")
        await asyncio.sleep_ms(0)


async def _run(agent):
    port = agent.cfg["udp"]["port"]
    while True:
        try:
            await serve(agent, port)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # bind failure, MemoryError...: say so, retry later
            agent.count("udp_io")
            print("W udp: %r" % (e,))
            await asyncio.sleep(5)


def start(agent):
    asyncio.create_task(_run(agent))
