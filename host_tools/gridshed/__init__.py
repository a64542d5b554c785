"""gridshed host tools: CLI, board transport, provisioning, signing, simulator, reports."""
__version__ = "0.1.0"
