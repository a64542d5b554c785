# The meter's communication-quality summaries and the word-order hint (docs/meters.md): the
# failure path of the poll task, loaded by Agent._comm() while polls fail or are implausible and
# freed when they recover (a healthy site keeps none of this in RAM).
from agent.base import log, unload
from agent.compat import ticks_diff


def quality(a, now, err):
    # a failed (err: an exception, or a plausibility reason) or the first good poll after a burst
    if err is not None:
        name = err if isinstance(err, str) else err.__class__.__name__
        a.q_fail += 1
        a.q_last = name
        if a.q_first is None:
            a.q_first = name
        b = a.q_burst
        if b is None:
            a.q_burst = [now, name, name, 1]
            if _ok(a, 0, now):
                log("E", "ALARM meter: " + name)
                a.journal.append("meter_comm", {"ev": "start", "first": name})
        else:
            b[2] = name
            b[3] += 1
        return
    b = a.q_burst  # a good poll ends the burst
    a.q_burst = None
    if _ok(a, 1, now):
        a.journal.append("meter_comm", {"ev": "burst", "failed": b[3], "ms": ticks_diff(now, b[0]),
                                        "first": b[1], "last": b[2]})
    _free(a)


def _ok(a, i, now):
    # burst starts (0) and ends (1): at most one record of each in 10 s
    t = a.q_logged
    if t[i] is None or ticks_diff(now, t[i]) >= 10000:
        t[i] = now
        return True
    return False


def minute(a, now):
    # from the tick task, once a minute: a summary while anything failed in it
    if a.q_fail:
        a.journal.append("meter_comm", {"ev": "minute", "polls": a.q_polls, "failed": a.q_fail,
                                        "first": a.q_first, "last": a.q_last, "ongoing": a.q_burst is not None})
    a.q_t0 = now
    a.q_polls = a.q_fail = 0
    a.q_first = a.q_last = None
    if a.q_burst is None:
        _free(a)


def word_hint(a, mm):
    # an implausible frequency from a 32-bit register: would the other word order be a
    # frequency? (a float decoding to a denormal such as 2.4e-41 is the classic sign)
    alt = mm.swapped("hz")
    if alt is None:
        return
    nom = a.cfg["nominal_hz"]
    if nom * 0.85 < alt < nom * 1.15:
        a.word_order = "swapped? the meter reads %.3f Hz with the other word order" % alt
        log("E", "ALARM meter word order: " + a.word_order)
        a.journal.append("meter_words", {"map": mm.words("hz"), "alt_hz": alt})


def _free(a):
    a._mc = None
    unload("agent.meter_comm")
