"""gridshed agent: the on-board load-shed controller (MicroPython; pure modules also CPython)."""
