"""The agent: asyncio tasks wired around one control decision per meter sample.

Order of work in the hot path (poll task): read the meter's hot registers, decode Hz and kW,
step the controller, apply the relay mask, record the sample. Nothing else runs between a sample
arriving and a relay opening; console, journal flushing and telemetry live in other tasks.
"""
import asyncio
import gc
import json
import sys

from agent import cbor
from agent import config as configmod
from agent.compat import ticks_ms, ticks_diff
from agent.control import Controller, EVENT_NAMES
from agent.journal import Journal
from agent.meter import MeterMap
from agent.modbus_master import RtuMaster, TcpMaster
from agent.relays import RelayBank

BUILD = "dev"
CONFIG_PATH = "config.cbor"
STATE_PATH = "state.cbor"
KEYS_PATH = "keys.cbor"
SEQ_PATH = "seq.cbor"
TICK_MS = 50


def log(level, msg):
    print("%s %d %s" % (level, ticks_ms(), msg))


def read_cbor(path):
    try:
        with open(path, "rb") as f:
            return cbor.loads(f.read())
    except (OSError, ValueError):
        return None


def write_cbor_atomic(path, obj):
    import os

    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(cbor.dumps(obj))
    os.rename(tmp, path)


class Agent:
    def __init__(self, cfg, hal):
        self.cfg = cfg
        self.hal = hal
        persisted = read_cbor(STATE_PATH)
        if not isinstance(persisted, dict):
            persisted = None
        tripped = bool(persisted and persisted.get("tripped"))
        closed = (cfg["failsafe"]["boot_state"] == "closed") and not tripped
        # Relays first: the safe state is set before anything else is built.
        self.relays = RelayBank(hal, cfg["blocks"], closed)
        self.ctrl = Controller(cfg, len(cfg["blocks"]), persisted=persisted)
        self.relays.apply(self.ctrl.closed_mask)
        self.journal = Journal(".", seg_size=cfg.get("journal", {}).get("segment_bytes", 16384),
                               max_segments=cfg.get("journal", {}).get("segments", 4))
        self.meter_map = MeterMap(cfg["meter"]["map"])
        self.hz = None
        self.kw = None
        self.meter_ok = False
        self.signal_shed = False
        self.release = False
        self.samples = 0
        self.meter_errors = 0
        self.errors = {}
        self.started = ticks_ms()
        self.verifier = None
        self._boot_journal(persisted)

    # ---- journal -------------------------------------------------------------------------
    def _boot_journal(self, persisted):
        self.journal.append("boot", {"build": BUILD, "resumed_trip": bool(persisted and persisted.get("tripped")),
                                     "mask": self.relays.mask})

    def event(self, code):
        name = EVENT_NAMES[code] if code < len(EVENT_NAMES) else str(code)
        fields = {"ev": name, "hz": self.hz, "kw": self.kw, "mask": self.ctrl.closed_mask,
                  "reason": self.ctrl.reason_name()}
        self.journal.append("ctl", fields)
        log("E", "%s hz=%s kw=%s mask=%d" % (name, self.hz, self.kw, self.ctrl.closed_mask))
        if self.ctrl.persist_needed():
            try:
                write_cbor_atomic(STATE_PATH, self.ctrl.snapshot())
            except OSError:
                self.count("state_write")

    def count(self, what):
        self.errors[what] = self.errors.get(what, 0) + 1

    # ---- control -------------------------------------------------------------------------
    def decide(self, now):
        """One control decision; relays change here and only here."""
        ev = self.ctrl.step(now, self.hz, self.meter_ok, self.signal_shed, self.release)
        self.relays.apply(self.ctrl.closed_mask)
        if ev:
            self.event(ev)
        return ev

    async def poll_task(self):
        m = self.cfg["meter"]
        if m["transport"] == "tcp":
            master = TcpMaster(m["host"], m["port"], timeout_ms=m["timeout_ms"], retries=m["retries"])
        else:
            de = None
            u = self.cfg.get("uart", {}).get("meter", {})
            if u.get("de") is not None:
                de = self.hal.out_pin(u["de"], 0)
            master = RtuMaster(self.hal.uart("meter", m), m["baud"], timeout_ms=m["timeout_ms"],
                               retries=m["retries"], de=de)
        self.master = master
        unit = m["unit"]
        fn = self.meter_map.function
        addr, count = self.meter_map.hot_plan[0]
        period = m["poll_ms"]
        mm = self.meter_map
        while True:
            t0 = ticks_ms()
            try:
                regs = await master.read(unit, fn, addr, count)
                self.hz = mm.decode("hz", regs, addr)
                self.kw = mm.decode("kw", regs, addr)
                self.meter_ok = True
                self.samples += 1
            except Exception as e:  # ModbusError and friends: counted, policy decides
                self.meter_ok = False
                self.hz = None
                self.meter_errors += 1
                if self.meter_errors < 5 or self.meter_errors % 100 == 0:
                    log("W", "meter: %r (errors %d)" % (e, self.meter_errors))
            self.decide(ticks_ms())
            left = period - ticks_diff(ticks_ms(), t0)
            await asyncio.sleep_ms(left if left > 0 else 0)

    async def tick_task(self):
        """Time-based progress (restore stagger, meter-loss timer) even when the meter is silent."""
        wdt = self.hal.wdt(8000)
        while True:
            self.decide(ticks_ms())
            wdt.feed()
            await asyncio.sleep_ms(TICK_MS)

    # ---- console -------------------------------------------------------------------------
    def status(self):
        return {
            "build": BUILD, "site": self.cfg["site"], "device": self.cfg["device"],
            "board": self.cfg["board"], "state": self.ctrl.state_name(), "reason": self.ctrl.reason_name(),
            "hz": self.hz, "kw": self.kw, "meter_ok": self.meter_ok, "mask": self.relays.mask,
            "blocks": [b["name"] for b in self.cfg["blocks"]], "samples": self.samples,
            "meter_errors": self.meter_errors, "transitions": self.relays.transitions,
            "uptime_ms": ticks_diff(ticks_ms(), self.started), "errors": self.errors,
            "journal_seq": self.journal.next_seq - 1, "mem_free": gc.mem_free(),
            "signal": self.signal_shed,
        }

    def handle_console(self, line):
        parts = line.split(None, 1)
        verb = parts[0] if parts else ""
        arg = parts[1] if len(parts) > 1 else ""
        if verb == "status":
            reply(self.status(), True)
        elif verb == "events":
            since = int(arg) if arg.strip().isdigit() else 0
            for rec in self.journal.read(since):
                reply({"rec": rec}, False)
            reply({"ok": True}, True)
        elif verb == "config":
            reply({"config": self.cfg}, True)
        else:
            self.count("console_bad")
            reply({"error": "unknown verb"}, True)

    async def console_task(self):
        reader = asyncio.StreamReader(sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                await asyncio.sleep_ms(200)
                continue
            try:
                line = line.decode().strip() if isinstance(line, bytes) else line.strip()
            except Exception:
                self.count("console_bad")
                continue
            if line.startswith("@"):
                try:
                    self.handle_console(line[1:])
                except Exception as e:
                    self.count("console_error")
                    reply({"error": repr(e)}, True)

    async def main(self):
        asyncio.create_task(self.tick_task())
        asyncio.create_task(self.console_task())
        hal_task = self.hal.run()
        if hal_task is not None:
            asyncio.create_task(hal_task)
        log("I", "agent up: site=%s device=%s blocks=%d" % (self.cfg["site"], self.cfg["device"], len(self.cfg["blocks"])))
        await self.poll_task()


def reply(obj, end):
    obj["end"] = end
    print("@" + json.dumps(obj))


async def refuse_forever(errors):
    """Bad config: keep the relays untouched, keep saying why, never crash-loop."""
    while True:
        for e in errors:
            log("E", "config: " + e)
        await asyncio.sleep(10)


def run():
    from agent import hal as halmod

    cfg = read_cbor(CONFIG_PATH)
    if cfg is None:
        errors = ["no valid /%s: provision the board (gridshed provision)" % CONFIG_PATH]
    else:
        errors = configmod.validate(cfg)
    if errors:
        asyncio.run(refuse_forever(errors))
        return
    hal = halmod.load(cfg.get("board"))
    agent = Agent(cfg, hal)
    asyncio.run(agent.main())
