"""A few full-batch AdamW steps on a peft LoRA model: the small trained adapters of the
serving tests (distinct, learned behaviour in seconds on the embedded model)."""

from __future__ import annotations

from typing import Any

from reprotune.constants import IGNORE_INDEX


def fit_lora(model: Any, tok: Any, texts: list[str], *, steps: int = 60, lr: float = 2e-2) -> Any:
    """Train ``model`` (a peft model) on every token of ``texts`` (padding unlabelled)."""
    import torch

    batch = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    return model.eval()
