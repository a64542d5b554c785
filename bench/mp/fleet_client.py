"""A lightweight fleet board for the fleet bench (bench/README.md, --fleet-mode client): agent.mqtt_client and
agent.cmd_api, verifying and acting on signed commands. Run by bench/run.py:
  micropython fleet_client.py '{"dev": ..., "site": ..., "host": ..., "port": ..., "kid": hex, "key": hex}'
("tls": true: TLS and the login of ./broker.cbor, bench/tls.py's fan-out over TLS)"""
import sys, json, asyncio, binascii
from agent.mqtt_client import MqttClient
from agent.cmd_api import CommandVerifier, MemorySeqStore, CommandRefused
cfg = json.loads(sys.argv[1])
dev = cfg["dev"]; site = cfg["site"]
base = "gridshed/%s/%s/" % (site, dev)
v = CommandVerifier({binascii.unhexlify(cfg["kid"]): binascii.unhexlify(cfg["key"])}, dev, site,
                    MemorySeqStore())
pending = []
def on_message(topic, payload):
    pending.append(bytes(payload))
def on_connect(cl):
    cl.publish(base + "state", '{"dev":"%s","online":true,"seq":null}' % dev, True, 1)
kw = {}
if cfg.get("tls"):  # TLS + login from ./broker.cbor (agent/mqtt_tls.py, as a board does)
    from agent import mqtt_tls
    kw, why = mqtt_tls.options({"host": cfg["host"], "tls": True, "auth": "password", "server_name": ""}, dev)
    assert why is None, why
c = MqttClient(cfg["host"], cfg["port"], dev, keepalive=30,
               will=(base + "state", '{"dev":"%s","online":false}' % dev, True),
               on_message=on_message, on_connect=on_connect,
               topics=("gridshed/%s/cmd" % site,), max_packet=1024, **kw)
async def main():
    asyncio.create_task(c.run())
    while True:
        while pending:
            buf = pending.pop(0)
            try:
                cmd = v.verify(buf, None)
                c.publish(base + "state", '{"dev":"%s","online":true,"seq":%d,"cmd":"%s"}' % (
                    dev, cmd["seq"], cmd["cmd"]), True, 1)
            except CommandRefused as e:
                c.publish(base + "state", '{"dev":"%s","refused":"%s"}' % (dev, e.reason), True, 1)
        await asyncio.sleep_ms(10)
asyncio.run(main())
