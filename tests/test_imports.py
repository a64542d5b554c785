"""The firmware's import graph (docs/architecture.md, "Module graph"): no cycles, one leaf that
every module shares (agent/base.py), the hub (agent/app.py) imported by the entry point only.

The graph is gridshed.firmgraph's (also what `gridshed build --site` follows to leave a
feature's helpers out). Parsed with ast, so it sees what runs on the board: top-level imports, imports inside functions
(most of the firmware loads its code on demand), `__import__("agent.x")`, `__import__("agent." +
name)` where name is resolvable (a loop over literal names, a parameter of a loader called with
literal names such as `Agent.step("status", ...)`, or a prefix naming a package: every module of
that package), and the loader calls themselves (`self.step("cmd_check", ...)`). An import it cannot
resolve fails the test, so no edge hides from it.
"""
from __future__ import annotations

import ast
from pathlib import Path

from gridshed.firmgraph import _str, find_cycle, import_graph, module_files

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
LEAF = "agent.base"
# the port shim, the codec and the settings files' CRC wrapper: they import no agent module but the shim
LEAF_DEPS = {"agent.compat", "agent.cbor", "agent.integrity"}


def test_firmware_import_graph_has_no_cycle():
    graph, unresolved = import_graph()
    assert not unresolved, "imports this test cannot resolve (name them literally):\n" + "\n".join(unresolved)
    assert "agent.app" in graph["main"] and "agent.status" in graph["agent.app"]  # it sees lazy and step() imports
    feats = {m for m in graph if m.startswith("agent.features.")}  # and the hub's feature loads
    assert feats and feats <= graph["agent.app"], sorted(feats - graph["agent.app"])
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in the firmware: " + " -> ".join(cycle)


def test_base_is_the_shared_leaf():
    graph, _ = import_graph()
    assert graph[LEAF] <= LEAF_DEPS, f"{LEAF} must import only {sorted(LEAF_DEPS)}: {sorted(graph[LEAF])}"
    for d in LEAF_DEPS:
        assert graph[d] <= {"agent.compat", "agent"} - {d}, f"{d} imports {sorted(graph[d])}"
    users = sorted(n for n, deps in graph.items() if LEAF in deps)
    assert len(users) >= 10, users
    # the hub is imported by the entry point only: nothing reaches back into agent.app
    back = sorted(n for n, deps in graph.items() if "agent.app" in deps and n != "main")
    assert not back, f"modules that import agent.app (use {LEAF}): {back}"


def _wrapper(fn: ast.FunctionDef) -> bool:
    """A one-line form over the shared one (agent.cmd_cose.hmac_sha256(key, msg)), not a copy."""
    body = [b for b in fn.body if not (isinstance(b, ast.Expr) and _str(b.value) is not None)]
    return len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Call)


def test_shared_helpers_defined_once():
    """log / reply / unload / hmac_sha256 / read_checked exist only in agent/base.py."""
    names = {"log", "_log", "reply", "unload", "_unload", "hmac_sha256", "_hmac", "read_checked", "write_cbor_atomic"}
    where: dict[str, list[str]] = {}
    for name, p in module_files(FIRMWARE).items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in names and not _wrapper(node):
                where.setdefault(node.name.lstrip("_"), []).append(name)
    dup = {k: v for k, v in where.items() if v != [LEAF]}
    assert not dup, f"defined outside {LEAF}: {dup}"


def test_checker_finds_a_planted_cycle(tmp_path):
    """The checker sees a cycle closed by a function-level import and by a loader call."""
    a = tmp_path / "agent"
    a.mkdir()
    (a / "__init__.py").write_text("")
    (a / "one.py").write_text("def f():\n    from agent import two\n")
    (a / "two.py").write_text("def step(mod):\n    return __import__('agent.' + mod)\n\ndef g():\n    step('three')\n")
    (a / "three.py").write_text("import agent.one\n")
    graph, unresolved = import_graph(tmp_path)
    assert not unresolved
    assert find_cycle(graph) == ["agent.one", "agent.two", "agent.three", "agent.one"]
    (a / "three.py").write_text("x = __import__('agent.' + input())\n")
    assert import_graph(tmp_path)[1], "an unresolvable __import__ must be reported"
