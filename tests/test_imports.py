"""The module graph: every module imports on its own, no import cycle exists among rlprefix and rewards modules (read
from each file's top-level imports), and no function imports one of them (which would hide a cycle from that check)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("rlprefix", "rewards")
PACKAGES = sorted(".".join(p.parent.relative_to(ROOT).parts) for top in TOP for p in (ROOT / top).rglob("__init__.py"))
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for top in TOP for p in (ROOT / top).rglob("*.py")
                 if p.stem != "__init__")


def _imports(package: str, body) -> set[str]:
    """Modules (or packages: `from . import x` with x a name in __init__) of ours that `body` imports;
    `package` is the package relative imports start from."""
    found = set()
    for node in body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES or a.name in PACKAGES}
        elif isinstance(node, ast.ImportFrom):
            anchor = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            base = ".".join(filter(None, [anchor, node.module]))
            if base in MODULES:
                found.add(base)
            elif base in PACKAGES:
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return found


def module_graph() -> dict[str, set[str]]:
    graph = {pkg: _imports(pkg, ast.parse((ROOT / pkg.replace(".", "/") / "__init__.py").read_text()).body) - {pkg}
             for pkg in PACKAGES}
    for m in MODULES:
        body = ast.parse((ROOT / f"{m.replace('.', '/')}.py").read_text()).body
        graph[m] = _imports(m.rpartition(".")[0], body) - {m}
    return graph


def test_no_import_cycles():
    graph, done, path = module_graph(), set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        path.pop()
        done.add(node)

    for m in sorted(graph):
        visit(m)


# the one module allowed to import ours inside functions: its subcommands import lazily on purpose (its docstring says why)
LAZY_IMPORTS_ALLOWED = {"rlprefix.cli"}


def function_level_imports(module: str) -> list[str]:
    """`line: module` for each import of an rlprefix or rewards module inside a function (or method) of `module`;
    third-party imports there (optional or slow dependencies) are not listed."""
    path = ROOT / (module.replace(".", "/") + ("/__init__.py" if module in PACKAGES else ".py"))
    package = module if module in PACKAGES else module.rpartition(".")[0]
    found = set()
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    ours = _imports(package, [node])
                    if ours or (isinstance(node, ast.ImportFrom) and node.level):  # relative: ours too
                        found.add(f"{node.lineno}: {', '.join(sorted(ours)) or ast.unparse(node)}")
    return sorted(found, key=lambda s: int(s.split(":")[0]))


def test_our_modules_are_imported_at_the_top():
    """Every import of an rlprefix or rewards module is at the top of its module, where the cycle check sees it:
    a function-level one is how a cycle gets dodged instead of removed."""
    found = {m: function_level_imports(m) for m in PACKAGES + MODULES if m not in LAZY_IMPORTS_ALLOWED}
    assert not {m: lines for m, lines in found.items() if lines}, found


def test_the_function_level_import_check_sees_them():
    """The check above finds the imports cli.py makes lazily (and so would find one anywhere else)."""
    lines = function_level_imports("rlprefix.cli")
    assert any("rlprefix.pipeline" in line for line in lines) and any("rewards" in line for line in lines), lines


def test_rewards_do_not_import_rlprefix():
    """`rewards` is usable on its own (e.g. handed to TRL); rlprefix builds on it, never the other way."""
    graph = module_graph()
    for m in (n for n in graph if n.split(".")[0] == "rewards"):
        assert not {d for d in graph[m] if d.split(".")[0] == "rlprefix"}, m


def test_every_module_imports_on_its_own():
    """`python -c "import rlprefix.<m>"` for each module; heavy third-party modules stay loaded between them."""
    script = ("import importlib, sys\n"
              f"for m in {MODULES!r}:\n"
              "    for k in [k for k in sys.modules if k.split('.')[0] in ('rlprefix', 'rewards')]:\n"
              "        del sys.modules[k]\n"
              "    importlib.import_module(m)\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=600)


def test_version_is_defined_once_and_matches_pyproject():
    import tomllib

    from rlprefix import __version__
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__
