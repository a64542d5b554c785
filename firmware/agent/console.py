# Console verbs, loaded when a request arrives and freed after it.
#
# The agent's steady state holds only the hot path in RAM; a technician's request costs a module
# load (milliseconds) and nothing while idle. The frequent ones do not load this module:
# Agent.console_line hands @status to agent/status.py, a signed command (`@cmd`) to
# Agent.signed_command and @events to agent/journal_read.py. Line protocol: docs/architecture.md.
from agent.base import reply, unload


def handle(a, line):
    try:
        _handle(a, line)
    finally:
        unload("agent.journal_read")  # the read side of the journal, loaded by @events/@config


def _handle(a, line):
    parts = line.split(None, 1)
    verb = parts[0] if parts else ""
    if verb == "status":
        reply(a.status(), True)
    elif verb == "nonce":  # freshness for restore / disarm / time while the clock is untrusted
        reply({"nonce": nonce_hex(a), "time_trusted": a.time_off is not None}, True)
    elif verb == "config":
        # written a section at a time: no copy of the config, no whole-reply string
        import json
        import sys

        w = sys.stdout.write
        w('@{"config": {')
        sep = ""
        for k in a.cfg:
            w(sep)
            w(json.dumps(k))
            w(": ")
            try:
                w(json.dumps(a.cfg[k]))
            except TypeError:  # a value JSON cannot carry (bytes): named, not dropped silently
                w('"<binary>"')
            sep = ", "
        w('}, "end": true}\n')
    else:
        a.count("console_bad")
        reply({"error": "unknown verb"}, True)


def nonce_hex(a):
    # the board's current command nonce (hex): a restore / disarm / time command carries it
    # while the clock is not trusted (agent/cmd_check.py checks it); used once (agent/cmd_run.py
    # drops it). Here, not in agent/cmd_check.py: @nonce loads this module only (one module in
    # RAM, not the console's and the command check's at once)
    if a.nonce is None:
        import os

        try:
            a.nonce = os.urandom(8)
        except Exception:  # a port without urandom
            import random

            a.nonce = bytes(random.getrandbits(8) for _ in range(8))
    return "".join("%02x" % b for b in a.nonce)
