"""A simulated RS-485 segment: two pseudo-terminals joined by a thread that paces bytes at the
line's baud rate (10 bits a character), so wire time is part of every measured latency.

The meter (pymodbus) opens one end, the virtual board the other. `silent` drops the meter's
replies, which is what a dead meter looks like on a real bus.
"""
from __future__ import annotations

import os
import select
import termios
import threading
import time
import tty


def _raw_pty() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    path = os.ttyname(slave)
    # keep the slave open so the master never sees EIO while the far side reopens it
    return master, path, slave  # type: ignore[return-value]


class Wire:
    def __init__(self, baud: int = 19200) -> None:
        self.baud = baud
        self.char_s = 10.0 / baud if baud else 0.0
        self._a_master, self.meter_path, self._a_slave = _raw_pty()
        self._b_master, self.board_path, self._b_slave = _raw_pty()
        self.silent = False
        self.bytes_to_meter = 0
        self.bytes_to_board = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rs485-wire", daemon=True)

    def start(self) -> "Wire":
        self._thread.start()
        return self

    def _pace(self, n: int) -> None:
        if self.char_s:
            time.sleep(n * self.char_s)

    def _run(self) -> None:
        fds = [self._a_master, self._b_master]
        while not self._stop.is_set():
            try:
                r, _, _ = select.select(fds, [], [], 0.05)
            except (OSError, ValueError):
                return
            for fd in r:
                try:
                    data = os.read(fd, 512)
                except OSError:
                    continue
                if not data:
                    continue
                if fd == self._b_master:  # board -> meter
                    self._pace(len(data))
                    self.bytes_to_meter += len(data)
                    self._write(self._a_master, data)
                else:  # meter -> board
                    if self.silent:
                        self.dropped += len(data)
                        continue
                    self._pace(len(data))
                    self.bytes_to_board += len(data)
                    self._write(self._b_master, data)

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        try:
            os.write(fd, data)
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        for fd in (self._a_master, self._b_master, self._a_slave, self._b_slave):
            try:
                os.close(fd)
            except OSError:
                pass
