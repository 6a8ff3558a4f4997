"""The package's structure, read from the source with ``ast`` (issue 20, items 1-3).

- no import cycle among flm's modules (lazy imports inside functions included), so the layers
  of ``docs/design.md`` hold;
- no module imports another module's underscored name (a name is either part of its module's
  interface, public and documented, or the caller does not need it); public names of private
  modules (``flm._io.atomic_path``) are fine;
- every use of a private or version-dependent torch API (``torch._…``, ``torch.compiler.is_compiling``)
  is in ``flm/_compat.py``, the one file a new torch release is checked in.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "flm"
PKG = ROOT.name


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under ``root``."""
    mods = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


MODULES = _modules()
TREES = {m: ast.parse(f.read_text(encoding="utf-8"), str(f)) for m, f in MODULES.items()}


def _owner(name: str, mods: dict[str, Path] = MODULES) -> str | None:
    """The module that defines dotted ``name``: the longest prefix that is a module."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _from_base(module: str, node: ast.ImportFrom, mods: dict[str, Path]) -> str:
    """The absolute module a ``from … import`` statement in ``module`` reads from."""
    if not node.level:
        return node.module or ""
    base = module if mods[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _imported(module: str, tree: ast.AST, mods: dict[str, Path] = MODULES) -> list[tuple[str, ast.AST]]:
    """Every dotted name ``module`` imports (anywhere in the file), with its statement."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node, mods)
            out += [(base, node)] + [(f"{base}.{a.name}", node) for a in node.names]
    return out


def import_graph(trees: dict[str, ast.AST], mods: dict[str, Path], pkg: str = PKG) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a module importing its own package is not an
    edge: ``from flm import nn`` in ``flm.model`` needs ``flm.nn``, not ``flm/__init__``'s body)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, tree in trees.items():
        for name, _ in _imported(m, tree, mods):
            if name == pkg or name.startswith(pkg + "."):
                target = _owner(name, mods)
                if target and target != m and not m.startswith(target + "."):
                    graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _where(module: str, mods: dict[str, Path]) -> str:
    """``module``'s file, relative to the directory that holds the package."""
    return mods[module].relative_to(mods[PKG].parent.parent).as_posix()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; ``None`` when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _bindings(module: str, tree: ast.AST, mods: dict[str, Path], prefix: str) -> dict[str, str]:
    """Local name -> the module (under ``prefix``) it is bound to by an import in the file."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == prefix or a.name.startswith(prefix + "."):
                    names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node, mods)
            for a in node.names:
                full = f"{base}.{a.name}"
                if full.startswith(prefix + ".") and full in mods:
                    names[a.asname or a.name] = full
    return names


def _private_definitions(tree: ast.AST) -> set[str]:
    """The underscored names a module defines: functions, classes, methods, assigned names and
    attributes (``self._x = …``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            if isinstance(target, ast.Name):
                names.add(target.id)
            elif isinstance(target, ast.Attribute):
                names.add(target.attr)
    return {n for n in names if _private(n)}


def private_name_uses(trees: dict[str, ast.AST], mods: dict[str, Path], pkg: str = PKG) -> list[str]:
    """``file:line: module uses other._name`` for every underscored name one module takes from
    another: ``from flm.x import _y`` (relative forms included), ``x._y`` where ``x`` is an
    imported flm module, and ``obj._y`` where ``_y`` is defined only in other modules of flm (a
    method or attribute of another module's class: ``self.checkpointer._last_good_text()``).
    Importing a private *module* (``from flm import _io``) is fine."""
    found = []
    defined = {m: _private_definitions(tree) for m, tree in trees.items()}
    for m, tree in trees.items():
        where = _where(m, mods)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _from_base(m, node, mods)
                if not (base == pkg or base.startswith(pkg + ".")) or base == m:
                    continue
                for a in node.names:
                    if _private(a.name) and f"{base}.{a.name}" not in mods:
                        found.append(f"{where}:{node.lineno}: {m} imports {base}.{a.name}")
        aliases = _bindings(m, tree, mods, pkg)
        for node in ast.walk(tree):
            chain = _chain(node) if isinstance(node, ast.Attribute) else None
            if not chain or chain[0] not in aliases:
                continue
            dotted = [*aliases[chain[0]].split("."), *chain[1:]]
            for i in range(1, len(dotted)):
                head = ".".join(dotted[:i])
                if head not in mods:
                    break
                name = dotted[i]
                if _private(name) and f"{head}.{name}" not in mods and head != m:
                    found.append(f"{where}:{node.lineno}: {m} uses {head}.{name}")
                    break
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)) or node.attr in defined[m]:
                continue
            if (_chain(node) or [""])[0] in aliases:
                continue  # a module's name: reported above
            owners = sorted(o for o, names in defined.items() if node.attr in names)
            if owners:
                found.append(f"{where}:{node.lineno}: {m} uses {node.attr} of {', '.join(owners)}")
    return sorted(set(found))


def private_torch_uses(trees: dict[str, ast.AST], mods: dict[str, Path], allowed: str = f"{PKG}._compat") -> list[str]:
    """``file:line: what`` for every private or version-dependent torch API used outside
    ``allowed``: an attribute chain from ``torch`` with an underscored part (``torch._foreach_mul``,
    ``torch._C._functorch``), ``torch.compiler.is_compiling``, and imports of ``torch._…`` modules."""
    found = []
    for m, tree in trees.items():
        if m == allowed:
            continue
        where = _where(m, mods)
        torch_names = {"torch"} | {
            a.asname
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
            if a.name == "torch" and a.asname
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "torch" and any(_private(p) for p in parts[1:]):
                        found.append(f"{where}:{node.lineno}: imports {name}")
                        break
            elif isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
                chain = _chain(node)
                if not chain or chain[0] not in torch_names:
                    continue
                if any(_private(p) for p in chain[1:]) or chain[1:3] == ["compiler", "is_compiling"]:
                    found.append(f"{where}:{node.lineno}: {'.'.join(['torch', *chain[1:]])}")
    return sorted(set(found))


def _mark_parents(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    return tree


def _package(tmp_path: Path, files: dict[str, str]) -> tuple[dict[str, ast.AST], dict[str, Path]]:
    """A throw-away package named ``flm`` under ``tmp_path`` (to show the checks can fail)."""
    for name, text in files.items():
        path = tmp_path / PKG / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    mods = _modules(tmp_path / PKG)
    return {m: _mark_parents(ast.parse(f.read_text(encoding="utf-8"))) for m, f in mods.items()}, mods


for _tree in TREES.values():
    _mark_parents(_tree)


def test_no_import_cycle_among_flms_modules():
    found = cycles(import_graph(TREES, MODULES))
    assert not found, "import cycles (lazy imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_sees_lazy_relative_and_package_imports(tmp_path):
    trees, mods = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "def f():\n    from flm import b\n",
            "b.py": "from .sub import c\n",
            "sub/__init__.py": "",
            "sub/c.py": "import flm.a\n",
            "d.py": "from flm import e\n",
            "e.py": "from flm import a\n",  # a -> b -> sub.c -> a: one cycle; d, e only lead into it
        },
    )
    assert cycles(import_graph(trees, mods)) == [["flm.a", "flm.b", "flm.sub.c"]]


def test_no_module_imports_another_modules_private_name():
    found = private_name_uses(TREES, MODULES)
    assert not found, "private names used across modules (make them public or stop needing them):\n" + "\n".join(found)


def test_the_private_name_check_sees_each_form(tmp_path):
    trees, mods = _package(
        tmp_path,
        {
            "__init__.py": "",
            "_io.py": "def write():\n    pass\n",
            "x.py": "_y = 1\nz = _y\n",
            "p/__init__.py": "",
            "p/q.py": "_r = 1\n\n\nclass C:\n    def _hidden(self):\n        return self._own\n",
            "uses.py": (
                "from flm import _io, x\n"  # a private module: fine
                "from flm._io import write\n"  # a public name of a private module: fine
                "from flm.x import _y\n"  # 3
                "import flm.x as m\n"
                "import flm\n"
                "from .p import q\n"
                "def f():\n"
                "    from .p.q import _r\n"  # 8
                "    return m._y, flm.x._y, q._r, x.z, _io.write, flm._io.write, x.__name__\n"  # 9 (three)
                "def g(c, t):\n"
                "    return c._hidden(), t._replace(a=1), t._mine\n"  # 11: _hidden is q's
                "_mine = 0\n"
            ),
        },
    )
    assert private_name_uses(trees, mods) == [
        "flm/uses.py:11: flm.uses uses _hidden of flm.p.q",  # sorted as text: 11 before 3
        "flm/uses.py:3: flm.uses imports flm.x._y",
        "flm/uses.py:8: flm.uses imports flm.p.q._r",
        "flm/uses.py:9: flm.uses uses flm.p.q._r",
        "flm/uses.py:9: flm.uses uses flm.x._y",
    ]


def test_private_torch_apis_are_used_only_in_compat():
    found = private_torch_uses(TREES, MODULES)
    assert not found, "private or version-dependent torch APIs outside flm/_compat.py:\n" + "\n".join(found)


def test_the_private_torch_check_sees_each_form(tmp_path):
    body = (
        "import torch\n"
        "import torch as th\n"
        "import torch._dynamo\n"  # 3
        "from torch._functorch import pyfunctorch\n"  # 4
        "from torch import _C\n"  # 5
        "a = torch._foreach_mul\n"  # 6
        "b = th._C._functorch.is_batchedtensor\n"  # 7
        "c = torch.compiler.is_compiling()\n"  # 8
        "d = torch.__version__, torch.func.vmap, x._foreach\n"
    )
    trees, mods = _package(tmp_path, {"__init__.py": "", "_compat.py": body, "other.py": body})
    got = private_torch_uses(trees, mods)
    assert got == [
        "flm/other.py:3: imports torch._dynamo",
        "flm/other.py:4: imports torch._functorch",
        "flm/other.py:5: imports torch._C",
        "flm/other.py:6: torch._foreach_mul",
        "flm/other.py:7: torch._C._functorch.is_batchedtensor",
        "flm/other.py:8: torch.compiler.is_compiling",
    ]


def test_the_graph_reads_flms_imports():
    """The graph is not empty by accident: edges the source has, a lazy one included."""
    graph = import_graph(TREES, MODULES)
    assert "flm.nn" in graph["flm.model"]
    assert "flm.cli" in graph["flm.__main__"]
