"""Warnings say what is true and what to do; third-party noise that needs no action is
dropped at the stage's logging set-up (reprotune.runtime.quiet_third_party)."""

from __future__ import annotations

import logging
import warnings

import pytest

from reprotune import runtime
from reprotune.data.formatting import truncation_fix
from reprotune.data.split import split_rows


def test_truncation_fix_never_says_use_auto_when_auto_or_the_model_limit_is_set() -> None:
    # auto capped at the model's own context: raising is impossible
    msg = truncation_fix("auto", 1024, 1024, 1800.0)
    assert "model's own context length (1024 tokens" in msg and "`auto`" not in msg
    assert "Raise" not in msg and "shorten or split these rows" in msg
    # a number at the model's limit: same
    assert "model's own context length" in truncation_fix(4096, 4096, 4096, 5000.0)
    # auto below the model's limit: a number is the way, not `auto`
    msg = truncation_fix("auto", 300, 1024, 612.4)
    assert msg == ("format.max_length: auto gave 300 (the p99 of the rows it was computed from); "
                   "to keep these rows whole set a number near 613 (at most the model's 1024).")
    # a number below the model's limit: raise it or use auto
    assert truncation_fix(64, 64, 1024, 90.0) == (
        "Raise format.max_length (now 64) to about 90 (at most the model's 1024) or use `auto`.")
    assert truncation_fix(64, 64, None, 90.0) == (
        "Raise format.max_length (now 64) to about 90 or use `auto`.")


def _rows(n: int, labelled: bool) -> list[dict]:
    return [{"id": f"r{i}", "source": "t.jsonl", "label": ("a" if i % 2 else "b") if labelled
             else None, "group": None, "meta": {"created_at": 1.7e9 + 86400 * i},
             "messages": [{"role": "user", "content": f"问题 {i} " + "词" * (i % 7)},
                          {"role": "assistant", "content": f"answer number {i * 7919}"}]}
            for i in range(n)]


@pytest.mark.parametrize("labelled, warned", [(False, False), (True, True)])
def test_time_split_warns_about_stratify_only_when_rows_carry_labels(
        caplog: pytest.LogCaptureFixture, labelled: bool, warned: bool) -> None:
    with caplog.at_level(logging.WARNING, logger="reprotune.data.split"):
        result = split_rows(_rows(60, labelled), val_ratio=0.1, test_ratio=0.1, stratify="label",
                            group="group", seed=0, leakage_threshold=0.99, order_by="created_at",
                            on_leak="report")
    assert result.metrics["counts"] == {"train": 48, "val": 6, "test": 6}
    said = [r.getMessage() for r in caplog.records if "split.stratify" in r.getMessage()]
    assert len(said) == int(warned)


def test_tokenizer_length_notice_is_dropped_and_other_warnings_stay(
        caplog: pytest.LogCaptureFixture) -> None:
    from reprotune.modeling import train_tokenizer

    runtime.quiet_third_party()
    runtime.quiet_third_party()  # idempotent: one filter per logger
    tok_logger = logging.getLogger("transformers.tokenization_utils_base")
    assert len(tok_logger.filters) == 1
    tok = train_tokenizer(["一二三四五六七八九十 hello world"] * 20, 300, model_max_length=8)
    tok_logger.addHandler(caplog.handler)  # transformers does not propagate to the root
    try:
        ids = tok("一二三四五六七八九十 hello world " * 5, add_special_tokens=False)["input_ids"]
        assert len(ids) > 8  # long enough for the notice
        tok_logger.warning("something else the user must see")
    finally:
        tok_logger.removeHandler(caplog.handler)
    # a record may reach caplog twice (its handler here, and the root's when an earlier test
    # let transformers' loggers propagate): what matters is which messages came through
    messages = {r.getMessage() for r in caplog.records}
    assert messages == {"something else the user must see"}


def test_bitsandbytes_kernels_hint_is_dropped_other_records_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    runtime.quiet_third_party()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make "
                    "sure you already `pip install kernels` and the kernels >= 0.11.1", "offline")
        bnb.warning("a different bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a different bitsandbytes problem"]


def test_ddp_unused_parameters_notice_is_ignored_other_user_warnings_shown() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        runtime.quiet_third_party()
        warnings.warn("find_unused_parameters=True was specified in DDP constructor, but did not "
                      "find any unused parameters in the forward pass.", UserWarning, stacklevel=1)
        warnings.warn("something to act on", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something to act on"]


def test_two_process_run_keeps_the_lean_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean loss runs inside the wrapped forward, so a DDP run keeps it: no note claiming
    the run has one process only."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from reprotune.train.lean_loss import resolve_loss_impl

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=8))
    for world in ("2", "1"):
        monkeypatch.setenv("WORLD_SIZE", world)
        impl, note = resolve_loss_impl("chunked", "cpu", model, "full")
        assert impl == "chunked" and "process" not in note, note


def test_torchao_cpu_notices_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """torchao's missing CUDA extensions / Triton are expected on CPU: filtered, not shown."""
    runtime.quiet_third_party()
    for name, text in (("torchao", "Failed to load /x/_C_mxfp8.so: no CUDA"),
                       ("torchao.kernel.intmm", "Warning: Detected no triton, on systems ...")):
        logger = logging.getLogger(name)
        logger.addHandler(caplog.handler)
        try:
            logger.warning(text)
            logger.warning("a torchao message to act on")
        finally:
            logger.removeHandler(caplog.handler)
    assert {r.getMessage() for r in caplog.records} == {"a torchao message to act on"}


@pytest.mark.slow  # > 15 s: make test runs it, make test-fast does not
def test_trl_experimental_import_notice_is_dropped_at_stage_setup() -> None:
    """align.method orpo / simpo import trl.experimental, which warns on import: the real
    import, in a fresh process, shows it without the filter and not with it."""
    import os
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('default'); from reprotune import runtime; "
            "{} import trl.experimental.cpo, trl.experimental.orpo")
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    env.pop("TRL_EXPERIMENTAL_SILENCE", None)
    runs = [subprocess.run([sys.executable, "-c", code.format(setup)], capture_output=True,
                           text=True, timeout=300, env=env)
            for setup in ("", "runtime.quiet_third_party();")]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-500:] for r in runs]
    assert "You are importing from 'trl.experimental'" in runs[0].stderr
    assert "trl.experimental" not in runs[1].stderr


def test_gradient_checkpointing_alias_notice_from_trl_is_ignored() -> None:
    """TRL reads the deprecated ``is_gradient_checkpointing`` of the real tiny model: the
    notice it triggers is ignored, the property's value is still read."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=8))
    for quiet in (False, True):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if quiet:
                runtime.quiet_third_party()
            assert model.is_gradient_checkpointing is False
        assert any("is_gradient_checkpointing" in str(w.message) for w in seen) is not quiet


def test_an_empty_stage_file_says_why_before_dvcs_warning(tmp_path, caplog) -> None:
    """DVC's "'<path>' is empty." comes without a reason: the stage logs it (note_empty)."""
    from reprotune import io

    empty, rows = tmp_path / "dropped.jsonl", tmp_path / "kept.jsonl"
    io.write_jsonl(empty, [])
    io.write_jsonl(rows, [{"id": 1}])
    with caplog.at_level(logging.INFO, logger="reprotune"):
        assert io.note_empty(empty, "no row was dropped")
        assert not io.note_empty(rows, "never said") and not io.note_empty(tmp_path / "x", "no")
    assert caplog.messages == [f"{empty} is empty: no row was dropped (DVC's \"is empty\" "
                               f"warning about it needs no action)"]
