"""Lite: a llama-compatible GPT (RMSNorm, RoPE rotate-half, SwiGLU, optional GQA and tied embeddings,
no biases, HF parameter names). Its config.json is a valid transformers LlamaConfig and its GGUF is
`general.architecture = llama`, so stock llama.cpp runs it. Anything without a llama tensor slot stays out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kititans.errors import KititansError
from kititans.models.layers import RMSNorm, SwiGLU, apply_rope, attention, rope_tables
from kititans.models.lite_export import LiteCoreMLStep, LiteOnnxStep
from kititans.models.spec import FamilySpec, GgufLayout, Preset, register


@dataclass
class LiteConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 768
    context_length: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise KititansError(
                f"lite: dim ({self.dim}) must divide by n_heads ({self.n_heads}), "
                f"and n_heads by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise KititansError(f"lite: head_dim {self.head_dim} must be even for RoPE")
        if min(self.vocab_size, self.dim, self.n_layers, self.ffn_dim, self.context_length) < 1:
            raise KititansError("lite: sizes must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def lite_component(name: str) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm head"
    if "self_attn" in name:
        return "attention"
    if "mlp" in name:
        return "feed-forward"
    return "norms"


@dataclass
class KVCache:
    """Static per-layer K/V buffers (B, n_kv, max_len, hd) and the number of positions filled."""

    k: list[Tensor]
    v: list[Tensor]
    pos: int = 0
    max_len: int = field(default=0)


class Attention(nn.Module):
    def __init__(self, cfg: LiteConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)
        self.qkv_weight: Tensor | None = None  # set by fuse(): one matmul for q, k, v at inference

    def fuse(self) -> None:
        """Inference: q/k/v weights become views of one (H+2Hkv)*hd x dim matrix, so decode runs one matmul
        and one RoPE instead of three and two; names and values in state_dict() stay the same."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).detach()
        nq, nk = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
        for lin, part in zip((self.q_proj, self.k_proj, self.v_proj), w.split([nq, nk, nk])):
            lin.weight.data = part
        self.qkv_weight = w

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor] | None, pos: int
    ) -> Tensor:
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv
        if self.qkv_weight is not None:
            qkv = F.linear(x, self.qkv_weight).view(B, T, H + 2 * Hkv, self.hd).transpose(1, 2)
            qk = apply_rope(qkv[:, : H + Hkv], cos, sin)  # (B, H+Hkv, T, hd)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
        else:
            q = self.q_proj(x).view(B, T, H, self.hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_proj(x).view(B, T, Hkv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
            v = self.v_proj(x).view(B, T, Hkv, self.hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            kb, vb = cache
            kb[:B, :, pos : pos + T] = k
            vb[:B, :, pos : pos + T] = v
            k, v = kb[:B, :, : pos + T], vb[:B, :, : pos + T]
        y = attention(q, k, v, past=pos if cache is not None else 0)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LiteConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor] | None, pos: int
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LiteBackbone(nn.Module):
    """Holds the HF `model.*` parameters: embed_tokens, layers, norm (the encoder passes its own layer)."""

    def __init__(self, cfg: LiteConfig, layer: type[nn.Module] = DecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


def fill_rope_buffers(model: nn.Module) -> None:
    """Fill a model's non-persistent RoPE tables (fp32) on its device; nothing on the meta device."""
    cfg = model.config
    if model.rope_cos.device.type == "meta":
        return
    cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
    model.rope_cos = cos.to(model.rope_cos.device)  # (ctx, hd)
    model.rope_sin = sin.to(model.rope_sin.device)


def init_llama_weights(model: nn.Module) -> None:
    """embeddings, q/k/v/gate/up: normal(0, init_std); o_proj, down_proj: init_std / sqrt(2 n_layers);
    RMSNorm gains: 1."""
    std, n_layers = model.config.init_std, model.config.n_layers
    for name, p in model.named_parameters():
        if p.ndim < 2:
            nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, 0.0, std / (2 * n_layers) ** 0.5)
        else:
            nn.init.normal_(p, 0.0, std)


class LiteModel(nn.Module):
    component = staticmethod(lite_component)  # parameter name -> component, for the size table

    def __init__(self, cfg: LiteConfig):
        super().__init__()
        self.config = cfg
        self.model = LiteBackbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_cos", torch.empty(cfg.context_length, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.context_length, cfg.head_dim), persistent=False)
        self.activation_checkpointing = False
        self.init_weights()
        self.init_buffers()

    def init_buffers(self) -> None:
        """Fill the non-persistent buffers (RoPE tables, fp32) on the model's device."""
        fill_rope_buffers(self)

    def fuse_for_inference(self) -> LiteModel:
        """Fused q/k/v and gate/up matmuls for decoding (same numbers, fewer ops); not for training."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def init_weights(self) -> None:
        init_llama_weights(self)

    def new_state(
        self, batch_size: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        cfg = self.config
        max_len = min(max_len or cfg.context_length, cfg.context_length)
        p = self.lm_head.weight
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype or p.dtype, device=p.device)  # noqa: E731
        return KVCache(
            [make() for _ in range(cfg.n_layers)], [make() for _ in range(cfg.n_layers)], 0, max_len
        )

    def forward(self, input_ids: Tensor, state: KVCache | None = None, hidden: bool = False) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). With `state`, continues the cached sequence in place.
        hidden: the final normalised hidden states (B, T, dim) instead (the training loss applies the head
        chunk by chunk, train/loss.py)."""
        T = input_ids.shape[1]
        pos = state.pos if state is not None else 0
        limit = state.max_len if state is not None else self.config.context_length
        if pos + T > limit:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the context of {limit}")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            cache = (state.k[i], state.v[i]) if state is not None else None
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, cache, pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, pos)
        if state is not None:
            state.pos = pos + T
        x = self.model.norm(x)
        return x if hidden else self.lm_head(x)

    def decode_rows(self, ids: list[int], states: list[KVCache], positions: list[int]) -> Tensor:
        """One token for each of several sequences (their own batch-1 caches, their own positions), batch-
        invariant: each row's logits (B, V) equal a lone decode's (models/lite_batch.py)."""
        from kititans.models.lite_batch import decode_rows

        return decode_rows(self, ids, states, positions)

    def loss(self, input_ids: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        logits = self(input_ids)
        return lm_loss(logits, targets, mask)


def lm_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross entropy over full fp32 logits; `mask` (B, T) selects the positions that count.
    A convenience for one batch (benchmarks, `model.loss`): training and evaluation reduce by global token
    count and never materialise full fp32 logits (kititans/train/loss.py)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        return loss.mean()
    m = mask.flatten().to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp(min=1)


def llama_dims(cfg: LiteConfig) -> dict:
    """Lite's dimensions under LlamaConfig's names (the encoder's config.json and the GGUF writer read them)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
    }


def hf_llama_config(cfg: LiteConfig) -> dict:
    """The transformers LlamaConfig fields; a Lite run directory loads in AutoModelForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **llama_dims(cfg),
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


# HF tensor name -> (GGUF tensor name, config attribute giving the head count for the rotate-half -> interleaved
# row permutation, or None). `{}` is the layer index. lm_head is absent from the file when tied.
GGUF_TENSORS: dict[str, tuple[str, str | None]] = {
    "model.embed_tokens.weight": ("token_embd.weight", None),
    "model.norm.weight": ("output_norm.weight", None),
    "lm_head.weight": ("output.weight", None),
    "model.layers.{}.input_layernorm.weight": ("blk.{}.attn_norm.weight", None),
    "model.layers.{}.self_attn.q_proj.weight": ("blk.{}.attn_q.weight", "n_heads"),
    "model.layers.{}.self_attn.k_proj.weight": ("blk.{}.attn_k.weight", "n_kv_heads"),
    "model.layers.{}.self_attn.v_proj.weight": ("blk.{}.attn_v.weight", None),
    "model.layers.{}.self_attn.o_proj.weight": ("blk.{}.attn_output.weight", None),
    "model.layers.{}.post_attention_layernorm.weight": ("blk.{}.ffn_norm.weight", None),
    "model.layers.{}.mlp.gate_proj.weight": ("blk.{}.ffn_gate.weight", None),
    "model.layers.{}.mlp.up_proj.weight": ("blk.{}.ffn_up.weight", None),
    "model.layers.{}.mlp.down_proj.weight": ("blk.{}.ffn_down.weight", None),
}

_SMALL = {"train.seq_len": 256, "train.batch_size": 16}
PRESETS = {
    p.name: p
    for p in [
        Preset(
            "debug",
            dict(
                vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, context_length=256
            ),
            {
                "train.seq_len": 128,
                "train.batch_size": 8,
                "train.steps": 200,
                "train.eval_every": 100,
                "train.save_every": 100,
                "optim.warmup_steps": 20,
            },
            "tests: 1.3M params, GQA 4/2, dims multiples of 256",
        ),
        Preset(
            "tiny",
            dict(
                vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=768, context_length=512
            ),
            {**_SMALL, "train.steps": 1200, "train.eval_every": 200, "train.save_every": 400},
            "the CPU default: 4.4M params, trains on the built-in corpus in minutes",
        ),
        Preset(
            "lite-42m",
            dict(
                vocab_size=32000,
                dim=512,
                n_layers=8,
                n_heads=8,
                n_kv_heads=8,
                ffn_dim=1536,
                context_length=1024,
            ),
            {"train.seq_len": 512, "train.batch_size": 16, "train.steps": 20000},
            "TanAILite's shape (llama2.c stories42M): 43.6M params, tied",
        ),
        Preset(
            "lite-125m",
            dict(
                vocab_size=32000,
                dim=768,
                n_layers=12,
                n_heads=12,
                n_kv_heads=4,
                ffn_dim=2048,
                context_length=2048,
                tie_embeddings=False,
            ),
            {"train.seq_len": 1024, "train.batch_size": 16, "train.steps": 50000},
            "GPT-2-small class: 125M params, GQA 12/4, untied",
        ),
        Preset(
            "lite-350m",
            dict(
                vocab_size=32000,
                dim=1024,
                n_layers=24,
                n_heads=16,
                n_kv_heads=8,
                ffn_dim=2816,
                context_length=2048,
                tie_embeddings=False,
            ),
            {"train.seq_len": 1024, "train.batch_size": 16, "train.steps": 100000},
            "349M params, GQA 16/8, untied (GPU)",
        ),
    ]
}

SPEC = register(
    FamilySpec(
        name="lite",
        config_cls=LiteConfig,
        model_cls=LiteModel,
        presets=PRESETS,
        description="llama-compatible GPT: RMSNorm, RoPE, SwiGLU, GQA; runs in transformers and llama.cpp",
        formats={"gguf": GgufLayout(GGUF_TENSORS), "onnx": LiteOnnxStep, "coreml": LiteCoreMLStep},
        hf_config=hf_llama_config,
    )
)
