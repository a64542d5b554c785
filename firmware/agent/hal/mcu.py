"""Real ports (esp32, rp2) through `machine`: pins, UARTs, the hardware watchdog."""
import machine


class McuHal:
    name = "mcu"

    def __init__(self, board):
        self.board = board
        self.gpio_errors = 0

    def out_pin(self, pin, level):
        return machine.Pin(pin, machine.Pin.OUT, value=level)

    def in_pin(self, pin, pull_up=False):
        return machine.Pin(pin, machine.Pin.IN, machine.Pin.PULL_UP if pull_up else None)

    def edge_input(self, pin, sink):
        # Rising edges of `pin` -> sink(t_us), timestamped in a hard IRQ (one ticks_us() and
        # the sink's array store, nothing allocated); returns the Pin so it stays referenced.
        import time

        def irq(p):
            sink(time.ticks_us())

        p = machine.Pin(pin, machine.Pin.IN)
        try:
            p.irq(irq, machine.Pin.IRQ_RISING, hard=True)
        except (TypeError, ValueError):  # a port without hard IRQs: a soft IRQ still timestamps first
            p.irq(irq, machine.Pin.IRQ_RISING)
        return p

    def uart(self, role, cfg=None):
        u = self.board["uarts"][role]
        cfg = cfg or {}
        parity = {"N": None, "E": 0, "O": 1}[cfg.get("parity", "N")]
        return machine.UART(u["id"], baudrate=cfg.get("baud", 19200), bits=8, parity=parity, stop=1,
                            tx=machine.Pin(u["tx"]), rx=machine.Pin(u["rx"]), timeout=0)

    def wdt(self, timeout_ms):
        # started here, it cannot be stopped: the agent feeds it from its tick task only while
        # the poll task is healthy (agent/app.py Watchdog); rp2 caps the timeout at 8388 ms
        return machine.WDT(timeout=min(timeout_ms, 8388))

    def reset_cause(self):
        # why the board started: "watchdog" after a WDT reset is evidence for the journal
        c = machine.reset_cause()
        for name, label in (("WDT_RESET", "watchdog"), ("PWRON_RESET", "power"), ("HARD_RESET", "hard"),
                            ("SOFT_RESET", "soft"), ("DEEPSLEEP_RESET", "deepsleep")):
            if getattr(machine, name, None) == c:
                return label
        return "unknown"

    def wall_time(self):
        import time

        t = time.time()
        # Before NTP/RTC set, boards report a time near their epoch start: treat as unknown.
        return t if t > 1600000000 else None

    def reset(self):
        machine.reset()

    async def run(self):
        return
