"""The chunked linear + cross-entropy equals the stock loss, in value and in gradients."""

from __future__ import annotations

import pytest
import torch

from reprotune.constants import IGNORE_INDEX
from reprotune.params import LoraParams, PromptParams
from reprotune.train.lean_loss import (
    causal_lm_loss,
    chunk_rows,
    chunked_linear_cross_entropy,
    install,
    resolve_loss_impl,
    uninstall,
)
from reprotune.train.methods import TrainSetupError, load_base, prepare_model
from reprotune.train.training import PaddingCollator


def _problem(n: int = 300, h: int = 32, v: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    bias = torch.randn(v, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = IGNORE_INDEX
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk", [1, 37, 4096])
def test_chunked_loss_and_gradients_equal_stock_cross_entropy(chunk):
    hidden, weight, bias, labels = _problem()
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, labels, reduction="sum")
    ref_grads = torch.autograd.grad(3.0 * ref, (hidden, weight, bias))
    got = chunked_linear_cross_entropy(hidden, weight, labels, bias, chunk=chunk)
    grads = torch.autograd.grad(3.0 * got, (hidden, weight, bias))  # upstream scale flows
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max().item() <= 1e-5 * max(1.0, r.abs().max().item())
    # ignored positions get exactly zero gradient
    assert grads[0][::3].abs().max().item() == 0.0


def test_frozen_head_and_no_grad():
    hidden, weight, _, labels = _problem(n=50, v=200)
    weight.requires_grad_(False)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk=16)
    (g_h,) = torch.autograd.grad(got, hidden)
    assert g_h.allclose(torch.autograd.grad(ref, hidden)[0], atol=1e-6)
    with torch.no_grad():
        assert chunked_linear_cross_entropy(hidden, weight, labels).item() == pytest.approx(
            ref.item(), rel=1e-6)
    # 2**27 logits per chunk at most, in whole 128-row tiles
    assert chunk_rows(151_936) == 768 and chunk_rows(512) == 8192 and chunk_rows(10**7) == 128
    assert all(chunk_rows(v) % 128 == 0 and chunk_rows(v) * v <= 2**27
               for v in (32_000, 128_256, 151_936, 262_144))


def _batch(tokenizer, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (5, 17, 9, 12):
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    return PaddingCollator(tokenizer.pad_token_id)(rows)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_model_loss_and_gradients_equal_the_stock_forward(tiny_base_dir, method):
    from reprotune.modeling import load_tokenizer

    torch.manual_seed(0)
    model = prepare_model(load_base(tiny_base_dir, method), method, lora=LoraParams(r=4))
    batch = _batch(load_tokenizer(tiny_base_dir), model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    for n_items in (None, 100):  # batch mean, and a whole optimizer step's label count
        stock = model(**batch, num_items_in_batch=n_items).loss
        ref = torch.autograd.grad(stock, params)
        lean = causal_lm_loss(model, batch, "chunked", n_items)
        got = torch.autograd.grad(lean, params)
        assert lean.item() == pytest.approx(stock.item(), rel=1e-6, abs=1e-6)
        worst = max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True))
        assert worst <= 1e-5, worst


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_installed_forward_returns_the_lean_loss_only_when_given_labels(tiny_base_dir,
                                                                              method):
    """install(): the model's own forward (what DDP/FSDP call) computes the lean loss."""
    from reprotune.modeling import load_tokenizer

    torch.manual_seed(0)
    model = prepare_model(load_base(tiny_base_dir, method), method, lora=LoraParams(r=4))
    batch = _batch(load_tokenizer(tiny_base_dir), model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    stock = model(**batch, num_items_in_batch=70)
    ref = torch.autograd.grad(stock.loss, params)
    install(model, "chunked")
    lean = model(**batch, num_items_in_batch=70)
    assert lean.logits is None and lean.loss.item() == pytest.approx(stock.loss.item(), rel=1e-6)
    got = torch.autograd.grad(lean.loss, params)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True)) <= 1e-5
    plain = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(model(**plain).logits, stock.logits)  # no labels: the model's own forward
    uninstall(model)
    assert model(**batch).logits is not None


def test_resolve_loss_impl(tiny_base_dir, monkeypatch):
    full = prepare_model(load_base(tiny_base_dir, "full"), "full")
    assert resolve_loss_impl("auto", "cpu", full, "full") == ("chunked", "train.loss_impl: auto")
    assert resolve_loss_impl("stock", "cpu", full, "full")[0] == "stock"
    with pytest.raises(TrainSetupError, match="train.loss_impl: liger needs a CUDA GPU"):
        resolve_loss_impl("liger", "cpu", full, "full")
    prompt = prepare_model(load_base(tiny_base_dir, "prompt_tuning"), "prompt_tuning",
                           prompt=PromptParams(num_virtual_tokens=2))
    impl, note = resolve_loss_impl("chunked", "cpu", prompt, "prompt_tuning")
    assert impl == "stock" and "prompt_tuning builds its inputs inside peft" in note
    head_lora = prepare_model(load_base(tiny_base_dir, "lora"), "lora",
                              lora=LoraParams(r=2, target_modules=["q_proj", "lm_head"]))
    impl, note = resolve_loss_impl("auto", "cpu", head_lora, "lora")
    assert impl == "stock" and "not a plain Linear" in note
    # several processes keep it (it runs inside the wrapped forward); DeepSpeed does not
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_loss_impl("auto", "cpu", full, "full")[0] == "chunked"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    impl, note = resolve_loss_impl("chunked", "cpu", full, "full")
    assert impl == "stock" and "DeepSpeed" in note


def test_chunked_loss_under_bf16_autocast_stays_close():
    # the mixed-precision path (as on CUDA with train.precision bf16): bf16 matmuls, fp32
    # softmax and fp32 gradient accumulation over chunks
    hidden, weight, _, labels = _problem(n=256, h=64, v=3000)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    ref_g = torch.autograd.grad(ref, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_linear_cross_entropy(hidden, weight, labels, chunk=50)
    got_g = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32 and got_g[1].dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-2)
    for a, b in zip(got_g, ref_g, strict=True):
        assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item()
    # the weight gradient over 6 chunks against one chunk's: on CPU (no bf16 GEMM with fp32
    # output) each chunk's product is rounded to bf16 once, as autocast's linear backward
    # rounds every weight's gradient, and the chunks add up in fp32: each of the 7 products
    # is within 2**-9 of its own size (8 significant bits); measured 3.8e-3 of the largest
    # entry, bound 2**-7 (a sum in bf16 across chunks would drift further with every chunk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = chunked_linear_cross_entropy(hidden, weight, labels, chunk=4096)
    (one_w,) = torch.autograd.grad(one, weight)
    assert (one_w - got_g[1]).abs().max().item() <= 2**-7 * one_w.abs().max().item()


def test_accumulate_fp32_sums_low_precision_products_in_fp32():
    from reprotune.train.lean_loss import accumulate_fp32

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 32, generator=g), torch.randn(32, 48, generator=g))
    acc = torch.full((64, 48), 1000.0)
    accumulate_fp32(acc, a.bfloat16(), b.bfloat16())
    exact = 1000.0 + a.bfloat16().float() @ b.bfloat16().float()
    assert acc.dtype == torch.float32 and (acc - exact).abs().max().item() <= 1e-3
    acc32 = torch.zeros(64, 48)
    accumulate_fp32(acc32, a, b)
    assert torch.allclose(acc32, a @ b, atol=1e-5)


def test_the_trainer_runs_the_lean_loss_under_mixed_precision(tiny_base_dir, tmp_path):
    # accelerate wraps only model.forward in autocast; the lean path must enter it itself,
    # or a bf16 run would silently compute in fp32 (slow, and the varlen kernel needs bf16)
    from reprotune.modeling import load_tokenizer
    from reprotune.params import TopParams, TrainParams
    from reprotune.train.training import RunConfig, _trainer_class, training_arguments

    model = prepare_model(load_base(tiny_base_dir, "full"), "full")
    tok = load_tokenizer(tiny_base_dir)
    cfg = RunConfig(top=TopParams(batch_size=4), train=TrainParams(precision="bf16"))
    args = training_arguments(cfg, output_dir=tmp_path, device="cpu", precision="bf16")
    rows = [{"input_ids": [5, 6], "labels": [5, 6]}]
    trainer = _trainer_class()(model=model, args=args, processing_class=tok, train_dataset=rows,
                               eval_dataset=rows)
    trainer.loss_impl = "chunked"
    install(model, "chunked")
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, inp, out: seen.append(out.dtype))
    loss = trainer.compute_loss(model, _batch(tok, model.config.vocab_size))
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32  # fp32 master weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_lean_losses_match_stock():
    """On the GPU: the chunked loss (and liger's where installed) against the stock loss.

    fp32 inputs, so the only difference is the summation order of cuBLAS and the chunks:
    rel 1e-4 on the loss, 1e-3 of the largest gradient entry. Then under bf16 autocast (the
    training path), where the logits themselves are bf16-rounded (2**-9 relative): 1e-2.
    """
    from reprotune.train.lean_loss import liger_available
    from reprotune.train.lean_loss import liger_linear_cross_entropy as liger

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(600, 64, device="cuda", generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(2000, 64, device="cuda", generator=g)).requires_grad_()
    labels = torch.randint(0, 2000, (600,), device="cuda", generator=g)
    labels[::4] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    ref_g = torch.autograd.grad(ref, (hidden, weight))
    fns = [chunked_linear_cross_entropy] + ([liger] if liger_available() else [])
    for fn in fns:
        got = fn(hidden, weight, labels)
        got_g = torch.autograd.grad(got, (hidden, weight))
        assert got.item() == pytest.approx(ref.item(), rel=1e-4), fn.__name__
        for a, b in zip(got_g, ref_g, strict=True):
            assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item(), fn.__name__
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = fn(hidden, weight, labels)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(ref.item(), rel=1e-2), fn.__name__
