"""First step of a boot: read /config.cbor, hash it, validate it, before the agent's big
modules are loaded (the validator is large and only needed once, so it runs while the heap is
still empty, and is freed before the agent is built)."""
import gc
import sys

CONFIG_PATH = "config.cbor"


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
    _unload("integrity")
    if why is not None:
        return None, ["/%s integrity: %s: refused, provision the board again" % (CONFIG_PATH, why)], chash
    try:
        cfg = cbor.loads(body)
    except ValueError as e:
        return None, ["/%s is not valid CBOR (%s): provision the board again" % (CONFIG_PATH, e)], chash
    del raw, body
    from agent import config

    errors = config.validate(cfg)
    del config
    _unload("config")
    if not errors:
        from agent import meter_check

        errors = ["meter.map: " + e for e in meter_check.validate(cfg["meter"]["map"])]
        del meter_check
        _unload("meter_check")
    gc.collect()
    return cfg, errors, chash


def _unload(short):
    sys.modules.pop("agent." + short, None)
    pkg = sys.modules.get("agent")
    if pkg is not None and short in pkg.__dict__:
        delattr(pkg, short)
