"""Encoder: a sentence encoder for on-device retrieval, built from Lite's llama blocks (RMSNorm, RoPE, SwiGLU,
optional GQA, HF parameter names) with bidirectional attention, mean pooling over the non-pad tokens and an
L2-normalised output. Its parameters are named exactly like Lite's `model.*` ones, so `--init RUN` copies a Lite
run's trunk (same tokenizer), and llama.cpp runs it as its non-causal `llama-embed` architecture.

    emb = model(input_ids, attention_mask)      # (B, dim), unit length; similarity = emb_a @ emb_b.T
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kititans.errors import KititansError
from kititans.models.encoder_export import EncoderCoreMLGraph, EncoderOnnxGraph
from kititans.models.flops import bidirectional_flops_per_token
from kititans.models.layers import apply_rope, mean_pool
from kititans.models.lite import (
    GGUF_TENSORS,
    Attention,
    DecoderLayer,
    LiteBackbone,
    LiteConfig,
    fill_rope_buffers,
    init_llama_weights,
    lite_component,
)
from kititans.models.spec import FamilySpec, GgufLayout, Preset, register


@dataclass
class EncoderConfig(LiteConfig):
    """Lite's dimensions (tie_embeddings is unused: an encoder has no output head) plus the pooling."""

    pooling: str = "mean"  # mean over the non-pad tokens (the only pooling, for llama.cpp's MEAN as well)
    normalize: bool = True  # unit-length vectors: cosine similarity is a dot product

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling != "mean":
            raise KititansError(f"encoder: pooling must be 'mean', got {self.pooling!r}")


class BidirectionalAttention(Attention):
    """Lite's attention (same projections and names) where every token sees every non-pad token."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, keep: Tensor | None) -> Tensor:  # type: ignore[override]
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv
        q = self.q_proj(x).view(B, T, H, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, Hkv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, Hkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = keep[:, None, None, :] if keep is not None else None  # (B, 1, 1, T): keys that exist
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.hd))


class EncoderLayer(DecoderLayer):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.self_attn = BidirectionalAttention(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, keep: Tensor | None) -> Tensor:  # type: ignore[override]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, keep)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderModel(nn.Module):
    component = staticmethod(lite_component)
    init_families = ("lite", "encoder")  # --init copies their `model.*` weights: the same blocks and names

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.model = LiteBackbone(cfg, EncoderLayer)  # Lite's `model.*` names
        self.register_buffer("rope_cos", torch.empty(cfg.context_length, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.context_length, cfg.head_dim), persistent=False)
        self.activation_checkpointing = False
        self.init_weights()
        self.init_buffers()

    def init_buffers(self) -> None:
        fill_rope_buffers(self)

    def init_weights(self) -> None:
        """As Lite: normal(0, init_std), residual outputs scaled by 1/sqrt(2 n_layers), gains 1."""
        init_llama_weights(self)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, T), attention_mask (B, T) 1 for tokens, 0 for padding -> (B, T, dim) after the norm."""
        T = input_ids.shape[1]
        if self.config.context_length < T:
            raise ValueError(
                f"sequence of {T} tokens exceeds the encoder's context of {self.config.context_length}"
            )
        keep = attention_mask.bool() if attention_mask is not None else None
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, keep, use_reentrant=False)
            else:
                x = layer(x, cos, sin, keep)
        return self.model.norm(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) token ids (+ mask) -> (B, dim) pooled embeddings, unit length if config.normalize."""
        keep = attention_mask.bool() if attention_mask is not None else None
        emb = mean_pool(self.hidden_states(input_ids, attention_mask), keep)
        return F.normalize(emb, dim=-1) if self.config.normalize else emb


def hf_encoder_config(cfg: EncoderConfig) -> dict:
    """config.json fields for transformers / sentence-transformers (the modeling code ships in the run dir)."""
    from kititans.models.encoder_hf import hf_config

    return hf_config(cfg)


def encoder_run_files(cfg: EncoderConfig) -> dict[str, str]:
    from kititans.models.encoder_hf import run_files

    return run_files(cfg)


# llama.cpp's llama-embed is llama without a causal mask: the same tensors, no output head; its graph pools
# (MEAN = 1 in llama.cpp's enum) when the GGUF says so
ENCODER_GGUF = GgufLayout(
    {k: v for k, v in GGUF_TENSORS.items() if not k.startswith("lm_head")},
    arch="llama-embed",
    kv={"pooling_type": 1, "attention.causal": False},
    task="embed",
)

_TRAIN = {"train.seq_len": 128, "optim.warmup_steps": 30, "optim.lr": 1e-3, "optim.weight_decay": 0.01}
PRESETS = {
    p.name: p
    for p in [
        Preset(
            "encoder-debug",
            dict(
                vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256, context_length=128
            ),
            {
                **_TRAIN,
                "train.seq_len": 64,
                "train.batch_size": 16,
                "train.steps": 60,
                "train.eval_every": 30,
                "train.save_every": 30,
            },
            "tests: 0.4M params",
        ),
        Preset(
            "encoder-tiny",
            dict(
                vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=768, context_length=256
            ),
            {
                **_TRAIN,
                "train.batch_size": 32,
                "train.steps": 800,
                "train.eval_every": 200,
                "train.save_every": 400,
            },
            "CPU: 4.2M params, the trunk of Lite `tiny` (so --init from a tiny run copies every weight)",
        ),
        Preset(
            "encoder-33m",
            dict(
                vocab_size=32000,
                dim=384,
                n_layers=12,
                n_heads=12,
                n_kv_heads=12,
                ffn_dim=1024,
                context_length=512,
            ),
            {**_TRAIN, "train.batch_size": 128, "train.steps": 20000, "train.seq_len": 256},
            "the bge-small / MiniLM class: 33.5M params, 384-d vectors",
        ),
    ]
}

SPEC = register(
    FamilySpec(
        name="encoder",
        config_cls=EncoderConfig,
        model_cls=EncoderModel,
        presets=PRESETS,
        description="sentence encoder: Lite's blocks, bidirectional attention, mean pooling, unit-length vectors",
        formats={"gguf": ENCODER_GGUF, "onnx": EncoderOnnxGraph, "coreml": EncoderCoreMLGraph},
        hf_config=hf_encoder_config,
        run_files=encoder_run_files,
        task="embed",
        flops_per_token=bidirectional_flops_per_token,
    )
)
