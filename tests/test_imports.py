"""The firmware's import graph (docs/architecture.md, "Module graph"): no cycles, one leaf that
every module shares (agent/base.py), the hub (agent/app.py) imported by the entry point only.

Parsed with ast, so it sees what runs on the board: top-level imports, imports inside functions
(most of the firmware loads its code on demand), `__import__("agent.x")`, `__import__("agent." +
name)` where name is resolvable (a loop over literal names, a parameter of a loader called with
literal names such as `Agent.step("status", ...)`, or a prefix naming a package: every module of
that package), and the loader calls themselves (`self.step("cmdcheck", ...)`). An import it cannot
resolve fails the test, so no edge hides from it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
LEAF = "agent.base"
# the port shim, the codec and the settings files' CRC wrapper: they import no agent module but the shim
LEAF_DEPS = {"agent.compat", "agent.cbor", "agent.integrity"}


def module_files(fw: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(fw.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        parts = list(p.relative_to(fw).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


class _Scan(ast.NodeVisitor):
    def __init__(self, name: str, mods: dict[str, Path], is_pkg: bool):
        self.name, self.mods, self.is_pkg = name, mods, is_pkg
        self.edges: set[str] = set()
        self.unresolved: list[str] = []
        self.loaders: dict[str, str] = {}   # function name -> module prefix of its __import__(prefix + param)
        self.funcs: list[ast.AST] = []

    def _add(self, mod: str, line: int) -> None:
        # "agent.x.y": the deepest prefix that is a firmware module
        parts = mod.split(".")
        while parts and ".".join(parts) not in self.mods:
            parts.pop()
        if parts:
            self.edges.add(".".join(parts))
        elif mod.split(".")[0] == "agent":
            self.unresolved.append(f"{self.name}:{line}: {mod} is not a firmware module")

    def _base(self, level: int, module: str | None) -> str:
        if not level:
            return module or ""
        pkg = self.name.split(".") if self.is_pkg else self.name.split(".")[:-1]
        pkg = pkg[: len(pkg) - (level - 1)]
        return ".".join(pkg + ([module] if module else []))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._add(a.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._base(node.level, node.module)
        for a in node.names:
            sub = f"{base}.{a.name}"
            self._add(sub if sub in self.mods else base, node.lineno)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.funcs.append(node)
        self.generic_visit(node)
        self.funcs.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Name) and f.id == "__import__" and node.args:
            self._dynamic(node.args[0], node.lineno)
        self.generic_visit(node)

    def _dynamic(self, arg: ast.AST, line: int) -> None:
        s = _str(arg)
        if s is not None:
            self._add(s, line)
            return
        if isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Add) and _str(arg.left) is not None \
                and isinstance(arg.right, ast.Name):
            prefix, var = _str(arg.left), arg.right.id
            fn = self.funcs[-1] if self.funcs else None
            if fn is not None:
                params = [a.arg for a in fn.args.args]  # type: ignore[attr-defined]
                if var in params:  # a loader: resolved at its call sites
                    self.loaders[fn.name] = prefix  # type: ignore[attr-defined]
                    return
                for sub in ast.walk(fn):  # for var in <literal names>
                    if isinstance(sub, ast.For) and var in {n.id for n in ast.walk(sub.target) if isinstance(n, ast.Name)} \
                            and isinstance(sub.iter, (ast.Tuple, ast.List)):
                        hits = [prefix + s for s in _strings(sub.iter) if prefix + s in self.mods]
                        if hits:
                            self.edges.update(hits)
                            return
            pkg = prefix.rstrip(".")
            if prefix.endswith(".") and pkg in self.mods and self.mods[pkg].name == "__init__.py":
                self.edges.update(m for m in self.mods if m.startswith(prefix))  # any module of the package
                return
        self.unresolved.append(f"{self.name}:{line}: __import__({ast.unparse(arg)}) not resolvable")


def import_graph(fw: Path = FIRMWARE) -> tuple[dict[str, set[str]], list[str]]:
    mods = module_files(fw)
    trees, scans = {}, {}
    for name, p in mods.items():
        trees[name] = ast.parse(p.read_text(), str(p))
        s = _Scan(name, mods, p.name == "__init__.py")
        s.visit(trees[name])
        scans[name] = s
    loaders = {fn: pre for s in scans.values() for fn, pre in s.loaders.items()}
    unresolved = [u for s in scans.values() for u in s.unresolved]
    # loader calls (Agent.step("status", ...)): an edge from the calling module
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if fname in loaders:
                for a in node.args:
                    s = _str(a)
                    if s is not None and loaders[fname] + s in mods:
                        scans[name].edges.add(loaders[fname] + s)
                        break
    graph = {n: {e for e in s.edges if e != n} for n, s in scans.items()}
    # importing agent.x.y runs agent/x/__init__.py first
    for n in list(graph):
        for e in list(graph[n]):
            parts = e.split(".")
            for i in range(1, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg in graph and pkg != n and not n.startswith(pkg + "."):
                    graph[n].add(pkg)
    return graph, unresolved


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m, BLACK) == GREY:
                return stack[stack.index(m):] + [m]
            if color.get(m) == WHITE:
                c = dfs(m)
                if c:
                    return c
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(graph):
        if color[n] == WHITE:
            c = dfs(n)
            if c:
                return c
    return None


def test_firmware_import_graph_has_no_cycle():
    graph, unresolved = import_graph()
    assert not unresolved, "imports this test cannot resolve (name them literally):\n" + "\n".join(unresolved)
    assert "agent.app" in graph["main"] and "agent.status" in graph["agent.app"]  # it sees lazy and step() imports
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
    """A one-line form over the shared one (agent.cose.hmac_sha256(key, msg)), not a copy."""
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
