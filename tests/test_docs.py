"""The docs stand alone and tell the truth about names: every repository path, every
`agent.x` / `gridshed.x` module (or module attribute) and every `gridshed COMMAND` they mention
exists, and nothing points outside the repository."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", ".pytest_cache", ".hypothesis", ".mypy_cache", "build", "out", "node_modules"}
# every Markdown file of the checkout (a notice or README anywhere is a doc a newcomer reads)
DOCS = sorted(p for p in ROOT.rglob("*.md")
              if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts) and not any(
                  part.endswith(".egg-info") for part in p.relative_to(ROOT).parts))
TOP = ("firmware", "boards", "meters", "host_tools", "tests", "docs", "scenarios", "bench", ".ci")
PATH_RE = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w/])" % "|".join(re.escape(t) for t in TOP))
MOD_RE = re.compile(r"(?<![\w./-])((?:agent|gridshed)(?:\.[A-Za-z_]\w*)+)")
CMD_RE = re.compile(r"(?:^|[`$\s(])gridshed ([a-z][a-z0-9-]*)")
CODE_RE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
GENERATED = {"bench/results.json"}  # written by `make bench`, gitignored


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def _placeholder(token: str) -> bool:
    return any(c in token for c in "<>*{}[]") or "..." in token


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_doc_points_nowhere_outside(doc):
    text = doc.read_text()
    for bad in ("DESIGN.md", "../shared", "/work/"):
        assert bad not in text, f"{doc.name} mentions {bad!r}: the repo's docs must stand alone"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_doc_paths_exist(doc):
    missing = []
    for m in PATH_RE.finditer(doc.read_text()):
        token = m.group(1).rstrip(".")
        if _placeholder(token) or token in GENERATED:
            continue
        if not (ROOT / token).exists():
            missing.append(token)
    assert not missing, f"{doc.name} names paths that do not exist: {sorted(set(missing))}"


def _agent_attributes() -> set[str]:
    """What `agent.<name>` may name in the docs besides a module: the running Agent's
    attributes and methods (firmware/agent/app.py, `self.<name>`, `def <name>` and the class's
    defaults, `    <name> = ` in class Agent)."""
    src = (ROOT / "firmware" / "agent" / "app.py").read_text()
    return (set(re.findall(r"self\.(\w+)\s*=", src)) | set(re.findall(r"^    def (\w+)", src, re.M))
            | set(re.findall(r"^    (\w+) = ", src, re.M)))


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] == "agent" and len(parts) == 2 and parts[1] in _agent_attributes():
        return True
    for i in range(len(parts), 0, -1):
        try:
            mod = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        obj = mod
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_doc_modules_exist(doc):
    text = doc.read_text()
    missing = []
    for m in MOD_RE.finditer(text):
        token = m.group(1)
        if token.endswith((".py", ".md", ".json", ".toml", ".csv", ".cbor", ".mpy", ".whl")):
            continue  # a file name, checked as a path
        # a file path (agent/x.py) is checked by test_doc_paths_exist; here dotted names only
        if not _resolves(token):
            missing.append(token)
    assert not missing, f"{doc.name} names modules/attributes that do not exist: {sorted(set(missing))}"


def test_doc_commands_exist():
    from gridshed.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    known = set(sub.choices)
    bad = {}
    for doc in DOCS:
        code = "\n".join(c.group(0) for c in CODE_RE.finditer(doc.read_text()))
        for m in CMD_RE.finditer(code):
            if m.group(1) not in known:
                bad.setdefault(doc.name, set()).add(m.group(1))
    assert not bad, f"docs name gridshed commands that do not exist: {bad} (known: {sorted(known)})"


def test_readme_cli_table_names_every_command():
    """README's "The CLI" table says `gridshed --help` lists every command: the table names each."""
    from gridshed.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## The CLI"):readme.index("\n## ", readme.index("## The CLI") + 1)]
    named = set(re.findall(r"`([a-z][a-z0-9-]*)(?: [a-z]+)?`", table))
    assert not set(sub.choices) - named, f"README's CLI table misses {sorted(set(sub.choices) - named)}"


def test_hal_contract_matches_both_hals():
    """The HAL table in docs/architecture.md names exactly the public methods of both HALs."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## HAL contract", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)\(", section, re.M))
    for path, cls in (("mcu.py", "McuHal"), ("unix.py", "UnixHal")):
        src = (ROOT / "firmware" / "agent" / "hal" / path).read_text()
        body = src.split("class %s" % cls, 1)[1]
        body = re.split(r"^class |^def ", body, flags=re.M)[0]
        methods = {m for m in re.findall(r"^    (?:async )?def (\w+)", body, re.M) if not m.startswith("_")}
        assert methods == documented, (path, sorted(methods ^ documented))
