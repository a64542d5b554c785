"""1 + 2: micro benchmarks on the unix port (bench/mp/mpbench.py, several modes): Modbus RTU master
CPU and allocation per transaction, control cycle time, valgrind Ir and MCU estimates."""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from common import MICRO_HEAP, MP_DIR, demo_cfg, fmt, last_json, run_mp, say

SECTIONS = ("modbus", "cycle")  # the names `--only` takes for this module
DEFAULT = True  # part of a plain `make bench`


def add_args(ap: argparse.ArgumentParser) -> None:
    pass


def _micro_setup(work: Path) -> Path:
    """Inputs of the micro benchmarks: config, canned Modbus reply, hot register bytes."""
    import struct

    from agent.crc import crc16_modbus
    from agent.meter_encode import MeterMap

    cfg = demo_cfg()
    cfg.pop("warnings", None)
    mm = MeterMap(cfg["meter"]["map"])
    values = {"hz": 60.0, "kw": 1000.0}
    hot_regs = []
    ref_off = []
    # the cycle decodes hz and kw (the reads that cover both; the agent reads kW more slowly
    # since issue 18, so this is the worst cycle: both values decoded)
    for start, count in mm.plan_for(("hz", "kw")):
        items = mm._covered(start, count)
        buf = bytearray(2 * count)
        for i in items:
            name = mm.names[i]
            words = mm.encode(name, values.get(name, 0.0))
            off = 2 * (mm._addr[i] - start)
            for k, w in enumerate(words):
                buf[off + 2 * k] = (w >> 8) & 0xFF
                buf[off + 2 * k + 1] = w & 0xFF
            if len(hot_regs) == 0 and name in ("hz", "kw"):
                ref_off.append((name, off))
        hot_regs.append(buf.hex())
    offs = dict(ref_off)
    ref = [offs.get("hz", 0), offs.get("kw", 0)]
    # the Modbus transaction: a read of 2 registers (the meter's hz register pair)
    unit = cfg["meter"]["unit"]
    fn = mm.function
    addr = mm._addr[mm.names.index("hz")]
    data = struct.pack(">f", 60.0)
    frame = bytearray([unit, fn, 4]) + data
    c = crc16_modbus(frame)
    frame += bytes([c & 0xFF, c >> 8])
    setup = {"cfg": cfg, "hot_regs": hot_regs, "ref_off": ref,
             "modbus": {"unit": unit, "fn": fn, "addr": addr, "count": 2, "reply": frame.hex()}}
    p = work / "setup.json"
    p.write_text(json.dumps(setup))
    return p


# Cycles per x86-64 instruction assumed for the MCU estimates (see bench/README.md, "estimates").
# MicroPython's VM compiled for Xtensa LX6/LX7 or Thumb-1 needs somewhat more instructions than
# for x86-64 (fewer addressing modes, no 64-bit registers but also only 16/24-bit instruction
# forms) and runs at CPI > 1 from XIP flash through a small cache: we take 2.0 cycles per x86-64
# instruction for the ESP32 and for the RP2040, with a 1.5-3.0 band. Cross-check: the same
# published MicroPython benchmark (scruss.com "Parallel MicroPython Benchmarking", 2025) ran 15.4 s
# on an ESP32 @160 MHz (-> 10.3 s scaled to 240 MHz) and 19.8 s on an RP2040 @125 MHz: 1.9x,
# which the two clock rates with an equal factor reproduce (240/125 = 1.92).
MCU = {"esp32_240MHz": (240e6, 2.0, 1.5, 3.0), "rp2040_125MHz": (125e6, 2.0, 1.5, 3.0)}


def bench_micro(res: dict[str, Any], quick: bool, do_modbus: bool, do_cycle: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="gridshed-bench-"))
    try:
        (work / "j").mkdir()
        script = work / "mpbench.py"
        shutil.copyfile(MP_DIR / "mpbench.py", script)
        setup = _micro_setup(work)
        n = 300 if quick else 2000
        nc = 200 if quick else 1000
        rounds = 3 if quick else 5
        say("micro: timing on the unix port (N=%d txn, %d cycles, %d rounds)" % (n, nc, rounds))
        out, _ = run_mp(script, ["time", str(n), str(setup), str(work), str(rounds), str(nc)], heapsize=MICRO_HEAP)
        r = last_json(out)
        if do_modbus:
            m, ref = min(r["modbus_us"]["master"]), min(r["modbus_us"]["ref"])
            res["modbus"] = {
                "us_per_txn_master": round(m, 2), "us_per_txn_ref": round(ref, 2),
                "ratio_master_to_ref": round(m / ref, 2),
                "alloc_bytes_per_txn_master": round(r["modbus_alloc"]["master"], 1),
                "alloc_bytes_per_txn_ref": round(r["modbus_alloc"]["ref"], 1),
                # the public API (await read(): one coroutine object per call), for comparison
                "us_per_txn_master_api": round(min(r["modbus_us"]["master_api"]), 2),
                "ratio_master_api_to_ref": round(min(r["modbus_us"]["master_api"]) / ref, 2),
                "alloc_bytes_per_txn_master_api": round(r["modbus_alloc"]["master_api"], 1),
                "rounds_us": r["modbus_us"], "n_per_round": n,
            }
        if do_cycle:
            cu = {k: min(v) for k, v in r["cycle_us"].items()}
            res["cycle"] = {
                "us_per_cycle": round(cu["cycle"], 2), "us_per_cycle_ref": round(cu["cycle_ref"], 2),
                "ratio_cycle_to_ref": round(cu["cycle"] / cu["cycle_ref"], 2),
                "us_decode_step_only": round(cu["cycle_nojournal"], 2),
                "us_journal_append_only": round(cu["journal_only"], 2),
                "alloc_bytes_per_cycle": {k: round(v, 1) for k, v in r["cycle_alloc"].items()},
                "controller_state": r["ctrl_state"], "journal": r["journal"],
                "rounds_us": r["cycle_us"], "n_per_round": nc,
            }
        # valgrind instruction counts: Ir(setup + N iterations) - Ir(setup only), divided by N
        if not shutil.which("valgrind"):
            res.setdefault("notes", []).append("valgrind not found: no instruction counts")
            return
        nv = 200 if quick else 1000
        modes = ["none"]
        if do_cycle:
            modes += ["cycle", "cycle_ref", "cycle_nojournal"]
        if do_modbus:
            modes += ["modbus_master", "modbus_ref"]
        irs: dict[str, int] = {}
        for i, mode in enumerate(modes):
            say("micro: callgrind %s (N=%d)" % (mode, 0 if mode == "none" else nv))
            # a fresh, equally long work dir per run: the journal recovery scan and path lengths
            # must not differ between the runs that are subtracted
            vw = work / ("vg%02d" % i)
            (vw / "j").mkdir(parents=True)
            _, ir = run_mp(script, [mode, str(nv), str(setup), str(vw)], heapsize=MICRO_HEAP, valgrind=True,
                           timeout=600)
            if ir is None:
                raise RuntimeError("callgrind gave no instruction count")
            irs[mode] = ir
        per = {k: (v - irs["none"]) / nv for k, v in irs.items() if k != "none"}
        if do_modbus:
            res["modbus"]["ir_per_txn_master"] = round(per["modbus_master"])
            res["modbus"]["ir_per_txn_ref"] = round(per["modbus_ref"])
            res["modbus"]["ir_ratio_master_to_ref"] = round(per["modbus_master"] / per["modbus_ref"], 2)
        if do_cycle:
            c = res["cycle"]
            c["ir_per_cycle"] = round(per["cycle"])
            c["ir_per_cycle_ref"] = round(per["cycle_ref"])
            c["ir_per_cycle_decode_step_only"] = round(per["cycle_nojournal"])
            c["ir_ratio_cycle_to_ref"] = round(per["cycle"] / per["cycle_ref"], 2)
            c["ir_setup_only_process"] = irs["none"]
            est = {}
            for chip, (hz, f, lo, hi) in MCU.items():
                for key, ir in (("cycle", per["cycle"]), ("decode_step_only", per["cycle_nojournal"]),
                                ("ref", per["cycle_ref"])):
                    est["%s_%s_ms" % (chip, key)] = round(ir * f / hz * 1000, 3)
                est["%s_cycle_ms_band" % chip] = [round(per["cycle"] * lo / hz * 1000, 3),
                                                   round(per["cycle"] * hi / hz * 1000, 3)]
                est["%s_cpu_share_at_20Hz" % chip] = round(per["cycle"] * f / hz * 20, 4)
            c["mcu_estimate"] = est
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(res: dict[str, Any], a: argparse.Namespace) -> None:
    bench_micro(res, a.quick, "modbus" in a.only, "cycle" in a.only)


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """This section's rows of the table `make bench` prints (figure, value, vs reference / note)."""
    rows: list[tuple[str, str, str]] = []
    m = res.get("modbus")
    if m:
        rows.append(("1 modbus RTU read(2 regs), CPU", "%s us/txn (ref %s us)" % (fmt(m["us_per_txn_master"]), fmt(m["us_per_txn_ref"])),
                     "x%s of ref" % m["ratio_master_to_ref"]))
        if "ir_per_txn_master" in m:
            rows.append(("1 modbus instructions (callgrind)", "%s Ir/txn (ref %s)" % (m["ir_per_txn_master"], m["ir_per_txn_ref"]),
                         "x%s of ref" % m["ir_ratio_master_to_ref"]))
        rows.append(("1 modbus bytes allocated", "%s B/txn (ref %s B)" % (fmt(m["alloc_bytes_per_txn_master"]), fmt(m["alloc_bytes_per_txn_ref"])),
                     "unix port, 64-bit; poll path (begin/step)"))
        if "us_per_txn_master_api" in m:
            rows.append(("1 modbus via await read()", "%s us/txn, %s B/txn" % (fmt(m["us_per_txn_master_api"]),
                                                                           fmt(m["alloc_bytes_per_txn_master_api"])),
                         "x%s of ref (a coroutine per call)" % m["ratio_master_api_to_ref"]))
    c = res.get("cycle")
    if c:
        rows.append(("2 control cycle time", "%s us (ref %s us)" % (fmt(c["us_per_cycle"]), fmt(c["us_per_cycle_ref"])),
                     "x%s of ref" % c["ratio_cycle_to_ref"]))
        rows.append(("2   of which decode+step / journal", "%s us / %s us" % (fmt(c["us_decode_step_only"]), fmt(c["us_journal_append_only"])), ""))
        if "ir_per_cycle" in c:
            rows.append(("2 control cycle instructions", "%s Ir (ref %s; decode+step %s)" % (
                c["ir_per_cycle"], c["ir_per_cycle_ref"], c["ir_per_cycle_decode_step_only"]), "x%s of ref" % c["ir_ratio_cycle_to_ref"]))
            e = c["mcu_estimate"]
            for chip, label in (("esp32_240MHz", "ESP32 @240 MHz"), ("rp2040_125MHz", "RP2040 @125 MHz")):
                rows.append(("2 %s (ESTIMATE)" % label, "%s ms/cycle (band %s-%s); decode+step %s ms" % (
                    e[chip + "_cycle_ms"], *e[chip + "_cycle_ms_band"], e[chip + "_decode_step_only_ms"]),
                    "%.1f%% CPU at 20 Hz, excl. flash write" % (100 * e[chip + "_cpu_share_at_20Hz"])))
        rows.append(("2 cycle bytes allocated", "%s B (decode+step %s B)" % (
            fmt(c["alloc_bytes_per_cycle"]["cycle"]), fmt(c["alloc_bytes_per_cycle"]["cycle_nojournal"])), ""))
    return rows
