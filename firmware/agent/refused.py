# A refused config (agent/boot.py said why): keep the relays untouched (the HAL is never loaded,
# no pin is driven), keep saying why on the console, journal it once, never crash-loop, and
# answer @status (state "refused" with the reasons) so `gridshed status` tells the technician.
# Loaded only then: none of this is resident in a running agent.
import asyncio
import gc

from agent.app import BUILD, ConsoleLines, Journal, log, reply


async def refuse_forever(errors, chash):
    try:
        j = Journal(".")
        j.append("config_refused", {"errors": errors, "config_hash": chash})
        j.close()
        del j
    except Exception:
        pass
    errs = {}
    asyncio.create_task(_refused_console(errors, chash, errs))
    while True:
        for e in errors:
            log("E", "ALARM config: " + e)
        await asyncio.sleep(10)


async def _refused_console(errors, chash, errs):
    def count(k):
        errs[k] = errs.get(k, 0) + 1

    lines = ConsoleLines(count)
    while True:
        line = await lines.next()
        if line == "@status" or line.startswith("@status "):
            reply((("build", BUILD), ("state", "refused"), ("config_errors", errors),
                   ("config_hash", chash), ("errors", errs), ("mem_free", gc.mem_free())), True)
        elif line.startswith("@"):
            count("console_bad")
            reply({"error": "config refused: " + errors[0]}, True)
        gc.collect()
