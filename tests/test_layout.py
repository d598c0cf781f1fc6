"""The house rules, read from the source: which room may import which, and no import cycles.

Rooms (arrows point down only): kernels know tensors only; models import kernels at most;
training and generation never import the embedded task, the CLI or the benchmarks; only the CLI
imports the CLI; nothing in the product imports the benchmarks."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"dpo": "fastdpo", "kernels": "fastdpo.kernels", "bench": "fastdpo.bench",
           "configs": "fastdpo.configs"}
# leaf helpers any room may use
BASE = ("fastdpo.files", "fastdpo.configs", "fastdpo.runtime", "fastdpo.errors")
ALLOWED = {   # room -> prefixes it may import (besides itself)
    "fastdpo.kernels": ("fastdpo.errors",),
    "fastdpo.files": (),
    "fastdpo.errors": (),
    "fastdpo.runtime": ("fastdpo.errors",),   # a device the machine lacks is a ConfigError
    "fastdpo.configs": (),
    "fastdpo.models": ("fastdpo.kernels", *BASE),
    "fastdpo.training": ("fastdpo.kernels", "fastdpo.models", *BASE),
    "fastdpo.generation": ("fastdpo.kernels", "fastdpo.models", "fastdpo.training", *BASE),
    "fastdpo.demo": ("fastdpo.kernels", "fastdpo.models", "fastdpo.training", "fastdpo.generation", *BASE),
    "fastdpo.bench": ("fastdpo.kernels", "fastdpo.models", "fastdpo.training", "fastdpo.generation",
                      "fastdpo.demo", *BASE),
    "fastdpo.cli": ("fastdpo",),
}


def modules():
    for folder, package in FOLDERS.items():
        for f in sorted((REPO / folder).rglob("*.py")):
            if f.name.startswith("test_"):
                continue
            parts = list(f.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join([package, *parts]), f


def imports(path: Path, module: str, top_level_only: bool, known=frozenset()):
    """Names a module imports; ``from pkg import sub`` counts as importing ``pkg.sub`` alone when
    ``sub`` is a known module (the package's ``__init__`` is not re-entered for it)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_pkg]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            subs = [f"{name}.{a.name}" for a in node.names]
            if not all(s in known for s in subs):
                yield name
            yield from subs


def room(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["fastdpo", "kernels"] or parts[:2] == ["fastdpo", "bench"]:
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if len(parts) > 1 else "fastdpo"


def test_rooms_import_only_downwards():
    names = {m for m, _ in modules()}
    bad = []
    for module, path in modules():
        r = room(module)
        if r == "fastdpo":   # the package's own __init__: the lazy public API
            continue
        for name in imports(path, module, top_level_only=False):
            if not name.startswith("fastdpo") or name not in names and name.rpartition(".")[0] not in names:
                continue
            target = name if name in names else name.rpartition(".")[0]
            if room(target) == r or target == "fastdpo":
                continue
            if not any(target == p or target.startswith(p + ".") for p in ALLOWED[r]):
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {}
    for module, path in modules():
        known = frozenset(dict(modules()))
        graph[module] = {n for n in imports(path, module, top_level_only=True, known=known) if n in known}
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n == m:
                continue
            if state.get(n) == 1:
                cycle.append(" -> ".join([*stack[stack.index(n):], n]))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, "\n".join(cycle)


def test_modules_stay_readable():
    """No module over ~400 lines without a reason stated in its docstring."""
    long = [f"{m} ({n} lines)" for m, p in modules()
            if (n := len(p.read_text().splitlines())) > 420 and "long because" not in (ast.get_docstring(
                ast.parse(p.read_text())) or "")]
    assert not long, long
