#!/usr/bin/env python3
"""`make bench` / `python bench/run.py`: speed, latency and memory figures (bench/README.md).

Every figure is measured in one run of this command and, where it is a speed, reported next to a
reference measured in the same process or the same command (machines are noisy; ratios travel,
absolute times do not). Nothing here asserts a timing: tests never time things, benchmarks do.

Sections (``--only`` takes a comma list of these names):
  modbus   Modbus RTU master CPU and allocation per transaction (unix port, memory-backed UART)
  cycle    control cycle (decode + controller step + journal append): time, valgrind Ir, MCU estimates
  latency  end-to-end trip latency in the simulated site (RTU 9600, RTU 19200, TCP), many dips per run
  memory   smallest -X heapsize that runs the agent through a dip (bisect; base agent and every
           optional feature at once), heap in use, .mpy sizes
  fleet    one signed site command over a real Mosquitto -> last of N boards acting
  host     deploy time to a virtual board, provision throughput
  bounds   the real-time figures the tests no longer bound (tests assert order and causality
           only): slowest transaction on a fuzzed RTU line, MQTT reconnect back-off gaps after
           refusals, AC-sense primary trip in cycles of the edge stream
  install  `pipx install .` into a private PIPX_HOME, then the installed gridshed from another
           directory: boards, meters, build, sim, vboard + deploy + status
  soak     optional (not in the default run): the real agent against the hostile meter
           (tests/e2e/hostile_meter.py) in a random mix of every misbehaviour for --soak-s
           seconds (default 600): free memory over time, counters, relay moves (must be none)

Each section is a module beside this file (micro.py: modbus + cycle, latency.py, memory.py, fleet.py,
host.py, bounds.py, install.py, soak.py; shared helpers in common.py); its MicroPython scripts are in bench/mp/.
A module gives SECTIONS (its --only names), DEFAULT (in a plain run), add_args(ap), run(res, args)
and table_rows(res). This file only parses the options, runs the sections and prints the table.

Results: a table on stdout and bench/results.json (gitignored).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the section modules beside this file

import bounds  # noqa: E402
import fleet  # noqa: E402
import host  # noqa: E402
import install  # noqa: E402
import latency  # noqa: E402
import memory  # noqa: E402
import micro  # noqa: E402
import soak  # noqa: E402
import tls  # noqa: E402
from common import BENCH_DIR, FIRMWARE, machine_info, say  # noqa: E402

# in the order they run and their rows print
MODULES = (micro, latency, memory, fleet, host, bounds, tls, install, soak)
SECTIONS = tuple(s for m in MODULES for s in m.SECTIONS)
DEFAULT_SECTIONS = tuple(s for m in MODULES if m.DEFAULT for s in m.SECTIONS)  # soak only when asked: it is long


def table(res: dict[str, Any]) -> str:
    rows = [r for m in MODULES for r in m.table_rows(res)]
    w1 = max((len(r[0]) for r in rows), default=10)
    w2 = max((len(r[1]) for r in rows), default=10)
    lines = ["%-*s  %-*s  %s" % (w1, "figure", w2, "value", "vs reference / note"), "-" * (w1 + w2 + 30)]
    lines += ["%-*s  %-*s  %s" % (w1, a, w2, b, c) for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                    help="comma list of: " + ", ".join(SECTIONS) + " (default: all but soak)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and events (a smoke run, not figures)")
    ap.add_argument("--out", default=str(BENCH_DIR / "results.json"))
    for m in MODULES:
        m.add_args(ap)
    a = ap.parse_args(argv)
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    for s in a.only:
        if s not in SECTIONS:
            ap.error("unknown section %r" % s)
    sys.path.insert(0, str(FIRMWARE))  # agent.* on the host (pure modules), as the tests do
    t_start = time.monotonic()
    res: dict[str, Any] = {"machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "quick": a.quick}
    secs: dict[str, float] = {}
    for m in MODULES:
        wanted = [s for s in m.SECTIONS if s in a.only]
        if not wanted:
            continue
        name = "+".join(m.SECTIONS)
        t0 = time.monotonic()
        try:
            m.run(res, a)
        except Exception as e:
            res.setdefault("errors", {})[name] = "%s: %s" % (type(e).__name__, e)
            say("bench %s failed: %s" % (name, e))
        secs[name] = round(time.monotonic() - t0, 1)
    res["section_seconds"] = secs
    res["total_seconds"] = round(time.monotonic() - t_start, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    mi = res["machine"]
    print("machine: %s, %s cores (%s usable), Python %s, %s" % (mi.get("cpu"), mi.get("cores"), mi.get("cores_usable"),
                                                               mi.get("python"), mi.get("micropython", "").split(" | ")[0]))
    print(table(res))
    for k, v in (res.get("errors") or {}).items():
        print("ERROR in %s: %s" % (k, v))
    print("total %.0f s; sections %s; written %s" % (res["total_seconds"], secs, out))
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
