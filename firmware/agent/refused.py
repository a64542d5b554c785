# A refused config (agent/boot.py said why): the relays untouched (the HAL is never loaded, no pin
# is driven), the reasons on the console every 10 s, one `config_refused` journal record, no crash
# loop; @status answered (state "refused", the reasons) so `gridshed status` tells the
# technician, and @events so the journal can still be pulled. Loaded only then: none of this is
# resident in a running agent.
import asyncio
import gc

from agent.base import BUILD, ConsoleLines, log, reply
from agent.journal import Journal


async def refuse_forever(errors, chash):
    j = None
    try:
        j = Journal(".")
        j.append("config_refused", {"errors": errors, "config_hash": chash})
    except Exception:
        pass
    asyncio.create_task(_console(errors, chash, j))
    while True:
        for e in errors:
            log("E", "ALARM config: " + e)
        await asyncio.sleep(10)


class _Shim:
    pass


async def _console(errors, chash, j):
    lines = ConsoleLines(lambda k: None)
    a = _Shim()
    a.journal = j
    while True:
        line = await lines.next()
        if line.startswith("@status"):
            reply((("build", BUILD), ("state", "refused"), ("config_errors", errors),
                   ("config_hash", chash), ("mem_free", gc.mem_free())), True)
        elif line.startswith("@events") and j is not None:
            from agent import journal_read

            journal_read.events(a, line[7:].strip())
        elif line[:1] == "@":
            reply({"error": "config refused: " + errors[0]}, True)
        gc.collect()
