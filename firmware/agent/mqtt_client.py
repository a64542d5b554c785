"""asyncio MQTT 3.1.1 client for the agent (fleet messaging; see docs/mqtt.md).

    c = MqttClient("10.0.0.5", 1883, "dev1", keepalive=30,
                   will=("gridshed/site1/dev1/state", b'{"online":false}', True),
                   on_message=handle, topics=("gridshed/site1/dev1/cmd", "gridshed/site1/cmd"))
    asyncio.create_task(c.run())
    c.publish("gridshed/site1/dev1/state", b'{"online":true}', retain=True)

``run()`` never returns while the client is wanted and never raises (except on cancellation):
it connects, waits for CONNACK, subscribes, pings every keepalive/2, declares the broker dead
when a PINGREQ gets no PINGRESP within ``ping_timeout`` (default keepalive/2) and reconnects with
exponential back-off (``backoff_min``, doubling to ``backoff_max`` seconds, plus up to 50 %
random jitter).  ``publish()`` is synchronous and never waits on the network: it encodes the
packet and puts it on a bounded queue (oldest dropped when full, connected or not); a writer
loop sends it.  Malformed broker input is counted and drops the connection.  ``on_message``
exceptions are counted, never propagated.  Safety: this runs beside the control task; nothing
here may delay a trip, so nothing here blocks or raises.
"""
import asyncio

from agent import mqtt_wire as mc
from agent.compat import ticks_ms, ticks_diff

try:
    from random import getrandbits as _getrandbits

    def _rand16():
        return _getrandbits(16)
except ImportError:  # pragma: no cover - ports without random
    import os

    def _rand16():
        b = os.urandom(2)
        return (b[0] << 8) | b[1]


class MqttClient:
    def __init__(self, host, port=1883, client_id="", keepalive=30, will=None, on_message=None,
                 topics=(), username=None, password=None, on_connect=None, clean=True,
                 sub_qos=1, max_packet=2048, queue_max=8, max_inflight=4, backoff_min=1.0,
                 backoff_max=60.0, connect_timeout=10.0, send_timeout=5.0, ping_timeout=None, busy=None,
                 ssl=None, server_hostname=None, may_connect=None, on_fail=None):
        # ssl: an SSLContext (TLS; server_hostname is the name checked in the broker's
        # certificate); may_connect: optional callable, a connection is opened only while it
        # returns True; on_fail(exc): optional, told why a session ended, returns True when it
        # named the failure (then not counted as malformed). See agent/mqtt_tls.py.
        self._tls = {"ssl": ssl, "server_hostname": server_hostname} if ssl else {}
        self.may_connect = may_connect
        self.on_fail = on_fail
        # busy: optional callable; while it returns True an incoming PUBLISH waits (not read
        # further, not acknowledged), so the broker holds the rest back: a flood queues at the
        # broker instead of pushing a real command out of the application's bounded queue
        self.busy = busy
        self.host = host
        self.port = port
        self.client_id = client_id
        self.keepalive = keepalive
        self.on_message = on_message
        self.on_connect = on_connect
        self.queue_max = queue_max
        self.max_inflight = max_inflight
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.max_publish = max_packet
        if ping_timeout is None:
            ping_timeout = keepalive / 2
        self._ping_every = keepalive * 500  # ms; 0 = no keepalive
        self._ping_timeout = max(int(ping_timeout * 1000), 200)
        wt = wp = None
        wq = 0
        wr = False
        if will:
            wt, wp, wr = will[0], will[1], will[2] if len(will) > 2 else False
            wq = will[3] if len(will) > 3 else 0
        # Built once: argument errors surface here, at construction, not in the loop.
        self._connect_pkt = mc.connect(client_id, keepalive, clean, wt, wp or b"", wq, wr,
                                       username, password)
        self._subs = []
        for t in topics:
            self._subs.append(t if isinstance(t, tuple) else (t, sub_qos))
        if self._subs:
            mc.subscribe(1, self._subs)  # validates the filters now
        self._sub_new = []
        self._sub_qos = sub_qos
        self._parser = mc.Parser(max_packet)
        self._rbuf = memoryview(bytearray(256))
        self._q = []  # pending PUBLISH packets (bytes, or bytearray for QoS 1)
        self._inflight = {}  # pid -> bytearray (QoS 1 awaiting PUBACK)
        self._pid = 0
        self._wake = asyncio.Event()
        self._r = self._w = None
        self._rtask = None
        self._rx_error = None
        self._lock = None
        self._stop = False
        self._last_ping = 0
        self._ping_sent = -1
        self.connected = False
        self.suback = None  # return codes of the last SUBACK
        self.last_error = None
        # counters
        self.connects = 0  # CONNACK accepted
        self.disconnects = 0  # established sessions that ended
        self.failures = 0  # connection attempts that never reached CONNACK accepted
        self.rx = 0  # PUBLISH messages received
        self.tx = 0  # PUBLISH messages written to the socket
        self.malformed = 0  # malformed or protocol-violating packets from the broker
        self.dropped = 0  # publishes dropped (queue full, or refused arguments)
        self.cb_errors = 0  # exceptions raised by on_message / on_connect
        self.dead = 0  # broker declared dead (no PINGRESP)

    # --------------------------------------------------------------------------- public API

    def stats(self):
        return {"connected": self.connected, "connects": self.connects,
                "disconnects": self.disconnects, "failures": self.failures, "rx": self.rx,
                "tx": self.tx, "malformed": self.malformed, "dropped": self.dropped,
                "cb_errors": self.cb_errors, "dead": self.dead, "queued": len(self._q),
                "oversize": self._parser.skipped,
                "inflight": len(self._inflight)}

    def publish(self, topic, payload, retain=False, qos=0):
        """Queue a message; returns False (and counts it dropped) if it cannot be encoded.
        Never blocks, never raises.  When the queue is full the oldest message is dropped."""
        try:
            if qos == 1:
                pkt = bytearray(mc.publish(topic, payload, 1, retain, False, 0xFFFF))
            elif qos == 0:
                pkt = mc.publish(topic, payload, 0, retain)
            else:
                raise ValueError("qos")
            if len(pkt) > self.max_publish:
                raise ValueError("message larger than max_publish")
        except Exception as e:  # bad topic / payload type / qos: a caller bug, not a crash
            self.dropped += 1
            self.last_error = e
            return False
        if len(self._q) >= self.queue_max:
            self._q.pop(0)
            self.dropped += 1
        self._q.append(pkt)
        self._wake.set()
        return True

    def idle(self):
        """Nothing queued and nothing awaiting its PUBACK."""
        return not self._q and not self._inflight

    def subscribe(self, topic, qos=None):
        """Add a subscription (kept across reconnects); sent now if connected."""
        t = (topic, self._sub_qos if qos is None else qos)
        if t not in self._subs:
            self._subs.append(t)
            if self.connected:
                self._sub_new.append(t)
                self._wake.set()

    def stop(self):
        """Graceful end: DISCONNECT (so no last-will), then run() returns."""
        self._stop = True
        self._wake.set()

    async def run(self):
        delay = self.backoff_min
        self._stop = False
        while not self._stop:
            was = self.connects
            try:
                await self._session()
            except asyncio.CancelledError:
                self._teardown()
                raise
            except Exception as e:  # OSError, TimeoutError, ValueError, MemoryError...
                named = False
                if self.on_fail is not None:
                    try:
                        named = self.on_fail(e)
                    except Exception:
                        self.cb_errors += 1
                if isinstance(e, ValueError) and not named:
                    self.malformed += 1
                self.last_error = e
            self._teardown()
            if self.connects == was:
                self.failures += 1
            else:
                delay = self.backoff_min
            if self._stop:
                break
            try:  # (floats: a MemoryError here must not end the client)
                d = delay * (1 + _rand16() / 131072)  # + up to 50 % jitter
                delay = min(delay * 2, self.backoff_max)
                await self._sleep(d)
            except MemoryError:
                await asyncio.sleep_ms(1000)

    # --------------------------------------------------------------------------- internals

    async def _sleep(self, seconds):
        t0 = ticks_ms()
        total = int(seconds * 1000)
        while not self._stop:
            left = total - ticks_diff(ticks_ms(), t0)
            if left <= 0:
                return
            await self._wait(left)

    async def _wait(self, ms):
        try:
            await asyncio.wait_for(self._wake.wait(), ms / 1000)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def _next_pid(self):
        while True:
            self._pid = self._pid % 0xFFFF + 1
            if self._pid not in self._inflight:
                return self._pid

    async def _send(self, data):
        w = self._w
        async with self._lock:
            w.write(data)
            await asyncio.wait_for(w.drain(), self.send_timeout)

    def _teardown(self):
        if self.connected:
            self.disconnects += 1
        self.connected = False
        t = self._rtask
        self._rtask = None
        if t is not None:
            try:
                t.cancel()
            except Exception:
                pass
        w = self._w
        self._w = self._r = None
        if w is not None:
            try:
                w.close()  # CPython: closes the transport; MicroPython: a no-op ...
                s = getattr(w, "s", None)
                if s is not None:
                    s.close()  # ... so close its socket (what wait_closed() would do)
            except Exception:
                pass
        self._parser.reset()

    async def _session(self):
        self._rx_error = None
        self._sub_new = []
        self._parser.reset()
        g = self.may_connect
        while g is not None and not g() and not self._stop:
            await self._wait(200)
        if self._stop:
            return
        op = asyncio.open_connection(self.host, self.port, **self._tls)
        self._r, self._w = await asyncio.wait_for(op, self.connect_timeout)
        self._lock = asyncio.Lock()
        # TLS: the handshake runs in this send, before any read: its failure then names the
        # check (ValueError); the CONNACK waits in the socket until the reader starts
        await self._send(self._connect_pkt)
        self._rtask = asyncio.create_task(self._reader())
        t0 = ticks_ms()
        limit = int(self.connect_timeout * 1000)
        while not self.connected:
            if self._rx_error is not None:
                raise self._rx_error
            left = limit - ticks_diff(ticks_ms(), t0)
            if left <= 0:
                raise OSError("no CONNACK")
            await self._wait(left)
        self._last_ping = ticks_ms()
        self._ping_sent = -1
        if self._subs:
            await self._send(mc.subscribe(self._next_pid(), self._subs))
        for pkt in self._inflight.values():  # QoS 1 not acknowledged before the drop
            pkt[0] |= 0x08
            await self._send(pkt)
        await self._keeper()

    async def _keeper(self):
        while True:
            if self._rx_error is not None:
                raise self._rx_error
            if self._stop:
                try:
                    await self._send(mc.disconnect())
                except Exception:
                    pass
                return
            if self._sub_new:
                subs = self._sub_new
                self._sub_new = []
                await self._send(mc.subscribe(self._next_pid(), subs))
            while self._q:
                pkt = self._q[0]
                if isinstance(pkt, bytearray):  # QoS 1: needs a packet id and a slot
                    if len(self._inflight) >= self.max_inflight:
                        break
                    pid = self._next_pid()
                    j = 1  # locate the packet id: after remaining length and topic
                    while pkt[j] & 0x80:
                        j += 1
                    i = j + 3 + ((pkt[j + 1] << 8) | pkt[j + 2])
                    pkt[i] = pid >> 8
                    pkt[i + 1] = pid & 0xFF
                    self._inflight[pid] = pkt
                self._q.pop(0)
                await self._send(pkt)
                self.tx += 1
            now = ticks_ms()
            wait = 1000
            if self._ping_every:
                if self._ping_sent >= 0:
                    left = self._ping_timeout - ticks_diff(now, self._ping_sent)
                    if left <= 0:
                        self.dead += 1
                        raise OSError("no PINGRESP")
                    wait = left
                else:
                    left = self._ping_every - ticks_diff(now, self._last_ping)
                    if left <= 0:
                        # mark before the await: the PINGRESP may arrive while we drain
                        self._ping_sent = self._last_ping = now
                        await self._send(mc.pingreq())
                        left = self._ping_timeout
                    wait = left
            await self._wait(max(wait, 10))

    async def _reader(self):
        r = self._r
        buf = self._rbuf
        has_readinto = hasattr(r, "readinto")
        try:
            while True:
                if has_readinto:
                    n = await r.readinto(buf)
                    if n is None:  # TLS: the socket was readable, no application data yet
                        continue
                    data = buf[:n] if n else None
                else:  # CPython StreamReader
                    data = await r.read(256)
                if not data:
                    raise OSError("connection closed by broker")
                for pkt in self._parser.feed(data):
                    await self._handle(pkt)
        except Exception as e:
            self._rx_error = e
            self._wake.set()

    async def _handle(self, p):
        t = p.type
        if t == mc.PUBLISH:
            self.rx += 1
            self._ping_sent = -1  # the broker is talking: alive (a flood may delay its PINGRESP)
            b = self.busy
            while b is not None and b():
                self._ping_sent = -1  # held back by us, not dead: its PINGRESP waits unread
                await asyncio.sleep_ms(20)
            cb = self.on_message
            if cb is not None:
                try:
                    cb(p.topic, p.payload)
                except Exception:
                    self.cb_errors += 1
            if p.qos == 1:
                await self._send(mc.puback(p.pid))
            elif p.qos == 2:
                await self._send(mc.pubrec(p.pid))
        elif t == mc.PUBACK:
            self._inflight.pop(p.pid, None)
            self._wake.set()
        elif t == mc.PINGRESP:
            self._ping_sent = -1
            self._wake.set()
        elif t == mc.SUBACK:
            self.suback = p.codes
        elif t == mc.PUBREL:
            await self._send(mc.pubcomp(p.pid))
        elif t == mc.CONNACK and not self.connected:
            if p.rc:
                raise OSError("CONNACK refused: %d" % p.rc)
            self.connected = True
            self.connects += 1
            self._wake.set()
            if self.on_connect is not None:  # before any later packet is handled
                try:
                    self.on_connect(self)
                except Exception:
                    self.cb_errors += 1
        elif t in (mc.UNSUBACK, mc.PUBREC, mc.PUBCOMP):
            pass
        else:
            raise ValueError("unexpected packet from broker")
