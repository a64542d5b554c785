"""provision (site.toml -> /config.cbor + key), inventory round trips, status/monitor on a virtual board."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gridshed import cli, siteconfig
from gridshed.errors import UserError
from gridshed.inventory import Inventory
from gridshed.provision import prepare_config, provision
from gridshed.vboard import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "scenarios" / "demo-site.toml"

# A stand-in agent speaking the console protocol (docs/architecture.md), reading the real files.
FAKE_AGENT = r"""
import sys, json, select
from agent import cbor, integrity
def load(p):
    try:
        with open(p, 'rb') as f:
            return cbor.loads(bytes(integrity.unwrap(f.read())[0]))
    except OSError:
        return None
cfg = load('config.cbor')
import hashlib, binascii
try:  # the hash the real agent reports: sha256 of the /config.cbor bytes it booted from (agent/boot.py)
    with open('config.cbor', 'rb') as f:
        chash = binascii.hexlify(hashlib.sha256(f.read()).digest()[:8]).decode()
except OSError:
    chash = None
print('I 0 fake agent up device=%s' % (cfg and cfg.get('device')))
poll = select.poll()
poll.register(sys.stdin, select.POLLIN)
buf = b''
while True:
    if not poll.poll(50):
        continue
    ch = sys.stdin.buffer.read(1)
    if ch != b'\n':
        buf += ch
        continue
    line, buf = buf.decode().strip(), b''
    if line == '@status':
        st = {'build': 'fakebuild', 'device': cfg and cfg.get('device'), 'site': cfg and cfg.get('site'),
              'board': 'unix-sim', 'state': 'normal', 'reason': 'none', 'hz': 60.01, 'kw': 420.5,
              'meter_ok': True, 'mask': 5, 'blocks': ['row-a', 'row-b', 'row-c'], 'samples': 12,
              'meter_errors': 0, 'transitions': 3, 'errors': {}, 'uptime_ms': 1500, 'journal_seq': 2,
              'mem_free': 1000, 'config_hash': chash, 'end': True}
        print('@' + json.dumps(st))
    elif line == '@config':
        print('@' + json.dumps({'config': cfg, 'end': True}))
    elif line.startswith('@events'):
        print('I 1 some log line')
        for n in (1, 2):
            print('@' + json.dumps({'rec': {'n': n, 'k': 'ctl', 'ev': 'trip' if n == 2 else 'boot'}, 'end': False}))
        print('@' + json.dumps({'ok': True, 'end': True}))
"""


@pytest.fixture
def vb(tmp_path):
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "main.py").write_text(FAKE_AGENT)
    board = VirtualBoard(fs, firmware_dir=ROOT / "firmware", heapsize="256k").start()
    assert board.wait_output("fake agent up", 30), board.output()
    yield board
    board.stop()


def test_provision_writes_config_and_key_and_records(tmp_path, vb, capsys):
    inv_path = tmp_path / "inv.sqlite"
    mark = vb.mark()
    rc = cli.main(["provision", "--port", vb.port, "--site", str(SITE), "--device-id", "site1-ctl7",
                   "--inventory", str(inv_path), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)
    cfg = siteconfig.read_settings((vb.fs_dir / "config.cbor").read_bytes())
    assert cfg["device"] == "site1-ctl7" and cfg["board"] == "unix-sim" and cfg["site"] == "demo-site"
    assert cfg == siteconfig.read_settings(siteconfig.config_bytes(prepare_config(SITE, "unix-sim", "site1-ctl7")))
    keys = siteconfig.read_settings((vb.fs_dir / "keys.cbor").read_bytes())
    (kid, key), = keys.items()
    assert len(key) == 32 and kid.hex() == res["key_id"]
    assert key.hex() not in out                     # never printed
    assert res["agent"]["device"] == "site1-ctl7"   # restarted agent read the new config
    assert vb.wait_output("device=site1-ctl7", 30, since=mark)
    with Inventory(inv_path) as inv:
        rec = inv.get("site1-ctl7", show_key=True)
        assert rec["key"] == key.hex() and rec["key_id"] == kid.hex()
        assert rec["config_hash"] == siteconfig.config_hash(cfg)
        assert rec["board"] == "unix-sim" and rec["site"] == "demo-site" and rec["provisioned_at"]
        assert inv.key_for("site1-ctl7") == (kid, key)
    # provisioning again rotates the key (unless --keep-key) and keeps a history
    assert provision(vb.port, SITE, device_id="site1-ctl7", inventory_path=inv_path)["key_id"] != kid.hex()
    kept = provision(vb.port, SITE, device_id="site1-ctl7", inventory_path=inv_path, keep_key=True)
    with Inventory(inv_path) as inv:
        assert kept["key_id"] == inv.get("site1-ctl7")["key_id"]
        assert [h["action"] for h in inv.history("site1-ctl7")] == ["provision", "reprovision", "reprovision"]


def test_status_and_monitor_over_console(tmp_path, vb, capsys):
    inv_path = tmp_path / "inv.sqlite"
    provision(vb.port, SITE, device_id="dev-s", inventory_path=inv_path)
    with sqlite3.connect(inv_path) as db:
        db.execute("UPDATE devices SET last_seen='2000-01-01T00:00:00Z'")
    mark = vb.mark()
    assert cli.main(["status", "--port", vb.port, "--json", "--inventory", str(inv_path)]) == 0
    st = json.loads(capsys.readouterr().out)
    cfg = siteconfig.read_settings((vb.fs_dir / "config.cbor").read_bytes())
    assert st["device"] == "dev-s" and st["hz"] == 60.01 and st["build"] == "fakebuild"
    assert st["config_hash"] == siteconfig.config_hash(cfg)
    assert [e["ev"] for e in st["events"]] == ["boot", "trip"]
    assert st["inventory_updated"] is True
    with Inventory(inv_path) as inv:
        assert inv.get("dev-s")["last_seen"] > "2000-01-01T00:00:00Z"
    assert b"Traceback" not in vb.output()[mark:]  # the agent was never interrupted
    assert cli.main(["status", "--port", vb.port]) == 0
    text = capsys.readouterr().out
    assert "420.5 kW" in text and "row-b=OPEN" in text
    assert cli.main(["monitor", "--port", vb.port, "--json", "--count", "2", "--interval", "0.05"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["state"] == "normal"
    assert cli.main(["monitor", "--port", vb.port, "--count", "1", "--interval", "0.01"]) == 0
    assert "60.01 Hz" in capsys.readouterr().out


def test_status_without_agent_is_a_clear_error(tmp_path):
    with VirtualBoard(tmp_path / "blank") as b:
        with pytest.raises(UserError, match="no answer to @status"):
            from gridshed.provision import read_status
            read_status(b.port, timeout=1.0)


BAD_SITES = [
    ('colour = "red"\n', "unknown key 'colour'"),
    ('[[blocks]]\nname = "x"\nrelays = ["relay99"]\n', "relay99"),
    ('[meter]\ntransport = "rtu"\n', "meter.model"),
    ('[trip]\npickup_hz = "low"\n', "trip.pickup_hz"),
]


def _site_with(tmp_path, change: str, drop: str | None = None) -> Path:
    text = SITE.read_text()
    if "[[blocks]]" in change:
        text = text.split("[[blocks]]")[0] + change
    elif change.startswith("[meter]"):
        text = text.replace('model = "eastron_sdm630"\n', "")
    elif change.startswith("[trip]"):
        text = text.replace("pickup_hz = 59.7", 'pickup_hz = "low"')
    else:
        text = change + text
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("change,needle", BAD_SITES)
def test_bad_site_files_name_the_key_before_touching_the_board(tmp_path, change, needle, capsys):
    site = _site_with(tmp_path, change)
    # a port that does not exist: the site error must come first
    rc = cli.main(["provision", "--port", "/dev/nonexistent-port", "--site", str(site),
                   "--inventory", str(tmp_path / "i.sqlite")])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "nonexistent" not in err


def test_site_board_mismatch_and_missing_device(tmp_path):
    with pytest.raises(UserError, match="board: 'unix-sim' but the board is a rpi-pico"):
        prepare_config(SITE, "rpi-pico", "d1")
    p = tmp_path / "nodev.toml"
    p.write_text(SITE.read_text().replace('device = "ctl-1"\n', ""))
    with pytest.raises(UserError, match="--device-id"):
        prepare_config(p, None, None)
    assert prepare_config(p, None, "given")["device"] == "given"


def test_inventory_round_trip(tmp_path, capsys):
    a = tmp_path / "a.sqlite"
    with Inventory(a) as inv:
        inv.record_provision("d1", "rpi-pico", "s1", "00112233aabbccdd", bytes(range(32)), "b1", "c1", "/dev/x")
        inv.record_provision("d2", "unix-sim", "s2", "0011223344556677", b"\x01" * 32, None, "c2")
        assert inv.touch("d2", firmware_build="b9") and not inv.touch("nope")
    assert cli.main(["inventory", "--inventory", str(a), "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["device_id"] for r in rows] == ["d1", "d2"] and "key" not in rows[0]
    assert rows[1]["firmware_build"] == "b9"
    assert cli.main(["inventory", "--inventory", str(a), "show", "d1"]) == 0
    shown = capsys.readouterr().out
    assert "00112233aabbccdd" in shown and bytes(range(32)).hex() not in shown
    assert cli.main(["inventory", "--inventory", str(a), "show", "d1", "--show-key", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == bytes(range(32)).hex()
    assert cli.main(["inventory", "--inventory", str(a), "export", "--format", "csv"]) == 0
    csv_text = capsys.readouterr().out
    assert csv_text.splitlines()[0].startswith("device_id,board,site,key_id") and bytes(range(32)).hex() not in csv_text
    backup = tmp_path / "backup.json"
    assert cli.main(["inventory", "--inventory", str(a), "export", "--show-keys", "-o", str(backup)]) == 0
    b = tmp_path / "b.sqlite"
    assert cli.main(["inventory", "--inventory", str(b), "import", str(backup)]) == 0
    with Inventory(a) as ia, Inventory(b) as ib:
        assert ia.list(show_key=True) == ib.list(show_key=True)
    plain = tmp_path / "plain.json"
    cli.main(["inventory", "--inventory", str(a), "export", "-o", str(plain)])
    assert cli.main(["inventory", "--inventory", str(b), "import", str(plain)]) == 2
    assert cli.main(["inventory", "--inventory", str(a), "show", "zzz"]) == 2
    assert "not in the inventory" in capsys.readouterr().err


def test_default_inventory_path_follows_env(tmp_path, monkeypatch):
    from gridshed.inventory import default_path

    monkeypatch.setenv("GRIDSHED_INVENTORY", str(tmp_path / "x.sqlite"))
    assert default_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("GRIDSHED_INVENTORY")
    assert default_path().name == "inventory.sqlite" and "gridshed" in str(default_path())


def test_provision_broker_credentials_and_rotation(tmp_path, vb):
    # [mqtt] tls + password login: provision records the site's settings, issues the device's
    # broker password once and writes /broker.cbor (the CA as DER, user, password) beside the
    # key; rotate-key --broker replaces it on the board and
    # in the inventory (the command key stays); a site without broker security removes the file
    from gridshed import brokerauth as ba
    from gridshed.rotate import rotate_key

    ca, _ = ba.make_ca("the broker's own CA")
    (tmp_path / "ca.pem").write_bytes(ca)
    site = tmp_path / "site.toml"
    site.write_text(SITE.read_text() + '\n[mqtt]\nhost = "10.0.0.5"\nport = 8883\ntls = true\nca = "ca.pem"\n'
                    'auth = "password"\nserver_name = "broker.site.lan"\n')
    inv_path = tmp_path / "inv.sqlite"
    provision(vb.port, site, device_id="d-tls", inventory_path=inv_path, restart=False)
    b = siteconfig.read_settings((vb.fs_dir / "broker.cbor").read_bytes())
    assert bytes(b["ca"]) == ba.pem_to_der(ca) and b["user"] == "d-tls" and len(b["pass"]) >= 24
    with Inventory(inv_path) as inv:
        assert inv.broker_creds("d-tls")["password"] == b["pass"]
        row = inv.site("demo-site")
        assert row["tls"] == 1 and row["auth"] == "password" and row["trust_ca"] == ca.decode()
        assert row["server_name"] == "broker.site.lan" and row["host_password"]
        kid = inv.get("d-tls")["key_id"]
    res = rotate_key(vb.port, "d-tls", inv_path, broker=True, restart=False)
    b2 = siteconfig.read_settings((vb.fs_dir / "broker.cbor").read_bytes())
    assert b2["pass"] != b["pass"] and bytes(b2["ca"]) == bytes(b["ca"]) and "broker-config" in res["note"]
    with Inventory(inv_path) as inv:
        assert inv.broker_creds("d-tls")["password"] == b2["pass"] and inv.get("d-tls")["key_id"] == kid
    provision(vb.port, SITE, device_id="d-tls", inventory_path=inv_path, keep_key=True, restart=False)
    assert not (vb.fs_dir / "broker.cbor").exists()
    with Inventory(inv_path) as inv:  # the login stays in the inventory (a later TLS site reuses it)
        assert inv.broker_creds("d-tls")["password"] == b2["pass"]


def test_provision_refuses_a_config_the_boards_older_firmware_refuses(tmp_path, capsys):
    """The board runs a build older than this gridshed (its validator does not know a key the
    host writes: here meter.poll_mode): before, the config was switched in and the board refused
    to run at all (found by the walk). Now its own validator reads the staged config first:
    refused in one line, nothing switched, the old config runs on."""
    import shutil

    old = tmp_path / "old-firmware"
    shutil.copytree(ROOT / "firmware", old, ignore=shutil.ignore_patterns("__pycache__"))
    src = (old / "agent" / "config.py").read_text()
    line = next(x for x in src.splitlines(keepends=True) if x.strip().startswith('"poll_mode":'))
    (old / "agent" / "config.py").write_text(src.replace(line, ""))
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "main.py").write_text(FAKE_AGENT)
    before = siteconfig.config_bytes(prepare_config(SITE, "unix-sim", "site1-old"))
    (fs / "config.cbor").write_bytes(before)
    inv_path = tmp_path / "inv.sqlite"
    with VirtualBoard(fs, firmware_dir=old, heapsize="256k") as vb:
        assert vb.wait_output("fake agent up", 30)
        mark = vb.mark()
        assert cli.main(["provision", "--port", vb.port, "--site", str(SITE), "--device-id", "site1-new",
                         "--inventory", str(inv_path)]) == 2
        err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.endswith("...")]
        assert len(err) == 1 and "the board's firmware (build ?) refuses this config: meter.poll_mode: unknown key; " \
            "nothing was changed: deploy this gridshed's firmware first" in err[0], err
        assert (fs / "config.cbor").read_bytes() == before and not (fs / "keys.cbor").exists()
        assert vb.wait_output("fake agent up device=site1-old", 30, since=mark)
    with Inventory(inv_path) as inv:
        assert inv.get("site1-new") is None
