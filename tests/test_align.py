"""Preference tuning: pairs through ingest and format, the align stage on TRL's DPOTrainer,
preference metrics, resume, the pass-through and the bad-input paths (tiny model, CPU)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data.ingest import convert_row, ingest_rows
from reprotune.data.pairs import DROP_TOO_LONG, emptied_splits, format_pairs, pair_records
from reprotune.data.preference import PairsError, check_pairs, count_pairs, sides
from reprotune.data.readers import RawRow
from reprotune.params import AlignParams

ROOT = Path(__file__).resolve().parents[1]
Q = [{"role": "user", "content": "第一题：１＋１＝？  (answer in full)"}]


# --------------------------------------------------------------------------- ingest
LAYOUTS = {  # every accepted pair layout -> (prompt turns, chosen text, rejected text)
    "sharegpt objects": {"conversations": [{"from": "human", "value": Q[0]["content"]}],
                         "chosen": {"from": "gpt", "value": "２。"},
                         "rejected": {"from": "gpt", "value": "三，  大概。"}},
    "sharegpt strings": {"conversations": [{"from": "human", "value": Q[0]["content"]}],
                         "chosen": "２。", "rejected": "三，  大概。"},
    "llamafactory alpaca ranking": {"instruction": Q[0]["content"], "input": "",
                                    "chosen": "２。", "rejected": "三，  大概。"},
    "trl plain": {"prompt": Q[0]["content"], "chosen": "２。", "rejected": "三，  大概。"},
    "trl conversational": {"prompt": Q, "chosen": [{"role": "assistant", "content": "２。"}],
                           "rejected": [{"role": "assistant", "content": "三，  大概。"}]},
    "trl implicit prompt": {"chosen": Q + [{"role": "assistant", "content": "２。"}],
                            "rejected": Q + [{"role": "assistant", "content": "三，  大概。"}]},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_pair_layout_becomes_one_record_with_both_answers(layout):
    row = LAYOUTS[layout]
    _, rec = convert_row(json.loads(json.dumps(row, ensure_ascii=False)))
    prompt, chosen, rejected = sides(rec)
    assert prompt == Q  # byte for byte: full-width digits, double spaces
    assert chosen == [{"role": "assistant", "content": "２。"}]
    assert rejected == [{"role": "assistant", "content": "三，  大概。"}]
    assert rec["messages"] == Q + chosen  # SFT trains on chosen, as before


def test_ingest_counts_pairs_and_rejects_bad_pairs_with_reasons():
    rows = [LAYOUTS["trl plain"], {"instruction": "q"},  # missing output: not a pair
            {"prompt": "q", "chosen": "a", "rejected": "a"},
            {"chosen": Q + [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
            {"instruction": "plain sft", "output": "x"}]
    raw = [RawRow(source="f.jsonl", line=i + 1, data=r) for i, r in enumerate(rows)]
    res = ingest_rows(raw)
    c = res.counts
    assert (c["rows_in"], c["kept"], c["with_preference"]) == (5, 2, 1)
    assert c["rejected"]["identical_pair"] == 1 and c["rejected"]["prompt_mismatch"] == 1
    assert c["rows_in"] == c["kept"] + sum(c["rejected"].values())
    assert "preference" not in res.records[1]


def test_real_preference_file_keeps_both_answers_byte_for_byte(shared_dir):
    rows = json.loads((shared_dir / "data" / "dpo_en_demo.json").read_text(encoding="utf-8"))
    for row in rows:
        _, rec = convert_row(row)
        _, chosen, rejected = sides(rec)
        assert chosen[-1]["content"] == row["chosen"]["value"]
        assert rejected[-1]["content"] == row["rejected"]["value"]


# --------------------------------------------------------------------------- format
def _record(prompt: str, chosen: str, rejected: str, i: int) -> dict:
    _, rec = convert_row({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return {**rec, "source": f"t.jsonl:{i}"}


def test_format_pairs_match_the_template_and_drop_long_pairs(tiny_base_dir):
    from reprotune.modeling import load_tokenizer

    tok = load_tokenizer(tiny_base_dir)
    recs = [_record("What is 12 plus 7?", "The answer is 19.", "计算 答案是 19。", 1),
            _record("What is 12 plus 7?", "The answer is 19.", "apple " * 200, 2)]
    rows, stats, dropped = format_pairs(iter(recs), tok, max_length=128, enable_thinking=False)
    rows = list(rows)
    assert (stats["pairs_in"], stats["pairs_out"], stats["dropped"][DROP_TOO_LONG]) == (2, 1, 1)
    assert dropped[0]["reason"] == DROP_TOO_LONG and "not truncated" in dropped[0]["detail"]
    row = rows[0]
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True,
                                   return_dict=True, enable_thinking=False)["input_ids"]
    assert row["prompt_ids"] + row["chosen_ids"] == list(full)
    gen = tok.apply_chat_template(row["prompt"], tokenize=True, return_dict=True,
                                  add_generation_prompt=True, enable_thinking=False)["input_ids"]
    assert row["prompt_ids"] == list(gen)  # the empty think block is prompt, never loss
    assert row["rejected"] == [{"role": "assistant", "content": "计算 答案是 19。"}]
    # one split lost every pair to the length limit: a warning; data without pairs: none
    long_rows, long_only, _ = format_pairs(iter(recs[1:]), tok, max_length=128,
                                           enable_thinking=False)
    assert list(long_rows) == []
    assert emptied_splits({"train": stats, "test": long_only}) == [
        "preference pairs: every one of the test split's 1 pairs was dropped (pair_too_long=1), "
        "so its pairs file is empty: raise format.max_length or shorten them"]
    assert emptied_splits({"train": stats, "val": {"pairs_in": 0, "pairs_out": 0}}) == []


# --------------------------------------------------------------------------- bad input
def test_dpo_without_pairs_names_the_param_and_count():
    with pytest.raises(PairsError, match=r"align.method: dpo needs preference pairs, but the "
                                         r"train split has 0"):
        check_pairs("dpo", 0, 0, 5, "data/interim/splits/train.jsonl")
    check_pairs("none", 4, 0, 0, "x")  # the pass-through needs nothing


def _check_stage(tmp_path, method: str, inputs: str | None = None):
    (tmp_path / "data/interim/splits").mkdir(parents=True, exist_ok=True)
    io.write_jsonl(tmp_path / "data/interim/splits/train.jsonl", [
        {"source": "data/raw/demo.jsonl:1", "id": "a",
         "messages": Q + [{"role": "assistant", "content": "x"}]}])
    params = (ROOT / "params.yaml").read_text(encoding="utf-8").replace(
        "  method: none        # none:", f"  method: {method}        # none:")
    assert f"method: {method}" in params
    if inputs is not None:  # a new input the split predates
        (tmp_path / inputs).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / inputs).write_text("", encoding="utf-8")
        params = params.replace("\n  - data/raw/demo.jsonl\n", f"\n  - {inputs}\n")
        assert inputs in params
    (tmp_path / "params.yaml").write_text(params, encoding="utf-8")
    return subprocess.run([sys.executable, str(ROOT / "stages/check.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_check_stage_fails_before_anything_is_deleted(tmp_path, method):
    proc = _check_stage(tmp_path, method)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"align.method: {method} needs preference pairs, but the train split has 0" in proc.stderr
    assert not (tmp_path / "metrics/params_ok.json").exists()
    assert count_pairs(tmp_path / "data/interim/splits/train.jsonl") == 0


def test_check_stage_does_not_count_a_split_older_than_the_inputs(tmp_path):
    """Switching to a pair file and to kto in one edit: the split on disk is the old data's,
    so its 0 pairs say nothing (the align stage counts the rebuilt split's)."""
    proc = _check_stage(tmp_path, "kto", inputs="data/raw/pairs.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "metrics/params_ok.json").read_text()) == {"params.yaml": "valid"}


# --------------------------------------------------------------------------- training
def _synthetic(n: int, seed: int) -> list[dict]:
    """A learnable preference: chosen answers state the sum, rejected ones ramble in Chinese."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        a, b = r.randint(1, 50), r.randint(1, 50)
        out.append(_record(f"What is {a} plus {b}?", f"The answer is {a + b}.",
                           f"这部电影很糟糕 {a}。", i))
    return out


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory, tiny_base_dir):
    """A full "SFT" folder (the tiny base as train writes it) and train/val/test pair files."""
    from reprotune.modeling import load_model, load_tokenizer
    from reprotune.train.loading import save_finetuned

    root = tmp_path_factory.mktemp("align")
    tok = load_tokenizer(tiny_base_dir)
    save_finetuned(load_model(tiny_base_dir), tok, root / "sft", method="full",
                   base_dir=tiny_base_dir, enable_thinking=False)
    for split, n, seed in (("train", 32, 0), ("val", 8, 1), ("test", 16, 2)):
        rows, _, _ = format_pairs(iter(_synthetic(n, seed)), tok, max_length=256,
                                  enable_thinking=False)
        io.write_jsonl(root / f"{split}.jsonl", rows)
    return root


def _align(root: Path, name: str, cfg: AlignParams, callbacks=None) -> dict:
    from reprotune.train.align import align_model

    return align_model(train_pairs=root / "train.jsonl", val_pairs=root / "val.jsonl",
                       finetuned=root / "sft", out_dir=root / name, checkpoints_dir=root / f"{name}_ckpt",
                       live_dir=root / f"{name}_curves", cfg=cfg, seed=0, callbacks=callbacks)


FAST = dict(method="dpo", lr=2e-3, epochs=1, batch_size=8, eval_steps=2, logging_steps=1, patience=0)


def test_dpo_raises_test_reward_accuracy_and_writes_curves(pair_files):
    from reprotune.evaluate.preference import gain, preference_metrics
    from reprotune.train.loading import load_finetuned

    m = _align(pair_files, "aligned", AlignParams(**FAST))
    assert (m["train_pairs"], m["val_pairs"], m["train_steps"]) == (32, 8, 4)
    assert m["reference"] == "precomputed log-probs" and m["loss_type"] == ["sigmoid"]
    assert m["best_val_loss"] < m["initial_val_loss"] == pytest.approx(0.693147, abs=1e-5)
    curves = pair_files / "aligned_curves" / "plots" / "metrics"
    for name in ("train_loss", "val_loss", "train_rewards_chosen", "train_rewards_rejected",
                 "train_rewards_margins", "val_rewards_accuracies"):
        lines = (curves / f"{name}.tsv").read_text().splitlines()
        assert lines[0] == f"step\t{name}" and len(lines) >= 3
    policy, tok, manifest = load_finetuned(pair_files / "aligned")
    sft = load_finetuned(pair_files / "sft")[0]
    assert manifest["method"] == "full"
    pairs = io.read_jsonl(pair_files / "test.jsonl")
    pm = preference_metrics(policy, sft, pairs, batch_size=8, pad_id=tok.pad_token_id)
    assert pm["pairs"] == 16
    assert pm["sft"]["reward_accuracy"] == 0.5 and pm["sft"]["mean_margin"] == 0
    assert pm["aligned"]["reward_accuracy"] >= 0.9, pm
    assert pm["aligned"]["mean_margin"] > 0
    assert gain(pm)["reward_accuracy"] >= 0.4
    # the pass-through scores the SFT model once, against itself
    same = preference_metrics(sft, sft, pairs, batch_size=8, pad_id=tok.pad_token_id)
    assert same["aligned"] == same["sft"] == pm["sft"]


def test_sft_mix_and_other_losses_run(pair_files):
    m = _align(pair_files, "ipo", AlignParams(**{**FAST, "loss_type": "ipo", "sft_weight": 0.5,
                                                 "max_steps": 2}))
    assert m["loss_type"] == ["ipo", "sft"] and m["train_steps"] == 2


def test_killed_align_resumes_to_the_same_metrics(pair_files, caplog):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:  # after the step-2 checkpoint
                raise KeyboardInterrupt("killed")

    cfg = AlignParams(**FAST)
    whole = _align(pair_files, "whole", cfg)
    with pytest.raises(KeyboardInterrupt):
        _align(pair_files, "killed", cfg, callbacks=[Kill()])
    assert (pair_files / "killed_ckpt" / "checkpoint-2").is_dir()
    # DVC deletes a plain output before it reruns the stage: the checkpoint's copy is used
    shutil.rmtree(pair_files / "killed_curves")
    resumed = _align(pair_files, "killed", cfg)
    assert resumed["resumed_from_step"] == 2
    drop = ("resumed_from_step", "train_time_s", "wall_time_s")
    assert {k: v for k, v in resumed.items() if k not in drop} == \
        {k: v for k, v in whole.items() if k not in drop}
    assert not list((pair_files / "killed_ckpt").glob("checkpoint-*"))  # a finished run clears them
    steps = [ln.split("\t")[0] for ln in
             (pair_files / "killed_curves/plots/metrics/train_loss.tsv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]  # the killed session's rows past step 2 were cut
    for tsv in (pair_files / "whole_curves/plots/metrics").glob("*.tsv"):
        assert (pair_files / "killed_curves/plots/metrics" / tsv.name).read_text() == \
            tsv.read_text(), tsv.name
    # the finished run left nothing behind: a rerun with another param starts fresh, silently
    for out in ("killed", "killed_curves"):  # what DVC deletes before it reruns the stage
        shutil.rmtree(pair_files / out)
    caplog.clear()
    again = _align(pair_files, "killed", AlignParams(**{**FAST, "lr": 1e-3, "max_steps": 2}))
    assert again["resumed_from_step"] == 0 and again["train_steps"] == 2
    assert not [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and r.name.startswith("reprotune")]


def test_pass_through_writes_a_pointer_and_loaders_follow_it(pair_files):
    from reprotune.train.align import pass_through
    from reprotune.train.loading import resolve_model_dir

    info = pass_through(pair_files / "sft", pair_files / "none", pair_files / "none_curves")
    assert info["method"] == "none"
    assert [p.name for p in (pair_files / "none").iterdir()] == ["reprotune_align.json"]
    assert resolve_model_dir(pair_files / "none") == pair_files / "sft"
    assert resolve_model_dir(pair_files / "sft") == pair_files / "sft"


def test_pair_records_skips_lines_without_pairs(tmp_path):
    path = tmp_path / "s.jsonl"
    io.write_jsonl(path, [{"id": "a", "messages": Q}, _record("q", "a", "b", 1)])
    assert [r["id"] for r in pair_records(path)] == [_record("q", "a", "b", 1)["id"]]
    assert count_pairs(path) == 1


def test_lora_sft_adapter_is_its_own_reference_without_a_second_base(pair_files, tiny_base_dir):
    """An SFT adapter trains on; TRL's reference is the same adapter, loaded frozen as `ref`
    (the initial loss is exactly log 2: policy == reference), and only the trained adapter
    is saved."""
    from reprotune.modeling import load_tokenizer
    from reprotune.params import LoraParams
    from reprotune.train.loading import load_finetuned, save_finetuned
    from reprotune.train.methods import load_base, prepare_model

    lora = LoraParams(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    sft = prepare_model(load_base(tiny_base_dir, "lora"), "lora", lora=lora)
    save_finetuned(sft, load_tokenizer(tiny_base_dir), pair_files / "sft_lora", method="lora",
                   base_dir=tiny_base_dir, enable_thinking=False)
    from reprotune.train.align import align_model

    m = align_model(train_pairs=pair_files / "train.jsonl", val_pairs=pair_files / "val.jsonl",
                    finetuned=pair_files / "sft_lora", out_dir=pair_files / "aligned_lora",
                    checkpoints_dir=pair_files / "lora_ckpt", live_dir=pair_files / "lora_curves",
                    cfg=AlignParams(**{**FAST, "max_steps": 2}), seed=0)
    assert m["reference"] == "adapter ref copy" and m["sft_method"] == "lora"
    assert m["initial_val_loss"] == pytest.approx(0.693147, abs=1e-5)
    out = pair_files / "aligned_lora"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    model, _, manifest = load_finetuned(out)
    assert manifest["kind"] == "adapter" and list(model.peft_config) == ["default"]


# --------------------------------------------------------------------------- orpo / simpo / kto
METHODS = {  # the new methods' fast settings on the synthetic pairs (each reached test reward
    # accuracy 1.0 in 4 steps; the test asks >= 0.9, as for dpo)
    "orpo": dict(FAST, method="orpo", beta=0.5),
    "simpo": dict(FAST, method="simpo", beta=2.0, simpo_gamma=0.5),
    "kto": dict(FAST, method="kto"),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_new_methods_raise_test_reward_accuracy_and_write_curves(pair_files, method):
    from reprotune.evaluate.preference import preference_metrics
    from reprotune.train.loading import load_finetuned

    m = _align(pair_files, method, AlignParams(**METHODS[method]))
    assert (m["method"], m["loss_type"], m["train_pairs"], m["val_pairs"], m["train_steps"]) == \
        (method, [method], 32, 8, 4)
    assert m["reference"] == ("precomputed log-probs" if method == "kto" else "none (reference-free)")
    assert m["best_val_loss"] < m["initial_val_loss"]
    if method == "kto":  # policy == reference at the start: 1 - sigmoid(0) on every answer
        assert m["initial_val_loss"] == pytest.approx(0.5, abs=1e-6)
    curves = pair_files / f"{method}_curves" / "plots" / "metrics"
    for name in ("train_loss", "val_loss", "train_rewards_chosen", "train_rewards_rejected",
                 "train_rewards_margins"):
        lines = (curves / f"{name}.tsv").read_text().splitlines()
        assert lines[0] == f"step\t{name}" and len(lines) >= 3, name
    assert (curves / "val_rewards_accuracies.tsv").is_file()  # kto logs none: header only
    policy, tok, manifest = load_finetuned(pair_files / method)
    assert manifest["method"] == "full"
    sft = load_finetuned(pair_files / "sft")[0]
    pm = preference_metrics(policy, sft, io.read_jsonl(pair_files / "test.jsonl"), batch_size=8,
                            pad_id=tok.pad_token_id)
    assert pm["sft"]["reward_accuracy"] == 0.5
    assert pm["aligned"]["reward_accuracy"] >= 0.9, pm
    assert pm["aligned"]["mean_margin"] > 0


def test_reference_free_trainers_train_on_formats_ids(pair_files):
    """ORPO / CPO would render and tokenise text themselves (with an extra EOS): they get
    format's ids, each answer after the prompt, the prompt's labels ignored."""
    from reprotune.constants import IGNORE_INDEX as IGNORE
    from reprotune.train.align_methods import format_ids_row

    row = io.read_jsonl(pair_files / "train.jsonl")[0]
    out = format_ids_row(row)
    n = len(row["prompt_ids"])
    assert out["chosen_input_ids"] == row["prompt_ids"] + row["chosen_ids"]
    assert out["rejected_input_ids"] == row["prompt_ids"] + row["rejected_ids"]
    assert out["chosen_labels"] == [IGNORE] * n + row["chosen_ids"]
    assert out["rejected_labels"][:n] == [IGNORE] * n and out["rejected_labels"][n:] == row["rejected_ids"]


def test_kto_unpairs_each_pair_into_both_answers_in_a_seeded_mixed_order(pair_files):
    from reprotune.train.align_methods import kto_examples

    rows = io.read_jsonl(pair_files / "train.jsonl")
    items = [(e["id"], e["label"]) for e in kto_examples(rows, 0)]
    assert len(items) == 64 and sum(label for _, label in items) == 32
    assert sorted(items) == sorted((r["id"], lab) for r in rows for lab in (True, False))
    assert items == [(e["id"], e["label"]) for e in kto_examples(rows, 0)]
    assert all(0 < sum(lab for _, lab in items[i:i + 16]) < 16 for i in range(0, 64, 16))


def test_simpo_sft_mix_names_both_terms(pair_files):
    m = _align(pair_files, "simpo_sft", AlignParams(**{**METHODS["simpo"], "sft_weight": 0.5,
                                                       "max_steps": 2}))
    assert m["loss_type"] == ["simpo", "sft"] and m["train_steps"] == 2


@pytest.mark.parametrize("method", ["kto", "orpo"])
def test_killed_kto_and_orpo_resume_to_the_same_metrics(pair_files, method):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:  # after the step-2 checkpoint
                raise KeyboardInterrupt("killed")

    cfg = AlignParams(**METHODS[method])
    whole = _align(pair_files, f"{method}_whole", cfg)
    with pytest.raises(KeyboardInterrupt):
        _align(pair_files, f"{method}_killed", cfg, callbacks=[Kill()])
    assert (pair_files / f"{method}_killed_ckpt" / "checkpoint-2").is_dir()
    shutil.rmtree(pair_files / f"{method}_killed_curves")  # as DVC does before a rerun
    resumed = _align(pair_files, f"{method}_killed", cfg)
    assert resumed["resumed_from_step"] == 2
    drop = ("resumed_from_step", "train_time_s", "wall_time_s")
    assert {k: v for k, v in resumed.items() if k not in drop} == \
        {k: v for k, v in whole.items() if k not in drop}
    for tsv in (pair_files / f"{method}_whole_curves/plots/metrics").glob("*.tsv"):
        assert (pair_files / f"{method}_killed_curves/plots/metrics" / tsv.name).read_text() == \
            tsv.read_text(), tsv.name


def test_lora_sft_adapter_with_kto_and_orpo(pair_files, tiny_base_dir):
    """KTO keeps the SFT adapter frozen as `ref` (initial policy == reference); ORPO needs no
    reference; either way only the trained adapter is saved."""
    from reprotune.modeling import load_tokenizer
    from reprotune.params import LoraParams
    from reprotune.train.align import align_model
    from reprotune.train.loading import load_finetuned, save_finetuned
    from reprotune.train.methods import load_base, prepare_model

    if not (pair_files / "sft_lora").is_dir():
        lora = LoraParams(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
        sft = prepare_model(load_base(tiny_base_dir, "lora"), "lora", lora=lora)
        save_finetuned(sft, load_tokenizer(tiny_base_dir), pair_files / "sft_lora", method="lora",
                       base_dir=tiny_base_dir, enable_thinking=False)
    for method, ref in (("kto", "adapter ref copy"), ("orpo", "none (reference-free)")):
        m = align_model(train_pairs=pair_files / "train.jsonl", val_pairs=pair_files / "val.jsonl",
                        finetuned=pair_files / "sft_lora", out_dir=pair_files / f"{method}_lora",
                        checkpoints_dir=pair_files / f"{method}_lora_ckpt",
                        live_dir=pair_files / f"{method}_lora_curves",
                        cfg=AlignParams(**{**METHODS[method], "max_steps": 2}), seed=0)
        assert m["reference"] == ref and m["sft_method"] == "lora"
        model, _, manifest = load_finetuned(pair_files / f"{method}_lora")
        assert manifest["kind"] == "adapter" and list(model.peft_config) == ["default"]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("simpo_gamma", -0.1, r"align.simpo_gamma: -0.1 must be >= 0"),
    ("desirable_weight", 0, r"align.desirable_weight: 0.0 must be > 0"),
    ("undesirable_weight", "x", r"align.undesirable_weight: expected a number"),
    ("method", "cpo", r"align.method: 'cpo' is not one of none, dpo, orpo, simpo, kto"),
])
def test_bad_new_align_params_fail_naming_the_key(key, value, message):
    from reprotune.params import ParamsError, build

    with pytest.raises(ParamsError, match=message):
        build(AlignParams, {"method": "simpo", key: value}, "align")


@pytest.mark.parametrize(("raw", "message"), [
    ({"method": "kto", "loss_type": "ipo"}, r"align.loss_type: ipo is a DPO loss; align.method kto"),
    ({"method": "orpo", "sft_weight": 0.5}, r"align.sft_weight: 0.5 has no effect with align.method "
                                            r"orpo \(its loss always includes the NLL of chosen\)"),
    ({"method": "kto", "sft_weight": 1}, r"align.sft_weight: 1 has no effect with align.method kto"),
])
def test_knobs_a_method_does_not_read_fail_naming_the_key(raw, message):
    from reprotune.params import ParamsError, build

    with pytest.raises(ParamsError, match=message):
        build(AlignParams, raw, "align")
    build(AlignParams, {**raw, "method": "dpo"}, "align")  # dpo reads both


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_every_method_without_pairs_names_align_method(method):
    with pytest.raises(PairsError, match=rf"align.method: {method} needs preference pairs, but the "
                                         r"train split has 0"):
        check_pairs(method, 0, 0, 5, "data/interim/splits/train.jsonl")


# --------------------------------------------------------------------------- val metrics
def test_pair_weighted_mean_of_batch_means():
    from reprotune.train.align_methods import batch_sizes, pair_counts, pair_weighted

    assert batch_sizes(26, 8) == [8, 8, 8, 2] and batch_sizes(16, 8) == [8, 8]
    # issue 29's case: 14 of 26 pairs right read 0.53125 as a mean of the 4 batch means
    per_batch = [4 / 8, 5 / 8, 4 / 8, 1 / 2]
    assert sum(per_batch) / 4 == 0.53125
    assert pair_weighted(per_batch, batch_sizes(26, 8)) == pytest.approx(14 / 26)
    assert pair_counts(per_batch, batch_sizes(26, 8)) == {"eval_pairs_correct": 14,
                                                          "eval_pairs_total": 26}
    with pytest.raises(ValueError, match="3 batch means for 4 batches"):
        pair_weighted(per_batch[:3], batch_sizes(26, 8))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_val_reward_accuracy_counts_pairs_not_batches(pair_files, method):
    """10 val pairs in batches of 8, 3 of them with chosen and rejected swapped (the aligned
    model prefers their rejected answer): the logged accuracy is right pairs / 10 (0.7, where
    the mean of the two batch means would be 0.625), recomputed here from the aligned model's
    log-probs (dpo: against the SFT reference; orpo: its reward, the mean answer log-prob)."""
    from reprotune.evaluate.preference import answer_logps
    from reprotune.train.align import align_model
    from reprotune.train.loading import load_finetuned

    recs = _synthetic(10, 7)
    for i in (0, 1, 9):  # 6 of 8 right in the first batch, 1 of 2 in the second
        prompt, chosen, rejected = sides(recs[i])
        recs[i] = _record(prompt[0]["content"], rejected[0]["content"], chosen[0]["content"], i)
    val10 = pair_files / "val10.jsonl"
    rows, _, _ = format_pairs(iter(recs), load_finetuned(pair_files / "sft")[1], max_length=256,
                              enable_thinking=False)
    io.write_jsonl(val10, list(rows))
    name = f"{method}_val10"
    cfg = AlignParams(**{**(FAST if method == "dpo" else METHODS[method]), "max_steps": 2})
    m = align_model(train_pairs=pair_files / "train.jsonl", val_pairs=val10,
                    finetuned=pair_files / "sft", out_dir=pair_files / name,
                    checkpoints_dir=pair_files / f"{name}_ckpt",
                    live_dir=pair_files / f"{name}_curves", cfg=cfg, seed=0)
    assert m["val_pairs"] == 10 and m["best_step"] == m["train_steps"] == 2
    policy, tok, _ = load_finetuned(pair_files / name)  # the step-2 weights the last eval saw
    pairs = io.read_jsonl(val10)
    chosen, rejected = answer_logps(policy, pairs, batch_size=8, pad_id=tok.pad_token_id)
    if method == "dpo":
        ref_c, ref_r = answer_logps(load_finetuned(pair_files / "sft")[0], pairs, batch_size=8,
                                    pad_id=tok.pad_token_id)
        margins = [(c - rc) - (r - rr) for c, r, rc, rr in zip(chosen, rejected, ref_c, ref_r,
                                                                 strict=True)]
    else:
        margins = [c / len(p["chosen_ids"]) - r / len(p["rejected_ids"])
                   for c, r, p in zip(chosen, rejected, pairs, strict=True)]
    assert min(abs(x) for x in margins) > 1e-4  # no near-tie that float order could flip
    right = [x > 0 for x in margins]
    assert (sum(right[:8]), sum(right[8:])) == (6, 1), margins
    assert m["final_val"]["rewards/accuracies"] == pytest.approx(0.7, abs=1e-6)
    # issue 29: pair-level counts over the whole split, equal to the recomputation above
    assert m["val_accuracy"] == {"correct": sum(right), "total": len(pairs),
                                 "ratio": round(sum(right) / len(pairs), 6)} == \
        {"correct": 7, "total": 10, "ratio": 0.7}
    assert m["initial_val_accuracy"]["total"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
def test_no_val_pairs_and_patience_0_trains_without_evaluation(pair_files, method):
    """Format can drop every val pair as too long (SmolLM2 at max_length 256 keeps 25 of
    dpo_en_demo's 295 pairs, none in val): with align.patience 0 the run trains without
    evaluation, saves and clears its checkpoints, keeps the last step's weights and says so."""
    import torch

    from reprotune.train.align import align_model
    from reprotune.train.loading import load_finetuned

    empty = pair_files / "val_empty.jsonl"
    io.write_jsonl(empty, [])
    name = f"{method}_noval"
    cfg = AlignParams(**{**(FAST if method == "dpo" else METHODS[method]), "max_steps": 4})
    m = align_model(train_pairs=pair_files / "train.jsonl", val_pairs=empty,
                    finetuned=pair_files / "sft", out_dir=pair_files / name,
                    checkpoints_dir=pair_files / f"{name}_ckpt",
                    live_dir=pair_files / f"{name}_curves", cfg=cfg, seed=0)
    assert (m["train_pairs"], m["val_pairs"], m["val_evaluated"], m["train_steps"]) == \
        (32, 0, False, 4)
    assert m["initial_val_loss"] is m["best_val_loss"] is m["best_step"] is None
    assert m["final_val"] == {} and not m["stopped_early"]
    assert not list((pair_files / f"{name}_ckpt").glob("checkpoint-*"))
    curves = pair_files / f"{name}_curves" / "plots" / "metrics"
    assert (curves / "val_loss.tsv").read_text().splitlines() == ["step\tval_loss"]
    assert (curves / "val_rewards_accuracies.tsv").read_text().splitlines() == \
        ["step\tval_rewards_accuracies"]
    train = (curves / "train_loss.tsv").read_text().splitlines()[1:]
    assert [ln.split("\t")[0] for ln in train] == ["1", "2", "3", "4"]
    policy = load_finetuned(pair_files / name)[0]
    sft = load_finetuned(pair_files / "sft")[0]
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), sft.parameters(),
                                                     strict=True))


def test_patience_without_val_pairs_advises_patience_0_or_val_pairs():
    with pytest.raises(PairsError) as err:
        check_pairs("dpo", 4, 25, 0, "data/processed/pairs/train.jsonl")
    msg = str(err.value)
    assert msg.startswith("align.patience: 4 stops early on the val pairs, but the val split "
                          "has 0; set align.patience: 0 (align then trains without evaluation)")
    assert "format.max_length" in msg and "data/processed/pairs/dropped.jsonl" in msg
    check_pairs("dpo", 0, 25, 0, "x")  # patience 0: align runs without evaluation


@pytest.mark.slow
def test_align_stage_without_val_pairs_refuses_patience_then_runs_with_0(pair_files, tmp_path):
    """The stage as DVC runs it: patience 4 with 0 val pairs is one line naming both fixes;
    patience 0 trains, writes the metrics and says there was no val evaluation."""
    from ruamel.yaml import YAML

    io.write_jsonl(tmp_path / "val.jsonl", [])
    yaml = YAML()

    def stage(patience: int) -> subprocess.CompletedProcess:
        params = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        params["align"].update(method="dpo", max_steps=2, patience=patience)
        with (tmp_path / "params.yaml").open("w", encoding="utf-8") as fh:
            yaml.dump(params, fh)
        return subprocess.run(
            [sys.executable, str(ROOT / "stages/align.py"), "--train", str(pair_files / "train.jsonl"),
             "--val", str(tmp_path / "val.jsonl"), "--finetuned", str(pair_files / "sft"),
             "--out", "aligned", "--checkpoints", "ckpt", "--live-dir", "curves",
             "--metrics", "align.json"], cwd=tmp_path, capture_output=True, text=True,
            timeout=600, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "", "HF_HUB_OFFLINE": "1"})

    refused = stage(4)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "align: align.patience: 4 stops early on the val pairs, but the val split has 0; set "
        "align.patience: 0 (align then trains without evaluation)")
    ran = stage(0)
    assert ran.returncode == 0, ran.stderr
    assert "no val pairs, so no val evaluation" in ran.stderr
    m = io.read_json(tmp_path / "align.json")
    assert (m["val_pairs"], m["val_evaluated"], m["train_steps"], m["best_val_loss"]) == \
        (0, False, 2, None)
    assert "train_time_s" not in m  # timings go to the untracked metrics/timing
    assert (tmp_path / "aligned" / "model.safetensors").is_file()
