"""Shims so pure-logic modules run unchanged under MicroPython and CPython."""
try:
    from micropython import const  # type: ignore
except ImportError:  # CPython

    def const(x):  # type: ignore
        return x


try:
    from time import ticks_ms, ticks_diff, ticks_add  # type: ignore
except ImportError:  # CPython
    import time as _t

    _PERIOD = 1 << 30

    def ticks_ms():  # type: ignore
        return int(_t.monotonic() * 1000) & (_PERIOD - 1)

    def ticks_diff(a, b):  # type: ignore
        d = (a - b) & (_PERIOD - 1)
        return d - _PERIOD if d >= _PERIOD // 2 else d

    def ticks_add(a, b):  # type: ignore
        return (a + b) & (_PERIOD - 1)
