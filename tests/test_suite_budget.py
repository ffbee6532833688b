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
    ("", ["tests"], "", 1199.0, (1200, False, False)),
    ("", ["tests"], "", 1201.0, (1200, True, False)),  # over: said, within the machine's spread
    ("", ["tests"], "", 1381.0, (1200, True, True)),  # grown past budget + 15%: the run fails
    ("not slow", ["tests/"], "", 346.0, (300, True, True)),
    ("not slow", ["tests"], "", 250.0, (300, False, False)),
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


@pytest.mark.parametrize(("found", "status"), [
    ((1400.0, 1200, True, True), pytest.ExitCode.TESTS_FAILED),
    ((1300.0, 1200, True, False), pytest.ExitCode.OK),
    (None, pytest.ExitCode.OK),
])
def test_a_suite_grown_past_its_budget_fails(monkeypatch: pytest.MonkeyPatch, found,
                                             status) -> None:
    monkeypatch.setattr(conftest, "_verdict", lambda config: found)
    session = SimpleNamespace(config=None, exitstatus=pytest.ExitCode.OK)
    conftest.pytest_sessionfinish(session, 0)  # type: ignore[arg-type]
    assert session.exitstatus == status
