"""First steps of a boot, before the agent's big modules are loaded: finish a switch-over that a
reset cut short, then read /config.cbor, hash it and validate it (the validator is large and
only needed once, so it runs while the heap is still empty, and is freed before the agent is
built).

Switch-over (gridshed deploy and provision, docs/failsafes.md "Writing to a board"): the host
writes each new file beside the old one as <file>.gsnew and checks its sha256 on the board, then
commits by renaming a plan into place, /switch-plan.json:
{"renames": [[staged, target, sha256], ...], "removes": [path, ...]}. It then renames each
staged file over its target (one atomic rename per file) and deletes the plan. A reset anywhere
in between leaves either no plan (the old files, all of them: a staged file without a plan is
never used) or the plan, which finish_switch() completes at the next boot: every staged file
still there whose hash is the plan's is renamed into place, so config and key always change
together.
"""
import gc

from agent.base import CONFIG_PATH, log, unload

PLAN_PATH = "switch-plan.json"
# The optional features (agent/features/<section>.py, docs/architecture.md "Feature contract"),
# in start order; EARLY: read before the relays are driven (boot(agent, persisted)).
FEATURES = ("signals", "override", "modbus_server", "udp", "mqtt", "ac_sense", "miners", "dnp3", "market")
EARLY = ("override", "market")


def finish_switch():
    """Complete a committed switch-over; the number of files renamed, or None without a plan. The
    code that completes it (agent/switchover.py) is loaded only at a boot that finds a plan."""
    try:
        open(PLAN_PATH).close()
    except OSError:
        return None
    from agent import switchover

    done = switchover.finish(PLAN_PATH)
    del switchover
    unload("agent.switchover")
    gc.collect()
    return done


def load_config():
    """(cfg or None, errors, config hash): the hash is the 16 hex digits the inventory records."""
    from agent import cbor

    try:
        with open(CONFIG_PATH, "rb") as f:
            raw = f.read()
    except OSError:
        return None, ["no /%s: provision the board (gridshed provision)" % CONFIG_PATH], None
    import binascii
    import hashlib

    chash = binascii.hexlify(hashlib.sha256(raw).digest()[:8]).decode()
    from agent import integrity  # the CRC-32 wrapper made at provisioning (docs/site-config.md)

    body, why = integrity.unwrap(raw)
    del integrity
    unload("agent.integrity")
    if why is not None:
        return None, ["/%s integrity: %s: refused, provision the board again" % (CONFIG_PATH, why)], chash
    try:
        cfg = cbor.loads(body)
    except ValueError as e:
        return None, ["/%s is not valid CBOR (%s): provision the board again" % (CONFIG_PATH, e)], chash
    del raw, body
    from agent import config

    try:  # a check that fails on a value it did not foresee refuses the config: no crash loop
        errors = config.validate(cfg)
        if not errors:
            from agent import meter_check

            errors = ["meter.map: " + e for e in meter_check.validate(cfg["meter"]["map"])]
    except Exception as e:
        errors = ["/%s: the check failed (%r): refused, provision the board again" % (CONFIG_PATH, e)]
    del config
    for m in ("config", "dnp3_check", "config_optional", "market_check", "meter_check"):
        unload("agent." + m)  # the validator and what it loaded (for some sites only)
    gc.collect()
    return cfg, errors, chash


def features(cfg):
    # (the sections this site runs, in FEATURES order; those of them in EARLY): a section with
    # enabled = true (signals: a dry contact wired; override: a pin to read; market: on unless
    # enabled = false). Agent.__init__ loads this module for the call (Agent.step) and frees it.
    out = []
    for sec in FEATURES:
        c = cfg.get(sec)
        if isinstance(c, dict) and (c.get("dry_contact") if sec == "signals" else c.get("enabled", sec == "market")) \
                and (sec != "override" or c.get("pin") is not None):
            out.append(sec)
    return out, [s for s in out if s in EARLY]


SAFETY = ("signals", "override")  # kept by rebuild(): the dry contact sheds, a lockout holds the load off


def rebuild(agent_cls, cfg, hal, switched):
    """The agent without its optional features, after building it with them ran out of RAM
    (agent/app.py run() dropped what the failed build loaded; docs/failsafes.md, "A feature
    without RAM"): every optional feature of the config (FEATURES) turned off but the safety
    inputs."""
    off = []
    for k in features(cfg)[0]:
        if k not in SAFETY:
            cfg[k]["enabled"] = False
            off.append(k)
    gc.collect()
    log("E", "not enough RAM for the optional features %s: protection runs without them" % off)
    a = agent_cls(cfg, hal, switched)
    a.count("features_memory")
    return a
