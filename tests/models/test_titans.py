"""The Titans family: decode == parallel forward (in place and functional), causality, presets, roles."""

from __future__ import annotations

import pytest
import torch

from kititans.config import OptimConfig
from kititans.errors import KititansError, UnsupportedExport
from kititans.models import get_family
from kititans.models.spec import count_params
from kititans.models.titans import PRESETS, SPEC, TitansConfig, TitansModel
from kititans.train.optim import build_optimizer

V, L = 100, 45  # vocab, sequence length: > 3 windows, 11 chunk boundaries


pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw) -> TitansModel:
    """window 12, chunk 4, memory on layers 1 and 3 of 3, a strong inner learning rate so memory matters."""
    base = dict(
        vocab_size=V,
        dim=128,
        n_layers=3,
        n_heads=2,
        ffn_dim=256,
        context_length=64,
        window=12,
        n_persistent=2,
        memory_layers=[1, 3],
        mem_chunk=4,
        mem_max_lr=1.0,
    )
    torch.manual_seed(0)
    model = TitansModel(TitansConfig(**{**base, **kw})).eval()
    with torch.no_grad():  # a less trivial untrained model: random gains, lively gates
        for name, p in model.named_parameters():
            if p.ndim == 1 and "hc." not in name:
                p.uniform_(0.5, 1.5)
    return model


VARIANTS = {
    "default": {},
    "grad_base_init": {"mem_grad_base": "init"},
    "plain_gelu": {"mem_residual_norm": False, "mem_act": "gelu"},
    "gelu_tanh": {"mem_act": "gelu_tanh", "n_persistent": 0},
    "hyper_connections": {"hyper_streams": 2},
}


def ids(b=2, t=L, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_memory_changes_the_output():
    """Guards the parity tests below: the memory's test-time updates move the logits a lot."""
    x = ids()
    with torch.no_grad():
        on = small()(x)
        off = small(mem_max_lr=1e-9)(x)  # same weights, inner learning rate ~0: W stays W_0
    assert (on[:, :3] - off[:, :3]).abs().max() < 1e-4  # no chunk completed yet: identical
    assert (on[:, 20:] - off[:, 20:]).abs().max() > 0.05


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_place_decode_equals_parallel_forward(variant):
    model, x = small(**VARIANTS[variant]), ids()
    with torch.no_grad():
        full = model(x)
        state = model.new_state(2)
        parts = [model(x[:, :7], state=state)]  # prefill that ends inside a chunk
        parts += [model(x[:, i : i + 1], state=state) for i in range(7, 33)]  # boundaries, past the window
        parts.append(model(x[:, 33:38], state=state))  # a chunk path call starting mid-chunk, with a past
        parts += [model(x[:, i : i + 1], state=state) for i in range(38, L)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-4
    assert state.pos == L


@pytest.mark.parametrize("variant", ["default", "grad_base_init", "hyper_connections"])
def test_functional_step_equals_parallel_forward(variant):
    model, x = small(**VARIANTS[variant]), ids()
    spec = model.state_spec(2)
    state = model.state_to_tensors(model.new_state(2))
    assert [(tuple(t.shape), t.dtype) for t in state] == [(s, d) for _, s, d in spec]
    outs, i = [], 0
    with torch.no_grad():
        while i < L:
            T = 4 if i % 4 == 0 and i < 24 else 1  # chunk prefill calls while aligned, then single tokens
            before = [t.clone() for t in state]
            logits, *new = model.step(x[:, i : i + T], *state)
            assert all(torch.equal(a, b) for a, b in zip(before, state)), "step modified its inputs"
            assert [tuple(t.shape) for t in new] == [s for _, s, _ in spec]
            outs.append(logits)
            state, i = tuple(new), i + T
        full = model(x)
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-4
    assert state[0].tolist() == [L]
    with pytest.raises(ValueError, match="1 or mem_chunk"):
        model.step(x[:, :3], *state)


def test_state_converts_between_in_place_and_tensors():
    """Half in place, then functional from the converted tensors, then in place again: same logits."""
    model, x = small(), ids()
    with torch.no_grad():
        full = model(x)
        state = model.new_state(2)
        a = [model(x[:, :10], state=state)] + [model(x[:, i : i + 1], state=state) for i in range(10, 19)]
        tensors = model.state_to_tensors(state)  # 19 = mid-chunk: pending tokens fold into the accumulator
        b = []
        for i in range(19, 30):
            logits, *new = model.step(x[:, i : i + 1], *tensors)
            b.append(logits)
            tensors = tuple(new)
        state = model.state_from_tensors(tensors)
        assert state.pos == 30
        c = [model(x[:, 30:], state=state)]
    assert (torch.cat(a + b + c, 1) - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("j", [5, 11, 12, 30])
def test_causal(j):
    model = small(hyper_streams=2)
    x = ids()
    y = x.clone()
    y[:, j] = (y[:, j] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :j], b[:, :j])
    assert (a[:, j] - b[:, j]).abs().max() > 1e-3


def test_bf16_autocast_keeps_memory_in_fp32():
    model = small().train()
    mem = model.layers[0].memory
    seen = {}
    mem.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x.flatten())
    loss.backward()
    assert seen["dtype"] == torch.float32 and logits.dtype == torch.bfloat16
    assert mem.w1.grad is not None and torch.isfinite(mem.w1.grad).all() and mem.w1.grad.abs().sum() > 0
    with torch.no_grad():
        ref = model.eval()(x)
    assert (logits.float() - ref).abs().max() < 0.25  # bf16 attention/FFN, fp32 memory


def test_bf16_stored_model_decodes():
    """The torch runtime's --dtype bf16: weights and ring in bf16, the memory path and its state in fp32."""
    model, x = small(), ids(1, 30)
    with torch.no_grad():
        ref = model(x)
        model = model.to(torch.bfloat16)
        state = model.new_state(1)
        out = torch.cat(
            [model(x[:, :9], state=state)] + [model(x[:, i : i + 1], state=state) for i in range(9, 30)], 1
        )
    assert state.layers[0]["w1"].dtype == torch.float32 and state.layers[0]["k"].dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.3


def test_runs_past_context_length_with_a_fixed_state():
    model = small(context_length=16)
    x = ids(1, 40)
    with torch.no_grad():
        full = model(x)
        state = model.new_state(1)
        parts = [model(x[:, i : i + 1], state=state) for i in range(40)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4


def test_presets():
    sizes = {}
    for name in PRESETS:
        cfg = SPEC.make_config(name)
        assert cfg.dim % 64 == 0 and cfg.ffn_dim % 64 == 0 and cfg.head_dim == 64, name
        with torch.device("meta"):
            model = TitansModel(cfg)
        sizes[name] = count_params(model)
    assert abs(sizes["titans-500m"] / 503e6 - 1) < 0.02, sizes
    cfg = SPEC.make_config("titans-500m")
    assert sorted(cfg.memory_set) == list(range(1, 24, 2)) and not cfg.tie_embeddings
    assert cfg.mem_hidden_mult * cfg.head_dim == 128
    lite_tiny = get_family("lite").make_config("tiny")
    tiny = SPEC.make_config("titans-tiny")
    assert (tiny.dim, tiny.n_layers, tiny.vocab_size) == (
        lite_tiny.dim,
        lite_tiny.n_layers,
        lite_tiny.vocab_size,
    )
    assert 4e6 < sizes["titans-tiny"] < 6e6


def test_family_flag_finds_the_family_preset():
    from kititans.models.spec import find_preset

    assert find_preset("tiny", "titans")[1].name == "titans-tiny"  # `kititans train --family titans`
    assert find_preset("debug", "titans")[1].name == "titans-debug"
    assert find_preset("tiny", "lite")[1].name == "tiny"


def test_param_roles_send_hidden_matrices_to_muon():
    model = small(hyper_streams=2, tie_embeddings=False)
    roles = SPEC.roles(model)  # asserts every parameter has a role
    assert roles["embed.weight"] == "embedding" and roles["lm_head.weight"] == "head"
    for name in ("layers.0.attn.qkv.weight", "layers.0.ffn.down_proj.weight", "layers.0.memory.proj.weight"):
        assert roles[name] == "matrix", name
    assert roles["layers.0.attn.persistent_k"] == "tensor"
    for name in ("layers.0.memory.w1", "layers.0.memory.gamma", "layers.0.memory.gates.weight"):
        assert roles[name] == "scalar", name
    assert roles["layers.0.hc.0.dynamic_alpha"] == "scalar"
    opt = build_optimizer(model, SPEC, OptimConfig(name="muon"))  # Muon accepts only 2-D parameters
    assert len(opt.optimizers) == 2


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"memory_layers": [0]}, "memory_layers"),
        ({"memory_layers": [2, 2]}, "memory_layers"),
        ({"mem_grad_base": "batch"}, "mem_grad_base"),
        ({"mem_act": "relu"}, "mem_act"),
        ({"dim": 100, "n_heads": 3}, "divide"),
    ],
)
def test_bad_config_is_one_clear_error(bad, message):
    with pytest.raises(KititansError, match=message):
        SPEC.make_config("titans-debug", bad)


def test_gguf_is_refused_with_the_reason():
    with pytest.raises(UnsupportedExport, match="llama.cpp has no Titans architecture.*use onnx or coreml"):
        get_family("titans").support("gguf")
