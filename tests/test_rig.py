"""The MicroPython rig itself: real interpreter, firmware importable, heap limit honoured."""


def test_micropython_runs_firmware_compat(mp):
    r = mp.run("""
        import sys
        from agent.compat import const, ticks_ms
        X = const(3)
        print(sys.implementation.name, X)
    """)
    assert r.out.split() == ["micropython", "3"]


def test_heap_limit_is_enforced(mp):
    r = mp.run("b = bytearray(200000)", heapsize="64k", check=False)
    assert r.rc != 0 and "MemoryError" in r.err + r.out
