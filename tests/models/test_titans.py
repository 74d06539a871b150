"""The Titans family, every block (mal, mac, mag) and memory option: decode == parallel forward (in place and
functional), causality, the memory matters, old configs load as mal, presets, roles, one-line config errors."""

from __future__ import annotations

import pytest
import torch

from kititans.config import OptimConfig
from kititans.errors import KititansError, UnsupportedExport
from kititans.models import get_family
from kititans.models.spec import count_params
from kititans.models.titans import PRESETS, SPEC, TitansConfig, TitansModel
from kititans.models.titans.config import upgrade_config
from kititans.train.optim import build_optimizer

V, L = 100, 45  # vocab, sequence length: > 3 windows, 11 chunk boundaries


pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw) -> TitansModel:
    """window 12, chunk 4, memory on layers 1 and 3 of 3, a strong inner learning rate so memory matters;
    random gains and (with mem_conv) a random convolution."""
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
            if name.endswith("memory.conv"):
                p.normal_(0.0, 0.5)
    return model


VARIANTS = {
    "default": {},
    "grad_base_init": {"mem_grad_base": "init"},
    "plain_gelu": {"mem_residual_norm": False, "mem_act": "gelu"},
    "gelu_tanh": {"mem_act": "gelu_tanh", "n_persistent": 0},
    "hyper_connections": {"hyper_streams": 2},
    "paper_details": {"mem_conv": 4, "mem_norm_v": False, "mem_forget_bias": "token"},
    "mag": {"block": "mag"},
    "mag_conv_init": {"block": "mag", "mem_conv": 3, "mem_grad_base": "init"},
    "mac": {"block": "mac"},
    "mac_revision_1": {  # the first MAC block (revision 1's mac_* values): segments, sigmoid gate, stores y
        "block": "mac",
        "mac_attention": "segment",
        "mac_gate": "sigmoid",
        "mac_keys": "y",
        "mac_values": "y",
        "mac_h_residual": False,
    },
    "mac_conv_qk": {"block": "mac", "mem_conv": 4, "mem_norm_v": False},
    "mac_hc_plain": {"block": "mac", "hyper_streams": 2, "mem_residual_norm": False, "n_persistent": 0},
    "mac_segment_is_chunk": {"block": "mac", "window": 4},
    "mac_segment": {"block": "mac", "mac_attention": "segment", "memory_layers": [2]},
    "mac_sigmoid_gate": {"block": "mac", "mac_gate": "sigmoid"},
    "mac_no_h": {"block": "mac", "mac_h_rows": False, "mac_h_residual": False},  # no h at all
    "mac_keys_y": {"block": "mac", "mac_keys": "y"},
    "mac_keys_y_conv": {"block": "mac", "mac_keys": "y", "mem_conv": 3, "mem_norm_v": True},
    "mac_stores_y": {"block": "mac", "mac_keys": "y", "mac_values": "y", "mac_h_rows": False},
    "mac_values_y": {"block": "mac", "mac_values": "y"},
    "mac_no_h_residual": {"block": "mac", "mac_h_residual": False},
    "mac_h_residual_only": {"block": "mac", "mac_h_rows": False, "mac_h_residual": True},
    "mac_all": {
        "block": "mac",
        "mac_attention": "sliding",
        "mac_gate": "tanh",
        "mac_keys": "u",
        "mac_h_residual": True,
        "memory_layers": [1],
        "global_layers": [3],
    },
    "global": {"global_layers": [2]},
    "mag_global_memory": {"block": "mag", "global_layers": [1, 2]},
    "mac_global": {"block": "mac", "global_layers": [2]},
}
BLOCKS = ("default", "mag", "mac", "mac_revision_1")


def ids(b=2, t=L, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", BLOCKS)
def test_memory_changes_the_output(variant):
    """Guards the parity tests below: the memory's test-time updates move the logits far more than their
    1e-4 tolerance (less in the gating blocks, where the memory scales the attention output)."""
    x = ids()
    with torch.no_grad():
        on = small(**VARIANTS[variant])(x)
        off = small(**VARIANTS[variant], mem_max_lr=1e-9)(x)  # same weights, inner learning rate ~0: W = W_0
    assert (on[:, :3] - off[:, :3]).abs().max() < 1e-4  # no chunk completed yet: identical
    assert (on[:, 20:] - off[:, 20:]).abs().max() > (0.05 if variant == "default" else 0.005)


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


@pytest.mark.parametrize(
    "variant",
    [
        "default",
        "grad_base_init",
        "hyper_connections",
        "mag",
        "mac",
        "mac_revision_1",
        "mac_conv_qk",
        "mac_all",
        "global",
    ],
)
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
            kept = [n for (n, _, _), a, b in zip(spec, state, new) if a is b]  # unchanged: passed through
            assert ("layers.0.w1" in kept) == (T == 1 and (i + 1) % 4 != 0), (i, T)
            outs.append(logits)
            state, i = tuple(new), i + T
        full = model(x)
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-4
    assert state[0].tolist() == [L]
    with pytest.raises(KititansError, match="no step takes 3 tokens"):
        model.step(x[:, :3], *state)


@pytest.mark.parametrize("variant", ["default", "mag", "mac_conv_qk", "mac_hc_plain"])
def test_fused_for_inference_decodes_the_same(variant):
    """fuse_for_inference (what the torch runtime calls: one matmul for the memory's projections and gates,
    and for MAC's query stream; fused FFN) and its fast decode path compute the same logits."""
    model, x = small(**VARIANTS[variant]), ids()
    with torch.no_grad():
        full = model(x)
        model.fuse_for_inference()
        assert torch.allclose(model(x), full, atol=1e-5)
        state = model.new_state(2)
        out = torch.cat(
            [model(x[:, :8], state=state)] + [model(x[:, i : i + 1], state=state) for i in range(8, L)], 1
        )
    assert (out - full).abs().max() < 1e-4


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


def _filled(model: TitansModel) -> TitansModel:
    """Every parameter from one seeded generator, by name (independent of how the code initialises)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.rand(p.shape, generator=g)
            gain = p.ndim == 1 or name.endswith("gamma") or "qkv_gain" in name
            p.copy_(0.5 + r if gain else (r - 0.5) * (3.0 / p.shape[-1] ** 0.5))
    return model


@pytest.mark.parametrize(
    "extra, picks, abs_sum",
    [
        ({}, [0.634244, -0.344917, 0.26823, 0.959683, 0.135591], 935.27),
        ({"hyper_streams": 2}, [-0.544662, 0.726132, 0.672565, 1.165422, -0.832299], 870.5756),
    ],
)
def test_mal_gives_the_logits_of_the_model_before_blocks(extra, picks, abs_sum):
    """The reference numbers were computed by the Titans code of commit fa5509c (before `block` and the memory
    options existed) on the same weights and tokens: a config saved then (no `revision`), upgraded, computes the
    same model (the revision-1 defaults: mal, values normalised, forget bias per chunk)."""
    saved = dict(
        vocab_size=50, dim=32, n_layers=2, n_heads=2, ffn_dim=64, context_length=32, window=6,
        n_persistent=2, mem_chunk=4, mem_max_lr=1.0, **extra,
    )  # fmt: skip
    cfg = TitansConfig(**upgrade_config(saved))  # a run saved then: revision 1, its defaults filled in
    model = _filled(TitansModel(cfg).eval())
    x = torch.arange(24).remainder(7).mul(7).remainder(50)[None]
    with torch.no_grad():
        y = model(x)[0]
    got = y[[0, 5, 11, 17, 23], [1, 7, 13, 29, 42]]
    assert torch.allclose(got, torch.tensor(picks), atol=1e-5), got.tolist()
    assert abs(y.abs().sum().item() - abs_sum) < 1e-2


def test_a_misaligned_prefill_is_refused():
    """A chunk-sized call must start at a multiple of mem_chunk (its memory update would be wrong)."""
    model, x = small(), ids()
    state = model.state_to_tensors(model.new_state(2))
    _, *state = model.step(x[:, :1], *state)  # position 1
    with pytest.raises(KititansError, match="4 tokens at position 1.*multiple of"):
        model.step(x[:, 1:5], *state)


@pytest.mark.parametrize("variant", ["hyper_connections", "mag", "mac_conv_qk"])
@pytest.mark.parametrize("j", [5, 11, 12, 30])
def test_causal(j, variant):
    model = small(**VARIANTS[variant])
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
    assert cfg.block == "mac" and cfg.window % cfg.mem_chunk == 0  # the seed's Memory as Context Transformer
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
        ({"block": "mat"}, "unknown model.block 'mat'; valid blocks: mal, mac, mag"),
        ({"block": "mac", "window": 30}, "window=30 tokens, which must be a multiple of mem_chunk=8"),
        ({"mem_conv": 1}, "mem_conv must be 0"),
        ({"mem_forget_bias": "step"}, "mem_forget_bias"),
    ],
)
def test_bad_config_is_one_clear_error(bad, message):
    with pytest.raises(KititansError, match=message):
        SPEC.make_config("titans-debug", bad)


def test_gguf_is_refused_with_the_reason():
    with pytest.raises(UnsupportedExport, match="llama.cpp has no Titans architecture.*use onnx or coreml"):
        get_family("titans").support("gguf")


@pytest.mark.slow
def test_compiled_decode_equals_parallel_forward():
    """compile_decode(): single tokens through torch.compile'd fixed-shape steps (a minute of compiling)."""
    model, x = small(block="mac", mem_conv=4), ids(1)
    with torch.no_grad():
        full = model(x)
        model.fuse_for_inference().compile_decode()
        state = model.new_state(1)
        out = torch.cat(
            [model(x[:, :8], state=state)] + [model(x[:, i : i + 1], state=state) for i in range(8, L)], 1
        )
    assert (out - full).abs().max() < 1e-4 and set(model._compiled) == {
        "decode",
        "decode_close",
        "decode_segment",
    }
