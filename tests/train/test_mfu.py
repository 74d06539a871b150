"""MFU's two halves: the GPU peak table (names as torch reports them, variants before their base names) and
the FLOPs per token (causal attention's mean keys, windows, encoders, Titans' memory)."""

from __future__ import annotations

import pytest
import torch

from kititans.models.flops import attention_flops, causal_keys, linear_params, matmul_params
from kititans.models.spec import get_family
from kititans.train.mfu import flops_per_token, peak_for_name


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 836),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA L4", 121),
        ("NVIDIA L40", 181),
        ("NVIDIA L40S", 362),
        ("NVIDIA A10", 125),
        ("NVIDIA A10G", 70),
        ("Tesla T4", 65),
        ("Tesla V100-SXM2-16GB", 125),
        ("Tesla V100-PCIE-32GB", 112),
        ("Tesla V100S-PCIE-32GB", 130),
        ("NVIDIA GeForce RTX 3090", 71),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA GeForce RTX 5090", 209.5),
        ("NVIDIA B200", 2250),
    ],
)
def test_peak_table_covers_the_gpus_users_have(name, tflops):
    assert peak_for_name(name) == pytest.approx(tflops * 1e12)


def test_unknown_gpus_report_no_mfu():
    assert peak_for_name("NVIDIA GeForce GTX 1080") is None
    assert peak_for_name("NVIDIA L400") is None  # no prefix match on a longer name


def test_causal_keys_are_the_mean_of_a_triangle():
    assert causal_keys(4) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert causal_keys(6, window=3) == pytest.approx((1 + 2 + 3 + 3 + 3 + 3) / 6)
    assert causal_keys(2048) == pytest.approx(2049 / 2)
    assert causal_keys(4096, window=512) < 512


def test_lite_counts_causal_attention_once():
    spec = get_family("lite")
    cfg = spec.make_config("debug")
    model = spec.build(cfg)
    t = 128
    want = 6 * matmul_params(model) + 12 * cfg.n_layers * cfg.dim * (t + 1) / 2
    assert flops_per_token(model, cfg, t) == pytest.approx(want)


def test_encoder_attends_every_token():
    spec = get_family("encoder")
    cfg = spec.make_config("encoder-debug")
    model = spec.build(cfg)
    assert flops_per_token(model, cfg, 64) == pytest.approx(
        6 * matmul_params(model) + attention_flops(cfg.n_layers, cfg.dim, 64.0)
    )


@pytest.mark.parametrize("block", ["mal", "mag", "mac"])
def test_titans_counts_its_memory(block):
    spec = get_family("titans")
    cfg = spec.make_config("titans-debug", {"block": block})
    model = spec.build(cfg)
    t = 128
    total = flops_per_token(model, cfg, t)
    d, h = cfg.head_dim, cfg.mem_hidden_mult * cfg.head_dim
    reads = 2 if block == "mac" else 1
    memory = 3 * len(cfg.memory_set) * cfg.n_heads * (4 * reads + 10) * d * h
    attention = total - 6 * linear_params(model) - memory
    assert attention > 0
    if block == "mac":  # memory layers see [persistent ; h ; segment], the others a sliding window (default)
        assert cfg.mac_attention == "sliding" and cfg.mac_h_rows
        seg, others = causal_keys(cfg.window), cfg.n_layers - len(cfg.memory_set)
        want = (
            12
            * cfg.dim
            * (
                len(cfg.memory_set) * (cfg.n_persistent + 2 * seg)
                + others * (cfg.n_persistent + causal_keys(t, cfg.window))
            )
        )
    else:
        want = 12 * cfg.n_layers * cfg.dim * (cfg.n_persistent + causal_keys(t, cfg.window))
    assert attention == pytest.approx(want)
    # the learned initial memory W_0 is counted as memory work, not as 6 FLOPs per parameter
    w0 = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("memory.w1", "memory.w2")))
    assert w0 > 0 and linear_params(model) < sum(p.numel() for p in model.parameters())


def test_no_mfu_on_cpu_or_fp32():
    from kititans.train.mfu import peak_flops

    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
