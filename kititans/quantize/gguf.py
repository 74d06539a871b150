"""GGUF tensor types: the type table, gguf-py quantizers (q8_0, q4_0, bf16) and llama.cpp's own quantizer
(`llama_model_quantize`, for the K-quants and imatrix-weighted rounding) run in a subprocess.

Facts used (research/gguf_llamacpp.md §5): gguf-py's Q8_0/Q4_0 bytes equal llama.cpp's; K-quants need
llama.cpp; a K-quant row (ggml ne0 = in_features) must be a multiple of 256 or llama.cpp silently falls back;
`llama_model_quantize` can leave a partial file behind and a crash would kill the caller, hence the subprocess
writing to a name the caller renames only on success.

    python -m kititans.quantize.gguf SRC DST --ftype 15 [--imatrix M.safetensors] [--output-type 8] [--pure]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kititans.errors import KititansError, require

# ggml type ids (gguf.GGMLQuantizationType), kept as ints so the table loads without the gguf package
F32, F16, Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 8, 12, 13, 14, 30


@dataclass(frozen=True)
class GgufType:
    name: str
    bits_per_weight: float  # 2-D weights as stored (K-quant mixes: llama.cpp's typical figure)
    description: str
    file_type: int  # general.file_type / llama_ftype
    block: int  # every quantized row length (ggml ne0) must be a multiple of this
    weight_type: int | None  # what gguf-py writes for 2-D weights; None: llama.cpp's quantizer decides
    output_type: int | None = None  # gguf-py: the output matrix (or the tied embedding) when it differs
    imatrix: bool = False  # an importance matrix changes its rounding

    @property
    def quantized(self) -> bool:
        return self.weight_type not in (F32, F16, BF16)

    @property
    def needs_llamacpp(self) -> bool:
        return self.weight_type is None


TYPES: dict[str, GgufType] = {
    t.name: t
    for t in [
        GgufType("f32", 32.0, "float32, the exact weights (parity checks)", 0, 1, F32),
        GgufType("f16", 16.0, "float16", 1, 1, F16),
        GgufType("bf16", 16.0, "bfloat16", 32, 1, BF16),
        GgufType("q8_0", 8.5, "8-bit blocks of 32, near lossless", 7, 32, Q8_0),
        GgufType("q4_0", 4.5, "4-bit blocks of 32 (output matrix q8_0)", 2, 32, Q4_0, Q8_0, imatrix=True),
        GgufType("q4_k_m", 4.89, "4-bit K-quant mix, llama.cpp's usual pick", 15, 256, None, imatrix=True),
        GgufType("q5_k_m", 5.70, "5-bit K-quant mix", 17, 256, None, imatrix=True),
        GgufType("q6_k", 6.56, "6-bit K-quant", 18, 256, None, imatrix=True),
    ]
}

TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}


def quantize(w: np.ndarray, ggml_type: int) -> np.ndarray:
    """A float32 matrix -> the array GGUFWriter.add_tensor stores for `ggml_type` (raw bytes for blocks)."""
    gguf = require("gguf", "gguf", "GGUF export")
    if ggml_type == F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if ggml_type == F16:
        return w.astype(np.float16)
    if ggml_type in (Q4_K, Q6_K):  # kititans' own K-quant writer: a QAT run's blocks (quantize/qat.py)
        import torch

        from kititans.quantize import qat_kernels as K

        pack = K.pack_q4_k if ggml_type == Q4_K else K.pack_q6_k
        return pack(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
    return gguf.quants.quantize(
        np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType(ggml_type)
    )


def dequantize(data: np.ndarray, ggml_type: int) -> np.ndarray:
    """Tensor data as GGUFReader gives it -> float32 (rows, cols)."""
    gguf = require("gguf", "gguf", "GGUF export")
    if ggml_type in (F32, F16):
        return np.asarray(data, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType(ggml_type)).astype(np.float32)


def llama_quantize(
    src: Path,
    dst: Path,
    qtype: GgufType,
    imatrix: dict[str, np.ndarray] | None = None,
    output_type: int | None = None,
    pure: bool = False,
    threads: int = 0,
) -> str:
    """Quantize the float GGUF `src` into `dst` with llama.cpp in a child process; returns its log.

    `dst` should be a temporary name: on failure it is removed and a KititansError says why."""
    require("llama_cpp", "llamacpp", "K-quant GGUF export (llama.cpp's quantizer)")
    cmd = [
        sys.executable,
        "-m",
        "kititans.quantize.gguf",
        str(src),
        str(dst),
        "--ftype",
        str(qtype.file_type),
    ]
    if output_type is not None:
        cmd += ["--output-type", str(output_type)]
    if pure:
        cmd.append("--pure")
    if threads:
        cmd += ["--threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="kititans-imatrix-") as tmp:
        if imatrix:
            from safetensors.numpy import save_file

            path = Path(tmp) / "imatrix.safetensors"
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}, str(path))
            cmd += ["--imatrix", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "error" in ln.lower() or "fail" in ln.lower()), None)
        raise KititansError(
            f"llama.cpp's quantizer failed for {qtype.name} (exit code {proc.returncode}): "
            f"{why or (lines[-1] if lines else 'no output')}"
        )
    return proc.stderr


# ----------------------------------------------------------------------------------------- child process


def _imatrix_array(path: str, keep: list) -> ctypes.Array:
    """A NULL-name-terminated llama_model_imatrix_data[] (research §5.4); `keep` holds the buffers alive."""
    import llama_cpp
    from safetensors.numpy import load_file

    entries = load_file(path)
    arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    for i, (name, values) in enumerate(sorted(entries.items())):
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not np.isfinite(values).all():
            raise SystemExit(f"error: non-finite importance values for {name}")
        keep += [values, name.encode()]
        arr[i].name = keep[-1]
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(entries)].name = None  # the terminator
    return arr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kititans.quantize.gguf", description=__doc__)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--ftype", type=int, required=True, help="llama_ftype (15 = Q4_K_M)")
    p.add_argument("--imatrix", help="safetensors of GGUF tensor name -> mean squared input activations")
    p.add_argument("--output-type", type=int, help="ggml type for the output matrix / tied embedding")
    p.add_argument("--pure", action="store_true", help="every 2-D weight gets the base type")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = args.ftype
    params.nthread = args.threads or (os.cpu_count() or 1)
    params.pure = args.pure
    if args.output_type is not None:
        params.output_tensor_type = args.output_type
    keep: list = []
    if args.imatrix:
        arr = _imatrix_array(args.imatrix, keep)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(args.src.encode(), args.dst.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"error: llama_model_quantize returned {rc}", file=sys.stderr)
        Path(args.dst).unlink(missing_ok=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
