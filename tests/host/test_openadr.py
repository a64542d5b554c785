"""The OpenADR 2.0b VEN bridge against openleadr's own VTN on loopback.

- events pushed by a real openleadr OpenADRServer (no TLS, unsigned messages) reach the
  bridge through the real openleadr OpenADRClient: SIMPLE level 1 -> partial shed per the
  level map, level 2 -> full shed, LOAD_DISPATCH delta in W with scale k -> partial kW shed,
  restore at each event end, restore on a cancelled active event; the VTN sees optIn for
  each of them and optOut for a signal the bridge cannot act on (which sends nothing);
- shed is never sent before the interval starts, restore never before it ends;
- the default sender's bytes, caught on a real Mosquitto, are COSE_Mac0 commands that
  agent.cmd_api.CommandVerifier accepts with the device's inventory key (and refuses with
  another device's), one per device of the site, seq increasing, through the real CLI;
- ELECTRICITY_PRICE events become signed schedules (the real SiteSender on a real Mosquitto),
  a cancel re-sends without the cancelled event's rows, relative prices are answered optOut;
- the level map and the signal mapping (pure).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from openleadr import OpenADRServer, objects

from agent import cbor
from agent.cmd_api import CommandRefused, CommandVerifier, MemorySeqStore
from conftest import ROOT
from mosquitto_broker import Mosquitto
from gridshed.errors import UserError
from gridshed.inventory import Inventory
from gridshed.openadr import (FULL, KW, NONE, Action, LevelMap, SiteSender, VenBridge, combine,
                              plan_event)
from gridshed.signing import new_key

HOST = "127.0.0.1"
VEN_ID = "ven-test-1"
PREFIX = "/OpenADR2/Simple/2.0b"


# ------------------------------------------------------------------------------ rigs
class Vtn:
    """openleadr's OpenADRServer on an ephemeral loopback port; accepts one VEN, records opts."""

    def __init__(self) -> None:
        self.opts: dict[str, str] = {}
        self.server = OpenADRServer(vtn_id="GRIDSHED-TEST-VTN", http_host=HOST, http_port=0,
                                    requested_poll_freq=timedelta(seconds=1),
                                    verify_message_signatures=False, show_fingerprint=False,
                                    ven_lookup=self._lookup)
        self.server.add_handler("on_create_party_registration", self._register)

    @staticmethod
    def _lookup(ven_id: str) -> dict:
        return {"ven_id": VEN_ID, "ven_name": "site1-ven", "registration_id": "reg-1"}

    @staticmethod
    def _register(payload: dict) -> tuple[str, str] | bool:
        return (VEN_ID, "reg-1") if payload.get("ven_name") == "site1-ven" else False

    def _opt(self, ven_id: str, event_id: str, opt_type: str) -> None:
        self.opts[event_id] = opt_type

    async def start(self) -> str:
        await self.server.run()
        port = self.server.app_runner.addresses[0][1]
        return f"http://{HOST}:{port}{PREFIX}"

    def add(self, signal_name: str, signal_type: str, intervals: list[tuple[float, float, float]],
            measurement: objects.Measurement | None = None) -> str:
        """intervals: (start offset s from now, duration s, payload); openleadr puts whole
        seconds of a duration on the wire (1.5 s arrives as PT1S), so use whole seconds."""
        now = datetime.now(timezone.utc)
        ivs = [objects.Interval(dtstart=now + timedelta(seconds=a), duration=timedelta(seconds=d),
                                signal_payload=v) for a, d, v in intervals]
        if measurement is None:
            return self.server.add_event(VEN_ID, signal_name, signal_type, ivs, callback=self._opt)
        # add_event has no measurement argument: build the event the same way, with one
        ev_id = self.server.add_event(VEN_ID, signal_name, signal_type, ivs, callback=self._opt)
        ev = self.server.events[VEN_ID][-1]
        ev.event_signals[0].measurement = measurement
        return ev_id


class CmdSub:
    """paho subscriber to every device cmd topic."""

    def __init__(self, port: int) -> None:
        self.msgs: list[tuple[str, bytes]] = []
        self.when: list[int] = []  # unix seconds each message arrived: a board's clock on receipt
        self.lock = threading.Lock()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="oadr-test-sub", protocol=paho.MQTTv311)
        ok = threading.Event()
        self.c.on_subscribe = lambda *a: ok.set()
        self.c.on_message = self._on
        self.c.connect(HOST, port)
        self.c.loop_start()
        self.c.subscribe("gridshed/+/+/cmd", qos=1)
        assert ok.wait(30), "subscribe not acknowledged"

    def _on(self, client, userdata, m) -> None:
        with self.lock:
            self.msgs.append((m.topic, bytes(m.payload)))
            self.when.append(int(time.time()))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def inventory(tmp_path) -> tuple[Path, dict[str, tuple[bytes, bytes]]]:
    """Two devices in site1, one in site2; returns (path, {device: (kid, key)})."""
    path = tmp_path / "inv.sqlite"
    keys = {}
    with Inventory(path) as inv:
        for dev, site in (("site1-ctl1", "site1"), ("site1-ctl2", "site1"), ("site2-ctl1", "site2")):
            kid, key = os.urandom(8), new_key()
            inv.record_provision(dev, "unix-sim", site, kid.hex(), key, "b1", "c1")
            keys[dev] = (kid, key)
    return path, keys


def verifier(keys: dict[str, tuple[bytes, bytes]], dev: str, site: str) -> CommandVerifier:
    kid, key = keys[dev]
    return CommandVerifier({kid: key}, dev, site, MemorySeqStore())


async def quiet(b: VenBridge, timeout: float) -> None:
    """The positive marker before asserting that nothing more was sent: no send in flight (every
    "send" record has its "sent" or "send-failed"), no reconcile holding the lock, no retry
    pending, and the event loop then ran a good many rounds with that still true (everything the
    bridge schedules at once has run by then; a timed boundary or retry would show as pending)."""
    deadline = time.monotonic() + timeout

    def idle() -> bool:
        kinds = [r["kind"] for r in b.records]
        return (kinds.count("send") == kinds.count("sent") + kinds.count("send-failed")
                and not (b._lock is not None and b._lock.locked())
                and (b._retry is None or b._retry.done()))

    rounds = 0
    while rounds < 50:
        assert time.monotonic() < deadline, b.records[-5:]
        rounds = rounds + 1 if idle() else 0
        await asyncio.sleep(0 if rounds else 0.02)


# ------------------------------------------------------------------------------ VTN -> bridge
def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def _until(pred, what: str, records: list[dict], timeout: float = 120) -> None:
    """Wait for a positive marker (a record, an opt); `timeout` is a hang guard only."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"hang guard: {what}; last records {records[-5:]}"
        await asyncio.sleep(0.05)


def test_events_from_openleadr_vtn_shed_and_restore():
    """One event after another, each driven by the bridge's own records (it learned the event,
    the event ended, nothing in flight) and the VTN's record of the opt, never by a schedule: a
    slow host changes how long this takes, not what it asserts."""
    sent: list[dict] = []

    def send(cmd: str, site: str, kw: float | None, expires_s: int) -> dict:
        sent.append({"t": time.time(), "cmd": cmd, "site": site, "kw": kw, "exp": expires_s})
        return {"ok": True}

    windows: dict[str, tuple[float, float]] = {}  # name -> (earliest start, earliest end)

    async def timed_event(vtn: Vtn, bridge: VenBridge, name: str, signal: str, stype: str, payload: float,
                          measurement: objects.Measurement | None = None) -> str:
        """Add an event starting `lead` s out, lasting 1 s; wait until the bridge says it ended and
        nothing is in flight. A bridge that learned of it only after its end (its own "opt" record
        says when) sent nothing for it: that is right, and the event is added again, further out."""
        lead = 2.0
        for _ in range(5):
            n0 = len(sent)
            t_add = time.time()  # the VTN's dtstart is now + lead, taken after this
            eid = vtn.add(signal, stype, [(lead, 1.0, payload)], measurement)
            await _until(lambda: any(r["kind"] == "event-ended" and r["event_id"] == eid for r in bridge.records),
                         f"{name} to end", bridge.records)
            await quiet(bridge, 60)
            opt = next(r for r in bridge.records if r["kind"] == "opt" and r["event_id"] == eid)
            if _unix(opt["t"]) < _unix(opt["timeline"][-1]["end"]):
                windows[name] = (t_add + lead, t_add + lead + 1.0)
                return eid
            assert len(sent) == n0, ("an event learned after its end sent something", sent[n0:])
            lead *= 2
        raise AssertionError(f"the bridge never learned {name} before its end")

    async def scenario() -> tuple[dict, dict, VenBridge]:
        vtn = Vtn()
        url = await vtn.start()
        bridge = VenBridge(url, "site1-ven", "site1", send, insecure=True, levels=LevelMap.parse(["1=40%"], 1000.0),
                           site_kw=1000.0, expires_s=45)
        await bridge.start()
        assert bridge.client.ven_id == VEN_ID and bridge.client.registration_id == "reg-1"
        ids = {"price": vtn.add("ELECTRICITY_PRICE", "price", [(2.0, 1.0, 0.25)])}
        ids["simple1"] = await timed_event(vtn, bridge, "simple1", "SIMPLE", "level", 1.0)
        ids["simple2"] = await timed_event(vtn, bridge, "simple2", "SIMPLE", "level", 2.0)
        ids["dispatch"] = await timed_event(
            vtn, bridge, "dispatch", "LOAD_DISPATCH", "delta", -250.0,
            objects.Measurement(name="real_power", description="RealPower", unit="W", scale="k"))
        # a long event, cancelled once its shed went out
        n0 = len(sent)
        t_add = time.time()
        ids["cancelled"] = vtn.add("SIMPLE", "level", [(2.0, 120.0, 3.0)])
        windows["cancelled"] = (t_add + 2.0, t_add + 122.0)
        await _until(lambda: len(sent) > n0, "the cancelled event's shed", bridge.records)
        vtn.server.cancel_event(VEN_ID, ids["cancelled"])
        await _until(lambda: any(r["kind"] == "cancelled" for r in bridge.records), "the cancel", bridge.records)
        await _until(lambda: len(sent) > n0 + 1, "the restore after the cancel", bridge.records)
        await quiet(bridge, 60)
        # one more event: the VTN re-sends the completed ones again with it (openleadr's VEN
        # raised KeyError on those and opted out of the whole message: the bridge works around
        # it). Every event after the first already came that way.
        ids["late"] = await timed_event(vtn, bridge, "late", "SIMPLE", "level", 2.0)
        # the VTN's own record of each answer (it may come after the bridge's)
        await _until(lambda: all(i in vtn.opts for i in ids.values()), "the VTN to record every opt", bridge.records)
        # nothing more may come: every event ended (its plan gone) and no send is in flight
        await quiet(bridge, 60)
        assert bridge.plans == {}, bridge.plans
        await bridge.stop()
        await vtn.server.stop()
        return ids, vtn.opts, bridge  # type: ignore[return-value]

    ids, opts, bridge = asyncio.run(scenario())  # type: ignore[misc]
    got = [(s["cmd"], s["kw"]) for s in sent]
    assert got == [("shed", 400.0), ("restore", None),      # SIMPLE 1 -> 40% of 1000 kW
                   ("shed", None), ("restore", None),       # SIMPLE 2 -> full
                   ("shed", 250.0), ("restore", None),      # LOAD_DISPATCH -250 kW (W, scale k)
                   ("shed", None), ("restore", None),       # SIMPLE 3, cancelled while active
                   ("shed", None), ("restore", None)], sent  # the late SIMPLE 2
    assert all(s["site"] == "site1" and s["exp"] == 45 for s in sent)
    # never early: shed not before the interval start, restore not before its end (lower
    # bounds: a slow host only makes a send later)
    eps = 0.05
    for i, name in enumerate(("simple1", "simple2", "dispatch", "cancelled", "late")):
        start, end = windows[name]
        assert sent[2 * i]["t"] >= start - eps, (name, sent[2 * i])
        if name != "cancelled":
            assert sent[2 * i + 1]["t"] >= end - eps, (name, sent[2 * i + 1])
    # the cancelled event's restore came from the cancel, not from its end: the bridge's
    # "cancelled" record precedes that restore's send, and the event never "ended"
    recs = bridge.records
    i_cancel = next(i for i, r in enumerate(recs) if r["kind"] == "cancelled" and r["event_id"] == ids["cancelled"])
    sends = [i for i, r in enumerate(recs) if r["kind"] == "send"]
    assert recs[sends[7]]["cmd"] == "restore" and sends[6] < i_cancel < sends[7]
    assert not any(r["kind"] == "event-ended" and r["event_id"] == ids["cancelled"] for r in recs)
    # the VTN saw the opt responses
    for name in ("simple1", "simple2", "dispatch", "cancelled", "late"):
        assert opts.get(ids[name]) == "optIn", (name, opts)
    assert opts.get(ids["price"]) == "optOut", opts
    kinds = [r["kind"] for r in bridge.records]
    assert kinds[0] == "start" and "registered" in kinds and "cancelled" in kinds
    assert sum(k == "sent" for k in kinds) == 10 and "send-failed" not in kinds
    price_opt = [r for r in bridge.records if r["kind"] == "opt" and r["event_id"] == ids["price"]]
    assert price_opt and price_opt[0]["opt"] == "optOut"


def test_unknown_ven_is_not_registered():
    async def scenario() -> None:
        vtn = Vtn()
        url = await vtn.start()
        bridge = VenBridge(url, "somebody-else", "site1", lambda *a: None, insecure=True, levels=LevelMap.parse(["1=full"]))
        try:
            with pytest.raises(UserError, match="did not register"):
                await bridge.start()
        finally:
            await vtn.server.stop()

    asyncio.run(scenario())


def test_failed_send_is_retried():
    calls: list[str] = []

    def flaky(cmd: str, site: str, kw: float | None, expires_s: int) -> None:
        calls.append(cmd)
        if len(calls) == 1:
            raise OSError("broker down")

    async def scenario() -> VenBridge:
        b = VenBridge("http://unused", "v", "site1", flaky, insecure=True, levels=LevelMap.parse(["1=full"]), retry_s=0.2)
        b._lock = asyncio.Lock()
        now = time.time()
        ev = {"event_descriptor": {"event_id": "e1", "event_status": "far", "modification_number": 0},
              "active_period": {"dtstart": datetime.fromtimestamp(now, timezone.utc), "duration": timedelta(seconds=30)},
              "event_signals": [{"signal_name": "SIMPLE", "signal_type": "level",
                                 "intervals": [{"dtstart": datetime.fromtimestamp(now, timezone.utc),
                                                "duration": timedelta(seconds=30), "signal_payload": 1.0}]}]}
        assert await b.on_event(ev) == "optIn"
        deadline = time.monotonic() + 20  # the retry comes retry_s (0.2 s) later: wait, bounded
        while len(calls) < 2:
            assert time.monotonic() < deadline, calls
            await asyncio.sleep(0.02)
        # the retry succeeded and is over, nothing in flight: a third send could only come now
        await quiet(b, 20)
        assert b._retry is not None and b._retry.done()
        for p in b.plans.values():
            p.task.cancel()
        return b

    b = asyncio.run(scenario())
    assert calls == ["shed", "shed"]
    assert b.sent == Action(FULL)
    assert [r["kind"] for r in b.records].count("send-failed") == 1


def test_vtn_resending_a_completed_event_does_not_hide_new_ones():
    """openleadr's VEN raised KeyError when a VTN re-sent an event it had seen complete, and
    then opted out of every event in that message; the bridge keeps its own answers."""
    def event(eid: str, status: str, start: float) -> dict:
        t = datetime.fromtimestamp(start, timezone.utc)
        return {"event_descriptor": {"event_id": eid, "event_status": status, "modification_number": 0},
                "active_period": {"dtstart": t, "duration": timedelta(seconds=60)},
                "event_signals": [{"signal_name": "SIMPLE", "signal_type": "level", "intervals": [
                    {"dtstart": t, "duration": timedelta(seconds=60), "signal_payload": 2.0}]}],
                "response_required": "never", "targets": []}

    sent: list[str] = []

    async def scenario() -> VenBridge:
        b = VenBridge("http://127.0.0.1:9", "v", "site1", lambda c, *a: sent.append(c),
                      insecure=True, levels=LevelMap.parse(["1=full"]))
        client = b.make_client()
        now = time.time()
        msg = lambda *evs: {"vtn_id": "VTN", "request_id": "r", "events": list(evs)}  # noqa: E731
        await client._on_event(msg(event("old", "far", now - 120)))
        await client._on_event(msg(event("old", "completed", now - 120)))
        await client._on_event(msg(event("old", "completed", now - 120), event("new", "active", now - 1)))
        deadline = time.monotonic() + 20  # the active event's shed goes out at once: wait, bounded
        while not sent:
            assert time.monotonic() < deadline, b.records
            await asyncio.sleep(0.02)
        await quiet(b, 20)  # every plan's first decision made, nothing in flight
        for p in b.plans.values():
            p.task.cancel()
        return b

    b = asyncio.run(scenario())
    assert b.opts.get("new") == "optIn" and "new" in b.plans
    assert sent == ["shed"]


# ------------------------------------------------------------------------------ default sender
def test_default_sender_messages_verify_on_the_board(inventory, broker):
    path, keys = inventory
    sub = CmdSub(broker.port)
    try:
        s = SiteSender(path, via="mqtt", broker=f"{HOST}:{broker.port}", ack_timeout=0.5)
        assert sorted(s.check("site1")) == ["site1-ctl1", "site1-ctl2"]
        t_signed = int(time.time())
        res1 = s("shed", "site1", 250.0, 60)
        res2 = s("restore", "site1", None, 60)
        deadline = time.time() + 30
        while time.time() < deadline and len(sub.msgs) < 4:
            time.sleep(0.05)
    finally:
        sub.close()
    # no board answers on this broker: each result says so, per device, with its seq
    assert [r["device"] for r in res1] == ["site1-ctl1", "site1-ctl2"]
    assert all(r["ok"] is False and "error" in r for r in res1 + res2)
    by_dev: dict[str, list[bytes]] = {}
    for topic, payload in sub.msgs:
        _, site, dev, leaf = topic.split("/")
        assert (site, leaf) == ("site1", "cmd")
        by_dev.setdefault(dev, []).append(payload)
    assert sorted(by_dev) == ["site1-ctl1", "site1-ctl2"] and all(len(v) == 2 for v in by_dev.values())
    # checked as a board would on receipt (its clock then), not at whatever time this host got here
    now = min(sub.when)
    assert t_signed <= now
    for dev, msgs in by_dev.items():
        v = verifier(keys, dev, "site1")
        shed = v.verify(msgs[0], now)
        restore = v.verify(msgs[1], now)
        assert shed["cmd"] == "shed" and shed["kw"] == 250.0 and shed["site"] == "site1"
        assert restore["cmd"] == "restore" and "kw" not in restore
        # the bridge's own issuer entry on the board: its restore releases only its sheds
        assert shed["iss"] == restore["iss"] == "openadr" and "all" not in restore
        assert restore["seq"] > shed["seq"] and t_signed + 60 <= shed["exp"] <= max(sub.when) + 61
        with pytest.raises(CommandRefused, match="replay"):
            v.verify(msgs[0], now)
        other = "site1-ctl2" if dev == "site1-ctl1" else "site1-ctl1"
        with pytest.raises(CommandRefused, match="unknown-kid"):
            verifier(keys, other, "site1").verify(msgs[0], now)
        with pytest.raises(CommandRefused, match="wrong-target"):
            verifier(keys, dev, "site2").verify(msgs[1], now)
        # a COSE_Mac0 (tag 17) with HMAC 256/256 in the protected header
        assert msgs[0][:2] == b"\xd1\x84"
        protected = cbor.loads(msgs[0][1:])[0]
        assert cbor.loads(protected) == {1: 5}


def test_cli_bridge_end_to_end_over_mqtt(inventory, broker, tmp_path):
    """`gridshed openadr-ven` (subprocess) + openleadr VTN + Mosquitto: the signed commands on
    the wire verify with each device's key, shed at start then restore at end."""
    path, keys = inventory
    logf = tmp_path / "oadr.jsonl"
    sub = CmdSub(broker.port)

    def logged() -> list[dict]:
        text = logf.read_text() if logf.exists() else ""
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    async def scenario() -> tuple[str, bytes, str]:
        vtn = Vtn()
        url = await vtn.start()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "host_tools"), str(ROOT / "firmware")]))
        # runs until Ctrl-C: stopped below once its own log shows the event done, whatever the pace
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gridshed.cli", "openadr-ven", "--vtn", url, "--ven-name", "site1-ven",
            "--site", "site1", "--inventory", str(path), "--broker", f"{HOST}:{broker.port}", "--level", "1=300kw",
            "--timeout", "0.5", "--expires", "30s", "--json", "--log", str(logf), "--insecure",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async def until(pred, what: str) -> list[dict]:
                deadline = time.monotonic() + 120  # a hang guard only
                while not pred(recs := logged()):
                    assert proc.returncode is None, f"the bridge exited early: {recs[-5:]}"
                    assert time.monotonic() < deadline, f"hang guard: {what}; {recs[-5:]}"
                    await asyncio.sleep(0.1)
                return recs

            await until(lambda rs: any(r["kind"] == "registered" for r in rs), "registration")
            lead = 2.0
            for _ in range(5):
                ev = vtn.add("SIMPLE", "level", [(lead, 2.0, 1.0)])  # openleadr sends whole seconds
                recs = await until(lambda rs: any(r["kind"] == "event-ended" and r["event_id"] == ev for r in rs),
                                   "the event to end")
                opt = next(r for r in recs if r["kind"] == "opt" and r["event_id"] == ev)
                if _unix(opt["t"]) < _unix(opt["timeline"][-1]["end"]):
                    break
                lead *= 2  # learned only after its end (a slow host): nothing sent; again, further out
            else:
                raise AssertionError("the bridge never learned the event before its end")
            await _until(lambda: ev in vtn.opts, "the VTN to record the opt", recs)
            await _until(lambda: len(sub.msgs) >= 4, "both devices' shed and restore on the broker", recs)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        await vtn.server.stop()
        assert proc.returncode == 130 and b"gridshed: interrupted" in err, err.decode()
        return ev, out, vtn.opts.get(ev, "")

    try:
        ev, out, opt = asyncio.run(scenario())
    finally:
        sub.close()
    assert opt == "optIn"
    recs = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    kinds = [r["kind"] for r in recs]
    assert "site" in kinds and "registered" in kinds and kinds[-1] == "stop", kinds
    sends = [(r["cmd"], r["kw"]) for r in recs if r["kind"] == "sent"]
    assert sends == [("shed", 300.0), ("restore", None)], recs
    assert [json.loads(x)["kind"] for x in logf.read_text().splitlines()] == kinds  # same records in the file
    seen = {}
    for (topic, payload), now in zip(sub.msgs, sub.when):  # checked at receipt, as a board would
        dev = topic.split("/")[2]
        seen.setdefault(dev, verifier(keys, dev, "site1"))
        cmd = seen[dev].verify(payload, now)
        assert cmd["site"] == "site1" and cmd["exp"] <= now + 31
    assert sorted(seen) == ["site1-ctl1", "site1-ctl2"]  # site2's device got nothing
    assert all(v.counters["accepted"] == 2 for v in seen.values())


def test_cli_errors_and_help(inventory, capsys):
    from gridshed.cli import main

    path, _ = inventory
    with pytest.raises(SystemExit) as e:
        main(["openadr-ven", "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out
    secure = ["openadr-ven", "--vtn", "https://127.0.0.1:9/OpenADR2/Simple/2.0b", "--ven-name", "v",
              "--inventory", str(path), "--site", "site1", "--level", "1=full"]
    for extra, msg in (([], "need --cert, --key and --vtn-fingerprint"),):
        assert main(secure + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    plain = ["openadr-ven", "--vtn", "http://127.0.0.1:9/OpenADR2/Simple/2.0b", "--ven-name", "v",
             "--inventory", str(path), "--site", "site1", "--level", "1=full"]
    assert main(plain) == 2  # http without --insecure
    err = capsys.readouterr().err
    assert "https is required" in err and err.count("\n") == 1, err
    with pytest.raises(UserError, match="https is required"):
        VenBridge("http://vtn", "v", "site1", lambda *a: None, levels=LevelMap.parse(["1=full"]))
    base = ["openadr-ven", "--vtn", "http://127.0.0.1:9/OpenADR2/Simple/2.0b", "--ven-name", "v",
            "--inventory", str(path), "--insecure"]
    for extra, msg in ((["--site", "site1"], "site-kw"),                    # default 1=50% needs --site-kw
                       (["--site", "site1", "--level", "1=half"], "bad level"),
                       (["--level", "1=full"], "give --site"),              # two sites in the inventory
                       (["--site", "nowhere", "--level", "1=full"], "no device of site"),
                       (["--site", "site1", "--level", "1=full", "--via", "udp"], "no udp address")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (extra, err)


# ------------------------------------------------------------------------------ pure mapping
def test_level_map_and_signal_mapping():
    m = LevelMap.parse(["1=25%", "3=none"], site_kw=800.0)
    assert m.action(0).kind == NONE
    assert m.action(1) == Action(KW, 200.0)
    assert m.action(2).kind == FULL and m.action(3).kind == NONE
    assert LevelMap.parse(["1=120kw"]).action(1) == Action(KW, 120.0)
    assert LevelMap.parse(["1=full"]).action(1).kind == FULL
    for bad in ("4=full", "1=0%", "1=150%", "x=full", "1="):
        with pytest.raises(UserError):
            LevelMap.parse([bad], site_kw=100.0)
    with pytest.raises(UserError, match="site-kw"):
        LevelMap.parse(None)
    assert combine([Action(KW, 100.0), Action(KW, 300.0)]) == Action(KW, 300.0)
    assert combine([Action(KW, 100.0), Action(FULL)]).kind == FULL
    assert combine([]).kind == NONE

    t = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def ev(name: str, stype: str, value: float, meas: dict | None = None) -> dict:
        sig = {"signal_name": name, "signal_type": stype,
               "intervals": [{"dtstart": t, "duration": timedelta(minutes=5), "signal_payload": value},
                             {"dtstart": t + timedelta(minutes=5), "duration": timedelta(0), "signal_payload": 0.0}]}
        if meas:
            sig["measurement"] = meas
        return {"event_signals": [sig]}

    segs, skipped = plan_event(ev("LOAD_DISPATCH", "setpoint", 650.0), m, 800.0)
    assert not skipped and segs[0].action == Action(KW, 150.0) and segs[1].end is None
    segs, _ = plan_event(ev("LOAD_DISPATCH", "delta", 90000.0, {"unit": "W", "scale": "none"}), m, None)
    assert segs[0].action == Action(KW, 90.0) and segs[1].action.kind == NONE
    segs, skipped = plan_event(ev("LOAD_DISPATCH", "setpoint", 650.0), m, None)
    assert not segs and "site-kw" in skipped[0]
    segs, skipped = plan_event(ev("LOAD_CONTROL", "x-loadControlCapacity", 0.5), m, 800.0)
    assert not segs and "not supported" in skipped[0]


# ------------------------------------------------------------------------------ price events
def test_price_events_from_openleadr_vtn_become_signed_schedules(inventory, broker):
    """ELECTRICITY_PRICE events from openleadr's VTN -> the real SiteSender -> one signed
    schedule per device of the site on a real Mosquitto: the rows of every live price event
    ($/kWh x 1000), a newer event's rows after an older one's, a cancel re-sending without it;
    a relative price is answered optOut and sends nothing."""
    from agent import cmd_mac0 as mac0

    path, keys = inventory
    sub = CmdSub(broker.port)
    sender = SiteSender(path, via="mqtt", broker=f"{HOST}:{broker.port}", ack_timeout=0.3)
    kwh = objects.Measurement(name="currencyPerKWh", description="currencyPerKWh", unit="USD", scale="none")

    def schedules(b: VenBridge) -> list[dict]:
        return [r for r in b.records if r["kind"] == "sent" and r.get("cmd") == "schedule"]

    async def scenario() -> tuple[dict, dict, VenBridge, float]:
        vtn = Vtn()
        url = await vtn.start()
        bridge = VenBridge(url, "site1-ven", "site1", lambda *a: None, insecure=True,
                           levels=LevelMap.parse(["1=full"]), send_schedule=sender.schedule, expires_s=45)
        await bridge.start()
        t0 = time.time()
        ids = {"a": vtn.add("ELECTRICITY_PRICE", "price", [(600, 900, 0.25), (1500, 900, 0.031)], kwh)}
        await _until(lambda: len(schedules(bridge)) == 1, "the first schedule", bridge.records)
        ids["b"] = vtn.add("ELECTRICITY_PRICE", "price", [(900, 900, 0.5)], kwh)
        await _until(lambda: len(schedules(bridge)) == 2, "the second schedule", bridge.records)
        ids["rel"] = vtn.add("ELECTRICITY_PRICE", "priceRelative", [(600, 900, 0.1)])
        await _until(lambda: ids["rel"] in bridge.opts, "the relative price's answer", bridge.records)
        vtn.server.cancel_event(VEN_ID, ids["a"])
        await _until(lambda: len(schedules(bridge)) == 3, "the schedule after the cancel", bridge.records)
        await _until(lambda: all(i in vtn.opts for i in ids.values()), "the VTN's record of every opt",
                     bridge.records)
        await quiet(bridge, 60)
        await bridge.stop()
        await vtn.server.stop()
        return ids, vtn.opts, bridge, t0

    try:
        ids, opts, bridge, t0 = asyncio.run(scenario())
        deadline = time.time() + 30
        while time.time() < deadline and len(sub.msgs) < 6:
            time.sleep(0.05)
    finally:
        sub.close()
    assert opts[ids["a"]] == "optIn" and opts[ids["b"]] == "optIn" and opts[ids["rel"]] == "optOut"
    assert any(r["kind"] == "signal-skipped" and "only absolute prices" in r["reason"] for r in bridge.records)
    assert [r["intervals"] for r in schedules(bridge)] == [2, 3, 1]
    # on the wire: per device three schedules, each accepted by the board's own command checks
    # (agent.cmd_api: MAC with that device's key, target, seq, expiry on receipt), ids rising
    by_dev: dict[str, list[dict]] = {}
    boards = {dev: verifier(keys, dev, "site1") for dev in ("site1-ctl1", "site1-ctl2")}
    for (topic, payload), now in zip(sub.msgs, sub.when):
        dev = topic.split("/")[2]
        c = boards[dev].verify(payload, now)
        assert c["cmd"] == "schedule" and c["site"] == "site1", c
        kid, key = keys[dev]
        r = mac0.verify(payload, {kid: key}, 4096)
        assert isinstance(r, tuple), (dev, r)
        by_dev.setdefault(dev, []).append(cbor.loads(r[1]))
        assert by_dev[dev][-1]["sid"] == c["sid"] and by_dev[dev][-1]["iv"] == c["iv"]
    assert sorted(by_dev) == ["site1-ctl1", "site1-ctl2"]
    for dev, ps in by_dev.items():
        assert [p["cmd"] for p in ps] == ["schedule"] * 3 and all(p["dev"] == dev for p in ps)
        assert ps[0]["sid"] < ps[1]["sid"] < ps[2]["sid"] and ps[0]["seq"] < ps[1]["seq"] < ps[2]["seq"]
        a1, a2 = ps[0]["iv"]
        assert [a1[2], a1[3], a2[2], a2[3]] == ["p", 250, "p", 31]        # $0.25/kWh, $0.031/kWh
        assert a1[1] - a1[0] == 900 and a2[0] - a1[0] == 900 and a2[1] - a2[0] == 900
        assert t0 + 600 - 5 <= a1[0] <= time.time() + 600
        assert ps[1]["iv"][:2] == ps[0]["iv"] and ps[1]["iv"][2][3] == 500  # the newer event last: it wins
        assert ps[2]["iv"] == ps[1]["iv"][2:]                               # event a cancelled


def test_price_signal_units():
    from gridshed.openadr import price_rows

    t = datetime(2027, 7, 15, 20, tzinfo=timezone.utc)
    iv = [{"dtstart": t, "duration": timedelta(minutes=15), "signal_payload": 0.1234}]
    sig = {"signal_name": "ELECTRICITY_PRICE", "signal_type": "price", "intervals": iv}
    u = int(t.timestamp())
    assert price_rows(sig) == [[u, u + 900, "p", 123.4]]                   # no measurement: $/kWh
    assert price_rows(sig, "mwh") == [[u, u + 900, "p", 0.12]]
    assert price_rows({**sig, "measurement": {"name": "currencyPerKWh", "unit": "USD", "scale": "m"}}) == \
        [[u, u + 900, "p", 0.12]]                                           # milli-dollars per kWh
    for bad, msg in (({**sig, "signal_type": "priceMultiplier"}, "only absolute"),
                     ({**sig, "measurement": {"name": "currencyPerKWh", "unit": "EUR"}}, "currency 'EUR'"),
                     ({**sig, "measurement": {"name": "currencyPerKW", "unit": "USD"}}, "not a price per energy"),
                     ({**sig, "intervals": [{**iv[0], "duration": timedelta(0)}]}, "without a duration"),
                     ({**sig, "intervals": [{**iv[0], "signal_payload": float("nan")}]}, "not a number")):
        with pytest.raises(ValueError, match=msg):
            price_rows(bad)


def test_a_cut_price_schedule_rolls_forward():
    """A price schedule longer than one command carries: the sender sends the head that fits,
    the bridge sends again when the first row is over (the rest moving up), until all is sent."""
    calls: list[list[list]] = []

    def sender(rows: list, site: str, expires_s: int) -> dict:
        calls.append(rows)
        return {"rows": min(len(rows), 2), "boards": []}  # a transport that carries two rows

    async def scenario() -> VenBridge:
        b = VenBridge("http://unused", "v", "site1", lambda *a: None, insecure=True,
                      levels=LevelMap.parse(["1=full"]), send_schedule=sender)
        b._lock = asyncio.Lock()
        now = time.time()
        t = datetime.fromtimestamp(now, timezone.utc)
        ivs = [{"dtstart": t + timedelta(seconds=d), "duration": timedelta(seconds=1 if i == 0 else 60),
                "signal_payload": 0.1 * (i + 1)} for i, d in enumerate((0, 1, 61, 121))]
        ev = {"event_descriptor": {"event_id": "p1", "event_status": "active", "modification_number": 0},
              "active_period": {"dtstart": t, "duration": timedelta(seconds=181)},
              "event_signals": [{"signal_name": "ELECTRICITY_PRICE", "signal_type": "price", "intervals": ivs}]}
        assert await b.on_event(ev) == "optIn"
        deadline = time.monotonic() + 30  # the first row ends 1 s after the event starts: wait, bounded
        while len(calls) < 2:
            assert time.monotonic() < deadline, b.records
            await asyncio.sleep(0.02)
        await quiet(b, 20)
        await b.stop()
        return b

    b = asyncio.run(scenario())
    assert [len(c) for c in calls] == [4, 3], calls          # the first row over: the rest moves up
    assert [r[3] for r in calls[1]] == [200, 300, 400]
    rolls = [r for r in b.records if r["kind"] == "roll"]
    assert rolls and rolls[0]["sent"] == 2 and rolls[0]["of"] == 4
