"""The dependency rules of docs/architecture.md, checked on the source: who may import whom, where the storage
layout is spelled, and what `import catversion` and `catversion --help` load."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("catversion", "pipelines", "serve")
# Everything that ships or runs as the product (tests may spell paths to check the contract).
PRODUCT_DIRS = (*PACKAGES, "infra", "benchmarks")
HEAVY = ("torch", "ray", "diffusers", "transformers", "fastapi", "starlette", "uvicorn", "aiohttp")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level?) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under `if TYPE_CHECKING:` never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top_level.discard(id(node))
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            found.append((target, node.lineno, id(node) in top_level))
    return found


def graph(module_level_only: bool) -> dict[str, set[str]]:
    known = modules()
    edges = defaultdict(set)
    for name, path in known.items():
        for target, _, top in imports_of(name, path):
            if target in known and target != name and (top or not module_level_only):
                edges[name].add(target)
    return edges


def test_no_import_circle():
    # Every import counts, also those inside functions: a lazy import is still a dependency.
    edges = graph(module_level_only=False)
    # Packages import their own __init__ (e.g. `from . import storage`); that is not a circle.
    edges = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in edges.items()}
    visiting, done, cycles = set(), set(), []

    def visit(node, stack):
        visiting.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt in visiting:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        visiting.discard(node)
        done.add(node)

    for start in sorted(modules()):
        if start not in done:
            visit(start, [start])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package, forbidden", [
    ("catversion", ("pipelines", "serve")),  # the library stands alone
    ("pipelines", ("serve",)),  # the batch jobs and the server never import each other
    ("serve", ("pipelines",)),
])
def test_dependencies_point_one_way(package, forbidden):
    bad = []
    for name, path in modules().items():
        if name.split(".")[0] != package:
            continue
        for target, line, _ in imports_of(name, path):
            if target.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_library_imports_no_ray_or_http_at_import_time():
    bad = []
    for name, path in modules().items():
        if name.split(".")[0] != "catversion":
            continue
        for target, line, top in imports_of(name, path):
            if top and target.split(".")[0] in ("ray", "fastapi", "starlette", "uvicorn", "aiohttp", "requests"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


LAYOUT_WORDS = ("residuals", "runs", "results.parquet")


def _layout_literals(path: Path) -> list[str]:
    """String literals (not docstrings or help prose) that spell a piece of the storage layout."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    # A bare word is a path piece only where a path is built: an argument of a path-joining call
    # (storage.join, Path, ...) or an operand of `/`. As a settings name ("residuals": PREFIX) it is not.
    path_parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("join", "joinpath", "Path", "PurePosixPath", "with_name", "urljoin"):
                path_parts.update(id(arg) for arg in node.args)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            path_parts.update((id(node.left), id(node.right)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if (text in LAYOUT_WORDS and id(node) in path_parts) or "results.parquet" in text or any(
                    f"/{word}/" in text or text.startswith(f"{word}/") or text.endswith(f"/{word}")
                    for word in ("residuals", "runs")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    return found


def test_the_storage_layout_is_spelled_in_one_module():
    layout = ROOT / "catversion" / "layout.py"
    assert _layout_literals(layout), "catversion/layout.py should define the layout (the check found nothing there)"
    spelled = [hit for directory in PRODUCT_DIRS for path in sorted((ROOT / directory).rglob("*.py"))
               if path != layout for hit in _layout_literals(path)]
    assert not spelled, "the storage layout is spelled outside catversion/layout.py:\n" + "\n".join(spelled)


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(','.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(done.stdout.strip().splitlines()[-1].split(","))


def test_import_catversion_is_light_and_names_load_on_first_use():
    loaded = _loaded_after("import catversion")
    assert not [m for m in HEAVY if m in loaded], f"`import catversion` loaded {[m for m in HEAVY if m in loaded]}"
    loaded = _loaded_after("from catversion import Residual, ResidualTextEncoder\nassert Residual.load and ResidualTextEncoder")
    assert "torch" in loaded and "catversion.encoder" in loaded


def test_help_loads_neither_torch_nor_ray():
    loaded = _loaded_after(
        "import contextlib, io\nfrom catversion.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['batch', '--help'], ['serve', '--help'], ['evaluate', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
    )
    heavy = [m for m in HEAVY if m in loaded]
    assert not heavy, f"`catversion --help` loaded {heavy}"


MAX_FUNCTION_LINES = 100


def test_no_function_is_longer_than_a_reader_can_hold():
    """A function in the product packages is at most MAX_FUNCTION_LINES lines, counting the functions
    nested in it (they share its state): split one that grows past that into parts with names."""
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
