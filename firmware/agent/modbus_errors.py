"""Modbus error types shared by the RTU/TCP framing, the master and the server."""


class ModbusError(Exception):
    """Base of every Modbus failure; catch this one around a transaction."""


class ModbusTimeout(ModbusError):
    """No complete response within the timeout."""


class ModbusCRCError(ModbusError):
    """RTU frame whose CRC-16 does not match."""


class ModbusFrameError(ModbusError):
    """Malformed frame: short, wrong unit id / function / byte count / MBAP."""


class ModbusException(ModbusError):
    """Exception response (function | 0x80, code) from a device.

    On the server side parse_request() raises it with the code the server
    must answer with (unit and fn tell it where to send the exception).
    """

    def __init__(self, code, fn=0, unit=0):
        super().__init__(code)
        self.code = code
        self.fn = fn
        self.unit = unit


class ModbusConnectionError(ModbusError):
    """TCP connection could not be made or was lost."""
