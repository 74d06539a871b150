"""What an artifact weighs: its size on disk and the weight bytes one decode step reads (the roofline's
numerator, research/gguf_llamacpp.md §7).

One token reads every weight matrix once, except lookup tables, which give one row: the input embedding
(unless it is tied to the output matrix, in which case it is read once, as the output), and in ONNX graphs any
initializer consumed only by Gather/Slice (embedding, RoPE tables). Bits per weight are these bytes over the
parameters they hold, so 8-bit files with a float32 lookup table still read as ~8 bits.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from kititans.files import dir_size

LOOKUP_OPS = {"Gather", "Slice"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
TORCH_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (names, dtypes, shapes), read without loading tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def run_params(run_dir: Path) -> dict[str, Any]:
    """Parameter counts of a run: all, and those one token reads (the untied input embedding excluded)."""
    header = safetensors_header(Path(run_dir) / "model.safetensors")
    numel = {k: math.prod(v["shape"]) for k, v in header.items()}
    tied = not any(k.endswith("lm_head.weight") for k in header)
    embed = [k for k in header if "embed" in k and len(header[k]["shape"]) == 2]
    total = sum(numel.values())
    lookup = 0 if tied or not embed else numel[embed[0]]
    return {"params": total, "params_per_token": total - lookup, "tied_embeddings": tied}


def model_dims(run_dir: Path) -> dict[str, int]:
    """Layer count and KV width from the run's config.json (zeros when the family has no plain KV cache)."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())["kititans"]["model"]
    n_heads = int(cfg.get("n_heads", 0))
    head_dim = int(cfg.get("head_dim") or (cfg.get("dim", 0) // n_heads if n_heads else 0))
    return {
        "n_layers": int(cfg.get("n_layers", 0)),
        "n_kv_heads": int(cfg.get("n_kv_heads", n_heads)),
        "head_dim": head_dim,
        "context_length": int(cfg.get("context_length", 0)),
        "vocab_size": int(cfg.get("vocab_size", 0)),
    }


def kv_bytes_per_token(dims: dict[str, int], n_past: float, elt_bytes: int) -> float:
    """KV cache bytes one decode step reads at depth n_past: 2 (K,V) x layers x kv heads x head dim."""
    return 2 * dims["n_layers"] * dims["n_kv_heads"] * dims["head_dim"] * n_past * elt_bytes


def gguf_weight_bytes(path: Path) -> int:
    """Tensor bytes of a GGUF; token_embd is a lookup unless it is also the output matrix (no output.weight)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    names = {t.name for t in tensors}
    skip = {"token_embd.weight"} if "output.weight" in names else set()
    return int(sum(int(t.n_bytes) for t in tensors if t.name not in skip))


def _initializer_bytes(t: Any) -> int:
    import onnx

    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return math.prod(t.dims) * itemsize


def _consumers(graph: Any, found: dict[str, set[str]]) -> None:
    """Op types reading each value name, subgraphs (If/Loop bodies) included."""
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, set()).add(node.op_type)
        for attr in node.attribute:
            if attr.HasField("g"):
                _consumers(attr.g, found)


def onnx_weight_bytes(folder: Path) -> tuple[int, int]:
    """(all initializer bytes, bytes one token reads) of the .onnx graph(s) in a folder."""
    import onnx

    folder = Path(folder)
    if folder.is_dir() and (folder / "model.onnx").is_file():
        folder = folder / "model.onnx"  # the decode graph; a prefill graph beside it shares its weights
    files = [folder] if folder.is_file() else sorted(folder.glob("*.onnx"))
    total = per_token = 0
    for f in files:
        model = onnx.load(str(f), load_external_data=False)
        consumers: dict[str, set[str]] = {}
        _consumers(model.graph, consumers)
        for t in model.graph.initializer:
            b = _initializer_bytes(t)
            total += b
            if not (consumers.get(t.name) and consumers[t.name] <= LOOKUP_OPS):
                per_token += b
    return total, per_token


def coreml_weight_bytes(package: Path) -> int:
    """A .mlpackage's weight blob(s): every weight is read per token (lookup tables are not separated)."""
    return sum(p.stat().st_size for p in Path(package).rglob("weight*.bin"))


def describe(run_dir: Path, runtime: str, quant: str, artifact: Path) -> dict[str, Any]:
    """Size on disk, weight bytes per token and bits per weight of one pair's artifact."""
    params = run_params(run_dir)
    if runtime == "torch":
        size = (Path(run_dir) / "model.safetensors").stat().st_size
        per_token = params["params_per_token"] * TORCH_BYTES[quant]
        method = f"parameters x {TORCH_BYTES[quant]} bytes ({quant} in memory; the file is the run's weights)"
    elif runtime == "llamacpp":
        size, per_token, method = dir_size(artifact), gguf_weight_bytes(artifact), "GGUF tensor bytes"
    elif runtime in ("onnx", "genai"):
        size = dir_size(artifact)
        per_token = onnx_weight_bytes(artifact)[1]
        method = "ONNX initializer bytes, lookup-only (Gather/Slice) initializers excluded"
    elif runtime == "coreml":
        size, per_token, method = dir_size(artifact), coreml_weight_bytes(artifact), "weight.bin bytes"
    else:
        raise ValueError(f"unknown runtime {runtime}")
    return {
        "size_bytes": int(size),
        "params": params["params"],
        "weight_bytes_per_token": int(per_token),
        "bits_per_weight": 8.0 * per_token / max(params["params_per_token"], 1),
        "weight_bytes_method": method,
    }


def kv_element_bytes(runtime: str, quant: str) -> int:
    """Bytes per KV-cache element: llama.cpp and CoreML keep f16; the others follow the compute dtype."""
    if runtime in ("llamacpp", "coreml"):
        return 2
    if runtime == "torch":
        return TORCH_BYTES[quant]
    return 2 if quant == "fp16" else 4
