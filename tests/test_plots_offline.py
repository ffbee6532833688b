"""Plots render offline: `dvc plots show/diff` pages use the vendored Vega (no CDN), checked
in a real headless Chromium (the system binary, driven by Playwright). The browser tests skip
when no Chromium is installed (`apt-get install chromium`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from toy_repos import dvc, make_exp_repo, run

from reprotune.team.plots_html import SCRIPTS, TEMPLATE, VENDOR_DIR, build_template

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
# Titles of the pipeline's plots (dvc.yaml: top-level `plots` and the stages' image plots).
# throughput is not a curve: it changes run to run (metrics/timing/train.json has it)
PIPELINE_TITLES = ["Loss curves", "Learning rate", "Gradient norm"]
ALIGN_PLOTS = 3  # align's loss, rewards and accuracy: drawn empty (no title) under method none
TRAIN_CURVES = ("train_loss", "val_loss", "learning_rate", "grad_norm")
PIPELINE_IMAGES = ["metrics/plots/token_lengths.png", "metrics/plots/confusion.png"]


def test_template_is_built_from_the_vendored_files() -> None:
    assert TEMPLATE.read_text(encoding="utf-8") == build_template(), \
        "plots/offline.html is stale: run python -m reprotune.team.plots_html"
    readme = (VENDOR_DIR / "README.md").read_text()
    for name in SCRIPTS:
        assert hashlib.sha256((VENDOR_DIR / name).read_bytes()).hexdigest() in readme, name
        assert (VENDOR_DIR / f"LICENSE-{name.removesuffix('.min.js')}").read_text().count(
            "Redistribution and use in source and binary forms") == 1
    assert "<script src" not in TEMPLATE.read_text() and "{plot_divs}" in TEMPLATE.read_text()


@pytest.fixture(scope="module")
def plots_repo(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout when the train and align stages have run there; otherwise (a fresh
    clone: their curves are DVC-cached outputs, not in git) a copy of its tracked files with
    the train stage's curves written by its own CurveWriter (a few rows) and align's as its
    pass-through writes them (headers only), so DVC still builds every page."""
    from reprotune.train.align import DRAWN
    from reprotune.train.curves import CurveWriter

    curves = {"curves": TRAIN_CURVES, "align_curves": DRAWN}
    if all((repo_root / "metrics" / d / "plots" / "metrics" / f"{n}.tsv").is_file()
           for d, names in curves.items() for n in names):
        return repo_root
    dst = tmp_path_factory.mktemp("plots") / "repo"
    files = run(["git", "ls-files"], repo_root).stdout.split()
    for f in files:
        if (repo_root / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / f, dst / f)
    (dst / "dvc.lock").unlink()  # its curves hash names a cache this copy does not have
    run(["git", "init", "-q"], dst)
    writer = CurveWriter(dst / "metrics" / "curves", resume=False)
    for step in range(0, 25, 5):
        writer.step = step
        for i, name in enumerate(TRAIN_CURVES):
            writer.log(name, (i + 1) * 2.0 / (step + 1))
    writer.summary()
    # align under the default method none: header-only curves, as its pass-through writes
    align = CurveWriter(dst / "metrics" / "align_curves", resume=False)
    align.ensure(DRAWN)
    align.summary()
    return dst


def test_dvc_plots_show_uses_the_offline_template(plots_repo: Path, tmp_path: Path) -> None:
    dvc(plots_repo, "plots", "show", "-o", str(tmp_path / "out"))
    page = (tmp_path / "out" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src" not in page
    assert all(f'"text": "{t}"' in page for t in PIPELINE_TITLES)


def _chromium() -> str | None:
    for name in (os.environ.get("REPROTUNE_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=binary, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _render(browser: Any, page_file: Path, screenshot: Path) -> dict[str, Any]:
    """Open the page with every non-file request blocked; wait until each plot is drawn."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)

    def offline(route: Any) -> None:
        if not route.request.url.startswith("file://"):
            problems.append(f"network request: {route.request.url}")
            route.abort()
        else:
            route.continue_()

    page.route("**/*", offline)
    page.goto(page_file.as_uri())
    page.wait_for_function("() => window.reprotunePlots && document.readyState === 'complete' && "
                           "window.reprotunePlots.rendered + window.reprotunePlots.errors.length"
                           " === window.reprotunePlots.started", timeout=30_000)
    state = page.evaluate("""() => ({
        plots: window.reprotunePlots,
        titles: Array.from(document.querySelectorAll('svg .role-title-text')).map(t => t.textContent),
        captions: Array.from(document.querySelectorAll('body > div > p')).map(p => p.textContent),
        images: Array.from(document.images).map(i => i.naturalWidth),
        points: document.querySelectorAll('svg .mark-symbol.role-mark path').length})""")
    page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    state["problems"] = problems
    return state


def test_pipeline_plots_render_in_chromium(browser: Any, plots_repo: Path, repo_root: Path,
                                           tmp_path: Path) -> None:
    dvc(plots_repo, "plots", "show", "-o", str(tmp_path / "out"))
    shot = tmp_path / "plots.png"
    state = _render(browser, tmp_path / "out" / "index.html", shot)
    assert state["problems"] == [] and state["plots"]["errors"] == []
    assert state["plots"]["rendered"] == len(PIPELINE_TITLES) + ALIGN_PLOTS
    assert state["titles"] == PIPELINE_TITLES
    assert set(PIPELINE_IMAGES) <= set(state["captions"])
    assert len(state["images"]) == len(PIPELINE_IMAGES) and all(w > 100 for w in state["images"])
    assert shot.stat().st_size > 20_000
    if os.environ.get("REPROTUNE_UPDATE_SCREENSHOT"):  # refreshes the README's picture
        shutil.copy(shot, repo_root / "docs" / "plots.png")


def test_experiment_plots_render_in_chromium(browser: Any, tmp_path: Path) -> None:
    repo = make_exp_repo(tmp_path / "repo", {"low-lr": 1e-4, "high-lr": 3e-3})
    run([sys.executable, "-m", "reprotune.team.exps", "plot"], repo)
    shot = tmp_path / "exps.png"
    state = _render(browser, repo / "dvc_plots" / "exps" / "index.html", shot)
    assert state["problems"] == [] and state["plots"]["errors"] == []
    assert state["titles"] == ["lr vs best_val_loss across experiments"]
    assert state["points"] == 3  # main, low-lr, high-lr
    if os.environ.get("REPROTUNE_UPDATE_SCREENSHOT"):
        shutil.copy(shot, Path(__file__).resolve().parents[1] / "docs" / "exps_plot.png")
    # `dvc plots diff`: the experiment's curve beside main's, through the same template
    dvc(repo, "plots", "diff", "main", "-o", str(tmp_path / "diff"))
    state = _render(browser, tmp_path / "diff" / "index.html", tmp_path / "diff.png")
    assert state["problems"] == [] and state["plots"]["rendered"] == 1
    assert state["titles"] == ["out/curve.tsv"]
