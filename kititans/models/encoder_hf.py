"""The encoder outside KiTitans: config.json fields and the files that make a run directory load as it is in
`transformers.AutoModel.from_pretrained(run, trust_remote_code=True)` and in
`sentence_transformers.SentenceTransformer(run, trust_remote_code=True)`.

No standard transformers architecture is a bidirectional llama with these names, so the modeling code ships
in the run directory (remote code): MODELING below, which imports only torch and transformers. The
sentence-transformers pipeline is Transformer -> Pooling(mean) -> Normalize, the same computation as
EncoderModel.forward.
"""

from __future__ import annotations

import json
from typing import Any

MODELING_FILE = "modeling_kititans_encoder.py"

MODELING = '''"""KiTitans sentence encoder for transformers (trust_remote_code=True): llama blocks (RMSNorm, RoPE
rotate-half, SwiGLU, GQA) with bidirectional attention. Written by kititans into the run directory; it
imports only torch and transformers. Mean pooling and normalisation are sentence-transformers' modules."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


class KititansEncoderConfig(PretrainedConfig):
    model_type = "kititans-encoder"

    def __init__(self, vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=None, max_position_embeddings=256,
                 rms_norm_eps=1e-5, rope_theta=10000.0, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings, self.rms_norm_eps, self.rope_theta = (
            max_position_embeddings, rms_norm_eps, rope_theta)
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.hkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.hkv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.hkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, keep):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.hkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.hkv, self.hd).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin).to(q.dtype)
        k = (k * cos + rotate_half(k) * sin).to(k.dtype)
        if self.hkv != self.h:
            k = k.repeat_interleave(self.h // self.hkv, dim=1)
            v = v.repeat_interleave(self.h // self.hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, keep):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, keep)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class KititansEncoderModel(PreTrainedModel):
    config_class = KititansEncoderConfig
    base_model_prefix = "kititans_encoder"

    def __init__(self, config):
        super().__init__(config)
        self.model = Backbone(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, attention_mask=None, return_dict=True, **kwargs):
        B, T = input_ids.shape
        keep = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
        c = self.config
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
        ang = torch.outer(torch.arange(T, dtype=torch.float32), inv).to(input_ids.device)
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, keep)
        x = self.model.norm(x)
        return BaseModelOutput(last_hidden_state=x) if return_dict else (x,)
'''


def hf_config(cfg: Any) -> dict[str, Any]:
    from kititans.models.lite import llama_dims

    return {
        "architectures": ["KititansEncoderModel"],
        "model_type": "kititans-encoder",
        "auto_map": {
            "AutoConfig": f"{MODELING_FILE[:-3]}.KititansEncoderConfig",
            "AutoModel": f"{MODELING_FILE[:-3]}.KititansEncoderModel",
        },
        **llama_dims(cfg),
        "torch_dtype": "float32",
    }


def run_files(cfg: Any) -> dict[str, str]:
    """The remote-code modeling file and sentence-transformers' module layout."""

    def js(obj: Any) -> str:
        return json.dumps(obj, indent=2) + "\n"

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": cfg.dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    return {
        MODELING_FILE: MODELING,
        "modules.json": js(modules),
        "1_Pooling/config.json": js(pooling),
        "2_Normalize/config.json": js({}),
        "sentence_bert_config.json": js({"max_seq_length": cfg.context_length, "do_lower_case": False}),
        "config_sentence_transformers.json": js(
            {
                "model_type": "SentenceTransformer",
                "prompts": {},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            }
        ),
    }
