"""Every family x method either exports with parity (and matches the independent reference where one applies)
or is refused with a message naming the cause; docs/methods.md shows exactly the table this produces."""

from pathlib import Path

import pytest

from .support_matrix import CAUSES, FAMILIES, METHODS, markdown, run_cell

_CELLS: dict = {}


def _cells(family):
    if family.label not in _CELLS:
        _CELLS[family.label] = [run_cell(family, method) for method in METHODS]
    return _CELLS[family.label]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES, ids=[f.label for f in FAMILIES])
def test_family(family):
    for cell in _cells(family):
        expected = family.refused.get(cell.method)
        if expected is not None:
            assert cell.outcome == f"refused: {expected}", (cell.method, cell.detail)
            assert CAUSES[expected] in cell.detail
        elif (family.reference or family.positional) and cell.method not in family.unreferenced:
            assert cell.outcome == "works, matches reference", (cell.method, cell.outcome, cell.detail)
        else:
            assert cell.outcome == "works", (cell.method, cell.outcome, cell.detail)


@pytest.mark.slow
def test_docs_show_this_matrix():
    cells = [cell for family in FAMILIES for cell in _cells(family)]
    page = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    assert markdown(cells) in page, "docs/methods.md's support matrix is stale: run python -m tests.support_matrix"
