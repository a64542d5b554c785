# The optional features: one module per site.toml section, agent/features/<section>.py
# (docs/architecture.md, "Feature contract"). The hub (agent/app.py) imports the module of each
# section the site enables, in ORDER, and calls its start(agent), which creates the feature's
# tasks and returns an object whose status() is the feature's @status value (key: the section
# name). A module in EARLY also has boot(agent, persisted), run before the relays are driven
# (the override switch: a lockout holds the load off from the first relay write). Optional:
# stop() on that object, called when the agent is stopped from the console (agent/stopped.py).
# tests/test_static.py checks that ORDER names exactly the modules of this folder.
ORDER = ("signals", "override", "modbus_server", "udp", "mqtt", "ac_sense", "miners", "dnp3", "market")
EARLY = ("override",)


def enabled(cfg):
    # the sections this site runs, in ORDER: a section with enabled = true (signals: a dry
    # contact wired; override: a pin to read; market: on unless enabled = false)
    out = []
    for sec in ORDER:
        c = cfg.get(sec)
        if isinstance(c, dict) and (c.get("dry_contact") if sec == "signals" else c.get("enabled", sec == "market")) \
                and (sec != "override" or c.get("pin") is not None):
            out.append(sec)
    return out
