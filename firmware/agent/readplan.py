"""The meter read plan that knows the wire (pure: MicroPython and CPython; docs/modbus.md).

What the trip decision needs (frequency) is read on every poll in the smallest request; kW and
the rest come at a slower cadence, one small read at a time, so a slow read delays the next
frequency read by at most one short transaction. The plan is computed from the meter map (its
addresses and its documented limits: "max_read" registers per request, "max_gap" registers of
hole a read may span), the baud rate (the wire time of each transaction) and the site's choice
of poll mode and slow cadence.

    p = make(MeterMap(map_dict), baud=9600, slow_ms=0)   # baud None: TCP (no wire time known)
    p["hot"]       [(start, count)]   every poll (frequency; phase-1 voltage when nearly free)
    p["slow"]      [(start, count)]   one of these per slow tick, in this order, round robin:
                                      kW's read every other tick (its own small read when the
                                      wire says so), the others in between
    p["hot_us"]    wire time of one hot transaction (request + t3.5 + reply + t3.5), 0 for TCP
    p["slow_us"]   [wire time of each slow read]
    p["slow_ms"]   the slow tick (configured, or the automatic one below)
    p["hot_read"], p["slow_reads"]   the same reads as (start, count, quantity indices) for the
                                      poll task
    p["kw_read"]   kW alone, (start, count, indices): the reads that need only kW (the evidence
                   after an opening, a curtailment) take the smallest request
A plain dict of plain values: the agent keeps it after freeing this module. The quantities a read
covers: mm._covered(start, count).

Wire time of one RTU read of `count` registers: an 8-byte request and a (5 + 2 x count)-byte
reply at 10 bits a character (8N1) or 11 (with parity), each followed by t3.5 (the silence that ends a frame: the device
answers no sooner, the next request goes no sooner). The device's own response time is not wire
time and is not counted.

Merging: two spans share a read when the hole between them costs less on the wire than a second
transaction (2 characters per register of hole against 13 characters of request and reply
overhead plus two t3.5 gaps: 10 registers at 19200 baud and below, more above, where t3.5 is a
fixed 1.75 ms) and the meter allows the hole ("max_gap", default 24) and the length ("max_read",
default 125, the Modbus limit).

Automatic slow cadence (slow_ms = 0): a frequency reading that changes just after a hot read
sampled it waits for that read to end and the next one to run; a slow read in between adds one
more transaction. Slow reads are spaced so that this happens to at most 1 % of updates: slow_ms
= 100 x (hot + longest slow transaction), rounded up to 100 ms, but at least 1 s and at most
10 s (kW must stay useful to the curtailer: on a slow line the cap lets up to ~4 % of updates
wait one slow transaction more).
"""
from agent.compat import const
from agent.meter import DEFAULT_MAX_GAP

REQ_BYTES = const(8)      # an RTU read request: unit fn addr(2) count(2) crc(2)
REPLY_OVERHEAD = const(5)  # unit fn bytecount ... crc(2)
HOT_EXTRA_REGS = const(4)  # the phase-1 voltage rides the hot read when it adds at most this
SLOW_SHARE = const(100)    # auto slow tick: 100 x the transactions it delays (1 % of updates)
SLOW_MIN_MS = const(1000)
SLOW_MAX_MS = const(10000)
HOT = ("hz",)


def read_txn_us(baud, count, bits=11):
    """Wire time (us) of one RTU read of `count` registers: request, t3.5, reply, t3.5, at
    `bits` a character (10: 8N1, 11: with parity or two stop bits)."""
    if not baud:
        return 0
    from agent.modbus_rtu import char_time_us, frame_gap_us  # loaded already on an RTU site

    return (REQ_BYTES + REPLY_OVERHEAD + 2 * count) * char_time_us(baud, bits) + 2 * frame_gap_us(baud)


def break_even_gap(baud):
    """Largest hole (registers) cheaper to read through than to skip with a second request."""
    if not baud:
        return DEFAULT_MAX_GAP  # TCP: a round trip costs far more than a few bytes
    # here, not at the top: this module is freed after boot, what it imports is not, and a TCP
    # meter's site never needs the RTU framing (nor its CRC table) resident
    from agent.modbus_rtu import char_time_us, frame_gap_us

    c = char_time_us(baud)
    return ((REQ_BYTES + REPLY_OVERHEAD) * c + 2 * frame_gap_us(baud)) // (2 * c)


def make(mm, baud=None, slow_ms=0, bits=11):
    """The read plan of MeterMap `mm` at `baud` (None: TCP), `bits` a character; slow_ms 0:
    automatic. A dict: hot, slow (lists of (start, count)), hot_us, slow_us, slow_ms."""
    gap = break_even_gap(baud)
    if mm.max_gap < gap:
        gap = mm.max_gap
    hot = mm.plan_for(HOT, 0)
    if mm.has("v1"):
        # phase-1 voltage (the undervoltage block) when it is nearly free: the same request, at
        # most HOT_EXTRA_REGS registers more, inside the meter's hole limit
        p = mm.plan_for(HOT + ("v1",))
        if len(p) == 1 and p[0][1] <= hot[0][1] + HOT_EXTRA_REGS:
            hot = p
    hi = mm._covered(hot[0][0], hot[0][1])
    slow = mm.plan_for([n for i, n in enumerate(mm.names) if i not in hi], gap)
    # kW's read first and every other tick: the curtailer needs kW far more than the rest
    kw = mm.names.index("kw")
    for k in range(len(slow)):
        if kw in mm._covered(slow[k][0], slow[k][1]):
            r = slow.pop(k)
            seq = [r]
            for j in range(len(slow)):
                if j:
                    seq.append(r)
                seq.append(slow[j])
            slow = seq
            break
    ka, kn = mm.span("kw")
    hot_us = read_txn_us(baud, hot[0][1], bits)
    slow_us = [read_txn_us(baud, c, bits) for s, c in slow]
    if not slow_ms:
        slow_ms = (SLOW_SHARE * (hot_us + max(slow_us)) + 99999) // 100000 * 100
        if slow_ms < SLOW_MIN_MS:
            slow_ms = SLOW_MIN_MS
        elif slow_ms > SLOW_MAX_MS:
            slow_ms = SLOW_MAX_MS
    return {"hot": hot, "slow": slow, "hot_us": hot_us, "slow_us": slow_us, "slow_ms": slow_ms,
            # what the poll task needs, ready made: (start, count, indices of the quantities)
            "hot_read": (hot[0][0], hot[0][1], hi), "slow_reads": [(s, c, mm._covered(s, c)) for s, c in slow],
            # kW alone (the evidence after an opening, a curtailment's kW): the smallest read
            "kw_read": (ka, kn, mm._covered(ka, kn))}
