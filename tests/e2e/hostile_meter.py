"""A hostile Modbus meter: serves a real meter map (RTU on a pty, or TCP) and misbehaves on
demand, the way field meters, adapters and buses do.

    m = HostileMeter(cfg["meter"]["map"], unit=1)
    m.serve_rtu(wire.meter_path)           # or: port = m.serve_tcp()
    m.mode = "late"                        # see MODES
    m.values["hz"] = float("nan")          # any value the map can carry, NaN and inf included
    m.swap_words = True                    # 32-bit values with their words swapped

Every request is counted per mode (`m.seen[mode]`), so a test knows the window it asserts on
has passed (a positive marker) before it asserts an absence. Register values are encoded with
the firmware's own map code (agent.meter_encode.MeterMap.encode), never a second copy.
"""
from __future__ import annotations

import os
import random
import select
import socket
import struct
import threading
import time
import tty
from typing import Any

from agent import crc as crcmod
from agent.meter_encode import MeterMap

MODES = (
    "ok",          # a correct reply
    "echo",        # the request echoed first (an RS-485 adapter that hears itself), then the reply
    "noise",       # random bytes in front of the reply
    "late",        # the reply after late_s (longer than the agent's timeout)
    "wrong_unit",  # the reply from another unit id (CRC sound)
    "wrong_fn",    # the reply with the other read function code (3 <-> 4), CRC sound
    "exception",   # exception `exc_code` (6: busy, only every other request, then a reply)
    "bad_crc",     # the reply with its CRC broken
    "silence",     # nothing at all
)


def _crc(frame: bytes) -> bytes:
    c = crcmod.crc16_modbus(frame)
    return bytes((c & 0xFF, c >> 8))


class HostileMeter:
    def __init__(self, meter_map: dict[str, Any], unit: int = 1, seed: int = 7) -> None:
        self.map = MeterMap(meter_map)
        self.unit = unit
        self.values: dict[str, float] = {"hz": 60.0, "kw": 500.0, "v1": 230.0, "v2": 230.0, "v3": 230.0}
        self.mode = "ok"
        self.kw_mode: str | None = None  # another mode for a read of kW without the frequency
        self.reads: list[tuple[int, int, str]] = []  # (addr, count, mode) of every request
        self.swap_words = False
        self.exc_code = 4
        self.late_s = 0.18
        self.rng = random.Random(seed)
        self.seen: dict[str, int] = {}
        self.requests = 0
        self._busy_flip = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None
        self.connections = 0

    # ---- register image and replies ------------------------------------------------------
    def registers(self, addr: int, count: int) -> bytes:
        words = [0] * count
        for name in self.map.names:
            a, n = self.map.span(name)
            if a < addr or a + n > addr + count or name not in self.values:
                continue
            w = self.map.encode(name, self.values[name])
            if self.swap_words and len(w) == 2:
                w = [w[1], w[0]]
            words[a - addr:a - addr + n] = w
        return b"".join(struct.pack(">H", x) for x in words)

    def _covers(self, addr: int, count: int, name: str) -> bool:
        a, n = self.map.span(name)
        return addr <= a and a + n <= addr + count

    def kw_reads(self, since: int = 0) -> int:
        """Requests since self.reads[since] that read kW without the frequency."""
        return sum(1 for a, c, _ in self.reads[since:] if self._covers(a, c, "kw") and not self._covers(a, c, "hz"))

    def pdu_reply(self, unit: int, fn: int, addr: int, count: int) -> list[tuple[float, bytes]]:
        """(delay s, PDU with unit byte first, no CRC / MBAP) pieces to send for one request."""
        mode = self.mode
        if self.kw_mode is not None and self._covers(addr, count, "kw") and not self._covers(addr, count, "hz"):
            mode = self.kw_mode  # a meter that answers the frequency and times out kW
        self.reads.append((addr, count, mode))
        self.requests += 1
        self.seen[mode] = self.seen.get(mode, 0) + 1
        data = self.registers(addr, count)
        good = bytes((unit, fn, len(data))) + data
        if mode == "silence":
            return []
        if mode == "late":
            return [(self.late_s, good)]
        if mode == "wrong_unit":
            return [(0, bytes((unit % 247 + 1,)) + good[1:])]
        if mode == "wrong_fn":
            return [(0, bytes((unit, 3 if fn == 4 else 4)) + good[2:])]
        if mode == "exception":
            if self.exc_code == 6:
                self._busy_flip ^= 1
                if not self._busy_flip:
                    return [(0, good)]
            return [(0, bytes((unit, fn | 0x80, self.exc_code)))]
        return [(0, good)]

    # ---- RTU on a pty --------------------------------------------------------------------
    def serve_rtu(self, path: str) -> "HostileMeter":
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        t = threading.Thread(target=self._rtu_loop, args=(fd,), daemon=True, name="hostile-rtu")
        t.start()
        self._threads.append(t)
        return self

    def _rtu_loop(self, fd: int) -> None:
        buf = b""
        pending: list[tuple[float, bytes]] = []
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for item in [p for p in pending if p[0] <= now]:
                    pending.remove(item)
                    os.write(fd, item[1])
                r, _, _ = select.select([fd], [], [], 0.002)
                if not r:
                    continue
                try:
                    buf += os.read(fd, 256)
                except OSError:
                    continue
                while len(buf) >= 8:  # requests the agent sends: fn 1-6 are 8 bytes
                    req, buf = buf[:8], buf[8:]
                    if crcmod.crc16_modbus(req[:6]) != req[6] | req[7] << 8:
                        buf = req[1:] + buf  # resync on a byte
                        continue
                    unit, fn = req[0], req[1]
                    addr, count = struct.unpack(">HH", req[2:6])
                    if unit != self.unit or fn not in (3, 4):
                        continue
                    mode = self.mode
                    out = self.pdu_reply(unit, fn, addr, count)
                    t = time.monotonic()
                    if mode == "echo":
                        os.write(fd, req)
                    if mode == "noise":
                        os.write(fd, bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 12))))
                    for delay, pdu in out:
                        frame = pdu + _crc(pdu)
                        if mode == "bad_crc":
                            frame = frame[:-1] + bytes((frame[-1] ^ 0x5A,))
                        if delay:
                            pending.append((t + delay, frame))
                        else:
                            os.write(fd, frame)
        finally:
            os.close(fd)

    # ---- TCP -----------------------------------------------------------------------------
    def serve_tcp(self) -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        s.settimeout(0.1)
        self._sock = s
        t = threading.Thread(target=self._tcp_accept, daemon=True, name="hostile-tcp")
        t.start()
        self._threads.append(t)
        return s.getsockname()[1]

    def _tcp_accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            if self.mode == "refuse":  # a gateway that accepts, then hangs up at once
                self.seen["refuse"] = self.seen.get("refuse", 0) + 1
                c.close()
                continue
            threading.Thread(target=self._tcp_conn, args=(c,), daemon=True).start()

    def _tcp_conn(self, c: socket.socket) -> None:
        c.settimeout(0.05)
        buf = b""
        pending: list[tuple[float, bytes]] = []
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for item in [p for p in pending if p[0] <= now]:
                    pending.remove(item)
                    c.sendall(item[1])
                try:
                    d = c.recv(512)
                    if not d:
                        return
                    buf += d
                except socket.timeout:
                    continue
                while len(buf) >= 12:
                    tid, _proto, ln = struct.unpack(">HHH", buf[:6])
                    req, buf = buf[:6 + ln], buf[6 + ln:]
                    unit, fn = req[6], req[7]
                    addr, count = struct.unpack(">HH", req[8:12])
                    if self.mode == "refuse":
                        return
                    t = time.monotonic()
                    for delay, pdu in self.pdu_reply(unit, fn, addr, count):
                        frame = struct.pack(">HHH", tid, 0, len(pdu)) + pdu
                        if delay:
                            pending.append((t + delay, frame))
                        else:
                            c.sendall(frame)
        except OSError:
            return
        finally:
            c.close()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        for t in self._threads:
            t.join(2)
