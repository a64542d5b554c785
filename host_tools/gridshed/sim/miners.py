"""Simulated miners on loopback: the cgminer RPC API and LuxOS `curtail`, with a power model.

Each :class:`SimMiner` listens on its own 127.0.0.1 port and behaves like the miner's API on TCP
4028 (cgminer API-README, v4.10): one request per connection (JSON ``{"command": ..,
"parameter": ..}`` or the plain-text ``cmd|param`` form), one reply, then the miner closes the
socket. JSON replies end with a NUL byte, as cgminer sends them. Commands:

* read-only: ``version``, ``summary``, ``devs``, ``pools``, ``asccount``, ``config``;
* cgminer privileged: ``ascdisable|N`` / ``ascenable|N`` (refused with STATUS E code 45 when
  the miner is not ``privileged`` for the caller, like ``--api-allow`` without ``W:``);
* LuxOS (``firmware="luxos"``): ``logon`` -> SESSION[0].SessionID (one session at a time,
  STATUS E code 402 "Another session is active"), ``logoff|sid``,
  ``curtail|sid,sleep`` / ``curtail|sid,wakeup``.

Power: hashing ``kw_hash`` (3.3 kW) scaled by the enabled ASC share, sleeping / all ASCs
disabled ``kw_sleep`` (25 W), unpowered 0. Losing power (its relay opened) clears sleep and
sessions: it boots hashing when power returns. Fault options: ``delay_s`` (answer late),
``silent`` (accept, never answer), ``fail`` (STATUS E on curtail/ascdisable), ``concat`` (reply
as two concatenated JSON objects).
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

KW_HASH = 3.3
KW_SLEEP = 0.025


@dataclass
class SimMiner:
    block: int
    firmware: str = "cgminer"          # "cgminer" | "luxos"
    ascs: int = 3
    kw_hash: float = KW_HASH
    kw_sleep: float = KW_SLEEP
    delay_s: float = 0.0
    silent: bool = False
    fail: bool = False
    concat: bool = False
    privileged: bool = True
    powered: bool = True
    enabled: list[bool] = field(default_factory=list)
    sleeping: bool = False
    session: str | None = None
    port: int = 0
    log: list[tuple[float, str, str]] = field(default_factory=list)   # (t, command, parameter)
    server: asyncio.base_events.Server | None = None
    on_change: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if not self.enabled:
            self.enabled = [True] * self.ascs

    # ---- state and power ---------------------------------------------------------------------
    @property
    def hashing(self) -> bool:
        return self.powered and not self.sleeping and any(self.enabled)

    def kw(self) -> float:
        if not self.powered:
            return 0.0
        if self.sleeping:
            return self.kw_sleep
        share = sum(self.enabled) / self.ascs
        return self.kw_sleep + (self.kw_hash - self.kw_sleep) * share

    def set_powered(self, on: bool) -> None:
        if on == self.powered:
            return
        self.powered = on
        if not on:  # power lost: RAM state gone; boots hashing
            self.sleeping = False
            self.session = None
            self.enabled = [True] * self.ascs
        self._changed()

    def _changed(self) -> None:
        if self.on_change:
            self.on_change()

    def commands(self, name: str) -> list[tuple[float, str, str]]:
        return [e for e in self.log if e[1] == name]

    # ---- the API -----------------------------------------------------------------------------
    def _status(self, code: str, num: int, msg: str) -> dict[str, Any]:
        desc = "LUXminer 2024.9.17" if self.firmware == "luxos" else "cgminer 4.10.0"
        return {"STATUS": [{"STATUS": code, "When": int(time.time()), "Code": num, "Msg": msg,
                            "Description": desc}], "id": 1}

    def handle(self, cmd: str, param: str) -> dict[str, Any]:
        """One request -> the reply object (also the unit under test for the protocol)."""
        if cmd == "version":
            r = self._status("S", 22, "CGMiner versions")
            r["VERSION"] = [{"CGMiner": "4.10.0", "API": "3.7"}]
            return r
        if cmd == "summary":
            r = self._status("S", 11, "Summary")
            r["SUMMARY"] = [{"Elapsed": 100, "MHS av": 100e6 * sum(self.enabled) / self.ascs if self.hashing else 0.0,
                             "Accepted": 10, "Rejected": 0, "Hardware Errors": 0}]
            return r
        if cmd == "devs":
            r = self._status("S", 9, "%d ASC(s)" % self.ascs)
            r["DEVS"] = [{"ASC": i, "Name": "BTM", "ID": i, "Enabled": "Y" if e else "N",
                          "Status": "Alive", "MHS av": 33e6 if e and self.hashing else 0.0}
                         for i, e in enumerate(self.enabled)]
            return r
        if cmd == "pools":
            r = self._status("S", 7, "1 Pool(s)")
            r["POOLS"] = [{"POOL": 0, "URL": "stratum+tcp://pool.example:3333", "Status": "Alive", "Priority": 0}]
            return r
        if cmd == "asccount":
            r = self._status("S", 104, "ASC count")
            r["ASCS"] = [{"Count": self.ascs}]
            return r
        if cmd == "config":
            r = self._status("S", 33, "CGMiner config")
            r["CONFIG"] = [{"ASC Count": self.ascs, "PGA Count": 0, "Pool Count": 1}]
            return r
        if cmd in ("ascenable", "ascdisable"):
            if not self.privileged:
                return self._status("E", 45, "Access denied to '%s' command" % cmd)
            try:
                n = int(param)
            except ValueError:
                return self._status("E", 105, "Missing ASC id")
            if not 0 <= n < self.ascs:
                return self._status("E", 107, "Invalid ASC id %s - range is 0 - %d" % (param, self.ascs - 1))
            on = cmd == "ascenable"
            if self.fail and not on:
                return self._status("E", 108, "ASC %d disable failed" % n)
            if self.enabled[n] == on:
                return self._status("I", 109 if on else 110, "ASC %d already %s" % (n, "enabled" if on else "disabled"))
            self.enabled[n] = on
            self._changed()
            return self._status("S", 112 if on else 111, "ASC %d sent %s message" % (n, "enable" if on else "disable"))
        if self.firmware == "luxos":
            if cmd == "logon":
                if self.session is not None:
                    return self._status("E", 402, "Another session is active")
                self.session = secrets.token_hex(4)
                r = self._status("S", 339, "Logon")
                r["SESSION"] = [{"SessionID": self.session}]
                return r
            if cmd == "logoff":
                if self.session is None or param != self.session:
                    return self._status("E", 405, "Invalid session id")
                self.session = None
                return self._status("S", 340, "Logoff")
            if cmd == "curtail":
                sid, _, arg = param.partition(",")
                if self.session is None or sid != self.session:
                    return self._status("E", 405, "Invalid session id")
                if arg not in ("sleep", "wakeup"):
                    return self._status("E", 14, "Invalid curtail mode %r" % arg)
                if self.fail and arg == "sleep":
                    return self._status("E", 406, "Curtail failed")
                self.sleeping = arg == "sleep"
                self._changed()
                return self._status("S", 341, "Curtail %s" % arg)
        return self._status("E", 14, "Invalid command")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self.powered:
                return  # nobody home: the connection just drops
            data = b""
            req: Any = None
            while len(data) < 8192:
                try:
                    chunk = await asyncio.wait_for(reader.read(1024), 2.0)
                except asyncio.TimeoutError:
                    break
                if not chunk:
                    break
                data += chunk
                text = data.decode(errors="replace").strip("\x00 \r\n")
                if text.startswith("{"):
                    try:
                        req = json.loads(text)
                        break
                    except ValueError:
                        continue
                else:
                    req = text
                    break
            if isinstance(req, dict):
                cmd, param, as_json = str(req.get("command", "")), str(req.get("parameter", "")), True
            elif isinstance(req, str):
                cmd, _, param = req.partition("|")
                as_json = False
            else:
                return
            self.log.append((time.monotonic(), cmd, param))
            if self.silent:
                await asyncio.sleep(3600)
                return
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if not self.powered:
                return
            r = self.handle(cmd, param)
            if as_json:
                out = json.dumps(r).encode()
                if self.concat:
                    out = json.dumps({"STATUS": r["STATUS"], "id": 1}).encode() + json.dumps(
                        {k: v for k, v in r.items() if k != "STATUS"}).encode()
                out += b"\x00"
            else:
                st = r["STATUS"][0]
                out = ("STATUS=%s,When=%d,Code=%d,Msg=%s,Description=%s|" % (
                    st["STATUS"], st["When"], st["Code"], st["Msg"], st["Description"])).encode() + b"\x00"
            writer.write(out)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._client, host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class MinerFarm:
    """Many SimMiners; plugs their power into a LoadModel (blocks with miners follow the farm)."""

    def __init__(self, miners: list[SimMiner]) -> None:
        self.miners = miners
        self.events: list[tuple[float, int, str]] = []   # (t, miner index, "hashing"/"sleeping"/...)
        for i, m in enumerate(miners):
            m.on_change = (lambda i=i: self._note(i))

    def _note(self, i: int) -> None:
        m = self.miners[i]
        state = "off" if not m.powered else ("sleeping" if m.sleeping or not any(m.enabled) else "hashing")
        self.events.append((time.monotonic(), i, state))

    async def start(self) -> None:
        for m in self.miners:
            await m.start()

    async def stop(self) -> None:
        for m in self.miners:
            await m.stop()

    def block_kw(self, block: int) -> float:
        return sum(m.kw() for m in self.miners if m.block == block)

    def blocks(self) -> set[int]:
        return {m.block for m in self.miners}

    def set_block_power(self, block: int, on: bool) -> None:
        for m in self.miners:
            if m.block == block:
                m.set_powered(on)

    def hosts_config(self) -> list[dict[str, Any]]:
        """The `miners.hosts` list for the site config."""
        return [{"host": "127.0.0.1", "port": m.port, "block": m.block} for m in self.miners]

    def attach(self, load: Any) -> None:
        """Blocks with simulated miners draw what the miners draw; relay changes power them."""
        for b in self.blocks():
            load.power[b] = (lambda b=b: self.block_kw(b))
        load.listeners.append(self.set_block_power)
