"""The import direction of docs/ARCHITECTURE.md, checked on the source: every `import` of an mgd3
module (at module level or inside a function) goes to the same or a lower layer, two boundaries
hold inside the layers (the sampler imports no guidance; evaluation imports nothing of diffusion),
and no group of modules imports itself in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# low -> high; a module belongs to the first prefix that matches its dotted name
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mgd3.errors", "mgd3.version", "mgd3.registry", "mgd3.machine", "mgd3.files", "mgd3.config",
              "mgd3.allocator", "mgd3.safeio", "mgd3.faults", "mgd3.images")),
    ("core", ("mgd3.core", "mgd3.io")),
    ("models", ("mgd3.backends", "mgd3.evaluation")),
    ("methods", ("mgd3.methods",)),
    ("run", ("mgd3.run",)),
    ("train", ("mgd3.train", "mgd3.testing")),
    ("report", ("mgd3.report",)),
    ("api", ("mgd3.api", "mgd3")),
    ("cli", ("mgd3.cli", "mgd3.__main__")),
]
# imports that the layer order allows but a boundary forbids: (importer prefix, imported prefix)
FORBIDDEN = [
    ("mgd3.core.sampling", "mgd3.core.guidance"),  # guidance comes into the sampler as callables
    ("mgd3.evaluation", "mgd3.core"),  # evaluation scores a set on disk; it knows nothing of diffusion
    ("mgd3.evaluation", "mgd3.backends"),
    ("mgd3.io", "mgd3.core"),
    ("mgd3.core", "mgd3.io"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "mgd3").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The mgd3 module a dotted name refers to (a module, or the package holding an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Every mgd3 module `module` imports, function-level imports included."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for n in names:
            if n == "mgd3" or n.startswith("mgd3."):
                target = _resolve(n)
                if target and target != module:
                    found.add(target)
    return found


def layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{module} is in no layer of docs/ARCHITECTURE.md"
    return best[0]


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_no_import_goes_up_a_layer():
    up = [f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
          for m, targets in GRAPH.items() for t in sorted(targets) if layer(t) > layer(m)]
    assert not up, "\n".join(up)


def test_boundaries_inside_layers_hold():
    bad = [f"{m} imports {t}" for m, targets in GRAPH.items() for t in sorted(targets)
           for a, b in FORBIDDEN if (m == a or m.startswith(a + ".")) and (t == b or t.startswith(b + "."))]
    assert not bad, "\n".join(bad)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (import cycles)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = strongly_connected(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("graph, cycles", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, cycles):
    assert strongly_connected(graph) == cycles


def test_the_layer_check_sees_function_level_imports(tmp_path):
    src = "def f():\n    from mgd3.cli import main\n    return main\n"
    tree = ast.parse(src)
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found and found[0].module == "mgd3.cli"


def test_a_command_loads_only_its_own_stage():
    """`mgd3 distill` builds distill's parser only: no training, evaluation or report code loads
    (the CLI imports the named command's module alone; `mgd3 --help` imports every one)."""
    import subprocess
    import sys

    code = ("import sys; from mgd3.cli import build_parser; build_parser(['distill', '--ipc', '1']); "
            "print(' '.join(m for m in sys.modules if m.startswith('mgd3.')))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "mgd3.cli.distill" in loaded and "mgd3.methods.mgd3" in loaded  # every method's flags
    assert not {m for m in loaded if m.startswith(("mgd3.train", "mgd3.evaluation", "mgd3.report", "mgd3.cli.evaluate"))}
    code = "import sys; from mgd3.cli import build_parser; build_parser([]); print(' '.join(sys.modules))"
    everything = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert {"mgd3.train.pretrain", "mgd3.cli.evaluate", "mgd3.report", "mgd3.train.convert"} <= everything
