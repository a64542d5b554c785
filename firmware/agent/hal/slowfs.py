"""Virtual board only: a slow flash chip (sim.json "slow_fs_ms", docs/virtual-board.md).

Every file open for writing, write, close, rename and remove takes `ms` more, as on a chip whose
flash writes are slow: the power-cut tests widen the windows they aim their kills at with it.
Installed once per process by hal/unix.py; it replaces the builtin open() and the os module.
"""
import time


def install(ms):
    import builtins
    import os
    import sys

    if isinstance(os, type):  # already in place (a second HAL in this process)
        return
    real_open = builtins.open

    class _File:
        def __init__(self, f):
            self._f = f

        def write(self, b):
            time.sleep_ms(ms)
            return self._f.write(b)

        def close(self):
            time.sleep_ms(ms)
            return self._f.close()

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.close()

        def __getattr__(self, k):
            return getattr(self._f, k)

    def slow_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if ("w" in mode or "a" in mode or "+" in mode) and not str(path).startswith("/dev/"):  # not a UART
            time.sleep_ms(ms)
            return _File(f)
        return f

    class _Os:
        pass

    for k in dir(os):
        if k[0] != "_":
            setattr(_Os, k, getattr(os, k))

    def slow(fn):
        def call(*a):
            time.sleep_ms(ms)
            return fn(*a)
        return call

    _Os.rename = staticmethod(slow(os.rename))
    _Os.remove = staticmethod(slow(os.remove))
    builtins.open = slow_open
    sys.modules["os"] = _Os
