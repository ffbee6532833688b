"""Packing: samples inside a pack compute exactly what they compute alone; training agrees."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch

from reprotune import io
from reprotune.constants import IGNORE_INDEX
from reprotune.params import PromptParams, TopParams, TrainParams
from reprotune.train import packed_attention
from reprotune.train.lean_loss import liger_available
from reprotune.train.methods import TrainSetupError
from reprotune.train.packing import (
    OFF,
    PACKS,
    PADDING_FREE,
    PackingCollator,
    PaddingFreeRows,
    model_inputs,
    pack_rows,
    packed_dataset,
    resolve_packing,
)
from reprotune.train.training import PaddingCollator, RunConfig, train_model

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


# --------------------------------------------------------------------------- units
def test_pack_rows_next_fit_keeps_the_seeded_order():
    lengths = [5, 9, 3, 7, 10, 1, 4, 8]
    packs = pack_rows(lengths, budget=12, seed=3)
    order = list(range(8))
    random.Random(3).shuffle(order)
    assert [i for p in packs for i in p] == order  # every row once, in shuffled order
    assert all(sum(lengths[i] for i in p) <= 12 for p in packs)
    # next-fit: a pack closes only when the next row would not fit
    for p, nxt in zip(packs[:-1], packs[1:], strict=True):
        assert sum(lengths[i] for i in p) + lengths[nxt[0]] > 12
    assert pack_rows(lengths, 12, seed=3) == packs and pack_rows(lengths, 12, seed=4) != packs


def test_a_sample_longer_than_the_budget_is_an_error():
    rows = [{"input_ids": [1] * 6, "labels": [1] * 6}, {"input_ids": [1] * 11, "labels": [1] * 11}]
    with pytest.raises(TrainSetupError, match=r"^t.parquet: row 2 has 11 tokens, more than "
                                              r"train.tokens_per_batch 10 .*format.max_length"):
        packed_dataset(rows, 10, 0, path="t.parquet")
    with pytest.raises(TrainSetupError, match=r"train.grad_accum: 3 packs per optimizer step, "
                                              r"but the train split fills only 2 pack"):
        packed_dataset(rows, 12, 0, grad_accum=3)


def test_collator_restarts_positions_and_never_labels_across_a_boundary():
    pack = {"samples": [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                        {"input_ids": [8, 9], "labels": [-100, 9]},
                        {"input_ids": [4], "labels": [4]}]}
    out = PackingCollator()([pack])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9, -100]]
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and out["max_length_q"] == 3
    assert "attention_mask" not in model_inputs(out)
    plain = PackingCollator(unpacked=PaddingCollator(0))([{"input_ids": [1], "labels": [1]}])
    assert plain["input_ids"].tolist() == [[1]] and "cu_seq_lens_q" not in plain


def test_packing_auto_follows_the_device_and_soft_prompts_stay_unpacked(caplog):
    style, note = resolve_packing("auto", "cpu", "full")
    assert style == PADDING_FREE and note.startswith("train.packing: auto on cpu: padding-free")
    assert resolve_packing("auto", "cuda", "lora") == (PACKS, "train.packing: auto on cuda")
    assert resolve_packing(True, "cpu", "qlora")[0] == PACKS
    assert resolve_packing("padding_free", "cuda", "full")[0] == PADDING_FREE
    assert resolve_packing(False, "cpu", "full") == (OFF, "train.packing: False")
    for setting in ("auto", True, "padding_free"):
        style, note = resolve_packing(setting, "cpu", "prefix_tuning")
        assert style == OFF and "training unpacked (padded)" in note and note in caplog.text


def test_padding_free_rows_are_the_padded_batch_joined():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8, 9], "labels": [8, 9]}]
    items = PaddingFreeRows(rows)
    assert len(items) == 2 and items[1] == {"samples": [rows[1]]}
    assert list(items)[0]["samples"] == rows[:1]
    out = PackingCollator()([items[0], items[1]])  # a batch of batch_size=2 items
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5]


# --------------------------------------------------------------------------- the tiny model
def _samples(vocab: int, lengths=(7, 19, 3, 30, 1, 12), seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * min(2, n - 1) + ids[2:]})
    return out


def per_sample_equality(model, samples, device: str = "cpu") -> tuple[float, float, float]:
    """(max |logit diff| packed vs alone, max |per-sample loss diff|, same for position ids only)."""
    batch = PackingCollator()([{"samples": samples}])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([s["input_ids"]], device=device)).logits[0].float()
                 for s in samples]
        naive = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        previous = packed_attention.enable(model)
        try:
            packed = model(**{k: v for k, v in model_inputs(batch).items()
                              if k != "labels"}).logits[0].float()
        finally:
            packed_attention.disable(model, previous)
    bounds = batch["cu_seq_lens_q"].tolist()
    logit_diff = loss_diff = naive_diff = 0.0
    for s, ref, a, b in zip(samples, alone, bounds[:-1], bounds[1:], strict=True):
        y = torch.tensor(s["labels"][1:], dtype=torch.long, device=device)
        logit_diff = max(logit_diff, (packed[a:b] - ref).abs().max().item())
        naive_diff = max(naive_diff, (naive[a:b].float() - ref).abs().max().item())
        loss_diff = max(loss_diff, abs(ce(packed[a:b - 1], y).item() - ce(ref[:-1], y).item()))
    return logit_diff, loss_diff, naive_diff


def test_samples_in_a_pack_match_each_sample_alone(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    logit_diff, loss_diff, naive_diff = per_sample_equality(
        model, _samples(model.config.vocab_size))
    assert logit_diff <= 1e-4 and loss_diff <= 1e-4, (logit_diff, loss_diff)
    assert naive_diff > 1e-2  # position ids alone leak across samples: the test can tell
    assert model.config._attn_implementation == "sdpa"  # restored


def loss_and_grads(model, batch: dict, loss_impl: str, packed: bool) -> tuple[float, dict]:
    """One forward/backward as the train stage runs it: the loss (mean over the batch's label
    tokens) and every parameter's gradient."""
    from reprotune.train import lean_loss

    model.zero_grad(set_to_none=True)
    previous = packed_attention.enable(model) if packed else None
    if loss_impl != "stock":
        lean_loss.install(model, loss_impl)
    try:
        loss = model(**model_inputs(batch)).loss
        loss.backward()
    finally:
        lean_loss.uninstall(model)
        if previous is not None:
            packed_attention.disable(model, previous)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def reduction_tolerance(model, tokens: int) -> float:
    """Relative tolerance for two fp32 computations of the same sums in different orders.

    A sum of n terms computed in any order is within (n - 1) * u * sum|x| of the exact one
    (u = 2**-24, fp32's unit roundoff; Higham, Accuracy and Stability, 4.2), so two orders
    differ by at most twice that. The longest sums behind the loss and the weight gradients:
    per layer, dot products of at most max(hidden, intermediate) terms (projections, MLP) and
    the weight gradients' sums over every token of the batch; errors of successive layers
    add up (to first order). So: 2u x (layers x (widest dot product + tokens)).
    """
    cfg = model.config
    widest = max(cfg.hidden_size, cfg.intermediate_size)
    return 2 * 2.0**-24 * (cfg.num_hidden_layers + 1) * (widest + tokens)


def test_padding_free_batch_has_the_padded_loss_and_gradients(tiny_base_dir):
    """The CPU default (padding_free: per-sample sdpa + the chunked loss) against a padded
    batch through the model's own forward and loss: the same rows, so the same loss and
    gradients up to the order in which fp32 sums run (:func:`reduction_tolerance`: 7.1e-5
    here; measured 7.7e-8 for the loss and 6.1e-7 for the worst gradient tensor, while the
    row without its boundaries moves them by 7.9e-4 and 1.1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    rows = _samples(model.config.vocab_size, lengths=(7, 19, 3, 30, 12))
    padded = PaddingCollator(0)(rows)
    joined = PackingCollator()(list(PaddingFreeRows(rows)))
    assert padded["input_ids"].numel() == 5 * 30 and joined["input_ids"].numel() == 71
    ref_loss, ref = loss_and_grads(model, padded, "stock", packed=False)
    loss, grads = loss_and_grads(model, joined, "chunked", packed=True)
    tol = reduction_tolerance(model, tokens=71)
    assert abs(loss - ref_loss) <= tol * abs(ref_loss), (loss, ref_loss, tol)
    worst = max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref.items() if g.norm() > 0)
    assert worst <= tol, (worst, tol)
    # the test can tell: the same row without its boundaries (one causal sequence, so later
    # samples attend to earlier ones) moves the loss and gradients far beyond the tolerance
    unbounded = {k: v for k, v in joined.items()
                 if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                              "max_length_k")}
    leak_loss, leak = loss_and_grads(model, unbounded, "chunked", packed=False)
    leak_worst = max(((leak[n] - g).norm() / g.norm()).item() for n, g in ref.items()
                     if g.norm() > 0)
    assert abs(leak_loss - ref_loss) > 10 * tol * abs(ref_loss) and leak_worst > 10 * tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pack_matches_alone(tiny_base_dir):
    """The same check on the GPU kernel: varlen_attn in bf16 against each sample alone (sdpa).

    Tolerance: bf16 keeps 8 significant bits (relative rounding 2**-9 per value); the two
    kernels accumulate in different orders and round the attention output to bf16 at
    different points, so logits of this model (|logit| up to ~10) may differ by a few bf16
    ulps, measured on other bf16 kernels at ~1e-2. 5e-2 (logits) and 2e-2 (per-sample loss)
    leave room for that and stay far below a leak across samples (``naive_diff`` ~0.5).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.bfloat16).cuda()
    assert packed_attention.kernel_name("cuda") == packed_attention.VARLEN
    logit_diff, loss_diff, naive_diff = per_sample_equality(
        model, _samples(model.config.vocab_size), device="cuda")
    assert packed_attention.report("cuda")["attention"] == packed_attention.VARLEN  # no fallback
    assert logit_diff <= 5e-2 and loss_diff <= 2e-2 and naive_diff > 0.1, (
        logit_diff, loss_diff, naive_diff)


# --------------------------------------------------------------------------- training
def _rows(n: int, seed: int) -> list[dict]:
    """Counting answers of varied lengths after a masked prompt of varied length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(10, 300) for _ in range(rng.randrange(2, 6))]
        start = rng.randrange(40, 60)
        answer = [start + j for j in range(rng.randrange(4, 20))]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def _train(tmp_path, base, name: str, train_rows, *, method: str = "full", lr: float = 1e-2,
           **train) -> dict:
    d = tmp_path / name
    io.write_parquet(d / "train.parquet", train_rows, schema=SCHEMA)
    io.write_parquet(d / "val.parquet", _rows(16, 1), schema=SCHEMA)
    t = {"eval_steps": 10, "logging_steps": 1, "patience": 0, "warmup_ratio": 0.0,
         "scheduler": "constant", **train}
    cfg = RunConfig(top=TopParams(method=method, lr=lr, epochs=1, batch_size=8, seed=0),
                    train=TrainParams(**t), prompt=PromptParams(num_virtual_tokens=4))
    m = train_model(train_path=d / "train.parquet", val_path=d / "val.parquet", base_dir=base,
                    out_dir=d / "out", checkpoints_dir=d / "ckpt", live_dir=d / "live", cfg=cfg)
    tsv = (d / "live/plots/metrics/train_loss.tsv").read_text().splitlines()[1:]
    m["curve"] = [float(line.split("\t")[1]) for line in tsv]
    return m


def test_packed_and_unpacked_training_give_the_same_loss_curve(tmp_path, tiny_base_dir):
    # Every optimizer step sees the whole split (unpacked: 3 batches of 8; packed: all packs,
    # of different sizes and label counts), so both paths take the same 20 Adam steps and
    # any difference comes from attention leaking, labels crossing or normalisation.
    # (lr 3e-3: measured differences stay <= 5e-7; at lr 1e-2 this tiny model is chaotic
    # enough to grow fp32 rounding from 1e-6 to 4e-4 by step 20, whatever the two paths.)
    rows = _rows(24, 0)
    n_packs = len(pack_rows([len(r["input_ids"]) for r in rows], 64, seed=0))
    assert n_packs >= 4
    plain = _train(tmp_path, tiny_base_dir, "plain", rows, lr=3e-3, max_steps=20, grad_accum=3,
                   packing=False)
    packed = _train(tmp_path, tiny_base_dir, "packed", rows, lr=3e-3, max_steps=20,
                    grad_accum=n_packs, packing=True, tokens_per_batch=64)
    # the CPU defaults (padding-free batches, chunked loss) against padded batches through
    # the model's own loss: the same curve too
    stock = _train(tmp_path, tiny_base_dir, "stock", rows, lr=3e-3, max_steps=20, grad_accum=3,
                   packing=False, loss_impl="stock")
    free = _train(tmp_path, tiny_base_dir, "free", rows, lr=3e-3, max_steps=20, grad_accum=3)
    assert free["packing_style"] == "padding_free" and "packs" not in free
    assert packed["packing"] is True and plain["packing"] is False
    assert plain["attention"] == "sdpa"
    if torch.cuda.is_available():  # train_model takes the GPU where there is one
        # varlen_attn under bf16 autocast against padded sdpa: the kernels round differently
        # (see test_cuda_pack_matches_alone); a leak or a normalisation error moves the
        # curve by > 0.1
        assert packed["attention"] == packed_attention.VARLEN, packed["attention_note"]
        assert packed["precision"] == "bf16"
        tol = 5e-2
    else:
        assert packed["attention"] == packed_attention.PER_SAMPLE
        assert packed["attention_note"] == "cpu: varlen_attn runs on CUDA only"
        tol = 1e-4  # fp32, the same sdpa kernel per sample: measured <= 5e-7
    lean = "liger" if torch.cuda.is_available() and liger_available() else "chunked"  # auto
    assert packed["loss_impl"] == plain["loss_impl"] == lean
    assert packed["packs"] == n_packs and packed["tokens_per_batch"] == 64
    assert len(plain["curve"]) == len(packed["curve"]) == 20
    assert plain["curve"][-1] < plain["curve"][0] - 2.0  # it learned
    for other in (packed, stock, free):
        worst = max(abs(a - b) for a, b in zip(plain["curve"], other["curve"], strict=True))
        assert worst <= tol, (worst, plain["curve"], other["curve"])
        assert other["best_val_loss"] == pytest.approx(plain["best_val_loss"], abs=tol)
    assert stock["loss_impl"] == "stock"
    for other in (packed, free):
        assert other["tokens_seen"] == plain["tokens_seen"]  # real tokens only, no padding
        assert other["label_tokens_seen"] == plain["label_tokens_seen"]
    # tokens/s counts the training steps only: two evaluations (steps 10 and 20) and their
    # checkpoint saves are in the stage's train time, not in the step time
    for m in (plain, packed, stock, free):
        assert 0 < m["step_time_s"] < m["train_time_s"]
        # both figures are rounded in the metrics (0.1 tokens/s, 0.01 s): the product is off
        # by at most tokens/s x 0.005 + step time x 0.05 (1% is not enough for a step time of
        # ~0.5 s, as one torch thread per xdist worker gives)
        bound = m["tokens_per_s"] * 0.005 + m["step_time_s"] * 0.05 + 1e-6
        assert abs(m["tokens_per_s"] * m["step_time_s"] - m["tokens_seen"]) <= bound, m


def test_prompt_tuning_asked_to_pack_trains_unpacked_and_says_so(tmp_path, tiny_base_dir):
    m = _train(tmp_path, tiny_base_dir, "prompt", _rows(16, 0), method="prompt_tuning",
               max_steps=2, eval_steps=2, packing=True)
    assert m["packing"] is False and "prompt_tuning" in m["packing_note"]
    assert m["loss_impl"] == "stock" and m["train_steps"] == 2


def test_static_pack_shapes_change_no_result(tiny_base_dir):
    """train.torch_compile pads every pack to the budget: same logits for the real tokens,
    same label and token counts, a power-of-two number of boundaries."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    samples = _samples(model.config.vocab_size, lengths=(7, 19, 3, 4, 12))
    plain = PackingCollator()([{"samples": samples}])
    static = PackingCollator(pad_to=64, pad_id=0)([{"samples": samples}])
    n = plain["input_ids"].shape[1]
    assert n == 45 and static["input_ids"].shape == (1, 64)
    assert static["cu_seq_lens_q"].tolist() == [0, 7, 26, 29, 33, 45, 64, 64]  # 8 = 2**3
    assert static["max_length_q"] == 64 and static["attention_mask"].sum().item() == n
    assert torch.equal(static["labels"][0, :n], plain["labels"][0])
    assert (static["labels"][0, n:] == IGNORE_INDEX).all()
    assert static["position_ids"][0, n:].tolist() == list(range(19))
    with pytest.raises(ValueError, match="exceeds train.tokens_per_batch 40"):
        PackingCollator(pad_to=40)([{"samples": samples}])
    previous = packed_attention.enable(model)
    try:
        with torch.no_grad():
            a = model(**{k: v for k, v in model_inputs(plain).items() if k != "labels"}).logits
            b = model(**{k: v for k, v in model_inputs(static).items() if k != "labels"}).logits
    finally:
        packed_attention.disable(model, previous)
    assert (a[0] - b[0, :n]).abs().max().item() <= 1e-5
