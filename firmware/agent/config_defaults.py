"""Defaults of the site config, filled by the host (gridshed.siteconfig) before it validates the
config and writes /config.cbor. The board validates a complete config and never fills defaults, so
it never imports this module: gridshed.build HOST_ONLY, not deployed.
"""
from agent.config import BLOCK_SCHEMA, SCHEMA, VERSION
from agent.config_optional import OPTIONAL


def apply_defaults(cfg):
    """Fill every missing key of the known sections with its default (in place); returns cfg."""
    for sec, keys in SCHEMA.items():
        d = cfg.get(sec)
        if not isinstance(d, dict):
            if d is not None:
                continue  # validate() reports it
            d = {}
            cfg[sec] = d
        for k, spec in keys.items():
            if k not in d:
                d[k] = spec[0]
    for sec, keys in OPTIONAL.items():
        d = cfg.get(sec)
        if isinstance(d, dict):
            for k, spec in keys.items():
                if k not in d:
                    d[k] = spec[0]
    if isinstance(cfg.get("dnp3"), dict):
        from agent.dnp3_check import SECTION

        for k, spec in SECTION.items():
            cfg["dnp3"].setdefault(k, spec[0])
    for b in cfg.get("blocks") or ():
        if isinstance(b, dict):
            for k, spec in BLOCK_SCHEMA.items():
                if k not in b:
                    b[k] = spec[0]
    cfg.setdefault("v", VERSION)
    cfg.setdefault("nominal_hz", 60)
    return cfg
