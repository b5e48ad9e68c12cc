"""The shape of the code, checked by `make test` rather than by hand: tests import helpers only from
tests/support, the HTTP server stays in small functions, kubellm/ has no import cycle, the light entry points
load no torch, and the engine imports where the server and operator libraries are absent."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVER = ROOT / "kubellm/runtime/server"
APP_MAX_LINES = 300
FUNCTION_MAX_LINES = 80


# ------------------------------------------------------------- tests import no test module ---
def _is_test_module(dotted: str) -> bool:
    last = dotted.rsplit(".", 1)[-1]
    return last == "conftest" or last.startswith("test_")


def _package_of(path: pathlib.Path, root: pathlib.Path) -> list[str]:
    return list(path.relative_to(root).parent.parts)


def imports_of_test_modules(root: pathlib.Path) -> list[str]:
    """Every import, at any depth of a file under root/tests, that names a test module or a conftest."""
    found = []
    for path in sorted((root / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the file's package, up level - 1
                    package = _package_of(path, root)
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join([*package, *([base] if base else [])])
                # `from pkg import test_x` imports the module pkg.test_x
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if any(_is_test_module(prefix) for prefix in _prefixes(target)):
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {target}")
                    break
    return found


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def test_no_test_imports_from_another_test_module():
    found = imports_of_test_modules(ROOT)
    assert not found, "move what these import to tests/support/:\n" + "\n".join(found)


def test_the_test_import_check_finds_test_module_imports(tmp_path):
    files = {
        "tests/unit/test_a.py": "X = 1\n",
        "tests/unit/test_b.py": "from tests.unit.test_a import X\n",
        "tests/unit/test_c.py": "def f():\n    from .test_a import X\n",
        "tests/unit/test_d.py": "from tests.unit import test_a\n",
        "tests/e2e/test_e.py": "import tests.e2e.conftest\n",
        "tests/e2e/test_f.py": "from tests.support.server import KEY\nfrom tests.conftestx import Y\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = imports_of_test_modules(tmp_path)
    assert [f.split(" imports ")[0] for f in found] == [
        "tests/e2e/test_e.py:1",
        "tests/unit/test_b.py:1",
        "tests/unit/test_c.py:2",
        "tests/unit/test_d.py:1",
    ], found


# -------------------------------------------------------------------- the server stays small ---
def long_functions(directory: pathlib.Path, limit: int) -> list[str]:
    """Top-level functions and methods (nested functions count toward their parent) over limit lines."""
    found = []
    for path in sorted(directory.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for qualname, node in _functions(tree.body, ""):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                where = path.relative_to(ROOT if path.is_relative_to(ROOT) else directory)
                found.append(
                    f"{where}: {qualname} is {length} lines ({node.lineno}-{node.end_lineno}; at most {limit})"
                )
    return found


def _functions(body: list[ast.stmt], prefix: str):
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}{node.name}.")


def test_app_module_is_at_most_300_lines():
    lines = len((SERVER / "app.py").read_text().splitlines())
    assert lines <= APP_MAX_LINES, f"kubellm/runtime/server/app.py is {lines} lines (at most {APP_MAX_LINES})"


def test_no_server_function_is_over_80_lines():
    found = long_functions(SERVER, FUNCTION_MAX_LINES)
    assert not found, "functions too long in kubellm/runtime/server/:\n" + "\n".join(found)


def test_the_length_check_counts_nested_functions_toward_their_parent(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(78))
    (tmp_path / "a.py").write_text(
        "def short():\n    return 1\n\n\n"
        f"def outer():\n    def inner():\n{body}\n    return inner\n\n\n"
        "class C:\n    async def method(self):\n" + "\n".join(f"        y{i} = {i}" for i in range(80)) + "\n"
    )
    found = long_functions(tmp_path, FUNCTION_MAX_LINES)
    assert found == [
        "a.py: outer is 81 lines (5-85; at most 80)",
        "a.py: C.method is 81 lines (89-169; at most 80)",
    ], found


# ----------------------------------------------------------------------------- import cycles ---
def strongly_connected(nodes, successors) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module, or of one that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(successors(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors(child)))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1 or v in successors(v):
                    components.append(sorted(component))
    return components


def import_cycles(package: str) -> list[str]:
    """Each import cycle in package (imports at module level and inside functions alike), as readable text:
    the modules of the cycle and, for each import inside it, the line that makes it."""
    import grimp

    graph = grimp.build_graph(package, cache_dir=None)
    reports = []
    for component in strongly_connected(graph.modules, graph.find_modules_directly_imported_by):
        members = set(component)
        lines = [" -> ".join(_one_cycle(graph, component[0], members))]
        for importer in component:
            for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
                for d in graph.get_import_details(importer=importer, imported=imported):
                    lines.append(f"    {importer}:{d['line_number']}: {d['line_contents']}")
        reports.append("\n".join(lines))
    return reports


def _one_cycle(graph, start: str, members: set[str]) -> list[str]:
    """A shortest path from start back to start inside the component."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.find_modules_directly_imported_by(v) & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return [start]


def test_no_import_cycle_in_kubellm():
    cycles = import_cycles("kubellm")
    assert not cycles, "import cycles in kubellm/:\n" + "\n".join(cycles)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclepkg import b\n")
    (pkg / "b.py").write_text("import cyclepkg.c\n")
    (pkg / "c.py").write_text("def late():\n    from cyclepkg.a import b\n")
    (pkg / "free.py").write_text("from cyclepkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cycles = import_cycles("cyclepkg")
    assert len(cycles) == 1, cycles
    assert cycles[0].splitlines()[0] == "cyclepkg.a -> cyclepkg.b -> cyclepkg.c -> cyclepkg.a"
    assert "cyclepkg.c:2: from cyclepkg.a import b" in cycles[0]


# ---------------------------------------------------------------- what an import loads -------
_IMPORT_SPY = """
import importlib, sys, traceback

WATCHED = {watched!r}
BLOCKED = {blocked!r}
first = {{}}


class Spy:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        if top in WATCHED and top not in first:
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<")]
            first[top] = "".join(traceback.format_list(frames))
        return None


sys.meta_path.insert(0, Spy())
for module in {modules!r}:
    importlib.import_module(module)
loaded = [w for w in WATCHED if w in sys.modules]
for w in loaded:
    print(f"{{w}} was imported here:\\n{{first.get(w, '(before the spy)')}}")
sys.exit(3 if loaded else 0)
"""


def run_imports(modules, watched=(), blocked=(), path=None) -> subprocess.CompletedProcess:
    """Import modules in a fresh interpreter; exit 3 (with the import stack) if a watched package was
    loaded, nonzero with a traceback if an import failed, e.g. on a blocked package."""
    script = _IMPORT_SPY.format(watched=set(watched), blocked=set(blocked), modules=list(modules))
    env = None
    if path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env
    )


LIGHT = ["kubellm.settings", "kubellm.operator", "kubellm.operator.main", "kubellm.cli", "kubellm.runtime"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_leave_torch_out(module):
    r = run_imports([module], watched=["torch"])
    assert r.returncode == 0, f"import {module}: exit {r.returncode}\n{r.stdout[-4000:]}{r.stderr[-4000:]}"


# The server's and the operator's libraries: the engine and the model code import without them.
SERVING_LIBRARIES = ["fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "pydantic_settings"]
SERVING_LIBRARIES += ["kopf", "kubernetes"]


def test_engine_and_model_import_without_the_server_and_operator_libraries():
    r = run_imports(["kubellm.runtime.engine.engine", "kubellm.runtime.model.decoder"], blocked=SERVING_LIBRARIES)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def test_the_import_checks_see_what_an_import_loads(tmp_path):
    (tmp_path / "light_entry.py").write_text("import heavy_dep\n")
    (tmp_path / "heavy_dep.py").write_text("")
    (tmp_path / "uses_fastapi.py").write_text("import json\nimport fastapi\n")
    r = run_imports(["light_entry"], watched=["heavy_dep"], path=tmp_path)
    assert r.returncode == 3 and "light_entry.py" in r.stdout, r.stdout + r.stderr
    assert run_imports(["json"], watched=["heavy_dep"], path=tmp_path).returncode == 0
    r = run_imports(["uses_fastapi"], blocked=SERVING_LIBRARIES, path=tmp_path)
    assert r.returncode == 1 and "No module named 'fastapi' (blocked by the test)" in r.stderr, r.stderr
