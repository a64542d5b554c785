"""TLS handshake on the unix port (bench/tls.py): connect agent.mqtt_client's client REPS times, with TLS
(CA checked, password login) or plain, while a 1 ms ticker task measures the event loop's
longest gap. Prints one JSON line: connect times (open -> CONNACK) and the longest gap per run.
  micropython tls_handshake.py PORT REPS TLS(0/1) [broker.cbor]"""
import sys, json, asyncio, time
from agent.mqtt_client import MqttClient
port = int(sys.argv[1]); reps = int(sys.argv[2]); tls = sys.argv[3] == "1"
kw = {}
if tls:
    from agent import mqtt_tls
    kw, why = mqtt_tls.options({"host": "127.0.0.1", "tls": True, "auth": "password", "server_name": ""}, "dev1")
    assert why is None, why
gap = [0]
async def ticker():
    last = time.ticks_ms()
    while True:
        await asyncio.sleep_ms(1)
        n = time.ticks_ms()
        d = time.ticks_diff(n, last)
        if d > gap[0]:
            gap[0] = d
        last = n
async def main():
    asyncio.create_task(ticker())
    conn, gaps = [], []
    for i in range(reps):
        done = asyncio.Event()
        c = MqttClient("127.0.0.1", port, "hs%d" % i, on_connect=lambda cl: done.set(), **kw)
        await asyncio.sleep_ms(20)
        gap[0] = 0
        t0 = time.ticks_us()
        task = asyncio.create_task(c.run())
        await asyncio.wait_for(done.wait(), 30)
        conn.append(time.ticks_diff(time.ticks_us(), t0) / 1000)
        gaps.append(gap[0])
        c.stop()
        await asyncio.sleep_ms(50)
        task.cancel()
    print(json.dumps({"connect_ms": conn, "gap_ms": gaps}))
asyncio.run(main())
