"""What an exported model says about itself, once for every format: GGUF general.* keys, CoreML's author /
description / license, the ONNX folder's config.json, the Ollama Modelfile.

The name is the run directory's; the basename the family's (`kititans-lite`); the size label llama.cpp's
convention ("4.2M", "125M"); the license an SPDX id the user gives with `kititans export --license`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import kititans

STAGES = {"pretrain": "pretrained", "sft": "fine-tuned for chat (SFT)"}


@dataclass(frozen=True)
class ModelCard:
    name: str
    basename: str
    family: str
    stage: str | None
    parameters: int
    size_label: str
    context_length: int
    description: str
    license: str | None
    version: str  # the kititans version that exported it
    author: str = "KiTitans"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_label(parameters: int) -> str:
    """llama.cpp's size label: 4.2M, 125M, 1.1B (gguf-py's size_label for a dense model)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            value = parameters / scale
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return str(parameters)


def model_card(ckpt: Any, license: str | None = None) -> ModelCard:
    from kititans.models.spec import count_params

    n = count_params(ckpt.model)
    stage = ckpt.meta.get("stage")
    label = size_label(n)
    ctx = int(ckpt.config.context_length)
    steps = ckpt.meta.get("step")
    trained = STAGES.get(stage, "trained") + (f" for {steps} steps" if steps else "")
    description = (
        f"KiTitans {ckpt.spec.name} language model, {label} parameters, context {ctx} tokens, {trained}; "
        f"chat template: Phi-3 format (<|user|>, <|assistant|>, <|end|>)"
    )
    return ModelCard(
        name=Path(ckpt.path).name,
        basename=f"kititans-{ckpt.spec.name}",
        family=ckpt.spec.name,
        stage=stage,
        parameters=n,
        size_label=label,
        context_length=ctx,
        description=description,
        license=license,
        version=kititans.__version__,
    )
