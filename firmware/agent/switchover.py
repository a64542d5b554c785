"""Finish a switch-over that a reset cut short (gridshed deploy and provision, docs/failsafes.md
"Writing to a board"; the plan's format: agent/boot.py). Loaded by agent/boot.py finish_switch()
only at a boot that finds /switch-plan.json, and freed before the config is read.
"""
from agent.base import log


def _sha(path):
    import hashlib

    try:
        f = open(path, "rb")
    except OSError:
        return None
    h = hashlib.sha256()
    b = bytearray(256)
    while True:
        n = f.readinto(b)
        if not n:
            break
        h.update(memoryview(b)[:n])
    f.close()
    import binascii

    return binascii.hexlify(h.digest()).decode()


def replace(a, b):
    # rename a over b: atomic on LittleFS and POSIX; FAT refuses an existing target
    import os

    try:
        os.rename(a, b)
    except OSError:
        os.remove(b)
        os.rename(a, b)


def finish(plan_path):
    """Complete the committed switch-over of plan_path; the number of files renamed."""
    try:
        f = open(plan_path)
    except OSError:
        return None
    import json
    import os

    done = 0
    try:
        try:
            plan = json.load(f)
        finally:
            f.close()
        for r in plan["renames"]:
            h = _sha(r[0])
            if h is None:
                continue  # renamed before the reset
            if len(r) > 2 and h != r[2]:
                log("E", "switch-over: %s does not match the plan, left as it is" % r[0])
                continue
            replace(r[0], r[1])
            done += 1
        for p in plan["removes"]:
            try:
                os.remove(p)
            except OSError:
                pass
    except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
        log("E", "switch-over plan unusable: %r" % e)
    try:
        os.remove(plan_path)
    except OSError:
        pass
    log("I", "switch-over finished at boot: %d files" % done)
    return done
