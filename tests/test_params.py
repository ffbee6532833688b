from pathlib import Path

import pytest

from reprotune.params import (
    ParamsError,
    load_section,
    load_top,
    read_params,
    validate_all,
)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_repo_params_are_valid(repo_root: Path) -> None:
    validate_all(read_params(repo_root / "params.yaml"))


def test_dvc_exp_scientific_notation_is_a_float(tmp_path: Path) -> None:
    # `dvc exp run -S lr=2e-5` writes exactly this; YAML 1.1 loaders read it as a string.
    p = _write(tmp_path, "lr: 2e-05\nepochs: 1\n")
    top = load_top(p)
    assert isinstance(top.lr, float) and top.lr == pytest.approx(2e-5)


def test_quoted_number_is_coerced(tmp_path: Path) -> None:
    assert load_top(_write(tmp_path, "lr: '1e-4'\n")).lr == pytest.approx(1e-4)


def test_unknown_key_names_the_key_and_suggests(tmp_path: Path) -> None:
    p = _write(tmp_path, "dedup:\n  treshold: 0.9\n")
    with pytest.raises(ParamsError, match=r"dedup\.treshold: unknown key.*'threshold'"):
        load_section("dedup", p)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"learning_rate: unknown top-level key"):
        read_params(_write(tmp_path, "learning_rate: 0.1\n"))


def test_out_of_range_and_bad_type(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"dedup\.threshold: 1\.5 must be <= 1"):
        load_section("dedup", _write(tmp_path, "dedup:\n  threshold: 1.5\n"))
    with pytest.raises(ParamsError, match=r"batch_size: expected an integer"):
        load_top(_write(tmp_path, "batch_size: many\n"))
    with pytest.raises(ParamsError, match=r"method: 'lorax' is not one of"):
        load_top(_write(tmp_path, "method: lorax\n"))


def test_cross_field_checks(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"split\.val_ratio \+ split\.test_ratio must be < 1"):
        load_section("split", _write(tmp_path, "split:\n  val_ratio: 0.5\n  test_ratio: 0.5\n"))
    with pytest.raises(ParamsError, match=r"dedup\.bands: 30 must divide dedup\.num_perm"):
        load_section("dedup", _write(tmp_path, "dedup:\n  bands: 30\n"))


def test_nested_section_and_nullable(tmp_path: Path) -> None:
    p = _write(tmp_path, "model:\n  tiny:\n    layers: 3\nsplit:\n  stratify: null\n")
    assert load_section("model", p).tiny.layers == 3
    assert load_section("split", p).stratify is None
    with pytest.raises(ParamsError, match=r"model\.tiny\.hiden: unknown key"):
        load_section("model", _write(tmp_path, "model:\n  tiny:\n    hiden: 3\n"))


def test_no_param_named_size_or_nfiles(repo_root: Path) -> None:
    # DVC leaves keys named exactly `size` / `nfiles` out of its run-cache hash (DVC #10296).
    def keys(d, prefix=""):
        for k, v in d.items():
            yield k
            if isinstance(v, dict):
                yield from keys(v)

    assert not {"size", "nfiles"} & set(keys(read_params(repo_root / "params.yaml")))
