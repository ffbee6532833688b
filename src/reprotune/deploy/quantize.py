"""Quantised deployment artifacts of the merged model, each measured in a fresh process.

Methods (one folder each under ``models/quantized/<method>/``):

* ``int8_dynamic``: torch.ao dynamic INT8 ``nn.Linear`` (weights int8 per output channel,
  activations quantised on the fly; CPU serving). Stored pickle-free: int8 weights and float
  scales in ``int8_dynamic.safetensors`` next to the config and tokenizer;
  :func:`load_int8_dynamic` rebuilds the model (re-quantising ``q * scale`` recovers ``q``
  exactly, so no precision is lost on the round trip);
* ``bnb_int8`` / ``bnb_nf4``: bitsandbytes LLM.int8() / NF4 (double quantisation) through
  transformers' ``BitsAndBytesConfig``, saved with ``save_pretrained`` and reloadable with
  ``from_pretrained``; bitsandbytes >= 0.45 has CPU kernels, so this runs without CUDA;
* ``gguf_f16`` / ``gguf_q8_0``: a llama.cpp / Ollama file, see :mod:`reprotune.deploy.gguf_export`.

Modules whose name contains a ``keep_full_precision`` fragment are left unquantised. A method
that cannot run here (package missing, bitsandbytes backend failing, architecture without a
GGUF mapping) is recorded as ``skipped`` with the reason, never dropped silently.

Every artifact carries the chat template and the ``enable_thinking`` setting it was trained
with; the measuring process renders a probe conversation with the artifact's own tokenizer
and the stage fails if that differs from training's rendering. :func:`quantize_all` builds
each artifact (:func:`build_artifact`) and measures it with :func:`measure`, run by
``python -m reprotune.deploy.quantize REQUEST RESULT`` in a fresh process so that nothing loaded
while building (weights, caches, imported peft) leaks into the numbers.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reprotune import io
from reprotune.chat_template import template_fingerprint
from reprotune.deploy.merge import (
    MERGED_INFO_FILE,
    SOFT_PROMPT_DIR,
    directory_size,
    render_difference,
    render_probe,
    text_sha256,
)

log = logging.getLogger(__name__)

METHODS = ("int8_dynamic", "bnb_int8", "bnb_nf4", "gguf_f16", "gguf_q8_0")
INT8_METHODS = ("int8_dynamic", "bnb_int8", "gguf_q8_0")
QUANT_INFO_FILE = "reprotune_quant.json"
INT8_WEIGHTS = "int8_dynamic.safetensors"
INT8_FORMAT = "reprotune-int8-dynamic/1"
TARGET_LOSS_PCT = 2.0  # int8 methods should lose less than this (relative %) on ppl / main metric
WORST_K = 5
FIRST_TOKENS = 8
SPEED_NEW_TOKENS = 32
SPEED_ROUNDS = 3
SPEED_PROMPTS = ("Give three tips for staying healthy.", "计算 12 加 7 等于多少？",
                 "Translate 'good morning' into Chinese.")


class MethodUnavailable(RuntimeError):
    """This quantisation method cannot run on this machine; the message says why."""


class TemplateMismatch(RuntimeError):
    """An artifact formats prompts differently from training; ``results`` holds what was measured."""

    def __init__(self, message: str, results: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.results = results


def kept(name: str, keep_full_precision: Sequence[str]) -> bool:
    """True when module ``name`` stays unquantised."""
    return any(frag in name for frag in keep_full_precision)


def relative_error(w: Any, w_hat: Any) -> float:
    """Relative Frobenius error ``||W - W_hat|| / ||W||`` (float64)."""
    w, w_hat = w.double(), w_hat.double()
    return float((w - w_hat).norm() / max(float(w.norm()), 1e-30))


def worst_layers(errors: dict[str, float], k: int = WORST_K) -> list[dict[str, Any]]:
    return [{"layer": n, "rel_error": round(e, 6)}
            for n, e in sorted(errors.items(), key=lambda x: (-x[1], x[0]))[:k]]


def _linears(model: Any, keep: Sequence[str]) -> list[str]:
    import torch

    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not kept(n, keep))


def _save_side_files(merged_dir: Path, out: Path, info: dict[str, Any]) -> None:
    """Config, generation config, tokenizer + chat template, soft prompt, manifest."""
    import shutil

    from reprotune.modeling import load_tokenizer

    for name in ("config.json", "generation_config.json"):
        if (merged_dir / name).exists() and not (out / name).exists():
            shutil.copy2(merged_dir / name, out / name)
    load_tokenizer(merged_dir).save_pretrained(out)  # whatever files this tokenizer needs
    if (merged_dir / SOFT_PROMPT_DIR).is_dir():
        shutil.copytree(merged_dir / SOFT_PROMPT_DIR, out / SOFT_PROMPT_DIR)
    io.write_json(out / QUANT_INFO_FILE, info)


# --------------------------------------------------------------------------- int8 dynamic
def save_int8_dynamic(float_model: Any, out: Path, keep: Sequence[str],
                      store_dtype: Any) -> dict[str, Any]:
    """Quantise each nn.Linear not matched by ``keep`` to int8 per output channel (symmetric,
    scale = row absmax / 127) and write it all to one safetensors file.

    The output head always stays float: a dynamic quantised Linear has no ``.weight``
    tensor, which generation and perplexity read for the vocabulary size (and with tied
    embeddings an int8 head would be a second copy of the embedding matrix). Unquantised
    tensors are stored in ``store_dtype``, the merged checkpoint's (bf16 for real Qwen3; the
    loader computes in float32, which dynamic INT8 kernels need).
    """
    import torch
    from safetensors.torch import save_file

    out_emb = float_model.get_output_embeddings()
    names = [n for n in _linears(float_model, keep) if float_model.get_submodule(n) is not out_emb]
    quantized = set(names)
    tensors: dict[str, Any] = {}
    errors: dict[str, float] = {}
    for n in names:
        w = float_model.get_submodule(n).weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # symmetric, zero point 0
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        tensors[f"{n}.weight_int8"] = q.contiguous()
        tensors[f"{n}.weight_scale"] = scale.contiguous()
        errors[n] = relative_error(w, q.float() * scale[:, None])
    seen: set[int] = set()
    for k, v in float_model.state_dict().items():
        module = k.rsplit(".", 1)[0]
        if module in quantized and k.endswith(".weight"):
            continue
        if v.data_ptr() in seen:  # tied weights are stored once; tie_weights() restores them
            continue
        seen.add(v.data_ptr())
        tensors[k] = v.detach().to(store_dtype if v.is_floating_point() else v.dtype).contiguous()
    # one metadata key: safetensors writes the metadata map in hash order, so two keys
    # came out in either order and the same weights gave different file bytes run to run
    save_file(tensors, str(out / INT8_WEIGHTS), metadata={"format": INT8_FORMAT})
    return {"quantized_modules": len(names), "layer_errors": errors}


def load_int8_dynamic(path: str | Path) -> tuple[Any, Any]:
    """Rebuild an ``int8_dynamic`` artifact -> (model with DynamicQuantizedLinear, tokenizer),
    with the artifact's soft prompt attached when it has one."""
    import torch
    from safetensors import safe_open
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from transformers import AutoConfig, AutoModelForCausalLM

    from reprotune.deploy.merge import attach_soft_prompt
    from reprotune.modeling import load_tokenizer

    path = Path(path)
    with safe_open(str(path / INT8_WEIGHTS), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != INT8_FORMAT:
            raise ValueError(f"{path / INT8_WEIGHTS}: not a {INT8_FORMAT} file")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
    names = sorted(k.removesuffix(".weight_int8") for k in tensors if k.endswith(".weight_int8"))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    packed = {n: (tensors.pop(f"{n}.weight_int8"), tensors.pop(f"{n}.weight_scale").double(),
                  tensors.pop(f"{n}.bias", None)) for n in names}
    # float tensors first (copied, so bf16 ones are upcast): once a Linear is swapped,
    # load_state_dict expects packed params
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in packed
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path / INT8_WEIGHTS}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    # a soft prompt goes on before the swap: peft's partial load_state_dict would trip over
    # the quantised modules, which insist on finding their own keys
    wrapped = attach_soft_prompt(model, path)
    for n, (q, scale, bias) in packed.items():
        old = model.get_submodule(n)
        # q * scale re-quantises to exactly q with the same scales (zero point 0)
        with warnings.catch_warnings():  # torch 2.13 flags quantized dtypes for removal
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(q.float() * scale[:, None].float(), scale,
                                                 torch.zeros_like(scale, dtype=torch.long), 0,
                                                 torch.qint8)
        new = DynamicLinear(old.in_features, old.out_features, bias_=bias is not None,
                            dtype=torch.qint8)
        new.set_weight_bias(qweight, bias)
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.tie_weights()
    return wrapped.eval(), load_tokenizer(path)


# --------------------------------------------------------------------------- bitsandbytes
def _bnb_config(method: str, keep: Sequence[str], dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if method == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=list(keep))


def _bnb_dequantized(module: Any) -> Any:
    import bitsandbytes as bnb

    w = module.weight
    if getattr(w, "quant_state", None) is not None:  # Params4bit
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return w.data.float() * w.SCB.float()[:, None] / 127.0  # Int8Params: row-wise absmax


def save_bnb(merged_dir: Path, out: Path, method: str, keep: Sequence[str],
             float_model: Any, dtype: Any) -> dict[str, Any]:
    """Load ``merged_dir`` quantised by bitsandbytes on CPU and ``save_pretrained`` it.

    Unquantised modules keep ``dtype`` (the checkpoint's), which is also the NF4 compute dtype.
    """
    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            merged_dir, quantization_config=_bnb_config(method, keep, dtype), device_map="cpu",
            dtype=dtype, use_safetensors=True, local_files_only=True)
    except Exception as exc:  # any bitsandbytes backend failure means: not here
        raise MethodUnavailable(f"bitsandbytes cannot quantise on this machine: "
                                f"{type(exc).__name__}: {exc}") from exc
    errors = {}
    for n, m in model.named_modules():
        if type(m).__name__ in ("Linear8bitLt", "Linear4bit"):
            errors[n] = relative_error(float_model.get_submodule(n).weight.detach().float(),
                                       _bnb_dequantized(m))
    model.save_pretrained(out)
    return {"quantized_modules": len(errors), "layer_errors": errors}


# --------------------------------------------------------------------------- build / load
def build_artifact(method: str, merged_dir: str | Path, out: str | Path, keep: Sequence[str],
                   float_model: Any) -> dict[str, Any]:
    """Write ``method``'s artifact to folder ``out`` (+ ``reprotune_quant.json``); returns the
    manifest. Raises :class:`MethodUnavailable` when the method cannot run here."""
    from transformers import AutoConfig

    from reprotune.deploy.gguf_export import GGUF_FILE, GGUFUnsupported, export_gguf
    from reprotune.deploy.merge import checkpoint_dtype

    merged_dir, out = Path(merged_dir), Path(out)
    merged = io.read_json(merged_dir / MERGED_INFO_FILE)
    # from disk: ``float_model`` was loaded as float32 whatever the checkpoint holds
    dtype = checkpoint_dtype(AutoConfig.from_pretrained(merged_dir, local_files_only=True))
    out.mkdir(parents=True, exist_ok=True)
    if method == "int8_dynamic":
        built = save_int8_dynamic(float_model, out, keep, dtype)
    elif method in ("bnb_int8", "bnb_nf4"):
        built = save_bnb(merged_dir, out, method, keep, float_model, dtype)
    elif method in ("gguf_f16", "gguf_q8_0"):
        try:
            built = export_gguf(merged_dir, out / GGUF_FILE, qtype=method.split("_", 1)[1],
                                keep_full_precision=keep,
                                enable_thinking=merged["enable_thinking"],
                                chat_template_sha256=merged["chat_template_sha256"])
        except GGUFUnsupported as exc:
            raise MethodUnavailable(str(exc)) from exc
    else:
        raise ValueError(f"unknown quantisation method {method!r} (known: {', '.join(METHODS)})")
    errors = built.pop("layer_errors")
    info = {"method": method, "source_method": merged["method"], "merged": merged["merged"],
            "enable_thinking": merged["enable_thinking"],
            "chat_template_sha256": merged["chat_template_sha256"],
            "keep_full_precision": list(keep), **built,
            "layer_error_mean": round(sum(errors.values()) / len(errors), 6) if errors else None,
            "layer_error_max": round(max(errors.values()), 6) if errors else None,
            "worst_layers": worst_layers(errors),
            "layer_errors": {k: round(v, 6) for k, v in sorted(errors.items())}}
    if method.startswith("gguf"):  # the GGUF file carries its own tokenizer and template
        import shutil

        if (merged_dir / SOFT_PROMPT_DIR).is_dir():
            shutil.copytree(merged_dir / SOFT_PROMPT_DIR, out / SOFT_PROMPT_DIR)
        io.write_json(out / QUANT_INFO_FILE, info)
    else:
        _save_side_files(merged_dir, out, info)
    return info


def load_artifact(method: str, path: str | Path) -> tuple[Any, Any, bool]:
    """(model, tokenizer, enable_thinking) of an artifact folder, as a server would load it;
    ``method`` ``merged`` loads the merge output. Soft prompts are re-attached."""
    from reprotune.deploy.merge import attach_soft_prompt
    from reprotune.modeling import load_model, load_tokenizer

    path = Path(path)
    if method == "merged":
        model, tok = load_model(path), load_tokenizer(path)
        thinking = io.read_json(path / MERGED_INFO_FILE)["enable_thinking"]
    elif method == "int8_dynamic":
        model, tok = load_int8_dynamic(path)
        thinking = io.read_json(path / QUANT_INFO_FILE)["enable_thinking"]
    elif method in ("bnb_int8", "bnb_nf4"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu",
                                                     use_safetensors=True, local_files_only=True)
        tok = load_tokenizer(path)
        thinking = io.read_json(path / QUANT_INFO_FILE)["enable_thinking"]
    elif method in ("gguf_f16", "gguf_q8_0"):
        from reprotune.deploy.gguf_export import GGUF_FILE, read_gguf_summary
        from reprotune.deploy.gguf_export import load_gguf as _load

        model, tok = _load(path / GGUF_FILE)
        thinking = read_gguf_summary(path / GGUF_FILE)["enable_thinking"]
    else:
        raise ValueError(f"unknown artifact method {method!r}")
    return attach_soft_prompt(model.eval(), path), tok, bool(thinking)


# --------------------------------------------------------------------------- measuring
def _greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Exactly ``n`` greedy tokens (end-of-turn suppressed) after ``ids``."""
    import torch

    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, num_beams=1)
    return out[0, len(ids):].tolist()


def measure(request: dict[str, Any]) -> dict[str, Any]:
    """Load one artifact and measure it (meant for a fresh process, see :func:`main`).

    ``request``: ``{"method", "path", "test", "eval" (eval params dict), "eval_rows", "seed"}``.
    """
    import dataclasses

    import torch

    from reprotune.evaluate.evaluation import evaluate_model, load_test_rows
    from reprotune.params import EvalParams

    t0 = time.perf_counter()
    model, tok, thinking = load_artifact(request["method"], request["path"])
    load_s = time.perf_counter() - t0
    render = render_probe(tok, thinking)
    probe_ids = tok(render, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        first = _greedy(model, probe_ids, FIRST_TOKENS)
        speed_ids = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)
                     for p in SPEED_PROMPTS]
        speed_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in speed_ids]
        _greedy(model, speed_ids[0], 2)  # warm-up: first-call allocations are not throughput
        rounds = []
        for _ in range(SPEED_ROUNDS):  # best round: the least disturbed by other processes
            t1 = time.perf_counter()
            for ids in speed_ids:
                _greedy(model, ids, SPEED_NEW_TOKENS)
            rounds.append(time.perf_counter() - t1)
        gen_s = min(rounds)
    cfg = dataclasses.replace(EvalParams(**request["eval"]), max_rows=request["eval_rows"])
    metrics, records = evaluate_model(model, tok, load_test_rows(request["test"]), cfg,
                                      enable_thinking=thinking, seed=request["seed"],
                                      progress=False)
    return {"method": request["method"], "load_s": round(load_s, 3),
            "tokens_per_s": round(len(SPEED_PROMPTS) * SPEED_NEW_TOKENS / gen_s, 3),
            "torch_threads": torch.get_num_threads(), "first_tokens": first,
            "enable_thinking": thinking, "chat_template": tok.chat_template,
            "template_sha256": template_fingerprint(tok.chat_template or ""),
            "render": render, "render_sha256": text_sha256(render), "probe_ids": probe_ids,
            "peft_blocked": "peft" in sys.modules and sys.modules["peft"] is None,
            "metrics": {k: v for k, v in metrics.items() if k not in ("confusion", "settings")},
            "rows": records}


def measure_in_subprocess(request: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`measure` in a fresh Python process (nothing cached from building)."""
    with tempfile.TemporaryDirectory(prefix="reprotune-measure-") as td:
        req, res = Path(td) / "request.json", Path(td) / "result.json"
        io.write_json(req, request)
        proc = subprocess.run([sys.executable, "-m", "reprotune.deploy.quantize", str(req), str(res)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not res.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"measuring {request['method']} ({request['path']}) failed with "
                               f"exit code {proc.returncode}:\n{tail}")
        return io.read_json(res)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m reprotune.deploy.quantize REQUEST.json RESULT.json``: measure one artifact.

    When the artifact has no soft prompt, peft is made unimportable first: the measurement
    then also proves the artifact serves without peft.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python -m reprotune.deploy.quantize REQUEST.json RESULT.json")
    request = io.read_json(args[0])
    if not (Path(request["path"]) / SOFT_PROMPT_DIR).is_dir():
        sys.modules["peft"] = None  # type: ignore[assignment]
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # warns on every int8 matmul
    io.write_json(args[1], measure(request))


# --------------------------------------------------------------------------- the stage
def _pct(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or ref == 0 or not math.isfinite(ref):
        return None
    return round((value - ref) / abs(ref) * 100.0, 4)


def main_metric_name(metrics: dict[str, Any]) -> str:
    """accuracy when classification metrics were computed, else ROUGE-L."""
    return "accuracy" if "accuracy" in metrics else "rouge_l"


def summarize(result: dict[str, Any], ref: dict[str, Any], size: int, ref_size: int,
              built: dict[str, Any] | None) -> dict[str, Any]:
    """The flat metrics row of one measured artifact against the merged reference."""
    m, rm = result["metrics"], ref["metrics"]
    name = main_metric_name(rm)
    first_same = next((i for i, (a, b) in enumerate(zip(result["first_tokens"],
                                                         ref["first_tokens"], strict=True))
                       if a != b), FIRST_TOKENS)
    row = {"status": "ok", "size_mb": round(size / 2**20, 4),
           "compression": round(ref_size / size, 4), "tokens_per_s": result["tokens_per_s"],
           "speedup": round(result["tokens_per_s"] / ref["tokens_per_s"], 4),
           "perplexity": m.get("perplexity"),
           "ppl_delta_pct": _pct(m.get("perplexity"), rm.get("perplexity")),
           "main_metric": name, "main": m.get(name),
           "main_delta": (None if m.get(name) is None or rm.get(name) is None
                          else round(m[name] - rm[name], 6)),
           "main_delta_pct": _pct(m.get(name), rm.get(name)),
           "rouge_l": m.get("rouge_l"), "f1": m.get("f1"), "accuracy": m.get("accuracy"),
           "first_tokens_match": first_same, "template_sha256": result["template_sha256"],
           "render_sha256": result["render_sha256"], "load_s": result["load_s"]}
    if built:
        row.update(layer_error_mean=built["layer_error_mean"],
                   layer_error_max=built["layer_error_max"],
                   worst_layer=(built["worst_layers"][0]["layer"] if built["worst_layers"]
                                else None))
    from reprotune.evaluate.paired import quantise_gate

    # met / missed / too few rows to tell, on the 95% interval of the loss (not the point change)
    row.update(quantise_gate(ref["rows"], result["rows"], name, TARGET_LOSS_PCT))
    return row


def check_format(result: dict[str, Any], ref_render: str, ref_ids: list[int],
                 enable_thinking: bool) -> list[str]:
    """Why ``result``'s prompt format differs from training's (empty when it does not)."""
    problems = []
    if result["enable_thinking"] != enable_thinking:
        problems.append(f"enable_thinking={result['enable_thinking']} but trained with "
                        f"{enable_thinking}")
    diff = render_difference(ref_render, result["render"])
    if diff:
        problems.append(f"chat template renders the probe differently ({diff})")
    elif result["probe_ids"] != ref_ids:
        problems.append("tokenizer encodes the probe conversation to different ids")
    return problems


def _reference_row(ref: dict[str, Any], size: int, merged: dict[str, Any]) -> dict[str, Any]:
    m = ref["metrics"]
    name = main_metric_name(m)
    return {"status": "ok", "size_mb": round(size / 2**20, 4), "tokens_per_s": ref["tokens_per_s"],
            "perplexity": m.get("perplexity"), "main_metric": name, "main": m.get(name),
            "rouge_l": m.get("rouge_l"), "f1": m.get("f1"), "accuracy": m.get("accuracy"),
            "template_sha256": ref["template_sha256"], "render_sha256": ref["render_sha256"],
            "source_method": merged["method"], "merged": merged["merged"],
            "soft_prompt": bool(merged.get("soft_prompt_dir")),
            "load_s": ref["load_s"], "served_without_peft": ref["peft_blocked"]}


def _skip(dest: Path, method: str, reason: str) -> dict[str, Any]:
    import shutil

    log.warning("%s skipped: %s", method, reason)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    row = {"status": "skipped", "reason": reason}
    io.write_json(dest / QUANT_INFO_FILE, {"method": method, **row})
    return row


def quantize_all(merged_dir: str | Path, test_path: str | Path, out_dir: str | Path, *,
                 methods: Sequence[str], keep: Sequence[str], eval_params: dict[str, Any],
                 eval_rows: int, enable_thinking: bool, seed: int,
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build and measure every method; returns ``(metrics, details)``.

    ``metrics`` is flat per artifact (``merged`` and each method); ``details`` holds the worst
    layers per method for the report. Artifacts are published to ``out_dir`` only when every
    artifact formats prompts as training did; otherwise :class:`TemplateMismatch` is raised
    carrying ``(metrics, details)`` so the caller can still write them.
    """
    import torch

    from reprotune.modeling import load_model, load_tokenizer

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    merged = io.read_json(merged_dir / MERGED_INFO_FILE)
    tok = load_tokenizer(merged_dir)
    sha = template_fingerprint(tok.chat_template or "")
    if sha != merged["chat_template_sha256"]:
        raise TemplateMismatch(f"{merged_dir}: chat template sha256 {sha[:12]} is not the one "
                               f"training used ({merged['chat_template_sha256'][:12]})")
    if bool(merged["enable_thinking"]) != enable_thinking:
        raise TemplateMismatch(f"format.enable_thinking is {enable_thinking} but the model was "
                               f"trained with {merged['enable_thinking']}: rerun train and merge")
    ref_render = render_probe(tok, enable_thinking)
    ref_ids = tok(ref_render, add_special_tokens=False)["input_ids"]

    def request(method: str, path: Path) -> dict[str, Any]:
        return {"method": method, "path": str(path), "test": str(test_path),
                "eval": dict(eval_params), "eval_rows": eval_rows, "seed": seed}

    log.info("measuring the merged model (reference) in a fresh process")
    ref = measure_in_subprocess(request("merged", merged_dir))
    ref_size = directory_size(merged_dir)
    metrics: dict[str, Any] = {"merged": _reference_row(ref, ref_size, merged),
                               "chat_template_sha256": sha, "enable_thinking": enable_thinking,
                               "n_eval_rows": ref["metrics"].get("n_rows"),
                               "target_loss_pct": TARGET_LOSS_PCT}
    details: dict[str, Any] = {"worst_layers": {}, "failures": []}
    problems = check_format(ref, ref_render, ref_ids, enable_thinking)
    metrics["merged"]["template_ok"] = not problems
    details["failures"] += [f"merged: {p}" for p in problems]
    float_model = load_model(merged_dir, dtype=torch.float32)
    with io.atomic_dir(out_dir) as tmp:
        for method in dict.fromkeys(methods):  # ordered, duplicates dropped
            dest = tmp / method
            try:
                built = build_artifact(method, merged_dir, dest, keep, float_model)
            except MethodUnavailable as exc:
                metrics[method] = _skip(dest, method, str(exc))
                continue
            log.info("%s built (%s); measuring in a fresh process", method,
                     f"{directory_size(dest) / 2**20:.3f} MiB")
            try:
                result = measure_in_subprocess(request(method, dest))
            except RuntimeError as exc:
                if not method.startswith("bnb"):
                    raise
                metrics[method] = _skip(dest, method, f"built, but bitsandbytes inference "
                                                      f"failed on this machine: {exc}")
                continue
            row = summarize(result, ref, directory_size(dest), ref_size, built)
            problems = check_format(result, ref_render, ref_ids, enable_thinking)
            row["template_ok"] = not problems
            details["failures"] += [f"{method}: {p}" for p in problems]
            details["worst_layers"][method] = built["worst_layers"]
            metrics[method] = row  # timings stay out of the artifact: its bytes are reproducible
            log.info("%s: %.3f MiB (x%.2f), %.1f tok/s, ppl %s (%s%%), %s %s (%s%%)", method,
                     row["size_mb"], row["compression"], row["tokens_per_s"], row["perplexity"],
                     row["ppl_delta_pct"], row["main_metric"], row["main"], row["main_delta_pct"])
        metrics["format_ok"] = not details["failures"]
        if details["failures"]:
            raise TemplateMismatch("prompt format differs from training: "
                                   + "; ".join(details["failures"]), (metrics, details))
    return metrics, details


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def _delta(row: dict[str, Any]) -> str:
    """Relative main-metric change, or the absolute one where the reference is 0."""
    if row.get("main_delta_pct") is not None:
        return f"{row['main_delta_pct']:+.2f}%"
    return "–" if row.get("main_delta") is None else f"{row['main_delta']:+.4g} (abs)"


def report_markdown(metrics: dict[str, Any], details: dict[str, Any],
                    methods: Sequence[str]) -> str:
    """The Markdown report: one table row per artifact, reasons, worst layers, checks."""
    ref = metrics["merged"]
    name = ref["main_metric"]
    lines = ["# Quantisation report", "",
             f"Reference: merged model (`{ref['source_method']}`, merged: {ref['merged']}). "
             f"Main metric: **{name}** on {metrics.get('n_eval_rows')} test rows; perplexity is "
             f"corpus-level over assistant tokens. Every artifact was loaded and measured in a "
             f"fresh process. GGUF files are measured through transformers' GGUF loader, which "
             f"dequantises them to float32: their quality numbers are the file's, their "
             f"speed is not llama.cpp's. CPU speed (greedy, {len(SPEED_PROMPTS)} fixed prompts x "
             f"{SPEED_NEW_TOKENS} new tokens, batch 1, best of {SPEED_ROUNDS} rounds) changes "
             f"from run to run, so it is in the untracked `metrics/timing/quantize.json`, not "
             f"here.", "",
             f"| artifact | status | size MiB | compression | perplexity | Δppl % "
             f"| {name} | Δ{name} | first greedy tokens = merged | layer err mean / max "
             f"| template ok |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| merged | ok | {_fmt(ref['size_mb'])} | 1 "
                 f"| {_fmt(ref['perplexity'])} | – | {_fmt(ref['main'])} | – | "
                 f"{FIRST_TOKENS}/{FIRST_TOKENS} | – | {ref.get('template_ok')} |")
    for m in dict.fromkeys(methods):
        row = metrics.get(m, {})
        if row.get("status") != "ok":
            lines.append(f"| {m} | skipped | – | – | – | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {m} | ok | {_fmt(row['size_mb'])} | {_fmt(row['compression'], '.2f')} "
            f"| {_fmt(row['perplexity'])} "
            f"| {_fmt(row['ppl_delta_pct'], '+.2f')} | {_fmt(row['main'])} "
            f"| {_delta(row)} | {row['first_tokens_match']}/{FIRST_TOKENS} "
            f"| {_fmt(row.get('layer_error_mean'))} / {_fmt(row.get('layer_error_max'))} "
            f"| {row['template_ok']} |")
    if ref.get("soft_prompt"):
        lines += ["", f"Soft prompt: `{ref['source_method']}` cannot be merged, so every artifact "
                      f"is the quantised base plus the kept `{SOFT_PROMPT_DIR}/` adapter (measured "
                      f"with it through peft). llama.cpp / Ollama cannot apply it: the GGUF files "
                      f"alone serve the base model."]
    skipped = [(m, metrics[m]["reason"]) for m in dict.fromkeys(methods)
               if metrics.get(m, {}).get("status") == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- **{m}**: {r}" for m, r in skipped]
    lines += ["", f"## INT8 target (loss < {TARGET_LOSS_PCT:g}% relative on mean token NLL and "
                  f"< {TARGET_LOSS_PCT / 100:g} absolute on {name}, for the whole 95% "
                  f"paired-bootstrap interval)", ""]
    for m in INT8_METHODS:
        row = metrics.get(m)
        if row and row.get("status") == "ok":
            verdict = row["gate"] if row["gate"] != "missed" else "**missed**"
            lines.append(f"- {m}: NLL loss {_fmt(row.get('ppl_loss_pct'), '+.3f')}% (interval "
                         f"up to {_fmt(row.get('ppl_loss_pct_high'), '+.3f')}%), {name} loss "
                         f"{_fmt(row.get('main_loss'), '+.4f')} (up to "
                         f"{_fmt(row.get('main_loss_high'), '+.4f')}) on {row['gate_rows']} "
                         f"rows ({name}: {row.get('main_rows')}) -> {verdict}")
    if details.get("worst_layers"):
        lines += ["", "## Worst layers (relative Frobenius error of W vs dequantised W)", ""]
        for m, worst in details["worst_layers"].items():
            if worst:
                lines.append(f"- {m}: " + ", ".join(f"`{w['layer']}` {w['rel_error']:.4g}"
                                                     for w in worst))
    lines += ["", "## Prompt format", "",
              f"Training template sha256 `{metrics['chat_template_sha256']}`, enable_thinking "
              f"{metrics['enable_thinking']}. Each artifact's own template rendered the probe "
              f"conversation (system, user, assistant, user + generation prompt)."]
    if details.get("failures"):
        lines += ["", "**FAILED:**", ""] + [f"- {f}" for f in details["failures"]]
    else:
        lines.append("All artifacts render it identically to training.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
