"""Debounced digital inputs: the utility's dry contact and the technician's override switch.

Debounced / ShedSignal are pure logic: the caller samples the pin and passes the level with the
time; a change counts only after it has been stable for debounce_ms, so contact bounce and
induced spikes never reach the control decision. The features wire them to the agent:
agent/features/signals.py (the dry contact) and agent/features/override.py (its Override class is
there: a site with only a dry contact does not keep it in RAM).
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

    def status(self):
        # @status "signals"
        i = self.input
        return {"on": i.state, "latched": self.latched, "changes": i.changes, "bounces": i.bounces}
