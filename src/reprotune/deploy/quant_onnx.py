"""``onnx_fp32`` / ``onnx_int8``: the merged model as an ONNX graph run by ONNX Runtime.

Export is ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter with
onnxscript; optimum is not used): one graph ``(input_ids, attention_mask) -> logits`` with
dynamic batch and sequence axes, no KV cache, in ``model.onnx``. ``onnx_int8`` is that graph
through ONNX Runtime's ``quantize_dynamic`` (int8 weights per output channel, activations
quantised on the fly) on every MatMul whose weight is not in a ``keep_full_precision`` module.

:func:`load_onnx` returns an :class:`OrtCausalLM`: a transformers model shell whose forward
runs the ONNX Runtime session (threads: the usable cores), so the shared measuring code
(perplexity, greedy generation, the main metric) runs on ONNX Runtime's numbers, not on a
reload into PyTorch. Without a cache every generated token recomputes the whole sequence:
the speed figure is this graph's, not an optimised ORT generate loop's.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from reprotune.deploy.quant_common import (
    BuildContext,
    Family,
    MethodUnavailable,
    kept,
    relative_error,
)

ONNX_FILE = "model.onnx"


class _Logits:
    def __init__(self, logits: Any) -> None:
        self.logits = logits


def export_onnx(float_model: Any, path: Path) -> None:
    """Export ``float_model`` to ``path`` (weights inside the file, or beside it when > 2 GB)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).logits

    model = copy.deepcopy(float_model).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        LogitsOnly(model), (ids, torch.ones_like(ids)), dynamo=True, verbose=False,
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    # the exporter's debug notes quote FX code by a process-wide counter ("<eval_with_key>.42"),
    # so the same model exported twice gave different bytes; dropped, the file is reproducible
    for node in _all_nodes(program.model):
        node.metadata_props.pop(STACK_TRACE, None)
    program.save(str(path))


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _all_nodes(model: Any) -> list[Any]:
    """Every node of an ONNX IR model: the main graph's, subgraphs' and local functions'."""
    import onnx_ir

    graphs = [model.graph, *model.functions.values()]
    return [n for g in graphs for n in onnx_ir.traversal.RecursiveGraphIterator(g)]


def _matmul_weights(onnx_model: Any) -> dict[str, str]:
    """{MatMul node name: its weight initializer name} for MatMuls with a constant weight."""
    inits = {i.name for i in onnx_model.graph.initializer}
    return {n.name: n.input[1] for n in onnx_model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits}


def _build(method: str, ctx: BuildContext, out: Path) -> dict[str, Any]:
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise MethodUnavailable(f"onnx / onnxruntime not installed: {exc}") from exc
    if method == "onnx_fp32":
        export_onnx(ctx.float_model, out / ONNX_FILE)
        return {"quantized_modules": 0, "layer_errors": {}, "exporter": "torch.onnx (dynamo)"}
    with tempfile.TemporaryDirectory(prefix="reprotune-onnx-") as td:
        fp32 = Path(td) / ONNX_FILE
        export_onnx(ctx.float_model, fp32)
        graph = onnx.load(str(fp32))
        weights = _matmul_weights(graph)
        float_values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer
                        if i.name in set(weights.values())}
        exclude = [n for n, w in weights.items() if kept(w, ctx.keep) or kept(n, ctx.keep)]
        quantize_dynamic(str(fp32), str(out / ONNX_FILE), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=exclude)
    errors = _int8_errors(out / ONNX_FILE, float_values)
    return {"quantized_modules": len(errors), "layer_errors": errors,
            "exporter": "torch.onnx (dynamo) + onnxruntime.quantization.quantize_dynamic"}


def _int8_errors(path: Path, float_values: dict[str, Any]) -> dict[str, float]:
    """Relative error of each quantised weight (dequantised from the int8 file) vs float."""
    import onnx
    import torch

    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    errors = {}
    for name, w in float_values.items():
        q, scale = inits.get(f"{name}_quantized"), inits.get(f"{name}_scale")
        if q is None or scale is None:
            continue  # kept in float
        zp = inits.get(f"{name}_zero_point", 0)
        w_hat = (torch.from_numpy(q.astype("float32")) - torch.as_tensor(zp, dtype=torch.float32)) \
            * torch.as_tensor(scale, dtype=torch.float32)
        errors[name] = relative_error(torch.from_numpy(w.copy()), w_hat)
    return errors


def _session(path: Path) -> Any:
    import onnxruntime as ort

    from reprotune.runtime import usable_cpus

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = usable_cpus()  # ORT's default: every core of the machine
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def load_onnx(path: str | Path) -> tuple[Any, Any]:
    """(:class:`OrtCausalLM` over ``path/model.onnx``, tokenizer)."""
    import torch
    from transformers import AutoConfig, GenerationConfig, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    from reprotune.modeling import load_tokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    session = _session(path / ONNX_FILE)

    class OrtCausalLM(PreTrainedModel, GenerationMixin):
        """Logits from ONNX Runtime; generation without a cache (full recompute)."""

        config_class = type(config)
        main_input_name = "input_ids"

        def __init__(self) -> None:
            super().__init__(config)
            self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # device
            # perplexity reads the vocabulary size from the output head's weight shape
            self.head = torch.nn.Linear(0, int(config.vocab_size), bias=False)

        def get_output_embeddings(self) -> Any:
            return self.head

        def forward(self, input_ids: Any = None, attention_mask: Any = None,
                    **_: Any) -> Any:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            logits = session.run(["logits"], {"input_ids": input_ids.cpu().numpy(),
                                              "attention_mask": attention_mask.cpu().numpy()})[0]
            return CausalLMOutput(logits=torch.from_numpy(logits))

        def prepare_inputs_for_generation(self, input_ids: Any, attention_mask: Any = None,
                                          **_: Any) -> dict[str, Any]:
            return {"input_ids": input_ids, "attention_mask": attention_mask}

    model = OrtCausalLM()
    gen_file = path / "generation_config.json"
    model.generation_config = (GenerationConfig.from_pretrained(path) if gen_file.is_file()
                               else GenerationConfig())
    model.generation_config.use_cache = False
    return model.eval(), load_tokenizer(path)


def _load(method: str, path: Path) -> tuple[Any, Any]:
    return load_onnx(path)


FAMILY = Family(methods=("onnx_fp32", "onnx_int8"), build=_build, load=_load)
