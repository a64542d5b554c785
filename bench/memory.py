"""4: memory: the smallest -X heapsize that runs the agent through a dip (bisect; base agent, code in
ROMFS, every optional feature at once), heap in use, .mpy sizes."""
from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BUDGET_WK, DEMO_SITE, demo_cfg, dip_scenario, free_port, heap_bytes, say, start_mosquitto

SECTIONS = ("memory",)  # the names `--only` takes for this module
DEFAULT = True  # part of a plain `make bench`


def add_args(ap: argparse.ArgumentParser) -> None:
    pass


MEM_TRIP = {"delay_ms": 0, "samples": 1, "restore_hold_s": 0.5, "min_off_s": 1.0, "stagger_s": 0.1, "jitter_s": 0.0}


def mem_scenario():
    """One dip (60 -> 59.5 Hz for 0.5 s at 0.8 s), then time to restore every block."""
    sc = dip_scenario(1, period=1.0, dip_s=0.5, lead=0.8)
    sc.t[-1] += 2.5  # time to restore
    return sc


def _mem_judge(r: dict[str, Any], s: dict[str, Any] | None, text: str) -> None:
    """Fill r (control_ok, ok, mem_free, why) from a run_site summary and the console log."""
    ctl_memerr = any("MemoryError" in ln for ln in text.splitlines() if not ln.startswith("@"))
    r["memory_error_in_log"] = "MemoryError" in text
    if s is not None:
        st = s.get("board_status") or {}
        opened = any(t.get("relay_open_s") is not None for t in s["trips"])
        bad = ctl_memerr or "Traceback" in text or "crashed" in text
        restarts = text.count("[vboard") > 2  # start + exit markers of one process only
        # control: tripped and restored with no MemoryError outside the console reply;
        # full: that, and @status answered (the console module loads on demand)
        r["control_ok"] = opened and s["all_restored"] and not bad and not restarts
        r["status_error"] = st.get("error")
        r["mem_free"] = st.get("mem_free")
        r["ok"] = r["control_ok"] and r["mem_free"] is not None
        if not r["ok"]:
            r["why"] = "opened=%s restored=%s status=%s MemoryError(control)=%s restarts=%s" % (
                opened, s["all_restored"], st.get("error") or bool(st), ctl_memerr, restarts)
    else:
        r["control_ok"] = False


def mem_try(k: int, work: Path, romfs_image: bytes | None = None, firmware_dir: Path | None = None) -> dict[str, Any]:
    """One demo dip at -X heapsize=<k>wK; with romfs_image the agent's code is in the virtual
    board's ROMFS partition (firmware_dir then holds main.py only) and the heap counted is the
    agent's own (the virtual board adds the partition buffer, a board keeps it in flash)."""
    from gridshed.sim.site import FIRMWARE, run_site

    cfg = demo_cfg(**MEM_TRIP)
    bdir = work / ("%sb%d" % ("rom-" if romfs_image else "", k))
    log = bdir.with_name(bdir.name + ".console.log")
    r: dict[str, Any] = {"k": k}
    if romfs_image is not None:
        from gridshed.vboard import make_romfs_partition

        bdir.mkdir(parents=True, exist_ok=True)
        make_romfs_partition(bdir, ROMFS_PARTITION, romfs_image)
    try:
        s = asyncio.run(run_site(mem_scenario(), cfg, heapsize="%dwK" % k, keep_dir=bdir, settle_s=0.3, boot_timeout=15,
                                 status_timeout=3, firmware_dir=firmware_dir or FIRMWARE))
    except Exception as e:
        r.update(ok=False, why="%s: %s" % (type(e).__name__, str(e)[:200]))
        s = None
    text = log.read_text(errors="replace") if log.exists() else ""
    _mem_judge(r, s, text)
    shutil.rmtree(bdir, ignore_errors=True)
    log.unlink(missing_ok=True)
    return r


ROMFS_PARTITION = 0x20000  # 128 KiB, as MicroPython's partitions-4MiB-romfs.csv


def bench_romfs(quick: bool, lo: int = 32, hi: int = 64) -> dict[str, Any]:
    """The agent's code in a ROMFS partition (docs/romfs.md): heap cost of importing the resident
    modules from the image vs from .mpy files (fresh process each, image buffer excluded), and the
    smallest heap at which the demo dip runs with the code in ROMFS."""
    from gridshed import romfs
    from gridshed.build import build, site_features

    work = Path(tempfile.mkdtemp(prefix="gridshed-bench-romfs-"))
    out: dict[str, Any] = {}
    try:
        # the demo site's build: an image with every optional feature no longer fits 128 KiB
        feats, board = site_features(DEMO_SITE, None)
        man = build(board, out=work / "unix-sim", romfs=True, features=feats)
        d = Path(man["path"])
        image = (d / romfs.IMAGE).read_bytes()
        out["image_bytes"] = len(image)
        out["imports"] = romfs.measure_imports(d / romfs.IMAGE, d, romfs.RESIDENT)
        main_only = work / "main-only"
        main_only.mkdir()
        shutil.copyfile(d / "main.py", main_only / "main.py")
        tried: dict[int, dict[str, Any]] = {}

        def at(k: int) -> bool:
            if k not in tried:
                say("memory: agent in ROMFS at %dwK" % k)
                tried[k] = mem_try(k, work, image, main_only)
            return bool(tried[k]["ok"])

        step = 4 if quick else 2
        if at(hi):
            while hi - lo > step:
                mid = (hi + lo) // 2
                if at(mid):
                    hi = mid
                else:
                    lo = mid
            out["min_heapsize_wK"] = hi
        else:
            out["min_heapsize_wK"] = None
        out["highest_failing_wK"] = lo
        out["resolution_wK"] = step
        out["tries"] = [tried[k] for k in sorted(tried)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# the agent with every optional feature configured at once (section 4, "full features")
FULL_KID = b"bench-ops"
FULL_MINERS = (("cgminer", 0), ("cgminer", 0), ("luxos", 1), ("luxos", 1))  # (firmware, block)
FULL_FEATURES = ("modbus_server (tcp)", "udp", "mqtt", "signals.dry_contact", "override", "ac_sense (secondary)",
                 "miners", "keys.cbor")


def full_features_cfg(mqtt_port: int, udp_port: int, mb_port: int, miner_hosts: list[dict[str, Any]],
                      mqtt_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo site (RTU meter, memory-run trip timers) with every optional feature configured."""
    from gridshed import siteconfig

    site = siteconfig.read_toml(DEMO_SITE)
    site["trip"] = dict(site["trip"], **MEM_TRIP)
    site["signals"] = {"dry_contact": True, "dry_contact_active": 1, "mode": "level"}
    site["override"] = {"mode": "lockout"}  # switch to GND, pulled up: released unless driven
    site["modbus_server"] = {"transport": "tcp", "port": mb_port}
    site["udp"] = {"port": udp_port}
    site["mqtt"] = {"host": "127.0.0.1", "port": mqtt_port, "keepalive_s": 30, "telemetry_s": 1.0, **(mqtt_extra or {})}
    site["ac_sense"] = {"role": "secondary"}  # fed zero-crossing edges by run_site (sim/acsense.py)
    site["miners"] = {"api": "cgminer", "timeout_ms": 600, "stagger_ms": 100, "hosts": miner_hosts}
    return siteconfig.normalize(site, source=str(DEMO_SITE))


def _full_requests(cfg: dict[str, Any], key: bytes, udp_port: int, mb_port: int) -> Any:
    """After the dip: one signed `test` on the console, one signed `ping` over UDP, one utility
    Modbus read (function 3, the whole map), each recorded on its own."""
    def ask(console_port: str) -> dict[str, Any]:
        from gridshed.fleet_client import send_serial, send_udp
        from gridshed.signing import make_command

        out: dict[str, Any] = {}
        dev = cfg["device"]
        try:
            out["cmd_console"] = send_serial(console_port, make_command(key, FULL_KID, "test", 1, target_device=dev), 5.0)
        except Exception as e:
            out["cmd_console"] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        try:
            out["cmd_udp"] = send_udp("127.0.0.1", udp_port, make_command(key, FULL_KID, "status", 2, target_device=dev), 3.0)
        except Exception as e:
            out["cmd_udp"] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        try:
            from pymodbus.client import ModbusTcpClient

            c = ModbusTcpClient("127.0.0.1", port=mb_port, timeout=2, retries=0)
            try:
                c.connect()
                rr = c.read_holding_registers(0, count=19, device_id=1)
                out["modbus_read"] = {"ok": not rr.isError(), "regs": None if rr.isError() else list(rr.registers)}
            finally:
                c.close()
        except Exception as e:
            out["modbus_read"] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        return out

    return ask


async def _full_site(k: int, bdir: Path, mqtt_port: int, tls: Any = None) -> dict[str, Any]:
    from gridshed import siteconfig
    from gridshed.signing import new_key
    from gridshed.sim.miners import MinerFarm, SimMiner
    from gridshed.sim.site import run_site

    farm = MinerFarm([SimMiner(block=b, firmware=fw) for fw, b in FULL_MINERS])
    await farm.start()
    try:
        hosts = farm.hosts_config()
        for h, m in zip(hosts, farm.miners):
            if m.firmware == "luxos":
                h["api"] = "luxos"
        udp_port, mb_port = free_port(socket.SOCK_DGRAM), free_port()
        cfg = full_features_cfg(mqtt_port, udp_port, mb_port, hosts, tls[0] if tls else None)
        key = new_key()
        files = {"keys.cbor": siteconfig.keys_bytes({FULL_KID: key})}
        if tls:  # (mqtt settings, /broker.cbor): bench/tls.py's TLS + login variant
            files["broker.cbor"] = tls[1]
        return await run_site(mem_scenario(), cfg, heapsize="%dwK" % k, keep_dir=bdir, settle_s=0.3, boot_timeout=15, status_timeout=3,
                              extra_files=files, on_load=farm.attach,
                              before_status=_full_requests(cfg, key, udp_port, mb_port))
    finally:
        await farm.stop()


def full_try(k: int, work: Path, mqtt_port: int, tag: str = "", tls: Any = None) -> dict[str, Any]:
    """The full-feature agent at -X heapsize=<k>wK: ok = the base criteria, no MemoryError
    anywhere in the console log, both signed commands and the Modbus read answered, and every
    feature present in @status (MQTT connected, AC sense measuring)."""
    bdir = work / ("f%d%s" % (k, tag))
    log = bdir.with_name(bdir.name + ".console.log")
    r: dict[str, Any] = {"k": k}
    try:
        s = asyncio.run(_full_site(k, bdir, mqtt_port, tls))
    except Exception as e:
        r.update(ok=False, why="%s: %s" % (type(e).__name__, str(e)[:200]))
        s = None
    text = log.read_text(errors="replace") if log.exists() else ""
    _mem_judge(r, s, text)
    if s is not None:
        st = s.get("board_status") or {}
        req = s.get("before_status") or {}
        checks = {
            "cmd_console": bool((req.get("cmd_console") or {}).get("ok")),
            "cmd_udp": bool((req.get("cmd_udp") or {}).get("ok")),
            "modbus_read": bool((req.get("modbus_read") or {}).get("ok")),
            "modbus_server": "modbus_server" in st,
            "mqtt": bool((st.get("mqtt") or {}).get("connected")),
            "ac_sense": bool((st.get("ac_sense") or {}).get("ok")),
            "miners": "miners" in st,
            "override": bool(st.get("override")),
        }
        r["checks"] = checks
        failed = [n for n, v in checks.items() if not v]
        r["ok"] = bool(r["ok"]) and not r["memory_error_in_log"] and not failed
        if not r["ok"]:
            r["why"] = "; ".join(x for x in (r.get("why"), "MemoryError in log" if r["memory_error_in_log"] else None,
                                             ("failed: " + ",".join(failed)) if failed else None) if x)
            if failed:
                r["requests"] = {n: (v if n != "modbus_read" else {kk: vv for kk, vv in v.items() if kk != "regs"})
                                 for n, v in req.items()}
    shutil.rmtree(bdir, ignore_errors=True)
    log.unlink(missing_ok=True)
    return r


def bench_full_features(quick: bool, lo: int = 64, hi: int = 160, step: int = 4, tls: Any = None,
                        guess: int = 128) -> dict[str, Any]:
    """Bisect the heap floor of the full-feature agent in [lo, hi] wK (first guess 128wK).
    tls: (start(work) -> (broker process, port), mqtt settings, /broker.cbor bytes) for the
    TLS + login variant (bench/tls.py)."""
    out: dict[str, Any] = {"features": list(FULL_FEATURES), "miners": ["%s block %d" % m for m in FULL_MINERS],
                           "search_wK": [lo, hi], "resolution_wK": step}
    work = Path(tempfile.mkdtemp(prefix="gridshed-bench-full-"))
    tried: dict[int, dict[str, Any]] = {}
    broker = None
    t0 = time.monotonic()
    # the sim meter's pymodbus server logs every odd frame (boards that ran out of memory mid-poll)
    import logging

    mblog = logging.getLogger("pymodbus")
    mblevel = mblog.level
    mblog.setLevel(logging.CRITICAL)
    try:
        broker, mqtt_port = tls[0](work) if tls else start_mosquitto(work)
        board_tls = (tls[1], tls[2]) if tls else None

        def at(k: int) -> dict[str, Any]:
            if k not in tried:
                say("memory: full-feature agent at %dwK" % k)
                tried[k] = full_try(k, work, mqtt_port, tls=board_tls)
                say("  %s" % ("ok, mem_free %s" % tried[k].get("mem_free") if tried[k]["ok"] else tried[k].get("why")))
            return tried[k]

        # first guess 128wK (near the floor measured so far), then halve the bracket (good
        # passes, bad fails; 128 - 64 and 160 - 128 are step x a power of 2)
        good: int | None
        bad: int | None
        if at(guess)["ok"]:
            good, bad = guess, lo
        elif at(hi)["ok"]:
            good, bad = hi, guess
        else:
            good, bad = None, hi
        while good is not None and bad is not None and good - bad > step:
            mid = (good + bad) // 2
            if at(mid)["ok"]:
                good = mid
            else:
                bad = mid
        if good is not None and bad == lo and at(lo)["ok"]:
            good, bad = lo, None  # fits at the bottom of the search range
        # the floor is confirmed by a second, fresh run; if that fails, the floor moves up a step
        # (a heap this close to full fails on fragmentation, which depends on task timing)
        confirm: list[dict[str, Any]] = []
        flaky: list[int] = []
        while good is not None and len(confirm) < 3:
            say("memory: full-feature agent at %dwK again (confirm)" % good)
            c = full_try(good, work, mqtt_port, tag="again", tls=board_tls)
            say("  %s" % ("ok, mem_free %s" % c.get("mem_free") if c["ok"] else c.get("why")))
            confirm.append(c)
            if c["ok"]:
                break
            flaky.append(good)
            nxt = good + step
            while nxt <= hi and not at(nxt)["ok"]:
                nxt += step
            good = nxt if nxt <= hi else None
        if good is None and all("checks" not in t for t in tried.values()):
            # no board ever ran to the end (an exception on the host side): not a memory figure
            out["error"] = "every run failed before the board's answers: %s" % tried[max(tried)].get("why")
        out["min_heapsize_wK"] = good
        out["confirmed"] = bool(confirm and confirm[-1]["ok"])
        out["highest_failing_wK"] = max([x for x in [bad] + flaky if x is not None], default=None)
        if flaky:
            out["passed_once_failed_again_wK"] = flaky
        out["confirm_tries"] = confirm
        if good is not None:
            g = at(good)
            out["min_heapsize_bytes_unix64"] = heap_bytes(good)
            out["min_heapsize_bytes_32bit_board"] = good * 1024
            if g.get("mem_free") is not None:
                out["in_use_at_status_min_heap_bytes"] = heap_bytes(good) - g["mem_free"]
        # heap - mem_free at the final @status (after the commands), every passing run
        passing = [t for t in list(tried.values()) + confirm if t["ok"]]
        if passing:
            out["peak_in_use_at_status_bytes"] = max(heap_bytes(t["k"]) - t["mem_free"] for t in passing)
        out["in_use_at_status_bytes_by_wK"] = {str(k): heap_bytes(k) - t["mem_free"] for k, t in sorted(tried.items())
                                               if t.get("mem_free") is not None}
        out["tries"] = [tried[k] for k in sorted(tried)]
        out["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        mblog.setLevel(mblevel)
        if broker is not None:
            broker.kill()
            broker.wait(5)
        shutil.rmtree(work, ignore_errors=True)
    return out


def bench_memory(res: dict[str, Any], quick: bool) -> None:
    out: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="gridshed-bench-mem-"))
    tried: dict[int, dict[str, Any]] = {}

    def at(k: int) -> dict[str, Any]:
        if k not in tried:
            say("memory: agent at %dwK" % k)
            tried[k] = mem_try(k, work)
        return tried[k]

    def smallest(pred: str, lo: int, hi: int, step: int) -> tuple[int | None, int]:
        # lo assumed failing, hi checked; returns (smallest passing k or None, highest failing)
        if not at(hi)[pred]:
            return None, hi
        while hi - lo > step:
            mid = (hi + lo) // 2
            if at(mid)[pred]:
                hi = mid
            else:
                lo = mid
        return hi, lo

    try:
        step = 4 if quick else 2
        at(BUDGET_WK)
        full, full_fail = smallest("ok", 8, BUDGET_WK if at(BUDGET_WK)["ok"] else 160, step)
        ctl, ctl_fail = smallest("control_ok", 8, full or BUDGET_WK, step)
        out["min_heapsize_wK"] = full
        out["highest_failing_wK"] = full_fail
        out["min_heapsize_control_only_wK"] = ctl
        out["highest_failing_control_only_wK"] = ctl_fail
        out["status_at_budget"] = at(BUDGET_WK).get("status_error") or "ok"
        out["budget_wK"] = BUDGET_WK
        if full is not None:
            out["min_heapsize_bytes_unix64"] = heap_bytes(full)
            out["min_heapsize_bytes_32bit_board"] = full * 1024
            if at(full).get("mem_free") is not None:
                out["in_use_at_status_min_heap_bytes"] = heap_bytes(full) - at(full)["mem_free"]
        for k in (64, BUDGET_WK, 96, 128):
            if k in tried and tried[k].get("mem_free") is not None:
                out["in_use_at_status_%dwK_bytes" % k] = heap_bytes(k) - tried[k]["mem_free"]
                out["heap_%dwK_bytes" % k] = heap_bytes(k)
        out["resolution_wK"] = step
        out["tries"] = [tried[k] for k in sorted(tried)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # the agent's code in a ROMFS partition (bytecode in flash on a board)
    try:
        out["romfs"] = bench_romfs(quick)
    except Exception as e:
        out["romfs"] = {"error": "%s: %s" % (type(e).__name__, e)}
    # the agent with every optional feature configured at once (MQTT to a private Mosquitto)
    try:
        out["full_features"] = bench_full_features(quick)
    except Exception as e:
        out["full_features"] = {"error": "%s: %s" % (type(e).__name__, e)}
    # .mpy size per architecture
    from gridshed.boards import load_board
    from gridshed.build import build

    sizes = {}
    for board in ("unix-sim", "esp32-devkitc-max3485", "rpi-pico", "rpi-pico2-w"):
        d = Path(tempfile.mkdtemp(prefix="gridshed-bench-build-"))
        try:
            man = build(board, out=d / board)
            agent = sum(e["size"] for e in man["files"] if e["file"].startswith("agent/"))
            sizes[load_board(board)["arch"]] = {"board": board, "agent_mpy_bytes": agent,
                                                "total_bytes": man["total_size"], "files": len(man["files"])}
        except Exception as e:
            sizes[board] = {"error": str(e)}
        finally:
            shutil.rmtree(d, ignore_errors=True)
    out["mpy_size"] = sizes
    res["memory"] = out


def run(res: dict[str, Any], a: argparse.Namespace) -> None:
    bench_memory(res, a.quick)


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """This section's rows of the table `make bench` prints (figure, value, vs reference / note)."""
    rows: list[tuple[str, str, str]] = []
    mem = res.get("memory")
    if mem:
        if mem.get("min_heapsize_wK"):
            rows.append(("4 smallest -X heapsize (run+@status)", "%dwK = %d B here (%d B on a 32-bit board)" % (
                mem["min_heapsize_wK"], mem["min_heapsize_bytes_unix64"], mem["min_heapsize_bytes_32bit_board"]),
                "fails at %dwK; budget %swK (target 48wK)" % (mem["highest_failing_wK"], mem.get("budget_wK"))))
        elif "min_heapsize_wK" in mem:
            rows.append(("4 smallest -X heapsize (run+@status)", "none up to %dwK" % mem["highest_failing_wK"], ""))
        if "min_heapsize_control_only_wK" in mem:
            rows.append(("4 smallest heapsize, control only", "%swK" % mem["min_heapsize_control_only_wK"],
                         "trip+restore, no @status; fails at %swK" % mem["highest_failing_control_only_wK"]))
        rows.append(("4 @status at the budget (%swK)" % mem.get("budget_wK"), str(mem.get("status_at_budget"))[:60], ""))
        if "in_use_at_status_min_heap_bytes" in mem:
            rows.append(("4 heap in use at @status (min heap)", "%d B" % mem["in_use_at_status_min_heap_bytes"],
                         "64-bit objects, gc.mem_free in the reply"))
        rf = mem.get("romfs")
        if rf:
            name = "4 smallest heapsize, code in ROMFS"
            if "error" in rf:
                rows.append((name, "ERROR", rf["error"][:60]))
            else:
                rows.append((name, "%swK" % rf.get("min_heapsize_wK"),
                             "fails at %swK; agent heap only (image %d B in flash)" % (
                                 rf["highest_failing_wK"], rf["image_bytes"])))
                im = rf.get("imports") or {}
                if im:
                    rows.append(("4   import heap ROMFS / files", "x%.2f" % im["ratio"],
                                 "%d vs %d B, %d resident modules" % (im["rom_heap"], im["files_heap"], im["modules"])))
        ff = mem.get("full_features")
        if ff:
            name = "4 smallest heapsize, ALL features"
            if "error" in ff:
                rows.append((name, "ERROR", ff["error"][:60]))
            elif ff.get("min_heapsize_wK"):
                rows.append((name, "%dwK = %d B here (%d B on a 32-bit board)" % (
                    ff["min_heapsize_wK"], ff["min_heapsize_bytes_unix64"], ff["min_heapsize_bytes_32bit_board"]),
                    "fails at %swK; dip + signed cmds + @status, step %dwK%s" % (
                        ff["highest_failing_wK"], ff["resolution_wK"], "" if ff.get("confirmed") else ", NOT confirmed")))
            else:
                rows.append((name, "none up to %swK" % ff.get("highest_failing_wK"), "see results.json tries"))
            if "in_use_at_status_min_heap_bytes" in ff:
                rows.append(("4   heap in use at @status (ALL, min heap)", "%d B (max over passing runs %d B)" % (
                    ff["in_use_at_status_min_heap_bytes"], ff.get("peak_in_use_at_status_bytes", 0)),
                    "64-bit objects, gc.mem_free in the reply"))
        for arch, s in mem.get("mpy_size", {}).items():
            if "error" in s:
                rows.append(("4 .mpy " + arch, "ERROR", s["error"][:60]))
            else:
                rows.append(("4 .mpy agent/ " + arch, "%d B (%.1f KB)" % (s["agent_mpy_bytes"], s["agent_mpy_bytes"] / 1024),
                             "budget 64 KB; %s" % s["board"]))
    return rows
