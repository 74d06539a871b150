"""ONNX weight quantization with onnxruntime's own tools (research §2).

int8:          `MatMulNBitsQuantizer` with 8 bits: int8 weights in blocks of 32 along K, symmetric, one fp32
               scale per block (com.microsoft.MatMulNBits, weight-only); accuracy level 4 lets the CPU kernel
               quantize activations to int8 per block of 32, as llama.cpp's q8_0 matmul does.
int8_dynamic:  `quantize_dynamic`: int8 weights per output channel, activations quantized to uint8 per tensor
               on every call (MatMulInteger): one scale for a whole activation row set loses more.
int4:          `MatMulNBitsQuantizer`, 4-bit weights in blocks of 32, otherwise as int8.
All quantize only MatMuls whose weight is an initializer: the embedding Gather, the norms and the RoPE
tables stay in float. benchmarks/qat.py measured the two int8 levels against llama.cpp's q8_0 (docs/qat.md).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kititans.errors import require

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = (
    4  # 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (onnxruntime's MatMulNBits schema)
)


_NOISY = ("", "onnxruntime", "onnxscript", "onnx_ir", "torch.onnx", "torch._export", "torch.export")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters, converters and quantizers log every node at INFO, print advice and draw their own
    progress bars; keep our output clean, and undo the root handler onnxruntime.quantization installs
    with basicConfig. Errors still propagate as exceptions."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    loggers = [logging.getLogger(n) for n in _NOISY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)


def op_histogram(model: Any) -> dict[str, int]:
    """Node count per op type of an onnx.ModelProto (domain-qualified for contrib ops)."""
    names = (
        f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    )
    return dict(collections.Counter(names).most_common())


def quantize_int8_dynamic(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic int8: per-channel symmetric int8 weights for every weight MatMul; returns the details."""
    require("onnxruntime", "onnx", "ONNX int8 quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet():
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
        )
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weights": "int8",
        "granularity": "per_channel",
        "activations": "uint8, dynamic per tensor",
        "op_types": ["MatMul"],
    }


def quantize_blocks(
    src: Path,
    dst: Path,
    bits: int,
    block_size: int = INT4_BLOCK_SIZE,
    accuracy_level: int = INT4_ACCURACY_LEVEL,
    symmetric: bool = True,
) -> dict[str, Any]:
    """Block-wise weight-only int4/int8 (MatMulNBits); returns the details, accuracy level included."""
    onnx = require("onnx", "onnx", f"ONNX int{bits} quantization")
    require("onnxruntime", "onnx", f"ONNX int{bits} quantization")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    with quiet():
        q = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            op_types_to_quantize=("MatMul",),
        )
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=True)
    return {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "weights": f"int{bits}",
        "granularity": f"per_block_{block_size}",
        "block_size": block_size,
        "symmetric": symmetric,
        "accuracy_level": accuracy_level,
        "activations": "fp32" if accuracy_level != 4 else "int8 per block inside the kernel",
        "op_types": ["MatMul"],
    }


def quantize_int4(src: Path, dst: Path, **kw: Any) -> dict[str, Any]:
    return quantize_blocks(src, dst, 4, **kw)


def quantize_int8(src: Path, dst: Path, **kw: Any) -> dict[str, Any]:
    return quantize_blocks(src, dst, 8, **kw)


# quant level -> quantizer of an fp32 graph file (src, dst) -> details
QUANTIZERS = {"int8": quantize_int8, "int8_dynamic": quantize_int8_dynamic, "int4": quantize_int4}
