"""The market loop's signals out and in on the real agent (docs/market.md "On the board"):
availability (`avail_kw`) and the obligation warning (`market_warning`) in the MQTT telemetry,
read from a real Mosquitto; the utility Modbus map's market registers 21 (price) and 22 (kW)
written with libmodbus `mbpoll`: on a trusted line they only add curtailment, on an untrusted
one the write is an illegal function, counted, and no relay moves."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

from conftest import require_tool
from gridshed import fleet_client as fc
from gridshed import siteconfig
from gridshed.signing import new_key

from rig import Rig
from test_market_board import KID, Host

ROOT = Path(__file__).resolve().parents[2]
HEAP = "112wK"  # [market] + [modbus_server]: generous (docs/architecture.md "Test heaps")
MQTT_HEAP = "140wK"  # [market] + [mqtt], as test_market_dispatch (112wK failed a console command now and then)
KW = {"row-a": 132.0, "row-b": 132.0, "row-c": 105.0, "heat-loop": 90.0, "inference": 100.0}


def site(tmp_path: Path, obligation: bool) -> dict:
    text = (ROOT / "scenarios" / "market-site.toml").read_text()
    subs = {"restore_hold_s": "1", "min_off_s": "0", "stagger_s": "0.3", "jitter_s": "0",
            "min_run_s": "0", "ramp_kw_per_min": "0"}
    subs.update({"obligation_hours": "[[0, 24]]"} if obligation else {"obligation_mw": "0"})
    for k, v in subs.items():
        text, n = re.subn(rf"(?m)^{k} = [^#\n]*", f"{k} = {v} ", text)
        assert n >= 1, k
    p = tmp_path / "site.toml"
    p.write_text(text)
    return siteconfig.load_site(p)


def board(tmp_path: Path, cfg: dict) -> tuple[Path, bytes]:
    from agent import config as fwconfig
    from agent.config_defaults import apply_defaults

    apply_defaults(cfg)
    assert not fwconfig.validate(cfg), fwconfig.validate(cfg)
    key = new_key()
    d = tmp_path / "board"
    d.mkdir()
    (d / "keys.cbor").write_bytes(siteconfig.keys_bytes({KID: key}))
    return d, key


def test_availability_and_obligation_warning_in_mqtt_telemetry(tmp_path):
    from mosquitto_broker import Mosquitto

    broker = Mosquitto(tmp_path).start()
    tele: list[dict] = []
    cv = threading.Condition()
    try:
        cfg = site(tmp_path, obligation=True)
        cfg["mqtt"] = {"enabled": True, "host": "127.0.0.1", "port": broker.port, "keepalive_s": 60,
                       "telemetry_s": 1.0}
        board_dir, key = board(tmp_path, cfg)
        c = fc.paho_client("watch-market-%d" % os.getpid(), None, "127.0.0.1")

        def on(cl, u, m) -> None:
            with cv:
                tele.append(json.loads(m.payload))
                cv.notify_all()

        c.on_message = on
        fc.connect_paho(c, "127.0.0.1", broker.port)
        c.subscribe(f"gridshed/{cfg['site']}/{cfg['device']}/telemetry", 0)

        def seen(pred, what: str, timeout: float = 30) -> dict:
            with cv:
                n = len(tele)
                ok = cv.wait_for(lambda: any(pred(t) for t in tele[n:]), timeout)
                assert ok, f"no telemetry with {what}: last {tele[-3:]}"
                return [t for t in tele[n:] if pred(t)][-1]

        async def main() -> None:
            async with Rig(cfg, board_dir, heapsize=MQTT_HEAP) as rig:
                host = Host(rig, key)
                await rig.until(lambda: rig.good_polls() > 5, 30, "meter polls")
                # everything on: a frequency trip would shed every block (both stages): 559 kW
                t = await asyncio.to_thread(seen, lambda t: "avail_kw" in t, "avail_kw")
                assert t["avail_kw"] == sum(KW.values()) and "market_warning" not in t, t
                assert (await host("time")).get("ok") is True
                now = int(time.time())
                res = await host("schedule", schedule={"sid": 1, "iv": [[now - 600, now + 7200, "p", 100.0]]})
                assert res.get("ok") is True, res
                # row-a and row-b shed; row-c refused by the 250 kW RRS obligation: the warning rides
                # the telemetry with the availability left (row-c, heat loop, inference)
                t = await asyncio.to_thread(seen, lambda t: "market_warning" in t, "market_warning")
                assert t["market_warning"] == "RRS obligation: refusing curtailment", t
                assert t["avail_kw"] == KW["row-c"] + KW["heat-loop"] + KW["inference"], t
                # a newer schedule at 10 $/MWh: the rows come back, the warning goes
                res = await host("schedule", schedule={"sid": 2, "iv": [[now - 600, now + 7200, "p", 10.0]]})
                assert res.get("ok") is True, res
                t = await asyncio.to_thread(seen, lambda t: t.get("avail_kw") == sum(KW.values()), "all back")
                assert "market_warning" not in t, t

        asyncio.run(main())
        c.loop_stop()
        c.disconnect()
    finally:
        broker.stop()


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def mbpoll(port: int, *args: str) -> subprocess.CompletedProcess:
    exe = require_tool("mbpoll")
    return subprocess.run([exe, "-m", "tcp", "-p", str(port), "-a", "1", "-0", "-1", "-o", "5", "-t", "4", *args],
                          capture_output=True, text=True, timeout=60)


def write(port: int, reg: int, value: int) -> subprocess.CompletedProcess:
    return mbpoll(port, "-r", str(reg), "127.0.0.1", str(value))


def read(port: int, reg: int, n: int = 1) -> dict[int, int]:
    p = mbpoll(port, "-r", str(reg), "-c", str(n), "127.0.0.1")
    assert p.returncode == 0, p.stdout + p.stderr
    return {int(a): int(v) for a, v in re.findall(r"(?m)^\[(\d+)\]:\s+(-?\d+)", p.stdout)}


def modbus_site(tmp_path: Path, trusted: bool) -> tuple[dict, Path, bytes, int]:
    cfg = site(tmp_path, obligation=False)
    port = _port()
    cfg["modbus_server"] = {"enabled": True, "transport": "tcp", "port": port, "unit": 1, "bind": "127.0.0.1"}
    if trusted:
        cfg["authority"] = {"trusted": ["modbus"]}
    board_dir, key = board(tmp_path, cfg)
    return cfg, board_dir, key, port


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def test_utility_registers_on_a_trusted_line_only_add_curtailment(tmp_path):
    cfg, board_dir, key, port = modbus_site(tmp_path, trusted=True)
    names = [b["name"] for b in cfg["blocks"]]

    def open_(*rows: str) -> list[bool]:
        return [n not in rows for n in names]

    async def main() -> None:
        async with Rig(cfg, board_dir, heapsize=HEAP) as rig:
            host = Host(rig, key)
            await rig.until(lambda: rig.good_polls() > 5 and listening(port), 30, "meter polls, the Modbus server")
            assert (await host("time")).get("ok") is True
            now = int(time.time())
            res = await host("schedule", schedule={"sid": 1, "iv": [[now - 600, now + 7200, "p", 50.0]]})
            assert res.get("ok") is True, res
            await rig.until(lambda: rig.closed() == open_("row-a"), 20, "row-a open for 50 $/MWh")
            # a lower price on register 21 adds nothing: the schedule's 50 stays in force
            p = await asyncio.to_thread(write, port, 21, 10)
            assert p.returncode == 0, p.stdout + p.stderr
            assert (await asyncio.to_thread(read, port, 21))[21] == 10
            await rig.agent_window(2500)
            assert rig.closed() == open_("row-a")
            # 70 $/MWh on register 21: row-b (strike 65) sheds as well
            p = await asyncio.to_thread(write, port, 21, 70)
            assert p.returncode == 0, p.stdout + p.stderr
            await rig.until(lambda: rig.closed() == open_("row-a", "row-b"), 20, "row-b open for register 21")
            # none again (0x8000): row-b comes back, row-a stays open for the schedule
            p = await asyncio.to_thread(write, port, 21, 32768)
            assert p.returncode == 0, p.stdout + p.stderr
            await rig.until(lambda: rig.closed() == open_("row-a"), 30, "row-b back, row-a still open")
            # 200 kW on register 22: row-a (132) and row-b (132) in shed order
            p = await asyncio.to_thread(write, port, 22, 200)
            assert p.returncode == 0, p.stdout + p.stderr
            await rig.until(lambda: rig.closed() == open_("row-a", "row-b"), 20, "row-b open for register 22")
            recs = [r for r in rig.journal()[0] if r.get("k") == "market"]
            assert any(r.get("ev") == "shed" and r.get("why") == "utility_register" and r.get("block") == "row-b"
                       for r in recs), recs

    asyncio.run(main())


def test_utility_registers_on_an_untrusted_line_are_refused_and_counted(tmp_path):
    cfg, board_dir, key, port = modbus_site(tmp_path, trusted=False)

    async def main() -> None:
        async with Rig(cfg, board_dir, heapsize=HEAP) as rig:
            host = Host(rig, key)
            await rig.until(lambda: rig.good_polls() > 5 and listening(port), 30, "meter polls, the Modbus server")
            assert (await host("time")).get("ok") is True
            exc0 = (await asyncio.to_thread(read, port, 15))[15]
            for reg, v in ((21, 100), (22, 500)):
                p = await asyncio.to_thread(write, port, reg, v)
                assert "Illegal function" in p.stdout + p.stderr, p.stdout + p.stderr
            await rig.agent_window(2500)
            assert rig.all_closed()
            assert not [r for r in rig.journal()[0] if r.get("k") == "market" and r.get("ev") == "shed"]
            assert (await asyncio.to_thread(read, port, 15))[15] >= exc0 + 2  # exceptions sent
            st = await rig.status()
            assert st["errors"].get("utility_market_refused") == 2, st["errors"]

    asyncio.run(main())
