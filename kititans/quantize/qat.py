"""Quantization-aware training targets: for each `FORMAT:LEVEL` an export can write, which weights that export
quantizes and with which kernel (kititans/quantize/qat_kernels.py), and the fake quantization that makes a
model see exactly those values while it trains (docs/qat.md).

A target's plan assigns a kernel to each module whose `weight` the exporter quantizes:

    gguf:q8_0     every 2-D tensor of the GGUF map: q8_0
    gguf:q4_0     q4_0; the output matrix (lm_head, or the tied embedding that llama.cpp multiplies) q8_0
    gguf:q4_k_m   llama.cpp's mix: q4_k; attn_v and ffn_down of the "more bits" layers and the output matrix q6_k
    onnx:int4/8   every nn.Linear (MatMul with an initializer weight; the head is untied for export):
                  MatMulNBits' block-32 symmetric quantizer; the embedding lookup (Gather) stays float
    coreml:int4   every nn.Linear / nn.Embedding weight coremltools compresses (> 2048 elements, input dim a
                  multiple of 32, not one the family keeps in float): linear_symmetric per block of 32 on the fp16
                  weight (fp32 for ops the family computes in fp32); coreml:int8 per output channel

Fake quantization swaps the class of each planned module for a subclass whose `weight` property returns
q(w) through a straight-through estimator (exactly q(w) forward, the gradient unchanged backward; w + (q(w) -
w).detach() would round in float32 and miss the stored values by an ulp): the forward pass sees q(w) wherever the weight is read (module call, F.linear on a
slice of it, a tied head), the gradient passes straight through to the latent float weight, and parameter
names, the state dict and the optimizer are unchanged, so the training loop and checkpoints need nothing
new. q(w) is computed once per weight update (cached by the tensor's version counter). Shared weights (a tied
head) keep one latent tensor; each module reads it through its own kernel (onnx: the head int4, the lookup
float; gguf/coreml: both the same stored tensor).

torchao's QAT (QATConfig / IntxFakeQuantizeConfig) is not used for these targets: its symmetric scale is
max|w| / ((qmax - qmin) / 2) with round-half-even, which none of these exporters use (gguf-py and MLAS take
the signed extreme / -2^(b-1), llama.cpp's K-quants search per sub-block, coremltools divides by qmax in fp16),
and its module swap misses weights read outside a module call (Titans' F.linear on weight slices).
`torchao_mismatch` measures the difference on a weight.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kititans.errors import KititansError, UnsupportedExport
from kititans.quantize import qat_kernels as K

Kernel = Callable[[Tensor], Tensor]

# kernel name -> (function, what it is); a plan refers to kernels by name so it can be stored in JSON
KERNELS: dict[str, tuple[Kernel, str]] = {
    "q8_0": (K.q8_0, "gguf-py Q8_0: blocks of 32, fp16 scale absmax/127, round half away from zero"),
    "q4_0": (K.q4_0, "gguf-py Q4_0: blocks of 32, fp16 scale (signed extreme)/-8, trunc(x/d + 8.5)"),
    "q4_k": (K.q4_k, "llama.cpp Q4_K: 8 x 32 sub-blocks, searched 6-bit scales and mins, fp16 super-scales"),
    "q6_k": (K.q6_k, "llama.cpp Q6_K: 16 x 16 sub-blocks, searched int8 scales, one fp16 super-scale"),
    "mlas4": (lambda w: K.mlas(w, 4), "MatMulNBits 4-bit: blocks of 32, fp32 scale (signed extreme)/-8"),
    "mlas8": (lambda w: K.mlas(w, 8), "MatMulNBits 8-bit: blocks of 32, fp32 scale (signed extreme)/-128"),
    "coreml4": (lambda w: K.coreml(w, 4, 32), "coremltools int4 linear_symmetric per block of 32, fp16"),
    "coreml8": (lambda w: K.coreml(w, 8, None), "coremltools int8 linear_symmetric per output channel, fp16"),
    "coreml4_fp32": (
        lambda w: K.coreml(w, 4, 32, torch.float32),
        "coremltools int4 linear_symmetric per block of 32 on an fp32 weight (fp32-compute op)",
    ),
    "coreml8_fp32": (
        lambda w: K.coreml(w, 8, None, torch.float32),
        "coremltools int8 linear_symmetric per output channel on an fp32 weight (fp32-compute op)",
    ),
}


@dataclass(frozen=True)
class Target:
    format: str  # gguf | onnx | coreml
    level: str  # the exporter's quant name
    description: str

    @property
    def name(self) -> str:
        return f"{self.format}:{self.level}"


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("gguf", "q4_0", "llama.cpp q4_0 (gguf-py's quantizer), output matrix q8_0"),
        Target("gguf", "q4_k_m", "llama.cpp q4_k_m: q4_k with llama.cpp's q6_k tensors"),
        Target("gguf", "q8_0", "llama.cpp q8_0"),
        Target("onnx", "int4", "ONNX Runtime MatMulNBits int4, blocks of 32"),
        Target("onnx", "int8", "ONNX Runtime MatMulNBits int8, blocks of 32"),
        Target("coreml", "int4", "CoreML int4 per block of 32 (coremltools)"),
        Target("coreml", "int8", "CoreML int8 per channel (coremltools)"),
    ]
}
COREML_MIN_ELEMENTS = 2048  # coremltools' default weight_threshold: smaller consts stay fp16
COREML_BLOCK = 32


def parse_target(text: str) -> Target:
    """`FORMAT:LEVEL` -> Target; a one-line error lists the valid ones."""
    key = text.strip().lower()
    if key not in TARGETS:
        raise KititansError(f"unknown QAT target {text!r}; valid targets: {', '.join(TARGETS)}")
    return TARGETS[key]


@dataclass
class Plan:
    target: Target
    kernels: dict[str, str]  # module name -> kernel name (the modules whose `weight` the export quantizes)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for k in self.kernels.values():
            counts[k] = counts.get(k, 0) + 1
        return {
            "target": self.target.name,
            "modules": dict(self.kernels),
            "kernels": {k: KERNELS[k][1] for k in sorted(counts)},
            "counts": counts,
            "implementation": "kititans straight-through estimator (kititans/quantize/qat.py)",
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------ plans


def _weighted(model: nn.Module, kinds: tuple[type, ...]) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and "weight" in m._parameters}


def _gguf_plan(model: nn.Module, spec: Any, level: str) -> tuple[dict[str, str], list[str]]:
    kernels, _, notes = _gguf_layout(model, spec, level)
    return kernels, notes


def _gguf_layout(model: nn.Module, spec: Any, level: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """GGUF: the family's tensor map names the stored tensors; the level's rule gives each its kernel.
    Returns (module -> kernel, GGUF tensor name -> kernel, notes)."""
    from kititans.checkpoint import aliases

    tensor_map = spec.support("gguf")
    rules = [
        (re.compile("^" + re.escape(hf).replace(r"\{\}", r"(\d+)") + "$"), gg)
        for hf, (gg, _) in tensor_map.items()
    ]
    skip = aliases(model)
    modules = _weighted(model, (nn.Linear, nn.Embedding))
    stored: dict[str, str] = {}  # module name -> GGUF tensor name
    for name in modules:
        param = f"{name}.weight"
        if param in skip:
            continue
        for pat, gg in rules:
            m = pat.match(param)
            if m:
                stored[name] = gg.replace("{}", m.group(1)) if m.groups() else gg
                break
    names = set(stored.values())
    output = "output.weight" if "output.weight" in names else "token_embd.weight"
    n_layers = sum(1 for g in names if g.endswith("attn_v.weight"))
    out: dict[str, str] = {}
    by_name: dict[str, str] = {}
    for mod, gg in stored.items():
        out[mod] = by_name[gg] = _gguf_kernel(level, gg, gg == output, n_layers)
    # an alias (a tied head) reads the stored tensor it shares
    owner = {id(modules[m]._parameters["weight"]): m for m in stored}
    for name, mod in modules.items():
        pid = id(mod._parameters["weight"])
        if name not in out and pid in owner:
            out[name] = out[owner[pid]]
    return out, by_name, [f"output matrix: {output}"]


GGML_TYPES = {"q8_0": 8, "q4_0": 2, "q4_k": 12, "q6_k": 14}  # kernel -> ggml type id


def run_target(meta: dict[str, Any]) -> str | None:
    """The QAT target a run was fine-tuned for (config.json kititans.qat.target), or None."""
    qat = meta.get("qat")
    return qat.get("target") if isinstance(qat, dict) else None


def gguf_handoff(ckpt: Any, level: str) -> dict[str, int] | None:
    """For a QAT run exported at its own GGUF target: the ggml type of every stored 2-D tensor (the GGUF
    exporter then writes these blocks itself, so the file holds exactly the values the run trained on; for
    the K-quants llama.cpp's compiled quantizer differs from them on ~1 sub-block in 10^4); else None."""
    if run_target(ckpt.meta) != f"gguf:{level}":
        return None
    _, by_name, _ = _gguf_layout(ckpt.model, ckpt.spec, level)
    return {name: GGML_TYPES[k] for name, k in by_name.items()}


def export_warning(meta: dict[str, Any], fmt: str, quant: str, imatrix: bool = False) -> str | None:
    """The one-line warning for exporting a QAT run to another level than it was trained for (or with an
    importance matrix, which changes the rounding it trained with); None when the export matches."""
    target = run_target(meta)
    if target is None:
        return None
    if target != f"{fmt}:{quant}":
        return (
            f"this run was fine-tuned for {target}; {fmt}:{quant} rounds its weights differently, so it gets "
            f"little of the QAT gain (export it with --format {target.split(':')[0]} --quant {target.split(':')[1]})"
        )
    if imatrix:
        return f"this run was fine-tuned for {target} with plain rounding; --imatrix changes the rounding"
    return None


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the q4_k_m layers whose attn_v / ffn_down get q6_k."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _gguf_kernel(level: str, gguf_name: str, is_output: bool, n_layers: int) -> str:
    if level == "q8_0":
        return "q8_0"
    if level == "q4_0":
        return "q8_0" if is_output else "q4_0"
    if is_output:
        return "q6_k"
    m = re.match(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight$", gguf_name)
    if m and _use_more_bits(int(m.group(1)), n_layers):
        return "q6_k"
    return "q4_k"


def _onnx_plan(model: nn.Module, level: str) -> tuple[dict[str, str], list[str]]:
    kernel = {"int4": "mlas4", "int8": "mlas8"}[level]
    linears = _weighted(model, (nn.Linear,))
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    kept = [n for n, m in linears.items() if id(m.weight) in lookups and not _untied_for_onnx(model, m)]
    notes = ["the embedding lookup (Gather) stays float32"]
    if kept:  # a head tied to the lookup shares its initializer: MatMulNBits skips it, it stays float32
        notes.append(f"tied to the embedding, kept float32 by the exporter: {', '.join(kept)}")
    return {n: kernel for n in linears if n not in kept}, notes


def _untied_for_onnx(model: nn.Module, head: nn.Module) -> bool:
    """export/onnx.py export_copy's rule: the llama-named tied head gets its own (quantized) initializer."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    return getattr(model, "lm_head", None) is head and emb is not None and head.weight is emb.weight


def _coreml_plan(model: nn.Module, spec: Any, level: str) -> tuple[dict[str, str], list[str]]:
    step_cls = spec.support("coreml")
    keep = tuple(getattr(step_cls, "keep_float", ()))
    fp32_code = tuple((getattr(step_cls, "fp32_compute", None) or {}).get("code", ()))
    fp32_linear = "linear" not in (getattr(step_cls, "fp32_compute", None) or {}).get("except_ops", ())
    out: dict[str, str] = {}
    kept: list[str] = []
    for name, mod in _weighted(model, (nn.Linear, nn.Embedding)).items():
        w = mod._parameters["weight"]
        const = "p_" + f"{name}.weight".replace(".", "_")
        if any(k in const for k in keep):
            kept.append(name)
            continue
        if w.numel() <= COREML_MIN_ELEMENTS or (level == "int4" and w.shape[1] % COREML_BLOCK):
            kept.append(name)
            continue
        fp32 = fp32_linear and _defined_in(mod, fp32_code)
        out[name] = f"coreml{level[3:]}" + ("_fp32" if fp32 else "")
    notes = [f"left in fp16 by the exporter: {', '.join(kept)}"] if kept else []
    return out, notes


def _defined_in(module: nn.Module, files: tuple[str, ...]) -> bool:
    try:
        src = inspect.getsourcefile(type(module)) or ""
    except TypeError:
        return False
    return any(Path(src).as_posix().endswith("/" + f) for f in files)


def make_plan(model: nn.Module, spec: Any, target: Target) -> Plan:
    """Which modules the target's exporter quantizes and how; refuses a format the family cannot export."""
    spec.support(target.format)  # UnsupportedExport with the reason and the formats that work
    if target.format == "gguf":
        kernels, notes = _gguf_plan(model, spec, target.level)
    elif target.format == "onnx":
        kernels, notes = _onnx_plan(model, target.level)
    else:
        kernels, notes = _coreml_plan(model, spec, target.level)
    if not kernels:
        raise UnsupportedExport(
            f"{target.name}: the exporter would quantize no weight of this {spec.name} model"
        )
    return Plan(target, kernels, notes)


def check_shapes(model: nn.Module, plan: Plan) -> None:
    """Refuse a plan whose kernels cannot take a weight's row length (as the exporter would)."""
    need = {"q8_0": 32, "q4_0": 32, "q4_k": 256, "q6_k": 256, "coreml4": 32, "coreml4_fp32": 32}
    mods = dict(model.named_modules())
    for name, kernel in plan.kernels.items():
        cols = mods[name]._parameters["weight"].shape[-1]
        if kernel in need and cols % need[kernel]:
            raise UnsupportedExport(
                f"{plan.target.name} needs every quantized row length to be a multiple of {need[kernel]}, but "
                f"{name}.weight has {cols} (use model dims that are multiples of {need[kernel]})"
            )


# ------------------------------------------------------------------------------------------ fake quantization


class _Straight(torch.autograd.Function):
    """Forward: the quantized values; backward: the gradient unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, q: Tensor) -> Tensor:
        return q.clone()  # exactly q (w + (q - w) would round); a fresh tensor, so the cache keeps no graph

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def fake_quantize(w: Tensor, kernel: str) -> Tensor:
    """q(w) as the target stores it, in w's dtype and device (no gradient)."""
    with torch.no_grad():
        return KERNELS[kernel][0](w.detach().float()).to(w.dtype)


# K-quant kernels whose costly part (the per-sub-block scale search) can be reused for a few steps:
# kernel -> (parts(w), values(parts, shape), requantize(w, parts))
SEARCHED = {
    "q4_k": (K.q4_k_parts, K.q4_k_values, K.q4_k_requant),
    "q6_k": (K.q6_k_parts, K.q6_k_values, K.q6_k_requant),
}


def _compute(mod: nn.Module, w: Tensor) -> Tensor:
    """q(w) for a weight update. With `refresh` > 1 a K-quant searches its scales every refresh-th update
    and rounds with the last ones in between; evaluation (no grad) always searches, so what is measured and
    exported is the exact target."""
    kernel, d = mod._qat_kernel, mod.__dict__
    every = d.get("_qat_refresh", 1)
    if kernel not in SEARCHED or every <= 1:
        return fake_quantize(w, kernel)
    parts_fn, values_fn, requant_fn = SEARCHED[kernel]
    n = d["_qat_updates"] = d.get("_qat_updates", -1) + 1
    with torch.no_grad():
        x = w.detach().float()
        if d.get("_qat_parts") is not None and n % every and torch.is_grad_enabled():
            return requant_fn(x, d["_qat_parts"]).to(w.dtype)
        d["_qat_parts"] = parts_fn(x)
        return values_fn(d["_qat_parts"], x.shape).to(w.dtype)


def _qat_weight(self: nn.Module) -> Tensor:
    w = self._parameters["weight"]
    key = (w._version, w.data_ptr(), w.device, w.dtype, torch.is_grad_enabled())
    cache = self.__dict__.get("_qat_cache")
    if cache is None or cache[0] != key:
        cache = (key, _compute(self, w))
        self.__dict__["_qat_cache"] = cache
    return _Straight.apply(w, cache[1]) if torch.is_grad_enabled() and w.requires_grad else cache[1]


_CLASSES: dict[type, type] = {}


def _qat_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"FakeQuant{cls.__name__}", (cls,), {"weight": property(_qat_weight), "_qat_base": cls}
        )
    return _CLASSES[cls]


def prepare(model: nn.Module, plan: Plan, refresh: int = 1) -> nn.Module:
    """Fake-quantize the planned modules in place (their parameters, names and state dict stay as they are).
    refresh: K-quant scale search every `refresh` weight updates (1: every one, exact throughout)."""
    mods = dict(model.named_modules())
    for name, kernel in plan.kernels.items():
        mod = mods[name]
        if kernel not in KERNELS:
            raise KititansError(f"unknown fake-quant kernel {kernel!r} for {name}")
        base = getattr(type(mod), "_qat_base", type(mod))
        mod.__class__ = _qat_class(base)
        mod._qat_kernel = kernel
        mod._qat_refresh = max(1, int(refresh))
        for k in ("_qat_cache", "_qat_parts", "_qat_updates"):
            mod.__dict__.pop(k, None)
    return model


def strip(model: nn.Module) -> nn.Module:
    """Undo prepare(): the modules read their latent weights again."""
    for mod in model.modules():
        base = getattr(type(mod), "_qat_base", None)
        if base is not None:
            mod.__class__ = base
            for k in ("_qat_cache", "_qat_kernel", "_qat_refresh", "_qat_parts", "_qat_updates"):
                mod.__dict__.pop(k, None)
    return model


def quantized_weights(model: nn.Module, plan: Plan) -> dict[str, Tensor]:
    """{module name: the values the target stores for its weight}, computed from the latent weights."""
    mods = dict(model.named_modules())
    return {n: fake_quantize(mods[n]._parameters["weight"], k) for n, k in plan.kernels.items()}


def torchao_mismatch(w: Tensor, kernel: str, bits: int, group: int = 32) -> float:
    """Fraction of the weights of `w` on which torchao's closest QAT config (IntxFakeQuantizeConfig with
    `bits`, group `group`, symmetric, fp32 scale) differs from the target kernel: why it is not used."""
    from kititans.errors import require
    from kititans.quantize.onnx import quiet

    with quiet():  # torchao's import reports every optional CUDA kernel it cannot load
        require("torchao", "qat", "the torchao comparison")
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    dtype = {4: torch.int4, 8: torch.int8}[bits]
    fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype, group_size=group, is_symmetric=True))
    with torch.no_grad():
        ours = fake_quantize(w, kernel)
        theirs = fq(w.detach().float())
    return float((ours != theirs).float().mean())
