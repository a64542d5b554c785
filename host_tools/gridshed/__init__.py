"""gridshed host tools: CLI, board transport, provisioning, signing, simulator, reports."""
import sys as _sys

__version__ = "0.1.0"


def _firmware_on_path() -> None:
    # The firmware's pure-logic modules (agent.cbor, agent.control, ...) are the one
    # implementation of every format: the host imports them from the firmware folder it ships
    # (or the checkout's), never from a second copy.
    from .datafiles import repo_root

    fw = str(repo_root() / "firmware")
    if fw not in _sys.path:
        _sys.path.append(fw)


_firmware_on_path()
