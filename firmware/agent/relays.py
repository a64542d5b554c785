"""Relay blocks on HAL pins: one bit per block in a mask, 1 = closed (load energised)."""


class RelayBank:
    def __init__(self, hal, blocks, closed):
        """Drive every pin to the start state at once: this runs before anything else at boot."""
        self._pins = []
        self._active = []
        self.mask = 0
        self.transitions = 0
        for i, b in enumerate(blocks):
            act = b["active"]
            lvl = act if closed else 1 - act
            self._pins.append([hal.out_pin(p, lvl) for p in b["pins"]])
            self._active.append(act)
            if closed:
                self.mask |= 1 << i
        self.n = len(blocks)

    def apply(self, mask):
        """Set every block to its bit in mask; opening pins first, so a shed is never delayed."""
        changed = mask ^ self.mask
        if not changed:
            return 0
        for want_closed in (0, 1):
            for i in range(self.n):
                bit = 1 << i
                if changed & bit and bool(mask & bit) == bool(want_closed):
                    lvl = self._active[i] if want_closed else 1 - self._active[i]
                    for p in self._pins[i]:
                        p.value(lvl)
                    self.transitions += 1
        self.mask = mask
        return changed
