"""The market loop's host commands (docs/market.md): `gridshed backtest` (the board's own
decision code over a price history). `gridshed breakeven` and `gridshed dispatch` join this
group."""
from __future__ import annotations

import argparse

from .output import emit, note

BACKTEST_EXAMPLES = """examples:
  gridshed backtest scenarios/ercot_prices.csv --site scenarios/market-site.toml
  gridshed backtest prices.csv --site site.toml --json
  gridshed backtest prices.csv --site site.toml --report backtest.html

PRICES.csv: a header with interval_start (ISO 8601 with a UTC offset, e.g.
2026-08-14T17:00:00-05:00) and price_usd_mwh; the interval length comes from the data (the most
common step; a longer step is a gap). The decisions are the board's own (agent/market.py): the
site's strike prices, min run/off times, cycle caps, ramp limits and RRS/FFR obligation hours.

--json: always_on and strategy, each with energy_cost_usd, energy_mwh, mining_revenue_usd and
net_usd; strategy also has curtailed_mwh, curtailed_hours, cycles (per block),
obligation_refusals and obligation_short_hours; series holds the per-interval figures.
Mining revenue per block = its revenue_usd_mwh (default: its strike) x the MWh it ran.

exit status: 0 done, 2 a bad price file or site file (one line on stderr says which)."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("backtest", parents=[common], help="run a price history through the board's market decisions",
                       description="Replay PRICES.csv through the decision code the board runs (agent/market.py) "
                                   "and compare energy cost, energy and mining revenue with running always on.",
                       epilog=BACKTEST_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prices", metavar="PRICES.csv", help="price history CSV (interval_start, price_usd_mwh)")
    p.add_argument("--site", required=True, metavar="SITE.toml", help="site file with [[blocks]] strikes and [market]")
    p.add_argument("--board", default=None, help="board file name (default: the site's board)")
    p.add_argument("--report", metavar="FILE", help="also plot price, load and curtailment to FILE (.png or .html)")
    p.set_defaults(func=run_backtest)


def run_backtest(args: argparse.Namespace) -> int:
    from .. import backtest, siteconfig

    prices = backtest.load_prices(args.prices)
    cfg = siteconfig.load_site(args.site, board_name=args.board)
    res = backtest.run(cfg, prices)
    if args.report:
        backtest.write_report(res, args.report)
        if not args.json:
            note(f"report: {args.report}")
    if not args.json:
        res_text = backtest.render_text(res)
    emit(args, res, lambda: res_text)
    return 0
