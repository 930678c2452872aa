"""The module graph: every module imports on its own, and no import cycle exists among rlprefix and rewards
modules (read from each file's top-level imports)."""
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
