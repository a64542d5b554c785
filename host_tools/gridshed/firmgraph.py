"""The firmware's import graph, parsed with ast (docs/architecture.md, "Module graph").

It sees what runs on the board: top-level imports, imports inside functions (most of the
firmware loads its code on demand), `__import__("agent.x")`, `__import__("agent." + name)` where
name is resolvable (a loop over literal names, a parameter of a loader called with literal names
such as `Agent.step("status", ...)`, or a prefix naming a package: every module of that package),
and the loader calls themselves. An import it cannot resolve is reported, so no edge hides.

Used by `gridshed build --site/--features` (which modules a site's build needs: the core plus
the enabled features of agent/features/ and the helper modules they pull in) and by
tests/test_imports.py (no cycles, the shared leaf).
"""
from __future__ import annotations

import ast
from pathlib import Path


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
        # function name -> (module prefix of its __import__(prefix + param), the param's place in a call)
        self.loaders: dict[str, tuple[str, int]] = {}
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
                    i = params.index(var) - (params[:1] == ["self"])
                    self.loaders[fn.name] = (prefix, i)  # type: ignore[attr-defined]
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


def import_graph(fw: Path | None = None) -> tuple[dict[str, set[str]], list[str]]:
    if fw is None:
        from .build import firmware_dir

        fw = firmware_dir()
    mods = module_files(fw)
    trees, scans = {}, {}
    for name, p in mods.items():
        trees[name] = ast.parse(p.read_text(), str(p))
        s = _Scan(name, mods, p.name == "__init__.py")
        s.visit(trees[name])
        scans[name] = s
    loaders = {fn: (n, pre, i) for n, s in scans.items() for fn, (pre, i) in s.loaders.items()}
    unresolved = [u for s in scans.values() for u in s.unresolved]
    # loader calls (Agent.step("status", ...)): an edge from the calling module to the module
    # named; a name only known at run time (Agent._feature(sec)) stands for every module of the
    # prefix's package (agent.features.*), and a prefix that is not a subpackage cannot be resolved
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if fname not in loaders:
                continue
            home, prefix, i = loaders[fname]
            # the loader's own module calling it on itself (self.step, step): every call counts;
            # elsewhere a call of that name with a literal module name (a.step("cmd_check", ...))
            own = name == home and (isinstance(f, ast.Name) or (isinstance(f.value, ast.Name) and f.value.id == "self"))
            if i >= len(node.args) or (not own and _str(node.args[i]) is None):
                continue
            s = _str(node.args[i])
            if s is not None:
                if prefix + s in mods:
                    scans[name].edges.add(prefix + s)
                else:
                    unresolved.append(f"{name}:{node.lineno}: {fname}({s!r}): no module {prefix + s}")
            elif prefix.count(".") > 1 and prefix.rstrip(".") in mods:
                scans[name].edges.update(m for m in mods if m.startswith(prefix))
            else:
                unresolved.append(f"{name}:{node.lineno}: {fname}({ast.unparse(node.args[i])}) not resolvable")
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


FEATURES_PKG = "agent.features"


def feature_modules(fw: Path) -> dict[str, str]:
    """{site.toml section: module} for each optional feature, agent/features/<section>.py."""
    d = fw / "agent" / "features"
    return {p.stem: f"{FEATURES_PKG}.{p.stem}" for p in sorted(d.glob("*.py")) if p.stem != "__init__"} \
        if d.is_dir() else {}


def reach(graph: dict[str, set[str]], roots: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n in seen or n not in graph:
            continue
        seen.add(n)
        todo.extend(graph[n] - seen)
    return seen


def modules_for(fw: Path, features: list[str]) -> tuple[set[str], set[str]]:
    """(modules a build with only `features` needs, modules it leaves out).

    Left out: the modules of the features not named, and every module only they import (a
    helper also imported by the core or by a named feature stays). Raises ValueError on an
    unknown feature name or an import the graph cannot resolve (nothing is guessed).
    """
    feats = feature_modules(fw)
    unknown = sorted(set(features) - set(feats))
    if unknown:
        raise ValueError(f"no feature {', '.join(unknown)} in {fw / 'agent' / 'features'} "
                         f"(features: {', '.join(feats) or 'none'})")
    graph, unresolved = import_graph(fw)
    if unresolved:
        raise ValueError("the firmware has imports the build cannot follow: " + "; ".join(unresolved[:3]))
    dropped = {feats[s] for s in feats if s not in features}
    pruned = {n: e - dropped for n, e in graph.items() if n not in dropped}
    only_theirs = reach(graph, dropped)            # the dropped features and what they import
    keep = reach(pruned, set(pruned) - only_theirs)  # everything else, and what it imports
    return keep, set(graph) - keep
