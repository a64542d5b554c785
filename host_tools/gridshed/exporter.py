"""Prometheus / OpenMetrics exporter fed by the MQTT fleet channel (docs/metrics.md).

The boards publish their retained state (`gridshed/<site>/<device>/state`) and periodic telemetry
(`gridshed/<site>/<device>/telemetry`) on the fleet broker (docs/mqtt.md). `Fleet` keeps the last
values per device from those messages; `FleetCollector` turns them into metric families at each
scrape; `Exporter` wires a paho-mqtt subscriber to a `Fleet` and serves the registry over HTTP
with prometheus-client (text format, or OpenMetrics when the scraper asks for it).

A message that is not what the boards send (not UTF-8 JSON, not an object, a field of the wrong
type, a device name that is not its topic's, an oversized payload, a state whose MAC does not
verify when keys are given) is dropped whole and counted in
`gridshed_exporter_bad_messages_total{reason}`; nothing a publisher sends can stop the exporter.

Home Assistant MQTT discovery (optional): for every device seen, retained config messages under
`<prefix>/sensor/...` and `<prefix>/binary_sensor/...` that point Home Assistant at the board's
own state and telemetry topics, plus `gridshed/<site>/<device>/exporter` where the exporter
publishes the available MW it derived (docs/metrics.md, "Home Assistant").

Libraries never print: events for a person go to the `on_event` callback.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import UserError

# agent/control.py STATE_NAMES (the firmware's control states, in order)
STATES = ("normal", "pickup", "tripped", "restore_hold", "restoring", "disarmed")
KINDS = ("state", "telemetry")
MAX_PAYLOAD = 4096          # a board's state is < 1 KB; anything larger is not one
MAX_DEVICES = 10000         # more distinct devices than this: new ones are refused and counted
BAD_REASONS = ("topic", "oversize", "encoding", "json", "not-object", "field", "device", "unverified", "too-many-devices")
# names a board may use for what a trip would shed now (the market work adds one; either accepted)
AVAILABLE_KEYS = ("available_kw", "avail_kw")
NAME_OK = re.compile(r"^[^/+#\x00]{1,64}$")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any, lo: int = 0, hi: int = 2 ** 31) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


@dataclass
class Device:
    site: str
    device: str
    online: bool | None = None
    state: str | None = None
    armed: bool | None = None
    shed: bool | None = None
    held: int | None = None
    mask: int | None = None
    acc: int | None = None
    ref: int | None = None
    time_trusted: bool | None = None
    integrity: bool = False
    hz: float | None = None
    kw: float | None = None
    board_available_kw: float | None = None
    trips: int = 0
    state_changes: int = 0
    messages: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    last_seen: dict[str, float] = field(default_factory=dict)

    def available(self, blocks_kw: list[float] | None) -> tuple[float | None, str]:
        """(kW a trip would shed now, where the figure comes from).

        0 while the board is offline on MQTT (its agent may be stopped for maintenance), disarmed
        or already shed (no closed block). Otherwise: the board's own figure when it sends one
        (source "board"); else the nameplate kW of the closed blocks from the site config given
        to the exporter ("config"); else the metered kW while any block is closed ("meter", an
        upper bound: it includes load behind no relay)."""
        if self.board_available_kw is not None:
            return (0.0 if self.online is False else max(0.0, self.board_available_kw)), "board"
        source = "config" if blocks_kw is not None else "meter"
        if self.online is False or self.armed is False or self.state == "disarmed":
            return 0.0, source
        if self.mask is None:
            return None, source
        if self.mask == 0:
            return 0.0, source
        if blocks_kw is not None:
            return float(sum(kw for i, kw in enumerate(blocks_kw) if self.mask >> i & 1)), source
        if self.kw is None:
            return None, source
        return max(0.0, self.kw), source


class Fleet:
    """The exporter's view of the fleet: the last values per (site, device), from MQTT messages.

    `on_message(topic, payload)` is safe to call from the MQTT thread; it never raises.
    blocks: {device id: [kW of block 0, block 1, ...]} (from site configs) for the available
    figure; keys: {device id: key} to accept only states whose MAC verifies (docs/mqtt.md)."""

    def __init__(self, sites: Iterable[str] | None = None, blocks: dict[str, list[float]] | None = None,
                 keys: dict[str, bytes] | None = None, clock: Callable[[], float] = time.time,
                 on_new_device: Callable[[Device], None] | None = None,
                 on_change: Callable[[Device], None] | None = None) -> None:
        self.sites = set(sites) if sites else None
        self.blocks = dict(blocks or {})
        self.keys = dict(keys or {})
        self.clock = clock
        self.on_new_device = on_new_device
        self.on_change = on_change
        self.lock = threading.Lock()
        self.devices: dict[tuple[str, str], Device] = {}
        self.accepted = {k: 0 for k in KINDS}
        self.bad = {r: 0 for r in BAD_REASONS}
        self.callback_errors = 0

    # ---- input ----------------------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes) -> str | None:
        """Take one message; returns None when accepted, else the reason it was dropped."""
        try:
            why = self._take(topic, payload)
        except Exception:  # a bug here must not stop the subscriber: counted as a bad field
            why = "field"
        if why is not None:
            with self.lock:
                self.bad[why] = self.bad.get(why, 0) + 1
        return why

    def _take(self, topic: str, payload: bytes) -> str | None:
        parts = topic.split("/") if isinstance(topic, str) else []
        if len(parts) != 4 or parts[0] != "gridshed" or parts[3] not in KINDS \
                or not NAME_OK.match(parts[1]) or not NAME_OK.match(parts[2]):
            return "topic"
        site, dev, kind = parts[1], parts[2], parts[3]
        if self.sites is not None and site not in self.sites:
            return "topic"
        if len(payload) > MAX_PAYLOAD:
            return "oversize"
        if kind == "state" and dev in self.keys:
            from .fleet_client import verify_state

            obj = verify_state(self.keys[dev], topic, bytes(payload))
            if obj is None:
                return "unverified"
        else:
            try:
                text = bytes(payload).decode("utf-8")
            except UnicodeDecodeError:
                return "encoding"
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                return "json"
        if not isinstance(obj, dict):
            return "not-object"
        upd = self._state(obj, dev) if kind == "state" else self._telemetry(obj)
        if isinstance(upd, str):
            return upd
        new = changed = False
        with self.lock:
            d = self.devices.get((site, dev))
            if d is None:
                if len(self.devices) >= MAX_DEVICES:
                    return "too-many-devices"
                d = self.devices[(site, dev)] = Device(site, dev)
                new = True
            before = (d.online, d.state, d.armed, d.mask, d.board_available_kw)
            st = upd.pop("state", None)
            if st is not None and st != d.state:
                if d.state is not None:
                    d.state_changes += 1
                    if st == "tripped":
                        d.trips += 1
                d.state = st
            for k, v in upd.items():
                setattr(d, k, v)
            d.messages[kind] += 1
            d.last_seen[kind] = self.clock()
            self.accepted[kind] += 1
            changed = before != (d.online, d.state, d.armed, d.mask, d.board_available_kw)
        for cb, yes in ((self.on_new_device, new), (self.on_change, changed or new)):
            if cb is not None and yes:
                try:
                    cb(d)
                except Exception:
                    self.callback_errors += 1
        return None

    @staticmethod
    def _available(obj: dict[str, Any], out: dict[str, Any]) -> str | None:
        for k in AVAILABLE_KEYS:
            if k in obj:
                v = obj[k]
                if v is not None and not _num(v):
                    return "field"
                out["board_available_kw"] = None if v is None else float(v)
                break
        return None

    def _state(self, obj: dict[str, Any], dev: str) -> dict[str, Any] | str:
        if "dev" in obj and obj["dev"] != dev:
            return "device"
        online = obj.get("online")
        if not isinstance(online, bool):
            return "field"
        out: dict[str, Any] = {"online": online}
        if not online:  # the last will says only that
            return out
        for k, attr in (("armed", "armed"), ("shed", "shed"), ("time", "time_trusted")):
            if k in obj:
                if not isinstance(obj[k], bool):
                    return "field"
                out[attr] = obj[k]
        for k in ("mask", "held", "acc", "ref"):
            if k in obj:
                if not _int(obj[k]):
                    return "field"
                out[k] = obj[k]
        if "state" in obj:
            if obj["state"] not in STATES:
                return "field"
            out["state"] = obj["state"]
        return self._available(obj, out) or out

    def _telemetry(self, obj: dict[str, Any]) -> dict[str, Any] | str:
        out: dict[str, Any] = {}
        for k in ("hz", "kw"):
            v = obj.get(k)
            if v is not None and not _num(v):
                return "field"
            if k in obj:
                out[k] = None if v is None else float(v)
        if "mask" in obj:
            if not _int(obj["mask"]):
                return "field"
            out["mask"] = obj["mask"]
        if "state" in obj:
            if obj["state"] not in STATES:
                return "field"
            out["state"] = obj["state"]
        if "t" in obj and obj["t"] is not None and not _num(obj["t"]):
            return "field"
        out["integrity"] = bool(obj.get("integrity"))
        return self._available(obj, out) or out

    # ---- output ---------------------------------------------------------------------------
    def snapshot(self) -> list[tuple[Device, float | None, str]]:
        """Copies of every device with its (available kW, source), under the lock."""
        with self.lock:
            out = []
            for d in self.devices.values():
                c = Device(**{k: getattr(d, k) for k in d.__dataclass_fields__})
                c.messages, c.last_seen = dict(d.messages), dict(d.last_seen)
                kw, src = c.available(self.blocks.get(d.device))
                out.append((c, kw, src))
            return out


def blocks_from_site(path: str) -> tuple[str, list[float]]:
    """(device id, [nameplate kW per block]) from a site.toml: miners x kw_per_miner, or the
    block's own `kw` when it gives one."""
    from . import siteconfig

    cfg = siteconfig.load_site(path)
    out = []
    for b in cfg["blocks"]:
        kw = b.get("kw")
        if not _num(kw):
            kw = float(b.get("miners") or 0) * float(b.get("kw_per_miner") or 0)
        out.append(float(kw))
    return cfg["device"], out


class FleetCollector:
    """prometheus-client collector: every metric from a `Fleet` at scrape time."""

    def __init__(self, fleet: Fleet, exporter: "Exporter | None" = None) -> None:
        self.fleet = fleet
        self.exporter = exporter

    def describe(self) -> list:
        return []  # unchecked collector: families are built at each scrape

    def collect(self):  # noqa: C901 - one family after another
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        L = ["site", "device"]
        g: dict[str, Any] = {}

        def gauge(name: str, doc: str, labels: list[str] = L, unit: str = "") -> GaugeMetricFamily:
            g[name] = GaugeMetricFamily(name, doc, labels=labels, unit=unit)
            return g[name]

        def counter(name: str, doc: str, labels: list[str] = L) -> CounterMetricFamily:
            g[name] = CounterMetricFamily(name, doc, labels=labels)
            return g[name]

        online = gauge("gridshed_online", "1 while the board's retained MQTT state says online (0 after its last will)")
        hz = gauge("gridshed_frequency_hertz", "grid frequency the board last measured (telemetry)")
        kw = gauge("gridshed_load_kilowatts", "site load the board's meter last read, kW (telemetry)")
        avail = gauge("gridshed_available_megawatts", "what a trip would shed now, MW (docs/metrics.md: source)")
        src = gauge("gridshed_available_source", "where gridshed_available_megawatts comes from (board, config, meter)",
                    L + ["source"])
        state = gauge("gridshed_state", "1 for the board's current control state, 0 for the others", L + ["state"])
        armed = gauge("gridshed_armed", "1 while under-frequency tripping is armed")
        shed = gauge("gridshed_shed_commanded", "1 while a commanded shed is in force")
        held = gauge("gridshed_shed_holders", "shed authority entries holding a full shed (bits set in held)")
        mask = gauge("gridshed_relay_mask", "relay blocks closed, bit i = block i")
        closed = gauge("gridshed_blocks_closed", "number of relay blocks closed (load on)")
        trusted = gauge("gridshed_time_trusted", "1 once the board trusts its clock (a signed time-sync)")
        integ = gauge("gridshed_integrity_alarm", "1 while the board reports a settings file refused at boot")
        last = gauge("gridshed_last_message_timestamp_seconds", "host time of the last accepted message, by topic",
                     L + ["kind"])
        trips = counter("gridshed_trips", "transitions into the tripped state seen by this exporter")
        changes = counter("gridshed_state_changes", "control state changes seen by this exporter")
        acc = counter("gridshed_commands_accepted", "signed commands the board accepted over MQTT since its boot")
        ref = counter("gridshed_commands_refused", "signed commands the board refused over MQTT since its boot")
        msgs = counter("gridshed_messages", "messages accepted from the board, by topic", L + ["kind"])
        for d, a_kw, a_src in self.fleet.snapshot():
            lv = [d.site, d.device]
            if d.online is not None:
                online.add_metric(lv, 1.0 if d.online else 0.0)
            if d.hz is not None:
                hz.add_metric(lv, d.hz)
            if d.kw is not None:
                kw.add_metric(lv, d.kw)
            if a_kw is not None:
                avail.add_metric(lv, a_kw / 1000.0)
                src.add_metric(lv + [a_src], 1.0)
            if d.state is not None:
                for s in STATES:
                    state.add_metric(lv + [s], 1.0 if s == d.state else 0.0)
            for fam, v in ((armed, d.armed), (shed, d.shed), (trusted, d.time_trusted)):
                if v is not None:
                    fam.add_metric(lv, 1.0 if v else 0.0)
            if d.held is not None:
                held.add_metric(lv, float(bin(d.held).count("1")))
            if d.mask is not None:
                mask.add_metric(lv, float(d.mask))
                closed.add_metric(lv, float(bin(d.mask).count("1")))
            integ.add_metric(lv, 1.0 if d.integrity else 0.0)
            for k, t in d.last_seen.items():
                last.add_metric(lv + [k], t)
            trips.add_metric(lv, d.trips)
            changes.add_metric(lv, d.state_changes)
            if d.acc is not None:
                acc.add_metric(lv, d.acc)
            if d.ref is not None:
                ref.add_metric(lv, d.ref)
            for k, n in d.messages.items():
                msgs.add_metric(lv + [k], n)
        f = self.fleet
        with f.lock:
            accepted, bad, ndev = dict(f.accepted), dict(f.bad), len(f.devices)
        em = counter("gridshed_exporter_messages", "messages accepted on the fleet topics, by topic", ["kind"])
        for k, n in accepted.items():
            em.add_metric([k], n)
        eb = counter("gridshed_exporter_bad_messages", "messages dropped (not what a board sends), by reason",
                     ["reason"])
        for k, n in bad.items():
            eb.add_metric([k], n)
        gauge("gridshed_exporter_devices", "devices seen", []).add_metric([], ndev)
        x = self.exporter
        conn = gauge("gridshed_exporter_mqtt_connected", "1 while the exporter is connected to the broker", [])
        conn.add_metric([], 1.0 if x is not None and x.connected else 0.0)
        counter("gridshed_exporter_mqtt_connects", "connections to the broker (CONNACK accepted)", []).add_metric(
            [], x.connects if x is not None else 0)
        counter("gridshed_exporter_ha_discovery_messages", "Home Assistant discovery configs published", []).add_metric(
            [], x.ha_published if x is not None else 0)
        yield from g.values()


# ---- Home Assistant MQTT discovery ---------------------------------------------------------------
def _oid(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def exporter_topic(site: str, device: str) -> str:
    return f"gridshed/{site}/{device}/exporter"


def ha_discovery(d: Device, prefix: str = "homeassistant") -> list[tuple[str, dict[str, Any]]]:
    """(topic, config) pairs, retained, that make Home Assistant show one board: frequency, load,
    control state, available MW (from the exporter's topic), online and armed."""
    base = f"gridshed/{d.site}/{d.device}"
    node = _oid(f"gridshed_{d.site}_{d.device}")
    device = {"identifiers": [node], "name": f"gridshed {d.device}", "manufacturer": "gridshed",
              "model": "load-shed controller", "suggested_area": d.site}
    avail = [{"topic": f"{base}/state", "value_template": "{{ 'online' if value_json.online else 'offline' }}"}]
    common = {"device": device, "availability": avail}
    items: list[tuple[str, str, dict[str, Any]]] = [
        ("sensor", "frequency", {"name": "Frequency", "state_topic": f"{base}/telemetry",
                                 "value_template": "{{ value_json.hz }}", "unit_of_measurement": "Hz",
                                 "device_class": "frequency", "state_class": "measurement"}),
        ("sensor", "load", {"name": "Load", "state_topic": f"{base}/telemetry",
                            "value_template": "{{ value_json.kw }}", "unit_of_measurement": "kW",
                            "device_class": "power", "state_class": "measurement"}),
        ("sensor", "state", {"name": "Control state", "state_topic": f"{base}/state",
                             "value_template": "{{ value_json.state | default('offline') }}",
                             "icon": "mdi:transmission-tower"}),
        ("sensor", "available", {"name": "Available", "state_topic": exporter_topic(d.site, d.device),
                                 "value_template": "{{ value_json.available_mw }}", "unit_of_measurement": "MW",
                                 "device_class": "power", "state_class": "measurement"}),
        ("binary_sensor", "online", {"name": "Online", "state_topic": f"{base}/state",
                                     "value_template": "{{ 'ON' if value_json.online else 'OFF' }}",
                                     "device_class": "connectivity"}),
        ("binary_sensor", "armed", {"name": "Armed", "state_topic": f"{base}/state",
                                    "value_template": "{{ 'ON' if value_json.armed else 'OFF' }}",
                                    "icon": "mdi:shield-check"}),
    ]
    out = []
    for component, what, cfg in items:
        conf = dict(cfg, unique_id=f"{node}_{what}", object_id=f"{node}_{what}", **common)
        if what == "online":  # shown even while offline
            conf.pop("availability")
        out.append((f"{prefix}/{component}/{node}/{what}/config", conf))
    return out


class Exporter:
    """An MQTT subscriber (paho) feeding a Fleet, and the HTTP endpoint serving its metrics."""

    def __init__(self, broker: tuple[str, int], listen: tuple[str, int], fleet: Fleet,
                 ha_prefix: str | None = None, client_id: str = "gridshed-exporter", opts: Any = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.broker, self.listen, self.fleet = broker, listen, fleet
        self.ha_prefix = ha_prefix
        self.client_id = client_id
        self.opts = opts  # fleet_client.BrokerOpts: the site's TLS and login (None: plain, anonymous)
        self.on_event = on_event or (lambda event, data: None)
        self.connected = False
        self.connects = 0
        self.ha_published = 0
        self.http: Any = None
        self.port: int | None = None
        self.client: Any = None
        self._announced: dict[tuple[str, str], tuple[float | None, str]] = {}
        self._fail_said = False
        if ha_prefix is not None:
            fleet.on_new_device = self._discover
            fleet.on_change = self._publish_available

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "Exporter":
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(self.fleet, self))
        host, port = self.listen
        try:
            started = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.http = started[0] if isinstance(started, tuple) else None
        self.port = self.http.server_port if self.http is not None else port
        shown = f"[{host}]" if ":" in host else host
        self.on_event("listening", {"url": f"http://{shown}:{self.port}/metrics", "port": self.port})
        self._mqtt()
        return self

    def _mqtt(self) -> None:
        from .fleet_client import paho_client

        c = paho_client(self.client_id, self.opts, self.broker[0])
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_connect_fail = self._on_connect_fail
        c.reconnect_delay_set(1, 30)
        self.client = c
        c.connect_async(self.broker[0], self.broker[1], keepalive=30)
        c.loop_start()

    def stop(self) -> None:
        if self.client is not None:
            try:
                self.client.disconnect()
                self.client.loop_stop()
            except Exception:
                pass
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()

    # ---- MQTT callbacks ---------------------------------------------------------------------
    def topics(self) -> list[str]:
        sites = sorted(self.fleet.sites) if self.fleet.sites else ["+"]
        return [f"gridshed/{s}/+/{k}" for s in sites for k in KINDS]

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            self.on_event("refused", {"broker": "%s:%d" % self.broker, "reason": str(reason)})
            return
        self.connected = True
        self._fail_said = False
        self.connects += 1
        client.subscribe([(t, 1) for t in self.topics()])
        self._announced.clear()  # a broker restart may have lost retained configs: send them again
        if self.ha_prefix is not None:
            for d, _kw, _src in self.fleet.snapshot():
                self._discover(d)
        self.on_event("connected", {"broker": "%s:%d" % self.broker, "topics": self.topics()})

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        # no TCP connection or TLS refused (paho retries): said once per outage
        if not self._fail_said:
            self._fail_said = True
            self.on_event("unreachable", {"broker": "%s:%d" % self.broker})

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if self.connected:
            self.on_event("disconnected", {"broker": "%s:%d" % self.broker, "reason": str(reason)})
        self.connected = False

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.fleet.on_message(msg.topic, msg.payload)

    # ---- Home Assistant ---------------------------------------------------------------------
    def _discover(self, d: Device) -> None:
        if self.client is None or self.ha_prefix is None:
            return
        for topic, conf in ha_discovery(d, self.ha_prefix):
            self.client.publish(topic, json.dumps(conf), qos=1, retain=True)
            self.ha_published += 1
        self._publish_available(d)

    def _publish_available(self, d: Device) -> None:
        if self.client is None:
            return
        kw, src = d.available(self.fleet.blocks.get(d.device))
        if self._announced.get((d.site, d.device)) == (kw, src):
            return
        self._announced[(d.site, d.device)] = (kw, src)
        body = {"available_mw": None if kw is None else round(kw / 1000.0, 6), "source": src}
        self.client.publish(exporter_topic(d.site, d.device), json.dumps(body), qos=0, retain=True)
