"""Pulling the event journal off a board and exporting it (docs/journal.md, "Pulling the journal").

Two sources, one result (:class:`EventSet`):

* a running board, through the agent's console protocol (``@status``, ``@config``,
  ``@events <since>``) without stopping it: :func:`pull`;
* a directory holding ``journal.<i>`` segment files (a board filesystem image, ``gridshed sim
  --keep DIR``, files copied with mpremote): :func:`load_dir`, parsed with the firmware's own
  ``agent.journal_host.parse_stream``.

Exports: CSV (one row per record, columns ``n,t,ms,kind`` then the flattened fields; capture
records optionally followed by one ``sample`` row per recorded meter sample) and JSON (the
records as ``agent.journal_read.jsonable`` makes them, plus where they came from and the site
config's trip settings, so a report can be drawn from the file alone). Both read back losslessly
(:func:`read_file`), except that a CSV cannot tell a missing field from a null one.

Incremental pulls: the highest sequence number pulled from each device is kept in a small JSON
state file (:func:`default_state_path`), so the next pull asks only for newer records.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

FORMAT = "gridshed-events"
VERSION = 1
STATE_ENV = "GRIDSHED_EVENTS_STATE"
CORE = ("n", "t", "ms", "kind")
# field columns that come first when present (the rest follow in first-seen order)
PREFERRED = ("ev", "reason", "hz", "kw", "mask", "src", "cmd", "why")
# config keys a report needs (the rest of the site config stays on the board)
CONFIG_KEYS = ("site", "device", "board", "nominal_hz", "trip", "blocks", "failsafe", "capture")


@dataclass
class EventSet:
    """Journal records (body dicts as the board reads them, bytes fields as bytes) and context."""

    records: list[dict[str, Any]]
    source: str
    site: str | None = None
    device: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    since: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    pulled_at: str | None = None
    board_seq: int | None = None      # the board's journal seq at pull time (console pulls)
    complete: bool = True             # False: the board stopped answering midway

    @property
    def last_seq(self) -> int:
        return max((r["n"] for r in self.records), default=self.since)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def slim_config(cfg: Any) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {}
    out: dict[str, Any] = {k: cfg[k] for k in CONFIG_KEYS if k in cfg}
    if isinstance(cfg.get("meter"), dict) and "poll_ms" in cfg["meter"]:
        out["meter"] = {"poll_ms": cfg["meter"]["poll_ms"]}
    return out


# ---------------------------------------------------------------------------------------------
# Sources


def _read_config_file(path: Path) -> dict[str, Any]:
    from agent import cbor

    from .siteconfig import read_settings

    try:
        raw = path.read_bytes()
        try:
            obj = read_settings(raw)
        except ValueError:  # a folder pulled from an older board: a bare CBOR config (labels only)
            obj = cbor.loads(raw)
    except (OSError, ValueError):
        return {}
    return slim_config(obj)


def load_dir(path: str | os.PathLike, since: int = 0, prefix: str = "journal") -> EventSet:
    """Every record with n > since from the segment files in `path`, oldest first."""
    from agent.journal import segment_index
    from agent.journal_host import parse_stream

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (give the board filesystem, e.g. the one `gridshed sim --keep` made)")
    segs = sorted((k, p) for p in root.iterdir()
                  if p.is_file() and (k := segment_index(p.name, prefix)) is not None)
    if not segs:
        raise UserError(f"{root}: no journal segment files ({prefix}.0, {prefix}.1, ...) in this directory")
    records: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for _, p in segs:
        recs, errs = parse_stream(p.read_bytes())
        records.extend(recs)
        errors.extend({"file": p.name, "offset": off, "bytes": nb, "reason": why} for off, nb, why in errs)
    records.sort(key=lambda r: r["n"])
    records = [r for r in records if r["n"] > since]
    cfg = _read_config_file(root / "config.cbor")
    return EventSet(records, source=f"dir:{root}", site=cfg.get("site"), device=cfg.get("device"),
                    config=cfg, since=since, errors=errors, pulled_at=_now_iso())


def pull(port: str, since: int | None = None, state_path: Path | None = None, timeout: float = 60.0,
         warn: Callable[[str], None] | None = None) -> EventSet:
    """Records from the agent running on `port`, through its console, without stopping it.

    since None: the records newer than the last pull from this device (state file), all of them
    the first time. The state file is not updated here (see :func:`save_state`): only once the
    caller has written the records somewhere.
    """
    from .transport import Console

    say = warn or (lambda s: None)

    def ask(con: Console, verb: str, tries: int) -> dict[str, Any]:
        # a small board can run short of memory for one answer (heap fragmentation): try again
        last: dict[str, Any] = {}
        for i in range(tries):
            ans = con.request(verb, timeout=5.0)
            last = dict(ans[-1])
            if "error" not in last:
                return last
            time.sleep(0.3)
        return last

    with Console(port) as con:
        st = ask(con, "status", 3)
        site, device = st.get("site"), st.get("device")
        board_seq = st.get("journal_seq")
        ans_cfg = ask(con, "config", 2)
        cfg = slim_config(ans_cfg.get("config"))
        if "error" in ans_cfg:
            say(f"the board could not send its config ({ans_cfg['error']}); give the report "
                "the site file with --site for pickup/restore lines and block names")
        site = site or cfg.get("site")
        device = device or cfg.get("device")
        cfg = cfg or {"site": site, "device": device}
        if "error" in st:
            msg = f"{port}: the agent could not answer @status: {st['error']}"
            if site is None and since is None:
                raise UserError(msg + "; pass --since N to pull without knowing the device")
            say(msg)
        mark = None
        if since is None:
            since = 0
            last = get_last_seq(state_path, site, device)
            if last is not None:
                if isinstance(board_seq, int) and board_seq < last:
                    say(f"the board's journal is at seq {board_seq}, below the {last} pulled last time "
                        "(journal erased or board replaced): pulling everything")
                else:
                    since = last
                    mark = get_last_mark(state_path, site, device)
        if mark and since > 0:
            # ask from the record pulled last: still the same one (its kind and uptime)? Another
            # board with this device id, or an erased journal grown past the old seq, is not
            records, errors, complete = _pull_records(con, int(since) - 1, timeout)
            if records and records[0]["n"] == since and _mark(records[0]) != mark:
                say(f"the board's record {since} is not the one pulled last time from {site}/{device} (another "
                    "board with this device id, or its journal was erased): pulling everything")
                since = 0
                records, errors, complete = _pull_records(con, 0, timeout)
            else:
                records = [r for r in records if r["n"] > since]
        else:
            records, errors, complete = _pull_records(con, int(since), timeout)
    return EventSet(records, source=f"port:{port}", site=site, device=device, config=cfg, since=int(since),
                    errors=errors, pulled_at=_now_iso(), board_seq=board_seq, complete=complete)


def _pull_records(con: Any, since: int, timeout: float,
                  tries: int = 3) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """`@events` until the board has sent everything after `since` (records, errors, complete).

    A board short of RAM for one record (a capture record on a fragmented heap) answers an error
    after the records it did send: ask again from the last one received, so one pull gets as far
    as the board can go. The same record failing `tries` times in a row ends the pull with that
    error; the whole pull is bounded by `timeout`.
    """
    from agent.journal_host import from_jsonable

    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    cur, stuck = since, 0
    while True:
        answers = con.request("events", str(cur), timeout=max(1.0, deadline - time.monotonic()))
        got = []
        for a in answers:
            rec = a.get("rec")
            if isinstance(rec, dict) and isinstance(rec.get("n"), int) and rec["n"] > cur:
                got.append(from_jsonable(rec))
        records += got
        last = answers[-1] if answers else {}
        if last.get("ok") and "error" not in last:
            if isinstance(last.get("count"), int) and last["count"] != len(got):
                return records, [{"reason": "count", "detail": f"board sent {last['count']} records, "
                                  f"{len(got)} readable"}], False
            return records, [], True
        stuck = 0 if got else stuck + 1
        cur = got[-1]["n"] if got else cur
        if stuck >= tries or time.monotonic() > deadline:
            return records, [{"reason": "board", "after": cur, "detail": str(last.get("error", last))}], False
        time.sleep(0.3)  # the agent's own work frees what it holds


# ---------------------------------------------------------------------------------------------
# Incremental state: {"devices": {"<site>/<device>": {"last_seq": N, "pulled_at": iso, "port": P}}}


def default_state_path() -> Path:
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("gridshed", appauthor=False)) / "events-state.json"


def _state_key(site: str | None, device: str | None) -> str:
    return f"{site or '-'}/{device or '-'}"


def _load_state(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return {"devices": {}}
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable events state file ({exc}); delete it or pass --since") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("devices"), dict):
        raise UserError(f"{path}: not a gridshed events state file; delete it or pass --since")
    return obj


def get_last_seq(path: Path | None, site: str | None, device: str | None) -> int | None:
    st = _load_state(path or default_state_path())
    ent = st["devices"].get(_state_key(site, device))
    if isinstance(ent, dict) and isinstance(ent.get("last_seq"), int):
        return int(ent["last_seq"])
    return None


def get_last_mark(path: Path | None, site: str | None, device: str | None) -> dict[str, Any] | None:
    """What the last record pulled from the device was ({"k", "ms"}), to know it again."""
    st = _load_state(path or default_state_path())
    ent = st["devices"].get(_state_key(site, device))
    mark = ent.get("mark") if isinstance(ent, dict) else None
    return mark if isinstance(mark, dict) else None


def _mark(rec: dict[str, Any]) -> dict[str, Any]:
    return {"k": rec.get("k"), "ms": rec.get("ms")}


def save_state(path: Path | None, ev: EventSet) -> None:
    """Remember the highest seq pulled from ev's device and what that record was (atomic write)."""
    path = path or default_state_path()
    st = _load_state(path)
    key = _state_key(ev.site, ev.device)
    old = st["devices"].get(key) or {}
    last = ev.last_seq
    top = [r for r in ev.records if r.get("n") == last]
    mark = _mark(top[0]) if top else (old.get("mark") if old.get("last_seq") == last else None)
    st["devices"][key] = {"last_seq": last, "pulled_at": ev.pulled_at, "source": ev.source,
                          "previous": old.get("last_seq"), "mark": mark}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(st, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Export


# A 32-bit board's ticks_ms period (MicroPython: 2**30 ms, 12.4 days): a record's "ms" (uptime)
# starts again from 0 after that. The 64-bit unix port's period (2**62) never wraps in practice.
TICKS_PERIOD = 1 << 30


def ticks_diff(a: int, b: int) -> int:
    """a - b on the board's ticks clock (correct across one wrap; |a - b| < 6.2 days)."""
    d = (a - b) % TICKS_PERIOD
    return d - TICKS_PERIOD if d >= TICKS_PERIOD // 2 else d


def unwrap_ms(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of records (in journal order) whose "ms" never goes back within a boot: uptime
    that wrapped (ticks_ms past 2**30 on a board) gets the period added, and a capture's "t0"
    (its trigger, a little before the record) is moved along with it. A boot record starts a
    new uptime."""
    out = []
    raw_prev = None
    add = 0
    for r in records:
        ms = r.get("ms")
        if r.get("k") == "boot":
            raw_prev, add = None, 0
        if not isinstance(ms, int) or isinstance(ms, bool):
            out.append(r)
            continue
        if raw_prev is not None and ms < raw_prev:
            add += TICKS_PERIOD
        raw_prev = ms
        if add == 0 and not (r.get("k") == "capture" and isinstance(r.get("t0"), int)):
            out.append(r)
            continue
        r = dict(r, ms=ms + add)
        if r.get("k") == "capture" and isinstance(r.get("t0"), int):
            r["t0"] = r["ms"] + ticks_diff(r["t0"], ms)
        out.append(r)
    return out


def capture_samples(rec: dict[str, Any]) -> list[tuple[int, float | None, float, int]]:
    """(ms, hz or None, kw, mask) per sample of a capture record ([] when undecodable)."""
    from agent.journal_host import decode_capture

    try:
        return decode_capture(rec)
    except ValueError:
        return []


def _finite(x: Any) -> Any:
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def sample_rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """A capture's samples as flat rows: n (the capture's), t (derived), ms, kind "sample", hz, kw, mask."""
    rows = []
    t, ms = rec.get("t"), rec.get("ms")
    for sms, hz, kw, mask in capture_samples(rec):
        st = None
        if isinstance(t, (int, float)) and isinstance(ms, int):
            st = round(t + ticks_diff(sms, ms) / 1000.0, 3)  # the uptime may wrap within a capture
        rows.append({"n": rec["n"], "t": st, "ms": sms, "kind": "sample",
                     "hz": None if hz is None else round(hz, 3), "kw": _finite(round(kw, 3)), "mask": mask})
    return rows


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            nxt = d.get(p)
            if not isinstance(nxt, dict):
                nxt = d[p] = {}
            d = nxt
        d[parts[-1]] = v
    return out


def record_row(rec: dict[str, Any]) -> dict[str, Any]:
    """One CSV row of a record: core columns, then its fields flattened (a.b for nested maps)."""
    from agent.journal_read import jsonable

    j = jsonable(rec)
    row: dict[str, Any] = {"n": j.get("n"), "t": j.get("t"), "ms": j.get("ms"), "kind": j.get("k")}
    rest = {k: v for k, v in j.items() if k not in ("n", "t", "ms", "k")}
    row.update(flatten(rest))
    return row


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # a text that would read back as another type is written as a JSON string
        if v and (v[0] in "-0123456789\"[{" or v in ("true", "false", "null")):
            try:
                json.loads(v)
            except ValueError:
                return v
            return json.dumps(v)
        return v
    return json.dumps(v, separators=(",", ":"))


def _uncell(s: str) -> Any:
    if s == "":
        return None
    if s[0] in "-0123456789\"[{" or s in ("true", "false", "null"):
        try:
            return json.loads(s)
        except ValueError:
            return s
    return s


def to_rows(records: list[dict[str, Any]], samples: bool = False) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        rows.append(record_row(r))
        if samples and r.get("k") == "capture":
            rows.extend(sample_rows(r))
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k in row:
            seen.setdefault(k, None)
    rest = [k for k in PREFERRED if k in seen] + [k for k in seen if k not in CORE and k not in PREFERRED]
    return list(CORE) + rest


def to_csv(records: list[dict[str, Any]], samples: bool = False) -> str:
    rows = to_rows(records, samples)
    cols = columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in cols])
    return buf.getvalue()


def from_csv(text: str) -> list[dict[str, Any]]:
    """Records back from to_csv() output (sample rows are skipped: the capture row has them all)."""
    from agent.journal_host import from_jsonable

    rd = csv.reader(io.StringIO(text))
    try:
        head = next(rd)
    except StopIteration:
        raise UserError("empty CSV file") from None
    if head[:4] != list(CORE):
        raise UserError(f"not a gridshed events CSV (columns {', '.join(head[:4])}; expected n,t,ms,kind)")
    out = []
    for lineno, cells in enumerate(rd, start=2):
        if not cells:
            continue
        flat: dict[str, Any] = {}
        for col, s in zip(head, cells):
            v = _uncell(s)
            if v is not None or col in ("n", "t", "ms", "kind"):
                flat[col] = v
        if flat.get("kind") == "sample":
            continue
        if not isinstance(flat.get("n"), int):
            raise UserError(f"CSV line {lineno}: column n is not a sequence number")
        rec = {"n": flat.pop("n"), "t": flat.pop("t"), "ms": flat.pop("ms"), "k": flat.pop("kind")}
        rec.update(from_jsonable(unflatten(flat)))
        out.append(rec)
    return out


def to_document(ev: EventSet, samples: bool = False) -> dict[str, Any]:
    """The JSON export: records as jsonable() makes them (bytes as {"b64": ...}) plus context."""
    from agent.journal_read import jsonable

    recs = []
    for r in ev.records:
        j = jsonable(r)
        if samples and r.get("k") == "capture":
            j["samples"] = [[ms, hz, _finite(kw), mask] for ms, hz, kw, mask in capture_samples(r)]
        recs.append(j)
    return {"format": FORMAT, "version": VERSION, "source": ev.source, "site": ev.site, "device": ev.device,
            "pulled_at": ev.pulled_at, "since": ev.since, "last_seq": ev.last_seq, "complete": ev.complete,
            "config": jsonable(ev.config), "errors": ev.errors, "records": recs}


def from_document(doc: Any, source: str = "json") -> EventSet:
    from agent.journal_host import from_jsonable

    if isinstance(doc, list):  # a bare list of records
        doc = {"records": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise UserError(f"{source}: not a gridshed events file (no \"records\" list)")
    if doc.get("format", FORMAT) != FORMAT:
        raise UserError(f"{source}: format {doc.get('format')!r} is not {FORMAT}")
    recs = []
    for i, r in enumerate(doc["records"]):
        if not isinstance(r, dict) or not isinstance(r.get("n"), int) or not isinstance(r.get("k"), str):
            raise UserError(f"{source}: record #{i} has no sequence number n / kind k")
        r = {k: v for k, v in r.items() if k != "samples"}
        recs.append(from_jsonable(r))
    cfg = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    return EventSet(recs, source=str(doc.get("source") or source), site=doc.get("site"), device=doc.get("device"),
                    config=from_jsonable(cfg), since=int(doc.get("since") or 0),
                    errors=list(doc.get("errors") or []), pulled_at=doc.get("pulled_at"),
                    complete=bool(doc.get("complete", True)))


def write_file(ev: EventSet, path: str | os.PathLike, samples: bool = False) -> str:
    """Write CSV or JSON by the file's extension; returns the format."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt == "csv":
        text = to_csv(ev.records, samples)
    elif fmt == "json":
        text = json.dumps(to_document(ev, samples), indent=1) + "\n"
    else:
        raise UserError(f"{p}: output must end in .csv or .json")
    try:
        p.write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write {p}: {exc.strerror or exc}") from None
    return fmt


def read_file(path: str | os.PathLike) -> EventSet:
    """An export (.json or .csv) or a board filesystem directory."""
    p = Path(path)
    if p.is_dir():
        return load_dir(p)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"{p}: no such file or directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {p}: {exc}") from None
    if p.suffix.lower() == ".csv":
        return EventSet(from_csv(text), source=f"csv:{p.name}")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{p}: not JSON ({exc}); give a .json or .csv from `gridshed events`, or a board directory") from None
    return from_document(doc, source=p.name)


# ---------------------------------------------------------------------------------------------
# Human listing


def describe(rec: dict[str, Any]) -> str:
    k = rec.get("k")
    skip = {"n", "t", "ms", "k", "smp"}
    parts = []
    if k == "ctl":
        parts.append(str(rec.get("ev")))
        skip.add("ev")
    if k == "capture":
        parts.append(f"{len(capture_samples(rec))} samples")
    for key, v in rec.items():
        if key in skip:
            continue
        if isinstance(v, float):
            v = round(v, 3)
        parts.append(f"{key}={v}")
    return " ".join(parts)


def format_time(t: Any) -> str:
    if not isinstance(t, (int, float)) or t < 946684800:  # before 2000: the board had no clock
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


def listing(ev: EventSet) -> str:
    lines = [f"{'n':>6}  {'time (UTC)':<24} {'uptime ms':>10}  {'kind':<11} details"]
    for r in ev.records:
        lines.append(f"{r['n']:>6}  {format_time(r.get('t')):<24} {str(r.get('ms', '')):>10}  {str(r.get('k')):<11} "
                     f"{describe(r)}")
    return "\n".join(lines)
