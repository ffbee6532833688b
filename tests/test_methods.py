"""Method set-up: what trains per method, parameter counts, and errors that name the param."""

from __future__ import annotations

import pytest

from reprotune.params import FreezeParams, LoraParams, PromptParams
from reprotune.train.methods import (
    METHODS,
    TrainSetupError,
    check_lora_targets,
    linear_module_names,
    load_base,
    prepare_model,
    resolve_compute_dtype,
    trainable_summary,
    virtual_tokens,
)


def _prepared(base, method, **kw):
    return prepare_model(load_base(base, method), method, **kw)


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_trains_everything(tiny_base_dir):
    s = trainable_summary(_prepared(tiny_base_dir, "full"))
    assert s["share"] == 1.0 and s["trainable"] == s["total"] > 0


def test_freeze_trains_top_layer_and_norm_only(tiny_base_dir):
    model = _prepared(tiny_base_dir, "freeze", freeze=FreezeParams(trainable_layers=1))
    names = _trainable_names(model)
    assert names and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in names)
    assert "model.norm.weight" in names
    assert not any(n.startswith("model.layers.0.") for n in names)
    assert not model.get_input_embeddings().weight.requires_grad
    s = trainable_summary(model)
    assert 0 < s["share"] < 1
    layer1 = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.1."))
    assert s["trainable"] == layer1 + model.model.norm.weight.numel()


def test_freeze_without_norm(tiny_base_dir):
    model = _prepared(tiny_base_dir, "freeze", freeze=FreezeParams(trainable_layers=2,
                                                                   train_norm=False))
    names = _trainable_names(model)
    assert "model.norm.weight" not in names
    assert any(n.startswith("model.layers.0.") for n in names)


def test_freeze_lm_head_is_tied_to_embeddings(tiny_base_dir):
    model = _prepared(tiny_base_dir, "freeze", freeze=FreezeParams(train_lm_head=True))
    # the tiny model ties lm_head to embed_tokens: one matrix, so both train
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_input_embeddings().weight.requires_grad
    frozen = _prepared(tiny_base_dir, "freeze", freeze=FreezeParams(train_lm_head=False))
    assert trainable_summary(model)["trainable"] - trainable_summary(frozen)["trainable"] == \
        model.get_input_embeddings().weight.numel()


def test_freeze_too_many_layers_names_param(tiny_base_dir):
    with pytest.raises(TrainSetupError, match=r"freeze\.trainable_layers: 3 > the model's 2"):
        _prepared(tiny_base_dir, "freeze", freeze=FreezeParams(trainable_layers=3))


def test_lora_small_share_and_adapters_on_every_target(tiny_base_dir):
    model = _prepared(tiny_base_dir, "lora", lora=LoraParams(r=4))
    s = trainable_summary(model)
    assert 0 < s["share"] < 0.5
    names = _trainable_names(model)
    assert names and all("lora_" in n for n in names)
    for target in LoraParams().target_modules:  # default: all 7 projections, both layers
        assert sum(f".{target}.lora_A." in n for n in names) == 2, target


def test_lora_dora_rslora_reach_peft(tiny_base_dir):
    model = _prepared(tiny_base_dir, "lora", lora=LoraParams(r=4, use_dora=True, use_rslora=True,
                                                             target_modules=["q_proj"]))
    cfg = model.peft_config["default"]
    assert cfg.use_dora and cfg.use_rslora and set(cfg.target_modules) == {"q_proj"}
    assert any("lora_magnitude_vector" in n for n in _trainable_names(model))


def test_lora_all_linear(tiny_base_dir):
    model = _prepared(tiny_base_dir, "lora", lora=LoraParams(r=2, target_modules=["all-linear"]))
    names = _trainable_names(model)
    assert any(".down_proj.lora_A" in n for n in names)
    assert not any("lm_head" in n for n in names)


def test_lora_unknown_target_lists_existing_linear_modules(tiny_base_dir):
    with pytest.raises(TrainSetupError) as err:
        _prepared(tiny_base_dir, "lora", lora=LoraParams(target_modules=["q_proj", "q_prj"]))
    msg = str(err.value)
    assert msg.startswith("lora.target_modules: 'q_prj' matches no module")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg


def test_lora_target_that_is_not_a_layer(tiny_base_dir):
    with pytest.raises(TrainSetupError, match=r"lora\.target_modules: 'mlp' matches \['Qwen3MLP'\]"):
        check_lora_targets(load_base(tiny_base_dir, "lora"), ["mlp"])


def test_linear_module_names(tiny_base_dir):
    assert linear_module_names(load_base(tiny_base_dir, "full")) == [
        "down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_qlora_counts_4bit_weights_at_full_size(tiny_base_dir):
    lora = LoraParams(r=4)
    q = _prepared(tiny_base_dir, "qlora", lora=lora)
    assert q.base_model.model.is_loaded_in_4bit
    plain = trainable_summary(_prepared(tiny_base_dir, "lora", lora=lora))
    sq = trainable_summary(q)
    # same adapters; packed 4-bit weights count as the parameters they stand for
    assert sq["trainable"] == plain["trainable"]
    assert sq["total"] == plain["total"]


def test_qlora_needs_a_4bit_transformers_model(tiny_base_dir):
    import torch

    with pytest.raises(TrainSetupError, match="method=qlora: the base model is not loaded in 4 bit"):
        prepare_model(load_base(tiny_base_dir, "full"), "qlora")
    with pytest.raises(TrainSetupError, match="method=qlora: needs a transformers PreTrainedModel"):
        prepare_model(torch.nn.Linear(4, 4), "qlora")


def test_prompt_methods_train_a_tiny_share(tiny_base_dir):
    for method in ("prompt_tuning", "prefix_tuning"):
        model = _prepared(tiny_base_dir, method, prompt=PromptParams(num_virtual_tokens=4))
        s = trainable_summary(model)
        assert 0 < s["share"] < 0.05, (method, s)
        assert model.peft_config["default"].num_virtual_tokens == 4
        assert virtual_tokens(method, PromptParams(num_virtual_tokens=4)) == 4
    assert virtual_tokens("lora", PromptParams(num_virtual_tokens=4)) == 0


def test_unknown_method_names_param(tiny_base_dir):
    with pytest.raises(TrainSetupError, match=r"method: 'dpo' is not one of full, freeze"):
        prepare_model(load_base(tiny_base_dir, "full"), "dpo")
    assert set(METHODS) == {"full", "freeze", "lora", "qlora", "prompt_tuning", "prefix_tuning"}


def test_compute_dtype_auto_is_fp32_on_cpu():
    import torch

    assert resolve_compute_dtype("auto", "cpu") is torch.float32
    assert resolve_compute_dtype("bf16", "cpu") is torch.bfloat16


def test_qlora_gradients_survive_an_evaluation(tiny_base_dir):
    """bitsandbytes must not switch to its autograd-less CPU inference kernel after eval."""
    import torch

    torch.manual_seed(0)
    model = _prepared(tiny_base_dir, "qlora", lora=LoraParams(r=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so gradients reach layer 0 through every layer
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(10, 300, (2, 12))

    def layer0_grads():
        model.zero_grad()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for n, p in model.named_parameters()
                if "layers.0." in n and "lora_A" in n]

    before = layer0_grads()
    model.eval()
    with torch.no_grad():  # what the Trainer's evaluation does
        model(input_ids=ids)
    after = layer0_grads()
    assert len(before) == 7
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
