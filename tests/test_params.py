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


def test_any_stage_load_validates_the_whole_file(tmp_path: Path) -> None:
    # an eval typo is caught by the first stage that runs, not after training
    p = _write(tmp_path, "dedup:\n  threshold: 0.9\neval:\n  max_new_tokns: 64\n")
    with pytest.raises(ParamsError, match=r"eval\.max_new_tokns: unknown key.*'max_new_tokens'"):
        load_section("dedup", p)
    with pytest.raises(ParamsError, match=r"lrr: unknown top-level key \(did you mean 'lr'\?\)"):
        load_top(_write(tmp_path, "lr: 0.1\nlrr: 0.1\n"))


def test_auto_or_number(tmp_path: Path) -> None:
    assert load_section("format", _write(tmp_path, "format:\n  max_length: auto\n")).max_length == "auto"
    assert load_section("format", _write(tmp_path, "format:\n  max_length: '512'\n")).max_length == 512
    assert load_section("eval", _write(tmp_path, "eval:\n  max_new_tokens: 64\n")).max_new_tokens == 64
    with pytest.raises(ParamsError, match=r"format\.max_length: 'long' is not an integer or 'auto'"):
        load_section("format", _write(tmp_path, "format:\n  max_length: long\n"))
    with pytest.raises(ParamsError, match=r"eval\.max_new_tokens: 0 must be >= 1"):
        load_section("eval", _write(tmp_path, "eval:\n  max_new_tokens: 0\n"))


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"line 3: not valid YAML"):
        read_params(_write(tmp_path, "lr: 0.1\nepochs: 2\n  seed: 1\nbatch_size: 4\n"))


@pytest.mark.parametrize("text, code, line", [
    ("lr: 0.1\n", 0, "params.yaml is valid"),
    ("lr: 0.1\ntrain:\n  patiance: 2\n", 1,
     "params.yaml: train.patiance: unknown key (did you mean 'patience'?)"),
])
def test_check_command_prints_one_line(tmp_path: Path, text: str, code: int, line: str) -> None:
    import subprocess
    import sys

    _write(tmp_path, text)
    proc = subprocess.run([sys.executable, "-m", "reprotune.params"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code
    out = (proc.stdout + proc.stderr).strip()
    assert out.startswith(line) and len(out.splitlines()) == 1


def test_every_stage_refuses_a_bad_file_before_writing(tmp_path: Path, repo_root: Path) -> None:
    """The stage entry points validate all of params.yaml in runtime.setup, before any I/O."""
    import subprocess
    import sys

    _write(tmp_path, "demo:\n  rows: 20\neval:\n  max_new_tokns: 64\n")
    for stage in ("check", "demo", "merge"):  # merge reads no params section at all
        proc = subprocess.run([sys.executable, str(repo_root / "stages" / f"{stage}.py")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, stage
        assert proc.stderr.strip() == (f"{stage}: params.yaml: eval.max_new_tokns: unknown key "
                                       f"(did you mean 'max_new_tokens'?); known keys: "
                                       + proc.stderr.split("known keys: ")[1].strip())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_params_yaml_is_in_the_layout_dvc_writes(repo_root: Path, tmp_path: Path) -> None:
    """`dvc exp run -S lr=...` rewrites params.yaml through DVC's YAML round trip: the
    committed file is already in that layout, so an experiment's diff is the changed value."""
    from dvc.utils.serialize._yaml import modify_yaml

    copy = tmp_path / "params.yaml"
    copy.write_bytes((repo_root / "params.yaml").read_bytes())
    with modify_yaml(str(copy)) as data:
        data["lr"] = data["lr"]
    assert copy.read_bytes() == (repo_root / "params.yaml").read_bytes()
    with modify_yaml(str(copy)) as data:
        data["lr"] = 0.0002
    changed = [(a, b) for a, b in zip((repo_root / "params.yaml").read_text().splitlines(),
                                      copy.read_text().splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0][1].startswith("lr: 0.0002")


def test_train_mode_and_packing_values(tmp_path: Path) -> None:
    assert load_section("train", _write(tmp_path, "train:\n  mode: fast\n")).mode == "fast"
    assert load_section("train", _write(tmp_path, "")).mode == "portable"
    with pytest.raises(ParamsError, match=r"^train\.mode: 'quick' is not one of portable, fast$"):
        load_section("train", _write(tmp_path, "train:\n  mode: quick\n"))
    packing = load_section("train", _write(tmp_path, "train:\n  packing: padding_free\n"))
    assert packing.packing == "padding_free"
    with pytest.raises(ParamsError, match=r"^train\.packing: 'padded' is not one of"):
        load_section("train", _write(tmp_path, "train:\n  packing: padded\n"))
