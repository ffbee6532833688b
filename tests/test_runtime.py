"""Stage process set-up: a bad params.yaml value ends the stage with one line, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("stage", "params", "message"), [
    ("train", "method: lorra\n",
     "train: params.yaml: method: 'lorra' is not one of full, freeze, lora, qlora, "
     "prompt_tuning, prefix_tuning"),
    ("dedup", "dedup: {threshhold: 0.8}\n",
     "dedup: params.yaml: dedup.threshhold: unknown key (did you mean 'threshold'?)"),
])
def test_bad_params_end_the_stage_with_one_line(tmp_path, repo_root, stage, params, message):
    (tmp_path / "params.yaml").write_text(params)
    proc = subprocess.run([sys.executable, str(repo_root / "stages" / f"{stage}.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
