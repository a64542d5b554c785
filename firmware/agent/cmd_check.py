# Signed command policy and the seq store's reading side: the board's code for the step after
# agent.cmd_mac0 (the payload of an authenticated COSE_Mac0). Loaded for that step and freed after
# it (Agent.signed_command), so it is written like agent.cmd_mac0 (plain functions, a refusal is the
# returned reason). The store is written by the next step, agent.cmd_run, before anything acts.
# agent.cmd_api is the documented API over this (the rules, the host side).
# (Comments, not docstrings: less RAM when this is compiled from source.)
from agent import cbor

COMMANDS = ("shed", "restore", "arm", "disarm", "test", "status", "time", "schedule")
# the restore / disarm direction (and the clock itself): fresh by the board's trusted clock
# (exp), or by carrying the board's current nonce while the clock is not trusted
FRESH = ("restore", "disarm", "time")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check(r, dev_id, site_id, now, hwm, save, nonce=None):
    # r: what agent.cmd_mac0.verify returned. The accepted command (dict), or why it is refused (a
    # reason of agent.cmd_api.REASONS), the first failing check winning. hwm: {kid: highest
    # seq accepted}, raised here before save(new marks) is called, or None when the store could
    # not be read (fail closed). now: the board's trusted unix time or None (agent.app
    # Agent.now_unix); nonce: the board's current nonce (bytes) or None. Never raises: an
    # internal error is "malformed".
    try:
        if isinstance(r, str):  # refused by agent.cmd_mac0; a wrong alg counts as malformed here
            return "malformed" if r == "bad-alg" else r
        kid, p = r
        # authenticated from here on
        try:
            p = cbor.loads(p, 3)
        except ValueError:
            return "malformed"
        if not isinstance(p, dict):
            return "malformed"
        name = p.get("cmd")
        seq = p.get("seq")
        exp = p.get("exp")
        dev = p.get("dev")
        site = p.get("site")
        # cmd, seq and exp required, seq a uint64, exp an int; a target; dev and site text
        if (name is None or not _is_int(seq) or seq < 0 or seq >> 64 or not _is_int(exp)
                or (dev is None and site is None) or not (dev is None or isinstance(dev, str))
                or not (site is None or isinstance(site, str))):
            return "malformed"
        out = {"cmd": name, "seq": seq, "exp": exp, "kid": kid}
        if "kw" in p:
            kw = p["kw"]
            if not (isinstance(kw, (int, float)) and not isinstance(kw, bool) and 0 <= kw < 1e9):
                return "malformed"
            out["kw"] = kw
        if "blocks" in p:
            b = p["blocks"]
            if not isinstance(b, list) or len(b) > 32:
                return "malformed"
            for x in b:
                if not (isinstance(x, str) or (_is_int(x) and 0 <= x < 256)):
                    return "malformed"
            out["blocks"] = b
        if "iss" in p:  # the signer's issuer label (the OpenADR bridge: "openadr"): its own entry
            v = p["iss"]
            if not isinstance(v, str) or not 0 < len(v) <= 16 or "#" in v:
                return "malformed"
            out["iss"] = v
        if "all" in p:  # restore: every issuer's entry (authority.restore_all decides who may)
            if p["all"] is not True:
                return "malformed"
            out["all"] = True
        if "nonce" in p:
            v = p["nonce"]
            if not isinstance(v, bytes) or not 4 <= len(v) <= 32:
                return "malformed"
            out["nonce"] = v
        if "t" in p or name == "time":
            v = p.get("t")
            if not _is_int(v) or not 1600000000 < v < 1 << 40:
                return "malformed"
            out["t"] = v
        if "sid" in p or name == "schedule":  # the market schedule (docs/market.md): checked whole by agent/market.py
            v = p.get("sid")
            iv = p.get("iv", [] if "ts" in p else None)  # rows, the compact series, or both
            if not _is_int(v) or not isinstance(iv, list):
                return "malformed"
            out["sid"] = v
            out["iv"] = iv
            if "ts" in p:  # the compact uniform-step series
                out["ts"] = p["ts"]
        if not isinstance(name, str) or name not in COMMANDS:
            return "bad-cmd"
        if dev is not None:
            if dev != dev_id:
                return "wrong-target"
            out["dev"] = dev
        if site is not None:
            if site != site_id:
                return "wrong-target"
            out["site"] = site
        if now is not None and now > exp:
            return "expired"
        if hwm is None:
            return "store-error"  # unreadable at boot: fail closed (no mark to replay against)
        if seq <= hwm.get(kid, -1):
            return "replay"
        v = out.get("nonce")
        if v is not None and v != nonce:
            return "stale"  # not this board's current nonce (used, or from before a reboot)
        if name in FRESH and v is None and (now is None or name == "time"):
            return "stale"  # no trusted clock to judge exp by: a nonce is the freshness
        p = dict(hwm)
        p[kid] = seq
        hwm[kid] = seq  # raised first: even if the write fails, this seq is spent
        try:
            save(p)
        except Exception:
            return "store-error"
        return out
    except Exception:
        return "malformed"


def run(a, r):
    # The agent's step: check r against this board and its seq store. An accepted command
    # comes back as (command, new marks): agent.cmd_run writes the marks first, then acts, so a
    # command is never acted on without its seq persisted, and one that could not be carried
    # to that step (no room to load it) has consumed nothing.
    from agent.base import SEQ_PATH

    try:
        hwm = load(SEQ_PATH)
    except Exception:  # unreadable: every command is refused until re-provisioned
        hwm = None
    marks = []
    r = check(r, a.cfg["device"], a.cfg["site"], a.now_unix(), hwm, marks.append, a.nonce)
    return (r, marks[0]) if marks and isinstance(r, dict) else r


# ---- seq store: {kid: seq} in CBOR {"v": 1, "seq": {...}}, replaced atomically (agent.cmd_run.save)

def parse(data):
    obj = cbor.loads(data)
    seqs = obj.get("seq") if isinstance(obj, dict) and obj.get("v") == 1 else None
    if not isinstance(seqs, dict):
        raise ValueError("seq store: bad format")
    for k in seqs:
        if not isinstance(k, bytes) or not _is_int(seqs[k]) or seqs[k] < 0:
            raise ValueError("seq store: bad entry")
    return seqs


def load(path):
    # path and path.tmp, the highest seq per kid; {} when there is no store; ValueError when
    # the main file is corrupt and there is no valid copy.
    best = None
    corrupt = False
    for p in (path, path + ".tmp"):
        try:
            with open(p, "rb") as f:
                seqs = f.read(f.seek(0, 2) + f.seek(0))  # its size: read() starts at 256 bytes
        except OSError:
            continue
        try:
            seqs = parse(seqs)
        except ValueError:
            corrupt = corrupt or p == path
            continue
        if best is None:
            best = seqs
        else:
            for k in seqs:
                if seqs[k] > best.get(k, -1):
                    best[k] = seqs[k]
    if best is None:
        if corrupt:
            raise ValueError("seq store corrupt")
        return {}
    return best


# ---- shed authority record and nonce: board-side helpers loaded for one call (Agent.step)

def load_auth(au, persisted):
    # the control.Authority record of state.cbor ("auth": [held, [kW]|0, [ids]|0]) into au; a
    # record from before issuers existed (cmd_shed, shed_kw) becomes an unknown signer's entry
    # (only a restore-all clears it); an unreadable one too (never less shed than stored)
    from agent.control import I_SIGNED, NISSUERS, NSIGNED

    p = persisted.get("auth")
    try:
        if not p:
            raise ValueError
        held, kws, ids = p
        for i in range(NSIGNED if ids else 0):
            v = ids[i]
            au.ids[i] = v if isinstance(v, bytes) else None
        for i in range(min(NISSUERS, len(kws)) if kws else 0):  # a record from before an issuer was added is shorter
            k = kws[i]
            if isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < k < 1e7:
                au.kw[i] = float(k)
        au.held = int(held) & ((1 << NISSUERS) - 1)
        return
    except Exception:
        pass
    k = persisted.get("shed_kw")
    if persisted.get("cmd_shed") is True or p:
        au.held |= 1 << I_SIGNED
    if isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < k < 1e7:
        au.kw[I_SIGNED] = float(k)
    if au.active(I_SIGNED):
        au.ids[0] = b""
