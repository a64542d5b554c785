"""5: fleet: one signed site command over a real Mosquitto -> the last of N boards acting."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import FIRMWARE, HEAP, MP_DIR, demo_cfg, dist, free_port, micropython_cmd, mp_env, pct, say, start_mosquitto, stop_procs

SECTIONS = ("fleet",)  # the names `--only` takes for this module
DEFAULT = True  # part of a plain `make bench`


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fleet", default="10,50,100", help="fleet sizes N")
    ap.add_argument("--fleet-mode", default="auto", choices=("auto", "agent", "client"),
                    help="agent: full agents with the mqtt feature; client: agent.mqtt_client + agent.cmd_api scripts")


class _Sink:
    """A loopback TCP server that accepts and discards (virtual boards' GPIO, in fleet mode)."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(512)
        self.port = self.srv.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        self.srv.setblocking(False)
        sel.register(self.srv, selectors.EVENT_READ)
        while not self.stop:
            for key, _ in sel.select(0.2):
                if key.fileobj is self.srv:
                    try:
                        c, _a = self.srv.accept()
                    except OSError:
                        continue
                    c.setblocking(False)
                    self.conns.append(c)
                    sel.register(c, selectors.EVENT_READ)
                else:
                    try:
                        data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()  # type: ignore[union-attr]

    def close(self) -> None:
        self.stop = True
        self.srv.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def _fleet_agent_available() -> tuple[bool, str]:
    # the MQTT feature module: agent/features/mqtt.py (the feature contract), agent/fleet.py before it
    p = next((q for q in (FIRMWARE / "agent" / "features" / "mqtt.py", FIRMWARE / "agent" / "fleet.py") if q.exists()),
             None)
    if p is None:
        return False, "no MQTT feature module (agent/features/mqtt.py or agent/fleet.py)"
    try:
        from agent import config as fwconfig

        if "mqtt" not in getattr(fwconfig, "SECTIONS", {}) and "mqtt" not in Path(fwconfig.__file__).read_text():
            return False, "config has no mqtt section"
    except Exception as e:
        return False, "agent.config: %s" % e
    return True, "%s present" % p.relative_to(FIRMWARE.parent)


FLEET_AGENT_HEAP = "88wK"  # the agent with MQTT enabled (measured in tests/e2e/test_fleet.py)


def _fleet_boards_agent(work: Path, n: int, port: int, kid: bytes, key: bytes, site: str) -> list[subprocess.Popen]:
    """N full agents (mqtt enabled) as unix-port processes; GPIO to a sink, meter unreachable (hold)."""

    from gridshed import siteconfig
    from gridshed.build import build

    b = build("unix-sim", out=work / "build")
    bdir = Path(b["path"])
    sink = _Sink()
    work_sink = sink  # kept alive by the closure below
    procs: list[subprocess.Popen] = []
    meter_port = free_port()  # nothing listens: every poll fails fast, failsafe "hold" keeps relays
    for i in range(n):
        d = work / ("board%03d" % i)
        shutil.copytree(bdir, d)
        cfg = demo_cfg()
        cfg.pop("warnings", None)
        cfg["device"] = "bench-%03d" % i
        cfg["site"] = site
        cfg["meter"] = dict(cfg["meter"], transport="tcp", host="127.0.0.1", port=meter_port, poll_ms=10000)
        cfg["failsafe"] = dict(cfg["failsafe"], meter_loss="hold")
        cfg["mqtt"] = {"enabled": True, "host": "127.0.0.1", "port": port, "keepalive_s": 60, "telemetry_s": 3600.0}
        (d / "config.cbor").write_bytes(siteconfig.config_bytes(cfg))
        (d / "keys.cbor").write_bytes(siteconfig.keys_bytes({kid: key}))
        (d / "sim.json").write_text(json.dumps({"gpio": "127.0.0.1:%d" % sink.port, "uarts": {}}))
        env = dict(os.environ)
        env["MICROPYPATH"] = "%s:%s/lib:.frozen" % (d, d)
        log = open(d / "console.log", "wb")
        procs.append(subprocess.Popen(micropython_cmd() + ["-X", "heapsize=" + FLEET_AGENT_HEAP, "main.py"], cwd=str(d), env=env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    procs_sink = work_sink
    procs.append(_SinkProc(procs_sink))  # type: ignore[arg-type]
    return procs


class _SinkProc:
    """Lets stop_procs() close the GPIO sink along with the processes."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.done = False

    def poll(self) -> int | None:
        return 0 if self.done else None

    def send_signal(self, sig: int) -> None:
        self.sink.close()
        self.done = True

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def kill(self) -> None:
        self.send_signal(9)


def _fleet_boards_client(work: Path, n: int, port: int, kid: bytes, key: bytes, site: str,
                         tls: bool = False) -> list[subprocess.Popen]:
    script = work / "fleet_client.py"
    shutil.copyfile(MP_DIR / "fleet_client.py", script)
    procs = []
    for i in range(n):
        arg = json.dumps({"dev": "bench-%03d" % i, "site": site, "host": "127.0.0.1", "port": port,
                          "kid": kid.hex(), "key": key.hex(), "tls": tls})
        procs.append(subprocess.Popen(micropython_cmd() + ["-X", "heapsize=" + HEAP, str(script), arg], env=mp_env(),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, cwd=str(work)))
    return procs


def fleet_round(n: int, mode: str, reps: int, work: Path, tls: Any = None) -> dict[str, Any]:
    """tls (client mode): (start(work) -> (broker, port), /broker.cbor bytes, the host's
    fleet_client.BrokerOpts): the same round over TLS + login (bench/tls.py)."""
    import paho.mqtt.client as paho

    from gridshed.signing import make_command, new_key

    site = "benchsite"
    key = new_key()
    kid = b"benchkid"
    broker, port = tls[0](work) if tls else start_mosquitto(work)
    if tls:
        (work / "broker.cbor").write_bytes(tls[1])
    procs: list[Any] = []
    lock = threading.Lock()
    seen: dict[str, dict[str, Any]] = {}   # dev -> last state payload
    acts: dict[int, dict[str, float]] = {}  # seq -> dev -> host monotonic arrival
    online: set[str] = set()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        t = time.monotonic()
        try:
            st = json.loads(msg.payload)
        except ValueError:
            return
        dev = st.get("dev")
        if not dev:
            return
        with lock:
            seen[dev] = st
            if st.get("online"):
                online.add(dev)
            seq = st.get("seq")
            if isinstance(seq, int) and (st.get("cmd") in ("shed", "restore") or mode == "client"):
                acts.setdefault(seq, {}).setdefault(dev, t)

    if tls:
        from gridshed.fleet_client import paho_client

        sub = paho_client("bench-host", tls[2], "127.0.0.1")
    else:
        sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-host")
    sub.on_message = on_message
    try:
        if mode == "agent":
            procs = _fleet_boards_agent(work, n, port, kid, key, site)
        else:
            procs = _fleet_boards_client(work, n, port, kid, key, site, tls=bool(tls))
        sub.connect("127.0.0.1", port)
        sub.subscribe("gridshed/%s/+/state" % site, qos=1)
        sub.loop_start()
        deadline = time.monotonic() + 30 + n * 0.4
        while time.monotonic() < deadline:
            with lock:
                if len(online) >= n:
                    break
            time.sleep(0.1)
        up = len(online)
        time.sleep(1.0)
        lat_last: list[float] = []
        lat_first: list[float] = []
        lat_p50: list[float] = []
        acted_counts: list[int] = []
        for r in range(reps):
            seq = 1000 + 2 * r  # strictly increasing per key, restores included (seq + 1)
            cmd = "shed"
            buf = make_command(key, kid, cmd, seq, target_site=site)
            t0 = time.monotonic()
            sub.publish("gridshed/%s/cmd" % site, buf, qos=1)
            end = time.monotonic() + 10
            while time.monotonic() < end:
                with lock:
                    if len(acts.get(seq, {})) >= up:
                        break
                time.sleep(0.002)
            with lock:
                ts = sorted(t - t0 for t in acts.get(seq, {}).values())
            acted_counts.append(len(ts))
            if ts:
                lat_first.append(ts[0] * 1000)
                lat_last.append(ts[-1] * 1000)
                lat_p50.append(pct(ts, 50) * 1000)
            if mode == "agent":  # restore between reps so every rep is a state change
                sub.publish("gridshed/%s/cmd" % site, make_command(key, kid, "restore", seq + 1, target_site=site), qos=1)
            time.sleep(0.5)
        return {"n": n, "online": up, "reps": reps, "acted": acted_counts,
                "last_acted_ms": dist(lat_last), "median_board_ms": dist(lat_p50), "first_acted_ms": dist(lat_first)}
    finally:
        try:
            sub.loop_stop()
            sub.disconnect()
        except Exception:
            pass
        stop_procs(procs)
        broker.kill()
        broker.wait(5)


def bench_fleet(res: dict[str, Any], quick: bool, sizes: list[int], mode: str) -> None:
    avail, why = _fleet_agent_available()
    if mode == "auto":
        # full agents (88wK each) when fleet.py is there; the client stand-in otherwise
        mode = "agent" if avail else "client"
    out: dict[str, Any] = {"mode": mode, "fleet_py": why, "rounds": []}
    reps = 3 if quick else 5
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix="gridshed-bench-fleet-"))
        say("fleet: %s mode, N=%d" % (mode, n))
        try:
            out["rounds"].append(fleet_round(n, mode, reps, work))
        except Exception as e:
            out["rounds"].append({"n": n, "error": "%s: %s" % (type(e).__name__, e)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    res["fleet"] = out


def run(res: dict[str, Any], a: argparse.Namespace) -> None:
    bench_fleet(res, a.quick, [int(x) for x in a.fleet.split(",") if x], a.fleet_mode)


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """This section's rows of the table `make bench` prints (figure, value, vs reference / note)."""
    rows: list[tuple[str, str, str]] = []
    fl = res.get("fleet")
    if fl:
        for r in fl["rounds"]:
            if "error" in r:
                rows.append(("5 fleet N=%d (%s)" % (r["n"], fl["mode"]), "ERROR", r["error"][:60]))
                continue
            t = r["last_acted_ms"]
            rows.append(("5 fleet N=%d (%s)" % (r["n"], fl["mode"]), "last acted p50 %s max %s ms" % (t["p50"], t["max"]),
                         "online %d/%d, acted %s" % (r["online"], r["n"], r["acted"])))
    return rows
