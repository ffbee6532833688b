"""Preference metrics on the test split's pairs: does the tuned model prefer ``chosen``?

For a model π and the reference π_ref (the SFT model the aligned one started from), per pair:
``log π(y|x)`` summed over the answer's tokens (the completion ids format measured, prompt
tokens never counted), and the DPO implicit-reward margin in nats,
``(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))``.

* ``reward_accuracy``: share of pairs with a positive margin, a tie counting half (the SFT
  model against itself ties everywhere: 0.5, the chance level DPO starts from);
* ``mean_margin``: the mean margin (nats; TRL's logged reward margin is β times it);
* ``chosen_logp_shift`` / ``rejected_logp_shift``: mean change of each answer's log-prob
  relative to the reference (small models' chosen shift tends to go negative under pure DPO);
* ``logp_accuracy``: share of pairs where the model alone gives ``chosen`` the higher
  log-prob (no reference; meaningful for the SFT model too), ``mean_chosen_logp`` /
  ``mean_rejected_logp``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

FIELDS = ("reward_accuracy", "mean_margin", "chosen_logp_shift", "rejected_logp_shift",
          "logp_accuracy", "mean_chosen_logp", "mean_rejected_logp")


def answer_logps(model: Any, pairs: Sequence[dict[str, Any]], *, batch_size: int,
                 pad_id: int) -> tuple[list[float], list[float]]:
    """``(chosen, rejected)`` summed answer log-probs of every pair under ``model``."""
    import torch

    device = next(model.parameters()).device
    seqs = [(p["prompt_ids"], p[side]) for p in pairs for side in ("chosen_ids", "rejected_ids")]
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i:i + batch_size]
            width = max(len(a) + len(b) for a, b in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            answer = torch.zeros((len(batch), width), dtype=torch.bool)
            for j, (prompt, completion) in enumerate(batch):
                n = len(prompt) + len(completion)
                ids[j, :n] = torch.tensor(prompt + completion)
                mask[j, :n] = 1
                answer[j, len(prompt):n] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logits = logits[:, -width:].float()  # prompt tuning prepends virtual positions
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(
                -1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            out += (logp * answer[:, 1:].to(device)).sum(dim=1).tolist()
    return out[0::2], out[1::2]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def summarize(chosen: Sequence[float], rejected: Sequence[float], ref_chosen: Sequence[float],
              ref_rejected: Sequence[float]) -> dict[str, float]:
    """The :data:`FIELDS` of one model from its and the reference's answer log-probs."""
    margins = [(c - rc) - (r - rr) for c, r, rc, rr in
               zip(chosen, rejected, ref_chosen, ref_rejected, strict=True)]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    values = {
        "reward_accuracy": _mean(wins), "mean_margin": _mean(margins),
        "chosen_logp_shift": _mean([c - rc for c, rc in zip(chosen, ref_chosen, strict=True)]),
        "rejected_logp_shift": _mean([r - rr for r, rr in zip(rejected, ref_rejected, strict=True)]),
        "logp_accuracy": _mean([float(c > r) for c, r in zip(chosen, rejected, strict=True)]),
        "mean_chosen_logp": _mean(chosen), "mean_rejected_logp": _mean(rejected),
    }
    return {k: round(float(v), 6) for k, v in values.items()}


def preference_metrics(model: Any, reference: Any, pairs: Sequence[dict[str, Any]], *,
                       batch_size: int, pad_id: int) -> dict[str, Any]:
    """``{"pairs", "sft": FIELDS, "aligned": FIELDS}``; ``reference`` may be ``model``
    itself (a pass-through), which is then scored once."""
    ref = answer_logps(reference, pairs, batch_size=batch_size, pad_id=pad_id)
    own = ref if model is reference else answer_logps(model, pairs, batch_size=batch_size,
                                                      pad_id=pad_id)
    return {"pairs": len(pairs), "sft": summarize(*ref, *ref), "aligned": summarize(*own, *ref)}


def gain(metrics: dict[str, Any]) -> dict[str, float]:
    """Aligned minus SFT, per field (the ``preference`` block of ``eval_gain.json``)."""
    return {k: round(metrics["aligned"][k] - metrics["sft"][k], 6) for k in FIELDS}


def report_section(metrics: dict[str, Any]) -> str:
    """A Markdown table of the preference metrics, SFT beside aligned."""
    lines = ["", "## Preference pairs", "",
             f"{metrics['pairs']} test pairs; reference: the SFT model. Margins and shifts in "
             f"nats of summed answer log-probs.", "",
             "| metric | SFT | aligned | gain |", "|---|---|---|---|"]
    g = gain(metrics)
    lines += [f"| {k} | {metrics['sft'][k]:.4f} | {metrics['aligned'][k]:.4f} | {g[k]:+.4f} |"
              for k in FIELDS]
    return "\n".join(lines) + "\n"
