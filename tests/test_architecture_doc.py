"""docs/ARCHITECTURE.md stays true, and the package stays one a newcomer can find their way in:
every module the page names exists, no module under src/ is over 450 lines, and the module-level
imports among recursify modules have no cycle, counting the imports inside functions too. Pure file
reading (ast, no imports): milliseconds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "recursify"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
MAX_LINES = 450


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package) for every module under src/."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imports(name: str, path: Path, is_package: bool, known: dict, inside_functions: bool = True) -> set[str]:
    """recursify modules `name` imports: anywhere in the module, or (inside_functions=False) only
    when it is loaded."""
    tree = ast.parse(path.read_text())
    in_functions = set() if inside_functions else {
        id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn) if node is not fn}
    package = name.split(".") if is_package else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(tree):
        if id(node) in in_functions:
            continue
        if isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                deps.add(submodule if submodule in known else base)
    return {d for d in deps if d in known and d != name}


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def named_paths(text: str) -> set[str]:
    """Module paths in `code` spans: any x.py (src/recursify/hub.py, train/losses.py, registry.py)
    and package folders under src/ (src/recursify/data/); other folders (an output dir) are not modules."""
    spans = re.findall(r"`([^`]+)`", text)
    return {token for span in spans for token in re.findall(r"[\w./]+", span)
            if token.endswith(".py") or (token.startswith("src/") and token.endswith("/"))}


def test_the_page_is_one_page():
    assert len(DOC.read_text().splitlines()) <= 100


def test_every_file_and_folder_the_page_names_exists():
    missing = []
    for token in sorted(named_paths(DOC.read_text())):
        if token.startswith(("src/", "tests/", "docs/")):
            ok = (ROOT / token).exists()
        else:  # relative to the package, or to the package the table row is about
            ok = (PKG / token).exists() or any(
                p.relative_to(PKG).as_posix().endswith(token.rstrip("/")) for p in PKG.rglob("*"))
        if not ok:
            missing.append(token)
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_dotted_name_the_page_names_exists():
    known = modules()
    missing = []
    for dotted in sorted(set(re.findall(r"\brecursify(?:\.\w+)+", DOC.read_text()))):
        parts = dotted.split(".")
        cut = max(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
        rest = parts[cut:]
        path = known[".".join(parts[:cut])][0]
        if len(rest) > 1 or (rest and rest[0] not in top_level_names(path)):
            missing.append(dotted)
    assert not missing, f"ARCHITECTURE.md names modules or functions that do not exist: {missing}"


def test_no_module_is_over_450_lines():
    too_long = {str(p.relative_to(ROOT)): n for p in SRC.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_no_import_cycle_among_recursify_modules_even_inside_functions():
    known = modules()
    graph = {name: imports(name, path, is_pkg, known) for name, (path, is_pkg) in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(cycles)
