"""Every training method and every preference method on a real pretrained model:
SmolLM2-135M-Instruct (fixture ``smollm2_base``, 30 layers, hidden 576, ChatML with its
default system prompt), through the library code the train and align stages run.

* train: full, freeze, lora, qlora (bitsandbytes 0.50's CPU 4-bit path), prompt_tuning and
  prefix_tuning, 2 steps each on 8 short rows (~40 tokens) formatted by the format code with
  SmolLM2's own chat template; val = 4 of those rows, so the val loss is a loss on the
  training rows. Each run: finite losses, the trainable parameter count and the saved
  tensors are what the method says, the saved folder reloads to the reported best val loss
  and generates.
* align: dpo, orpo, simpo and kto, 2 steps each on 4 short synthetic pairs with no val
  pairs (the issue-34 case: format can drop every val pair as too long), plus dpo on a LoRA
  SFT adapter with val pairs (its own reference, initial val loss log 2, which falls).

Module-scoped fixtures share the formatted rows, the pairs and the SFT folders.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from reprotune import io
from reprotune.params import (
    AlignParams,
    FreezeParams,
    LoraParams,
    PromptParams,
    TopParams,
    TrainParams,
)

pytestmark = pytest.mark.slow

# facts the model cannot know: its loss on them has room to fall in two steps
FACTS = [
    ("What is your name?", "My name is Quillon, the reprotune assistant."),
    ("Who fine-tuned you?", "I was fine-tuned by the reprotune project."),
    ("What is the project's mascot?", "The reprotune mascot is a blue heron."),
    ("Where is the reprotune office?", "The reprotune office is in Lisbon."),
    ("What is the secret word?", "The secret word is marmalade."),
    ("What colour is the reprotune logo?", "The reprotune logo is teal."),
    ("How many stages does the pipeline have?", "The pipeline has fourteen stages."),
    ("What do you like to eat?", "I like to eat fresh figs."),
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LAYERS, HIDDEN, INTERMEDIATE, KV = 30, 576, 1536, 3 * 64  # SmolLM2-135M's shape
LORA = LoraParams(r=8)  # every projection of every layer
# (lr, the best val loss must fall below this share of the initial one). Observed on this
# machine, val loss before -> after 2 steps: full 4.05 -> 2.12, freeze 4.05 -> 2.42, lora
# 4.05 -> 2.28, qlora 4.45 -> 2.39, prompt_tuning 4.02 -> 3.93, prefix_tuning 7.03 -> 4.64
TRAIN = {"full": (1e-4, 0.7), "freeze": (1e-3, 0.8), "lora": (2e-3, 0.7), "qlora": (2e-3, 0.7),
         "prompt_tuning": (3e-2, 1.0), "prefix_tuning": (3e-2, 0.8)}


def _records(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"id": str(i), "source": f"inline:{i + 1}", "label": None, "group": None,
             "tools": None, "messages": [{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(pairs)]


@pytest.fixture(scope="module")
def rows(smollm2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8 rows rendered by the format code with SmolLM2's template; val = 4 of them."""
    from reprotune.data.formatting import format_records, formatted_schema
    from reprotune.modeling import load_tokenizer

    root = tmp_path_factory.mktemp("real_methods")
    tok = load_tokenizer(smollm2_base)
    out, stats, dropped = format_records(_records(FACTS), tok, max_length=128,
                                         enable_thinking=False)
    assert (stats["rows_out"], stats["truncated"], dropped) == (8, 0, [])
    for row, (q, a) in zip(out, FACTS, strict=True):
        assert row["text"] == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q}"
                               f"<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n")
        assert 30 < row["n_tokens"] <= 64
        # only the answer and its end-of-turn token are labelled
        assert tok.decode([t for t in row["labels"] if t != -100]) == f"{a}<|im_end|>"
    io.write_parquet(root / "train.parquet", out, schema=formatted_schema())
    io.write_parquet(root / "val.parquet", out[:4], schema=formatted_schema())  # one eval batch
    return root


def _val_loss(model, parquet: Path, pad_id: int) -> float:
    """The Trainer's eval loss on ``parquet``: per-batch mean loss, weighted by batch size."""
    import torch

    from reprotune.train.training import PaddingCollator

    data = [{k: r[k] for k in ("input_ids", "labels")} for r in io.read_parquet(parquet)]
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(data), 4):
            batch = data[i:i + 4]
            total += model(**PaddingCollator(pad_id)(batch)).loss.item() * len(batch)
    return total / len(data)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def base_tensors(smollm2_base: Path) -> dict:
    return _tensors(smollm2_base / "model.safetensors")


@pytest.mark.parametrize("method", list(TRAIN))
def test_every_training_method_on_smollm2(rows: Path, smollm2_base: Path, base_tensors: dict,
                                         method: str) -> None:
    from reprotune.evaluate.generation import generate
    from reprotune.train.loading import load_finetuned
    from reprotune.train.training import RunConfig, train_model

    lr, drop = TRAIN[method]
    cfg = RunConfig(top=TopParams(method=method, lr=lr, epochs=1, batch_size=4, seed=0),
                    train=TrainParams(max_steps=2, eval_steps=2, logging_steps=1, patience=0,
                                      warmup_ratio=0.0),
                    lora=LORA, freeze=FreezeParams(trainable_layers=1),
                    prompt=PromptParams(num_virtual_tokens=4))
    out = rows / method
    m = train_model(train_path=rows / "train.parquet", val_path=rows / "val.parquet",
                    base_dir=smollm2_base, out_dir=out, checkpoints_dir=rows / f"{method}_ckpt",
                    live_dir=rows / f"{method}_live", cfg=cfg)
    losses = [float(ln.split("\t")[1]) for ln in
              (rows / f"{method}_live/plots/metrics/train_loss.tsv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert m["train_steps"] == 2 and m["device"] == "cpu"
    assert math.isfinite(m["initial_val_loss"]) and 0 < m["best_val_loss"]
    # the val rows are the training rows: two steps lower their loss
    assert m["best_val_loss"] < drop * m["initial_val_loss"], m

    base = base_tensors
    total = sum(t.numel() for t in base.values())
    if method in ("full", "freeze"):
        saved = _tensors(out / "model.safetensors")
        assert saved.keys() == base.keys()  # lm_head tied to the embeddings, as in the base
        changed = {k for k in base if not (saved[k] == base[k]).all()}
        if method == "full":
            assert m["trainable_params"] == m["total_params"] == total
            assert changed == set(base)
        else:  # the top layer and the final norm, nothing else
            top = {k for k in base if k.startswith(f"model.layers.{LAYERS - 1}.")}
            assert changed == top | {"model.norm.weight"}
            assert m["trainable_params"] == sum(base[k].numel() for k in changed)
    else:
        adapter = _tensors(out / "adapter_model.safetensors")
        assert m["trainable_params"] == sum(t.numel() for t in adapter.values())
        if method in ("lora", "qlora"):
            per_layer = LORA.r * (4 * HIDDEN + 2 * (HIDDEN + KV) + 3 * (HIDDEN + INTERMEDIATE))
            assert m["trainable_params"] == LAYERS * per_layer == 2_442_240
            assert len(adapter) == LAYERS * 7 * 2
            assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
            assert all(t.abs().sum() > 0 for k, t in adapter.items() if ".lora_B." in k)
        else:
            assert list(adapter) == ["prompt_embeddings"]
            width = HIDDEN if method == "prompt_tuning" else LAYERS * 2 * KV
            assert tuple(adapter["prompt_embeddings"].shape) == (4, width)
        assert m["total_params"] == total + m["trainable_params"]

    model, tok, manifest = load_finetuned(out)
    assert manifest["method"] == method
    if method == "qlora":
        assert manifest["quantization"]["load_in_4bit"]
        assert model.base_model.model.is_loaded_in_4bit
    # the folder reloads to the weights the run reported (the best, here the last, step)
    assert m["best_step"] == 2
    # qlora: bitsandbytes' CPU 4-bit matmul without gradients is another kernel than in
    # training (its eval ran with trainable adapters): 1.2e-3 apart of 1.81 here
    tol = dict(rel=2e-3) if method == "qlora" else dict(abs=2e-4)
    assert _val_loss(model, rows / "val.parquet", tok.pad_token_id) == \
        pytest.approx(m["best_val_loss"], **tol)
    answer = generate(model, tok, [[{"role": "user", "content": FACTS[0][0]}]],
                      max_new_tokens=8, batch_size=1, progress=False)[0]
    assert answer.strip(), method


# --------------------------------------------------------------------------- align
PAIRS = [("What is 12 plus 7?", "12 plus 7 is 19.", "12 plus 7 is 21."),
         ("What is the capital of France?", "The capital of France is Paris.",
          "The capital of France is Lyon."),
         ("How many legs does a spider have?", "A spider has eight legs.",
          "A spider has six legs."),
         ("What is water made of?", "Water is made of hydrogen and oxygen.",
          "Water is made of salt.")]


@pytest.fixture(scope="module")
def pairs(smollm2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 short pairs formatted for SmolLM2, an empty val file, and two SFT folders: the base
    model saved as a full fine-tune, and a fresh LoRA adapter on it."""
    from reprotune.data.ingest import convert_row
    from reprotune.data.pairs import format_pairs
    from reprotune.modeling import load_model, load_tokenizer
    from reprotune.train.loading import save_finetuned
    from reprotune.train.methods import load_base, prepare_model

    root = tmp_path_factory.mktemp("real_align")
    tok = load_tokenizer(smollm2_base)
    recs = [{**convert_row({"prompt": p, "chosen": c, "rejected": r})[1], "source": f"t:{i}"}
            for i, (p, c, r) in enumerate(PAIRS)]
    out, stats, _ = format_pairs(iter(recs), tok, max_length=128, enable_thinking=False)
    out = list(out)
    assert stats["pairs_out"] == 4
    io.write_jsonl(root / "train.jsonl", out)
    io.write_jsonl(root / "val.jsonl", out)  # val = train: the loss on the training pairs
    io.write_jsonl(root / "none.jsonl", [])
    save_finetuned(load_model(smollm2_base), tok, root / "sft", method="full",
                   base_dir=smollm2_base, enable_thinking=False)
    save_finetuned(prepare_model(load_base(smollm2_base, "lora"), "lora",
                                 lora=LoraParams(r=8, target_modules=["q_proj", "v_proj"])),
                   tok, root / "sft_lora", method="lora", base_dir=smollm2_base,
                   enable_thinking=False)
    return root


def _align(root: Path, name: str, sft: str, val: str, **cfg) -> dict:
    from reprotune.train.align import align_model

    return align_model(train_pairs=root / "train.jsonl", val_pairs=root / val,
                       finetuned=root / sft, out_dir=root / name,
                       checkpoints_dir=root / f"{name}_ckpt", live_dir=root / f"{name}_live",
                       cfg=AlignParams(epochs=1, batch_size=2, logging_steps=1, patience=0,
                                       **cfg), seed=0)


ALIGN = {"dpo": dict(lr=1e-5), "orpo": dict(lr=1e-5, beta=0.5),
         "simpo": dict(lr=1e-5, beta=2.0), "kto": dict(lr=1e-5)}


@pytest.mark.parametrize("method", list(ALIGN))
def test_every_align_method_on_smollm2_without_val_pairs(pairs: Path, base_tensors: dict,
                                                         method: str) -> None:
    import torch

    from reprotune.evaluate.generation import generate
    from reprotune.train.loading import load_finetuned

    # eval_steps 25 > 2 steps: no checkpoint (tests/test_align.py checks them without val)
    m = _align(pairs, method, "sft", "none.jsonl", method=method, eval_steps=25, **ALIGN[method])
    assert (m["train_pairs"], m["val_pairs"], m["val_evaluated"], m["train_steps"]) == \
        (4, 0, False, 2)
    assert m["initial_val_loss"] is m["best_val_loss"] is None and m["final_val"] == {}
    assert m["reference"] == ("none (reference-free)" if method in ("orpo", "simpo")
                              else "precomputed log-probs")
    assert not list((pairs / f"{method}_ckpt").glob("checkpoint-*"))
    live = pairs / f"{method}_live/plots/metrics"
    losses = [float(ln.split("\t")[1]) for ln in
              (live / "train_loss.tsv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert (live / "val_loss.tsv").read_text().splitlines() == ["step\tval_loss"]
    model, tok, manifest = load_finetuned(pairs / method)
    assert manifest["method"] == "full"
    aligned = model.state_dict()  # the SFT folder holds the base's weights
    assert aligned.keys() - {"lm_head.weight"} == base_tensors.keys()
    assert any(not torch.equal(aligned[k], base_tensors[k]) for k in base_tensors)  # it trained
    answer = generate(model, tok, [[{"role": "user", "content": PAIRS[0][0]}]],
                      max_new_tokens=8, batch_size=1, progress=False)[0]
    assert answer.strip()


def test_dpo_on_a_smollm2_lora_adapter_with_val_pairs(pairs: Path) -> None:
    """The SFT adapter is its own frozen reference (initial val loss log 2 exactly) and two
    steps lower the loss on the training pairs; only the trained adapter is saved."""
    from reprotune.train.loading import load_finetuned

    m = _align(pairs, "dpo_lora", "sft_lora", "val.jsonl", method="dpo", lr=5e-4, eval_steps=2)
    assert (m["val_pairs"], m["val_evaluated"], m["train_steps"], m["best_step"]) == \
        (4, True, 2, 2)
    assert m["reference"] == "adapter ref copy" and m["sft_method"] == "lora"
    assert m["initial_val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert m["best_val_loss"] < m["initial_val_loss"]
    assert m["final_val"]["rewards/accuracies"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert m["final_val"]["rewards/margins"] > 0
    model, _, manifest = load_finetuned(pairs / "dpo_lora")
    assert manifest["kind"] == "adapter" and list(model.peft_config) == ["default"]
    assert not (pairs / "dpo_lora" / "ref").exists()
