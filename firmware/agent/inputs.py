"""Debounced digital inputs: the utility's dry contact and the technician's override switch.

Debounced / ShedSignal / Override are pure logic: the caller samples the pin and passes the
level with the time; a change counts only after it has been stable for debounce_ms, so contact
bounce and induced spikes never reach the control decision. The features wire them to the
agent: agent/features/signals.py (the dry contact) and agent/features/override.py.
"""
from agent.compat import ticks_diff

INPUT_MS = 10  # the input task's sampling period


class Debounced:
    # initial: the level assumed before the first sample (-1 = unknown: the first reading is
    # debounced like a change). state: the debounced "asserted" to start from.
    def __init__(self, debounce_ms=50, active=1, initial=0, state=False):
        self.debounce_ms = debounce_ms
        self.active = active
        self.state = state          # debounced "asserted"
        self._raw = initial
        self._since = None
        self.changes = 0
        self.bounces = 0

    def sample(self, now_ms, level):
        """Feed one reading; returns True when the debounced state changed."""
        if level != self._raw:
            if self._since is not None:
                self.bounces += 1
            self._raw = level
            self._since = now_ms
            return False
        if self._since is None:
            return False
        if ticks_diff(now_ms, self._since) < self.debounce_ms:
            return False
        self._since = None
        asserted = level == self.active
        if asserted != self.state:
            self.state = asserted
            self.changes += 1
            return True
        return False


class ShedSignal:
    """Utility dry contact -> (signal_shed, release) for the controller.

    mode "level": shed while asserted; its de-assertion is the release.
    mode "edge": an assertion latches the shed; only a release (command / Modbus register)
    clears it, for programs where the utility pulses the contact.
    """

    def __init__(self, mode="level", debounce_ms=50, active=1):
        self.mode = mode
        self.input = Debounced(debounce_ms, active)
        self.latched = False

    def sample(self, now_ms, level):
        changed = self.input.sample(now_ms, level)
        if changed and self.input.state and self.mode == "edge":
            self.latched = True
        return changed

    def shed(self):
        return self.input.state if self.mode == "level" else self.latched

    def clear(self):
        self.latched = False


class Override:
    """The technician's override switch (docs/failsafes.md, site-config [override]).

    mode "lockout": while asserted every block is held open and nothing restores it (no
    automatic restore, no restore command); its release lets the normal restore rules run.
    mode "shed": an assertion is a local manual shed of every block (a trip); restore then
    follows the normal rules whatever the switch does afterwards.
    asserted: the state to start from (the pin read at boot, or a lockout persisted across a
    reboot); the first samples confirm or clear it after debounce_ms.
    """

    def __init__(self, mode="lockout", debounce_ms=50, active=0, asserted=False, pin=None):
        self.mode = mode
        self.input = Debounced(debounce_ms, active, -1, asserted)
        self.pin = pin
        self.own = False  # a lockout opened the blocks itself (no trip was in progress)

    def sample(self, now_ms, level):
        return self.input.sample(now_ms, level)

    def on(self):
        return self.input.state

    def lockout(self):
        return self.mode == "lockout" and self.input.state

    def status(self):
        # @status "override"
        return {"mode": self.mode, "on": self.input.state, "changes": self.input.changes}
