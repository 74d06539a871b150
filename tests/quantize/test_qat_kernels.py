"""The QAT kernels against the exporters' own quantizers, on trained weights: gguf-py's q8_0/q4_0, MLAS's
MatMulNBits blocks (onnxruntime's C++ quantizer), coremltools' linear_symmetric, llama.cpp's K-quants (its
compiled quantizer in a subprocess); the K-quant writer's bytes read back by gguf-py; torchao's closest QAT
config differs (why it is not used). About 20 s after the shared debug run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kititans.quantize import qat_kernels as K


@pytest.fixture(scope="module")
def weights(debug_run) -> dict[str, torch.Tensor]:
    """Trained 2-D weights of the debug run, plus edge cases: an all-zero block, one-signed rows, an outlier."""
    from kititans.checkpoint import load_checkpoint

    sd = load_checkpoint(debug_run).model.state_dict()
    out = {n: t.float() for n, t in sd.items() if t.ndim == 2}
    odd = out["model.layers.0.mlp.up_proj.weight"][:8].clone()
    odd[0, :256] = 0
    odd[1] = odd[1].abs()
    odd[2] = -odd[2].abs()
    odd[3, 7] = 40 * odd[3].abs().max()
    out["edge"] = odd
    return out


def test_gguf_py_levels_are_exact(weights):
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    for name, w in weights.items():
        for kernel, t in ((K.q8_0, T.Q8_0), (K.q4_0, T.Q4_0)):
            ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t), t)
            assert np.array_equal(kernel(w).numpy(), ref), (name, t.name)


def test_mlas_blocks_are_exact(weights):
    pytest.importorskip("onnxruntime")
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    for bits, fn in ((4, quantize_matmul_4bits), (8, quantize_matmul_8bits)):
        for name, w in [*weights.items(), ("k=100", weights["edge"][:, :100])]:
            fp = np.ascontiguousarray(w.numpy().T)  # ONNX MatMul weight: (K, N)
            k, n = fp.shape
            blocks = -(-k // 32)
            padded = np.pad(fp, ((0, blocks * 32 - k), (0, 0)))
            packed = np.zeros((n, blocks, 32 * bits // 8), np.uint8)
            zp = np.zeros((n, -(-blocks // (8 // bits))), np.uint8)
            scale = np.zeros((n, blocks), np.float32)
            fn(packed, np.ascontiguousarray(padded), scale, zp, 32, n, k, True)
            q = np.stack([packed & 15, packed >> 4], -1) if bits == 4 else packed
            q = q.reshape(n, blocks, 32).astype(np.float32)
            ref = ((q - (1 << (bits - 1))) * scale[..., None]).reshape(n, -1)[:, :k]
            assert np.array_equal(K.mlas(w, bits).numpy(), ref), (name, bits)


def test_coreml_linear_symmetric_is_exact(weights):
    pytest.importorskip("coremltools")
    from kititans.quantize.coreml import coremltools

    utils = coremltools("coremltools.optimize._utils")
    for name, w in weights.items():
        for dtype in (np.float16, np.float32):
            for bits, block in ((4, 32), (8, None)):
                q, s, _ = utils.compute_qparams(
                    w.numpy().astype(dtype), bits, True, "LINEAR_SYMMETRIC", np.int8, [1, block or 0]
                )
                g = block or w.shape[1]
                ref = q.astype(np.float32).reshape(w.shape[0], -1, g) * s.astype(np.float32).reshape(
                    w.shape[0], -1, 1
                )
                ref = ref.astype(dtype).reshape(w.shape).astype(np.float32)
                got = K.coreml(w, bits, block, torch.float16 if dtype == np.float16 else torch.float32)
                assert np.array_equal(got.numpy(), ref), (name, bits, dtype)


def test_kquant_writer_bytes_read_back_exactly(weights):
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    for name, w in weights.items():
        if w.shape[1] % 256:
            continue
        for pack, kernel, t in ((K.pack_q4_k, K.q4_k, T.Q4_K), (K.pack_q6_k, K.q6_k, T.Q6_K)):
            data = pack(w)
            assert data.shape == (w.shape[0], w.shape[1] // 256 * (144 if t == T.Q4_K else 210))
            ref = gguf.quants.dequantize(data, t).reshape(w.shape)
            assert np.array_equal(kernel(w).numpy(), ref), (name, t.name)


def test_kquants_match_llamacpp_quantizer(debug_run, tmp_path):
    """llama.cpp's compiled Q4_K/Q6_K on the same float32 tensors: the same values. Its float arithmetic
    picks a different sub-block scale from a C-order float32 replay on a sliver of sub-blocks, how many depends
    on the weights: about 1e-4 of the values for one debug run, 1.2e-3 for another (the same on two machines).
    So: at most 0.5% of the values differ, and their disagreement is under 1% of the quantization error."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from kititans.checkpoint import load_checkpoint
    from kititans.export.gguf import gguf_tensors, vocabulary, write_gguf
    from kititans.quantize.gguf import TYPES, llama_quantize

    ckpt = load_checkpoint(debug_run)
    tensors = gguf_tensors(ckpt)
    pieces, _ = vocabulary(ckpt, tensors[0][1].shape[0])
    base = tmp_path / "f32.gguf"
    write_gguf(base, ckpt, tensors, pieces, TYPES["f32"])
    src = dict(tensors)
    for level, kernel, qtype in (("q4_k_m", K.q4_k, 12), ("q6_k", K.q6_k, 14)):
        out = tmp_path / f"{level}.gguf"
        llama_quantize(base, out, TYPES[level], pure=True)
        same = total = 0
        disagree = qerr = 0.0
        for t in gguf.GGUFReader(str(out)).tensors:
            if int(t.tensor_type) != qtype:
                continue
            ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src[t.name].shape)
            got = kernel(torch.from_numpy(src[t.name])).numpy()
            same += int((got == ref).sum())
            total += ref.size
            disagree += float(((got - ref).astype(np.float64) ** 2).sum())
            qerr += float(((ref - src[t.name]).astype(np.float64) ** 2).sum())
        assert total > 0 and same / total > 0.995, (level, same / total)
        assert disagree < 0.01 * qerr, (level, disagree / qerr)


def test_torchao_closest_config_is_not_the_export_rounding(weights):
    pytest.importorskip("torchao")
    from kititans.quantize.qat import torchao_mismatch

    w = weights["model.layers.0.mlp.up_proj.weight"]
    for kernel, bits in (("mlas4", 4), ("q4_0", 4), ("mlas8", 8)):
        assert torchao_mismatch(w, kernel, bits) > 0.05, kernel
