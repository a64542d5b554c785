# The agent: asyncio tasks wired around one control decision per meter sample.
#
# Hot path (poll task): read the meter's hot registers, decode Hz and kW, step the controller,
# apply the relay mask, record the sample. Nothing else runs between a sample arriving and a
# relay opening; console, commands, journal captures and telemetry live in other tasks and only
# set inputs that the next decision reads. (Comments, not docstrings: less RAM when compiled
# from source.)
import asyncio
import gc
import json
import sys

from agent import cbor
from agent import control
from agent.compat import ticks_ms, ticks_diff
from agent.journal import Journal, jsonable
from agent.meter import MeterMap
from agent.relays import RelayBank

BUILD = "dev"
CONFIG_PATH = "config.cbor"
STATE_PATH = "state.cbor"
KEYS_PATH = "keys.cbor"
SEQ_PATH = "seq.cbor"
TICK_MS = 50
INPUT_MS = 10


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


def reply(obj, end):
    obj["end"] = end
    print("@" + json.dumps(obj))


class Agent:
    def __init__(self, cfg, hal):
        self.cfg = cfg
        self.hal = hal
        persisted = read_cbor(STATE_PATH)
        if not isinstance(persisted, dict):
            persisted = None
        tripped = bool(persisted and persisted.get("tripped"))
        closed = cfg["failsafe"]["boot_state"] == "closed" and not tripped
        # Relays first: the safe state is set before anything else is built.
        self.relays = RelayBank(hal, cfg["blocks"], closed)
        try:
            self.ctrl = control.Controller(cfg, len(cfg["blocks"]), persisted=persisted)
        except Exception:
            self.ctrl = control.Controller(cfg, len(cfg["blocks"]))
            persisted = None
        if not closed and not tripped:
            # boot_state "open": hold the load off until the first healthy decision restores it
            self.ctrl.shed(ticks_ms())
        self.relays.apply(self.ctrl.closed_mask)
        jc = cfg.get("journal") or {}
        self.journal = Journal(".", seg_size=jc.get("segment_bytes", 16384), max_segs=jc.get("segments", 4),
                               clock=hal.wall_time)
        self.meter_map = MeterMap(cfg["meter"]["map"])
        self.recorder = None
        try:
            from agent.recorder import Recorder

            self.recorder = Recorder.from_config(cfg)
        except (ImportError, MemoryError):
            pass
        self.hz = None
        self.kw = None
        self.meter_ok = False
        self.cmd_shed = False
        self.release = False
        self.samples = 0
        self.meter_errors = 0
        self.errors = {}
        self.started = ticks_ms()
        self.signal = None
        self.verifier = None
        self.master = None
        self.journal.append("boot", {"build": BUILD, "resumed_trip": tripped, "mask": self.relays.mask})

    # ---- journal and events --------------------------------------------------------------
    def count(self, what):
        self.errors[what] = self.errors.get(what, 0) + 1

    def events(self, ev, now):
        c = self.ctrl
        for i in range(c.nevents):
            code = c.events[i]
            name = control.EVENT_NAMES[code]
            self.journal.append("ctl", {"ev": name, "hz": self.hz, "kw": self.kw, "mask": c.closed_mask,
                                        "reason": control.REASON_NAMES[c.reason]})
            log("E", "%s hz=%s kw=%s mask=%d" % (name, self.hz, self.kw, c.closed_mask))
            if control.is_trip(code) and self.recorder is not None:
                self.recorder.trigger(now)
        if control.persist_wanted(ev):
            try:
                write_cbor_atomic(STATE_PATH, c.snapshot(now))
            except OSError:
                self.count("state_write")

    # ---- control -------------------------------------------------------------------------
    def decide(self, now, sample):
        # One control decision; relays change here and only here.
        sig = self.cmd_shed or (self.signal is not None and self.signal.shed())
        rel = self.release  # a release is a one-shot input: the controller latches it per trip
        self.release = False
        if sample:
            ev = self.ctrl.step(now, self.hz, self.meter_ok, sig, rel)
        else:
            ev = self.ctrl.tick(now, sig, rel)
        self.relays.apply(self.ctrl.closed_mask)
        if self.ctrl.nevents:
            self.events(ev, now)
        return ev

    def _master(self):
        m = self.cfg["meter"]
        from agent.modbus_master import RtuMaster, TcpMaster

        if m["transport"] == "tcp":
            return TcpMaster(m["host"], m["port"], timeout_ms=m["timeout_ms"], retries=m["retries"])
        de = None
        u = (self.cfg.get("uart") or {}).get("meter") or {}
        if u.get("de") is not None:
            de = self.hal.out_pin(u["de"], 0)
        return RtuMaster(self.hal.uart("meter", m), m["baud"], timeout_ms=m["timeout_ms"],
                         retries=m["retries"], de=de)

    async def poll_task(self):
        m = self.cfg["meter"]
        self.master = master = self._master()
        unit = m["unit"]
        mm = self.meter_map
        fn = mm.function
        plan = list(zip(mm.hot_plan, mm.hot_items))
        i_hz = mm.names.index("hz")
        i_kw = mm.names.index("kw")
        period = m["poll_ms"]
        rec = self.recorder
        while True:
            t0 = ticks_ms()
            try:
                for (addr, count), items in plan:
                    regs = await master.read(unit, fn, addr, count)
                    mm.update(regs, addr, items)
                self.hz = mm.values[i_hz]
                self.kw = mm.values[i_kw]
                self.meter_ok = True
                self.samples += 1
            except Exception as e:  # ModbusError and friends: counted; the fail-safe policy decides
                self.meter_ok = False
                self.hz = None
                self.meter_errors += 1
                if self.meter_errors < 4 or self.meter_errors % 200 == 0:
                    log("W", "meter: %r (errors %d)" % (e, self.meter_errors))
            now = ticks_ms()
            self.decide(now, True)
            if rec is not None:
                rec.add(now, self.hz if self.hz is not None else -1.0, self.kw if self.kw is not None else 0.0,
                        self.relays.mask)
            left = period - ticks_diff(ticks_ms(), t0)
            await asyncio.sleep_ms(left if left > 0 else 0)

    async def tick_task(self):
        # Time-based progress (restore stagger, meter-loss timer) even when the meter is silent.
        wdt = self.hal.wdt(8000)
        rec = self.recorder
        while True:
            now = ticks_ms()
            self.decide(now, False)
            if rec is not None and rec.ready():
                cap = rec.capture(now)
                if cap:
                    self.journal.append("capture", cap)
                    gc.collect()
            wdt.feed()
            await asyncio.sleep_ms(TICK_MS)

    async def input_task(self):
        from agent.inputs import ShedSignal

        s = self.cfg["signals"]
        self.signal = ShedSignal(s["mode"], s["debounce_ms"], s["dry_contact_active"])
        pin = self.hal.in_pin(s["dry_contact_pin"], pull_up=not s["dry_contact_active"])
        while True:
            now = ticks_ms()
            if self.signal.sample(now, pin.value()):
                on = self.signal.input.state
                self.journal.append("signal", {"src": "dry_contact", "on": on})
                log("E", "dry contact %s" % ("asserted" if on else "released"))
                if not on and s["mode"] == "level":
                    self.release = True
                self.decide(now, False)
            await asyncio.sleep_ms(INPUT_MS)

    # ---- signed commands -----------------------------------------------------------------
    def _verifier(self):
        if self.verifier is None:
            from agent.commands import CommandVerifier, FileSeqStore

            keys = read_cbor(KEYS_PATH)
            if not isinstance(keys, dict):
                keys = {}
            self.verifier = CommandVerifier(keys, self.cfg["device"], self.cfg["site"], FileSeqStore(SEQ_PATH))
        return self.verifier

    def command(self, buf, src):
        # Verify, journal (accepted or refused, with why), then set inputs for the next decision.
        from agent.commands import CommandRefused

        v = self._verifier()
        try:
            c = v.verify(buf, self.hal.wall_time())
        except CommandRefused as e:
            self.journal.append("cmd_refused", {"src": src, "why": e.reason})
            log("W", "command refused (%s): %s" % (src, e.reason))
            return {"ok": False, "refused": e.reason}
        cmd = c["cmd"]
        now = ticks_ms()
        self.journal.append("cmd", {"src": src, "cmd": cmd, "seq": c["seq"], "kid": c.get("kid")})
        log("E", "command %s seq=%d (%s)" % (cmd, c["seq"], src))
        if cmd == "shed":
            self.cmd_shed = True
            self.release = False
        elif cmd == "restore":
            self.cmd_shed = False
            self.release = True
            if self.signal is not None:
                self.signal.clear()
        elif cmd == "arm":
            ev = self.ctrl.arm(now)
            if self.ctrl.nevents:
                self.events(ev, now)
        elif cmd == "disarm":
            ev = self.ctrl.disarm(now)
            if self.ctrl.nevents:
                self.events(ev, now)
        self.decide(now, False)
        out = {"ok": True, "cmd": cmd, "seq": c["seq"]}
        if cmd == "status" or cmd == "test":
            out["status"] = self.status()
        return out

    # ---- console -------------------------------------------------------------------------
    def status(self):
        st = {
            "build": BUILD, "site": self.cfg["site"], "device": self.cfg["device"],
            "board": self.cfg["board"], "state": control.STATE_NAMES[self.ctrl.state],
            "reason": control.REASON_NAMES[self.ctrl.reason], "armed": self.ctrl.armed,
            "hz": self.hz, "kw": self.kw, "meter_ok": self.meter_ok, "mask": self.relays.mask,
            "blocks": [b["name"] for b in self.cfg["blocks"]], "samples": self.samples,
            "meter_errors": self.meter_errors, "transitions": self.relays.transitions,
            "uptime_ms": ticks_diff(ticks_ms(), self.started), "errors": self.errors,
            "journal_seq": self.journal.seq, "mem_free": gc.mem_free(),
            "signal": self.cmd_shed or (self.signal is not None and self.signal.shed()),
        }
        if self.master is not None:
            st["modbus"] = self.master.counters()
        if self.verifier is not None:
            st["commands"] = self.verifier.counters
        return st

    def handle_console(self, line):
        parts = line.split(None, 1)
        verb = parts[0] if parts else ""
        arg = parts[1].strip() if len(parts) > 1 else ""
        if verb == "status":
            reply(self.status(), True)
        elif verb == "events":
            since = int(arg) if arg.isdigit() else 0
            n = 0
            for rec in self.journal.read(since):
                reply({"rec": jsonable(rec)}, False)
                n += 1
                if n % 8 == 0:
                    gc.collect()
            reply({"ok": True, "count": n}, True)
        elif verb == "config":
            reply({"config": jsonable(self.cfg)}, True)
        elif verb == "cmd":
            import binascii

            try:
                buf = binascii.a2b_base64(arg)
            except Exception:
                self.count("console_bad")
                reply({"ok": False, "refused": "malformed"}, True)
                return
            reply(self.command(buf, "serial"), True)
        else:
            self.count("console_bad")
            reply({"error": "unknown verb"}, True)

    async def console_task(self):
        reader = asyncio.StreamReader(sys.stdin)
        while True:
            try:
                line = await reader.readline()
            except Exception:
                self.count("console_io")
                await asyncio.sleep_ms(500)
                continue
            if not line:
                await asyncio.sleep_ms(200)
                continue
            if len(line) > 1024:
                self.count("console_bad")
                continue
            try:
                line = line.decode().strip()
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
        if (self.cfg.get("signals") or {}).get("dry_contact"):
            asyncio.create_task(self.input_task())
        hal_task = self.hal.run()
        if hal_task is not None:
            asyncio.create_task(hal_task)
        gc.collect()
        log("I", "agent up: site=%s device=%s blocks=%d state=%s" % (
            self.cfg["site"], self.cfg["device"], len(self.cfg["blocks"]), control.STATE_NAMES[self.ctrl.state]))
        await self.poll_task()


async def refuse_forever(errors):
    # Bad config: keep the relays untouched, keep saying why, never crash-loop.
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
        from agent import config as configmod

        errors = configmod.validate(cfg)
        # boot-only code: unload it so its RAM serves the running agent
        del configmod
        sys.modules.pop("agent.config", None)
        gc.collect()
    if errors:
        asyncio.run(refuse_forever(errors))
        return
    hal = halmod.load(cfg.get("board"))
    agent = Agent(cfg, hal)
    gc.collect()
    asyncio.run(agent.main())
