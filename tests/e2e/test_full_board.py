"""Host operations on a nearly full board (docs/failsafes.md "Writing to a board", maintenance boot).

The field walk's case: at the budget heap (rig.HEAP, 80wK) a site that turns on market, DNP3 and
MQTT runs without its features (the feature-memory fallback: features_memory counted), and the
stopped agent's heap is then too fragmented for the host's helpers (MemoryError "allocating 1280
bytes" with 109 KB free): `gridshed deploy --site SITE --romfs`, the way out, failed exactly where
it is needed. Now the host resets the board into a maintenance boot (main.py's flag file: the
agent not started, the whole heap free, bounded by the host's lease) and writes there:
* a host that dies during the maintenance boot leaves a board that comes back to its agent by
  itself (the lease runs out, the watchdog resets it; the flag is gone, so the agent starts);
* the deploy succeeds, says so in its one line, journals the maintenance boot, and the agent
  comes back from ROM with its features.
Since the resident-RAM work the stopped agent's heap at 80wK holds the host's helpers' block
again, so the first case asks its heap for a block no board has (the host's NEED_HEAP raised:
the automatic choice) and the deploy asks for the maintenance boot itself (`--maintenance-boot`).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from gridshed import siteconfig

from rig import HEAP, Rig

ROOT = Path(__file__).resolve().parents[2]
PARTITION = 0x20000  # 128 KiB, as MicroPython's partitions-4MiB-romfs.csv
LEASE = 5            # the killed host's lease (LEASE_S, 30 s in the tool; maint.boot's least): the wait

# a host that dies right after the board entered its maintenance boot (before writing anything)
DIES = f"""
import sys, time
import gridshed.transport as t
t.LEASE_S = {LEASE}
t.NEED_HEAP = 1 << 24  # no stopped agent's heap has such a block: the host chooses the maintenance boot
orig = t.Board.maintenance_boot
def boot(self, why):
    orig(self, why)
    print("IN-MAINT", flush=True)
    time.sleep(600)
t.Board.maintenance_boot = boot
from gridshed.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "host_tools"), str(ROOT / "firmware")]))


def _site(tmp: Path) -> Path:
    site = tmp / "site.toml"
    site.write_text((ROOT / "scenarios" / "market-site.toml").read_text()
                    + '\n[dnp3]\nport = 20998\naddress = 10\nmasters = [1]\nallow = ["127.0.0.1"]\n'
                    + '\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = 18997\n')
    return site


def test_deploy_to_a_full_board_runs_in_a_maintenance_boot(tmp_path):
    site = _site(tmp_path)
    cfg = siteconfig.load_site(site)

    async def main() -> None:
        rig = Rig(cfg, tmp_path / "board", heapsize=HEAP)
        rig.romfs = PARTITION
        rig.check = False  # checked below: the restarts are the test's own
        try:
            await rig.start()
            st = await rig.status()
            assert st["errors"].get("features_memory") == 1 and "dnp3" not in st and "mqtt" not in st, st
            port = rig.board.port
            args = ["deploy", "--port", port, "--site", str(site), "--romfs"]

            # ---- the host dies in the maintenance boot: the board comes back to the agent ------
            mark = rig.board.mark()
            p = subprocess.Popen([sys.executable, "-c", DIES, *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
            try:
                line = await asyncio.to_thread(p.stdout.readline)
                assert line.strip() == "IN-MAINT", (line, p.stderr.read() if p.poll() is not None else "")
            finally:
                p.kill()
                p.wait()
            out = rig.board.output()
            mark = out.rfind(b"maintenance boot (asked for by a host tool)")
            assert mark > 0 and b"agent up" not in out[mark:], out[-1500:]
            assert not (rig.board_dir / "maint.flag").exists()  # read and removed at that boot
            # the lease runs out, the watchdog resets the board: the agent (flag gone) starts
            await rig.until(lambda: b"agent up" in rig.board.output()[mark:], 60, "the agent back by itself")
            out = rig.board.output()[mark:].decode(errors="replace")
            assert "maintenance window over" in out and "agent crashed" not in out, out[-1500:]
            st = await rig.status()
            assert st["errors"].get("features_memory") == 1, st  # nothing was written

            # ---- the deploy: written in a maintenance boot, the agent back with its features ----
            mark = rig.board.mark()
            r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gridshed.cli", *args,
                                                         "--maintenance-boot", "--json"],
                                        capture_output=True, text=True, timeout=240, env=_env(), cwd=tmp_path)
            assert r.returncode == 0, r.stdout + r.stderr
            s = json.loads(r.stdout)
            assert s["romfs"]["written"] and s["restarted"], s
            assert "; the write ran in a maintenance boot (asked for (--maintenance-boot)" in s["restart"] \
                and "protection off for the write only, on a 30 s lease)" in s["restart"], s
            assert s["restart"].startswith("agent restarted"), s
            out = rig.board.output()[mark:]
            assert out.rfind(b"agent up") > out.rfind(b"maintenance boot (asked for by a host tool)") > 0
            # the site's build runs from ROM: the filesystem's agent is gone
            assert json.loads((rig.board_dir / "build.json").read_text())["mode"] == "romfs"
            assert not (rig.board_dir / "agent").exists() and not (rig.board_dir / "maint.flag").exists()
            maint = [x for x in rig.journal()[0] if x["k"] == "maint" and x.get("state") == "maintenance boot"]
            # one per host operation, and one more each time the Ctrl-C found no RAM for the
            # stopped agent's window (main.py: a maintenance boot instead, 30 s)
            assert 2 <= len(maint) <= 4 and all(x["off_s"] in (LEASE, 30) for x in maint), maint
            # at 80wK the site's features do not all fit even from ROM: each that cannot start is
            # left out and counted (never a crash of the agent that protects)
            await rig.until(lambda: b"not enough RAM to start mqtt" in rig.board.output()[mark:]
                            or b"@{" in rig.board.output()[mark:], 30, "the agent's first lines")
            out = rig.board.output()[mark:].decode(errors="replace")
            assert "agent crashed" not in out, out[-2000:]
        finally:
            await rig.close()

    asyncio.run(main())
