"""The exercises' solutions (notebook cells tagged "solution") run against the library.

Each solution cell stands alone (its own imports) and checks its answer with assert, so
a solution that no longer matches the library fails here, not only in the book build.
The cells run in the notebooks' folder, as Jupyter runs them, each in a fresh namespace.
"""
import json
import os

import matplotlib
import pytest

from conftest import ROOT

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def solution_cells():
    """(notebook name, cell index, source) of every cell tagged "solution"."""
    cells = []
    for path in NOTEBOOKS:
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            if "solution" in cell.get("metadata", {}).get("tags", []):
                cells.append((path.name, i, "".join(cell["source"])))
    return cells


SOLUTIONS = solution_cells()


def test_solutions_are_folded_code_cells():
    assert len(SOLUTIONS) >= 20, f"only {len(SOLUTIONS)} solution cells"
    for path in NOTEBOOKS:
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            tags = cell.get("metadata", {}).get("tags", [])
            if "solution" in tags:
                assert cell["cell_type"] == "code" and "hide-cell" in tags, (path.name, i)
                assert "assert" in "".join(cell["source"]), f"{path.name} cell {i} checks nothing"


@pytest.mark.parametrize("name, index, source", SOLUTIONS,
                         ids=[f"{n}:{i}" for n, i, _ in SOLUTIONS])
def test_solution_runs(name, index, source, monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks")
    monkeypatch.setitem(os.environ, "DDETR_QUICK", "1")
    exec(compile(source, f"{name} cell {index}", "exec"), {"__name__": "__main__"})
    plt.close("all")
