"""Journal export (gridshed.events) and utility reports (gridshed.report) from synthetic journals.

The journal files are made with the firmware's own encoder (agent.journal_host.encode_record) and the
capture with the firmware's own disturbance recorder (agent.journal_recorder.Recorder), both run by
CPython: the same files a board writes. A torn tail and a corrupt middle record are included.
"""
from __future__ import annotations

import base64
import json
import math
import re
import struct
from pathlib import Path

import pytest

from agent import cbor
from agent.journal_host import decode_capture, encode_record
from agent.journal_recorder import Recorder
from gridshed import events as evmod
from gridshed.cli import main
from gridshed.report import evidence_from_events, evidence_from_sim, report, report_from_sim

BLOCKS = [("row-a", 132.0), ("row-b", 132.0), ("row-c", 105.0)]
PICKUP, RESTORE = 59.7, 59.9
T_WALL = 1795000000.0  # unix seconds at ms = 0
TRIP_DELAY_MS = 100    # trip.delay_ms: the relay opens 100 ms after the first sample below pickup
TICKS_PERIOD = 1 << 30  # a board's ticks_ms period


def site_config() -> dict:
    return {"v": 1, "site": "west-texas-7", "device": "ctl-3", "board": "unix-sim", "nominal_hz": 60,
            "meter": {"poll_ms": 50},
            "trip": {"pickup_hz": PICKUP, "delay_ms": TRIP_DELAY_MS, "samples": 1, "restore_hz": RESTORE,
                     "restore_hold_s": 2.0, "min_off_s": 5.0},
            "blocks": [{"name": n, "pins": [i + 2], "active": 1, "miners": 40, "kw_per_miner": kw / 40,
                        "priority": i} for i, (n, kw) in enumerate(BLOCKS)]}


def hz_at(ms: int) -> float:
    """A dip: 60 Hz, falls through the pickup at 5.0 s, bottoms at 59.55, recovers from 7 s."""
    s = ms / 1000.0
    if s < 4.0:
        return 60.0 + 0.005 * math.sin(s * 7)
    if s < 5.5:
        return 60.0 - (s - 4.0) * 0.3
    if s < 7.0:
        return 59.55
    return min(60.0, 59.55 + (s - 7.0) * 0.15)


def synthetic_journal(shift: int = 0) -> tuple[list[dict], dict]:
    """Records as the agent writes them for a dip: boot, pickup, trip, restores, a capture.

    shift: added to the board's uptime ms, modulo a board's ticks period (2**30): with a shift
    just below 2**30 the dip happens while ticks_ms wraps around (12.4 days after boot)."""
    rec = Recorder(pre_s=2.0, post_s=4.0, poll_ms=50)
    full = 0b111
    records: list[dict] = []
    n = 0

    def add(ms: int, k: str, **f) -> None:
        nonlocal n
        n += 1
        d = {"n": n, "t": T_WALL + ms / 1000.0, "ms": (ms + shift) % TICKS_PERIOD, "k": k}
        d.update(f)
        records.append(d)

    add(1000, "boot", build="abc123", resumed_trip=False, mask=full)
    add(1200, "cmd_refused", src="udp", why="replay", kid="0042", detail={"cseq": 7, "last": [1, 2]})
    mask = full
    first_below = trip_ms = None
    restore_at = {14000: 0b100, 15500: 0b110, 17000: 0b111}
    kw_hist: list[float] = []
    captured = False
    for ms in range(1000, 20001, 50):
        hz = hz_at(ms)
        if hz < PICKUP and first_below is None:
            first_below = ms
            add(ms, "ctl", ev="pickup_start", hz=hz, kw=369.0, mask=mask, reason="underfrequency")
        if first_below is not None and trip_ms is None and ms - first_below >= TRIP_DELAY_MS:
            trip_ms = ms
            mask = 0
            add(ms, "ctl", ev="trip_uf", hz=hz, kw=369.0, mask=mask, reason="underfrequency")
            rec.trigger((ms + shift) % TICKS_PERIOD)
        if ms in restore_at:
            mask = restore_at[ms]
            add(ms, "ctl", ev="restore_block", hz=hz, kw=kw_hist[-1], mask=mask, reason="underfrequency")
            if mask == full:
                add(ms, "ctl", ev="restore_done", hz=hz, kw=kw_hist[-1], mask=mask, reason="underfrequency")
        # the meter lags two polls behind the relays
        kw = sum(kw for i, (_, kw) in enumerate(BLOCKS) if mask >> i & 1)
        kw_hist.append(kw)
        seen_kw = kw_hist[-3] if len(kw_hist) >= 3 else kw_hist[0]
        rec.add((ms + shift) % TICKS_PERIOD, hz, seen_kw, mask)
        if not captured and rec.ready((ms + shift) % TICKS_PERIOD):
            add(ms, "capture", **rec.capture((ms + shift) % TICKS_PERIOD))
            captured = True
    assert captured and first_below is not None and trip_ms is not None
    return records, {"first_below": first_below, "trip_ms": trip_ms}


def write_board_dir(d: Path, records: list[dict], torn: bool = True, corrupt_seq: int | None = None) -> None:
    """Records spread over journal.3 and journal.4 (older segments rotated away), config.cbor."""
    d.mkdir(parents=True, exist_ok=True)
    half = len(records) // 2
    for name, part in (("journal.3", records[:half]), ("journal.4", records[half:])):
        data = bytearray()
        for r in part:
            b = bytearray(encode_record(r))
            if r["n"] == corrupt_seq:
                b[len(b) // 2] ^= 0x55  # flipped byte: CRC mismatch
            data += b
        if torn and name == "journal.4":
            data += encode_record({"n": 999, "t": None, "ms": 1, "k": "ctl", "ev": "x"})[:9]  # power cut mid-write
        (d / name).write_bytes(bytes(data))
    (d / "journal.tmp.bak").write_bytes(b"not a segment")
    (d / "config.cbor").write_bytes(cbor.dumps(site_config()))


@pytest.fixture(scope="module")
def journal() -> tuple[list[dict], dict]:
    return synthetic_journal()


@pytest.fixture
def board_dir(tmp_path, journal) -> Path:
    d = tmp_path / "board"
    write_board_dir(d, journal[0])
    return d


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def strip_none(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if v is not None or k in ("n", "t", "ms", "k")} for r in recs]


# ---- reading ------------------------------------------------------------------------------------
def test_load_dir_reads_segments_in_order_and_drops_torn_tail(board_dir, journal):
    recs, _ = journal
    ev = evmod.load_dir(board_dir)
    assert [r["n"] for r in ev.records] == [r["n"] for r in recs]
    assert ev.records == recs  # bytes fields (the capture) come back as bytes
    assert [e["reason"] for e in ev.errors] == ["torn"] and ev.errors[0]["file"] == "journal.4"
    assert ev.site == "west-texas-7" and ev.device == "ctl-3" and ev.config["trip"]["pickup_hz"] == PICKUP
    # --since filters; a corrupt middle record is skipped and reported, the rest survive
    assert [r["n"] for r in evmod.load_dir(board_dir, since=len(recs) - 2).records] == [len(recs) - 1, len(recs)]
    bad = board_dir.parent / "bad"
    write_board_dir(bad, recs, torn=False, corrupt_seq=2)
    ev2 = evmod.load_dir(bad)
    assert [r["n"] for r in ev2.records] == [r["n"] for r in recs if r["n"] != 2]
    assert [e["reason"] for e in ev2.errors] == ["crc"]


def test_events_cli_dir_listing_and_torn_warning(board_dir, capsys):
    rc, out, err = cli(capsys, "events", "--dir", str(board_dir))
    assert rc == 0
    assert "trip_uf" in out and "restore_done" in out and "capture" in out
    assert "torn tail" in err and "journal.4" in err


# ---- CSV / JSON ----------------------------------------------------------------------------------
def test_csv_columns_and_round_trip(journal, tmp_path, capsys, board_dir):
    recs, _ = journal
    text = evmod.to_csv(recs)
    head = text.splitlines()[0].split(",")
    assert head[:4] == ["n", "t", "ms", "kind"]
    assert {"ev", "hz", "kw", "mask", "reason", "smp.b64", "t0", "detail.cseq", "detail.last"} <= set(head)
    assert len(text.splitlines()) == 1 + len(recs)  # one row per record
    back = evmod.from_csv(text)
    assert back == strip_none(recs)
    # numeric-looking text stays text, lists stay lists
    refused = next(r for r in back if r["k"] == "cmd_refused")
    assert refused["kid"] == "0042" and refused["detail"] == {"cseq": 7, "last": [1, 2]}
    # the CLI writes the same file
    out = tmp_path / "ev.csv"
    rc, o, _ = cli(capsys, "events", "--dir", str(board_dir), "-o", str(out))
    assert rc == 0 and f"{len(recs)} records" in o
    assert evmod.read_file(out).records == strip_none(recs)


def test_csv_samples_expand_captures(journal):
    recs, _ = journal
    cap = next(r for r in recs if r["k"] == "capture")
    samples = decode_capture(cap)
    text = evmod.to_csv(recs, samples=True)
    rows = list(__import__("csv").DictReader(text.splitlines()))
    srows = [r for r in rows if r["kind"] == "sample"]
    assert len(srows) == len(samples) > 100
    assert all(r["n"] == str(cap["n"]) for r in srows)
    assert [int(r["ms"]) for r in srows] == [s[0] for s in samples]
    assert min(float(r["hz"]) for r in srows) == pytest.approx(59.55, abs=0.002)
    # sample wall time derived from the capture's own t/ms
    s0 = srows[0]
    assert float(s0["t"]) == pytest.approx(T_WALL + int(s0["ms"]) / 1000.0, abs=0.002)
    assert evmod.from_csv(text) == strip_none(recs)  # sample rows are ignored on the way back


def test_json_round_trip(board_dir, tmp_path, capsys, journal):
    recs, _ = journal
    out = tmp_path / "ev.json"
    rc, _, _ = cli(capsys, "events", "--dir", str(board_dir), "--samples", "-o", str(out))
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "gridshed-events" and doc["site"] == "west-texas-7" and doc["last_seq"] == len(recs)
    cap = next(r for r in doc["records"] if r["k"] == "capture")
    assert set(cap["smp"]) == {"b64"} and len(cap["samples"]) == len(decode_capture(next(
        r for r in recs if r["k"] == "capture")))
    ev = evmod.read_file(out)
    assert ev.records == recs and ev.config["trip"]["restore_hz"] == RESTORE
    assert [e["reason"] for e in ev.errors] == ["torn"]


def test_bad_inputs_one_line_errors(tmp_path, capsys, board_dir):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    (tmp_path / "y.csv").write_text("a,b\n1,2\n")
    (tmp_path / "z.json").write_text("{not json")
    cases = [("report", str(tmp_path / "x.json"), "-o", str(tmp_path / "r.png")),
             ("report", str(tmp_path / "y.csv"), "-o", str(tmp_path / "r.png")),
             ("report", str(tmp_path / "z.json"), "-o", str(tmp_path / "r.png")),
             ("report", str(board_dir), "-o", str(tmp_path / "r.pdf")),
             ("events", "--dir", str(board_dir), "-o", str(tmp_path / "e.txt")),
             ("events", "--dir", str(tmp_path), "-o", str(tmp_path / "e.csv")),
             ("events", "--dir", str(board_dir), "--since", "-1")]
    for argv in cases:
        rc, _, err = cli(capsys, *argv)
        assert rc == 2, argv
        assert err.startswith("gridshed: error:") and len(err.strip().splitlines()) == 1, (argv, err)


def test_state_file_remembers_last_seq_per_device(tmp_path):
    st = tmp_path / "state.json"
    assert evmod.get_last_seq(st, "s", "d") is None
    evmod.save_state(st, evmod.EventSet([{"n": 7, "t": None, "ms": 0, "k": "boot"}], "port:x", site="s", device="d"))
    evmod.save_state(st, evmod.EventSet([], "port:y", site="s", device="e", since=3))
    assert evmod.get_last_seq(st, "s", "d") == 7 and evmod.get_last_seq(st, "s", "e") == 3
    st.write_text("garbage")
    with pytest.raises(evmod.UserError, match="state file"):
        evmod.get_last_seq(st, "s", "d")


# ---- report --------------------------------------------------------------------------------------
def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_annotations_from_journal(board_dir, journal, tmp_path, capsys):
    recs, marks = journal
    e = evidence_from_events(evmod.load_dir(board_dir))
    assert len(e.trips) == 1
    t = e.trips[0]
    assert t.cause == "underfrequency" and t.t_open == 0.0
    assert t.response_ms == TRIP_DELAY_MS  # first sample below pickup -> relay open
    assert t.t_trigger == pytest.approx((marks["first_below"] - marks["trip_ms"]) / 1000.0)
    assert t.kw_before == 369.0 and t.kw_after == 0.0 and t.kw_shed == 369.0
    assert [r.block for r in e.restores] == ["row-c", "row-b", "row-a"]
    assert [round(r.t, 3) for r in e.restores] == [round((ms - marks["trip_ms"]) / 1000, 3) for ms in (14000, 15500, 17000)]
    assert e.dense and len(e.trace) > 100 and e.final_mask == 0b111
    assert e.trips[0].when.startswith("2026-")

    png = tmp_path / "report.png"
    rc, out, _ = cli(capsys, "report", str(board_dir), "-o", str(png))
    assert rc == 0 and f"response {TRIP_DELAY_MS} ms" in out and "369.0 kW shed" in out
    w, h = png_size(png.read_bytes())
    assert 1000 <= w <= 2000 and 700 <= h <= 1400
    assert 30_000 < png.stat().st_size < 600_000

    page = tmp_path / "report.html"
    rc, out, _ = cli(capsys, "--debug", "report", str(board_dir), "-o", str(page), "--json")
    assert rc == 0 and json.loads(out)["trips"][0]["response_ms"] == TRIP_DELAY_MS
    text = page.read_text()
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert m, "no embedded PNG"
    assert png_size(base64.b64decode(m.group(1)))[0] >= 1000
    for needle in ("west-texas-7", "ctl-3", "pickup 59.7 Hz, restore 59.9 Hz", f"response {TRIP_DELAY_MS} ms",
                   "369.0 kW before", "0.0 kW after = 369.0 kW shed",
                   f"row-c at {(14000 - marks['trip_ms']) / 1000:.2f} s", f"row-a at {(17000 - marks['trip_ms']) / 1000:.2f} s",
                   "trip_uf (underfrequency)", "restore_done", "capture: ", "all blocks closed"):
        assert needle in text, needle
    assert text.count("<tr>") >= len(recs)


def test_report_without_capture_or_config_still_works(tmp_path, journal):
    recs = [r for r in journal[0] if r["k"] != "capture"]
    d = tmp_path / "b"
    write_board_dir(d, recs, torn=False)
    (d / "config.cbor").unlink()
    e = report(d, tmp_path / "r.html")
    assert not e.dense and e.pickup_hz is None and e.blocks == ["block0", "block1", "block2"]
    assert e.trips[0].response_ms == TRIP_DELAY_MS  # from the pickup_start record
    assert any("no disturbance capture" in n for n in e.notes)
    assert any("no site config" in n and "gridshed report ... --site site.toml" in n for n in e.notes)
    assert (tmp_path / "r.html").stat().st_size > 20_000


def test_report_from_sim_summary(tmp_path):
    """A summary as gridshed.sim.summary.summarize() makes it (with the trace key)."""
    trace = [[round(t * 0.05, 2), hz_at(int(t * 50) + 1000), 369.0 if t * 0.05 < 4.2 else 0.0] for t in range(0, 300)]
    s = {"scenario": "dip", "duration_s": 15, "pickup_hz": PICKUP, "restore_hz": RESTORE, "transport": "rtu",
         "baud": 19200, "polls": 300, "unanswered_polls": 0,
         "trips": [{"cause": "under-frequency", "crossing_s": 4.0667, "meter_update_s": 4.1, "poll_s": 4.12,
                    "relay_open_s": 4.15, "latency_ms": 83.3, "latency_from_meter_ms": 50.0, "latency_from_poll_ms": 30.0}],
         "kw_before": 369.0, "kw_after": 0.0, "kw_shed": 369.0,
         "restores": [{"t_s": 12.0, "block": "row-c"}, {"t_s": 13.5, "block": "row-b"}],
         "transitions": [{"t_s": 4.15, "block": b, "state": "open"} for b in ("row-a", "row-b", "row-c")]
         + [{"t_s": 12.0, "block": "row-c", "state": "closed"}, {"t_s": 13.5, "block": "row-b", "state": "closed"}],
         "opens_per_block": {"row-a": 1, "row-b": 1, "row-c": 1}, "closed_at_end": ["row-b", "row-c"],
         "all_restored": False, "trace": trace, "board_status": {"site": "demo-site", "device": "ctl-1"}}
    e = evidence_from_sim(s)
    assert e.masks[0][1] == 0b111 and e.final_mask == 0b110
    # the headline is the console's first figure and names its reference point (the crossing)
    assert e.trips[0].response_ms == 83.3 and e.trips[0].t_trigger == 4.0667
    e = report_from_sim(s, tmp_path / "sim.html")
    text = (tmp_path / "sim.html").read_text()
    assert "response 83 ms from frequency crossing 59.7 Hz" in text and "30 ms after the poll" in text
    assert "closed: row-b, row-c" in text and "demo-site" in text
    report_from_sim(s, tmp_path / "sim.png")
    assert png_size((tmp_path / "sim.png").read_bytes())[0] >= 1000


def test_report_from_csv_with_site_file(board_dir, tmp_path, capsys):
    csv_out = tmp_path / "ev.csv"
    assert cli(capsys, "events", "--dir", str(board_dir), "-o", str(csv_out))[0] == 0
    page = tmp_path / "r.html"
    rc, _, err = cli(capsys, "report", str(csv_out), "--site", str(Path(__file__).parents[2] / "scenarios" / "demo-site.toml"),
                     "-o", str(page))
    assert rc == 0, err
    text = page.read_text()
    assert "pickup 59.7 Hz, restore 59.9 Hz" in text and "demo-site" in text and "row-a" in text


def test_report_from_an_incomplete_pull_says_so(tmp_path, journal, capsys):
    """A pull that stopped early (complete: false) or lost records never states an end state."""
    recs = journal[0]
    last_restore = max(r["n"] for r in recs if r.get("ev") == "restore_block")
    cut = [r for r in recs if r["n"] < last_restore]   # the pull stopped before the last restore
    doc = evmod.to_document(evmod.EventSet(cut, source="port:/dev/pts/9", config=site_config(), complete=False))
    f = tmp_path / "partial.json"
    f.write_text(json.dumps(doc))
    page = tmp_path / "r.html"
    rc, out, err = cli(capsys, "report", str(f), "-o", str(page))
    assert rc == 0 and "warning: incomplete records: the pull stopped after" in err
    text = page.read_text()
    assert "INCOMPLETE" in text and "end state is unknown" in text
    assert "all blocks closed" not in text and "closed: row-b, row-c" not in text
    # records missing in the middle (a hole in the sequence numbers)
    holed = [r for r in recs if r["n"] != 3]
    e = evidence_from_events(evmod.EventSet(holed, source="x", config=site_config()))
    assert e.final_mask is None and any("1 records missing" in w and "seq 3" in w for w in e.incomplete)
    # the complete journal states the end state
    whole = evidence_from_events(evmod.EventSet(recs, source="x", config=site_config()))
    assert whole.incomplete == [] and whole.final_mask == 0b111


# ---- a dip while the board's ticks_ms wraps (12.4 days of uptime) ----------------------------------
def test_report_and_csv_across_a_ticks_wrap(tmp_path, journal):
    """The same dip journaled 12.4 days after boot, the board's ticks_ms wrapping between the trip
    and the restores (and inside the capture window): the report and the CSV say the same as
    for the dip journaled without the wrap."""
    recs, marks = journal
    shift = TICKS_PERIOD - marks["trip_ms"] - 2000  # the wrap 2 s after the relay opened
    wrecs, wmarks = synthetic_journal(shift)
    ms = [r["ms"] for r in wrecs]
    assert any(b < a for a, b in zip(ms, ms[1:])), "the shifted journal never wrapped"
    d = tmp_path / "wrapped"
    write_board_dir(d, wrecs, torn=False)
    e = evidence_from_events(evmod.load_dir(d))
    ref_dir = tmp_path / "plain"
    write_board_dir(ref_dir, recs, torn=False)
    ref = evidence_from_events(evmod.load_dir(ref_dir))
    assert len(e.trips) == 1 and e.trips[0].response_ms == TRIP_DELAY_MS
    assert e.trips[0].t_trigger == pytest.approx(ref.trips[0].t_trigger)
    assert [(r.block, round(r.t, 3)) for r in e.restores] == [(r.block, round(r.t, 3)) for r in ref.restores]
    assert [r.t for r in e.restores] == [pytest.approx((m - marks["trip_ms"]) / 1000) for m in (14000, 15500, 17000)]
    assert [(round(t, 3), hz) for t, hz, _ in e.trace] == [(round(t, 3), hz) for t, hz, _ in ref.trace]
    assert e.masks == ref.masks and e.final_mask == 0b111
    # CSV: sample rows carry the wall time of the plain journal's samples
    rows = [r for r in evmod.to_rows(wrecs, samples=True) if r["kind"] == "sample"]
    ref_rows = [r for r in evmod.to_rows(recs, samples=True) if r["kind"] == "sample"]
    assert [r["t"] for r in rows] == [r["t"] for r in ref_rows] and len(rows) > 100


def test_a_shed_command_is_reported_as_a_command(tmp_path):
    """A signed shed holds its own shed entry: the journal says signal_on / trip_signal right
    after the accepted command; the report names the command as the cause, not a utility signal."""
    recs = [{"n": 1, "t": T_WALL, "ms": 1000, "k": "boot", "mask": 0b111},
            {"n": 2, "t": T_WALL + 4, "ms": 5000, "k": "cmd", "cmd": "shed", "seq": 9, "src": "serial"},
            {"n": 3, "t": T_WALL + 4, "ms": 5001, "k": "ctl", "ev": "signal_on", "hz": 60.0, "kw": 369.0, "mask": 0b111,
             "reason": "signal"},
            {"n": 4, "t": T_WALL + 4, "ms": 5002, "k": "ctl", "ev": "trip_signal", "hz": 60.0, "kw": 369.0, "mask": 0,
             "reason": "signal"}]
    e = evidence_from_events(evmod.EventSet(recs, source="x", config=site_config()))
    assert [(t.cause, t.trigger_label, t.response_ms) for t in e.trips] == [("command", "shed command accepted", 2.0)]
    # a dry-contact signal (no command before it) stays a utility signal
    sig = [recs[0]] + [dict(r, n=r["n"] - 1) for r in recs[2:]]
    e = evidence_from_events(evmod.EventSet(sig, source="x", config=site_config()))
    assert e.trips[0].cause == "signal"
