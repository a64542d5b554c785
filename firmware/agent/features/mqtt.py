# The MQTT fleet channel (config section "mqtt": enabled, host, port, keepalive_s, telemetry_s).
# Topics and payloads: docs/mqtt.md. Signed commands: docs/security.md.
#
# The MQTT client's reader only queues command bytes (bounded: PENDING_MAX; while it is full the
# reader waits before taking the next message, so a flood backs up at the broker instead of
# pushing a real command out; "mqtt_cmd_dropped" counts any that still could not be queued); this module's task verifies them through agent.signed_command (the same
# path as serial and UDP) and publishes the retained state after each one, with the accepted
# seq, so a host sees every board act exactly once. Every state message (and the last will)
# ends with "mac": {kid hex: HMAC-SHA256 with that provisioned key over topic, NUL, the JSON
# text before the mac field} (docs/mqtt.md): the host accepts only states that verify with the
# device's key, so a forged state cannot confirm a command the board never saw. The state is also republished when the
# control state, armed flag or relay mask change; telemetry (hz, kw, mask, state) goes out every
# telemetry_s. Nothing here waits on the network: publish() only queues.
import asyncio
import gc
import json

from agent import control
from agent.base import hmac_sha256, log
from agent.compat import const, ticks_ms, ticks_diff

PENDING_MAX = const(4)
POLL_MS = const(100)


class Fleet:
    def __init__(self, agent):
        from agent.mqtt_client import MqttClient

        c = agent.cfg
        m = c["mqtt"]
        self.a = agent
        self.dev = c["device"]
        base = "gridshed/%s/%s/" % (c["site"], self.dev)
        self.t_state = base + "state"
        self.t_tele = base + "telemetry"
        self.pending = []
        self.seq = None        # last accepted seq / cmd (any transport sets it via on_result)
        self.cmd = None
        self.refused = None    # last refusal reason on this channel
        self.rid = None        # and the last 4 bytes (hex) of the refused message
        self.acc = 0
        self.ref = 0
        self._snap = -1
        self.keys = _keys()
        self.fail = None  # the last named connection failure (agent/mqtt_tls.py), for @status
        kw = {}
        if m.get("tls") or m.get("auth", "none") != "none":  # the TLS code only for such a site
            from agent import mqtt_tls

            kw = mqtt_tls.client_kw(self, m)
        self.client = MqttClient(
            m["host"], m["port"], self.dev, keepalive=m["keepalive_s"],
            will=(self.t_state, self.sign(self.t_state, '{"dev": "%s", "online": false}' % self.dev), True),
            on_message=self.on_message, on_connect=self.on_connect,
            topics=(base + "cmd", "gridshed/%s/cmd" % c["site"]),
            max_packet=640, queue_max=4, busy=lambda: len(self.pending) >= PENDING_MAX, **kw)

    # ---- MQTT callbacks (reader task: keep them short, never touch relays) ---------------
    def on_message(self, topic, payload):
        if len(self.pending) >= PENDING_MAX:
            self.a.count("mqtt_cmd_dropped")
            return
        try:
            self.pending.append(payload)
        except MemoryError:  # acknowledged once this returns: room first, never dropped for RAM
            gc.collect()
            self.pending.append(payload)

    def on_connect(self, client):
        self.fail = None
        self.publish_state()

    # ---- state ---------------------------------------------------------------------------
    def snapshot(self):
        a = self.a
        c = a.ctrl
        return (c.state << 24) | ((1 if c.armed else 0) << 23) | ((1 if a.cmd_shed else 0) << 22) | (
            a.relays.mask & 0x3FFFFF)

    def publish_state(self):
        # (from the reader's on_connect too: never raises; unpublished, it is tried again by
        # run() because _snap is set only once the message is queued)
        a = self.a
        c = a.ctrl
        try:
            snap = self.snapshot()
            if a.nonce is None:  # made here, outside the module that checks it: no module load
                import os

                a.nonce = os.urandom(8)
            st = {"dev": self.dev, "online": True, "state": control.STATE_NAMES[c.state],
                  "armed": c.armed, "shed": a.cmd_shed, "held": a.auth.held, "mask": a.relays.mask,
                  "seq": self.seq, "cmd": self.cmd, "acc": self.acc, "ref": self.ref,
                  "nonce": _hex(a.nonce), "time": a.time_off is not None}
            if self.refused is not None:
                st["refused"] = self.refused
                st["rid"] = self.rid
            if self.client.publish(self.t_state, self.sign(self.t_state, json.dumps(st)), True, 1):
                self._snap = snap
        except MemoryError:
            a.count("mqtt_state_mem")

    def sign(self, topic, body):
        # body (a JSON object's text) with "mac" added last: per key, HMAC-SHA256(key, topic NUL
        # body) in hex
        parts = (topic.encode(), b"\x00", body.encode())
        m = ", ".join('"%s": "%s"' % (_hex(kid), _hex(hmac_sha256(k, parts))) for kid, k in self.keys)
        return body[:-1] + ', "mac": {%s}}' % m

    def status(self):
        # @status "mqtt": the client's counters, and the last named connection failure
        st = self.client.stats()
        if self.fail is not None:
            st["fail"] = self.fail  # (agent/mqtt_tls.py)
        return st

    def stop(self):
        # the agent stopped from the console: drop the session without DISCONNECT, so the
        # broker publishes the last will (agent/stopped.py)
        self.client._teardown()

    def telemetry(self):
        a = self.a
        t = None
        try:
            t = int(a.now_unix())  # None (TypeError) until the host's signed time
        except Exception:
            pass
        d = {"t": t, "hz": a.hz, "kw": a.kw, "mask": a.relays.mask,
             "state": control.STATE_NAMES[a.ctrl.state]}
        if a.market is not None:  # availability and the obligation warning (features/market.py)
            a.market.tele(d)
        if a.integrity:  # a settings file refused at boot: the alarm rides every telemetry message
            d["integrity"] = a.integrity
        self.client.publish(self.t_tele, json.dumps(d), False, 0)

    def handle(self, buf):
        # False: no RAM to load the verifier now (nothing consumed): the caller retries it
        gc.collect()  # the verifier's modules load into a small heap: room first
        try:
            res = self.a.signed_command(buf, "mqtt")
        except MemoryError:
            self.a.count("mqtt_cmd_mem")
            return False
        except Exception as e:  # never let one message end the task
            self.a.count("mqtt_cmd_error")
            res = {"ok": False, "refused": "error"}
            log("W", "mqtt cmd: %r" % (e,))
        if res.get("ok"):
            self.acc += 1
            self.seq = res.get("seq")
            self.cmd = res.get("cmd")
            self.refused = None
        else:
            self.ref += 1
            self.refused = res.get("refused")
            self.rid = _hex(buf[-4:])  # which message: the last 4 bytes of its tag
        self._snap = -1  # published by run() once the waiting commands are handled (one state
        # message per batch, not per command: a flood of forgeries does not flood the queue)

    async def run(self):
        asyncio.create_task(self.client.run())
        every = int(self.a.cfg["mqtt"]["telemetry_s"] * 1000)
        last_tele = ticks_ms()
        while True:
            try:
                while self.pending:
                    # no RAM for the verifier (mqtt_cmd_mem): the same message again at the next
                    # turn, never dropped (acknowledged to the broker, it will not come again)
                    if self.handle(self.pending[0]) is False:
                        break
                    self.pending.pop(0)
                # one state message at a time, the latest: a QoS 1 state in flight holds RAM until
                # its PUBACK, which the reader reaches (under a flood) only as the commands ahead
                # of it are verified, and the verifier needs that RAM
                if self.snapshot() != self._snap and self.client.idle():
                    self.publish_state()
                now = ticks_ms()
                if ticks_diff(now, last_tele) >= every:
                    last_tele = now
                    if self.client.connected:
                        self.telemetry()
            except Exception:  # MemoryError in a tight heap: count, keep the channel alive
                self.a.count("mqtt_error")
            await asyncio.sleep_ms(POLL_MS)


def _keys():
    # the provisioned keys (keys.cbor, {kid: key}), at most 4: [(kid, key)]
    from agent.base import KEYS_PATH, read_cbor

    try:
        k = read_cbor(KEYS_PATH)  # None when missing or failing its integrity check
        return [(kid, k[kid]) for kid in k][:4]
    except Exception:
        return []


def _hex(b):
    return "".join("%02x" % x for x in b)


def start(agent):
    f = Fleet(agent)
    asyncio.create_task(f.run())
    return f
