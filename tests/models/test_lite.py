"""The Lite family: llama-compatible (transformers parity), cached decode == full forward, presets."""

from __future__ import annotations

import pytest
import torch

from kititans.models.lite import PRESETS, SPEC, LiteConfig, LiteModel
from kititans.models.spec import count_params


def small(**kw) -> LiteModel:
    cfg = LiteConfig(
        vocab_size=300, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, context_length=64
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = LiteModel(cfg).eval()
    with torch.no_grad():  # make the untrained model less trivial: random norm gains
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_llama_gives_the_same_logits(tmp_path, tied, debug_run):
    transformers = pytest.importorskip("transformers")
    from kititans.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(debug_run)
    tok = ckpt.tokenizer
    model = small(tie_embeddings=tied, vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path, model, SPEC, model.config, tok)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # and the trained run directory itself loads in AutoModelForCausalLM
    auto = transformers.AutoModelForCausalLM.from_pretrained(debug_run, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert (auto(input_ids=ids).logits - ckpt.model(ids)).abs().max().item() < 1e-4


def test_cached_decode_equals_full_forward():
    model = small()
    ids = torch.randint(0, 300, (1, 50))
    with torch.no_grad():
        full = model(ids)[0]
        state = model.new_state(1)
        parts = [model(ids[:, :13], state=state)[0]]  # prefill
        parts += [model(ids[:, i : i + 1], state=state)[0] for i in range(13, 30)]  # decode one by one
        parts.append(model(ids[:, 30:], state=state)[0])  # a chunk with a past (explicit causal mask)
    assert (torch.cat(parts) - full).abs().max().item() < 1e-4
    assert state.pos == 50


def test_context_overflow_is_an_error():
    model = small()
    state = model.new_state(1)
    with torch.no_grad():
        model(torch.zeros(1, 60, dtype=torch.long), state=state)
        with pytest.raises(ValueError, match="exceeds the context"):
            model(torch.zeros(1, 5, dtype=torch.long), state=state)


def test_presets_sizes_and_llama_cpp_dims():
    sizes = {}
    for name in PRESETS:
        cfg = SPEC.make_config(name)
        assert cfg.dim % 256 == 0 and cfg.ffn_dim % 256 == 0, f"{name}: K-quants need multiples of 256"
        with torch.device("meta"):
            sizes[name] = count_params(LiteModel(cfg))
    assert abs(sizes["lite-42m"] / 42.08e6 - 1) < 0.05
    assert 3e6 <= sizes["tiny"] <= 5e6
    assert abs(sizes["lite-125m"] / 125e6 - 1) < 0.05
    assert abs(sizes["lite-350m"] / 350e6 - 1) < 0.05


def test_gqa_and_tied_embeddings_share_storage():
    model = small()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (128, 256)


def test_rolled_rope_equals_rotate_half_rope():
    """The decode step's 3-op RoPE (roll + signed sin) gives apply_rope's numbers."""
    from kititans.models.layers import apply_rope, apply_rope_rolled, rope_tables, signed_sin

    cos, sin = rope_tables(16, 40, 10000.0)
    x = torch.randn(2, 3, 5, 16)
    c, s = cos[7:8], sin[7:8]  # one position, broadcast over the heads
    torch.testing.assert_close(apply_rope_rolled(x, c, signed_sin(s)), apply_rope(x, c, s), atol=1e-6, rtol=0)
    assert not torch.allclose(apply_rope_rolled(x, c, s), apply_rope(x, c, s))  # the sign matters
