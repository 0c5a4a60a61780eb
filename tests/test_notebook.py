"""docs/quickstart.ipynb: a valid nbformat-4 notebook, committed without outputs, whose code cells
run in order in one namespace (as a Jupyter kernel runs them) and end with a distilled, scored set.
Read with the json module: nbformat and Jupyter are not dependencies."""

import ast
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"
FMNIST = Path(os.environ.get("MGD3_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST is not installed")
CELL_KEYS = {"markdown": {"cell_type", "id", "metadata", "source", "attachments"},
             "code": {"cell_type", "id", "metadata", "source", "outputs", "execution_count"},
             "raw": {"cell_type", "id", "metadata", "source", "attachments"}}


def source(cell: dict) -> str:
    """A cell's text (nbformat stores it as one string or a list of lines)."""
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


def code_cells(nb: dict) -> list[tuple[str, str]]:
    """(id, source) of every code cell, in order."""
    return [(c["id"], source(c)) for c in nb["cells"] if c["cell_type"] == "code"]


def run_cell(code: str, scope: dict, name: str):
    """Run one cell as a kernel does: its statements, then the value of a last bare expression (what
    Jupyter shows under the cell), which is returned; None when the cell ends with a statement."""
    tree = ast.parse(code, filename=name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, name, "exec"), scope)
    return None if last is None else eval(compile(ast.Expression(last.value), name, "eval"), scope)


def test_the_notebook_is_nbformat_4_without_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5  # 4.5: cells carry ids
    assert set(nb) == {"cells", "metadata", "nbformat", "nbformat_minor"}
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
    for c in nb["cells"]:
        assert set(c) <= CELL_KEYS[c["cell_type"]] and isinstance(c["metadata"], dict), c["id"]
        assert isinstance(c["source"], str) or all(isinstance(line, str) for line in c["source"]), c["id"]
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None, f"cell {c['id']} holds outputs"
    assert nb["cells"][0]["cell_type"] == "markdown" and source(nb["cells"][0]).startswith("# ")
    for cid, code in code_cells(nb):
        ast.parse(code, filename=cid)  # plain Python: no IPython magics, so it runs outside Jupyter
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    assert "(docs/quickstart.ipynb)" in section


@pytest.mark.slow
@needs_fmnist
def test_the_notebook_runs_and_scores_a_set(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)  # the notebook writes runs/... relative to where it runs
    monkeypatch.setitem(sys.modules, "IPython", None)  # as plain Python: `import IPython` fails
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    scope: dict = {"__name__": "__main__"}
    shown = {cid: run_cell(code, scope, f"quickstart.ipynb[{cid}]") for cid, code in code_cells(nb)}

    s, result = scope["s"], scope["result"]
    assert repr(shown["distill"]).startswith("DistillResult('runs/quickstart', 6 images, 3 classes, ")
    assert repr(shown["load"]).startswith("DistilledSet('runs/quickstart', 6 images of 1x28x28, 3 classes, IPC 2, "
                                          "method 'mgd3', latents")
    assert len(s) == 6 and s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.class_names == ["T-shirt/top", "Trouser", "Sneaker"]
    assert result["set"]["num_images"] == 6 and result["seeds"] == [0] and result["protocol"]["epochs"] == 10
    assert 0 < result["mean"] <= 100 and 0 < result["references"]["random_real"]["mean"] <= 100
    assert json.loads((tmp_path / "runs" / "quickstart" / "eval.json").read_text())["mean"] == result["mean"]
    out = capsys.readouterr().out.splitlines()
    assert "runs/quickstart/grid.png" in out  # no IPython: the grid's path
    assert re.fullmatch(r"convnet-3: \d+\.\d% test accuracy; random real images \d+\.\d% \(IOR [+-]\d+\.\d\)",
                        out[-1])

    displayed = []  # under IPython the grid cell shows the PNG
    display = types.ModuleType("IPython.display")
    display.Image, display.display = (lambda filename: Path(filename)), displayed.append
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    grid = dict(code_cells(nb))["grid"]
    run_cell(grid, scope, "quickstart.ipynb[grid]")
    assert [p.resolve() for p in displayed] == [(tmp_path / "runs" / "quickstart" / "grid.png").resolve()]
    assert displayed[0].read_bytes().startswith(b"\x89PNG")
