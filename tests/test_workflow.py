"""The pull-request workflow calls only real Makefile targets and the GitHub CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "reprotune.yml"


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return YAML(typ="safe", pure=True).load(WORKFLOW.read_text())


def _steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def _make_calls(run: str) -> list[str]:
    """Targets of every `make` call in a shell snippet (options and VAR=value skipped)."""
    targets = []
    for call in re.findall(r"(?:^|[;&|]\s*|\s)make\s+([^;&|\n]*)", run):
        targets += [w for w in call.split() if not w.startswith("-") and "=" not in w
                    and not w.startswith(">")][:1]
    return targets


def test_runs_on_pull_requests(workflow: dict[str, Any]) -> None:
    assert "pull_request" in workflow["on"]
    assert workflow["permissions"]["pull-requests"] == "write"


def test_every_make_call_is_a_real_target(workflow: dict[str, Any]) -> None:
    targets = _makefile_targets()
    calls = [t for step in _steps(workflow) for t in _make_calls(step.get("run", ""))]
    assert calls == ["install", "test-fast", "remote", "pull", "repro", "report"]
    assert set(calls) <= targets, set(calls) - targets


def test_python_with_pip_cache_and_only_official_actions(workflow: dict[str, Any]) -> None:
    uses = [s["uses"] for s in _steps(workflow) if "uses" in s]
    assert [u.split("@")[0] for u in uses] == ["actions/checkout", "actions/setup-python"]
    setup = next(s for s in _steps(workflow) if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["cache"] == "pip" and setup["with"]["python-version"] == "3.11"


def test_pull_only_with_the_remote_secret_then_repro(workflow: dict[str, Any]) -> None:
    steps = _steps(workflow)
    pull = next(s for s in steps if "make pull" in s.get("run", ""))
    assert pull["if"] == "env.DVC_REMOTE_URL != ''"
    assert "secrets.DVC_REMOTE_URL" in WORKFLOW.read_text()
    assert steps.index(pull) < next(i for i, s in enumerate(steps) if "make repro" in s.get("run", ""))


def test_one_comment_posted_or_updated_with_gh(workflow: dict[str, Any]) -> None:
    steps = _steps(workflow)
    step = steps[-1]
    run = step["run"]
    assert step["env"]["GH_TOKEN"] == "${{ github.token }}"
    report = next(s for s in steps if "make -s report" in s.get("run", ""))
    assert 'make -s report REV="origin/$BASE_REF" > report.md' in report["run"]
    assert steps.index(report) < steps.index(step)
    # found by a hidden marker, edited in place; a new comment only when none exists yet
    assert "<!-- reprotune-report -->" in run
    assert 'gh api -X PATCH "repos/$GITHUB_REPOSITORY/issues/comments/$id"' in run
    assert run.count("gh pr comment") == 1 and "curl" not in run
