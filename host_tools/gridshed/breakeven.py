"""Mining break-even: the power price above which a miner loses money (its strike price).

A miner of efficiency E (J/TH) running 1 TH/s draws E W, so in a day it uses
E x 86400 J = E x 86400 / 3.6e9 MWh, and earns the hashprice H ($ per TH/s per day). It makes
money while the power price is below

    strike ($/MWh) = H / (E x 86400 / 3.6e9) = H x 3.6e9 / (86400 x E) = 41666.67 x H / E

e.g. 20 J/TH at $0.05/TH/day: 0.05 / (20 x 86400 / 3.6e9) = $104.17/MWh.

Without a quoted hashprice it comes from the network:

    H = BTC price ($) x BTC mined by the network per day / network hashrate (TH/s)
    BTC per day = (block subsidy + fees per block) x 144 blocks   (or given per day)
    network hashrate (TH/s) = EH/s x 1e6

and a pool fee f (percent) scales the revenue: H x (1 - f/100). Only energy is priced: the
strike is the marginal price above which running costs more than it earns (hosting,
depreciation and wear are not in it). See docs/market.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import UserError

SECONDS_PER_DAY = 86400
J_PER_MWH = 3.6e9
BLOCKS_PER_DAY = 144  # one block per 600 s on average
TH_PER_EH = 1e6


def _pos(name: str, v: float | None, allow_zero: bool = False) -> float:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{name} must be a number, got {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v:g}")
    return float(v)


def hashprice(btc_usd: float, network_eh_s: float, btc_per_block: float | None = None,
              btc_per_day: float | None = None) -> float:
    """$ per TH/s per day from the BTC price, the network hashrate and what the network mines
    (subsidy + fees, per block or per day; exactly one of them)."""
    btc_usd = _pos("BTC price", btc_usd)
    eh = _pos("network hashrate (EH/s)", network_eh_s)
    if (btc_per_block is None) == (btc_per_day is None):
        raise UserError("give the BTC mined per block (subsidy + fees) or per day, one of them")
    day = (_pos("BTC per block", btc_per_block) * BLOCKS_PER_DAY if btc_per_block is not None
           else _pos("BTC per day", btc_per_day))
    return btc_usd * day / (eh * TH_PER_EH)


def strike(efficiency_j_th: float, hashprice_usd_th_day: float, pool_fee_pct: float = 0.0) -> float:
    """The break-even power price in $/MWh (see the module docstring for the formula)."""
    e = _pos("efficiency (J/TH)", efficiency_j_th)
    h = _pos("hashprice ($/TH/day)", hashprice_usd_th_day, allow_zero=True)
    fee = _pos("pool fee (%)", pool_fee_pct, allow_zero=True)
    if fee >= 100:
        raise UserError(f"pool fee must be < 100 %, got {fee:g}")
    mwh_per_th_day = e * SECONDS_PER_DAY / J_PER_MWH
    return h * (1 - fee / 100.0) / mwh_per_th_day


@dataclass
class BlockStrike:
    name: str
    efficiency_j_th: float | None
    kw: float
    strike_usd_mwh: float | None         # computed (None: the block is not mining)
    configured_usd_mwh: float | None     # the block's strike_usd_mwh in site.toml, if any
    cls: str = "interruptible"           # the block's class (a heat block's strike is its mining value only)

    def as_dict(self) -> dict[str, Any]:
        d = {"block": self.name, "class": self.cls, "efficiency_j_th": self.efficiency_j_th, "kw": self.kw,
             "strike_usd_mwh": None if self.strike_usd_mwh is None else round(self.strike_usd_mwh, 2),
             "configured_strike_usd_mwh": self.configured_usd_mwh}
        # what running the block for an hour earns at break-even = its energy cost at the strike
        d["breakeven_usd_h"] = (None if self.strike_usd_mwh is None
                                else round(self.strike_usd_mwh * self.kw / 1000.0, 2))
        return d


def site_strikes(site: dict[str, Any], hashprice_usd_th_day: float, pool_fee_pct: float = 0.0,
                 default_efficiency: float | None = None, source: str = "site.toml") -> list[BlockStrike]:
    """One BlockStrike per [[blocks]] of a site.toml (as read by siteconfig.read_toml).

    A block's efficiency is its ``efficiency_j_th`` key (host-side: siteconfig strips it before
    the board's config), else ``default_efficiency`` (--efficiency) when the block has miners;
    a block without miners, or of ``class = "firm"``, gets no strike; a ``"heat"`` block's strike
    is its mining value only (the heat it supplies is worth more on top)."""
    blocks = site.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise UserError(f"{source}: no [[blocks]]")
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict):
            raise UserError(f"{source}: blocks[{i}] must be a table")
        name = str(b.get("name") or f"block{i + 1}")
        miners = b.get("miners") or 0
        kw = float(miners) * float(b.get("kw_per_miner") or 0)
        eff = b.get("efficiency_j_th")
        if eff is not None:
            eff = _pos(f"{source}: blocks[{i}].efficiency_j_th", eff)
        cls = b.get("class", "interruptible")
        mining = bool(miners) and cls != "firm"  # a heat block's miners mine too (their heat is extra value)
        if eff is None and mining:
            eff = default_efficiency
        conf = b.get("strike_usd_mwh")
        s = strike(eff, hashprice_usd_th_day, pool_fee_pct) if (eff is not None and mining) else None
        out.append(BlockStrike(name, eff if mining else None, kw, s,
                               float(conf) if isinstance(conf, (int, float)) and not isinstance(conf, bool) else None,
                               str(cls)))
    if all(bs.strike_usd_mwh is None for bs in out):
        raise UserError(f"{source}: no mining block has an efficiency: set efficiency_j_th = ... in its "
                        "[[blocks]] table or give --efficiency J/TH")
    return out
