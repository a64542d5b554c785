# Relay blocks on HAL pins: one bit per block in a mask, 1 = closed (load energised).
#
# Two masks: `mask` is what the controller asked for (a block is "on" or "shed"), `pins` is what
# the relay pins do. They differ only for "held" blocks: shed over the network by an actuator
# (agent/features/miners.py asks the miners to sleep) while their relay stays closed. Policy
# (docs/partial-and-miners.md): the actuator decides per request whether a block may be shed
# softly (curtail() returns the blocks it accepts, 0 for a guaranteed trip); anything it does not
# accept opens its relay here and now, in the same apply(), never waiting on the network. A held
# block opens its relay at the next apply() when the actuator asks for it (fallback(): a miner did
# not confirm in time) or when hard_now() says a guaranteed trip is in force (escalation).
#
# Actuator interface (duck-typed): curtail(bits) -> accepted bits; resume(bits) (held blocks
# restored by the controller: wake the miners, the relay never opened); powered(bits, on) (relay
# pins of these blocks opened / closed); hard_now() -> bool (polled while something is held).
# apply() allocates nothing; without an actuator it is the plain relay bank it always was.
# Comments rather than docstrings: less RAM when compiled from source.


class RelayBank:
    def __init__(self, hal, blocks, closed, keep_open=0):
        # Drive every pin to the start state at once: this runs before anything else at boot.
        # keep_open: blocks that start open even when the rest start closed (economics' holds
        # read back by an early feature, agent/features/market.py boot())
        self._pins = []
        self._active = []
        self.mask = 0
        self.transitions = 0
        for i, b in enumerate(blocks):
            act = b["active"]
            on = closed and not (keep_open >> i) & 1
            lvl = act if on else 1 - act
            self._pins.append([hal.out_pin(p, lvl) for p in b["pins"]])
            self._active.append(act)
            if on:
                self.mask |= 1 << i
        self.n = len(blocks)
        self.pins = self.mask    # blocks whose relay is closed
        self.soft = 0            # blocks an actuator can shed over the network
        self.held = 0            # shed over the network: mask bit 0, pins bit 1
        self.force = 0           # held blocks whose relay opens at the next apply()
        self.pending = 0         # held blocks whose network shed is not confirmed yet (actuator)
        self.fallbacks = 0       # held blocks that had to open their relay
        self.actuator = None

    def attach(self, actuator, soft_mask):
        self.actuator = actuator
        self.soft = soft_mask & ((1 << self.n) - 1)

    def fallback(self, bits):
        # From the actuator's task: only marks; the pins change in the control task's next apply().
        self.force |= bits & self.held

    def apply(self, mask):
        # Set every block to its bit in mask; relays open before any close, so a shed is never
        # delayed. Returns the blocks whose requested state changed.
        act = self.actuator
        if self.held and act is not None and act.hard_now():
            self.force |= self.held
        changed = mask ^ self.mask
        if not changed and not self.force:
            return 0
        held = self.held
        if self.force:
            f = self.force & held
            self.fallbacks += bin(f).count("1") if f else 0
            held &= ~f
            self.force = 0
        if act is not None:
            opening = changed & self.mask & self.soft & self.pins
            if opening:
                held |= act.curtail(opening) & opening
            back = changed & mask & held
            if back:
                held &= ~back
                act.resume(back)
        self.held = held
        self.pending &= held
        want = mask | held
        pch = want ^ self.pins
        if pch:
            for want_closed in (0, 1):
                for i in range(self.n):
                    bit = 1 << i
                    if pch & bit and bool(want & bit) == bool(want_closed):
                        lvl = self._active[i] if want_closed else 1 - self._active[i]
                        for p in self._pins[i]:
                            p.value(lvl)
                        self.transitions += 1
            self.pins = want
            if act is not None:
                off = pch & ~want
                if off:
                    act.powered(off, False)
                if pch & want:
                    act.powered(pch & want, True)
        self.mask = mask
        return changed
