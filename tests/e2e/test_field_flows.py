"""What a technician does to a running board, at the budget heap, with faults injected.

The board is the real agent (mpy-cross build) on a virtual board at the smallest supported board's
budget (rig.HEAP, 80wK), provisioned with the demo site, polling a pymodbus meter; every host step
is the real CLI in its own process (`python -m gridshed.cli ...`), as a technician runs it:

* deploy (another build, back, unchanged), provision and re-provision (key rotation), events pull
  with disturbance captures present: each several times in a row, the agent answering `@status`
  after each;
* the same writes with faults: a MemoryError on the board in the middle of the write (an
  allocation hog started on the board), the host process killed (SIGKILL), the cable pulled
  (VirtualBoard.unplug), Ctrl-C on the host (SIGINT to the CLI). After each the agent runs again
  with its OLD config and key (or build), and the CLI said so in one line;
* the console maintenance window (docs/failsafes.md): stopped from the console, the agent says
  "PROTECTION OFF", journals it, and the watchdog resets the board into the agent when the window
  ends; host work extends it, a host that went away does not;
* power cuts (SIGKILL of the board) with file writes slowed (sim.json "slow_fs_ms"): at each point
  between a relay opening and the trip saved, and during provision's switch-over.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from gridshed.build import BUILD_FILE
from gridshed import siteconfig
from gridshed.transport import Board, Console

from rig import HEAP, Rig, check_board, journal_records, read_state
from test_signed_commands import agent_build  # noqa: F401 (fixture: the agent built once)

ROOT = Path(__file__).resolve().parents[2]
DEMO_SITE = ROOT / "scenarios" / "demo-site.toml"
WINDOW_S = 12   # [maintenance] window_s of these sites: a host that went away is waited out quickly
FAST = {"min_off_s": 1, "restore_hold_s": 0.5, "stagger_s": 0.2, "jitter_s": 0.05}
_BUILDS: dict[str, Path] = {}


# ---- helpers ---------------------------------------------------------------------------------
def site_file(tmp: Path, name: str = "site.toml", **keys: Any) -> Path:
    """The demo site with fast restore timers, short captures and a short maintenance window."""
    text = DEMO_SITE.read_text()
    for k, v in {**FAST, **keys}.items():
        text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {json.dumps(v)}", text)
        assert n == 1, k
    text += f"\n[capture]\npre_s = 2.0\npost_s = 3.0\n\n[maintenance]\nwindow_s = {WINDOW_S}\n"
    p = tmp / name
    p.write_text(text)
    return p


def builds() -> tuple[Path, Path]:
    """Two builds of the agent: A (the repository's firmware) and B (the same with one comment
    changed, so another build id and another agent/app.mpy)."""
    if not _BUILDS:
        from gridshed.build import build

        from rig import built_firmware

        _BUILDS["a"] = built_firmware()[0]
        src = Path(tempfile.mkdtemp(prefix="gridshed-fw-b-")) / "firmware"
        shutil.copytree(ROOT / "firmware", src, ignore=shutil.ignore_patterns("__pycache__"))
        app = src / "agent" / "app.py"
        app.write_text(app.read_text() + "\n# build B of the field-flow tests\n")
        _BUILDS["b"] = Path(build("unix-sim", src=src, out=src.parent / "unix-sim")["path"])
    return _BUILDS["a"], _BUILDS["b"]


def build_id(bdir: Path) -> str:
    return json.loads((bdir / "manifest.json").read_text())["build_id"]


def gs(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gridshed.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def gs_start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gridshed.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "host_tools"), str(ROOT / "firmware")]))


def sha(p: Path) -> str | None:
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def files(board: Path) -> tuple[str | None, str | None]:
    return sha(board / "config.cbor"), sha(board / "keys.cbor")


def kid_on_board(board: Path) -> str:
    (kid, _), = siteconfig.read_settings((board / "keys.cbor").read_bytes()).items()
    return kid.hex()


async def status(rig: Rig, timeout: float = 60) -> dict[str, Any]:
    """@status from the running agent (retried while it boots); a valid config answers 'normal' etc."""
    def ask() -> dict[str, Any]:
        t_end = time.monotonic() + timeout
        while True:
            try:
                with Console(rig.board.port) as con:
                    return con.status(timeout=5)
            except Exception:
                if time.monotonic() > t_end:
                    raise
                time.sleep(0.3)

    st = await asyncio.to_thread(ask)
    assert "error" not in st and st.get("state") not in (None, "refused"), st
    return st


def restart_line(r: subprocess.CompletedProcess | tuple[int, str, str]) -> str:
    err = r.stderr if isinstance(r, subprocess.CompletedProcess) else r[2]
    return "\n".join(x for x in err.splitlines() if "agent restart" in x or "restart the agent" in x)


async def wait_file(path: Path, timeout: float = 60) -> None:
    t_end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < t_end, f"{path} never appeared"
        await asyncio.sleep(0.005)


class Site:
    """A rig around the demo site, provisioned through the CLI (so the inventory has the key)."""

    def __init__(self, tmp: Path, slow_fs_ms: int = 0) -> None:
        self.tmp = tmp
        self.site = site_file(tmp)
        self.site2 = site_file(tmp, "site2.toml", restore_hold_s=0.7)  # another config
        self.inv = tmp / "inv.sqlite"
        self.rig = Rig(siteconfig.load_site(self.site), tmp / "board", heapsize=HEAP)
        self.slow_fs_ms = slow_fs_ms
        self.caused = 0  # board restarts the test caused (deploy, provision, kills, ...)
        self.injected_memory_errors = False  # MemoryErrors the test caused on the board

    @property
    def dir(self) -> Path:
        return self.rig.board_dir

    @property
    def port(self) -> str:
        return self.rig.board.port

    async def __aenter__(self) -> "Site":
        await self.rig.start()
        if self.slow_fs_ms:
            sim = json.loads((self.dir / "sim.json").read_text())
            sim["slow_fs_ms"] = self.slow_fs_ms
            (self.dir / "sim.json").write_text(json.dumps(sim))
            await self.kill()
        r = await asyncio.to_thread(gs, "provision", "--port", self.port, "--site", str(self.site),
                                    "--inventory", str(self.inv), "--json")
        assert r.returncode == 0, r.stderr
        self.caused += 1
        await self.rig.until(self.rig.all_closed, 60, "relays closed by the provisioned agent")
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if exc[0] is None and not self.injected_memory_errors:
                await asyncio.to_thread(check_board, self.rig.board, self.caused)
            elif exc[0] is None:  # the hog's MemoryErrors (raw-REPL answers): only those
                from gridshed.sim.site import console_health

                h = console_health(self.rig.board.output(), self.rig.board.restarts)
                assert h["crashes"] == 0 and h["restarts"] == self.caused, h
                await status(self.rig)
        finally:
            await self.rig.close()

    async def kill(self) -> None:
        self.caused += 1
        await self.rig.kill_board()

    def restarted(self, n: int = 1) -> None:
        self.caused += n


# ---- the everyday flows, several times in a row --------------------------------------------------
def test_deploy_provision_pull_again_and_again_on_a_running_board(tmp_path):
    async def main() -> None:
        a, b = builds()
        async with Site(tmp_path) as s:
            run = asyncio.to_thread
            # deploy: B over A, back to A, A unchanged; twice round
            for i, (bdir, force) in enumerate([(b, False), (a, False), (a, False), (b, False), (a, True)]):
                r = await run(gs, "deploy", "--port", s.port, "--build", str(bdir), *(["--force"] if force else []))
                assert r.returncode == 0, r.stderr
                line = r.stdout.strip().splitlines()[-1]
                assert line.endswith("; agent restarted: it answers @status (state normal)"), line
                s.restarted()
                st = await status(s.rig)
                assert st["build"] == build_id(bdir) and st["device"] == "ctl-1", (i, st)
            # provision, then rotate the key twice; another config once
            kids = [kid_on_board(s.dir)]
            for site in (s.site, s.site, s.site2, s.site):
                r = await run(gs, "provision", "--port", s.port, "--site", str(site), "--inventory", str(s.inv),
                              "--json")
                assert r.returncode == 0, r.stderr
                res = json.loads(r.stdout)
                s.restarted()
                # the restart forgot the trusted time: provision sent the signed time with the new key
                assert res["restart"] == ("agent restarted: it answers @status (state normal); "
                                          "signed time sent (its clock is trusted)"), res
                assert res["agent"] == {"state": "normal", "device": "ctl-1"} and res["warnings"] == []
                kids.append(res["key_id"])
                assert kid_on_board(s.dir) == res["key_id"]
                st = await status(s.rig)
                assert st["config_hash"] == res["config_hash"] == sha(s.dir / "config.cbor")[:16]
                assert st["time_trusted"] is True, st
            assert len(set(kids)) == len(kids)  # a new key every time
            # a dip: trip, capture records, restore; then pull the journal over the console 3 times
            s.rig.hz = 59.5
            await s.rig.until(s.rig.all_open, 30, "trip")
            await s.rig.until(lambda: len([r for r in s.rig.journal()[0] if r["k"] == "capture"]) >= 2, 90,
                              "capture records (2 parts or more)")
            s.rig.hz = 60.0
            await s.rig.until(s.rig.all_closed, 60, "restore")
            for i in range(3):
                out = tmp_path / f"ev{i}.json"
                r = await run(gs, "events", "--port", s.port, "--all", "--no-state", "-o", str(out), "--json")
                assert r.returncode == 0, r.stderr
                info = json.loads(r.stdout)
                doc = json.loads(out.read_text())
                on_board = [x["n"] for x in s.rig.journal()[0]]
                assert info["complete"] is True and [x["n"] for x in doc["records"]] == on_board[:len(doc["records"])]
                assert len(doc["records"]) >= on_board.index(info["last_seq"]) + 1
                kinds = [x["k"] for x in doc["records"]]
                assert kinds.count("capture") >= 2 and kinds.count("maint") >= 9, kinds
                assert all(x["smp"] for x in doc["records"] if x["k"] == "capture")
            st = await status(s.rig)
            assert st["state"] == "normal" and st["samples"] > 0

    asyncio.run(main())


# ---- a MemoryError on the board in the middle of the write ---------------------------------------
# Started on the board (in the raw REPL, left running at the REPL): a thread that waits for the
# staged file the host writes first, then takes every byte of the heap, so the host's next exec
# fails with MemoryError in the middle of the write.
HOG = """
import _thread
_gs_hoard=None
def _gs_hog(p):
 global _gs_hoard
 import time
 while 1:
  try:
   open(p).close()
   break
  except OSError:
   time.sleep_ms(2)
 for n in (4096,1024,256,64,16):
  try:
   while 1:
    _gs_hoard=[_gs_hoard,bytearray(n)]
  except MemoryError:
   pass
_thread.start_new_thread(_gs_hog,({path!r},))
"""


def arm_hog(port: str, path: str) -> None:
    with Board(port) as b:
        b.enter_raw()
        b.exec(HOG.format(path=path))
        b.exit_raw()  # left at the REPL, in its maintenance window, with the hog waiting


@pytest.mark.parametrize("op", ["provision", "deploy"])
def test_memory_error_mid_write_runs_again_in_a_maintenance_boot(tmp_path, op):
    """The host's helpers hit MemoryError mid-write (the hog): nothing is switched, the agent
    restarts, and the operation runs again in a maintenance boot (main.py's flag: the agent not
    started, the whole heap free), which goes through and says so in its one line."""
    async def main() -> None:
        a, b = builds()
        async with Site(tmp_path) as s:
            before = files(s.dir)
            old_kid = kid_on_board(s.dir)
            # deploy: the one module two builds differ in is the one carrying the build id
            staged = "keys.cbor.gsnew" if op == "provision" else BUILD_FILE.replace(".py", ".mpy.gsnew")
            await asyncio.to_thread(arm_hog, s.port, staged)
            args = (["provision", "--site", str(s.site2), "--inventory", str(s.inv)] if op == "provision"
                    else ["deploy", "--build", str(b)])
            r = await asyncio.to_thread(gs, *args, "--port", s.port)
            assert r.returncode == 0, r.stderr
            s.restarted(3)  # after the failed try, into the maintenance boot, back to the agent
            line = r.stdout.strip().splitlines()[-1]
            assert "; the write ran in a maintenance boot (the host's helpers ran out of heap beside the stopped " \
                   "agent: the agent was not started, protection off for the write only, on a 30 s lease)" in line, line
            assert "agent restarted: it answers @status (state normal)" in line, line
            st = await status(s.rig)
            if op == "provision":
                assert st["config_hash"] != before[0][:16] and kid_on_board(s.dir) != old_kid
            else:
                assert st["build"] == build_id(b) and files(s.dir) == before
            assert not (s.dir / "switch-plan.json").exists() and not (s.dir / "maint.flag").exists()
            assert [x["off_s"] for x in s.rig.journal()[0] if x.get("state") == "maintenance boot"] == [30]
            s.injected_memory_errors = True

    asyncio.run(main())


# ---- the host killed, the cable pulled, Ctrl-C on the host -------------------------------------
def test_host_killed_mid_write_board_comes_back_by_itself(tmp_path):
    async def main() -> None:
        async with Site(tmp_path, slow_fs_ms=20) as s:
            before = files(s.dir)
            for i in range(2):
                for f in s.dir.rglob("*.gsnew"):  # left by the last round (a next write would reuse it)
                    f.unlink()
                mark = s.rig.board.mark()
                p = gs_start("provision", "--port", s.port, "--site", str(s.site2), "--inventory", str(s.inv))
                await wait_file(s.dir / "config.cbor.gsnew")
                p.kill()  # SIGKILL: nothing on the host restarts anything
                p.wait(10)
                s.restarted()
                # the board's maintenance window ends (WINDOW_S after the host's last exec), the
                # watchdog resets it into the agent (bounded: without the window it never would)
                assert await asyncio.to_thread(s.rig.board.wait_output, "agent up", WINDOW_S + 40, mark), \
                    s.rig.board.output()[-1500:]
                st = await status(s.rig)
                assert files(s.dir) == before and st["config_hash"] == before[0][:16]
                boots = [r for r in s.rig.journal()[0] if r["k"] == "boot"]
                assert boots[-1]["cause"] == "watchdog"
                assert [r for r in s.rig.journal()[0] if r["k"] == "maint"][-1]["off_s"] == WINDOW_S

    asyncio.run(main())


def test_cable_pulled_mid_write_then_plugged_back(tmp_path):
    async def main() -> None:
        async with Site(tmp_path, slow_fs_ms=20) as s:
            before = files(s.dir)
            mark = s.rig.board.mark()
            p = gs_start("provision", "--port", s.port, "--site", str(s.site2), "--inventory", str(s.inv))
            await wait_file(s.dir / "config.cbor.gsnew")
            s.rig.board.unplug()
            # nobody reaches the board: its window ends, the watchdog resets it into the agent
            assert await asyncio.to_thread(s.rig.board.wait_output, "agent up", WINDOW_S + 40, mark)
            s.rig.board.plug()
            s.restarted()
            out, err = await asyncio.to_thread(p.communicate, timeout=120)
            lines = err.strip().splitlines()
            assert p.returncode == 2 and lines[-1].startswith("gridshed: error: ") and "Traceback" not in err, err
            # the CLI saw the agent come back (cable back in time) or says the board will reset itself
            assert ("agent restarted: it answers @status" in lines[-1]
                    or "resets into the agent by itself" in lines[-1]), lines[-1]
            st = await status(s.rig)
            assert files(s.dir) == before and st["config_hash"] == before[0][:16]

    asyncio.run(main())


@pytest.mark.parametrize("op", ["provision", "deploy"])
def test_ctrl_c_on_the_host_mid_write(tmp_path, op):
    async def main() -> None:
        a, b = builds()
        async with Site(tmp_path, slow_fs_ms=20) as s:
            before = files(s.dir)
            for i in range(2):
                args = (["provision", "--site", str(s.site2), "--inventory", str(s.inv)] if op == "provision"
                        else ["deploy", "--build", str(b), "--force"])
                p = gs_start(*args, "--port", s.port)
                await wait_file(s.dir / ("config.cbor.gsnew" if op == "provision" else "main.py.gsnew"))
                p.send_signal(signal.SIGINT)
                out, err = await asyncio.to_thread(p.communicate, timeout=120)
                s.restarted()
                assert p.returncode == 130, (out, err)
                said = "gridshed: agent restarted: it answers @status (state normal); nothing was switched: "
                said += ("the board keeps its old config and key, the inventory is unchanged" if op == "provision"
                         else "the board keeps its old firmware")  # cut before the switch-over
                assert said in err.splitlines(), err
                assert err.strip().splitlines()[-1] == "gridshed: interrupted" and "Traceback" not in err
                st = await status(s.rig)
                assert files(s.dir) == before and st["build"] == build_id(a)
                for f in s.dir.rglob("*.gsnew"):
                    f.unlink()  # a staged file left by the interrupted write (the next write reuses it)

    asyncio.run(main())


# ---- the console maintenance window ------------------------------------------------------------
def test_console_stop_is_bounded_and_never_silent(tmp_path):
    async def main() -> None:
        async with Site(tmp_path) as s:
            board = s.rig.board
            # a technician's Ctrl-C at the console, then nothing: protection is back after the window
            mark = board.mark()
            with Board(s.port) as b:
                b.enter_raw()
                assert b.maint_left == WINDOW_S and b.mem_free > 100_000 // 2
                k0 = int(b.exec("import time;print(time.ticks_ms())"))
                # host work extends the window: execs until two windows passed on the board's clock
                while int(b.exec("print(time.ticks_diff(time.ticks_ms(),%d))" % k0)) < 2 * WINDOW_S * 1000:
                    assert b.exec("print(2+2)").strip() == b"4"
                    time.sleep(1.0)
                assert board.output().count(b"agent up", mark) == 0  # still stopped: kept alive by the host
                b.exit_raw()
            out = board.output()[mark:]
            assert b"W PROTECTION OFF: agent stopped from the console" in out and b"window_s" in out
            # @status from another tool meanwhile says what is going on
            with pytest.raises(Exception, match="PROTECTION IS OFF"):
                await asyncio.to_thread(lambda: Console(s.port).status(timeout=2))
            # bounded: the window ends WINDOW_S after the last exec, the watchdog 8 s later
            assert await asyncio.to_thread(board.wait_output, "agent up", WINDOW_S + 30, mark)
            s.restarted()
            assert b"maintenance window over" in board.output()[mark:]
            st = await status(s.rig)
            recs = s.rig.journal()[0]
            m = [r for r in recs if r["k"] == "maint"][-1]
            assert m["off_s"] == WINDOW_S and m["mask"] == 15 and m["state"] == "normal"
            assert recs[-1]["k"] == "boot" and recs[-1]["cause"] == "watchdog" or \
                [r for r in recs if r["k"] == "boot"][-1]["cause"] == "watchdog"
            assert st["watchdog"]["starved"] == 0

    asyncio.run(main())


# ---- power cuts -------------------------------------------------------------------------------
def test_trip_is_saved_before_anything_else(tmp_path):
    """SIGKILL at points from the relay opening on (file steps slowed to 60 ms each): a board that
    journaled or printed the trip has it in state.cbor (the state is written first), and one whose
    state says tripped keeps every relay open at the next boot. Only a kill inside the state write
    itself loses the trip (and then nothing else has it either)."""
    async def main() -> None:
        async with Site(tmp_path, slow_fs_ms=60) as s:
            rig = s.rig
            active = {p: blk["active"] for blk in rig.cfg["blocks"] for p in blk["pins"]}  # level = closed
            relay_pins = set(active)
            lost = kept = 0
            # the state write takes 4 slowed steps (open, write, close, rename: 240 ms): kills inside
            # it and after it
            for delay in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.8, 1.2):
                await rig.until(rig.all_closed, 60, "closed")
                n_pins = len(rig.pin_log)
                n_trips = len([r for r in journal_records(s.dir)[0] if r.get("ev") == "trip_uf"])
                mark = rig.board.mark()
                rig.hz = 59.5
                await rig.until(lambda: any(lv == 0 for _, _, _, lv in rig.pin_log[n_pins:]), 30, "relay open")
                await asyncio.sleep(delay)
                boot = rig.boot
                os.killpg(rig.board.pid, signal.SIGKILL)
                rig.hz = 60.0  # a boot that forgot the trip closes the relays and keeps them closed
                s.caused += 1
                state = read_state(s.dir) or {}
                recs = journal_records(s.dir)[0]
                journaled = len([r for r in recs if r.get("ev") == "trip_uf"]) > n_trips
                printed = b"trip_uf" in rig.board.output()[mark:]
                tripped = bool(state.get("tripped"))
                assert tripped or not (journaled or printed), (delay, state, recs[-3:])
                await rig.wait_up(boot + 1)
                # the relays' state at the next boot: each relay pin's first write
                first: dict[int, int] = {}
                for _, b, pin, lv in rig.pin_log:
                    if b == boot + 1 and pin in relay_pins:
                        first.setdefault(pin, lv)
                assert set(first) == relay_pins, first
                if tripped:
                    assert all(lv != active[p] for p, lv in first.items()), first  # the reboot kept the shed
                    kept += 1
                else:
                    lost += 1
            print(f"power cuts after a relay opened: {kept} kept the trip, {lost} hit the state write itself")
            assert kept >= 2 and lost >= 1, (kept, lost)  # both sides of the write were hit

    asyncio.run(main())


def test_switch_over_survives_a_power_cut_at_every_point(tmp_path):
    """provision's switch-over with each rename slowed to 150 ms, the board SIGKILLed at points
    through it: after the reboot config and key are both the old ones or both the new ones (a
    committed plan is finished at boot), never missing, and the agent runs."""
    async def main() -> None:
        async with Site(tmp_path, slow_fs_ms=150) as s:
            rig = s.rig
            from gridshed.provision import provision

            seen: set[str] = set()
            for k, delay in enumerate((0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)):
                old = files(s.dir)
                old_kid = kid_on_board(s.dir)
                boot = rig.boot
                killed: dict[str, Any] = {}

                def step(msg: str) -> None:
                    if msg == "switching over":
                        killed["t"] = time.monotonic() + delay

                def run() -> None:
                    try:
                        provision(s.port, s.site2 if k % 2 == 0 else s.site, inventory_path=s.inv, progress=step)
                    except Exception as e:
                        killed["error"] = str(e)

                task = asyncio.create_task(asyncio.to_thread(run))
                while "t" not in killed:
                    assert not task.done(), killed
                    await asyncio.sleep(0.005)
                await asyncio.sleep(max(0.0, killed["t"] - time.monotonic()))
                os.killpg(rig.board.pid, signal.SIGKILL)
                s.caused += 1
                await task
                await rig.wait_up(boot + 1)
                # wait for the host's own restart too (its exec saw the board reset)
                await asyncio.sleep(0.5)
                st = await status(rig)
                new = files(s.dir)
                assert None not in new
                if new == old:
                    seen.add("old")
                    assert kid_on_board(s.dir) == old_kid
                else:
                    seen.add("new")
                    assert new[0] != old[0] and new[1] != old[1], (old, new)  # both moved together
                assert st["config_hash"] == new[0][:16]
                assert not (s.dir / "switch-plan.json").exists()  # staged files without a plan: never used
                s.caused = rig.board.restarts  # the host's own restarts after the error count too
            assert seen == {"old", "new"}, seen

    asyncio.run(main())


def test_a_committed_plan_is_finished_at_boot(tmp_path):
    """The power cut right after the commit (plan in place, staged files verified): the next boot
    renames them in, journals `switched`, and runs the new config and key."""
    async def main() -> None:
        async with Site(tmp_path) as s:
            cfg = siteconfig.load_site(s.site2)
            new_cfg = siteconfig.config_bytes(cfg)
            new_keys = siteconfig.keys_bytes({b"\x01" * 8: b"\x02" * 32})
            d = s.dir
            (d / "config.cbor.gsnew").write_bytes(new_cfg)
            (d / "keys.cbor.gsnew").write_bytes(new_keys)
            # a torn staged file without a plan is never used
            (d / "build.json.gsnew").write_bytes(b"{\"torn")
            plan = {"renames": [["config.cbor.gsnew", "config.cbor", hashlib.sha256(new_cfg).hexdigest()],
                                ["keys.cbor.gsnew", "keys.cbor", hashlib.sha256(new_keys).hexdigest()]],
                    "removes": []}
            (d / "switch-plan.json").write_text(json.dumps(plan))
            await s.kill()
            st = await status(s.rig)
            assert (d / "config.cbor").read_bytes() == new_cfg and (d / "keys.cbor").read_bytes() == new_keys
            assert st["config_hash"] == hashlib.sha256(new_cfg).hexdigest()[:16]
            assert not (d / "switch-plan.json").exists() and (d / "build.json.gsnew").exists()
            boot = [r for r in s.rig.journal()[0] if r["k"] == "boot"][-1]
            assert boot["switched"] == 2
            (d / "build.json.gsnew").unlink()

    asyncio.run(main())


# ---- telemetry: a console stop drops the MQTT session at once (the broker says offline) ----------
def test_console_stop_is_seen_on_mqtt_at_once(tmp_path, agent_build):  # noqa: F811 (fixture)
    """With [mqtt] on, Ctrl-C makes the board drop its session without DISCONNECT: the broker
    publishes its last will ("online": false) right away, not after 1.5 keepalives (90 s here);
    the restarted agent comes back online. The fleet channel's heap: test_fleet.py (84wK)."""
    from mosquitto_broker import Mosquitto
    from test_fleet import HEAP as FLEET_HEAP, Watch
    from test_signed_commands import Meter, Rig as CmdRig, site_config

    broker = Mosquitto(tmp_path).start()
    meter = Meter(site_config()["meter"]["map"])
    cfg = site_config(meter_port=meter.port, extra={
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port, "keepalive_s": 60, "telemetry_s": 1.0},
        "maintenance": {"window_s": 60.0}})
    rig = CmdRig(tmp_path, agent_build, cfg, tmp_path / "inv.sqlite", heap=FLEET_HEAP).start()
    topic = f"gridshed/{cfg['site']}/{cfg['device']}/state"
    watch = Watch(broker.port, [topic])
    try:
        rig.wait_up(120)
        assert watch.wait(lambda: (watch.last.get(topic) or {}).get("online") is True, 60), watch.last
        with Board(rig.board.port) as b:
            with b.stopped():
                # within 20 s: long before the broker's own keepalive timeout would say it (90 s)
                assert watch.wait(lambda: watch.last[topic].get("online") is False, 20), watch.last[topic]
                # this site keeps the default 300 s window; a host tool holds only a short lease
                # (a host gone now would leave protection off LEASE_S, not 300 s)
                from gridshed.transport import LEASE_S

                assert b.maint_left == LEASE_S < 300
        assert b.outcome == "agent restarted: it answers @status (state normal)", b.outcome
        assert watch.wait(lambda: watch.last[topic].get("online") is True, 60), watch.last[topic]
        check_board(rig.board, restarts=1)
    finally:
        watch.close()
        rig.stop()
        meter.stop()
        broker.stop()
