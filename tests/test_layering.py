"""The module graph: the layering (which subpackage may import which), no import cycle among rlprefix and rewards
modules (read from each file's top-level imports), no function importing one of them (which would hide a cycle from
that check), the model-family question asked only inside rlprefix.models, and every module importing on its own."""
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


# Floors from the ground up (README, "Package map"): a module imports only from lower floors, or from its own group
# on the same floor. train and serve share floor 6 and never import each other.
FLOORS = {
    "rewards": (1, "rewards"),
    "rlprefix.version": (1, "base"), "rlprefix.files": (1, "base"), "rlprefix.lock": (1, "base"),
    "rlprefix.settings": (1, "base"), "rlprefix.seeds": (1, "base"), "rlprefix.guards": (1, "base"),
    "rlprefix.messages": (1, "base"),
    "rlprefix.distributed": (2, "distributed"),
    "rlprefix.models": (3, "models"),
    "rlprefix.prefixes": (4, "prefixes"),
    "rlprefix.decoding": (5, "decoding"), "rlprefix.images": (4, "images"),
    "rlprefix.train": (6, "train"), "rlprefix.serve": (6, "serve"),
    "rlprefix.config": (7, "run"), "rlprefix.recipe": (7, "run"), "rlprefix.sweep": (7, "run"),
    "rlprefix.preflight": (7, "run"), "rlprefix.freshness": (7, "run"), "rlprefix.summary": (7, "run"),
    "rlprefix": (7, "run"),  # the package's public API
    "rlprefix.cli": (8, "cli"),
}


def floor_of(module: str) -> tuple[int, str]:
    """The floor of a module: that of its longest listed prefix."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no floor: add it to FLOORS (and to the README's package map)")


def test_every_module_has_a_floor():
    for m in PACKAGES + MODULES:
        floor_of(m)


def test_layering():
    """config -> model + prefix -> stage -> artifacts, serving on top of decoding: no import goes up a floor, and
    train and serve never import each other."""
    wrong = []
    for m, deps in module_graph().items():
        floor, group = floor_of(m)
        for d in deps:
            d_floor, d_group = floor_of(d)
            if d_floor > floor or (d_floor == floor and d_group != group):
                wrong.append(f"{m} (floor {floor}, {group}) imports {d} (floor {d_floor}, {d_group})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_layering_check_sees_a_wrong_import():
    """The check above reads real edges: the engine (decoding) imports models, never the reverse."""
    graph = module_graph()
    assert "rlprefix.models.adapter" in graph["rlprefix.decoding.engine"] or any(
        d.startswith("rlprefix.models") for d in graph["rlprefix.decoding.engine"])
    assert floor_of("rlprefix.decoding.engine")[0] > floor_of("rlprefix.models.adapter")[0]
    assert floor_of("rlprefix.serve.app")[0] == floor_of("rlprefix.train.ppo")[0]


# the family question: only the model-family adapter (rlprefix.models) asks it; the artifact format keeps its
# manifest field (`encoder_decoder`) so that existing artifacts load
FAMILY_QUESTION = {"is_encoder_decoder", "encoder_decoder"}
FAMILY_QUESTION_ALLOWED = {"rlprefix.prefixes.artifacts"}


def test_the_family_question_is_asked_only_in_models():
    asked = []
    for m in MODULES:
        if m.startswith("rlprefix.models.") or m in FAMILY_QUESTION_ALLOWED or not m.startswith("rlprefix"):
            continue
        for node in ast.walk(ast.parse((ROOT / f"{m.replace('.', '/')}.py").read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in FAMILY_QUESTION:
                asked.append(f"{m}:{node.lineno} {name}")
    assert not asked, asked


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
    assert any("rlprefix.recipe" in line for line in lines) and any("rewards" in line for line in lines), lines


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


# short files, top-to-bottom reading (README, "Package map"): the sizes the redesign keeps
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 420, 60


def test_modules_and_functions_stay_short():
    long = []
    for m in MODULES:
        if not m.startswith("rlprefix"):
            continue
        src = (ROOT / f"{m.replace('.', '/')}.py").read_text()
        if len(src.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{m}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {lines} lines")
    assert not long, long
