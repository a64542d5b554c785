"""MQTT reconnect back-off (bench/README.md, bounds): agent.mqtt_client against a broker that refuses
every CONNECT. Run by bench/run.py:  micropython mqtt_backoff.py BROKER_PORT SECONDS"""
import asyncio, sys
PORT = int(sys.argv[1])
SECONDS = float(sys.argv[2])
from agent.mqtt_client import MqttClient
c = MqttClient("127.0.0.1", PORT, "bench-dev", keepalive=10, backoff_min=0.2)
async def main():
    asyncio.create_task(c.run())
    await asyncio.sleep(SECONDS)
    sys.exit(0)
asyncio.run(main())
