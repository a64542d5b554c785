# A refused config (agent/boot.py said why): the relays untouched (the HAL is never loaded, no pin
# is driven), the reasons on the console every 10 s, one `config_refused` journal record, no crash
# loop, and @status answered (state "refused", the reasons) so `gridshed status` tells the
# technician. Loaded only then: none of this is resident in a running agent.
import asyncio
import gc

from agent.app import BUILD, ConsoleLines, Journal, log, reply


async def refuse_forever(errors, chash):
    try:
        Journal(".").append("config_refused", {"errors": errors, "config_hash": chash})
    except Exception:
        pass
    asyncio.create_task(_console(errors, chash))
    while True:
        for e in errors:
            log("E", "ALARM config: " + e)
        await asyncio.sleep(10)


async def _console(errors, chash):
    lines = ConsoleLines(lambda k: None)
    while True:
        line = await lines.next()
        if line.startswith("@status"):
            reply((("build", BUILD), ("state", "refused"), ("config_errors", errors),
                   ("config_hash", chash), ("mem_free", gc.mem_free())), True)
        elif line[:1] == "@":
            reply({"error": "config refused: " + errors[0]}, True)
        gc.collect()
