"""7: the real-time figures the tests no longer bound (tests assert order and causality only):
slowest transaction on a fuzzed RTU line, MQTT reconnect back-off gaps after refusals, AC-sense
primary trip in cycles of the edge stream."""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import DEMO_SITE, MP_DIR, ROOT, last_json, micropython_cmd

SECTIONS = ("bounds",)  # the names `--only` takes for this module
DEFAULT = True  # part of a plain `make bench`


def add_args(ap: argparse.ArgumentParser) -> None:
    pass


def _test_string(path: Path, name: str) -> str:
    """A module-level string constant of a test file (the very script the test runs)."""
    import ast

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("%s has no %s" % (path, name))


def _refusing_broker(accepts: list[float]) -> tuple[socket.socket, threading.Thread]:
    """A broker that answers every CONNECT with CONNACK 5 (not authorized) and closes."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            accepts.append(time.monotonic())
            with c:
                c.settimeout(5)
                try:
                    c.recv(512)  # the CONNECT
                    c.sendall(b"\x20\x02\x00\x05")
                except OSError:
                    pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return srv, th


def bench_bounds(res: dict[str, Any], quick: bool) -> None:
    from gridshed.boards import budget_heapsize
    from gridshed.build import build

    out: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="gridshed-bench-bounds-"))
    try:
        mpy = Path(build("unix-sim", out=work / "mpy")["path"])
        env = dict(os.environ, MICROPYPATH="%s:.frozen" % mpy)
        # a) the fuzzed RTU line of tests/firmware/test_modbus_fuzz.py: slowest transaction
        n = 100 if quick else 300
        script = _test_string(ROOT / "tests" / "firmware" / "test_modbus_fuzz.py", "MASTER_FUZZ")
        script = script.replace("SEED", "7").replace("range(N)", "range(%d)" % n)
        r = subprocess.run(micropython_cmd() + ["-X", "heapsize=64k", "-c", script], capture_output=True,
                           text=True, timeout=300, env=env)
        if r.returncode:
            raise RuntimeError("fuzz script failed: " + r.stderr[-800:])
        f = last_json(r.stdout)
        out["fuzz"] = {"transactions": n, "max_ms": f["max_ms"], "ok": f["ok"], "err": f["err"],
                       "timeout_ms": 3, "retries": "0/1"}
        # b) MQTT reconnect back-off after refusals: gaps between CONNECTs (expected 0.2, 0.4,
        # 0.8, 1.6 s each times 1..1.5 jitter)
        accepts: list[float] = []
        srv, _ = _refusing_broker(accepts)
        try:
            subprocess.run(micropython_cmd() + ["-X", "heapsize=" + budget_heapsize(), str(MP_DIR / "mqtt_backoff.py"),
                            str(srv.getsockname()[1]), "4.5"],
                           capture_output=True, text=True, timeout=60, env=env)
        finally:
            srv.close()
        gaps = [round(b - a, 3) for a, b in zip(accepts, accepts[1:])]
        nominal = [0.2 * 2 ** i for i in range(len(gaps))]
        out["mqtt_backoff"] = {"gaps_s": gaps, "nominal_s": nominal,
                               "late_s": [round(g - 1.5 * e, 3) for g, e in zip(gaps, nominal)]}
        # c) AC sense primary: the test's fast excursion, relay open in cycles of the edge stream
        from gridshed import siteconfig
        from gridshed.sim.acsense import AcOptions
        from gridshed.sim.scenario import load_scenario
        from gridshed.sim.site import run_site

        scn = work / "fast.csv"
        scn.write_text("t_s,hz\n0,60\n2.0,60\n2.1,59.5\n3.2,59.5\n")
        text = DEMO_SITE.read_text()
        for k, v in (("pickup_hz", 59.85), ("min_off_s", 60), ("restore_hold_s", 30)):
            text = re.sub(r"(?m)^%s = .*$" % k, "%s = %s" % (k, v), text)
        (work / "site.toml").write_text(text + '\n[ac_sense]\nrole = "primary"\ncycles = 4\n')
        cfg = siteconfig.load_site(work / "site.toml")
        cyc = []
        for _ in range(1 if quick else 3):
            s = asyncio.run(run_site(load_scenario(scn), cfg, settle_s=0.5, heapsize=budget_heapsize(),
                                     meter_update_ms=3_600_000,
                                     ac_opts=AcOptions(jitter_us=20, phase_jumps=[(1.0, 20.0)], extra_edge_prob=0.02)))
            t = next(t for t in s["trips"] if t["cause"] == "under-frequency")
            if t.get("latency_ms") is not None:
                cyc.append(round(t["latency_ms"] / 1000 * 60, 2))
        out["acsense_primary"] = {"cycles": cyc, "target_cycles": 6, "runs": 1 if quick else 3}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["bounds"] = out


def run(res: dict[str, Any], a: argparse.Namespace) -> None:
    bench_bounds(res, a.quick)


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """This section's rows of the table `make bench` prints (figure, value, vs reference / note)."""
    rows: list[tuple[str, str, str]] = []
    b = res.get("bounds")
    if b:
        f = b["fuzz"]
        rows.append(("7 fuzzed RTU line, slowest txn", "%s ms (%s txns, %s ok)" % (f["max_ms"], f["transactions"], f["ok"]),
                     "timeout 3 ms, up to 2 attempts"))
        m = b["mqtt_backoff"]
        rows.append(("7 MQTT back-off gaps after refusals", ", ".join("%.2f" % g for g in m["gaps_s"]) + " s",
                     "nominal " + ", ".join("%.1f" % x for x in m["nominal_s"]) + " s x1..1.5"))
        a = b["acsense_primary"]
        rows.append(("7 AC sense primary trip", ", ".join(str(c) for c in a["cycles"]) + " cycles",
                     "target within %d cycles" % a["target_cycles"]))
    return rows
