"""@status names who holds a shed; a key id may be any bytes ('#', not UTF-8) and an issuer label
may follow it: the reply stays valid JSON, under CPython and the real unix port (a fleet test
once got UnicodeError from @status for a random key id holding 0x23)."""
from __future__ import annotations

import json

CODE = """
from agent.control import Authority, I_SIGNED
from agent.cmd_run import slot
from agent.status import holders
import json
au = Authority()
for kid, iss in ((b'k#\\xe5\\xff\\x00#', None), (b'site-~\\xe5g\\xe0', 'openadr'), (b'#', '')):
    iid = bytes((len(kid),)) + kid + (iss.encode() if iss else b'')
    au.shed(slot(au, iid))
au.shed(0)
print(json.dumps(holders(au)))
"""
WANT = ["modbus", "signed:6b23e5ff0023", "signed:736974652d7ee567e0#openadr", "signed:23"]


def test_holders_are_json_for_any_key_id(mp, repo_root):
    import sys

    sys.path.insert(0, str(repo_root / "firmware"))
    ns: dict = {}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(CODE, ns)
    assert json.loads(buf.getvalue()) == WANT
    # a unit check of the reply, not a memory claim: the modules are compiled from source here
    res = mp.run("import sys\nsys.path.insert(0, %r)\n" % str(repo_root / "firmware") + CODE, heapsize="512k")
    assert json.loads(res.out.strip().splitlines()[-1]) == WANT
