"""The suite's own time rules (tests/conftest.py): the budget check and the slowest-first order."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest

TESTS = Path(__file__).resolve().parent


def test_every_file_named_slowest_exists_once() -> None:
    assert len(set(conftest.SLOWEST_FILES)) == len(conftest.SLOWEST_FILES)
    assert [f for f in conftest.SLOWEST_FILES if not (TESTS / f).is_file()] == []


def test_the_slowest_files_are_collected_first_and_each_file_keeps_its_order() -> None:
    names = ["test_a.py::x", "test_quantize.py::q1", "test_e2e.py::e1", "test_a.py::y",
             "test_quantize.py::q2", "test_e2e.py::e2", "test_b.py::z"]
    items = [SimpleNamespace(path=TESTS / n.split("::")[0], name=n) for n in names]
    conftest.pytest_collection_modifyitems(None, None, items)  # type: ignore[arg-type]
    assert [i.name for i in items] == ["test_e2e.py::e1", "test_e2e.py::e2", "test_quantize.py::q1",
                                       "test_quantize.py::q2", "test_a.py::x", "test_a.py::y",
                                       "test_b.py::z"]


@pytest.mark.parametrize(("marks", "args", "keyword", "took", "expected"), [
    ("", ["tests"], "", 1199.0, (1200, False)),
    ("", ["tests"], "", 1201.0, (1200, True)),  # past the budget: the run fails
    ("not slow", ["tests/"], "", 301.0, (300, True)),
    ("not slow", ["tests"], "", 250.0, (300, False)),
    ("", ["tests/test_e2e.py"], "", 5000.0, None),  # a selection: no budget
    ("", ["tests"], "lineage", 5000.0, None),
    ("slow", ["tests"], "", 5000.0, None),
])
def test_the_budget_applies_to_the_whole_suite_only(marks, args, keyword, took, expected) -> None:
    root = Path("/repo")
    assert conftest.budget_verdict(marks, args, root, keyword, took) == expected
    if args == ["tests"]:  # pytest may pass testpaths as absolute paths
        assert conftest.budget_verdict(marks, [str(root / "tests")], root, keyword,
                                       took) == expected
